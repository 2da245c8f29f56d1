"""The winner-take-all family: topk_sparse, topk_mask, batch_topk, lifetime_topk,
spatial_wta and sparse_decode.

One selection kernel (`aefast::topk_forward`: per row the k largest, ties to the
lower index) serves every top-k variant through views: batch_topk selects over the
flattened batch, lifetime_topk over the columns, spatial_wta over each feature map.
It exists for CPU tensors (csrc/cpu/topk.cpp: block maxima or a heap), for CUDA tensors
(csrc/cuda/topk.cu, a radix select that splits long rows over many blocks) and in
Triton (triton_kernels/topk.py).

Dense outputs and the selection's gradient come from `scatter_rows`: on CPU one C++
pass per row (`aefast::scatter_rows`), elsewhere PyTorch's in-place scatter into
fresh zeros.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from aefast import backends, reference
from aefast.ops._checks import autocast_inputs, check_float_dtype, check_linear_params, check_tensor
from aefast.ops._distributed import global_count, global_topk_keep

# Backends with top-k kernels (the sparse decoder: DECODE_OPS below); `reference`
# runs where none is available under `auto`.
KERNELS = ("cpp", "triton", "cuda")


@torch.library.custom_op("aefast::topk_forward_triton", mutates_args=())
def _topk_forward_triton(x: Tensor, k: int, relu: bool) -> tuple[Tensor, Tensor]:
    from aefast.triton_kernels import topk as kernels

    values, indices, nan = kernels.topk_forward(x, k, relu)
    # On CPU the flag costs nothing to read; on a GPU reading it would stall the host
    # every call, so there the NaN values returned report it.
    if x.device.type == "cpu" and bool(nan):
        raise ValueError("x contains NaN; top-k of NaN is undefined")
    return values, indices


# The selection op of each backend with a top-k kernel: per row the k largest. One
# C++ op serves cpp and cuda (the dispatcher picks the CPU or CUDA kernel; `cuda` is
# only chosen where backends.CUDA_BUILT says the CUDA kernels are in aefast._C).
TOPK_OPS = {"triton": torch.ops.aefast.topk_forward_triton.default}
if backends.CPP_BUILT:
    TOPK_OPS["cpp"] = TOPK_OPS["cuda"] = torch.ops.aefast.topk_forward.default


def _register_topk(op) -> None:
    @torch.library.register_fake(op)
    def _(x, k, relu):
        return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)

    def setup(ctx, inputs, output):
        x, _, ctx.relu = inputs
        ctx.width = x.shape[1]
        ctx.save_for_backward(*output)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_values, _grad_indices):
        values, indices = ctx.saved_tensors
        if ctx.relu:  # as torch.relu: no gradient where the output is 0
            grad_values = grad_values * (values > 0)
        return scatter_rows(grad_values, indices, ctx.width, fused=True), None, None

    torch.library.register_autograd(op, backward, setup_context=setup)


for _op in dict.fromkeys(TOPK_OPS.values()):  # cpp and cuda share one op
    _register_topk(_op)


# ------------------------------------------------------------- dense outputs


def _scatter_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_rows_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return grad.gather(1, indices), None, None


if backends.CPP_BUILT:
    torch.library.register_fake("aefast::scatter_rows")(
        lambda values, indices, width: values.new_empty((values.shape[0], width)))
    torch.library.register_autograd("aefast::scatter_rows", _scatter_rows_backward, setup_context=_scatter_rows_setup)


def scatter_rows(values: Tensor, indices: Tensor, width: int, *, fused: bool) -> Tensor:
    """(B, width) zeros but for out[b, indices[b, j]] = values[b, j]. With fused=True, on
    CPU, one C++ pass writes each row once into huge pages (csrc/cpu/topk.cpp); else
    PyTorch's in-place scatter into fresh zeros (the out-of-place one would clone them)."""
    if fused and backends.CPP_BUILT and values.device.type == "cpu":
        return torch.ops.aefast.scatter_rows(values, indices, width)
    out = values.new_zeros((values.shape[0], width))
    return out.scatter_(1, indices, values)


# ------------------------------------------------------------- sparse decoder


