"""Stacked convolutional autoencoder (Masci et al. 2011): convolution + max-pooling
layers encode, unpooling + convolution decode, trained greedily layer by layer and then
fine-tuned as one stack."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aefast.models.base import LayerwiseAutoencoder, check_odd_kernel, detached, squared_error

# A layer's pooling switches: where the maxima were (None without switches) and the
# size of the map before pooling.
Switches = tuple[Tensor | None, torch.Size]


class ConvAutoencoder(LayerwiseAutoencoder):
    """Each layer: conv (same padding) -> ReLU -> 2x2 max-pool; its decoder undoes it:
    unpool -> conv back to the layer's input channels (ReLU inside, sigmoid at the
    output). Codes: the last pooled maps, flattened.

    `switches` (Masci's CAE, the default): unpooling puts each pooled value back at the
    position of its maximum, so the decoder reads the positions of every layer's maxima
    besides the code (the evaluation reports this side channel beside the code size).
    Without, unpooling repeats each value over its 2x2 window: the code alone is all
    the decoder gets. Training: greedy layer-wise pretraining (`pretrain_epochs` per
    layer, each layer reconstructing its own input from its pooled code), then
    fine-tuning of the stack on x (LayerwiseAutoencoder); "reconstruction" is always x's."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int] = (16, 32), kernel_size: int = 3,
                 pretrain_epochs: int = 10, switches: bool = True):
        super().__init__(pretrain_epochs)
        check_odd_kernel(kernel_size, "kernel_size")
        self.image_shape = tuple(image_shape)
        sizes = [self.image_shape[0], *channels]
        pad = kernel_size // 2
        self.encoders = nn.ModuleList(nn.Conv2d(a, b, kernel_size, padding=pad) for a, b in zip(sizes, sizes[1:]))
        self.decoders = nn.ModuleList(nn.Conv2d(b, a, kernel_size, padding=pad) for a, b in zip(sizes, sizes[1:]))
        self.switches = switches
        self.side_channel = "pooling switches" if switches else None

    def _encode_layer(self, depth: int, h: Tensor) -> tuple[Tensor, Switches]:
        a = torch.relu(self.encoders[depth](h))
        pooled, where = F.max_pool2d(a, 2, ceil_mode=True, return_indices=True)
        return pooled, (where if self.switches else None, a.shape[-2:])

    def _decode_layer(self, depth: int, h: Tensor, switches: Switches) -> Tensor:
        where, size = switches
        up = F.max_unpool2d(h, where, 2, output_size=size) if where is not None else \
            F.interpolate(h, scale_factor=2, mode="nearest")[..., :size[0], :size[1]]
        h = self.decoders[depth](up)
        return torch.relu(h) if depth else torch.sigmoid(h)

    def _encode(self, x: Tensor, depth: int | None = None) -> tuple[Tensor, list[Switches]]:
        h, switches = x.view(-1, *self.image_shape), []
        for layer in range(len(self.encoders) if depth is None else depth):
            h, layer_switches = self._encode_layer(layer, h)
            switches.append(layer_switches)
        return h, switches

    def _decode(self, h: Tensor, switches: list[Switches]) -> Tensor:
        """Back through the layers `switches` came from."""
        for depth in reversed(range(len(switches))):
            h = self._decode_layer(depth, h, switches[depth])
        return h

    def encode(self, x: Tensor) -> Tensor:
        return self._encode(x)[0].flatten(1)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._decode(*self._encode(x)).flatten(1)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        if self.stage is None:
            reconstruction = squared_error(self.reconstruct(x), x)
            return {"loss": reconstruction, **detached(reconstruction=reconstruction)}
        with torch.no_grad():
            below, switches = self._encode(x, self.stage)
        code, layer_switches = self._encode_layer(self.stage, below)
        layer_loss = squared_error(self._decode_layer(self.stage, code, layer_switches), below)
        with torch.no_grad():
            reconstruction = squared_error(self._decode(code, [*switches, layer_switches]).flatten(1), x)
        return {"loss": layer_loss, **detached(reconstruction=reconstruction)}
