"""Latent-parallel TopKSAE: the latents split over the ranks of a process group.

Each of N ranks holds L / N latents (its rows of W_enc, b_enc and W_dec; b_pre is
replicated) and the whole batch. Per step: each rank's fused encoder picks its local
top-k per row; the ranks exchange those k candidates per row (values only; the global
winners are always among the local ones) and each keeps the ones among the k best of
all (ties to the lower latent index, as one process breaks them: aefast's
global_topk_keep); each rank decodes its kept winners and one all-reduce sums the
partial reconstructions. AuxK the same way among the dead latents. The backward needs
one more all-reduce, of the encoder input's gradient (for b_pre). Every rank computes
the same loss; a parameter's gradient stays on the rank that holds it. No capacity
factor, nothing approximate: the forward and the gradients are one process's up to the
order of float sums."""

from __future__ import annotations

import torch
from torch import Tensor

import aefast as ae
from aefast.models.base import at_least_float32, detached, squared_error
from aefast.models.topk_sae import TopKSAE
from aefast.ops._distributed import (
    global_topk_keep,
    reduce_over_ranks_,
    shared_by_ranks,
    sum_over_ranks,
)

SHARDED = ("decoder_weight", "encoder_weight", "encoder_bias", "steps_since_fired")  # split by latent (dim 0)


def shard_rows(n_latents: int, rank: int, world: int) -> range:
    if n_latents % world:
        raise ValueError(f"--shard-latents: --n-latents {n_latents} must be a multiple of the {world} processes")
    per = n_latents // world
    return range(rank * per, (rank + 1) * per)


class LatentShardedTopKSAE(TopKSAE):
    """Rank `rank` of `world`'s part of TopKSAE(n_in, n_latents, ...): latents
    shard_rows(n_latents, rank, world). `group`: the process group of the `world` ranks
    (None until the trainer sets it, for building and counting on one process)."""

    def __init__(self, n_in: int, n_latents: int = 256, k: int = 8, k_aux: int = 32, aux_coef: float = 1 / 32,
                 dead_steps: int = 100, *, rank: int, world: int, latent_group=None):
        super().__init__(n_in, n_latents, k, k_aux, aux_coef, dead_steps,
                         latents=shard_rows(n_latents, rank, world))  # not a transcoder (encoder_input: x - b_pre)
        self.n_latents, self.rank, self.world, self.latent_group = n_latents, rank, world, latent_group
        self.offset = rank * (n_latents // world)

    def _global_winners(self, values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's candidates (value order) reduced to those among the k best of all
        ranks (the others valued 0, so they decode to nothing and get no gradient)."""
        keep = global_topk_keep(values, k, self.latent_group)
        return torch.where(keep, values, 0.0), indices

    def _decode_sum(self, values: Tensor, indices: Tensor, bias: bool = True) -> Tensor:
        partial = ae.sparse_decode(values, indices, self.decoder_weight_for(values), None)
        # summed in float32 at least: one rounding of the sum, as one process has, not N
        total = sum_over_ranks(at_least_float32(partial), self.latent_group)
        return total + self.pre_bias.to(total.dtype) if bias else total

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        group = self.latent_group
        dead = self.dead_latents()
        encoder_input = shared_by_ranks(x - self.pre_bias, group)
        args = (encoder_input, self.encoder_weight, self.encoder_bias, self.k)
        if self.k_aux:
            values, indices, aux_values, aux_indices = ae.topk_encode_aux(*args, dead, self.k_aux)
        else:
            values, indices = ae.topk_encode(*args)
        values, indices = self._global_winners(values, indices, self.k)
        x_hat = self._decode_sum(values, indices)
        reconstruction = squared_error(x_hat, x)
        counts = torch.stack([dead.sum()]).float()
        if self.training:  # each latent lives on one rank of a replica: its own count
            self._note_fired(values, indices)
        reduce_over_ranks_(counts, "sum", group)  # the dead latents of the whole model
        if self.k_aux:
            # A rank with fewer than k_aux dead latents fills its slots with live ones
            # (value 0): valued -inf in the exchange, so a dead latent of another rank,
            # even at 0, wins over them, as it does in one process.
            aux_values = torch.where(dead[aux_indices], aux_values, float("-inf"))
            aux_values, aux_indices = self._global_winners(aux_values, aux_indices, self.k_aux)
            aux_values = aux_values.clamp_min(0.0)
            residual = (x - x_hat).detach()
            aux_hat = self._decode_sum(aux_values, aux_indices, bias=False)
            aux = squared_error(aux_hat, residual) * (counts[0] > 0)
        else:
            aux = reconstruction.new_zeros(())
        return {"loss": reconstruction + self.aux_coef * aux,
                **detached(reconstruction=reconstruction, auxk=aux, dead=counts[0] / self.n_latents)}

    def winners(self, x: Tensor):
        raise NotImplementedError("a shard holds part of the latents: gather_state, then a TopKSAE, gives the model")

    encode = reconstruct = winners

    # ------------------------------------------------ whole-model state (checkpoints)

    def gather_state(self, optimizer: torch.optim.Optimizer, group) -> tuple[dict, dict] | None:
        """The whole model's state_dict and its Adam state (those of a one-process
        TopKSAE), assembled in host memory on rank 0 of `group` (the shards' ranks,
        over gloo; None elsewhere); every rank calls it."""
        import torch.distributed as dist

        leader = dist.get_rank(group) == 0

        def gathered(t: Tensor) -> Tensor | None:
            t = t.detach().cpu().contiguous()
            parts = [torch.empty_like(t) for _ in range(self.world)] if leader else None
            dist.gather(t, parts, dst=dist.get_global_rank(group, 0), group=group)
            return torch.cat(parts) if leader else None

        model = {name: gathered(t) if name in SHARDED else t.cpu().clone() for name, t in self.state_dict().items()}
        optimizer_state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied
        names = [name for name, _ in self.named_parameters()]
        optimizer_state["state"] = {
            index: {key: gathered(value) if names[index] in SHARDED and value.dim() > 0 else value
                    for key, value in state.items()}
            for index, state in optimizer_state["state"].items()}
        return (model, optimizer_state) if leader else None

    def load_whole_state(self, model: dict, optimizer_state: dict, optimizer: torch.optim.Optimizer) -> None:
        """This rank's part of a whole model's state_dict and Adam state."""
        rows = slice(self.offset, self.offset + self.n_latents // self.world)
        self.load_state_dict({name: t[rows] if name in SHARDED else t for name, t in model.items()})
        names = [name for name, _ in self.named_parameters()]
        optimizer_state = {**optimizer_state, "state": {
            index: {key: value[rows] if names[index] in SHARDED and value.dim() > 0 else value
                    for key, value in state.items()}
            for index, state in optimizer_state["state"].items()}}
        optimizer.load_state_dict(optimizer_state)
