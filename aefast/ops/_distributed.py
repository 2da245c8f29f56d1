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

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")
    local = a.sum(0, dtype=stat_dtype(a.dtype))
    rows = torch.full((1,), float(a.shape[0]), dtype=local.dtype, device=a.device)
    # One collective forward, one backward: the sum over ranks, whose gradient is the
    # sum of every rank's (torch's deprecated distributed.nn all_reduce did the same).
    total = shared_by_ranks(sum_over_ranks(torch.cat([local, rows]), group), group)
    return total[:-1] / total[-1]


def global_count(n: int, device: torch.device, group) -> int:
    """Sum of `n` over the ranks of `group`."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")
    total = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def reduce_over_ranks_(t: Tensor, op: str, group) -> Tensor:
    """In place: `t` reduced ("sum", "min" or "max") over the ranks of `group`, for
    bookkeeping outside autograd (dead-latent counters, running thresholds)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=group)
    return t


def global_topk_keep(values: Tensor, k: int, group) -> Tensor:
    """Which local candidates win a top-k taken over all ranks.

    values (R, c): per selection row, this rank's best c <= k candidates, ordered by
    value (descending) then local position. Returns a bool (R, c) mask of those among
    the k best of all ranks' candidates, ties going to the lower rank, then the lower
    local position: the order of the concatenated batch, so N ranks select exactly
    what one process selects on it."""
    import torch.distributed as dist

    rows, c = values.shape
    padded = values.detach().new_full((rows, k), float("-inf"))
    padded[:, :c] = values.detach()
    valid = torch.zeros((rows, k), dtype=torch.bool, device=values.device)
    valid[:, :c] = True
    world = dist.get_world_size(group)
    all_values = [torch.empty_like(padded) for _ in range(world)]
    all_valid = [torch.empty_like(valid) for _ in range(world)]
    dist.all_gather(all_values, padded, group=group)
    dist.all_gather(all_valid, valid, group=group)
    cat_values = torch.cat(all_values, dim=1)  # rank-major: the concatenated batch's order
    cat_valid = torch.cat(all_valid, dim=1)
    order = torch.sort(cat_values, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(cat_valid.gather(1, order).int(), dim=1, descending=True, stable=True).indices)
    winners = order[:, :k]
    me = dist.get_rank(group)
    mine = (winners // k) == me
    # Other ranks' winners go to a spare column k, so no write collides with a real slot.
    keep = torch.zeros((rows, k + 1), dtype=torch.bool, device=values.device)
    keep.scatter_(1, torch.where(mine, winners % k, k), mine)
    return keep[:, :c]


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of `t` over the ranks. Backward: the gradient as it is, since
    every rank computes the same loss from the sum (Megatron's reduce-from-region)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        import torch.distributed as dist

        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SharedByRanks(torch.autograd.Function):
    """Forward: `t` as it is, the same on every rank. Backward: the sum of the ranks'
    gradients, each of which comes from its own part of the model (copy-to-region)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sum_over_ranks(t: Tensor, group) -> Tensor:
    """The sum over the ranks of each rank's partial `t`, as one tensor every rank
    holds; its gradient reaches each partial unchanged."""
    return _SumOverRanks.apply(t, group)


def shared_by_ranks(t: Tensor, group) -> Tensor:
    """`t`, the same on every rank, entering each rank's part of a model: its gradient
    is the sum of what every part sends back."""
    return _SharedByRanks.apply(t, group)
