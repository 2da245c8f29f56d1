"""Triton per-row top-k: the k largest of each row, ordered by value (descending)
then index (ascending), as every aefast backend orders them.

Each pass splits the rows into chunks and keeps the k best (value, index) pairs of
every chunk; passes repeat on the survivors until one chunk holds a row's
candidates; the last pass gives the answer. Two chunk kernels:

- by keys (every dtype but float64, rows under 2^32 - 1): each element becomes one
  int64 key, its float32 bits made order-preserving (-0.0 as +0.0, which compare
  equal) above the complement of its index, so that one integer order is the
  (value desc, index asc) order; Triton's bitonic top-k (tl.topk) keeps the K largest
  keys of the chunk in registers, about 20 compare-exchanges per element, and the
  winners' values are read back from x (exact, signed zeros kept). The round kernel
  below ran at 2-5% of the copy bandwidth on an H200 (4096 x 65536, k = 32: 11.9 ms):
  2k block-wide reductions per chunk, each a barrier.
- by rounds (float64, whose value fills a key; longer rows): k rounds of "take the
  largest not yet taken; among equal values the lowest index" (genuine -inf values
  are handled: taken elements are tracked apart from their values).

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


# The low 32 bits of a key: the complement of the index (larger key, lower index).
LOW_BITS = tl.constexpr(2**32 - 1)
# Smaller than any element's key (-inf's included): a chunk's padding.
KEY_NONE = tl.constexpr(-(2**63))


@triton.jit
def chunk_topk_by_keys_kernel(
    x_ptr, values_ptr, indices_ptr, out_values_ptr, out_indices_ptr, nan_ptr,
    n, k, chunks, x_stride_row, stride_row, out_stride_row,
    HAS_INDICES: tl.constexpr, CHUNK: tl.constexpr, K_POW2: tl.constexpr,
):
    """As chunk_topk_kernel (same program layout, outputs and padding), by one bitonic
    top-k of the chunk's keys; the winners' values are read from x (row stride
    x_stride_row), which every pass gets."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    chunk = pid % chunks
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n
    v = tl.load(values_ptr + row * stride_row + cols, mask=valid, other=0).to(tl.float32)
    if HAS_INDICES:
        idx = tl.load(indices_ptr + row * stride_row + cols, mask=valid, other=INDEX_NONE)
        valid = valid & (idx != INDEX_NONE)  # padding of an earlier pass
    else:
        has_nan = tl.max((v != v).to(tl.int32), axis=0)
        tl.atomic_max(nan_ptr, has_nan, mask=has_nan > 0)
        idx = cols
    bits = tl.where(v == 0.0, 0.0, v).to(tl.int32, bitcast=True)  # -0.0 == +0.0, as compared
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: the magnitude's bits reversed
    key = tl.where(valid, (ordered.to(tl.int64) << 32) | (LOW_BITS - idx), KEY_NONE)
    best = tl.topk(key, K_POW2)  # descending
    real = best != KEY_NONE
    winner = tl.where(real, LOW_BITS - (best & LOW_BITS), INDEX_NONE)
    value = tl.load(x_ptr + row * x_stride_row + winner, mask=real, other=float("-inf"))
    slot = tl.arange(0, K_POW2)
    at = row * out_stride_row + chunk * k + slot
    tl.store(out_values_ptr + at, value, mask=slot < k)
    tl.store(out_indices_ptr + at, winner, mask=slot < k)


def _chunk(n: int, k: int, device: torch.device, by_keys: bool) -> int:
    # A chunk holds at least 2k candidates so each pass shrinks the rows at least 2x,
    # and no more than a short row needs: past the row the chunk is padding that the
    # bitonic top-k sorts all the same (the interpreter took 0.45 s for a 3 x 5 top-k
    # in chunks of 256, 0.1 s in chunks of 16).
    least = (2048 if by_keys else 1024) if planned_for_gpu(device) else 256
    return max(2 * _k_pow2(k), min(least, triton.next_power_of_2(n)))


def _k_pow2(k: int) -> int:
    return max(2, triton.next_power_of_2(k))  # tl.topk: k >= 2


# Beyond this k the k rounds per chunk cost more than a sort (BatchTopK selects k * B).
MAX_ROUNDS_K = 128
# The longest row segment one sort takes: torch.sort refuses rows past INT_MAX elements
# (BatchTopK's one row is B * L: 4096 x 2^20 is 2^32), and a sorted copy of a whole row
# costs three times its memory.
SORT_CHUNK = 2**30


@on_input_device
def topk_forward(x: torch.Tensor, k: int, relu: bool):
    """(values, int64 indices), each (B, k), per row of x (B, H), and a 0-dim bool
    tensor on x's device, true if x holds a NaN: the values are then NaN (and the
    indices 0..k-1). No host synchronisation: the caller decides whether to read it."""
    B = x.shape[0]
    nan = torch.zeros((), dtype=torch.int32, device=x.device)
    if k > MAX_ROUNDS_K:
        values, indices = _sorted_topk(x, k)
        nan = torch.isnan(values[:, :1]).any()  # NaN sorts first: no extra pass over x
    else:
        values, indices = _chunked_topk(x.contiguous(), k, nan)
    if relu:
        values = torch.relu(values)
    nan = nan.bool()
    values = torch.where(nan, torch.full_like(values, float("nan")), values)
    indices = torch.where(nan, torch.arange(k, device=x.device).expand(B, k), indices)
    return values, indices, nan


def _sorted_topk(x: torch.Tensor, k: int):
    """The k largest of each row by a stable sort (the same order: value descending,
    index ascending). A row longer than SORT_CHUNK is sorted a segment at a time and the
    segments' winners, segment after segment, sorted once more: stable, so equal values
    stay in index order."""
    n = x.shape[1]
    if n > SORT_CHUNK and k < SORT_CHUNK // 2:  # each segment gives fewer than it takes
        starts = range(0, n, SORT_CHUNK)
        parts = [_sorted_topk(x[:, start:start + SORT_CHUNK], min(k, n - start)) for start in starts]
        values = torch.cat([v for v, _ in parts], dim=1)
        indices = torch.cat([i + start for (_, i), start in zip(parts, starts)], dim=1)
        values, order = _sorted_topk(values, k)
        return values, indices.gather(1, order)
    values, indices = torch.sort(x, dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


def _chunked_topk(x: torch.Tensor, k: int, nan: torch.Tensor):
    B, n = x.shape
    by_keys = x.dtype != torch.float64 and n < 2**32 - 1
    values, indices = x, None
    chunk = _chunk(n, k, x.device, by_keys)
    while True:
        chunks = triton.cdiv(n, chunk)
        out_values = torch.empty((B, chunks * k), dtype=x.dtype, device=x.device)
        out_indices = torch.empty((B, chunks * k), dtype=torch.long, device=x.device)
        given = indices if indices is not None else out_indices
        if by_keys:
            chunk_topk_by_keys_kernel[(B * chunks,)](
                x, values, given, out_values, out_indices, nan,
                n, k, chunks, x.stride(0), values.stride(0), out_values.stride(0),
                HAS_INDICES=indices is not None, CHUNK=chunk, K_POW2=_k_pow2(k),
                num_warps=8 if chunk >= 2048 else 4,
            )
        else:
            chunk_topk_kernel[(B * chunks,)](
                values, given, out_values, out_indices, nan,
                n, k, chunks, values.stride(0), out_values.stride(0),
                HAS_INDICES=indices is not None, CHUNK=chunk, ACC=acc_dtype(values.dtype),
            )
        values, indices, n = out_values, out_indices, chunks * k
        if chunks == 1:
            return values, indices
