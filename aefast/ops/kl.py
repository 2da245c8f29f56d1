"""The sparse-KL family: kl_sparsity, sigmoid_kl_sparsity, contractive_penalty.

Each operator exists as a C++ op (schema in csrc/ops.cpp; CPU and CUDA kernels)
and as a Triton op (torch.library.custom_op below), with the same signature, fake
implementation and autograd formula; the public functions pick one by backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aefast import backends, reference
from aefast.ops.checks import check_matrix, check_nonnegative, check_open_unit
from aefast.ops._distributed import global_column_mean
from aefast.reference import stat_dtype

# ---------------------------------------------------------------- Triton ops


def _triton():
    from aefast.triton_kernels import kl as kernels

    return kernels


@torch.library.custom_op("aefast::kl_sparsity_forward_triton", mutates_args=())
def _kl_forward_triton(a: Tensor, rho: float, beta: float) -> tuple[Tensor, Tensor]:
    return _triton().kl_sparsity_forward(a, rho, beta)


@torch.library.custom_op("aefast::kl_sparsity_backward_triton", mutates_args=())
def _kl_backward_triton(
    grad_penalty: Tensor, rho_hat: Tensor, batch: int, rho: float, beta: float, dtype: torch.dtype
) -> Tensor:
    return _triton().kl_sparsity_backward(grad_penalty, rho_hat, batch, rho, beta, dtype)


@torch.library.custom_op("aefast::sigmoid_kl_sparsity_forward_triton", mutates_args=())
def _sigmoid_kl_forward_triton(
    z: Tensor, rho: float, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().sigmoid_kl_sparsity_forward(z, rho, beta)


@torch.library.custom_op("aefast::sigmoid_kl_sparsity_backward_triton", mutates_args=())
def _sigmoid_kl_backward_triton(
    grad_h: Tensor, grad_penalty: Tensor, h: Tensor, rho_hat: Tensor, rho: float, beta: float
) -> Tensor:
    return _triton().sigmoid_kl_sparsity_backward(grad_h, grad_penalty, h, rho_hat, rho, beta)


@torch.library.custom_op("aefast::contractive_penalty_forward_triton", mutates_args=())
def _contractive_forward_triton(h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().contractive_penalty_forward(h, weight)


@torch.library.custom_op("aefast::contractive_penalty_backward_triton", mutates_args=())
def _contractive_backward_triton(
    grad_penalty: Tensor, h: Tensor, weight: Tensor, s2: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor]:
    return _triton().contractive_penalty_backward(grad_penalty, h, weight, s2, w2)


# ------------------------------------------- fake implementations and autograd


@dataclass(frozen=True)
class FamilyOps:
    """The six operators of one backend."""

    kl_forward: object
    kl_backward: object
    sigmoid_kl_forward: object
    sigmoid_kl_backward: object
    contractive_forward: object
    contractive_backward: object


OPS: dict[str, FamilyOps] = {
    "triton": FamilyOps(
        torch.ops.aefast.kl_sparsity_forward_triton.default,
        torch.ops.aefast.kl_sparsity_backward_triton.default,
        torch.ops.aefast.sigmoid_kl_sparsity_forward_triton.default,
        torch.ops.aefast.sigmoid_kl_sparsity_backward_triton.default,
        torch.ops.aefast.contractive_penalty_forward_triton.default,
        torch.ops.aefast.contractive_penalty_backward_triton.default,
    )
}
if backends.CPP_BUILT:  # one C++ op serves both: the dispatcher picks the CPU or CUDA kernel
    OPS["cpp"] = OPS["cuda"] = FamilyOps(
        torch.ops.aefast.kl_sparsity_forward.default,
        torch.ops.aefast.kl_sparsity_backward.default,
        torch.ops.aefast.sigmoid_kl_sparsity_forward.default,
        torch.ops.aefast.sigmoid_kl_sparsity_backward.default,
        torch.ops.aefast.contractive_penalty_forward.default,
        torch.ops.aefast.contractive_penalty_backward.default,
    )


def _stats(x: Tensor, n: int) -> Tensor:
    return x.new_empty((n,), dtype=stat_dtype(x.dtype))


def _kl_forward_fake(a, rho, beta):
    return a.new_empty(()), _stats(a, a.shape[1])


def _kl_backward_fake(grad_penalty, rho_hat, batch, rho, beta, dtype):
    return rho_hat.new_empty((batch, rho_hat.shape[0]), dtype=dtype)


def _sigmoid_kl_forward_fake(z, rho, beta):
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(()), _stats(
        z, z.shape[1]
    )


def _sigmoid_kl_backward_fake(grad_h, grad_penalty, h, rho_hat, rho, beta):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _contractive_forward_fake(h, weight):
    return h.new_empty(()), _stats(h, h.shape[1]), _stats(h, h.shape[1])


def _contractive_backward_fake(grad_penalty, h, weight, s2, w2):
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _register(ops: FamilyOps) -> None:
    torch.library.register_fake(ops.kl_forward)(_kl_forward_fake)
    torch.library.register_fake(ops.kl_backward)(_kl_backward_fake)
    torch.library.register_fake(ops.sigmoid_kl_forward)(_sigmoid_kl_forward_fake)
    torch.library.register_fake(ops.sigmoid_kl_backward)(_sigmoid_kl_backward_fake)
    torch.library.register_fake(ops.contractive_forward)(_contractive_forward_fake)
    torch.library.register_fake(ops.contractive_backward)(_contractive_backward_fake)

    def kl_setup(ctx, inputs, output):
        a, ctx.rho, ctx.beta = inputs
        ctx.batch, ctx.dtype = a.shape[0], a.dtype
        ctx.save_for_backward(output[1])

    def kl_backward(ctx, grad_penalty, _grad_rho_hat):
        (rho_hat,) = ctx.saved_tensors
        grad = ops.kl_backward(grad_penalty, rho_hat, ctx.batch, ctx.rho, ctx.beta, ctx.dtype)
        return grad, None, None

    def sigmoid_kl_setup(ctx, inputs, output):
        _, ctx.rho, ctx.beta = inputs
        h, _, rho_hat = output
        ctx.save_for_backward(h, rho_hat)

    def sigmoid_kl_backward(ctx, grad_h, grad_penalty, _grad_rho_hat):
        h, rho_hat = ctx.saved_tensors
        grad = ops.sigmoid_kl_backward(grad_h, grad_penalty, h, rho_hat, ctx.rho, ctx.beta)
        return grad, None, None

    def contractive_setup(ctx, inputs, output):
        h, weight = inputs
        ctx.save_for_backward(h, weight, output[1], output[2])

    def contractive_backward(ctx, grad_penalty, _grad_s2, _grad_w2):
        grad_h, grad_weight = ops.contractive_backward(grad_penalty, *ctx.saved_tensors)
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
        )

    torch.library.register_autograd(ops.kl_forward, kl_backward, setup_context=kl_setup)
    torch.library.register_autograd(
        ops.sigmoid_kl_forward, sigmoid_kl_backward, setup_context=sigmoid_kl_setup
    )
    torch.library.register_autograd(
        ops.contractive_forward, contractive_backward, setup_context=contractive_setup
    )


for _ops in {id(o): o for o in OPS.values()}.values():
    _register(_ops)


# ------------------------------------------------------------ public functions


def _check_kl(x: Tensor, name: str, rho, beta) -> tuple[float, float]:
    check_matrix(x, name)
    return check_open_unit(rho, "rho"), check_nonnegative(beta, "beta")


def kl_sparsity(a: Tensor, rho: float, beta: float = 1.0, *, group=None) -> Tensor:
    """Sparse-autoencoder penalty ``beta * sum_j KL(rho || rho_hat_j)``.

    ``rho_hat_j = mean_i a[i, j]`` is the mean activation of unit j over the batch
    (a of shape (B, H), values in (0, 1)); it is clamped to
    ``[RHO_HAT_EPS, 1 - RHO_HAT_EPS]`` (1e-6) so that a dead unit's penalty is finite.
    Returns a 0-dim tensor of a's dtype; sums are accumulated in float32 (float64 for
    float64 input). One read of ``a`` forward, one write of its gradient backward.

    With ``group`` (a torch.distributed process group), rho_hat is the mean over the
    global batch of all ranks, as if one process saw the whole batch.
    """
    rho, beta = _check_kl(a, "a", rho, beta)
    if group is not None:
        rho_hat = global_column_mean(a, group)
        return reference.kl_penalty_from_rho_hat(rho_hat, rho, beta).to(a.dtype)
    name = backends.resolve(a.device, "kl_sparsity")
    if name == "reference":
        return reference.kl_sparsity(a, rho, beta)
    return OPS[name].kl_forward(a, rho, beta)[0]


def sigmoid_kl_sparsity(
    z: Tensor, rho: float, beta: float = 1.0, *, group=None
) -> tuple[Tensor, Tensor]:
    """``h = sigmoid(z)`` fused with ``kl_sparsity(h, rho, beta)``: returns (h, penalty).

    The forward reads z once and writes h; the backward reads h and the gradient of
    h once and writes the gradient of z, the sigmoid derivative fused in.
    """
    rho, beta = _check_kl(z, "z", rho, beta)
    if group is not None:
        h = torch.sigmoid(z)
        return h, kl_sparsity(h, rho, beta, group=group)
    name = backends.resolve(z.device, "sigmoid_kl_sparsity")
    if name == "reference":
        return reference.sigmoid_kl_sparsity(z, rho, beta)
    h, penalty, _ = OPS[name].sigmoid_kl_forward(z, rho, beta)
    return h, penalty


def contractive_penalty(h: Tensor, weight: Tensor) -> Tensor:
    """Contractive-autoencoder penalty for sigmoid units h = sigmoid(x W^T + b):
    ``sum_i sum_j (h_ij (1 - h_ij))^2 * ||W_j||^2``, the squared Frobenius norm of the
    encoder Jacobian summed over the batch. h of shape (B, H), weight W of shape (H, D)
    (an nn.Linear's weight). Returns a 0-dim tensor of h's dtype (of the wider of the
    two under autocast, which may hand over h and weight in different dtypes)."""
    check_matrix(h, "h")
    if torch.is_autocast_enabled(h.device.type) and isinstance(weight, Tensor) and weight.dtype != h.dtype:
        wide = torch.promote_types(h.dtype, weight.dtype)
        h, weight = h.to(wide), weight.to(wide)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != h.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be 2-D of shape (H={h.shape[1]}, D), got {shape}")
    if weight.dtype != h.dtype or weight.device != h.device:
        raise ValueError(
            f"weight must have h's dtype and device ({h.dtype}, {h.device}), "
            f"got {weight.dtype} on {weight.device}"
        )
    name = backends.resolve(h.device, "contractive_penalty")
    if name == "reference":
        return reference.contractive_penalty(h, weight)
    return OPS[name].contractive_forward(h, weight)[0]
