"""Stacked autoencoder with greedy layer-wise pretraining, as the source notes describe:
train the first hidden layer alone, then the next on the first one's codes, ..., then
stack the layers into one deep autoencoder and fine-tune it end to end."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aefast.models.base import AutoencoderModel, detached, squared_error


class StackedAutoencoder(AutoencoderModel):
    """Layer k is a shallow sigmoid autoencoder: encoders[k] maps the codes of layer k-1
    to layer k, decoders[k] maps them back. Epochs [k * pretrain_epochs, (k + 1) *
    pretrain_epochs) train layer k alone on the codes of the layers below, which stay
    fixed (computed without gradient, so the optimizer leaves them alone); the epochs
    after that fine-tune the whole stack on reconstructing x."""

    def __init__(self, n_in: int, layers: Sequence[int] = (128, 32), pretrain_epochs: int = 10):
        super().__init__()
        sizes = [n_in, *layers]
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.decoders = nn.ModuleList(nn.Linear(b, a) for a, b in zip(sizes, sizes[1:]))
        if pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
        self.pretrain_epochs = pretrain_epochs
        self.stage = len(layers)  # the layer being pretrained; len(layers) = fine-tuning

    def begin_epoch(self, epoch: int) -> str:
        depth = len(self.encoders)
        self.stage = min(epoch // self.pretrain_epochs, depth) if self.pretrain_epochs else depth
        return f"pretrain layer {self.stage + 1}/{depth}" if self.stage < depth else "fine-tune"

    def encode(self, x: Tensor, depth: int | None = None) -> Tensor:
        for encoder in self.encoders[:depth]:
            x = torch.sigmoid(encoder(x))
        return x

    def decode(self, h: Tensor) -> Tensor:
        for decoder in reversed(self.decoders):
            h = torch.sigmoid(decoder(h))
        return h

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def filters(self) -> Tensor:
        return self.encoders[0].weight

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        if self.stage < len(self.encoders):
            with torch.no_grad():
                x = self.encode(x, self.stage)
            code = torch.sigmoid(self.encoders[self.stage](x))
            reconstruction = squared_error(torch.sigmoid(self.decoders[self.stage](code)), x)
        else:
            reconstruction = squared_error(self.reconstruct(x), x)
        return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
