"""aefast: fused kernels for training autoencoders in PyTorch.

    import aefast as ae
    h, penalty = ae.sigmoid_kl_sparsity(z, rho=0.05, beta=3.0)
"""

from aefast import backends, models, nn
from aefast.backends import available_backends, backend, current_backend
from aefast.ops.decode import sparse_decode, topk_encode, topk_encode_aux
from aefast.ops.jumprelu import jumprelu
from aefast.ops.kl import contractive_penalty, kl_sparsity, sigmoid_kl_sparsity
from aefast.ops.noise import corrupt, noisy_linear, reparameterize
from aefast.ops.topk import batch_topk, lifetime_topk, spatial_wta, topk_mask, topk_sparse

__version__ = "0.1.0"


def load_run(run_dir):
    """The trained model of an `aefast train` output folder, in eval mode on the CPU, and
    its configuration (a dict): ``model, config = aefast.load_run("runs/sparse-...")``."""
    from aefast.train.loop import load_run as load

    return load(run_dir)


__all__ = [
    "available_backends",
    "backend",
    "backends",
    "batch_topk",
    "contractive_penalty",
    "corrupt",
    "current_backend",
    "jumprelu",
    "kl_sparsity",
    "lifetime_topk",
    "load_run",
    "models",
    "nn",
    "noisy_linear",
    "reparameterize",
    "sigmoid_kl_sparsity",
    "sparse_decode",
    "spatial_wta",
    "topk_encode",
    "topk_encode_aux",
    "topk_mask",
    "topk_sparse",
]
