"""Data sets that need no download: scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import torch


def digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) float32 tensors of shape (N, 64), pixels scaled to [0, 1],
    split with a fixed seed."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data).float() / 16.0
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * x.shape[0]))
    return x[order[n_val:]], x[order[:n_val]]
