"""Top-k sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): exactly k active latents per example, a unit-norm decoder, and the AuxK
loss that revives dead latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import aefast as ae
from aefast.models.base import AutoencoderModel, detached, squared_error
from aefast.ops._distributed import reduce_over_ranks_
from aefast.ops.checks import mixed_precision
from aefast.ops.topk import check_k

INIT_BLOCK = 4096  # decoder rows drawn per generator: a shard draws only its own blocks


def initial_decoder_rows(n_latents: int, n_in: int, rows: range, seed: int) -> Tensor:
    """Rows `rows` of the initial (n_latents, n_in) decoder: Gaussian rows scaled to
    unit length, block b of INIT_BLOCK rows drawn from a generator seeded seed + b, so
    that a shard of the latents is initialised as the same rows of the whole model
    without drawing (or holding) the rest."""
    parts = []
    for block in range(rows.start // INIT_BLOCK, -(-rows.stop // INIT_BLOCK)):
        low, high = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, n_latents)
        drawn = torch.randn(high - low, n_in, generator=torch.Generator().manual_seed(seed + block))
        parts.append(drawn[max(rows.start, low) - low:min(rows.stop, high) - low])
    return F.normalize(torch.cat(parts) if parts else torch.empty(0, n_in), dim=1)


@torch.no_grad()
def remove_gradient_along_rows(weight: nn.Parameter) -> None:
    """Each unit-norm decoder row's gradient without its component along the row (Gao
    et al. 2024, as sparsify does), before the optimizer step: the step does not spend
    itself on the length that the renormalisation after it takes back, and Adam's
    moments see only the direction's gradient."""
    grad = weight.grad
    if grad is not None:
        rows = weight.to(grad.dtype)
        along = torch.einsum("ld,ld->l", grad, rows)  # a batched dot: no (L, D) temporary
        grad.addcmul_(along.unsqueeze(1), rows, value=-1.0)


