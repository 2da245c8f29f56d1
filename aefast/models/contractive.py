"""Contractive autoencoder (Rifai et al. 2011): penalise the Frobenius norm of the
encoder's Jacobian, so that similar inputs get similar codes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aefast.models.base import OneLayerSigmoidAutoencoder, decoder_layer, detached, squared_error
from aefast.ops.checks import check_nonnegative
from aefast.ops.kl import contractive_penalty


class ContractiveAutoencoder(OneLayerSigmoidAutoencoder):
    """h = sigmoid(W1 x + b1), x_hat = sigmoid(W2 h + b2); loss 1/2 ||x_hat - x||^2 +
    lam * ||J_h(x)||_F^2, both averaged over the batch. The Jacobian norm of a sigmoid
    layer has a closed form (aefast.contractive_penalty), no autograd through a Jacobian."""

    def __init__(self, n_in: int, hidden: int = 128, lam: float = 0.1, tied: bool = False):
        super().__init__()
        self.encoder = nn.Linear(n_in, hidden)
        self.decoder = decoder_layer(self.encoder, tied)
        self.lam = check_nonnegative(lam, "lam")

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encode(x)
        reconstruction = squared_error(torch.sigmoid(self.decoder(h)), x)
        jacobian = contractive_penalty(h, self.encoder.weight.to(h.dtype)) / x.shape[0]  # the op sums over the batch
        return {"loss": reconstruction + self.lam * jacobian,
                **detached(reconstruction=reconstruction, jacobian=jacobian)}
