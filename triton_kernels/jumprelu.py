"""Triton kernels of the JumpReLU family.

Forward: a program per block of rows walks the columns, writing the output and
counting each row's active entries. Backward: programs over (column block, row
split) write z's gradient and partial sums of the threshold's, which torch adds over
the splits in order (deterministic). Launch functions mirror the C++ operators'
signatures (declared in aefast/ops/jumprelu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aefast.triton_kernels._common import (
    acc_dtype,
    multiprocessors,
    on_input_device,
    planned_for_gpu,
    stat_dtype,
)


@triton.jit
def jumprelu_rows_kernel(
    z_ptr, threshold_ptr, out_ptr, l0_ptr, B, L,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # rows * L may pass 2^31
    row_ok = rows < B
    count = tl.zeros((BLOCK_B,), dtype=ACC)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        mask = row_ok[:, None] & col_ok[None, :]
        at = rows[:, None] * L + cols[None, :]
        z = tl.load(z_ptr + at, mask=mask, other=0)
        t = tl.load(threshold_ptr + cols, mask=col_ok, other=0)
        on = (z.to(ACC) > t.to(ACC)[None, :]) & mask
        tl.store(out_ptr + at, tl.where(on, z, 0), mask=mask)
        count += tl.sum(on.to(ACC), axis=1)
    tl.store(l0_ptr + rows, count, mask=row_ok)


@triton.jit
def jumprelu_grad_kernel(
    grad_ptr, grad_l0_ptr, z_ptr, threshold_ptr, grad_z_ptr, partial_ptr, B, L, rows_per_split, half_width,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    cols = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    col_ok = cols < L
    first = tl.program_id(1) * rows_per_split
    t = tl.load(threshold_ptr + cols, mask=col_ok, other=0).to(ACC)
    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=ACC)
    for r in range(0, rows_per_split, BLOCK_B):
        rows = (first + r + tl.arange(0, BLOCK_B)).to(tl.int64)
        row_ok = (rows < B) & (r + tl.arange(0, BLOCK_B) < rows_per_split)
        mask = row_ok[:, None] & col_ok[None, :]
        at = rows[:, None] * L + cols[None, :]
        g = tl.load(grad_ptr + at, mask=mask, other=0)
        z = tl.load(z_ptr + at, mask=mask, other=0).to(ACC)
        gl0 = tl.load(grad_l0_ptr + rows, mask=row_ok, other=0).to(ACC)
        tl.store(grad_z_ptr + at, tl.where(z > t[None, :], g, 0), mask=mask)
        gap = z - t[None, :]
        near = (gap < half_width) & (gap > -half_width) & mask
        acc += tl.where(near, t[None, :] * g.to(ACC) + gl0[:, None], 0.0)
    tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * L + cols, tl.sum(acc, axis=0), mask=col_ok)


def _tiles(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_L, warps): on a GPU, tiles of 32 x 128 elements in 8 warps; the
    interpreter runs each program as NumPy code, so there it wants few, large tiles."""
    if not planned_for_gpu(device):
        return 64, 64, 4
    return 32, 128, 8


@on_input_device
def jumprelu_forward(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
    z, threshold = z.contiguous(), threshold.contiguous()
    B, L = z.shape
    out = torch.empty_like(z)
    l0 = torch.empty((B,), dtype=stat_dtype(z.dtype), device=z.device)
    block_b, block_l, warps = _tiles(z.device)
    block_b = 4 if planned_for_gpu(z.device) else block_b  # a row block walks every column
    jumprelu_rows_kernel[(triton.cdiv(B, block_b),)](
        z, threshold, out, l0, B, L, ACC=acc_dtype(z.dtype), BLOCK_B=block_b, BLOCK_L=block_l, num_warps=warps,
    )
    return out, l0


@on_input_device
def jumprelu_backward(grad_out, grad_l0, z, threshold, bandwidth: float):
    z, threshold = z.contiguous(), threshold.contiguous()
    grad_out = grad_out.to(z.dtype).contiguous()
    grad_l0 = grad_l0.to(stat_dtype(z.dtype)).contiguous()
    B, L = z.shape
    block_b, block_l, warps = _tiles(z.device)
    col_blocks = triton.cdiv(L, block_l)
    target = 4 * multiprocessors(z.device) if planned_for_gpu(z.device) else 4
    splits = max(1, min(triton.cdiv(B, block_b), triton.cdiv(target, col_blocks), 65535))
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), block_b) * block_b
    splits = triton.cdiv(B, rows_per_split)
    grad_z = torch.empty_like(z)
    partial = torch.empty((splits, L), dtype=stat_dtype(z.dtype), device=z.device)
    jumprelu_grad_kernel[(col_blocks, splits)](
        grad_out, grad_l0, z, threshold, grad_z, partial, B, L, rows_per_split, bandwidth / 2,
        ACC=acc_dtype(z.dtype), BLOCK_B=block_b, BLOCK_L=block_l, num_warps=warps,
    )
    grad_threshold = (partial.sum(0) * (-1.0 / bandwidth)).to(threshold.dtype)
    return grad_z, grad_threshold
