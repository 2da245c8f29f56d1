"""Statistics over the global batch of a torch.distributed process group."""

from __future__ import annotations

import torch
from torch import Tensor

from aefast.reference import stat_dtype


def global_column_mean(a: Tensor, group) -> Tensor:
    """Per-column mean of `a` over the rows of every rank in `group`, exactly as if
    one process held the concatenated batch. Differentiable: the backward sums the
    gradient over the ranks (as SyncBatchNorm does), so with DDP's averaging of
    gradients a step equals the single-process step on the whole batch."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")
    local = a.sum(0, dtype=stat_dtype(a.dtype))
    rows = torch.full((1,), float(a.shape[0]), dtype=local.dtype, device=a.device)
    total = all_reduce(torch.cat([local, rows]), group=group)  # one collective
    return total[:-1] / total[-1]
