"""Triton kernels of the sparse-KL family.

The column statistics are taken in two deterministic stages: programs over
(column block, row split) write partial sums, then one program adds the splits in
order and computes the penalty. Launch functions mirror the C++ operators'
signatures (declared in aefast/ops/kl.py); `eps` is the clamp of rho_hat to
[eps, 1 - eps], passed in by the caller (aefast.reference.RHO_HAT_EPS).
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
    tile_grid,
    tile_of_program,
)

# What column_partial_sums_kernel sums over the rows.
SUM_X = 0  # x itself
SUM_SIGMOID = 1  # h = sigmoid(x), which it also writes out
SUM_CONTRACTIVE = 2  # (x (1 - x))^2
SUM_SQUARE = 3  # x^2


@triton.jit
def column_partial_sums_kernel(
    x_ptr, h_ptr, partial_ptr, B, H, stride_xb, stride_xh, rows_per_split,
    WHAT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)  # cols * stride_xh may pass 2^31
    col_ok = cols < H
    first_row = pid_s * rows_per_split
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    for r in range(0, rows_per_split, BLOCK_B):
        rows = (first_row + r + tl.arange(0, BLOCK_B)).to(tl.int64)  # B * H may pass 2^31
        mask = ((rows < B) & (r + tl.arange(0, BLOCK_B) < rows_per_split))[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xh, mask=mask, other=0)
        x = x.to(ACC)
        if WHAT == 1:
            h = (1.0 / (1.0 + tl.exp(-x))).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None] * H + cols[None, :], h, mask=mask)
            v = tl.where(mask, h.to(ACC), 0.0)  # rho_hat is the mean of the h returned
        elif WHAT == 2:
            s = x * (1.0 - x)
            v = s * s
        elif WHAT == 3:
            v = x * x
        else:
            v = x
        acc += v
    tl.store(partial_ptr + pid_s.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def clamp_rho_hat(r, EPS: tl.constexpr):
    """r clamped to [EPS, 1 - EPS], the bounds in r's precision (a bare literal is float32:
    off by 2.5e-9 relative in float64; a float64 constant in the float32 path made ptxas
    spill the sigmoid-KL backward on sm_80)."""
    if r.dtype == tl.float64:
        lo = tl.full([], EPS, tl.float64)
        return tl.minimum(tl.maximum(r, lo), 1.0 - lo)
    return tl.minimum(tl.maximum(r, EPS), 1.0 - EPS)


@triton.jit
def kl_bernoulli_grad(rho, r, EPS: tl.constexpr):
    """d KL(rho || c) / d c at c = clamp(r): a straight-through clamp, so dead units
    get a gradient (csrc/include/aefast/kl_math.h says why)."""
    rc = clamp_rho_hat(r, EPS)
    return -rho / rc + (1.0 - rho) / (1.0 - rc)


@triton.jit
def sum_of_splits(partial_ptr, n_splits, H, cols, ok, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    """Column totals of a (n_splits, H) partial-sum buffer, added in split order."""
    s = tl.zeros((BLOCK_H,), dtype=ACC)
    split = partial_ptr + cols
    for _ in range(0, n_splits):
        s += tl.load(split, mask=ok, other=0)
        split += H  # pointer steps: n_splits * H may pass 2^31
    return s


@triton.jit
def kl_penalty_kernel(
    partial_ptr, rho_hat_ptr, penalty_ptr, n_splits, H, B, rho, beta,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr,
):
    total = tl.zeros((BLOCK_H,), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        ok = cols < H
        mean = sum_of_splits(partial_ptr, n_splits, H, cols, ok, ACC, BLOCK_H) / B
        tl.store(rho_hat_ptr + cols, mean, mask=ok)
        r = clamp_rho_hat(mean, EPS)
        kl = rho * tl.log(rho / r) + (1.0 - rho) * tl.log((1.0 - rho) / (1.0 - r))
        total += tl.where(ok, kl, 0.0)
    tl.store(penalty_ptr, (beta * tl.sum(total, axis=0)).to(penalty_ptr.dtype.element_ty))


@triton.jit
def contractive_penalty_kernel(
    s2_partial_ptr, w2_partial_ptr, s2_ptr, w2_ptr, penalty_ptr, n_s2, n_w2, H,
    ACC: tl.constexpr, BLOCK_H: tl.constexpr,
):
    total = tl.zeros((BLOCK_H,), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        ok = cols < H
        s2 = sum_of_splits(s2_partial_ptr, n_s2, H, cols, ok, ACC, BLOCK_H)
        w2 = sum_of_splits(w2_partial_ptr, n_w2, H, cols, ok, ACC, BLOCK_H)
        tl.store(s2_ptr + cols, s2, mask=ok)
        tl.store(w2_ptr + cols, w2, mask=ok)
        total += s2 * w2
    tl.store(penalty_ptr, tl.sum(total, axis=0).to(penalty_ptr.dtype.element_ty))


@triton.jit
def kl_grad_broadcast_kernel(
    grad_penalty_ptr, rho_hat_ptr, out_ptr, B, H, rho, beta_over_b,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row_block, col_block = tile_of_program(H, BLOCK_H)
    rows = (row_block * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (col_block * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    g = tl.load(grad_penalty_ptr).to(ACC) * beta_over_b
    r = tl.load(rho_hat_ptr + cols, mask=cols < H, other=0.5).to(ACC)
    c = g * kl_bernoulli_grad(rho, r, EPS)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    val = tl.broadcast_to(c[None, :], (BLOCK_B, BLOCK_H)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], val, mask=mask)


@triton.jit
def sigmoid_kl_backward_kernel(
    grad_h_ptr, h_ptr, grad_penalty_ptr, rho_hat_ptr, grad_z_ptr, B, H,
    stride_gb, stride_gh, stride_hb, stride_hh, rho, beta_over_b,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row_block, col_block = tile_of_program(H, BLOCK_H)
    rows = (row_block * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (col_block * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    gh = tl.load(grad_h_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gh, mask=mask, other=0)
    h = tl.load(h_ptr + rows[:, None] * stride_hb + cols[None, :] * stride_hh, mask=mask, other=0)
    h = h.to(ACC)
    g = tl.load(grad_penalty_ptr).to(ACC) * beta_over_b
    # rho_hat read in the tile's own layout (each thread its columns, from cache): a
    # per-column vector broadcast into the tile went through shared memory and spilled.
    r = tl.load(rho_hat_ptr + cols[None, :] + 0 * rows[:, None], mask=mask, other=0.5).to(ACC)
    c = g * kl_bernoulli_grad(rho, r, EPS)
    gz = (gh.to(ACC) + c) * h * (1.0 - h)
    tl.store(grad_z_ptr + rows[:, None] * H + cols[None, :], gz.to(grad_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_by_unit_kernel(
    x_ptr, unit_ptr, grad_penalty_ptr, out_ptr, R, C, stride_xr, stride_xc, factor,
    UNIT_IS_ROW: tl.constexpr, CONTRACTIVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = g * factor * f(x) * unit, with f(x) = 2 s (1 - 2x), s = x (1 - x), for the
    contractive grad in h (unit per column), or f(x) = x for the grad in W (unit per row)."""
    row_block, col_block = tile_of_program(C, BLOCK_C)
    rows = (row_block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (col_block * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)  # cols * stride_xc: 2^31
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    g = tl.load(grad_penalty_ptr).to(ACC) * factor
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0)
    x = x.to(ACC)
    if CONTRACTIVE:
        x = 2.0 * x * (1.0 - x) * (1.0 - 2.0 * x)
    if UNIT_IS_ROW:
        u = tl.load(unit_ptr + rows, mask=rows < R, other=0).to(ACC)[:, None]
    else:
        u = tl.load(unit_ptr + cols, mask=cols < C, other=0).to(ACC)[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], (g * x * u).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers


