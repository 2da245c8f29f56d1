"""Sparse autoencoder (UFLDL): sigmoid code with the KL(rho || rho_hat) penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aefast.models.base import OneLayerSigmoidAutoencoder, decoder_layer, detached, squared_error
from aefast.nn import KLSparsity
from aefast.ops.checks import check_nonnegative, check_open_unit
from aefast.ops.kl import sigmoid_kl_sparsity


class SparseAutoencoder(OneLayerSigmoidAutoencoder):
    """x -> h = sigmoid(W1 x + b1) -> x_hat = sigmoid(W2 h + b2).

    Loss: 1/2 ||x_hat - x||^2 (mean over the batch) + beta * sum_j KL(rho || rho_hat_j)
    + weight_decay / 2 * (||W1||^2 + ||W2||^2). With `momentum`, rho_hat is a moving
    average across batches (aefast.nn.KLSparsity); without, the fused
    sigmoid_kl_sparsity op computes h and the penalty in one pass. The default code is
    overcomplete (128 units for the 64 pixels of digits): the notes' n < p, where only the
    sparsity penalty keeps the code from copying its input. `tied`: W2 = W1^T, so the
    decay term is weight_decay * ||W1||^2.
    """

    sparse_code = True

    def __init__(self, n_in: int, hidden: int = 128, rho: float = 0.05, beta: float = 3.0,
                 weight_decay: float = 1e-4, momentum: float | None = None, tied: bool = False):
        super().__init__()
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = decoder_layer(self.encoder, tied)
        # Checked here, not at the first step, so a bad value fails before training starts.
        self.rho, self.beta = check_open_unit(rho, "rho"), check_nonnegative(beta, "beta")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.sparsity = KLSparsity(rho, beta, momentum) if momentum is not None else None

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        if self.sparsity is None:
            h, sparsity = sigmoid_kl_sparsity(self.encoder(x), self.rho, self.beta, group=self.group)
        else:
            h = self.encode(x)
            sparsity = self.sparsity(h)
        reconstruction = squared_error(torch.sigmoid(self.decoder(h)), x)
        decay = 0.5 * self.weight_decay * (self.encoder.weight.pow(2).sum() + self.decoder.weight.pow(2).sum())
        return {"loss": reconstruction + sparsity + decay,
                **detached(reconstruction=reconstruction, sparsity=sparsity, mean_activation=h.mean())}
