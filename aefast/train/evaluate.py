"""The end-of-run evaluation: validation reconstruction MSE, a linear probe on the codes
against the same probe on the raw inputs (when the data has labels), and, on synthetic
data, how well the learned filters recover the ground-truth features."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from aefast.data import Dataset
from aefast.models import AutoencoderModel

# The codes kept for the probe and the figures: a (rows, L) float32 matrix of at most
# this many bytes (a large top-k SAE's codes of every validation row would not fit).
CODE_BYTES = 256 * 2**20


class Inference(NamedTuple):
    reconstructions: Tensor  # of every row, float32 on the CPU
    codes: Tensor  # flattened to rows, of the first rows: as many as CODE_BYTES holds
    firings: Tensor | None  # exactly sparse codes: on how many of all the rows each unit was nonzero (int64)


@torch.no_grad()
def infer(model: AutoencoderModel, x: Tensor, batch_size: int) -> Inference:
    """The model over `x` in chunks of the training batch size: batch-level codes
    (lifetime sparsity) then see the batches they were trained on. A large SAE's codes
    of every row would not fit: only the first rows' are kept, but its firings are
    counted over every row (a latent that fires once in 10^4 rows is not dead)."""
    model.eval()
    reconstructions, codes, code_rows = [], [], len(x)
    firings = None
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        with model.autocast():
            if start < code_rows or model.exactly_sparse_code:
                reconstruction, code = model.reconstruct_and_encode(batch)
                code = code.flatten(1)
            else:
                reconstruction = model.reconstruct(batch)
            reconstructions.append(reconstruction.float().cpu())
        if model.exactly_sparse_code:
            fired = (code != 0).sum(0)
            firings = fired if firings is None else firings + fired
        if start < code_rows:
            code_rows = max(len(batch), CODE_BYTES // (4 * code.shape[1]))
            codes.append(code.float().cpu())
    return Inference(torch.cat(reconstructions), torch.cat(codes)[:code_rows],
                     None if firings is None else firings.cpu())


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x.numpy(), train_y.numpy())
    return float(probe.score(test_x.numpy(), test_y.numpy()))


def feature_recovery(features: Tensor, filters: Tensor) -> float:
    """Mean over the ground-truth features of the best cosine similarity with a filter."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    w = torch.nn.functional.normalize(filters.detach().float().cpu(), dim=1)
    return float((f @ w.T).amax(1).mean())


def evaluate(model: AutoencoderModel, data: Dataset, batch_size: int, val: Inference) -> dict[str, Any]:
    val_recon, val_codes = val.reconstructions, val.codes
    target = data.val if data.val_target is None else data.val_target  # what the model reconstructs
    result: dict[str, Any] = {"val_mse": float((val_recon - target).pow(2).mean())}
    if data.train_labels is not None and len(data.train_labels.unique()) > 1:
        train_codes = infer(model, data.train.to(_device(model)), batch_size).codes
        n_train, n_val = len(train_codes), len(val_codes)  # the rows whose codes were kept
        result["probe_accuracy"] = linear_probe(train_codes, data.train_labels[:n_train],
                                                val_codes, data.val_labels[:n_val])
        result["raw_probe_accuracy"] = linear_probe(data.train[:n_train], data.train_labels[:n_train],
                                                    data.val[:n_val], data.val_labels[:n_val])
    filters = model.filters()
    if data.features is not None and filters is not None:
        result["feature_recovery"] = feature_recovery(data.features, filters)
    subspace = model.subspace()
    if subspace is not None:
        mean, components = principal_components(data.train, subspace.shape[1])
        result["pca_largest_angle"] = largest_angle(components, subspace.cpu())
        pca_recon = (data.val.double() - mean) @ components @ components.T + mean
        result["pca_val_mse"] = float((pca_recon - data.val.double()).pow(2).mean())
    result["code_size"] = val_codes.shape[1]
    if val.firings is not None:
        result.update(dictionary_metrics(target, val_recon, val.firings))
    if model.side_channel:
        result["side_channel"] = model.side_channel
    return result


DENSE_FREQUENCY = 0.1  # a latent active on more than this fraction of rows counts as dense


def dictionary_metrics(x: Tensor, x_hat: Tensor, firings: Tensor) -> dict[str, Any]:
    """What SAE papers report, over every row of `x`: the fraction of variance
    unexplained, L0 (active latents per row), the fraction of latents dead (never active)
    and dense (active on more than DENSE_FREQUENCY of the rows). `firings`: on how many
    rows each latent was active (Inference.firings)."""
    x, x_hat = x.double(), x_hat.double()
    frequency = firings.double() / len(x)
    variance = float((x - x.mean(0)).pow(2).sum())  # 0 for a single row: FVU undefined (null)
    return {"fvu": float((x - x_hat).pow(2).sum()) / variance if variance > 0 else None,
            "l0": float(frequency.sum()),
            "dead_fraction": float((firings == 0).double().mean()),
            "dense_fraction": float((frequency > DENSE_FREQUENCY).double().mean()),
            "density_rows": len(x)}


def principal_components(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(mean (D,), components (D, k)): the rows' mean and their first k principal
    directions, orthonormal, in float64."""
    mean = x.double().mean(0)
    return mean, torch.linalg.svd(x.double() - mean, full_matrices=False).Vh[:k].T


def largest_angle(a: Tensor, b: Tensor) -> float:
    """The largest principal angle between span(a) and span(b) (both (D, k)), in
    degrees: 0 when the subspaces agree, 90 when one holds a direction orthogonal to the other."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(cosines.min())))


def _device(model: AutoencoderModel) -> torch.device:
    return next(model.parameters()).device
