"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders"; the SAEs of Gemma Scope)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import aefast as ae
from aefast.models.base import AutoencoderModel, at_least_float32, detached, squared_error
from aefast.models.topk_sae import initial_decoder_rows, remove_gradient_along_rows
from aefast.ops.checks import check_nonnegative


class JumpReLUSAE(AutoencoderModel):
    """f = JumpReLU_theta(W_enc (x - b_pre) + b_enc): each latent passes its
    pre-activation where it exceeds its own threshold theta = exp(log_threshold), else 0;
    x_hat = f W_dec + b_pre. Loss: 1/2 ||x_hat - x||^2 + l0_coef * ||f||_0, both batch
    means (the paper's lambda, which weighs ||x_hat - x||^2, is 2 * l0_coef here). The
    step has no gradient, so theta learns through the paper's straight-through
    estimators with a rectangle kernel of width `bandwidth`; aefast.jumprelu computes the
    code, the L0 count and those gradients in one pass each way. Decoder rows are kept
    unit-norm, their gradients along themselves removed before each step (as in
    TopKSAE): the codes' scale then means the same across latents.
    `threshold` and `bandwidth` are in the units of the pre-activations: scale them with
    the data (a manifest's mean_norm says how large language-model activations are)."""

    sparse_code = True
    exactly_sparse_code = True
    unit_interval_data = False  # a linear decoder

    def __init__(self, n_in: int, n_latents: int = 256, l0_coef: float = 0.01, bandwidth: float = 0.05,
                 threshold: float = 0.1):
        super().__init__()
        if not 0 < threshold < math.inf:
            raise ValueError(f"threshold must be a positive number, got {threshold!r}")
        if not 0 < bandwidth < math.inf:
            raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
        decoder = initial_decoder_rows(n_latents, n_in, range(n_latents), int(torch.randint(2**62, ())))
        self.decoder_weight = nn.Parameter(decoder)                 # (L, D), rows unit-norm
        self.encoder_weight = nn.Parameter(decoder.clone())         # tied at initialisation
        self.encoder_bias = nn.Parameter(torch.zeros(n_latents))
        self.pre_bias = nn.Parameter(torch.zeros(n_in))
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(threshold)))
        self.l0_coef, self.bandwidth = check_nonnegative(l0_coef, "l0_coef"), bandwidth

    def _code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The straight-through kernel estimates the pre-activations' density at the threshold,
        # which needs them continuous on the bandwidth's scale. bfloat16 (autocast) puts them
        # and the threshold on one grid, 0.03 apart between 4 and 8: at a bandwidth of 0.05 the
        # window then holds the threshold's grid point alone, a density off by grid / bandwidth.
        # So the encoder runs in float32 at least, autocast or not; the decoder follows autocast.
        with torch.autocast(x.device.type, enabled=False):
            wide = at_least_float32(x)
            pre = F.linear(wide - self.pre_bias.to(wide.dtype), self.encoder_weight.to(wide.dtype),
                           self.encoder_bias.to(wide.dtype))
            code, l0 = ae.jumprelu(pre, self.log_threshold.exp().to(pre.dtype), self.bandwidth)
        return code.to(x.dtype), l0  # a bfloat16 model's code in bfloat16

    def encode(self, x: Tensor) -> Tensor:
        return self._code(x)[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.reconstruct_and_encode(x)[0]

    def reconstruct_and_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encode(x)
        return F.linear(code, self.decoder_weight.t().to(x.dtype), self.pre_bias.to(x.dtype)), code

    def filters(self) -> Tensor:
        return self.encoder_weight

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        code, l0 = self._code(x)
        x_hat = F.linear(code, self.decoder_weight.t().to(code.dtype), self.pre_bias.to(code.dtype))
        reconstruction = squared_error(x_hat, x)
        sparsity = l0.mean()
        return {"loss": reconstruction + self.l0_coef * sparsity,
                **detached(reconstruction=reconstruction, l0=sparsity,
                           threshold=self.log_threshold.exp().mean())}

    def before_step(self) -> None:
        remove_gradient_along_rows(self.decoder_weight)

    @torch.no_grad()
    def after_step(self) -> None:
        self.decoder_weight.div_(self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8))
