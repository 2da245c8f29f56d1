"""Triton per-row top-k: the k largest of each row, ordered by value (descending)
then index (ascending), as every aefast backend orders them.

Each pass splits the rows into chunks and keeps the k best (value, index) pairs of
every chunk, by k rounds of "take the largest not yet taken; among equal values the
lowest index" (genuine -inf values are handled: taken elements are tracked apart
from their values). Passes repeat on the survivors until one chunk holds a row's
candidates; the last pass gives the answer. k rounds per chunk cost O(k * H) compares
per row, in registers, with one read of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aefast.triton_kernels._common import acc_dtype

INDEX_NONE = 2**62  # larger than any index: never the minimum among real candidates


@triton.jit
def chunk_topk_kernel(
    values_ptr, indices_ptr, out_values_ptr, out_indices_ptr,
    n, k, stride_row, out_stride_row,
    HAS_INDICES: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    """Row `program_id(0)`, chunk `program_id(1)`: the k best of the chunk's n-column
    slice, written at out[row, chunk * k : chunk * k + k] (fewer real ones if the
    chunk is short: the rest get index INDEX_NONE and value -inf)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n
    # Compared in float32 (float64 for float64): exact for every input dtype, so the order is x's.
    v = tl.load(values_ptr + row * stride_row + cols, mask=valid, other=0).to(ACC)
    v = tl.where(valid, v, float("-inf"))
    if HAS_INDICES:
        idx = tl.load(indices_ptr + row * stride_row + cols, mask=valid, other=INDEX_NONE)
        valid = valid & (idx != INDEX_NONE)  # padding of an earlier pass
    else:
        idx = cols
    taken = ~valid
    out = out_values_ptr + row * out_stride_row + chunk * k
    out_idx = out_indices_ptr + row * out_stride_row + chunk * k
    for i in range(0, k):
        best = tl.max(tl.where(taken, float("-inf"), v), axis=0)
        winner = tl.min(tl.where(~taken & (v == best), idx, INDEX_NONE), axis=0)
        tl.store(out + i, best.to(out_values_ptr.dtype.element_ty))
        tl.store(out_idx + i, winner)
        taken = taken | (idx == winner)


def _chunk(k: int, device: torch.device) -> int:
    # A chunk holds at least 2k candidates so each pass shrinks the rows at least 2x.
    least = 1024 if device.type == "cuda" else 256
    return max(least, triton.next_power_of_2(2 * k))


# Beyond this k the k rounds per chunk cost more than a sort (BatchTopK selects k * B).
MAX_ROUNDS_K = 128


def topk_forward(x: torch.Tensor, k: int, relu: bool):
    """(values, int64 indices), each (B, k), per row of x (B, H)."""
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN: top-k of a row with NaN is undefined")
    B, H = x.shape
    if k > MAX_ROUNDS_K:  # a stable sort gives the same order: value desc, index asc
        values, indices = torch.sort(x, dim=1, descending=True, stable=True)
        values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
        return (torch.relu(values) if relu else values), indices
    values = x.contiguous()
    indices = None
    chunk = _chunk(k, x.device)
    n = H
    while True:
        chunks = triton.cdiv(n, chunk)
        out_values = torch.empty((B, chunks * k), dtype=x.dtype, device=x.device)
        out_indices = torch.empty((B, chunks * k), dtype=torch.long, device=x.device)
        chunk_topk_kernel[(B, chunks)](
            values, indices if indices is not None else out_indices, out_values, out_indices,
            n, k, values.stride(0), out_values.stride(0),
            HAS_INDICES=indices is not None, CHUNK=chunk, ACC=acc_dtype(x.dtype),
        )
        values, indices, n = out_values, out_indices, chunks * k
        if chunks == 1:
            break
    return (torch.relu(values) if relu else values), indices
