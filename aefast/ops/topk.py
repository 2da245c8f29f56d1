"""The top-k family: topk_sparse, topk_mask, batch_topk, lifetime_topk and
spatial_wta (winner-take-all and k-sparse autoencoders, top-k sparse autoencoders).

One selection kernel (`aefast::topk_forward`: per row the k largest, ties to the
lower index) serves every top-k variant through views: batch_topk selects over the
flattened batch, lifetime_topk over the columns, spatial_wta over each feature map.
It exists for CPU tensors (csrc/cpu/topk.cpp: block maxima or a heap), for CUDA tensors
(csrc/cuda/topk.cu, a radix select that splits long rows over many blocks) and in
Triton (triton_kernels/topk.py). The sparse decoder and the fused top-k encoder that
use it are the decode family (aefast/ops/decode.py).

Dense outputs and the selection's gradient come from `scatter_rows`: on CPU one C++
pass per row (`aefast::scatter_rows`), elsewhere PyTorch's in-place scatter into
fresh zeros.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from aefast import backends, reference
from aefast.ops.checks import check_float_dtype, check_tensor
from aefast.ops._distributed import global_count, global_topk_keep

# Backends with top-k kernels (the sparse decoder: aefast/ops/decode.py); `reference`
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
