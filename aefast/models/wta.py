"""Winner-take-all autoencoders (Makhzani & Frey 2015): sparsity by keeping only the
winners, with no penalty term to tune. Fully connected: lifetime sparsity (each unit
fires for only its top `rate` fraction of the batch). Convolutional: spatial sparsity
(one winner per feature map) plus lifetime sparsity across the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import aefast as ae
from aefast.models.base import AutoencoderModel, detached, squared_error


class _WTABase(AutoencoderModel):
    """Codes are the winners only (during training and after: the decoder never saw
    anything else); loss 1/2 ||x_hat - x||^2."""

    sparse_code = True
    unit_interval_data = False  # a linear decoder

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.encode(x)).flatten(1)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        code = self.encode(x)
        reconstruction = squared_error(self.decoder(code).flatten(1), x)
        active = (code != 0).float().flatten(1).mean()
        return {"loss": reconstruction, **detached(reconstruction=reconstruction, active=active)}


class WTAAutoencoder(_WTABase):
    """x -> ReLU(W1 x + b1) -> lifetime_topk(., rate) -> linear decoder."""

    def __init__(self, n_in: int, hidden: int = 256, rate: float = 0.05):
        super().__init__()
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = nn.Linear(hidden, n_in)
        self.rate = rate

    def encode(self, x: Tensor) -> Tensor:
        return ae.lifetime_topk(torch.relu(self.encoder(x)), self.rate)

    def filters(self) -> Tensor:
        return self.encoder.weight


class ConvWTAAutoencoder(_WTABase):
    """Conv -> ReLU layers (same padding) -> spatial_wta(., lifetime_rate=rate) -> one
    linear transposed convolution back to the image (the paper's deconvolution)."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int] = (32, 32), kernel_size: int = 5,
                 decoder_kernel_size: int = 7, rate: float = 0.2):
        super().__init__()
        self.image_shape = tuple(image_shape)
        sizes = [self.image_shape[0], *channels]
        encoder: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            encoder += [nn.Conv2d(a, b, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.ConvTranspose2d(sizes[-1], sizes[0], decoder_kernel_size, padding=decoder_kernel_size // 2)
        self.rate = rate

    def encode(self, x: Tensor) -> Tensor:
        return ae.spatial_wta(self.encoder(x.view(-1, *self.image_shape)), lifetime_rate=self.rate)
