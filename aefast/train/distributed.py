"""Data-parallel training on torch.distributed: what the trainer needs beyond one process.

`torchrun --nproc_per_node N -m aefast train MODEL ...` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `Cluster.from_environment`
joins them into one process group (NCCL for CUDA, gloo for the CPU), each process on
its own device. Exactness, the rule every piece here follows: N processes take the
steps one process takes on the concatenated batch.

- `--batch-size` is the global batch. Every process draws the same epoch order (the
  same seed) and trains on its contiguous share of each batch (`Cluster.share`), so
  rank-major concatenation of the shares is the batch one process would train on.
- The model's batch statistics (the KL penalty's rho_hat, lifetime sparsity, dead
  latents) run over the global batch through the ops' `group=` (`model.distribute`).
- DistributedDataParallel averages gradients over the N processes; each process
  weights its loss by (its rows x N / the step's rows), which turns that average into
  the gradient of the global batch's mean, shares of unequal size included
  (`mean_rows`).
- Decisions that end or checkpoint the run (Ctrl-C, SIGTERM, --checkpoint-minutes) are
  agreed on every step over a gloo group beside the training one, so no process waits
  in a collective that another left; a process that died or stalls ends the others
  within --timeout, with an error naming the rank and the step (`Cluster.failure`)."""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Cluster:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout_s: float
    group: Any = None    # data-parallel collectives: the replicas of this rank's part of the model
    control: Any = None  # gloo, on the CPU, every rank: the per-step agreement, checkpoint gathers
    shards: int = 1      # latent-parallel: ranks per model replica (rank = replica * shards + shard)
    latent_group: Any = None  # the ranks holding the other latents of this rank's replica
    latent_control: Any = None  # the same ranks over gloo: checkpoints gathered in host memory
    where: str = "before the first step"  # for the error that ends a rank
    failed: bool = False

    @property
    def replica(self) -> int:
        return self.rank // self.shards

    @property
    def replicas(self) -> int:
        return self.world // self.shards

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    def split_latents(self, shards: int) -> None:
        """A 2-D grid: world / shards replicas of the model, each split by latent over
        `shards` consecutive ranks (one node's GPUs, whose links are the fastest);
        `group` becomes the ranks that hold the same latents (data-parallel over them),
        `latent_group` the ranks of this rank's replica."""
        import torch.distributed as dist

        if self.world % shards:
            raise ValueError(f"--shard-latents {shards} must divide the {self.world} processes")
        self.shards = shards
        cuda = self.device.type == "cuda"
        timeout = datetime.timedelta(seconds=self.timeout_s)
        training = timeout + datetime.timedelta(minutes=1) if cuda else timeout  # as in from_environment
        for replica in range(self.replicas):  # every rank creates every group, in the same order
            ranks = list(range(replica * shards, (replica + 1) * shards))
            group = dist.new_group(ranks, timeout=training)
            control = dist.new_group(ranks, backend="gloo", timeout=timeout) if cuda else group
            if replica == self.replica:
                self.latent_group, self.latent_control = group, control
        for shard in range(shards):
            group = dist.new_group(list(range(shard, self.world, shards)), timeout=training)
            if shard == self.shard:
                self.group = group

    @classmethod
    def from_environment(cls, device_name: str, timeout_s: float) -> Cluster:
        """Join the processes torchrun started (its environment variables say who is
        who); the device each process trains on: cuda:LOCAL_RANK, or the CPU."""
        import torch.distributed as dist

        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"launched with RANK and WORLD_SIZE but without {name}: start the processes "
                                 f"with torchrun (torchrun --nproc_per_node N -m aefast train ...)")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            if ":" in device_name:
                raise ValueError(f"--device {device_name}: under torchrun each process takes the GPU of its "
                                 f"LOCAL_RANK; give --device cuda (CUDA_VISIBLE_DEVICES picks the node's GPUs)")
            if not torch.cuda.is_available():
                raise ValueError(f"--device {device_name}: CUDA is not available on this machine")
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"rank {rank}: LOCAL_RANK {local_rank} but this node has "
                                 f"{torch.cuda.device_count()} GPUs: give --nproc_per_node at most that")
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        # NCCL's own watchdog aborts the process at its timeout: given a minute more, the
        # gloo agreement after each step fails first, with the error naming rank and step.
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=timeout + datetime.timedelta(minutes=1) if cuda else timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return cls(rank, world, local_rank, device, timeout_s, dist.group.WORLD, control)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's replica's contiguous share of a global batch: the rows
        [replica * n // replicas, (replica + 1) * n // replicas)."""
        n = len(batch)
        return batch[self.replica * n // self.replicas:(self.replica + 1) * n // self.replicas]

    def check_batches(self, rows: int, batch_size: int) -> None:
        """Every rank needs at least one row of every batch (an empty share has no mean
        to take); say which sizes do that instead of failing mid-epoch."""
        last, n = rows % batch_size, self.replicas
        if batch_size < n or 0 < last < n:
            raise ValueError(
                f"--batch-size {batch_size} (the global batch) over {n} data-parallel processes: every one needs "
                f"at least one row of each batch, but {'each batch' if batch_size < n else 'the last batch'}"
                f" of the {rows} training rows has {batch_size if batch_size < n else last}; choose a "
                f"batch size of at least {n} whose remainder on {rows} rows is 0 or at least {n}")

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank, as every rank sees it (one small gloo all-reduce)."""
        import torch.distributed as dist

        votes = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in votes.tolist()]

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, on every rank."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        return values

    def max(self, value: float) -> float:
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.control)
        return float(total)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Per key, the sum over the ranks (every rank holds the same keys, in any order)."""
        import torch.distributed as dist

        names = sorted(values)
        total = torch.tensor([values[name] for name in names], dtype=torch.float64)
        dist.all_reduce(total, group=self.control)
        return dict(zip(names, total.tolist()))

    def failure(self, exc: BaseException) -> RuntimeError:
        """The error a rank ends with: which rank, where in the run, and, when a
        collective failed (a peer died, or stalled past --timeout), that it did."""
        text = " ".join(str(exc).split())
        collective = isinstance(exc, torch.distributed.DistError) or any(
            word in text for word in ("gloo", "NCCL", "Connection", "Timed out", "timed out"))
        why = (f"a collective failed: another process died or stalled for more than --timeout {self.timeout_s:g} s "
               if collective else "")
        return RuntimeError(f"rank {self.rank} of {self.world}, {self.where}: {why}({type(exc).__name__}: "
                            f"{text[:400]})")

    def wrap(self, model: nn.Module, loss) -> nn.Module:
        """DistributedDataParallel around `loss` (the model's loss function, maybe
        compiled): calling the result runs it with DDP's gradient averaging."""
        from torch.nn.parallel import DistributedDataParallel

        from aefast.models.base import LayerwiseAutoencoder

        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        # Buffers (dead-latent counters, running thresholds) are kept equal by global
        # statistics, not broadcast from rank 0 at every forward (the keyword's name
        # changed in torch 2.13); a layer-wise model leaves the layers it is not
        # pretraining without a gradient.
        keyword = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
        return DistributedDataParallel(_LossModule(model, loss), device_ids=device_ids, process_group=self.group,
                                       find_unused_parameters=isinstance(model, LayerwiseAutoencoder),
                                       gradient_as_bucket_view=True, **{keyword: False})

    def close(self) -> None:
        """A clean exit: the process groups torn down; after a failure they are left to
        the process's exit (NCCL's teardown waits on the collective a dead peer left
        unfinished)."""
        import torch.distributed as dist

        if dist.is_initialized() and not self.failed:
            dist.destroy_process_group()


class _LossModule(nn.Module):
    """DDP synchronises the gradients of what its forward computes: this forward is the
    model's loss (the trainer calls loss, not the model's forward)."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._loss(x)
