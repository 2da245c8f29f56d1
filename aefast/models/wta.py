"""Winner-take-all autoencoders (Makhzani & Frey 2015): sparsity by keeping only the
winners, with no penalty term to tune. Fully connected: lifetime sparsity (each unit
fires for only its top `rate` fraction of the batch). Convolutional: spatial sparsity
(one winner per feature map) plus lifetime sparsity across the batch.

As in the paper, the sparsity is imposed in training only: the features a model offers
afterwards (`encode`) are the encoder's ReLU outputs, max-pooled for Conv-WTA, so a
row's features never depend on the other rows of its batch. What the decoder reads
(`code`) is the batch's winners in training mode; in eval mode, where there is no batch
to compete in, each unit keeps the values above a threshold tracked during training (a
running average of the smallest winner of each batch, as BatchNorm tracks its
statistics), so reconstructions and validation losses are batch-independent too."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import aefast as ae
from aefast.models.base import (
    AutoencoderModel,
    check_odd_kernel,
    decoder_layer,
    detached,
    squared_error,
)
from aefast.ops._distributed import global_count, reduce_over_ranks_
from aefast.ops.checks import check_rate
from aefast.reference import lifetime_count


class _WTABase(AutoencoderModel):
    """Subclasses set `encoder` and `decoder` (winners -> x_hat) and implement
    `features(x)` (the ReLU features), `_winners(features)` (the training-time
    selection), `_unit_values(code)` ((B, units): each unit's kept value, zero where not
    kept) and `_keep_above(features, thresholds)` (the eval-time selection).
    Loss 1/2 ||x_hat - x||^2."""

    sparse_code = True
    exactly_sparse_code = True
    unit_interval_data = False  # a linear decoder
    threshold_momentum = 0.1  # the weight of each batch in the running thresholds

    def __init__(self, rate: float, units: int):
        super().__init__()
        self.rate = check_rate(rate, "rate")
        self.register_buffer("winner_threshold", torch.zeros(units))
        self.register_buffer("thresholds_tracked", torch.zeros((), dtype=torch.long))

    def code(self, x: Tensor) -> Tensor:
        """The winners the decoder reconstructs from."""
        features = self.features(x)
        if not self.training:
            return self._keep_above(features, self.winner_threshold.to(features.dtype))
        return self._winners(features)

    @torch.no_grad()
    def _track_threshold(self, kept: Tensor) -> None:
        """Per unit the smallest kept value of the batch (0 when fewer than the lifetime
        count were positive: then every positive value was kept), averaged over batches;
        on the device, no host sync."""
        kept = kept.float()
        positive = kept > 0
        smallest = torch.where(positive, kept, math.inf).amin(0)
        count, batch_rows = positive.sum(0), kept.shape[0]
        if self.group is not None:  # over the global batch
            reduce_over_ranks_(smallest, "min", self.group)
            reduce_over_ranks_(count, "sum", self.group)
            batch_rows = global_count(batch_rows, kept.device, self.group)
        enough = count >= lifetime_count(self.rate, batch_rows)
        batch = torch.where(enough, smallest, 0.0).to(self.winner_threshold.dtype)  # a .double() model's
        running = torch.lerp(self.winner_threshold, batch, self.threshold_momentum)
        self.winner_threshold.copy_(torch.where(self.thresholds_tracked == 0, batch, running))
        self.thresholds_tracked += 1

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.code(x)).flatten(1)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        code = self.code(x)
        if self.training:  # a training batch (not reconstruct in train mode): its thresholds
            self._track_threshold(self._unit_values(code.detach()))
        reconstruction = squared_error(self.decoder(code).flatten(1), x)
        active = (code != 0).float().flatten(1).mean()
        return {"loss": reconstruction, **detached(reconstruction=reconstruction, active=active)}


class WTAAutoencoder(_WTABase):
    """x -> features ReLU(W1 x + b1) -> winners lifetime_topk(., rate) -> linear decoder
    (`tied`: W1^T). `encode`: the features."""

    def __init__(self, n_in: int, hidden: int = 256, rate: float = 0.05, tied: bool = False):
        super().__init__(rate, hidden)
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = decoder_layer(self.encoder, tied)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.encoder(x))

    def encode(self, x: Tensor) -> Tensor:
        return self.features(x)

    def _winners(self, features: Tensor) -> Tensor:
        return ae.lifetime_topk(features, self.rate, group=self.group)

    def _unit_values(self, code: Tensor) -> Tensor:
        return code

    def _keep_above(self, features: Tensor, thresholds: Tensor) -> Tensor:
        return torch.where(features >= thresholds, features, 0.0)

    def filters(self) -> Tensor:
        return self.encoder.weight


class ConvWTAAutoencoder(_WTABase):
    """Conv -> ReLU layers (same padding) -> winners spatial_wta(., lifetime_rate=rate) ->
    one linear transposed convolution back to the image (the paper's deconvolution).
    `encode`: the feature maps max-pooled `pool` x `pool`, as the paper pools them for
    its classifier."""

    data_parallel = False  # spatial_wta's lifetime selection has no group= yet: it would be per process

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int] = (32, 32), kernel_size: int = 5,
                 decoder_kernel_size: int = 7, rate: float = 0.2, pool: int = 2):
        super().__init__(rate, channels[-1])
        check_odd_kernel(kernel_size, "kernel_size")
        check_odd_kernel(decoder_kernel_size, "decoder_kernel_size")
        self.image_shape = tuple(image_shape)
        sizes = [self.image_shape[0], *channels]
        encoder: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            encoder += [nn.Conv2d(a, b, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.ConvTranspose2d(sizes[-1], sizes[0], decoder_kernel_size, padding=decoder_kernel_size // 2)
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.pool = pool

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x.view(-1, *self.image_shape))

    def encode(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.features(x), self.pool, ceil_mode=True).flatten(1)

    def _winners(self, features: Tensor) -> Tensor:
        return ae.spatial_wta(features, lifetime_rate=self.rate)

    def _unit_values(self, code: Tensor) -> Tensor:
        return code.amax((2, 3))  # the one winner of each kept map, 0 elsewhere

    def _keep_above(self, features: Tensor, thresholds: Tensor) -> Tensor:
        code = ae.spatial_wta(features)  # per map: batch-independent
        return torch.where(code.amax((2, 3), keepdim=True) >= thresholds.view(1, -1, 1, 1), code, 0.0)
