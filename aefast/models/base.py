"""What every model offers the trainer, and the small pieces the models share.

A model is an `AutoencoderModel`: layers, `loss(x) -> dict` ("loss" is the scalar to
backpropagate, the other entries detached terms for display), `encode(x)` (the codes a
linear probe reads) and `reconstruct(x)`. x is always a (B, D) batch; models that work
on images reshape it to their `image_shape`. Models whose training is not "one loss, one
optimizer" override the hooks below instead of the trainer special-casing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class AutoencoderModel(nn.Module):
    # Figures: a histogram of the codes for models whose point is a sparse code.
    sparse_code = False
    # The code's inactive units are exactly 0 by construction (top-k, WTA, JumpReLU): the
    # evaluation reports L0, FVU and dead/dense latents (a saturated sigmoid's zeros are not that).
    exactly_sparse_code = False
    # The output goes through a sigmoid (or scores pixels as Bernoulli): the data must
    # lie in [0, 1], which the trainer checks. Models with a linear decoder say False.
    unit_interval_data = True
    # Mixed precision: the trainer sets this to a dtype on GPU; None runs in full precision.
    # The aefast ops take no part in autocast (they want one dtype for all their tensor
    # arguments), so the models cast parameters to the activations' dtype where they
    # pass both to an op.
    autocast_dtype: torch.dtype | None = None
    # What the decoder reads besides the code `encode` returns, if anything (the
    # evaluation and the README table report it beside the code size).
    side_channel: str | None = None
    # One optimizer step per batch, so that --grad-accum can add several batches' gradients.
    accumulates_gradients = True
    # A torch.distributed process group whose global batch the model's batch statistics
    # run over (`distribute`); None: the local batch.
    group = None
    # Trains data-parallel exactly (aefast.train.distributed): its batch statistics take
    # the global batch, and its step is one loss, one optimizer.
    data_parallel = True

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reconstruct_and_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruct(x), encode(x)); models whose reconstruction decodes the code
        `encode` returns override it to encode once (the evaluation wants both)."""
        return self.reconstruct(x), self.encode(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    # Optional, for figures: `filters() -> (H, D)` input-layer weights of a fully
    # connected encoder, and `sample(n) -> (n, D)` for generative models.
    def filters(self) -> Tensor | None:
        return None

    def subspace(self) -> Tensor | None:
        """(D, k): a basis of the affine subspace the reconstructions lie in, for models
        whose decoder is linear (the evaluation compares it with PCA's)."""
        return None

    # ------------------------------------------------------------ training hooks

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; their states are checkpointed by name."""
        return {"model": adam(self.parameters(), lr)}

    def begin_epoch(self, epoch: int) -> str | None:
        """Called before each epoch (0-based); returns a phase name to display, if any."""
        return None

    def distribute(self, group) -> None:
        """Take batch statistics over the global batch of `group` (None: the local
        batch), in this model and every layer of it that has a `group`."""
        for module in self.modules():
            if hasattr(module, "group"):
                module.group = group

    def train_step(self, batches: Tensor | Sequence[Tensor], optimizers: dict[str, torch.optim.Optimizer],
                   *, loss=None, mean_rows: float | None = None) -> dict[str, Tensor]:
        """One optimisation step on a batch, or on several (gradient accumulation: the
        gradient of their losses' mean, weighted by rows); returns the loss terms,
        weighted the same way. `loss`: the function to call instead of self.loss (the
        data-parallel wrapper); `mean_rows`: the rows the losses are averaged over
        (default: the rows given; data-parallel: the step's global rows / world size,
        which DDP's average over the processes completes to the global mean)."""
        (optimizer,) = optimizers.values()
        batches = [batches] if isinstance(batches, Tensor) else list(batches)
        rows = mean_rows or sum(len(x) for x in batches)
        loss = loss or self.loss
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        for i, x in enumerate(batches):
            # Data-parallel (loss is DDP's): the gradients averaged over the processes once,
            # with the step's last batch, not after each.
            deferred = hasattr(loss, "no_sync") and i + 1 < len(batches)
            with loss.no_sync() if deferred else contextlib.nullcontext():
                with self.autocast():
                    terms = loss(x)
                weight = len(x) / rows  # 1.0 for a single batch: the very bits of an unweighted step
                (terms["loss"] * weight).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach() * weight
        self.before_step()
        optimizer.step()
        self.after_step()
        return totals

    def before_step(self) -> None:
        """Called between the backward and the optimizer step (changes to the gradients)."""

    def after_step(self) -> None:
        """Called after each optimizer step (constraints such as unit-norm weights)."""

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


class LayerwiseAutoencoder(AutoencoderModel):
    """Greedy layer-wise pretraining, then fine-tuning (the stacked autoencoders of the
    notes, Masci's stacked convolutional one): epochs [k * pretrain_epochs, (k + 1) *
    pretrain_epochs) train layer k alone on the codes of the layers below, which stay
    fixed; the epochs after that fine-tune the whole stack. Subclasses set `encoders`
    (one module per layer) and call `__init__(pretrain_epochs)` first."""

    encoders: nn.ModuleList

    def __init__(self, pretrain_epochs: int):
        super().__init__()
        if pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
        self.pretrain_epochs = pretrain_epochs
        self.stage: int | None = None  # the layer being pretrained; None: fine-tuning

    def begin_epoch(self, epoch: int) -> str:
        depth = len(self.encoders)
        stage = epoch // self.pretrain_epochs if self.pretrain_epochs else depth
        self.stage = stage if stage < depth else None
        return "fine-tune" if self.stage is None else f"pretrain layer {stage + 1}/{depth}"


class OneLayerSigmoidAutoencoder(AutoencoderModel):
    """x -> h = sigmoid(encoder(x)) -> x_hat = sigmoid(decoder(h)): the shape the
    UFLDL-style models share; subclasses set `encoder` (D -> H) and `decoder` (H -> D),
    the latter `decoder_layer(encoder, tied)` (tied: W2 = W1^T, a bias of its own)."""

    encoder: nn.Module
    decoder: nn.Module

    def encode(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.encoder(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.encode(x)))

    def filters(self) -> Tensor:
        return self.encoder.weight


class MLPAutoencoder(AutoencoderModel):
    """x -> code = encoder(x) -> x_hat = decoder(code) with MLP encoder and decoder
    (`mlp`); subclasses set `encoder` and `decoder`."""

    encoder: nn.Sequential
    decoder: nn.Sequential

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def filters(self) -> Tensor:
        return self.encoder[0].weight


class TiedDecoder(nn.Module):
    """The decoder layer of a tied autoencoder: y = h W^T + b with W the encoder layer's
    own weight (the same parameter, trained by both sides) and a bias of its own."""

    def __init__(self, encoder: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = encoder.in_features, encoder.out_features
        self.bias = nn.Parameter(encoder.weight.new_zeros(encoder.in_features))  # the encoder's device and dtype
        # In a tuple, not an attribute: a submodule would list the encoder's weight twice
        # in state_dict. Module.to() and load_state_dict() update parameters in place,
        # so the reference stays the encoder's.
        self._tied_to = (encoder,)

    @property
    def weight(self) -> Tensor:
        return self._tied_to[0].weight.t()

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.linear(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the encoder's weight"


def decoder_layer(encoder: nn.Linear, tied: bool) -> nn.Module:
    """The layer mapping `encoder`'s output back to its input: its own weights, or
    (tied) the encoder's weight transposed."""
    if tied:
        return TiedDecoder(encoder)
    return nn.Linear(encoder.out_features, encoder.in_features, device=encoder.weight.device,
                     dtype=encoder.weight.dtype)


def check_odd_kernel(size: int, name: str) -> int:
    """A convolution kernel size that same padding (size // 2) keeps the image size with."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be odd and >= 1 (same padding keeps only an odd kernel's image size), got {size}")
    return size


def adam(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters): on this project's CPU
    machine a step over two 16384 x 768 matrices took 15 ms fused, 100 ms foreach."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def at_least_float32(t: Tensor) -> Tensor:
    """`t` for a loss: float32 at least (bfloat16 activations under autocast), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def squared_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """1/2 ||x_hat - x||^2 summed over features, averaged over the batch (UFLDL's J);
    in float32 at least, float64 kept."""
    x_hat = at_least_float32(x_hat)
    return 0.5 * (x_hat - x.to(x_hat.dtype)).pow(2).flatten(1).sum(1).mean()


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Cross-entropy of pixels in [0, 1] under Bernoulli(sigmoid(logits)), summed over
    features, averaged over the batch; in float32 at least, float64 kept."""
    logits = at_least_float32(logits)
    return nn.functional.binary_cross_entropy_with_logits(
        logits, x.to(logits.dtype), reduction="none").flatten(1).sum(1).mean()


def mlp(sizes: Iterable[int], activation: type[nn.Module] = nn.ReLU, last: nn.Module | None = None) -> nn.Sequential:
    """Linear layers through `sizes` with `activation` between them and `last` (if any)
    after the final one."""
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


def mirrored_mlp(encoder: nn.Sequential, activation: type[nn.Module] = nn.ReLU, last: nn.Module | None = None,
                 tied: bool = False) -> nn.Sequential:
    """The decoder that mirrors an `mlp` encoder: its linear layers in reverse, each
    mapping back (tied: through the encoder layer's transposed weight)."""
    linears = [layer for layer in encoder if isinstance(layer, nn.Linear)]
    layers: list[nn.Module] = []
    for i, linear in enumerate(reversed(linears)):
        layers.append(decoder_layer(linear, tied))
        if i < len(linears) - 1:
            layers.append(activation())
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


def detached(**terms: Tensor) -> dict[str, Tensor]:
    return {name: value.detach() for name, value in terms.items()}
