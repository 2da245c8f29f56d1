"""The plain autoencoder: an undercomplete code trained to reconstruct its input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from aefast.models.base import MLPAutoencoder, detached, mirrored_mlp, mlp, squared_error


class Autoencoder(MLPAutoencoder):
    """x -> MLP (ReLU) -> linear code -> MLP (ReLU) -> sigmoid x_hat.

    `layers`: the encoder's widths, the last one the code size; the decoder mirrors them
    (`tied`: through the encoder's transposed weights). Loss: 1/2 ||x_hat - x||^2, mean
    over the batch.
    """

    def __init__(self, n_in: int, layers: Sequence[int] = (128, 32), tied: bool = False):
        super().__init__()
        self.encoder = mlp([n_in, *layers])
        self.decoder = mirrored_mlp(self.encoder, last=nn.Sigmoid(), tied=tied)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        reconstruction = squared_error(self.reconstruct(x), x)
        return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
