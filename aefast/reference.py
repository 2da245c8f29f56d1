"""Plain-PyTorch definitions of every aefast operator.

The ground truth in the tests and the fallback where no compiled kernel exists.
Half inputs are accumulated in float32, as the fused kernels do.
"""

from __future__ import annotations

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
