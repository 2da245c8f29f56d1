"""Plain-PyTorch definitions of every aefast operator.

The ground truth in the tests and the fallback where no compiled kernel exists.
Half inputs are accumulated in float32, as the fused kernels do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aefast.ops.checks import without_values

# rho_hat is clamped to [RHO_HAT_EPS, 1 - RHO_HAT_EPS] so the KL penalty of a dead
# or saturated unit stays finite; the clamp passes the gradient straight through (the
# derivative is taken at the clamped value), so a dead unit is pushed back to life
# instead of getting torch.clamp's zero gradient. The one definition: the KL kernels of every backend
# take it as an argument (aefast/ops/kl.py passes it).
RHO_HAT_EPS = 1e-6


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which per-unit statistics are kept: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_penalty_from_rho_hat(rho_hat: Tensor, rho: float, beta: float = 1.0, eps: float = RHO_HAT_EPS) -> Tensor:
    """beta * sum_j KL(rho || clamp(rho_hat_j, eps, 1 - eps)) for a vector of mean activations;
    the gradient is dKL/dr at the clamped r, also where the clamp is active."""
    r = rho_hat.detach().clamp(eps, 1.0 - eps) + (rho_hat - rho_hat.detach())  # value: the clamp; gradient: 1
    kl = rho * torch.log(rho / r) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - r))
    return beta * kl.sum()


def kl_sparsity(a: Tensor, rho: float, beta: float = 1.0, eps: float = RHO_HAT_EPS) -> Tensor:
    """0-dim beta * sum_j KL(rho || rho_hat_j), rho_hat_j = mean_i a[i, j] clamped to [eps, 1 - eps]."""
    rho_hat = a.mean(0, dtype=stat_dtype(a.dtype))
    return kl_penalty_from_rho_hat(rho_hat, rho, beta, eps).to(a.dtype)


def sigmoid_kl_sparsity(z: Tensor, rho: float, beta: float = 1.0, eps: float = RHO_HAT_EPS) -> tuple[Tensor, Tensor]:
    """(h, penalty) with h = sigmoid(z) and penalty = kl_sparsity(h, rho, beta, eps)."""
    h = torch.sigmoid(z)
    return h, kl_sparsity(h, rho, beta, eps)


def contractive_penalty(h: Tensor, weight: Tensor) -> Tensor:
    """sum_i sum_j (h_ij (1 - h_ij))^2 ||W_j||^2: the squared Frobenius norm of the
    Jacobian of a sigmoid encoder h = sigmoid(x W^T + b), weight W of shape (H, D)."""
    acc = stat_dtype(h.dtype)
    s = h.to(acc) * (1.0 - h.to(acc))
    w2 = weight.to(acc).pow(2).sum(1)
    return (s.pow(2).sum(0) * w2).sum().to(h.dtype)


# ---------------------------------------------------------------- winner-take-all


def _check_no_nan(x: Tensor) -> None:
    message = "x contains NaN; top-k of NaN is undefined"
    if torch.compiler.is_compiling():  # no branch on a value in a graph: checked when it runs
        torch._assert_async(~torch.isnan(x).any(), message)
    elif not without_values(x) and torch.isnan(x).any():  # (meta and fake tensors have none)
        raise ValueError(message)


def topk_sparse(x: Tensor, k: int, relu: bool = True) -> tuple[Tensor, Tensor]:
    """Per row the k largest values and their indices, ordered by value (descending)
    then index (ascending: ties go to the lower index); ReLU after selection."""
    _check_no_nan(x)
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    values, indices = values[..., :k], indices[..., :k]
    return (torch.relu(values) if relu else values), indices


def topk_mask(x: Tensor, k: int, relu: bool = True) -> Tensor:
    """x with all but the k largest values of each row set to 0 (ReLU after selection)."""
    values, indices = topk_sparse(x, k, relu)
    return torch.zeros_like(x).scatter(-1, indices, values)


def batch_topk(x: Tensor, k: int, relu: bool = True) -> Tensor:
    """BatchTopK: keep the k * B largest values of the whole (B, H) batch."""
    flat = x.reshape(1, -1)
    values, indices = topk_sparse(flat, k * x.shape[0], relu)
    return torch.zeros_like(flat).scatter(-1, indices, values).view_as(x)


def lifetime_count(rate: float, batch: int) -> int:
    """ceil(rate * batch), with rate * batch rounded to 9 digits first so that
    0.07 * 100 counts 7, not 8."""
    return max(1, math.ceil(round(rate * batch, 9)))


def lifetime_topk(x: Tensor, rate: float) -> Tensor:
    """Per unit (column), keep the ceil(rate * B) largest values across the batch."""
    m = lifetime_count(rate, x.shape[0])
    values, indices = topk_sparse(x.t(), m, relu=False)
    return torch.zeros_like(x.t()).scatter(-1, indices, values).t()


def spatial_wta(x: Tensor, lifetime_rate: float | None = None) -> Tensor:
    """(N, C, H, W): per sample and channel keep only the largest value of the map;
    with lifetime_rate, per channel keep only the ceil(rate * N) largest of those."""
    n, c = x.shape[:2]
    maps = x.reshape(n * c, -1)
    values, indices = topk_sparse(maps, 1, relu=False)
    if lifetime_rate is not None:
        winners = topk_sparse(values.view(n, c).t(), lifetime_count(lifetime_rate, n), relu=False)[1]
        kept = torch.zeros(c, n, dtype=torch.bool, device=x.device).scatter(-1, winners, True).t()
        values = torch.where(kept.reshape(n * c, 1), values, 0.0)
    return torch.zeros_like(maps).scatter(-1, indices, values).view_as(x)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """out[b] = bias + sum_k values[b, k] * weight[indices[b, k]], weight of shape (L, D)."""
    out = (values.unsqueeze(-1) * weight[indices]).sum(1)
    return out if bias is None else out + bias


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The top-k encoder: topk_sparse(relu(x @ weight.T + bias), k), weight (L, D).
    ReLU before selection: a row with fewer than k positive units takes zeros at the
    lowest indices among the rest."""
    return topk_sparse(torch.relu(torch.nn.functional.linear(x, weight, bias)), k, relu=False)


