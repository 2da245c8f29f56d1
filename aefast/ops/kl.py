"""The sparse-KL family: kl_sparsity, sigmoid_kl_sparsity, contractive_penalty.

Kernels: csrc/cpu/kl.cpp, csrc/cuda/kl.cu, triton_kernels/kl.py. Each forward
kernel also returns the per-unit statistics its backward reads (rho_hat: the column
means; s2 and w2 for the contractive penalty), in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aefast import reference
from aefast.ops._declare import CPP, Bench, dense_like, kernel, nbytes, operator, triton_launcher
from aefast.ops._distributed import global_column_mean
from aefast.ops.checks import (
    argument,
    autocasting,
    check_matrix,
    check_nonnegative,
    check_open_unit,
)
from aefast.reference import RHO_HAT_EPS, stat_dtype


def _stats(x: Tensor, n: int) -> Tensor:
    return x.new_empty((n,), dtype=stat_dtype(x.dtype))


# ---------------------------------------------------------------- kernels


# Double backward. The statistics outputs (rho_hat, s2, w2) get a gradient only in a
# double backward, from the backward kernels' own formulas below; without one, a None
# (set_materialize_grads(False)), so a first backward costs nothing more.


def _clamped(rho_hat: Tensor, eps: float) -> Tensor:
    """clamp(rho_hat) with the gradient straight through, as the reference's."""
    return rho_hat.detach().clamp(eps, 1.0 - eps) + (rho_hat - rho_hat.detach())


def _kl_slope_and_curvature(rho_hat: Tensor, rho: float, eps: float) -> tuple[Tensor, Tensor]:
    """dKL(rho || c)/dc and d2KL/dc2 at c = clamp(rho_hat), per unit."""
    c = _clamped(rho_hat, eps)
    return -rho / c + (1.0 - rho) / (1.0 - c), rho / c.square() + (1.0 - rho) / (1.0 - c).square()


def _through_batch_mean(grad_rho_hat: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor | None:
    """rho_hat_j = mean_i x[i, j]: its gradient, spread over the batch, in x's dtype."""
    if grad_rho_hat is None:
        return None
    return (grad_rho_hat / batch).to(dtype).expand(batch, -1)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _kl_setup(ctx, inputs, output):
    a, ctx.rho, ctx.beta, ctx.eps = inputs
    ctx.batch, ctx.dtype = a.shape[0], a.dtype
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _kl_backward(ops, ctx, grad_penalty, grad_rho_hat):
    (rho_hat,) = ctx.saved_tensors
    grad = None
    if grad_penalty is not None:
        grad = ops.kl_sparsity_backward(grad_penalty, rho_hat, ctx.batch, ctx.rho, ctx.beta, ctx.eps, ctx.dtype)
    return _add(grad, _through_batch_mean(grad_rho_hat, ctx.batch, ctx.dtype)), None, None, None


def _kl_grad_setup(ctx, inputs, output):
    grad_penalty, rho_hat, ctx.batch, ctx.rho, ctx.beta, ctx.eps, _ = inputs
    ctx.save_for_backward(grad_penalty, rho_hat)


def _kl_grad_backward(ops, ctx, grad):
    """out[i, j] = g beta / B * KL'(c_j): its derivative in g and in rho_hat."""
    grad_penalty, rho_hat = ctx.saved_tensors
    slope, curvature = _kl_slope_and_curvature(rho_hat, ctx.rho, ctx.eps)
    columns, scale = grad.sum(0, dtype=rho_hat.dtype), ctx.beta / ctx.batch
    d_penalty = (scale * (columns * slope).sum()).to(grad_penalty.dtype)
    return d_penalty, grad_penalty.to(rho_hat.dtype) * scale * curvature * columns, None, None, None, None, None


kernel(
    "kl_sparsity_forward(Tensor a, float rho, float beta, float eps) -> (Tensor penalty, Tensor rho_hat)",
    fake=lambda a, rho, beta, eps: (a.new_empty(()), _stats(a, a.shape[1])),
    reference=lambda a, rho, beta, eps: (reference.kl_sparsity(a, rho, beta, eps), None),
    native=CPP,
    triton=triton_launcher("kl", "kl_sparsity_forward"),
    setup=_kl_setup, backward=_kl_backward,
)
kernel(
    "kl_sparsity_backward(Tensor grad_penalty, Tensor rho_hat, SymInt batch, float rho, float beta, "
    "float eps, ScalarType dtype) -> Tensor",
    fake=lambda grad_penalty, rho_hat, batch, rho, beta, eps, dtype: rho_hat.new_empty(
        (batch, rho_hat.shape[0]), dtype=dtype),
    reference=None,
    native=CPP,
    triton=triton_launcher("kl", "kl_sparsity_backward"),
    setup=_kl_grad_setup, backward=_kl_grad_backward,
)


def _sigmoid_kl_setup(ctx, inputs, output):
    _, ctx.rho, ctx.beta, ctx.eps = inputs
    h, _, rho_hat = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, rho_hat)


