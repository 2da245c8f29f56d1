"""Variational autoencoder (Kingma & Welling 2014): a Gaussian posterior q(z|x), the
reparameterisation trick, and a Bernoulli decoder over pixels in [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

import aefast as ae
from aefast.models.base import AutoencoderModel, bernoulli_nll, detached, mlp


class VariationalAutoencoder(AutoencoderModel):
    """x -> MLP -> (mu, logvar) -> z = mu + eps * exp(logvar / 2) -> MLP -> logits of x.
    Loss: the negative ELBO, -E_q log p(x|z) + KL(q(z|x) || N(0, I)), per example."""

    def __init__(self, n_in: int, hidden: int = 128, latent: int = 16):
        super().__init__()
        self.latent = latent
        self.encoder = mlp([n_in, hidden, 2 * latent])
        self.decoder = mlp([latent, hidden, n_in])

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.encode(x)))

    def filters(self) -> Tensor:
        return self.encoder[0].weight

    def sample(self, n: int) -> Tensor:
        weight = self.decoder[0].weight
        z = torch.randn(n, self.latent, device=weight.device, dtype=weight.dtype)
        return torch.sigmoid(self.decoder(z))

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.posterior(x)
        z, kl = ae.reparameterize(mu, logvar)
        nll = bernoulli_nll(self.decoder(z), x)
        return {"loss": nll + kl, **detached(nll=nll, kl=kl)}
