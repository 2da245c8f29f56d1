"""The linear autoencoder: the notes' remark that with linear layers and a quadratic
loss the network does what PCA does (Baldi & Hornik 1989). A baseline for the others,
and a check of the trainer: its learned subspace can be compared with PCA's."""

from __future__ import annotations

from torch import Tensor, nn

from aefast.models.base import AutoencoderModel, decoder_layer, detached, squared_error


class LinearAutoencoder(AutoencoderModel):
    """x -> h = W1 x + b1 -> x_hat = W2 h + b2 (`tied`: W2 = W1^T), loss 1/2 ||x_hat - x||^2.

    At the loss's minimum the reconstructions x_hat lie in the span of the first `hidden`
    principal components of the data, shifted by its mean; W1 and W2 themselves are not
    unique (any invertible mix of the code fits), so the comparison with PCA is of
    subspaces: `subspace()` is the span of W2's columns."""

    unit_interval_data = False  # a linear decoder

    def __init__(self, n_in: int, hidden: int = 16, tied: bool = False):
        super().__init__()
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = decoder_layer(self.encoder, tied)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def filters(self) -> Tensor:
        return self.encoder.weight

    def subspace(self) -> Tensor:
        return self.decoder.weight.detach()

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        reconstruction = squared_error(self.reconstruct(x), x)
        return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