def _sigmoid_kl_backward(ops, ctx, grad_h, grad_penalty, grad_rho_hat):
    h, rho_hat = ctx.saved_tensors
    grad_h = _add(grad_h, _through_batch_mean(grad_rho_hat, h.shape[0], h.dtype))
    if grad_h is None and grad_penalty is None:
        return None, None, None, None
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    grad_penalty = h.new_zeros(()) if grad_penalty is None else grad_penalty
    grad = ops.sigmoid_kl_sparsity_backward(grad_h, grad_penalty, h, rho_hat, ctx.rho, ctx.beta, ctx.eps)
    return grad, None, None, None


def _sigmoid_kl_grad_setup(ctx, inputs, output):
    *tensors, ctx.rho, ctx.beta, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _sigmoid_kl_grad_backward(ops, ctx, grad):
    """out = (grad_h + g beta / B * KL'(c_j)) * h (1 - h): its derivative in each input."""
    grad_h, grad_penalty, h, rho_hat = ctx.saved_tensors
    acc = rho_hat.dtype
    slope, curvature = _kl_slope_and_curvature(rho_hat, ctx.rho, ctx.eps)
    scale, g, hf = ctx.beta / h.shape[0], grad.to(acc), h.to(acc)
    g_sigmoid = g * hf * (1.0 - hf)
    upstream = grad_h.to(acc) + grad_penalty.to(acc) * scale * slope
    return (g_sigmoid.to(grad_h.dtype), (scale * (g_sigmoid * slope).sum()).to(grad_penalty.dtype),
            (g * upstream * (1.0 - 2.0 * hf)).to(h.dtype),
            grad_penalty.to(acc) * scale * curvature * g_sigmoid.sum(0), None, None, None)


kernel(
    "sigmoid_kl_sparsity_forward(Tensor z, float rho, float beta, float eps) "
    "-> (Tensor h, Tensor penalty, Tensor rho_hat)",
    fake=lambda z, rho, beta, eps: (dense_like(z), z.new_empty(()), _stats(z, z.shape[1])),
    reference=lambda z, rho, beta, eps: (*reference.sigmoid_kl_sparsity(z, rho, beta, eps), None),
    native=CPP,
    triton=triton_launcher("kl", "sigmoid_kl_sparsity_forward"),
    setup=_sigmoid_kl_setup, backward=_sigmoid_kl_backward,
)
kernel(
    "sigmoid_kl_sparsity_backward(Tensor grad_h, Tensor grad_penalty, Tensor h, Tensor rho_hat, float rho, "
    "float beta, float eps) -> Tensor",
    fake=lambda grad_h, grad_penalty, h, rho_hat, rho, beta, eps: dense_like(h),
    reference=None,
    native=CPP,
    triton=triton_launcher("kl", "sigmoid_kl_sparsity_backward"),
    setup=_sigmoid_kl_grad_setup, backward=_sigmoid_kl_grad_backward,
)


def _contractive_slope(h: Tensor) -> Tensor:
    """d (h (1 - h))^2 / dh, halved: h (1 - h)(1 - 2h)."""
    return h * (1.0 - h) * (1.0 - 2.0 * h)


def _contractive_setup(ctx, inputs, output):
    h, weight = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, output[1], output[2])