def _tiles(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, programs to aim for, warps). On a GPU, 8 warps keep a tile's
    16 elements a thread in registers (4 warps spilled the float64 sigmoid on sm_80 and
    sm_90, docs/triton-kernels.md); the interpreter runs each program as NumPy code,
    so there it wants few, large tiles."""
    if not planned_for_gpu(device):
        return 64, 64, 4, 4
    return 32, 128, 4 * multiprocessors(device), 8


def _column_sums(x: torch.Tensor, what: int, h: torch.Tensor | None = None):
    """Partial column sums of f(x) over row splits: (partial (n_splits, H), n_splits)."""
    B, H = x.shape
    block_b, block_h, target, warps = _tiles(x.device, x.dtype)
    col_blocks = triton.cdiv(H, block_h)
    splits = max(1, min(triton.cdiv(B, block_b), triton.cdiv(target, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), block_b) * block_b
    splits = triton.cdiv(B, rows_per_split)
    partial = torch.empty((splits, H), dtype=stat_dtype(x.dtype), device=x.device)
    column_partial_sums_kernel[(col_blocks, splits)](
        x, h if h is not None else x, partial, B, H, x.stride(0), x.stride(1), rows_per_split,
        WHAT=what, ACC=acc_dtype(x.dtype), BLOCK_B=block_b, BLOCK_H=block_h, num_warps=warps,
    )
    return partial, splits


def _finish_kl(partial, splits, B, H, rho, beta, eps, dtype, device):
    rho_hat = torch.empty((H,), dtype=stat_dtype(dtype), device=device)
    penalty = torch.empty((), dtype=dtype, device=device)
    kl_penalty_kernel[(1,)](
        partial, rho_hat, penalty, splits, H, B, rho, beta,
        EPS=eps, ACC=acc_dtype(dtype), BLOCK_H=min(1024, triton.next_power_of_2(H)),
    )
    return penalty, rho_hat


@on_input_device
def kl_sparsity_forward(a: torch.Tensor, rho: float, beta: float, eps: float):
    partial, splits = _column_sums(a, SUM_X)
    return _finish_kl(partial, splits, a.shape[0], a.shape[1], rho, beta, eps, a.dtype, a.device)


@on_input_device
def kl_sparsity_backward(grad_penalty, rho_hat, batch: int, rho: float, beta: float, eps: float, dtype):
    H = rho_hat.shape[0]
    out = torch.empty((batch, H), dtype=dtype, device=rho_hat.device)
    block_b, block_h, _, warps = _tiles(rho_hat.device, dtype)
    kl_grad_broadcast_kernel[tile_grid(batch, H, block_b, block_h)](
        grad_penalty, rho_hat, out, batch, H, rho, beta / batch,
        EPS=eps, ACC=acc_dtype(dtype), BLOCK_B=block_b, BLOCK_H=block_h, num_warps=warps,
    )
    return out


@on_input_device
def sigmoid_kl_sparsity_forward(z: torch.Tensor, rho: float, beta: float, eps: float):
    h = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    partial, splits = _column_sums(z, SUM_SIGMOID, h)
    penalty, rho_hat = _finish_kl(partial, splits, z.shape[0], z.shape[1], rho, beta, eps, z.dtype, z.device)
    return h, penalty, rho_hat


@on_input_device
def sigmoid_kl_sparsity_backward(grad_h, grad_penalty, h, rho_hat, rho: float, beta: float, eps: float):
    B, H = h.shape
    grad_h = grad_h.to(h.dtype)
    grad_z = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    block_b, block_h, _, warps = _tiles(h.device, h.dtype)
    sigmoid_kl_backward_kernel[tile_grid(B, H, block_b, block_h)](
        grad_h, h, grad_penalty, rho_hat, grad_z, B, H,
        grad_h.stride(0), grad_h.stride(1), h.stride(0), h.stride(1), rho, beta / B,
        EPS=eps, ACC=acc_dtype(h.dtype), BLOCK_B=block_b, BLOCK_H=block_h, num_warps=warps,
    )
    return grad_z


@on_input_device
def contractive_penalty_forward(h: torch.Tensor, weight: torch.Tensor):
    H = h.shape[1]
    s2_partial, n_s2 = _column_sums(h, SUM_CONTRACTIVE)
    w2_partial, n_w2 = _column_sums(weight.t(), SUM_SQUARE)  # row norms of W = column sums of W^T
    s2 = torch.empty((H,), dtype=stat_dtype(h.dtype), device=h.device)
    w2 = torch.empty_like(s2)
    penalty = torch.empty((), dtype=h.dtype, device=h.device)
    contractive_penalty_kernel[(1,)](
        s2_partial, w2_partial, s2, w2, penalty, n_s2, n_w2, H,
        ACC=acc_dtype(h.dtype), BLOCK_H=min(1024, triton.next_power_of_2(H)),
    )
    return penalty, s2, w2


def _scale_by_unit(x, unit, grad_penalty, factor: float, unit_is_row: bool, contractive: bool):
    R, C = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_r, block_c, _, warps = _tiles(x.device, x.dtype)
    scale_by_unit_kernel[tile_grid(R, C, block_r, block_c)](
        x, unit, grad_penalty, out, R, C, x.stride(0), x.stride(1), factor,
        UNIT_IS_ROW=unit_is_row, CONTRACTIVE=contractive, ACC=acc_dtype(x.dtype),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


@on_input_device
def contractive_penalty_backward(grad_penalty, h, weight, s2, w2):
    grad_h = _scale_by_unit(h, w2, grad_penalty, 1.0, unit_is_row=False, contractive=True)
    grad_w = _scale_by_unit(weight, s2, grad_penalty, 2.0, unit_is_row=True, contractive=False)
    return grad_h, grad_w
