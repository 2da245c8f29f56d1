"""Plain-PyTorch definitions of every aefast operator.

The ground truth in the tests and the fallback where no compiled kernel exists.
Half inputs are accumulated in float32, as the fused kernels do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# rho_hat is clamped to [RHO_HAT_EPS, 1 - RHO_HAT_EPS] so the KL penalty of a dead
# or saturated unit stays finite (csrc/include/aefast/kl_math.h: kRhoHatEps).
RHO_HAT_EPS = 1e-6


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which per-unit statistics are kept: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_penalty_from_rho_hat(rho_hat: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """beta * sum_j KL(rho || clamp(rho_hat_j)) for a vector of mean activations."""
    r = rho_hat.clamp(RHO_HAT_EPS, 1.0 - RHO_HAT_EPS)
    kl = rho * torch.log(rho / r) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - r))
    return beta * kl.sum()


def kl_sparsity(a: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """0-dim beta * sum_j KL(rho || rho_hat_j), rho_hat_j = mean_i a[i, j]."""
    rho_hat = a.mean(0, dtype=stat_dtype(a.dtype))
    return kl_penalty_from_rho_hat(rho_hat, rho, beta).to(a.dtype)


def sigmoid_kl_sparsity(z: Tensor, rho: float, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(h, penalty) with h = sigmoid(z) and penalty = kl_sparsity(h, rho, beta)."""
    h = torch.sigmoid(z)
    return h, kl_sparsity(h, rho, beta)


def contractive_penalty(h: Tensor, weight: Tensor) -> Tensor:
    """sum_i sum_j (h_ij (1 - h_ij))^2 ||W_j||^2: the squared Frobenius norm of the
    Jacobian of a sigmoid encoder h = sigmoid(x W^T + b), weight W of shape (H, D)."""
    acc = stat_dtype(h.dtype)
    s = h.to(acc) * (1.0 - h.to(acc))
    w2 = weight.to(acc).pow(2).sum(1)
    return (s.pow(2).sum(0) * w2).sum().to(h.dtype)


# ---------------------------------------------------------------- winner-take-all


def _check_no_nan(x: Tensor) -> None:
    if torch.isnan(x).any():
        raise ValueError("x contains NaN; top-k of NaN is undefined")


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