@torch.library.custom_op("aefast::sparse_decode_forward_triton", mutates_args=())
def _decode_forward_triton(
    values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    from aefast.triton_kernels import sparse_decode as kernels

    _check_indices_on_cpu(indices, weight.shape[0])
    return kernels.sparse_decode_forward(values, indices, weight, bias)


@torch.library.custom_op("aefast::sparse_decode_backward_triton", mutates_args=())
def _decode_backward_triton(
    grad_out: Tensor, values: Tensor, indices: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    from aefast.triton_kernels import sparse_decode as kernels

    _check_indices_on_cpu(indices, weight.shape[0])
    return kernels.sparse_decode_backward(grad_out, values, indices, weight)


def _check_indices_on_cpu(indices: Tensor, latents: int) -> None:
    """An index out of range raises on CPU, on every backend (the reference too), where
    reading the check costs nothing; on a GPU the kernels make its outputs NaN instead
    of stalling the host every call."""
    # Not while torch.compile traces (a data-dependent branch would break the graph):
    # the compiled call runs the ops, whose kernels check or read nothing out of range.
    if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling() and (
            bool(indices.min() < 0) or bool(indices.max() >= latents)):
        raise IndexError(f"aefast: indices must be in [0, {latents})")


# (forward, backward) of the sparse decoder per backend; one C++ op serves cpp and
# cuda (the dispatcher picks the CPU or CUDA kernel).
DECODE_OPS = {
    "triton": (
        torch.ops.aefast.sparse_decode_forward_triton.default,
        torch.ops.aefast.sparse_decode_backward_triton.default,
    )
}
if backends.CPP_BUILT:
    DECODE_OPS["cpp"] = DECODE_OPS["cuda"] = (
        torch.ops.aefast.sparse_decode_forward.default,
        torch.ops.aefast.sparse_decode_backward.default,
    )


def _register_decode(forward, backward) -> None:
    @torch.library.register_fake(forward)
    def _(values, indices, weight, bias):
        return values.new_empty((values.shape[0], weight.shape[1]))

    @torch.library.register_fake(backward)
    def _(grad_out, values, indices, weight):
        return torch.empty_like(values, memory_format=torch.contiguous_format), torch.empty_like(
            weight, memory_format=torch.contiguous_format
        )

    def setup(ctx, inputs, output):
        values, indices, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(values, indices, weight)

    def grads(ctx, grad_out):
        values, indices, weight = ctx.saved_tensors
        grad_values, grad_weight = backward(grad_out, values, indices, weight)
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (
            grad_values if ctx.needs_input_grad[0] else None,
            None,
            grad_weight if ctx.needs_input_grad[2] else None,
            grad_bias,
        )

    torch.library.register_autograd(forward, grads, setup_context=setup)


for _forward, _backward in dict.fromkeys(DECODE_OPS.values()):  # cpp and cuda share one op
    _register_decode(_forward, _backward)


# ---------------------------------------------------------------- top-k encoder


def _encoder_rows(latents: int) -> int:
    """Rows of the pre-activation computed at a time: about 8M elements (at 1024 x 768
    -> 16384 on 2 CPU threads, blocks of 1M took 2.2x as long: small matmuls)."""
    return max(16, (1 << 23) // max(latents, 1))


def _make_topk_encode(name: str, select, decode_forward, decode_backward):
    """The fused top-k encoder over one backend's selection and decoder ops."""

    @torch.library.custom_op(f"aefast::{name}", mutates_args=())
    def encode(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        # Row blocks: the (B, L) pre-activation never exists, only (rows, L) at a time.
        B, L = x.shape[0], weight.shape[0]
        values = x.new_empty((B, k))
        indices = torch.empty((B, k), dtype=torch.long, device=x.device)
        step = _encoder_rows(L)
        for r0 in range(0, B, step):
            pre = torch.nn.functional.linear(x[r0:r0 + step], weight, bias).relu_()
            values[r0:r0 + step], indices[r0:r0 + step] = select(pre, k, False)
        return values, indices

    @encode.register_fake
    def _(x, weight, bias, k):
        return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)

    def setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.has_bias = bias is not None
        ctx.latents = weight.shape[0]
        ctx.save_for_backward(x, weight, *output)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_values, _grad_indices):
        x, weight, values, indices = ctx.saved_tensors
        grad_pre = grad_values.to(values.dtype) * (values > 0)  # through the ReLU
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        # grad x = sum_k grad_pre[b, k] W[idx[b, k]]: the sparse decoder's forward;
        # grad W[l] = sum over (b, k) with idx = l of grad_pre[b, k] x[b]: its weight
        # gradient (deterministic, no atomics) with x in the place of grad_out.
        grad_x = decode_forward(grad_pre, indices, weight, None) if need_x else None
        grad_weight = decode_backward(x, grad_pre, indices, weight)[1] if need_weight else None
        grad_bias = None
        if ctx.has_bias and need_bias:
            grad_bias = grad_pre.new_zeros(ctx.latents).index_add_(0, indices.flatten(), grad_pre.flatten())
        return grad_x, grad_weight, grad_bias, None

    encode.register_autograd(backward, setup_context=setup)
    return getattr(torch.ops.aefast, name).default


# The fused encoder per backend with both a top-k and a decoder kernel. cpp and cuda
# share one op, as their selection and decoder ops are the same C++ ops: its Python
# body runs on either device and the C++ ops it calls dispatch on the tensors' device.
ENCODE_OPS = {"triton": _make_topk_encode("topk_encode_triton", TOPK_OPS["triton"], *DECODE_OPS["triton"])}
if backends.CPP_BUILT:
    ENCODE_OPS["cpp"] = ENCODE_OPS["cuda"] = _make_topk_encode("topk_encode", TOPK_OPS["cpp"], *DECODE_OPS["cpp"])


# ------------------------------------------------------------------ checks


def _check_x(x: Tensor, name: str = "x", dims: int = 2) -> None:
    check_tensor(x, name)
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    check_float_dtype(x, name)
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def _check_k(k, upper: int, what: str) -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= upper:
        raise ValueError(f"k must be an integer in [1, {upper}] ({what}), got {k!r}")
    return int(k)


def _check_rate(rate, name: str) -> float:
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")
    return float(rate)


def _select(x: Tensor, k: int, relu: bool, op: str) -> tuple[Tensor, Tensor, bool]:
    """Per row of the 2-D x, the k largest (values, indices) on the current backend, and
    whether that backend is aefast's (then its kernel also writes dense outputs)."""
    name = backends.resolve(x.device, op, KERNELS)
    if name == "reference":
        return *reference.topk_sparse(x, k, relu), False
    return *TOPK_OPS[name](x, k, relu), True


# --------------------------------------------------------------- public API


def topk_sparse(x: Tensor, k: int, *, relu: bool = True) -> tuple[Tensor, Tensor]:
    """Per row of x (B, H), the k largest values and their int64 indices, each (B, k).

    Ordered by value (descending), ties to the lower index, the same on every backend.
    With relu=True the selected values are clamped at 0 after selection. The gradient
    flows to the winners only. NaN in x raises a ValueError."""
    _check_x(x)
    k = _check_k(k, x.shape[1], "the number of units")
    values, indices, _ = _select(x, k, relu, "topk_sparse")
    return values, indices


def topk_mask(x: Tensor, k: int, *, relu: bool = True) -> Tensor:
    """x (B, H) with all but the k largest values of each row set to 0; ReLU after
    selection when relu=True. The gradient flows to the winners only."""
    _check_x(x)
    k = _check_k(k, x.shape[1], "the number of units")
    values, indices, fused = _select(x, k, relu, "topk_mask")
    return scatter_rows(values, indices, x.shape[1], fused=fused)


def batch_topk(x: Tensor, k: int, *, relu: bool = True, group=None) -> Tensor:
    """BatchTopK: keep the k * B largest values of the whole batch x (B, H), zero the
    rest (ReLU after selection). On average k per row, any number in a given row.

    With ``group`` (a torch.distributed process group) the k * B_global largest of the
    GLOBAL batch are kept: N ranks keep exactly what one process keeps on the
    concatenated batch (ties go to the earlier rank, then the earlier position)."""
    _check_x(x)
    k = _check_k(k, x.shape[1], "per row on average")
    flat = x.reshape(1, -1)
    if group is None:
        values, indices, fused = _select(flat, k * x.shape[0], relu, "batch_topk")
    else:
        total = k * global_count(x.shape[0], x.device, group)
        values, indices, fused = _select(flat, min(total, flat.shape[1]), False, "batch_topk")
        values = torch.where(global_topk_keep(values, total, group), values, 0.0)  # -inf * 0 is NaN
        if relu:
            values = torch.relu(values)
    return scatter_rows(values, indices, flat.shape[1], fused=fused).view(x.shape)


def lifetime_topk(x: Tensor, rate: float, *, group=None) -> Tensor:
    """Lifetime sparsity (winner-take-all autoencoder, Makhzani & Frey 2015): per unit
    (column of x (B, H)) keep the ceil(rate * B) largest activations across the batch,
    zero the rest. No ReLU: apply it before if the units need one.

    With ``group``, B is the global batch and the selection is made over all ranks'
    rows, exactly as one process would on the concatenated batch."""
    _check_x(x)
    rate = _check_rate(rate, "rate")
    batch = x.shape[0] if group is None else global_count(x.shape[0], x.device, group)
    m = reference.lifetime_count(rate, batch)
    values, indices, fused = _select(x.t(), min(m, x.shape[0]), False, "lifetime_topk")
    if group is not None:
        values = torch.where(global_topk_keep(values, m, group), values, 0.0)
    return scatter_rows(values, indices, x.shape[0], fused=fused).t()


def spatial_wta(x: Tensor, *, lifetime_rate: float | None = None) -> Tensor:
    """Spatial sparsity (convolutional winner-take-all autoencoder): for x (N, C, H, W)
    keep only the largest value of each sample's feature map, zero the rest (ties to
    the first position). With lifetime_rate, per channel keep only the
    ceil(rate * N) samples whose maxima are largest."""
    _check_x(x, dims=4)
    if lifetime_rate is not None:
        lifetime_rate = _check_rate(lifetime_rate, "lifetime_rate")
    n, c = x.shape[:2]
    maps = x.reshape(n * c, -1)
    values, indices, fused = _select(maps, 1, False, "spatial_wta")
    if lifetime_rate is not None:
        m = reference.lifetime_count(lifetime_rate, n)
        _, winners, _ = _select(values.detach().view(n, c).t(), m, False, "spatial_wta")
        kept = torch.zeros((c, n), dtype=torch.bool, device=x.device).scatter_(1, winners, True)
        values = torch.where(kept.t().reshape(n * c, 1), values, 0.0)  # -inf * 0 would be NaN
    return scatter_rows(values, indices, maps.shape[1], fused=fused).view(x.shape)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out[b] = bias + sum_k values[b, k] * weight[indices[b, k]]`` for values and
    int64 indices of shape (B, k) and weight (L, D): the decoder of a top-k sparse
    autoencoder without a dense (B, L) code, forward or backward.

    The weight gradient is deterministic: the (row, slot) pairs are sorted by latent
    and each latent's gradient row is reduced in (row, slot) order, with no atomics,
    so every run gives the same bits. Under autocast, values, weight and bias run in
    the autocast dtype, as for a matmul."""
    _check_x(values, "values")
    values, weight, bias = autocast_inputs(values.device, values, weight, bias)
    if not isinstance(indices, Tensor) or indices.shape != values.shape or indices.dtype != torch.long:
        raise ValueError(f"indices must be an int64 tensor of the values' shape {tuple(values.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype != values.dtype:
        raise ValueError(f"weight must be 2-D (L, D) of the values' dtype {values.dtype}")
    if bias is not None and (bias.shape != (weight.shape[1],) or bias.dtype != values.dtype):
        raise ValueError(f"bias must be None or of shape ({weight.shape[1]},) and dtype {values.dtype}")
    _check_indices_on_cpu(indices, weight.shape[0])
    name = backends.resolve(values.device, "sparse_decode", tuple(DECODE_OPS))
    if name == "reference":
        return reference.sparse_decode(values, indices, weight, bias)
    return DECODE_OPS[name][0](values, indices, weight, bias)


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The fused top-k encoder of a sparse autoencoder:
    ``topk_sparse(relu(x @ weight.T + bias), k)`` for x (B, D) and weight (L, D),
    without ever holding the (B, L) pre-activation: forward, it is computed a block
    of rows at a time (about 8M elements) and reduced to the k winners; backward, the
    gradients come from the winners alone (the sparse decoder's kernels: grad x is a
    sparse decode of the winners' gradients through W, grad W a deterministic
    per-latent scatter of them times x). ReLU before selection: a row with fewer
    than k positive units fills up with zeros at the lowest remaining indices.
    Under autocast, x, weight and bias run in the autocast dtype."""
    _check_x(x)
    x, weight, bias = autocast_inputs(x.device, x, weight, bias)
    check_linear_params(x, weight, bias, "L")
    k = _check_k(k, weight.shape[0], "the number of latents")
    name = backends.resolve(x.device, "topk_encode", tuple(ENCODE_OPS))
    if name == "reference":
        return reference.topk_encode(x, weight, bias, k)
    return ENCODE_OPS[name](x, weight, bias, k)