def topk_encode_aux(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, dead: Tensor,
                    k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """topk_encode, and the top k_aux of the same relu(pre-activation) among the latents
    marked in `dead` (bool (L,)); slots past the dead latents hold 0 (at the lowest
    live indices)."""
    pre = torch.relu(torch.nn.functional.linear(x, weight, bias))
    values, indices = topk_sparse(pre, k, relu=False)
    aux_values, aux_indices = topk_sparse(pre.masked_fill(~dead, float("-inf")), k_aux, relu=False)
    return values, indices, aux_values.clamp_min(0.0), aux_indices


# ------------------------------------------------------------ JumpReLU


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """JumpReLU (Rajamanoharan et al. 2024): (z where z > threshold else 0, per row the
    count of z > threshold: the L0 norm), threshold (L,) per column of z (B, L).

    Gradients, the paper's straight-through estimators with a rectangle kernel
    K(u) = 1 for |u| < 1/2 of width `bandwidth` (eps): d out / d z = H(z - threshold);
    d out / d threshold = -(threshold / eps) K((z - threshold) / eps); d l0 / d threshold
    = -(1 / eps) K((z - threshold) / eps); none to z through l0. The kernel's test and the
    threshold's gradient sum are taken in float32 (float64 for float64 input)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        active = z > threshold
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(active, z, 0.0), active.sum(1).to(stat_dtype(z.dtype))

    @staticmethod
    def backward(ctx, grad_out, grad_l0):
        z, threshold = ctx.saved_tensors
        acc = stat_dtype(z.dtype)
        gap = z.to(acc) - threshold.to(acc)
        near = (gap.abs() < ctx.bandwidth / 2).to(acc) / ctx.bandwidth
        grad_z = torch.where(z > threshold, grad_out, 0.0)
        pull = threshold.to(acc) * grad_out.to(acc) + grad_l0.to(acc)[:, None]
        grad_threshold = -(near * pull).sum(0)
        return grad_z, grad_threshold.to(threshold.dtype), None


# ------------------------------------------------------------ noise injection
# Philox4x32-10 keyed by (seed, element index): element i takes word i mod 4 of the
# block of counter i div 4, mapped to floats as Triton's tl.rand maps a word; normals
# are Box-Muller pairs (cos, sin) of words (0, 1) and (2, 3)
# (csrc/include/aefast/philox.h is the same generator in C++). uint32 words are kept
# in int64 tensors; products are split so nothing overflows.

CORRUPTION_KINDS = ("gaussian", "masking", "salt_pepper", "dropout")
DRAWS_PER_COUNTER = 4
_WORD = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product of the constant a and words b."""
    low_product, high_product = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    hi = (high_product + (low_product >> 16)) >> 16
    lo = (((high_product & 0xFFFF) << 16) + low_product) & _WORD
    return hi, lo


def philox(seed: Tensor | int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit words of Philox4x32-10 for counters (counter, 0, 0) under the
    64-bit key seed, as tl.randint4x(seed, counter) with an int64 counter."""
    seed = torch.as_tensor(seed, dtype=torch.long, device=counter.device)
    c0, c1 = counter & _WORD, (counter >> 32) & _WORD
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return c0, c1, c2, c3


def uniform_from_bits(bits: Tensor) -> Tensor:
    """float32 in [0, 1) from a 32-bit word, as tl.rand."""
    x = torch.where(bits >= 2**31, bits - 2**32, bits)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def normal_pair_from_bits(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two float32 N(0, 1) draws from two words by Box-Muller, as
    tl.random.pair_uniform_to_normal."""
    u1 = uniform_from_bits(a).clamp_min(1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * uniform_from_bits(b)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def element_draws(x: Tensor, seed: Tensor | int, normal: bool) -> Tensor:
    """One float32 draw per element of x (row-major index i: word i mod 4 of counter
    i div 4): N(0, 1) when `normal`, else U[0, 1)."""
    n = x.numel()
    counters = torch.arange((n + DRAWS_PER_COUNTER - 1) // DRAWS_PER_COUNTER, device=x.device)
    a, b, c, d = philox(seed, counters)
    if normal:
        draws = (*normal_pair_from_bits(a, b), *normal_pair_from_bits(c, d))
    else:
        draws = tuple(uniform_from_bits(w) for w in (a, b, c, d))
    return torch.stack(draws, 1).flatten()[:n].view(x.shape)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def corrupt(
    x: Tensor, kind: str, level: float, seed: Tensor | int, low: float = 0.0, high: float = 1.0
) -> Tensor:
    """gaussian: x + level * N(0, 1); masking: a fraction `level` set to 0;
    salt_pepper: a fraction `level` set to low or high (probability 1/2 each);
    dropout: zero with probability level, survivors times 1 / (1 - level).
    An element is hit when its uniform draw u is below float32(level); salt and
    pepper sets it to low when u < level / 2 (given a hit, u / level is uniform)."""
    acc = _acc(x)
    xa = x.to(acc)
    level32 = torch.tensor(level, dtype=torch.float32)
    if kind == "gaussian":
        return (xa + level32.to(acc) * element_draws(x, seed, normal=True).to(acc)).to(x.dtype)
    u = element_draws(x, seed, normal=False)
    hit = u < level32
    if kind == "masking":
        out = torch.where(hit, 0.0, xa)
    elif kind == "dropout":
        out = torch.where(hit, 0.0, xa * torch.tensor(1.0 / (1.0 - level), dtype=acc))
    elif kind == "salt_pepper":
        low_t, high_t = torch.tensor(low, dtype=acc), torch.tensor(high, dtype=acc)
        out = torch.where(hit, torch.where(u < 0.5 * level32, low_t, high_t), xa)
    else:
        raise ValueError(f"kind must be one of {', '.join(CORRUPTION_KINDS)}, got {kind!r}")
    return out.to(x.dtype)


def noisy_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, level: float, seed: Tensor | int,
    low: float = 0.0, high: float = 1.0,
) -> Tensor:
    """F.linear(corrupt(x, kind, level, seed), weight, bias)."""
    return torch.nn.functional.linear(corrupt(x, kind, level, seed, low, high), weight, bias)


def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor | int) -> tuple[Tensor, Tensor]:
    """(z, kl): z = mu + eps * exp(logvar / 2) with eps = N(0, 1) from Philox, and
    kl = mean over the batch of -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))."""
    acc = _acc(mu)
    eps = element_draws(mu, seed, normal=True).to(acc)
    m, lv = mu.to(acc), logvar.to(acc)
    z = m + eps * torch.exp(0.5 * lv)
    kl = (-0.5 * (1.0 + lv - m * m - torch.exp(lv)).sum(1)).mean()
    return z.to(mu.dtype), kl.to(mu.dtype)
