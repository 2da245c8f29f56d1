"""The JumpReLU family: jumprelu, the activation of JumpReLU SAEs, with its L0 count.

Kernels: csrc/cpu/jumprelu.cpp, csrc/cuda/jumprelu.cu, triton_kernels/jumprelu.py.
Forward: one read of z, one write of the output and of the per-row counts. Backward:
one read of z and of the gradients, one write of z's gradient, and the threshold's
gradient summed over the batch in fixed row chunks (the same bits on every run).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from aefast import reference
from aefast.ops._declare import CPP, Bench, dense_like, kernel, nbytes, operator, triton_launcher
from aefast.ops.checks import argument, autocasting, check_matrix
from aefast.reference import stat_dtype

# ---------------------------------------------------------------- kernels


def _setup(ctx, inputs, output):
    z, threshold, ctx.bandwidth = inputs
    ctx.save_for_backward(z, threshold)


def _backward(ops, ctx, grad_out, grad_l0):
    z, threshold = ctx.saved_tensors
    if grad_l0 is None:
        grad_l0 = z.new_zeros((z.shape[0],), dtype=stat_dtype(z.dtype))
    if grad_out is None:
        grad_out = torch.zeros_like(z)
    grad_z, grad_threshold = ops.jumprelu_backward(grad_out, grad_l0, z, threshold, ctx.bandwidth)
    return grad_z, grad_threshold, None


def _grad_setup(ctx, inputs, output):
    *tensors, ctx.bandwidth = inputs
    ctx.save_for_backward(*tensors)


def _grad_backward(ops, ctx, grad_of_z, grad_of_threshold):
    """grad_z = H(z - t) g_out, grad_t = -sum_i K_ij (t_j g_out_ij + g_l0_i) / eps: linear
    in (g_out, g_l0), in t through its factor; H and K are steps (no derivative in z)."""
    grad_out, grad_l0, z, threshold = ctx.saved_tensors
    acc = stat_dtype(z.dtype)
    gap = z.to(acc) - threshold.to(acc)
    near = (gap.abs() < ctx.bandwidth / 2).to(acc) / ctx.bandwidth
    upstream = grad_of_threshold.to(acc)
    d_grad_out = torch.where(z > threshold, grad_of_z, 0.0) - (near * threshold.to(acc) * upstream).to(z.dtype)
    d_grad_l0 = -(near * upstream).sum(1)
    d_threshold = -(near * grad_out.to(acc)).sum(0) * upstream
    return d_grad_out, d_grad_l0.to(grad_l0.dtype), None, d_threshold.to(threshold.dtype), None


kernel(
    "jumprelu_forward(Tensor z, Tensor threshold, float bandwidth) -> (Tensor out, Tensor l0)",
    fake=lambda z, threshold, bandwidth: (dense_like(z), z.new_empty((z.shape[0],), dtype=stat_dtype(z.dtype))),
    reference=reference.jumprelu,
    native=CPP,
    triton=triton_launcher("jumprelu", "jumprelu_forward"),
    setup=_setup, backward=_backward,
)
kernel(
    "jumprelu_backward(Tensor grad_out, Tensor grad_l0, Tensor z, Tensor threshold, float bandwidth) "
    "-> (Tensor grad_z, Tensor grad_threshold)",
    fake=lambda grad_out, grad_l0, z, threshold, bandwidth: (dense_like(z), torch.empty_like(threshold)),
    reference=None,
    native=CPP,
    triton=triton_launcher("jumprelu", "jumprelu_backward"),
    setup=_grad_setup, backward=_grad_backward,
)


# ---------------------------------------------------------------- checks


def _threshold(args: dict) -> None:
    z, threshold = args["z"], args["threshold"]
    if not isinstance(threshold, Tensor) or threshold.shape != (z.shape[1],):
        shape = tuple(threshold.shape) if isinstance(threshold, Tensor) else type(threshold).__name__
        raise ValueError(f"threshold must have shape (L={z.shape[1]},), one per column of z, got {shape}")
    # Under autocast z comes in the autocast dtype, the threshold (a parameter) in float32.
    if autocasting(z.device) and threshold.dtype != z.dtype:
        args["threshold"] = threshold = threshold.to(z.dtype)
    if threshold.dtype != z.dtype or threshold.device != z.device:
        raise ValueError(f"threshold must have z's dtype and device ({z.dtype}, {z.device}), "
                         f"got {threshold.dtype} on {threshold.device}")


def _bandwidth(args: dict) -> None:
    bandwidth = args["bandwidth"]
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real) or not 0 < bandwidth < math.inf:
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
    args["bandwidth"] = float(bandwidth)


# ---------------------------------------------------------------- benchmark case

BANDWIDTH = 0.001


def _inputs(rows, cols, dtype, device):
    return {"z": torch.randn(rows, cols, device=device).to(dtype),
            "threshold": torch.rand(cols, device=device).add_(0.5).to(dtype)}


def _bytes(inputs, backward):  # back: read the code's gradient and z, write z's and the threshold's
    z, threshold = inputs["z"], inputs["threshold"]
    counts = z.shape[0] * (8 if z.dtype == torch.float64 else 4)
    forward = 2 * nbytes(z) + nbytes(threshold) + counts
    return forward + ((3 * nbytes(z) + 2 * nbytes(threshold)) if backward else 0)


# ---------------------------------------------------------------- public API


@operator(
    uses=("jumprelu_forward",),
    checks=(argument("z", check_matrix), _threshold, _bandwidth),
    bench=Bench(
        make=_inputs,
        call=lambda op, z, threshold: op(z, threshold, BANDWIDTH),
        reference=lambda z, threshold: reference.jumprelu(z, threshold, BANDWIDTH),
        bytes_moved=_bytes,
        differentiable=("z", "threshold"), params=f"bandwidth={BANDWIDTH}",
    ),
)
def jumprelu(ops, z: Tensor, threshold: Tensor, bandwidth: float = BANDWIDTH) -> tuple[Tensor, Tensor]:
    """JumpReLU (Rajamanoharan et al. 2024, the activation of JumpReLU SAEs) fused with
    its L0 count: for z (B, L) and a threshold (L,) per latent (positive in the
    paper; not checked, which would read it back from the device each call), returns
    (z where z > threshold else 0, per row the number of such entries (float32; float64
    for float64 z)). One pass forward; backward, one pass giving the paper's
    straight-through gradients with a rectangle kernel of width `bandwidth`:
    d out / d z = H(z - threshold), d out / d threshold = -(threshold / bandwidth) K,
    d l0 / d threshold = -(1 / bandwidth) K, K = 1 where |z - threshold| < bandwidth / 2.
    Train the threshold as exp(log_threshold) to keep it positive."""
    return ops.jumprelu_forward(z, threshold, bandwidth)
