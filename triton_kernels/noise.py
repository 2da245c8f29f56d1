"""Triton kernels of the noise-injection family: corrupt, reparameterize and the
noisy matmul (corruption applied to x as each tile is loaded, so the corrupted
input never exists in memory).

The generator is that of csrc/include/aefast/philox.h and aefast.reference:
element i takes word i mod 4 of tl.randint4x(seed, i div 4) (an int64 counter),
mapped by tl.random.uint_to_uniform_float; normals are the (cos, sin) pairs of
tl.random.pair_uniform_to_normal on words (0, 1) and (2, 3). So all backends draw
the same numbers. The seed is read from a 0-dim int64 tensor on the device (no
host sync). Launch functions mirror the C++ operators.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from aefast.triton_kernels._common import (
    acc_dtype,
    on_input_device,
    planned_for_gpu,
    tile_grid,
    tile_of_program,
)

# KIND in the kernels, and `kind` in the launchers: the kind's index in
# aefast.reference.CORRUPTION_KINDS, passed in by the caller (aefast/ops/noise.py):
# 0 gaussian, 1 masking, 2 salt_pepper, 3 dropout.
GAUSSIAN, MASKING, SALT_PEPPER, DROPOUT = range(4)

# Where noisy_matmul_kernel applies the corruption.
CORRUPT_NONE = 0
CORRUPT_A = 1  # A is x: out = corrupt(x) @ B
CORRUPT_B = 2  # B is x: out = A @ corrupt(x)
CORRUPT_GRAD_OUT = 3  # out is the gradient of corrupt(x): mask it as the forward did


@triton.jit
def draws_of_counters(seed, first_counter, COUNTERS: tl.constexpr, NORMAL: tl.constexpr):
    """The 4 * COUNTERS draws of consecutive counters, in element order: one
    Philox block per four elements."""
    counters = first_counter + tl.arange(0, COUNTERS).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    if NORMAL:
        d0, d1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0),
                                                  tl.random.uint_to_uniform_float(r1))
        d2, d3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2),
                                                  tl.random.uint_to_uniform_float(r3))
    else:
        d0 = tl.random.uint_to_uniform_float(r0)
        d1 = tl.random.uint_to_uniform_float(r1)
        d2 = tl.random.uint_to_uniform_float(r2)
        d3 = tl.random.uint_to_uniform_float(r3)
    # interleave(interleave(d0, d2), interleave(d1, d3)) = d0[0], d1[0], d2[0], d3[0], d0[1], ...
    return tl.interleave(tl.interleave(d0, d2), tl.interleave(d1, d3))


@triton.jit
def draws_at(seed, index, NORMAL: tl.constexpr):
    """The draw of each element of an index tile of any shape (the tile's Philox
    blocks are recomputed per element: for tiles that are not runs of 4)."""
    r0, r1, r2, r3 = tl.randint4x(seed, index // 4)
    word = index % 4
    if NORMAL:
        first = word < 2
        a = tl.where(first, r0, r2)
        b = tl.where(first, r1, r3)
        n_cos, n_sin = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(a),
                                                        tl.random.uint_to_uniform_float(b))
        return tl.where(word % 2 == 0, n_cos, n_sin)
    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.random.uint_to_uniform_float(bits)


@triton.jit
def corrupt_values(x, draw, level, scale, low, high, KIND: tl.constexpr):
    """x corrupted given its draw (a normal for gaussian, else a uniform)."""
    if KIND == 0:
        return x + level * draw.to(x.dtype)
    hit = draw < level
    if KIND == 1:
        return tl.where(hit, 0.0, x)
    if KIND == 3:
        return tl.where(hit, 0.0, x * scale)
    zero = tl.zeros_like(x)  # low and high in x's dtype (a where of two scalars would be float32)
    return tl.where(hit, tl.where(draw < 0.5 * level, zero + low, zero + high), x)


@triton.jit
def corrupt_grad_values(g, uniform, level, scale, KIND: tl.constexpr):
    """The gradient through a non-gaussian corrupt: zero where hit (dropout also
    scales the survivors)."""
    hit = uniform < level
    if KIND == 3:
        return tl.where(hit, 0.0, g * scale)
    return tl.where(hit, 0.0, g)


@triton.jit
def corrupt_kernel(x_ptr, out_ptr, seed_ptr, n, level, scale, low, high,
                   KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    seed = tl.load(seed_ptr)
    draw = draws_of_counters(seed, pid * (BLOCK // 4), BLOCK // 4, KIND == 0)
    x = tl.load(x_ptr + offs, mask=ok, other=0).to(ACC)
    y = corrupt_values(x, draw, level, scale, low, high, KIND)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def reparameterize_kernel(mu_ptr, logvar_ptr, z_ptr, partial_ptr, seed_ptr, n,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    """z = mu + eps * exp(logvar / 2); one partial sum of the KL terms per program."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    seed = tl.load(seed_ptr)
    mu = tl.load(mu_ptr + offs, mask=ok, other=0).to(ACC)
    lv = tl.load(logvar_ptr + offs, mask=ok, other=0).to(ACC)
    sd = tl.exp(0.5 * lv)
    eps = draws_of_counters(seed, pid.to(tl.int64) * (BLOCK // 4), BLOCK // 4, True).to(ACC)
    tl.store(z_ptr + offs, (mu + eps * sd).to(z_ptr.dtype.element_ty), mask=ok)
    terms = tl.where(ok, 1.0 + lv - mu * mu - sd * sd, 0.0)
    tl.store(partial_ptr + pid, tl.sum(terms, axis=0))


@triton.jit
def reparameterize_backward_kernel(grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, grad_mu_ptr,
                                   grad_logvar_ptr, seed_ptr, n, inv_batch,
                                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    seed = tl.load(seed_ptr)
    gkl = tl.load(grad_kl_ptr).to(ACC) * inv_batch
    g = tl.load(grad_z_ptr + offs, mask=ok, other=0).to(ACC)
    mu = tl.load(mu_ptr + offs, mask=ok, other=0).to(ACC)
    lv = tl.load(logvar_ptr + offs, mask=ok, other=0).to(ACC)
    sd = tl.exp(0.5 * lv)
    eps = draws_of_counters(seed, pid * (BLOCK // 4), BLOCK // 4, True).to(ACC)
    tl.store(grad_mu_ptr + offs, (g + gkl * mu).to(grad_mu_ptr.dtype.element_ty), mask=ok)
    grad_lv = 0.5 * (g * eps * sd + gkl * (sd * sd - 1.0))
    tl.store(grad_logvar_ptr + offs, grad_lv.to(grad_logvar_ptr.dtype.element_ty), mask=ok)


@triton.jit
def noisy_matmul_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, seed_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, x_width,
    level, scale, low, high,
    KIND: tl.constexpr, CORRUPT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (M, N) = A (M, K) @ B (K, N) (+ bias), with x (whichever operand CORRUPT
    names, x_width its row length) corrupted tile by tile as it is loaded."""
    tile_m, tile_n = tile_of_program(N, BLOCK_N)
    rm = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if PRECISION != "ieee64" else tl.float64)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a_ok = (rm < M)[:, None] & (rk < K)[None, :]
        b_ok = (rk < K)[:, None] & (rn < N)[None, :]
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=a_ok, other=0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_ok, other=0)
        if CORRUPT == 1:  # the padding stays 0: gaussian noise or salt must not reach the sum
            draw = draws_at(seed, rm[:, None] * x_width + rk[None, :], KIND == 0)
            noisy = corrupt_values(a.to(acc.dtype), draw, level, scale, low, high, KIND)
            a = tl.where(a_ok, noisy, 0.0).to(a_ptr.dtype.element_ty)
        if CORRUPT == 2:
            draw = draws_at(seed, rk[:, None] * x_width + rn[None, :], KIND == 0)
            noisy = corrupt_values(b.to(acc.dtype), draw, level, scale, low, high, KIND)
            b = tl.where(b_ok, noisy, 0.0).to(b_ptr.dtype.element_ty)
        if DOT_IN_FP32:  # Triton 3.6's interpreter multiplies bfloat16 bit patterns
            a, b = a.to(tl.float32), b.to(tl.float32)
        if PRECISION == "ieee64":
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=tl.float64)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if CORRUPT == 3:  # never gaussian, whose gradient is the identity
        uniform = draws_at(seed, rm[:, None] * x_width + rn[None, :], False)
        acc = corrupt_grad_values(acc, uniform, level, scale, KIND)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0).to(acc.dtype)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------ launchers


def _block(device: torch.device) -> int:
    return 1024 if planned_for_gpu(device) else 4096  # the interpreter wants few programs


def _float32(value: float) -> float:
    """The value as float32 (thresholds are compared in float32 on every backend)."""
    return float(np.float32(value))


def _kind_params(kind: int, level: float, low: float, high: float):
    scale = 1.0 / (1.0 - level) if kind == DROPOUT else 1.0
    return kind, _float32(level), scale, low, high


@on_input_device
def corrupt(x: torch.Tensor, kind: int, level: float, seed: torch.Tensor, low: float, high: float):
    k, level, scale, low, high = _kind_params(kind, level, low, high)
    x = x.contiguous()
    out = torch.empty_like(x)
    n, block = x.numel(), _block(x.device)
    corrupt_kernel[(triton.cdiv(n, block),)](
        x, out, seed, n, level, scale, low, high, KIND=k, ACC=acc_dtype(x.dtype), BLOCK=block,
    )
    return out


@on_input_device
def reparameterize_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    n, block = mu.numel(), _block(mu.device)
    z = torch.empty_like(mu)
    programs = triton.cdiv(n, block)
    partial = torch.empty(programs, dtype=torch.float64 if mu.dtype == torch.float64 else torch.float32,
                          device=mu.device)
    reparameterize_kernel[(programs,)](mu, logvar, z, partial, seed, n, ACC=acc_dtype(mu.dtype), BLOCK=block)
    kl = (-0.5 / mu.shape[0]) * partial.sum()  # partial sums in program order: deterministic
    return z, kl.to(mu.dtype)


@on_input_device
def reparameterize_backward(grad_z, grad_kl, mu, logvar, seed):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    grad_z = grad_z.to(mu.dtype).contiguous()
    n, block = mu.numel(), _block(mu.device)
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    reparameterize_backward_kernel[(triton.cdiv(n, block),)](
        grad_z, grad_kl, mu, logvar, grad_mu, grad_logvar, seed, n, 1.0 / mu.shape[0],
        ACC=acc_dtype(mu.dtype), BLOCK=block,
    )
    return grad_mu, grad_logvar


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee64"
    # float32 follows PyTorch's own switch for F.linear (off by default: full precision).
    # The newer fp32_precision setting first: reading allow_tf32 after it was set raises.
    matmul = torch.backends.cuda.matmul
    tf32 = (getattr(matmul, "fp32_precision", None) == "tf32") if hasattr(matmul, "fp32_precision") \
        else matmul.allow_tf32
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"


def _matmul_tiles(device: torch.device, dtype: torch.dtype, precision: str):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps). On a GPU, chosen so that no specialization
    spills registers on sm_80 or sm_90 (docs/triton-kernels.md): float32 without TF32
    multiplies on the FMA units, and the Philox draws of a corrupted tile add their own
    registers, so its K step is 16."""
    if not planned_for_gpu(device):
        return 32, 32, 32, 4
    return (64, 64, 16, 8) if dtype == torch.float32 and precision == "ieee" else (64, 64, 32, 8)


def noisy_matmul(a, b, *, corrupt_at: int, x_width: int, kind: int, level: float, seed, low: float,
                 high: float, bias=None, out_dtype=None):
    """a (M, K) @ b (K, N) with the operand (or output gradient) named by corrupt_at
    treated as x, of row length x_width. Any strides."""
    M, K = a.shape
    N = b.shape[1]
    k, level, scale, low, high = _kind_params(kind, level, low, high)
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    precision = dot_precision(a.dtype)
    bm, bn, bk, warps = _matmul_tiles(a.device, a.dtype, precision)
    noisy_matmul_kernel[tile_grid(M, N, bm, bn)](
        a, b, out, bias if bias is not None else out, seed, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), x_width, level, scale, low, high,
        KIND=k, CORRUPT=corrupt_at, HAS_BIAS=bias is not None, PRECISION=precision,
        DOT_IN_FP32=a.device.type == "cpu" and a.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return out


@on_input_device
def noisy_linear_forward(x, weight, bias, kind: int, level: float, seed, low: float, high: float):
    """F.linear(corrupt(x), weight, bias): x (B, D), weight (O, D)."""
    return noisy_matmul(x, weight.t(), corrupt_at=CORRUPT_A, x_width=x.shape[1], kind=kind, level=level,
                        seed=seed, low=low, high=high, bias=bias)


@on_input_device
def noisy_linear_grad_input(grad_out, weight, kind: int, level: float, seed):
    """The gradient of x: grad_out @ weight through corrupt's mask (gaussian: none)."""
    at = CORRUPT_NONE if kind == GAUSSIAN else CORRUPT_GRAD_OUT
    return noisy_matmul(grad_out.to(weight.dtype), weight, corrupt_at=at, x_width=weight.shape[1], kind=kind,
                        level=level, seed=seed, low=0.0, high=0.0)


@on_input_device
def noisy_linear_grad_weight(grad_out, x, kind: int, level: float, seed, low: float, high: float):
    """The gradient of weight: grad_out^T @ corrupt(x), x regenerated tile by tile."""
    return noisy_matmul(grad_out.to(x.dtype).t(), x, corrupt_at=CORRUPT_B, x_width=x.shape[1], kind=kind,
                        level=level, seed=seed, low=low, high=high)