class TopKSAE(AutoencoderModel):
    """z = TopK(ReLU(W_enc (x - b_pre) + b_enc)) with k of `n_latents` active;
    x_hat = b_pre + sum_k z_k W_dec[k]. The fused path end to end: aefast.topk_encode
    never holds the (B, L) pre-activation, forward or backward (the encoder's weight
    gradient touches the winners' rows only, in a fixed order: the same bits every
    run), and aefast.sparse_decode never builds the dense code.

    The decoder gradient loses its component along each row before the optimizer step
    (before_step), and the rows go back to unit length after it (after_step), as in
    Gao et al.; a training loop of one's own calls both around optimizer.step().

    AuxK: a latent is dead when it has not fired for `dead_steps` training steps; the
    top `k_aux` dead latents (aefast.topk_encode_aux: from the same pass as the main
    selection), decoded alone, are trained to predict the residual x - x_hat, weighted
    by `aux_coef`. That gives dead latents a gradient again. Both terms are 1/2 the
    squared error, batch means, so the AuxK term shrinks with the residual, as in
    sparsify (Gao et al.'s code divides it by the residual's variance instead: there
    `aux_coef` weighs it as much at any reconstruction error). The bookkeeping stays on
    the device (no host sync, no branch on a tensor's value), so the loss compiles
    with torch.compile(fullgraph=True).

    Transcoder (`n_out`, Dunefsky et al. 2024): the model reads x (the first n_in
    columns of each row) and predicts the target (the next n_out columns, another site
    of the network) instead of x: W_dec is (L, n_out), b_pre is the output's bias and is
    not subtracted from the input. encode/winners/reconstruct read the first n_in
    columns of what they are given, so they take inputs alone or whole rows."""

    sparse_code = True
    exactly_sparse_code = True
    unit_interval_data = False  # a linear decoder: any real-valued activations

    def __init__(self, n_in: int, n_latents: int = 256, k: int = 8, k_aux: int = 32,
                 aux_coef: float = 1 / 32, dead_steps: int = 100, *, n_out: int | None = None,
                 latents: range | None = None):
        """`latents`: hold only these of the n_latents (a latent-parallel shard,
        aefast.models.topk_sae_sharded), initialised as the same rows of the whole model."""
        super().__init__()
        if not n_latents >= 1:
            raise ValueError(f"n_latents must be >= 1, got {n_latents}")
        latents = latents if latents is not None else range(n_latents)
        self.n_in, self.transcoder = n_in, n_out is not None
        decoder = initial_decoder_rows(n_latents, n_out or n_in, latents, int(torch.randint(2**62, ())))
        # tied at initialisation; a transcoder's input and output differ: its own rows
        encoder = initial_decoder_rows(n_latents, n_in, latents, int(torch.randint(2**62, ()))) \
            if self.transcoder else decoder.clone()
        self.decoder_weight = nn.Parameter(decoder)                # (L, D_out), rows unit-norm
        self.encoder_weight = nn.Parameter(encoder)                # (L, D_in)
        self.encoder_bias = nn.Parameter(torch.zeros(len(latents)))
        self.pre_bias = nn.Parameter(torch.zeros(n_out or n_in))
        self.register_buffer("steps_since_fired", torch.zeros(len(latents), dtype=torch.long))
        # How often each latent fired in this step's batches so far (after_step counts the
        # step): zero between steps, so not saved.
        self.register_buffer("fired_in_step", torch.zeros(len(latents), dtype=torch.long), persistent=False)
        held = "the number of latents" if len(latents) == n_latents else "the latents each process holds"
        self.k = check_k(k, len(latents), held)  # fail before training starts
        self.k_aux = check_k(k_aux, len(latents), held, name="k_aux") if k_aux else 0  # 0: no AuxK
        if not dead_steps >= 1:
            raise ValueError(f"dead_steps must be >= 1, got {dead_steps}")
        if not 0 <= aux_coef < float("inf"):
            raise ValueError(f"aux_coef must be >= 0, got {aux_coef}")
        self.aux_coef, self.dead_steps = aux_coef, dead_steps

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(input, what to reconstruct) of a batch: (x, x), or a transcoder's (x, target)."""
        if self.transcoder:
            return batch[:, :self.n_in], batch[:, self.n_in:]
        return batch, batch

    def encoder_input(self, x: Tensor) -> Tensor:
        x = x[:, :self.n_in]
        return x if self.transcoder else x - self.pre_bias.to(x.dtype)

    def _encoder_args(self, x: Tensor) -> tuple:
        return (self.encoder_input(x), self.encoder_weight, self.encoder_bias, self.k)

    def winners(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), each (B, k): the active latents of each row."""
        return ae.topk_encode(*self._encoder_args(x))

    def encode(self, x: Tensor) -> Tensor:
        """The dense (B, L) code, for the probe and the figures."""
        return self._dense_code(*self.winners(x))

    def _dense_code(self, values: Tensor, indices: Tensor) -> Tensor:
        return values.new_zeros((values.shape[0], self.encoder_weight.shape[0])).scatter_(1, indices, values)

    def decoder_weight_for(self, values: Tensor) -> Tensor:
        """The decoder weight as sparse_decode takes it beside `values`: a float32 weight
        as it is beside bfloat16 or float16 values (autocast; the kernels sum in float32
        and its gradient comes in float32, with no cast of the whole weight either way),
        otherwise in the values' dtype."""
        weight = self.decoder_weight
        return weight if mixed_precision(values.dtype, weight.dtype) else weight.to(values.dtype)

    def _decode(self, values: Tensor, indices: Tensor, bias: bool = True) -> Tensor:
        return ae.sparse_decode(values, indices, self.decoder_weight_for(values),
                                self.pre_bias.to(values.dtype) if bias else None)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._decode(*self.winners(x))

    def reconstruct_and_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = self.winners(x)
        return self._decode(values, indices), self._dense_code(values, indices)

    def filters(self) -> Tensor:
        return self.encoder_weight

    def dead_latents(self) -> Tensor:
        return self.steps_since_fired >= self.dead_steps

    def loss(self, batch: Tensor) -> dict[str, Tensor]:
        x, target = self.split(batch)
        dead = self.dead_latents()  # as of the last step, like the peers
        if self.k_aux:
            values, indices, aux_values, aux_indices = ae.topk_encode_aux(*self._encoder_args(x), dead, self.k_aux)
        else:
            values, indices = self.winners(x)
        x_hat = self._decode(values, indices)
        reconstruction = squared_error(x_hat, target)
        if self.training:
            self._note_fired(values, indices)
        if self.k_aux:
            residual = (target - x_hat).detach()
            aux_hat = self._decode(aux_values, aux_indices, bias=False)
            aux = squared_error(aux_hat, residual) * dead.any()  # nothing to revive: no AuxK term
        else:
            aux = reconstruction.new_zeros(())
        return {"loss": reconstruction + self.aux_coef * aux,
                **detached(reconstruction=reconstruction, auxk=aux, dead=dead.float().mean())}

    @torch.no_grad()
    def _note_fired(self, values: Tensor, indices: Tensor) -> None:
        """The latents that fired in a training batch (winners with a positive value),
        kept on the device until the step ends."""
        self.fired_in_step.scatter_add_(0, indices.flatten(), (values > 0).flatten().long())  # integer: deterministic

    def before_step(self) -> None:
        remove_gradient_along_rows(self.decoder_weight)

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimizer step (train_step calls it; a loop of one's own must too):
        each latent's steps since it last fired, counted once for all the step's batches
        (gradient accumulation is one larger batch; with data parallelism, firing anywhere
        in the global batch counts); then the decoder rows back to unit length."""
        if self.training:  # a step of the training (its losses noted what fired)
            fired = self.fired_in_step
            if self.group is not None:
                reduce_over_ranks_(fired, "max", self.group)
            self.steps_since_fired.add_(1).masked_fill_(fired > 0, 0)
            fired.zero_()
        self.decoder_weight.div_(self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8))
