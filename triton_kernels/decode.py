"""Triton kernels of the sparse decoder: out[b] = bias + sum_k values[b, k] * W[indices[b, k]].

The weight gradient is reduced per latent over its (row, slot) pairs in a fixed
order (a stable sort of the indices), with no atomics: deterministic.

Indices are not checked on the host (that would stall it every call): an index out of
[0, L) reads nothing and makes its output NaN (forward row, values gradient) and adds
to no weight gradient row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aefast.triton_kernels._common import acc_dtype, on_input_device


@triton.jit
def sparse_decode_forward_kernel(
    values_ptr, indices_ptr, weight_ptr, bias_ptr, out_ptr, K, L, D,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=ok, other=0).to(ACC)
    for j in range(0, K):
        latent = tl.load(indices_ptr + b * K + j)
        v = tl.load(values_ptr + b * K + j).to(ACC)
        in_range = (latent >= 0) & (latent < L)
        w = tl.load(weight_ptr + latent * D + d, mask=ok & in_range, other=float("nan"))
        acc += v * w.to(ACC)
    tl.store(out_ptr + b * D + d, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def sparse_decode_values_grad_kernel(
    grad_ptr, indices_ptr, weight_ptr, out_ptr, K, L, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[e] = grad_out[e // K] . W[indices[e]], one program per (row, slot) pair e."""
    e = tl.program_id(0).to(tl.int64)
    latent = tl.load(indices_ptr + e)
    in_range = (latent >= 0) & (latent < L)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = d < D
        g = tl.load(grad_ptr + (e // K) * D + d, mask=ok, other=0).to(ACC)
        w = tl.load(weight_ptr + latent * D + d, mask=ok & in_range, other=0).to(ACC)
        acc += g * tl.where(in_range, w, float("nan"))
    tl.store(out_ptr + e, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def sparse_decode_weight_grad_kernel(
    grad_ptr, values_ptr, order_ptr, starts_ptr, out_ptr, K, D,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[l] = sum over the pairs e of latent l, in sorted order, of values[e] * grad_out[e // K]."""
    latent = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for s in range(tl.load(starts_ptr + latent), tl.load(starts_ptr + latent + 1)):
        e = tl.load(order_ptr + s)
        v = tl.load(values_ptr + e).to(ACC)
        acc += v * tl.load(grad_ptr + (e // K) * D + d, mask=ok, other=0).to(ACC)
    tl.store(out_ptr + latent * D + d, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _block_d(D: int) -> int:
    return min(1024, triton.next_power_of_2(D))


@on_input_device
def sparse_decode_forward(values, indices, weight, bias):
    B, K = values.shape
    L, D = weight.shape
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    out = torch.empty((B, D), dtype=values.dtype, device=values.device)
    block = _block_d(D)
    sparse_decode_forward_kernel[(B, triton.cdiv(D, block))](
        values, indices, weight, bias.contiguous() if bias is not None else weight, out, K, L, D,
        HAS_BIAS=bias is not None, ACC=acc_dtype(values.dtype), BLOCK_D=block,
    )
    return out


@on_input_device
def sparse_decode_backward(grad_out, values, indices, weight, values_grad=True):
    B, K = values.shape
    L, D = weight.shape
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    grad_out = grad_out.to(values.dtype).contiguous()
    block = _block_d(D)
    grad_values = torch.empty((B, K) if values_grad else (0,), dtype=values.dtype, device=values.device)
    grad_weight = torch.empty((L, D), dtype=weight.dtype, device=weight.device)
    if values_grad:
        sparse_decode_values_grad_kernel[(B * K,)](
            grad_out, indices, weight, grad_values, K, L, D, ACC=acc_dtype(values.dtype), BLOCK_D=block,
        )
    # (row, slot) order within each latent; each latent's run found by a search of the
    # sorted indices (a bincount would read its maximum back to the host).
    latents, order = torch.sort(indices.flatten(), stable=True)
    starts = torch.searchsorted(latents, torch.arange(L + 1, device=values.device))
    sparse_decode_weight_grad_kernel[(L, triton.cdiv(D, block))](
        grad_out, values, order, starts, grad_weight, K, D, ACC=acc_dtype(values.dtype), BLOCK_D=block,
    )
    return grad_values, grad_weight