def _contractive_backward(ops, ctx, grad_penalty, grad_s2, grad_w2):
    h, weight, s2, w2 = ctx.saved_tensors
    grad_h = grad_weight = None
    if grad_penalty is not None:
        grad_h, grad_weight = ops.contractive_penalty_backward(grad_penalty, h, weight, s2, w2)
    if grad_s2 is not None:  # s2_j = sum_i (h (1 - h))^2_ij
        grad_h = _add(grad_h, (grad_s2 * 2.0 * _contractive_slope(h.to(s2.dtype))).to(h.dtype))
    if grad_w2 is not None:  # w2_j = ||W_j||^2
        grad_weight = _add(grad_weight, (grad_w2[:, None] * 2.0 * weight.to(w2.dtype)).to(weight.dtype))
    return (grad_h if ctx.needs_input_grad[0] else None, grad_weight if ctx.needs_input_grad[1] else None)


def _contractive_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _contractive_grad_backward(ops, ctx, grad_of_h, grad_of_weight):
    """grad_h = g 2 w2_j u(h), u = h (1 - h)(1 - 2h); grad_weight = g 2 s2_j W_j: their
    derivative in each input."""
    grad_penalty, h, weight, s2, w2 = ctx.saved_tensors
    acc = s2.dtype
    g, hf, wf = grad_penalty.to(acc), h.to(acc), weight.to(acc)
    g1, g2 = grad_of_h.to(acc), grad_of_weight.to(acc)
    u, du = _contractive_slope(hf), 1.0 - 6.0 * hf + 6.0 * hf.square()
    d_penalty = 2.0 * ((g1 * u).sum(0) * w2).sum() + 2.0 * ((g2 * wf).sum(1) * s2).sum()
    return (d_penalty.to(grad_penalty.dtype), (g1 * g * 2.0 * w2 * du).to(h.dtype),
            (g2 * g * 2.0 * s2[:, None]).to(weight.dtype), g * 2.0 * (g2 * wf).sum(1), g * 2.0 * (g1 * u).sum(0))


# s2: per unit the sum over the batch of (h (1 - h))^2; w2: the weight's squared row norms.
kernel(
    "contractive_penalty_forward(Tensor h, Tensor weight) -> (Tensor penalty, Tensor s2, Tensor w2)",
    fake=lambda h, weight: (h.new_empty(()), _stats(h, h.shape[1]), _stats(h, h.shape[1])),
    reference=lambda h, weight: (reference.contractive_penalty(h, weight), None, None),
    native=CPP,
    triton=triton_launcher("kl", "contractive_penalty_forward"),
    setup=_contractive_setup, backward=_contractive_backward,
)
kernel(
    "contractive_penalty_backward(Tensor grad_penalty, Tensor h, Tensor weight, Tensor s2, Tensor w2) "
    "-> (Tensor grad_h, Tensor grad_weight)",
    fake=lambda grad_penalty, h, weight, s2, w2: (dense_like(h), dense_like(weight)),
    reference=None,
    native=CPP,
    triton=triton_launcher("kl", "contractive_penalty_backward"),
    setup=_contractive_grad_setup, backward=_contractive_grad_backward,
)


# ---------------------------------------------------------------- checks

_RHO_BETA = (argument("rho", check_open_unit), argument("beta", check_nonnegative))


def _contractive_inputs(args: dict) -> None:
    h, weight = args["h"], args["weight"]
    check_matrix(h, "h")
    # Under autocast h and weight may come in different dtypes: both in the wider.
    if autocasting(h.device) and isinstance(weight, Tensor) and weight.dtype != h.dtype:
        wide = torch.promote_types(h.dtype, weight.dtype)
        args["h"], args["weight"] = h, weight = h.to(wide), weight.to(wide)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != h.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be 2-D of shape (H={h.shape[1]}, D), got {shape}")
    if weight.dtype != h.dtype or weight.device != h.device:
        raise ValueError(
            f"weight must have h's dtype and device ({h.dtype}, {h.device}), got {weight.dtype} on {weight.device}"
        )


# ---------------------------------------------------------------- benchmark cases

RHO, BETA = 0.05, 3.0


def _unit_interval(rows, cols, dtype, device):
    return torch.empty(rows, cols, device=device).uniform_(0.02, 0.98).to(dtype)


# ---------------------------------------------------------------- public API


