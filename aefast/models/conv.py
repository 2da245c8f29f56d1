"""Stacked convolutional autoencoder (Masci et al. 2011): convolution + max-pooling
layers encode, max-unpooling at the remembered positions + convolution decode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aefast.models.base import AutoencoderModel, detached, squared_error


class ConvAutoencoder(AutoencoderModel):
    """Each layer: conv (same padding) -> ReLU -> 2x2 max-pool; the decoder undoes the
    layers in reverse: unpool to the positions of the maxima (Masci's "switches") ->
    conv back to the layer's input channels (ReLU inside, sigmoid at the output). The
    layers are stacked and trained end to end. Codes: the last pooled maps, flattened."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int] = (16, 32), kernel_size: int = 3):
        super().__init__()
        self.image_shape = tuple(image_shape)
        sizes = [self.image_shape[0], *channels]
        pad = kernel_size // 2
        self.encoders = nn.ModuleList(nn.Conv2d(a, b, kernel_size, padding=pad) for a, b in zip(sizes, sizes[1:]))
        self.decoders = nn.ModuleList(nn.Conv2d(b, a, kernel_size, padding=pad) for a, b in zip(sizes, sizes[1:]))

    def _encode(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, torch.Size]]]:
        h, switches = x.view(-1, *self.image_shape), []
        for conv in self.encoders:
            a = torch.relu(conv(h))
            h, where = F.max_pool2d(a, 2, ceil_mode=True, return_indices=True)
            switches.append((where, a.shape[-2:]))
        return h, switches

    def _decode(self, h: Tensor, switches: list[tuple[Tensor, torch.Size]]) -> Tensor:
        for depth in reversed(range(len(self.decoders))):
            where, size = switches[depth]
            h = self.decoders[depth](F.max_unpool2d(h, where, 2, output_size=size))
            h = torch.relu(h) if depth else torch.sigmoid(h)
        return h.flatten(1)

    def encode(self, x: Tensor) -> Tensor:
        return self._encode(x)[0].flatten(1)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._decode(*self._encode(x))

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        reconstruction = squared_error(self.reconstruct(x), x)
        return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
