"""Stacked autoencoder with greedy layer-wise pretraining, as the source notes describe:
train the first hidden layer alone, then the next on the first one's codes, ..., then
stack the layers into one deep autoencoder and fine-tune it end to end."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aefast.models.base import LayerwiseAutoencoder, decoder_layer, detached, squared_error


class StackedAutoencoder(LayerwiseAutoencoder):
    """Layer k is a shallow sigmoid autoencoder: encoders[k] maps the codes of layer k-1
    to layer k, decoders[k] maps them back (`tied`: through encoders[k]'s transposed
    weight). Greedy layer-wise pretraining (`pretrain_epochs` per layer), then
    fine-tuning of the whole stack on reconstructing x (LayerwiseAutoencoder).

    Loss terms: "loss" is the phase's objective (layer k's reconstruction of its own
    input while pretraining it); "reconstruction" is always x's, through the layers
    trained so far and back, so that column keeps one meaning through the run."""

    def __init__(self, n_in: int, layers: Sequence[int] = (128, 32), pretrain_epochs: int = 10, tied: bool = False):
        super().__init__(pretrain_epochs)
        sizes = [n_in, *layers]
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.decoders = nn.ModuleList(decoder_layer(encoder, tied) for encoder in self.encoders)

    def encode(self, x: Tensor, depth: int | None = None) -> Tensor:
        for encoder in self.encoders[:depth]:
            x = torch.sigmoid(encoder(x))
        return x

    def decode(self, h: Tensor, depth: int | None = None) -> Tensor:
        """Back through the decoders of the first `depth` layers (all by default)."""
        for decoder in reversed(self.decoders[:depth]):
            h = torch.sigmoid(decoder(h))
        return h

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def filters(self) -> Tensor:
        return self.encoders[0].weight

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        if self.stage is None:
            reconstruction = squared_error(self.reconstruct(x), x)
            return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
        with torch.no_grad():
            below = self.encode(x, self.stage)
        code = torch.sigmoid(self.encoders[self.stage](below))
        layer_loss = squared_error(torch.sigmoid(self.decoders[self.stage](code)), below)
        with torch.no_grad():
            reconstruction = squared_error(self.decode(code, self.stage + 1), x)
        return {"loss": layer_loss, **detached(reconstruction=reconstruction)}
