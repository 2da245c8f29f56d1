"""Top-k sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): exactly k active latents per example, a unit-norm decoder, and the AuxK
loss that revives dead latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import aefast as ae
from aefast.models.base import AutoencoderModel, detached, squared_error


class TopKSAE(AutoencoderModel):
    """z = TopK(ReLU(W_enc (x - b_pre) + b_enc)) with k of `n_latents` active;
    x_hat = b_pre + sum_k z_k W_dec[k] (aefast.sparse_decode: the dense code is never
    built). Decoder rows are renormalised to unit length after every step.

    AuxK: a latent is dead when it has not fired for `dead_steps` training steps; the
    top `k_aux` dead latents, decoded alone, are trained to predict the residual
    x - x_hat, weighted by `aux_coef`. That gives dead latents a gradient again."""

    sparse_code = True
    unit_interval_data = False  # a linear decoder: any real-valued activations

    def __init__(self, n_in: int, n_latents: int = 256, k: int = 8, k_aux: int = 32,
                 aux_coef: float = 1 / 32, dead_steps: int = 100):
        super().__init__()
        decoder = F.normalize(torch.randn(n_latents, n_in), dim=1)
        self.decoder_weight = nn.Parameter(decoder)                # (L, D), rows unit-norm
        self.encoder_weight = nn.Parameter(decoder.clone())        # tied at initialisation
        self.encoder_bias = nn.Parameter(torch.zeros(n_latents))
        self.pre_bias = nn.Parameter(torch.zeros(n_in))
        self.register_buffer("steps_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.k, self.k_aux, self.aux_coef, self.dead_steps = k, k_aux, aux_coef, dead_steps

    def _preactivations(self, x: Tensor) -> Tensor:
        return F.linear(x - self.pre_bias, self.encoder_weight, self.encoder_bias)

    def encode(self, x: Tensor) -> Tensor:
        return ae.topk_mask(self._preactivations(x), self.k)

    def _decode(self, values: Tensor, indices: Tensor, bias: bool = True) -> Tensor:
        return ae.sparse_decode(values, indices, self.decoder_weight.to(values.dtype),
                                self.pre_bias.to(values.dtype) if bias else None)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._decode(*ae.topk_sparse(self._preactivations(x), self.k))

    def filters(self) -> Tensor:
        return self.encoder_weight

    def dead_latents(self) -> Tensor:
        return self.steps_since_fired >= self.dead_steps

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        pre = self._preactivations(x)
        values, indices = ae.topk_sparse(pre, self.k)
        x_hat = self._decode(values, indices)
        reconstruction = squared_error(x_hat, x)
        if self.training:
            with torch.no_grad():
                fired = torch.zeros_like(self.steps_since_fired, dtype=torch.bool)
                fired[indices[values > 0]] = True
                self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        dead = self.dead_latents()
        n_dead = int(dead.sum())
        aux = reconstruction.new_zeros(())
        if n_dead:
            aux_values, aux_indices = ae.topk_sparse(pre.masked_fill(~dead, float("-inf")), min(self.k_aux, n_dead))
            residual = (x - x_hat).detach()
            aux = squared_error(self._decode(aux_values, aux_indices, bias=False), residual)
        return {"loss": reconstruction + self.aux_coef * aux,
                **detached(reconstruction=reconstruction, auxk=aux, dead=dead.float().mean())}

    @torch.no_grad()
    def after_step(self) -> None:
        self.decoder_weight.div_(self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8))
