"""BatchTopK SAE (Bussmann, Leask & Nanda 2024) and Matryoshka BatchTopK SAE (Bussmann
et al. 2025): the k * B largest activations over the whole batch instead of k per row,
and at inference one threshold estimated during training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

import aefast as ae
from aefast.models.base import detached, squared_error
from aefast.models.topk_sae import TopKSAE
from aefast.ops._distributed import reduce_over_ranks_


class BatchTopKSAE(TopKSAE):
    """z = BatchTopK(ReLU(W_enc (x - b_pre) + b_enc)), the k * B largest of the batch's
    (B, L) activations (aefast.batch_topk: one threshold found over the whole batch;
    with data parallelism over the global batch, exactly); x_hat = z W_dec + b_pre.
    Rows get k latents on average, a hard row more, an easy one fewer.

    Inference does not depend on the batch: z = ReLU(pre) where pre > threshold, the
    threshold the mean of each training batch's smallest kept activation (a moving
    average of weight `threshold_momentum` once 1 / momentum batches are in), on the device. Decoder rows unit-norm; AuxK on
    the dead latents as in TopKSAE (the top k_aux dead latents per row)."""

    threshold_momentum = 0.001

    def __init__(self, n_in: int, n_latents: int = 256, k: int = 8, k_aux: int = 32, aux_coef: float = 1 / 32,
                 dead_steps: int = 100, *, n_out: int | None = None):
        super().__init__(n_in, n_latents, k, k_aux, aux_coef, dead_steps, n_out=n_out)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_tracked", torch.zeros((), dtype=torch.long))

    def preactivations(self, x: Tensor) -> Tensor:
        return F.linear(self.encoder_input(x), self.encoder_weight.to(x.dtype), self.encoder_bias.to(x.dtype))

    def code(self, pre: Tensor) -> Tensor:
        """The (B, L) code of pre-activations: the batch's k * B largest in training,
        those above the threshold otherwise."""
        if not self.training:
            return torch.where(pre > self.threshold.to(pre.dtype), pre, 0.0).relu()
        return ae.batch_topk(pre, self.k, group=self.group)

    @torch.no_grad()
    def _track_threshold(self, z: Tensor) -> None:
        smallest = torch.where(z > 0, z, torch.inf).amin().reshape(1).to(self.threshold.dtype)
        if self.group is not None:
            reduce_over_ranks_(smallest, "min", self.group)
        smallest = smallest[0]
        # The mean of the batches so far, until it has seen 1 / momentum of them; then a
        # moving average (a fixed small weight from the start would sit near the first,
        # untrained batches' value for thousands of steps).
        weight = torch.clamp(1.0 / (self.threshold_tracked + 1).to(smallest.dtype), min=self.threshold_momentum)
        news = torch.isfinite(smallest)  # something positive was kept
        self.threshold.copy_(torch.where(news, torch.lerp(self.threshold, smallest, weight), self.threshold))
        self.threshold_tracked.add_(news.long())

    def encode(self, x: Tensor) -> Tensor:
        return self.code(self.preactivations(x))

    def winners(self, x: Tensor):
        raise NotImplementedError("BatchTopK selects over the batch, not k per row: encode(x) gives the code")

    def _dense_decode(self, z: Tensor) -> Tensor:
        return F.linear(z, self.decoder_weight.t().to(z.dtype), self.pre_bias.to(z.dtype))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._dense_decode(self.encode(x))

    def reconstruct_and_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encode(x)
        return self._dense_decode(code), code

    def reconstruction_loss(self, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(the loss, x_hat) of the code z: 1/2 ||x_hat - target||^2, batch mean."""
        x_hat = self._dense_decode(z)
        return squared_error(x_hat, target), x_hat

    def loss(self, batch: Tensor) -> dict[str, Tensor]:
        x, target = self.split(batch)
        dead = self.dead_latents()  # as of the last step
        pre = self.preactivations(x)
        z = self.code(pre)
        reconstruction, x_hat = self.reconstruction_loss(z, target)
        if self.training:  # a training batch (not encode or reconstruct in train mode): its statistics
            self._track_threshold(z.detach())
            with torch.no_grad():
                self.fired_in_step.add_((z > 0).any(0).long())
        if self.k_aux:
            values, indices = ae.topk_sparse(pre.masked_fill(~dead, float("-inf")), self.k_aux)
            aux_hat = ae.sparse_decode(values, indices, self.decoder_weight_for(values), None)
            aux = squared_error(aux_hat, (target - x_hat).detach()) * dead.any()
        else:
            aux = reconstruction.new_zeros(())
        return {"loss": reconstruction + self.aux_coef * aux,
                **detached(reconstruction=reconstruction, auxk=aux, dead=dead.float().mean(),
                           l0=(z != 0).float().sum(1).mean())}


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK: the dictionary's first `prefixes[0]` latents, its first
    `prefixes[1]`, ..., all of them, must each reconstruct x on their own; the loss is
    the mean of the nested reconstructions' losses, so the early latents learn general
    features and the later ones refine them. From one decode: each group of latents
    between two prefix sizes is decoded once and the nested reconstructions are the
    running sums of the groups' parts (b_pre + group 1, + group 2, ...)."""

    def __init__(self, n_in: int, n_latents: int = 256, k: int = 8, k_aux: int = 32, aux_coef: float = 1 / 32,
                 dead_steps: int = 100, prefixes: Sequence[int] | None = None, *, n_out: int | None = None):
        super().__init__(n_in, n_latents, k, k_aux, aux_coef, dead_steps, n_out=n_out)
        # default: an eighth, a quarter, half and all of the dictionary
        prefixes = list(prefixes) if prefixes is not None else sorted({max(1, n_latents // d) for d in (8, 4, 2, 1)})
        if not prefixes or prefixes[-1] != n_latents or any(a >= b for a, b in zip(prefixes, prefixes[1:])) \
                or prefixes[0] < 1:
            raise ValueError(f"prefixes must increase from >= 1 to n_latents ({n_latents}), got "
                             f"{','.join(map(str, prefixes))}")
        self.prefixes = prefixes

    def reconstruction_loss(self, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.decoder_weight.to(z.dtype)
        x_hat = self.pre_bias.to(z.dtype).expand_as(target)
        losses, start = [], 0
        for stop in self.prefixes:
            x_hat = x_hat + z[:, start:stop] @ weight[start:stop]
            losses.append(squared_error(x_hat, target))
            start = stop
        return torch.stack(losses).mean(), x_hat