@operator(
    uses=("kl_sparsity_forward",),
    checks=(argument("a", check_matrix), *_RHO_BETA),
    bench=Bench(
        make=lambda r, c, dtype, device: {"a": _unit_interval(r, c, dtype, device)},
        call=lambda op, a: op(a, RHO, BETA),
        reference=lambda a: reference.kl_sparsity(a, RHO, BETA),
        bytes_moved=lambda inputs, backward: nbytes(inputs["a"]) * (2 if backward else 1),
        differentiable=("a",), params=f"rho={RHO}, beta={BETA}",
    ),
)
def kl_sparsity(ops, a: Tensor, rho: float, beta: float = 1.0, *, group=None) -> Tensor:
    """Sparse-autoencoder penalty ``beta * sum_j KL(rho || rho_hat_j)``.

    ``rho_hat_j = mean_i a[i, j]`` is the mean activation of unit j over the batch
    (a of shape (B, H), values in (0, 1)); it is clamped to
    ``[RHO_HAT_EPS, 1 - RHO_HAT_EPS]`` (1e-6) so that a dead unit's penalty is finite;
    the gradient passes the clamp straight through (dKL/drho_hat at the clamped value),
    so a dead unit gets a push back to life, not a zero.
    Returns a 0-dim tensor of a's dtype; sums are accumulated in float32 (float64 for
    float64 input). One read of ``a`` forward, one write of its gradient backward.

    With ``group`` (a torch.distributed process group), rho_hat is the mean over the
    global batch of all ranks, as if one process saw the whole batch.
    """
    if group is not None:
        rho_hat = global_column_mean(a, group)
        return reference.kl_penalty_from_rho_hat(rho_hat, rho, beta).to(a.dtype)
    return ops.kl_sparsity_forward(a, rho, beta, RHO_HAT_EPS)[0]


@operator(
    uses=("sigmoid_kl_sparsity_forward",),
    checks=(argument("z", check_matrix), *_RHO_BETA),
    bench=Bench(
        make=lambda r, c, dtype, device: {"z": torch.randn(r, c, device=device).to(dtype)},
        call=lambda op, z: op(z, RHO, BETA),
        reference=lambda z: reference.sigmoid_kl_sparsity(z, RHO, BETA),
        bytes_moved=lambda inputs, backward: nbytes(inputs["z"]) * (5 if backward else 2),
        differentiable=("z",), params=f"rho={RHO}, beta={BETA}",
    ),
)
def sigmoid_kl_sparsity(ops, z: Tensor, rho: float, beta: float = 1.0, *, group=None) -> tuple[Tensor, Tensor]:
    """``h = sigmoid(z)`` fused with ``kl_sparsity(h, rho, beta)``: returns (h, penalty).

    The forward reads z once and writes h; the backward reads h and the gradient of
    h once and writes the gradient of z, the sigmoid derivative fused in.
    """
    if group is not None:
        h = torch.sigmoid(z)
        return h, kl_sparsity(h, rho, beta, group=group)
    h, penalty, _ = ops.sigmoid_kl_sparsity_forward(z, rho, beta, RHO_HAT_EPS)
    return h, penalty


@operator(
    uses=("contractive_penalty_forward",),
    checks=(_contractive_inputs,),
    bench=Bench(
        make=lambda r, c, dtype, device: {
            "h": _unit_interval(r, c, dtype, device), "weight": torch.randn(c, 784, device=device).to(dtype)},
        call=lambda op, h, weight: op(h, weight),
        reference=reference.contractive_penalty,
        bytes_moved=lambda inputs, backward: nbytes(inputs["h"], inputs["weight"]) * (3 if backward else 1),
        differentiable=("h", "weight"),
    ),
)
def contractive_penalty(ops, h: Tensor, weight: Tensor) -> Tensor:
    """Contractive-autoencoder penalty for sigmoid units h = sigmoid(x W^T + b):
    ``sum_i sum_j (h_ij (1 - h_ij))^2 * ||W_j||^2``, the squared Frobenius norm of the
    encoder Jacobian summed over the batch. h of shape (B, H), weight W of shape (H, D)
    (an nn.Linear's weight). Returns a 0-dim tensor of h's dtype (of the wider of the
    two under autocast, which may hand over h and weight in different dtypes)."""
    return ops.contractive_penalty_forward(h, weight)[0]
