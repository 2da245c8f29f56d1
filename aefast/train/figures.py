"""PNG figures of what a model learned (matplotlib, Agg backend: no display needed):
reconstructions beside their inputs, the input-layer filters of fully connected
encoders, samples of generative models, and the code histogram of sparse models."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from aefast.data import Dataset
from aefast.models import AutoencoderModel
from aefast.train.evaluate import DENSE_FREQUENCY, Inference

N_RECONSTRUCTIONS = 12
N_TILES = 64


def write_figures(out_dir: Path, model: AutoencoderModel, data: Dataset, val: Inference) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    shape = data.image_shape
    target, target_shape = data.val, shape
    if data.val_target is not None:  # a transcoder: its targets and predictions
        target, target_shape = data.val_target, (1, 1, data.val_target.shape[1])
    paths = [_reconstructions(out_dir / "reconstructions.png", target[:N_RECONSTRUCTIONS],
                              val.reconstructions[:N_RECONSTRUCTIONS], target_shape)]
    filters = model.filters()
    if filters is not None:
        paths.append(_tiles(out_dir / "filters.png", filters.detach().float().cpu()[:N_TILES], shape,
                            f"encoder filters (first {min(N_TILES, len(filters))} of {len(filters)}), "
                            "each scaled to its own range", per_tile_scale=True))
    if hasattr(model, "sample"):
        model.eval()
        with torch.no_grad(), model.autocast():
            samples = model.sample(N_TILES).float().cpu()
        paths.append(_tiles(out_dir / "samples.png", samples, shape, "samples"))
    if model.sparse_code:
        # Exactly sparse codes: each unit's firing frequency over every validation row.
        frequency = None if val.firings is None else val.firings.double() / len(val.reconstructions)
        paths.append(_sparsity(out_dir / "sparsity.png", val.codes, getattr(model, "rho", None), frequency))
        if frequency is not None:
            paths.append(_density(out_dir / "density.png", frequency, len(val.reconstructions)))
    return paths


def _density(path: Path, frequency: Tensor, rows: int) -> Path:
    """The histogram SAE papers show: log10 of each latent's firing frequency over the
    validation rows, dead latents counted apart."""
    import matplotlib.pyplot as plt

    alive = frequency[frequency > 0]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(alive.log10().numpy(), bins=40, color="tab:green")
    ax.axvline(math.log10(DENSE_FREQUENCY), color="black", linestyle="--", label=f"dense above {DENSE_FREQUENCY}")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"latent density over {rows} validation rows; {int((frequency == 0).sum())} of "
                 f"{len(frequency)} never fired", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def tile_grid(images: Tensor, shape: tuple[int, int, int], columns: int, per_tile_scale: bool = False) -> Tensor:
    """(n, D) rows as one (rows * (H + 1) - 1, columns * (W + 1) - 1[, 3]) image with
    1-pixel gaps; 3 channels are shown as RGB, other channel counts by their first."""
    c, h, w = shape
    images = images.reshape(-1, c, h, w)
    images = images[:, :3] if c == 3 else images[:, :1]
    if per_tile_scale:
        low = images.amin((1, 2, 3), keepdim=True)
        images = (images - low) / (images.amax((1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
    rows = math.ceil(len(images) / columns)
    grid = torch.full((images.shape[1], rows * (h + 1) - 1, columns * (w + 1) - 1), float("nan"))
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image
    return grid.permute(1, 2, 0) if grid.shape[0] == 3 else grid[0]


def _show(ax, grid: Tensor) -> None:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    if grid.dim() == 3:
        grid = torch.nan_to_num(grid.clamp(0, 1), nan=1.0)
    ax.imshow(grid.numpy(), cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _reconstructions(path: Path, inputs: Tensor, reconstructions: Tensor, shape) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(0.6 * len(inputs) + 1, 1.9))
    for ax, images, title in zip(axes, (inputs, reconstructions), ("validation inputs", "reconstructions")):
        _show(ax, tile_grid(images, shape, columns=len(images)))
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _tiles(path: Path, images: Tensor, shape, title: str, per_tile_scale: bool = False) -> Path:
    import matplotlib.pyplot as plt

    columns = math.ceil(math.sqrt(len(images)))
    fig, ax = plt.subplots(figsize=(4.5, 4.5 * math.ceil(len(images) / columns) / columns + 0.4))
    _show(ax, tile_grid(images, shape, columns, per_tile_scale))
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _sparsity(path: Path, codes: Tensor, rho: float | None, frequency: Tensor | None) -> Path:
    """Left: the code values of the validation rows kept. Right: each unit's fraction
    of examples it is active for (`frequency`, for exactly sparse codes), or its mean
    activation (sigmoid codes: what rho targets)."""
    import matplotlib.pyplot as plt

    zeros = frequency is not None
    per_unit = frequency if zeros else codes.mean(0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.hist(codes.flatten().numpy(), bins=50, log=True, color="tab:blue")
    left.set_title(f"code values ({100 * float((codes == 0).float().mean()):.0f}% exactly 0)", fontsize=9)
    left.set_xlabel("activation")
    right.hist(per_unit.numpy(), bins=30, color="tab:orange")
    right.set_xlabel("fraction of examples active" if zeros else "mean activation")
    right.set_title("per unit", fontsize=9)
    if rho is not None:
        right.axvline(rho, color="black", linestyle="--", label=f"rho = {rho}")
        right.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
