"""nn.Module wrappers of the aefast operators."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from aefast import reference
from aefast.ops._distributed import global_column_mean
from aefast.ops.checks import (
    check_bool,
    check_finite,
    check_matrix,
    check_nonnegative,
    check_open_unit,
    check_rate,
)
from aefast.ops.kl import contractive_penalty, kl_sparsity
from aefast.ops.noise import check_kind_level, corrupt, noisy_linear
from aefast.ops.topk import batch_topk, lifetime_topk, spatial_wta, topk_mask

__all__ = [
    "BatchTopK",
    "ContractivePenalty",
    "Corrupt",
    "KLSparsity",
    "LifetimeTopK",
    "NoisyLinear",
    "SpatialWTA",
    "TopK",
]


class KLSparsity(nn.Module):
    """Sparse-autoencoder penalty ``beta * sum_j KL(rho || rho_hat_j)``.

    Without ``momentum``, rho_hat is the mean activation over the batch at hand
    (``aefast.kl_sparsity``). A small batch gives a poor estimate of the mean
    activation; with ``momentum`` (in (0, 1], BatchNorm's convention: the weight of
    the new batch), rho_hat is an exponential moving average across batches,
    ``rho_hat = (1 - momentum) * running + momentum * batch_mean``. Its gradient is the
    sparse autoencoder's (UFLDL) with the estimate in place of the batch mean:
    ``beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat)) / B`` per element, as if rho_hat
    moved one for one with the batch mean (through the batch part alone it would move by
    `momentum`, and beta would act ten times weaker at 0.1). The running estimate (buffer ``running_rho_hat``,
    float32) is updated in training mode only and starts from the first batch.
    ``group``: a torch.distributed process group whose global batch defines the mean.
    """

    def __init__(self, rho: float, beta: float = 1.0, momentum: float | None = None, *, group=None):
        super().__init__()
        self.rho = check_open_unit(rho, "rho")
        self.beta = check_nonnegative(beta, "beta")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be None or a number in (0, 1], got {momentum!r}")
        self.momentum = momentum
        self.group = group
        self.register_buffer("running_rho_hat", None)

    def forward(self, a: Tensor) -> Tensor:
        if self.momentum is None:
            return kl_sparsity(a, self.rho, self.beta, group=self.group)
        check_matrix(a, "a")
        if self.group is not None:
            batch_mean = global_column_mean(a, self.group)
        else:
            batch_mean = a.mean(0, dtype=reference.stat_dtype(a.dtype))
        running = self.running_rho_hat
        if running is None:
            estimate = batch_mean
        else:
            if running.shape != batch_mean.shape:
                raise ValueError(
                    f"a has {batch_mean.shape[0]} units but the running estimate has "
                    f"{running.shape[0]}"
                )
            moving = (1.0 - self.momentum) * running.to(batch_mean) + self.momentum * batch_mean
            estimate = batch_mean + (moving - batch_mean).detach()  # the value of the average, the batch's gradient
        if self.training:
            self.running_rho_hat = estimate.detach().clone()
        return reference.kl_penalty_from_rho_hat(estimate, self.rho, self.beta).to(a.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "running_rho_hat"
        if key in state_dict and self.running_rho_hat is None:
            self.running_rho_hat = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, beta={self.beta}, momentum={self.momentum}"


class ContractivePenalty(nn.Module):
    """``lam * contractive_penalty(h, linear.weight)`` for a sigmoid encoder layer."""

    def __init__(self, lam: float = 1.0):
        super().__init__()
        self.lam = check_nonnegative(lam, "lam")

    def forward(self, h: Tensor, weight: Tensor) -> Tensor:
        return self.lam * contractive_penalty(h, weight)


class Corrupt(nn.Module):
    """Input corruption of a denoising autoencoder (``aefast.corrupt``): active in
    training mode only; ``eval()`` passes the input through unchanged. A fresh seed
    is drawn from torch's default generator at every call."""

    def __init__(self, kind: str, level: float, *, low: float = 0.0, high: float = 1.0):
        super().__init__()
        self.level = check_kind_level(kind, level)
        self.kind, self.low, self.high = kind, check_finite(low, "low"), check_finite(high, "high")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return corrupt(x, self.kind, self.level, low=self.low, high=self.high)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, level={self.level}"


class NoisyLinear(nn.Linear):
    """``nn.Linear`` applied to a corrupted input (``aefast.noisy_linear``) in
    training mode, without storing the corrupted input; in ``eval()`` a plain
    ``nn.Linear``. Same parameters and initialisation as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, kind: str, level: float, *,
                 bias: bool = True, low: float = 0.0, high: float = 1.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.level = check_kind_level(kind, level)
        self.kind, self.low, self.high = kind, check_finite(low, "low"), check_finite(high, "high")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return noisy_linear(x, self.weight, self.bias, self.kind, self.level, low=self.low, high=self.high)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, level={self.level}"


class TopK(nn.Module):
    """``aefast.topk_mask``: per row of (B, H) keep the k largest, zero the rest (ReLU
    after selection when relu=True), for ``nn.Sequential``."""

    def __init__(self, k: int, *, relu: bool = True):
        super().__init__()
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k, self.relu = int(k), check_bool(relu, "relu")

    def forward(self, x: Tensor) -> Tensor:
        return topk_mask(x, self.k, relu=self.relu)

    def extra_repr(self) -> str:
        return f"k={self.k}, relu={self.relu}"


class BatchTopK(TopK):
    """``aefast.batch_topk``: keep the k * B largest of the batch (k per row on average)."""

    def __init__(self, k: int, *, relu: bool = True, group=None):
        super().__init__(k, relu=relu)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return batch_topk(x, self.k, relu=self.relu, group=self.group)


class LifetimeTopK(nn.Module):
    """``aefast.lifetime_topk``: per unit keep the ceil(rate * B) largest activations of
    the batch (winner-take-all autoencoder). Like the paper, only while training: in
    ``eval()`` it passes its input through, so a row's code does not depend on its batch."""

    def __init__(self, rate: float, *, group=None):
        super().__init__()
        self.rate, self.group = check_rate(rate, "rate"), group

    def forward(self, x: Tensor) -> Tensor:
        return lifetime_topk(x, self.rate, group=self.group) if self.training else x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class SpatialWTA(nn.Module):
    """``aefast.spatial_wta``: per sample and channel of (N, C, H, W) keep the largest value
    of the map; with lifetime_rate, lifetime sparsity across the batch on top (training
    only, as LifetimeTopK)."""

    def __init__(self, *, lifetime_rate: float | None = None):
        super().__init__()
        self.lifetime_rate = None if lifetime_rate is None else check_rate(lifetime_rate, "lifetime_rate")

    def forward(self, x: Tensor) -> Tensor:
        return spatial_wta(x, lifetime_rate=self.lifetime_rate if self.training else None)

    def extra_repr(self) -> str:
        return f"lifetime_rate={self.lifetime_rate}"
