"""Adversarial autoencoder (Makhzani et al. 2016): a discriminator on the code space
pushes the aggregated posterior q(z) towards a prior p(z), so that decoding prior
samples generates data."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from aefast.models.base import MLPAutoencoder, adam, at_least_float32, detached, mlp, squared_error


def _step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class AdversarialAutoencoder(MLPAutoencoder):
    """Deterministic MLP encoder to a `latent`-dim code, MLP decoder, MLP discriminator
    on codes; prior N(0, prior_std^2 I). Each batch takes the paper's alternating steps:
    (1) reconstruction: encoder + decoder on 1/2 ||x_hat - x||^2; (2) regularisation:
    the discriminator learns prior samples (label 1) from codes (label 0), then the
    encoder, as the generator, learns to make its codes pass for prior samples."""

    accumulates_gradients = False
    data_parallel = False  # three optimizer steps per batch, each its own DDP reduction: not wired

    def __init__(self, n_in: int, hidden: int = 128, latent: int = 8, discriminator_hidden: int = 64,
                 prior_std: float = 1.0):
        super().__init__()
        self.latent, self.prior_std = latent, prior_std
        self.encoder = mlp([n_in, hidden, latent])
        self.decoder = mlp([latent, hidden, n_in], last=torch.nn.Sigmoid())
        self.discriminator = mlp([latent, discriminator_hidden, discriminator_hidden, 1])

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        autoencoder = [*self.encoder.parameters(), *self.decoder.parameters()]
        return {"autoencoder": adam(autoencoder, lr),
                "discriminator": adam(self.discriminator.parameters(), lr),
                "generator": adam(self.encoder.parameters(), lr)}

    def sample(self, n: int) -> Tensor:
        weight = self.decoder[0].weight
        return self.decoder(self.prior_std * torch.randn(n, self.latent, device=weight.device, dtype=weight.dtype))

    def _discriminator_loss(self, code: Tensor) -> Tensor:
        real = self.discriminator(self.prior_std * torch.randn_like(code))
        fake = self.discriminator(code.detach())
        real, fake = at_least_float32(real), at_least_float32(fake)
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def _generator_loss(self, code: Tensor) -> Tensor:
        fooled = at_least_float32(self.discriminator(code))
        return F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        """All three terms at once (validation, display); training uses train_step."""
        code = self.encoder(x)
        reconstruction = squared_error(self.decoder(code), x)
        discriminator, generator = self._discriminator_loss(code), self._generator_loss(code)
        return {"loss": reconstruction + generator,
                **detached(reconstruction=reconstruction, discriminator=discriminator, generator=generator)}

    def train_step(self, batches: Tensor | list[Tensor],
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Tensor]:
        (x,) = [batches] if isinstance(batches, Tensor) else batches  # three steps per batch: no accumulation
        with self.autocast():
            reconstruction = squared_error(self.reconstruct(x), x)
        _step(optimizers["autoencoder"], reconstruction)
        with self.autocast():
            code = self.encoder(x)
            discriminator = self._discriminator_loss(code)
        _step(optimizers["discriminator"], discriminator)
        with self.autocast():
            generator = self._generator_loss(code)  # the encoder has not moved since `code`
        _step(optimizers["generator"], generator)
        return {"loss": (reconstruction + generator).detach(),
                **detached(reconstruction=reconstruction, discriminator=discriminator, generator=generator)}
