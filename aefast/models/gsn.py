"""Generative stochastic network (Bengio et al. 2013, 2014) in its simplest form, the
generalised denoising autoencoder: corrupting x and sampling a reconstruction from
P(X | x~) defines a Markov chain whose stationary distribution estimates the data
distribution."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import aefast as ae
from aefast.models.base import (
    OneLayerSigmoidAutoencoder,
    at_least_float32,
    bernoulli_nll,
    decoder_layer,
    detached,
    squared_error,
)
from aefast.ops.noise import check_kind_level


class GSN(OneLayerSigmoidAutoencoder):
    """One chain step: x~ = corrupt(x) (fused into the first layer by noisy_linear),
    h = sigmoid(W1 x~ + b1), P(X | x~) = Bernoulli(sigmoid(W2 h + b2)), and the next
    state is a draw x ~ P(X | x~): the chain's randomness is the corruption and that draw.

    Walkback training (Bengio et al. 2013, section 3.4): from each example the chain runs
    `walkback` steps, drawing each next state, and every step's P(X | x~) is trained to give
    the example back, so the model also learns to undo the spurious places its own chain
    wanders to. Sampling runs the chain from uniform noise for `sample_steps` steps and
    returns the last draw (pixels of 0 and 1); `sample(n, mean=True)` returns the last
    step's P(X | x~) means instead, the grey-level pictures papers usually show.
    """

    def __init__(self, n_in: int, hidden: int = 256, kind: str = "salt_pepper", level: float = 0.3,
                 walkback: int = 3, sample_steps: int = 30, tied: bool = False):
        super().__init__()
        if walkback < 1:
            raise ValueError(f"walkback must be >= 1, got {walkback}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = decoder_layer(self.encoder, tied)
        self.kind, self.level = kind, check_kind_level(kind, level)  # fail before training starts
        self.walkback, self.sample_steps = walkback, sample_steps

    def chain_step_logits(self, x: Tensor) -> Tensor:
        """Logits of P(X | corrupt(x)); corrupts in eval mode too, since sampling needs it."""
        x = x.to(self.encoder.weight.dtype)  # chain states after the first come from (autocast) logits
        h = torch.sigmoid(ae.noisy_linear(x, self.encoder.weight, self.encoder.bias, self.kind, self.level))
        return self.decoder(h)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        weight = self.encoder.weight
        x = torch.rand(n, self.decoder.out_features, device=weight.device, dtype=weight.dtype)
        for _ in range(self.sample_steps):
            p = torch.sigmoid(at_least_float32(self.chain_step_logits(x)))
            x = torch.bernoulli(p)
        return p if mean else x

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        state, nll = x, 0.0
        for step in range(self.walkback):
            logits = self.chain_step_logits(state)
            nll = nll + bernoulli_nll(logits, x)
            p = torch.sigmoid(at_least_float32(logits.detach()))
            if step == 0:
                first_step = squared_error(p, x)
            state = torch.bernoulli(p)
        nll = nll / self.walkback
        return {"loss": nll, **detached(nll=nll, reconstruction=first_step)}
