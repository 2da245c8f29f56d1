"""Thin model definitions, one file per autoencoder family: layers plus a
`loss(batch) -> dict` that calls the ops (see aefast.models.base for the interface the
trainer uses). The trainer, not the model, owns the loop."""

from aefast.models.adversarial import AdversarialAutoencoder
from aefast.models.autoencoder import Autoencoder
from aefast.models.base import AutoencoderModel
from aefast.models.batchtopk_sae import BatchTopKSAE, MatryoshkaSAE
from aefast.models.contractive import ContractiveAutoencoder
from aefast.models.conv import ConvAutoencoder
from aefast.models.denoising import DenoisingAutoencoder
from aefast.models.gsn import GSN
from aefast.models.jumprelu_sae import JumpReLUSAE
from aefast.models.linear import LinearAutoencoder
from aefast.models.sparse import SparseAutoencoder
from aefast.models.stacked import StackedAutoencoder
from aefast.models.topk_sae import TopKSAE
from aefast.models.vae import VariationalAutoencoder
from aefast.models.wta import ConvWTAAutoencoder, WTAAutoencoder

__all__ = [
    "AdversarialAutoencoder",
    "Autoencoder",
    "AutoencoderModel",
    "BatchTopKSAE",
    "ContractiveAutoencoder",
    "ConvAutoencoder",
    "ConvWTAAutoencoder",
    "DenoisingAutoencoder",
    "GSN",
    "JumpReLUSAE",
    "LinearAutoencoder",
    "MatryoshkaSAE",
    "SparseAutoencoder",
    "StackedAutoencoder",
    "TopKSAE",
    "VariationalAutoencoder",
    "WTAAutoencoder",
]
