"""The top-k family: topk_sparse, topk_mask, batch_topk, lifetime_topk and
spatial_wta (winner-take-all and k-sparse autoencoders, top-k sparse autoencoders).

One selection kernel (`topk_forward`: per row the k largest, ties to the lower
index) serves every top-k variant through views: batch_topk selects over the
flattened batch, lifetime_topk over the columns, spatial_wta over each feature map.
Kernels: csrc/cpu/topk.cpp (block maxima or a heap), csrc/cuda/topk.cu (a radix
select that splits long rows over many blocks), triton_kernels/topk.py. The sparse
decoder and the fused top-k encoder that use it are the decode family
(aefast/ops/decode.py).

Where the backend has them (CPU), batch_topk takes `topk_mask_index_order`
(csrc/cpu/topk_index_order.cpp: the same winners in index order, found without the
value order its dense output never shows, and that output written in the pass that
filters x), lifetime_topk `column_topk`
(csrc/cpu/topk_columns.cpp: per column, in x's row-major layout, with `keep_rows` for
its gradient), and topk_mask and spatial_wta `topk_mask_rows` (csrc/cpu/topk.cpp: each
row's dense output written as soon as the row is selected).

The other dense outputs and the selection's gradient come from `scatter_rows`: on CPU
one C++ pass per row (large float32 outputs streamed), elsewhere PyTorch's in-place
scatter into fresh zeros.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from aefast import reference
from aefast.ops._declare import CPP, Bench, kernel, nbytes, operator
from aefast.ops._distributed import global_count, global_topk_keep
from aefast.ops.checks import argument, check_bool, check_float_dtype, check_rate, check_tensor

# ---------------------------------------------------------------- kernels


def _scatter_reference(values: Tensor, indices: Tensor, width: int) -> Tensor:
    # In place into fresh zeros: the out-of-place scatter would clone them.
    return values.new_zeros((values.shape[0], width)).scatter_(1, indices, values)


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ops, ctx, grad):
    (indices,) = ctx.saved_tensors
    return grad.gather(1, indices), None, None


# The (B, width) matrix that is 0 but for out[b, indices[b, j]] = values[b, j] (indices
# distinct within a row): a top-k mask or its gradient, each row written once into huge
# pages. A CPU kernel only: elsewhere torch's scatter does it (scatter_rows below).
kernel(
    "scatter_rows(Tensor values, Tensor indices, int width) -> Tensor",
    fake=lambda values, indices, width: values.new_empty((values.shape[0], width)),
    reference=_scatter_reference,
    native=CPP, native_devices=("cpu",),
    setup=_scatter_setup, backward=_scatter_backward,
)


def scatter_rows(ops, values: Tensor, indices: Tensor, width: int) -> Tensor:
    """scatter_rows on the backend of `ops` where it has a kernel, else in torch."""
    return ops.get("scatter_rows", _scatter_reference)(values, indices, width)


def _topk_triton(x: Tensor, k: int, relu: bool) -> tuple[Tensor, Tensor]:
    from aefast.triton_kernels import topk

    values, indices, nan = topk.topk_forward(x, k, relu)
    # On CPU the flag costs nothing to read; on a GPU reading it would stall the host
    # every call, so there the NaN values returned report it.
    if x.device.type == "cpu" and bool(nan):
        raise ValueError("x contains NaN; top-k of NaN is undefined")
    return values, indices


def _topk_setup(ctx, inputs, output):
    x, _, ctx.relu = inputs
    ctx.width = x.shape[1]
    ctx.save_for_backward(*output)
    ctx.mark_non_differentiable(output[1])


def _topk_backward(ops, ctx, grad_values, _grad_indices):
    values, indices = ctx.saved_tensors
    if ctx.relu:  # as torch.relu: no gradient where the output is 0
        grad_values = grad_values * (values > 0)
    return scatter_rows(ops, grad_values, indices, ctx.width), None, None


# Per row the k largest values, ordered by value (descending) then index (ascending):
# ties go to the lower index on every backend. relu=True clamps the selected values
# at 0 after selection.
kernel(
    "topk_forward(Tensor x, int k, bool relu) -> (Tensor values, Tensor indices)",
    fake=lambda x, k, relu: (x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)),
    reference=reference.topk_sparse,
    native=CPP,
    triton=_topk_triton,
    setup=_topk_setup, backward=_topk_backward,
)


def _mask_rows_reference(x: Tensor, k: int, relu: bool) -> tuple[Tensor, Tensor]:
    values, indices = reference.topk_sparse(x, k, relu)
    return _scatter_reference(values, indices, x.shape[1]), indices


def _mask_rows_setup(ctx, inputs, output):
    out, indices = output
    ctx.width = out.shape[1]
    # Not the output itself, which the user holds and may change in place: the winners,
    # and with relu which of them passed it (as torch.relu: no gradient where it is 0).
    ctx.save_for_backward(indices, out.gather(1, indices) > 0 if inputs[2] else None)
    ctx.mark_non_differentiable(indices)


def _mask_rows_backward(ops, ctx, grad, _grad_indices):
    indices, passed = ctx.saved_tensors
    grad_winners = grad.gather(1, indices)
    if passed is not None:
        grad_winners = grad_winners * passed
    return scatter_rows(ops, grad_winners, indices, ctx.width), None, None


# topk_mask's forward in one pass over x: out is x with all but each row's k largest
# zeroed (relu=True: then clamped at 0), indices the winners as topk_forward orders
# them. A CPU kernel only (csrc/cpu/topk.cpp): each row is written as soon as it is
# selected, where topk_forward then scatter_rows made two passes, each at its own
# memory speed. Elsewhere topk_mask is those two.
kernel(
    "topk_mask_rows(Tensor x, int k, bool relu) -> (Tensor out, Tensor indices)",
    fake=lambda x, k, relu: (x.new_empty(x.shape), x.new_empty((x.shape[0], k), dtype=torch.long)),
    reference=_mask_rows_reference,
    native=CPP, native_devices=("cpu",),
    setup=_mask_rows_setup, backward=_mask_rows_backward,
)


def _index_order_reference(x: Tensor, k: int, relu: bool) -> tuple[Tensor, Tensor]:
    values, indices = reference.topk_sparse(x, k, relu)
    indices, order = indices.sort(dim=1)
    return values.gather(1, order), indices


def _mask_index_order_reference(x: Tensor, k: int, relu: bool) -> tuple[Tensor, Tensor]:
    values, indices = _index_order_reference(x, k, relu)
    return _scatter_reference(values, indices, x.shape[1]), indices


# Per row the k largest, ties to the lower index, as topk_forward, but the indices in
# increasing order (a value order nobody reads), with the dense matrix of them (the rest
# of x zeroed): batch_topk's forward, in one pass over x where a row is long, which
# topk_forward then scatter_rows make in two. A CPU kernel only
# (csrc/cpu/topk_index_order.cpp).
kernel(
    "topk_mask_index_order(Tensor x, int k, bool relu) -> (Tensor out, Tensor indices)",
    fake=lambda x, k, relu: (x.new_empty(x.shape), x.new_empty((x.shape[0], k), dtype=torch.long)),
    reference=_mask_index_order_reference,
    native=CPP, native_devices=("cpu",),
    setup=_mask_rows_setup, backward=_mask_rows_backward,
)


def _column_topk_reference(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, rows = _index_order_reference(x.t(), k, False)
    out = x.new_zeros(x.shape)
    out.t().scatter_(1, rows, values)
    return out, rows


def _keep_rows_reference(grad: Tensor, rows: Tensor) -> Tensor:
    out = grad.new_zeros(grad.shape)
    out.t().scatter_(1, rows, grad.t().gather(1, rows))
    return out


def _keep_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _keep_rows_backward(ops, ctx, grad):  # keeping entries is its own adjoint
    (rows,) = ctx.saved_tensors
    return ops.keep_rows(grad, rows), None


def _column_topk_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _column_topk_backward(ops, ctx, grad, _grad_rows):
    (rows,) = ctx.saved_tensors
    return ops.keep_rows(grad, rows), None


# lifetime_topk's selection on a row-major x (B, H): per column the k largest (ties to
# the lower row) kept, the rest zeroed, in x's layout; rows (H, k) the kept rows of
# each column in increasing order. keep_rows(grad, rows) keeps the same entries of
# grad: the gradient. CPU kernels only (csrc/cpu/topk_columns.cpp): elsewhere
# lifetime_topk selects over x.t() with topk_forward.
kernel(
    "keep_rows(Tensor grad, Tensor rows) -> Tensor",
    fake=lambda grad, rows: grad.new_empty(grad.shape),
    reference=_keep_rows_reference,
    native=CPP, native_devices=("cpu",),
    setup=_keep_rows_setup, backward=_keep_rows_backward,
)
kernel(
    "column_topk(Tensor x, int k) -> (Tensor out, Tensor rows)",
    fake=lambda x, k: (x.new_empty(x.shape), x.new_empty((x.shape[1], k), dtype=torch.long)),
    reference=_column_topk_reference,
    native=CPP, native_devices=("cpu",),
    setup=_column_topk_setup, backward=_column_topk_backward,
)


# ---------------------------------------------------------------- checks


def check_dense(name: str = "x", dims: int = 2):
    """A non-empty floating tensor of `dims` dimensions."""

    def check(x, name):
        check_tensor(x, name)
        if x.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
        check_float_dtype(x, name)
        if x.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")

    return argument(name, check)


def check_k(k, upper: int, what: str, name: str = "k") -> int:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= upper:
        raise ValueError(f"{name} must be an integer in [1, {upper}] ({what}), got {k!r}")
    return int(k)


def _k_of_x(what: str):
    """k in [1, the units of x]; `what` says what k counts."""

    def check(args: dict) -> None:
        args["k"] = check_k(args["k"], args["x"].shape[1], what)

    return check


_k_per_row, _k_per_row_on_average = _k_of_x("the number of units"), _k_of_x("per row on average")
_relu = argument("relu", check_bool)


def _rate(name: str, optional: bool = False):
    return argument(name, lambda rate, name: None if optional and rate is None else check_rate(rate, name))


# ---------------------------------------------------------------- benchmark cases

K = 32


def _normal(rows, cols, dtype, device):
    return {"x": torch.randn(rows, cols, device=device).to(dtype)}


def _sparse_bytes(inputs, backward):  # read x, write values and indices; back: read them, write x's gradient
    x = inputs["x"]
    return (nbytes(x) + x.shape[0] * K * (x.element_size() + 8)) * (2 if backward else 1)


def _dense_bytes(output_of: Callable[[Tensor], Tensor]):
    """Read x, write the output; back: write x's gradient, read the output's gradient
    where the winners lie only, its backward gathers them: the 64-byte lines holding
    one (counted on the reference's output: dense winners, lifetime_topk's 5% of a
    column, share lines)."""
    def count(inputs, backward):
        x = inputs["x"]
        if not backward:
            return 2 * nbytes(x)
        per_line = max(1, 64 // x.element_size())
        won = (output_of(x) != 0).flatten()
        won = torch.nn.functional.pad(won, (0, -won.numel() % per_line))
        return 3 * nbytes(x) + int(won.view(-1, per_line).any(1).sum()) * 64

    return count


def _bench(call, reference_call, library, params, bytes_moved, make=_normal):
    return Bench(make=make, call=call, reference=reference_call, bytes_moved=bytes_moved, differentiable=("x",),
                 params=params, library=library)


def _topk_values(x, k, dim=1):  # what a user writes: torch.topk, then ReLU
    values, indices = torch.topk(x, k, dim=dim)
    return values.relu(), indices


def _torch_topk_mask(x, k):
    values, indices = _topk_values(x, k)
    return torch.zeros_like(x).scatter(1, indices, values)


def _torch_batch_topk(x, k):
    values, indices = _topk_values(x.flatten(), k * x.shape[0], dim=0)
    return torch.zeros_like(x.flatten()).scatter(0, indices, values).view_as(x)


def _torch_lifetime_topk(x, rate):
    values, indices = torch.topk(x, reference.lifetime_count(rate, x.shape[0]), dim=0)
    return torch.zeros_like(x).scatter(0, indices, values)


def _torch_spatial_wta(x):
    maps = x.flatten(2)
    values, indices = maps.max(-1, keepdim=True)
    return torch.zeros_like(maps).scatter(2, indices, values).view_as(x)


# ---------------------------------------------------------------- public API


@operator(uses=("topk_forward",), checks=(check_dense(), _k_per_row, _relu),
          bench=_bench(lambda op, x: op(x, K), lambda x: reference.topk_sparse(x, K),
                       ("torch.topk", lambda x: _topk_values(x, K)), f"k={K}", _sparse_bytes))
def topk_sparse(ops, x: Tensor, k: int, *, relu: bool = True) -> tuple[Tensor, Tensor]:
    """Per row of x (B, H), the k largest values and their int64 indices, each (B, k).

    Ordered by value (descending), ties to the lower index, the same on every backend.
    With relu=True the selected values are clamped at 0 after selection. The gradient
    flows to the winners only. NaN in x raises a ValueError on CPU; on a GPU, where
    the check would stall the host every call, the values come back NaN instead."""
    return ops.topk_forward(x, k, relu)


@operator(uses=("topk_forward",), prefers=("topk_mask_rows",), checks=(check_dense(), _k_per_row, _relu),
          bench=_bench(lambda op, x: op(x, K), lambda x: reference.topk_mask(x, K),
                       ("torch.topk + scatter", lambda x: _torch_topk_mask(x, K)), f"k={K}",
                       _dense_bytes(lambda x: reference.topk_mask(x, K))))
def topk_mask(ops, x: Tensor, k: int, *, relu: bool = True) -> Tensor:
    """x (B, H) with all but the k largest values of each row set to 0; ReLU after
    selection when relu=True. The gradient flows to the winners only."""
    mask_rows = ops.get("topk_mask_rows")
    if mask_rows is not None:  # one pass: each row written as it is selected
        return mask_rows(x, k, relu)[0]
    values, indices = ops.topk_forward(x, k, relu)
    return scatter_rows(ops, values, indices, x.shape[1])


@operator(uses=("topk_forward",), prefers=("topk_mask_index_order",), checks=(check_dense(), _k_per_row_on_average, _relu),
          bench=_bench(lambda op, x: op(x, K), lambda x: reference.batch_topk(x, K),
                       ("torch.topk(x.flatten()) + scatter", lambda x: _torch_batch_topk(x, K)), f"k={K} per row",
                       _dense_bytes(lambda x: reference.batch_topk(x, K))))
def batch_topk(ops, x: Tensor, k: int, *, relu: bool = True, group=None) -> Tensor:
    """BatchTopK: keep the k * B largest values of the whole batch x (B, H), zero the
    rest (ReLU after selection). On average k per row, any number in a given row.

    With ``group`` (a torch.distributed process group) the k * B_global largest of the
    GLOBAL batch are kept: N ranks keep exactly what one process keeps on the
    concatenated batch (ties go to the earlier rank, then the earlier position)."""
    flat = x.reshape(1, -1)
    mask_index_order = ops.get("topk_mask_index_order")
    if group is None and mask_index_order is not None:  # one pass: x filtered as the output is written
        return mask_index_order(flat, k * x.shape[0], relu)[0].view(x.shape)
    if group is None:
        values, indices = ops.topk_forward(flat, k * x.shape[0], relu)
    else:
        total = k * global_count(x.shape[0], x.device, group)
        values, indices = ops.topk_forward(flat, min(total, flat.shape[1]), False)
        values = torch.where(global_topk_keep(values, total, group), values, 0.0)  # -inf * 0 is NaN
        if relu:
            values = torch.relu(values)
    return scatter_rows(ops, values, indices, flat.shape[1]).view(x.shape)


@operator(uses=("topk_forward",), prefers=("column_topk",), checks=(check_dense(), _rate("rate")),
          bench=_bench(lambda op, x: op(x, 0.05), lambda x: reference.lifetime_topk(x, 0.05),
                       ("torch.topk(dim=0) + scatter", lambda x: _torch_lifetime_topk(x, 0.05)), "rate=0.05",
                       _dense_bytes(lambda x: reference.lifetime_topk(x, 0.05))))
def lifetime_topk(ops, x: Tensor, rate: float, *, group=None) -> Tensor:
    """Lifetime sparsity (winner-take-all autoencoder, Makhzani & Frey 2015): per unit
    (column of x (B, H)) keep the ceil(rate * B) largest activations across the batch,
    zero the rest. No ReLU: apply it before if the units need one.

    With ``group``, B is the global batch and the selection is made over all ranks'
    rows, exactly as one process would on the concatenated batch."""
    batch = x.shape[0] if group is None else global_count(x.shape[0], x.device, group)
    m = reference.lifetime_count(rate, batch)
    local = min(m, x.shape[0])  # the candidates this rank offers
    column_topk = ops.get("column_topk")
    if group is None and column_topk is not None:  # x's own layout, no transposed copies
        return column_topk(x, local)[0]
    values, indices = ops.topk_forward(x.t(), local, False)
    if group is not None:  # global_topk_keep reads the candidates in value order
        values = torch.where(global_topk_keep(values, m, group), values, 0.0)
    return scatter_rows(ops, values, indices, x.shape[0]).t()


@operator(uses=("topk_forward",), prefers=("topk_mask_rows",),
          checks=(check_dense(dims=4), _rate("lifetime_rate", optional=True)),
          bench=_bench(lambda op, x: op(x), reference.spatial_wta, ("amax + scatter", _torch_spatial_wta),
                       "one winner per map", _dense_bytes(reference.spatial_wta),
                       make=lambda r, c, dtype, device: {
                           "x": torch.randn(r // 4, 16, 8, c // 32, device=device).to(dtype)}))
def spatial_wta(ops, x: Tensor, *, lifetime_rate: float | None = None) -> Tensor:
    """Spatial sparsity (convolutional winner-take-all autoencoder): for x (N, C, H, W)
    keep only the largest value of each sample's feature map, zero the rest (ties to
    the first position). With lifetime_rate, per channel keep only the
    ceil(rate * N) samples whose maxima are largest."""
    n, c = x.shape[:2]
    maps = x.reshape(n * c, -1)
    mask_rows = ops.get("topk_mask_rows")
    if lifetime_rate is None and mask_rows is not None:  # one pass: each map written as it is read
        return mask_rows(maps, 1, False)[0].view(x.shape)
    values, indices = ops.topk_forward(maps, 1, False)
    if lifetime_rate is not None:
        m = reference.lifetime_count(lifetime_rate, n)
        _, winners = ops.topk_forward(values.detach().view(n, c).t(), m, False)
        kept = torch.zeros((c, n), dtype=torch.bool, device=x.device).scatter_(1, winners, True)
        values = torch.where(kept.t().reshape(n * c, 1), values, 0.0)  # -inf * 0 would be NaN
    return scatter_rows(ops, values, indices, maps.shape[1]).view(x.shape)
