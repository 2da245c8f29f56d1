"""Triton per-row top-k: the k largest of each row, ordered by value (descending)
then index (ascending), as every aefast backend orders them.

Each pass splits the rows into chunks and keeps the k best (value, index) pairs of
every chunk, by k rounds of "take the largest not yet taken; among equal values the
lowest index" (genuine -inf values are handled: taken elements are tracked apart
from their values). Passes repeat on the survivors until one chunk holds a row's
candidates; the last pass gives the answer. k rounds per chunk cost O(k * H) compares
per row, in registers, with one read of x.

The grid is one axis of (row, chunk) programs: axis 0 takes 2^31 - 1 programs where
axis 1 would stop at 65535 chunks (batch_topk's single row of 2^28). A NaN in x sets a
flag on the device (no host sync); the launcher then returns NaN values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aefast.triton_kernels._common import acc_dtype, on_input_device, planned_for_gpu

# Larger than any index: never the minimum among real candidates. A constexpr: the
# compiler (unlike the interpreter) reads no plain module globals inside @triton.jit.
INDEX_NONE = tl.constexpr(2**62)


@triton.jit
def chunk_topk_kernel(
    values_ptr, indices_ptr, out_values_ptr, out_indices_ptr, nan_ptr,
    n, k, chunks, stride_row, out_stride_row,
    HAS_INDICES: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    """Program (row, chunk) = divmod(program_id(0), chunks): the k best of the chunk's
    n-column slice, written at out[row, chunk * k : chunk * k + k] (fewer real ones if
    the chunk is short: the rest get index INDEX_NONE and value -inf). The first pass
    (HAS_INDICES false) sets *nan_ptr to 1 if its slice holds a NaN."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    chunk = pid % chunks
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n
    # Compared in float32 (float64 for float64): exact for every input dtype, so the order is x's.
    v = tl.load(values_ptr + row * stride_row + cols, mask=valid, other=0).to(ACC)
    if not HAS_INDICES:
        has_nan = tl.max((v != v).to(tl.int32), axis=0)
        tl.atomic_max(nan_ptr, has_nan, mask=has_nan > 0)
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
    least = 1024 if planned_for_gpu(device) else 256
    return max(least, triton.next_power_of_2(2 * k))


# Beyond this k the k rounds per chunk cost more than a sort (BatchTopK selects k * B).
MAX_ROUNDS_K = 128


@on_input_device
def topk_forward(x: torch.Tensor, k: int, relu: bool):
    """(values, int64 indices), each (B, k), per row of x (B, H), and a 0-dim bool
    tensor on x's device, true if x holds a NaN: the values are then NaN (and the
    indices 0..k-1). No host synchronisation: the caller decides whether to read it."""
    B = x.shape[0]
    nan = torch.zeros((), dtype=torch.int32, device=x.device)
    if k > MAX_ROUNDS_K:  # a stable sort gives the same order: value desc, index asc
        values, indices = torch.sort(x, dim=1, descending=True, stable=True)
        values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
        nan = torch.isnan(values[:, :1]).any()  # NaN sorts first: no extra pass over x
    else:
        values, indices = _chunked_topk(x.contiguous(), k, nan)
    if relu:
        values = torch.relu(values)
    nan = nan.bool()
    values = torch.where(nan, torch.full_like(values, float("nan")), values)
    indices = torch.where(nan, torch.arange(k, device=x.device).expand(B, k), indices)
    return values, indices, nan


def _chunked_topk(values: torch.Tensor, k: int, nan: torch.Tensor):
    B = values.shape[0]
    indices = None
    chunk = _chunk(k, values.device)
    n = values.shape[1]
    while True:
        chunks = triton.cdiv(n, chunk)
        out_values = torch.empty((B, chunks * k), dtype=values.dtype, device=values.device)
        out_indices = torch.empty((B, chunks * k), dtype=torch.long, device=values.device)
        chunk_topk_kernel[(B * chunks,)](
            values, indices if indices is not None else out_indices, out_values, out_indices, nan,
            n, k, chunks, values.stride(0), out_values.stride(0),
            HAS_INDICES=indices is not None, CHUNK=chunk, ACC=acc_dtype(values.dtype),
        )
        values, indices, n = out_values, out_indices, chunks * k
        if chunks == 1:
            return values, indices
