"""Denoising autoencoder (Vincent et al. 2008): reconstruct the clean x from a corrupted
copy. The corruption is fused into the first layer (aefast.noisy_linear), so the
corrupted input is never stored."""

from __future__ import annotations

from torch import Tensor

import aefast as ae
from aefast.models.base import OneLayerSigmoidAutoencoder, decoder_layer, detached, squared_error


class DenoisingAutoencoder(OneLayerSigmoidAutoencoder):
    """h = sigmoid(W1 corrupt(x) + b1), x_hat = sigmoid(W2 h + b2), loss 1/2 ||x_hat - x||^2
    against the clean x. `kind`: gaussian, masking, salt_pepper or dropout; `level`: its
    strength. In eval mode the corruption is off (aefast.nn.NoisyLinear), so codes and
    validation reconstructions are of clean inputs."""

    def __init__(self, n_in: int, hidden: int = 128, kind: str = "masking", level: float = 0.3, tied: bool = False):
        super().__init__()
        self.encoder = ae.nn.NoisyLinear(n_in, hidden, kind, level)
        self.decoder = decoder_layer(self.encoder, tied)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        reconstruction = squared_error(self.reconstruct(x), x)
        return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
