"""`aefast study pretraining`: does autoencoder pretraining still help a classifier?

The source notes give greedy layer-wise pretraining as the reason autoencoders were
used (2006-2012), and say that good initialisation, BatchNorm and residual connections
made it unnecessary, except that pretraining on more data still helps when labels are
few. This study measures that on labelled data (digits by default):

- every classifier has the same shape, D -> 128 -> 64 -> classes, with the activation
  of the encoder it starts from (sigmoid for the UFLDL-style models, ReLU for wta and
  vae), with or without BatchNorm before each activation;
- its hidden layers start from: `random-sigmoid` / `random-relu` (PyTorch's default
  initialisation), `stacked` (greedy layer-wise pretraining of both hidden layers, then
  fine-tuning of the stack as an autoencoder), or the input layer of one single-stage
  autoencoder of the zoo (`denoising`, `sparse`, `contractive`, `vae`, `wta`: the second
  hidden layer random);
- every autoencoder is pretrained on all training rows, without their labels; the
  classifier is then trained on a label fraction of them (a stratified sample) and
  scored on the held-out test rows, for several seeds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aefast.data import Dataset, load_dataset

INITS = ("random-sigmoid", "random-relu", "stacked", "denoising", "sparse", "contractive", "vae", "wta")
RELU_INITS = {"random-relu", "vae", "wta"}
HIDDEN = (128, 64)
FINETUNE_LR = 3e-3
FINETUNE_BATCH = 128


def pretrain(init: str, data: Dataset, epochs: int, seed: int) -> list[nn.Module] | None:
    """The hidden layers an init starts from: None (random), or pretrained nn.Linear
    layers (the first one, or both for `stacked`), trained on the rows without labels."""
    if init.startswith("random"):
        return None
    from aefast.train import config as configuration
    from aefast.train.loop import check_data_range

    overrides = ({"layers": list(HIDDEN), "pretrain_epochs": max(1, epochs // 3), "epochs": epochs}
                 if init == "stacked" else {"hidden": HIDDEN[0]})
    config = configuration.resolve(init, overrides)
    torch.manual_seed(seed)
    model = configuration.build_model(config, data.image_shape)
    check_data_range(model, data)
    optimizers = model.configure_optimizers(config["lr"])
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.begin_epoch(epoch)
        model.train()
        permutation = torch.randperm(len(data.train), generator=order)
        for start in range(0, len(data.train), config["batch_size"]):
            model.train_step(data.train[permutation[start:start + config["batch_size"]]], optimizers)
    if init == "stacked":
        return list(model.encoders)
    first = model.filters()
    layer = next(m for m in model.modules() if getattr(m, "weight", None) is first)
    return [layer]


class Classifier(nn.Module):
    """D -> 128 -> 64 -> classes; hidden layers Linear (-> BatchNorm) -> activation."""

    def __init__(self, n_in: int, n_classes: int, relu: bool, batchnorm: bool, start: list[nn.Module] | None):
        super().__init__()
        sizes = (n_in, *HIDDEN)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        for layer, pretrained in zip(self.hidden, start or []):
            with torch.no_grad():
                layer.weight.copy_(pretrained.weight)
                layer.bias.copy_(pretrained.bias)
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if batchnorm else nn.Identity() for b in HIDDEN)
        self.activation = torch.relu if relu else torch.sigmoid
        self.head = nn.Linear(HIDDEN[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer, norm in zip(self.hidden, self.norms):
            x = self.activation(norm(layer(x)))
        return self.head(x)


def labelled_rows(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a stratified `fraction` of the rows (every class present at least once
    where there are enough rows; all of them for a fraction that leaves out fewer rows
    than there are classes)."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    classes = len(labels.unique())
    count = max(int(round(fraction * len(labels))), classes)
    if count > len(labels) - classes:  # too few rows left out to stratify: all of them
        return torch.arange(len(labels))
    chosen, _ = train_test_split(torch.arange(len(labels)).numpy(), train_size=count, stratify=labels.numpy(),
                                 random_state=seed)
    return torch.from_numpy(chosen)


def finetune(classifier: Classifier, x: Tensor, y: Tensor, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=FINETUNE_LR)
    classifier.train()
    batch = min(FINETUNE_BATCH, len(x))
    for _ in range(steps):
        rows = torch.randperm(len(x), generator=generator)[:batch]
        loss = nn.functional.cross_entropy(classifier(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(classifier: Classifier, x: Tensor, y: Tensor) -> float:
    classifier.eval()
    return float((classifier(x).argmax(1) == y).float().mean())


def run_study(data_source: str = "digits", seeds: int = 3, fractions: tuple[float, ...] = (0.01, 0.1, 1.0),
              inits: tuple[str, ...] = INITS, pretrain_epochs: int = 20, finetune_steps: int = 400,
              progress: bool | None = None) -> dict[str, Any]:
    """Every (init, label fraction, BatchNorm) over `seeds` seeds: the test accuracies."""
    from tqdm import tqdm

    unknown = [init for init in inits if init not in INITS]
    if unknown or not inits:
        raise ValueError(f"--inits: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(INITS)}")
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"--label-fractions must each be in (0, 1], got {','.join(map(str, fractions))}")
    # A setting given twice would count its seeds twice (a smaller standard deviation).
    for flag, values in (("--inits", inits), ("--label-fractions", fractions)):
        if len(set(values)) < len(values):
            raise ValueError(f"{flag} names a setting twice: {','.join(map(str, values))}")
    if seeds < 1 or pretrain_epochs < 1 or finetune_steps < 1:
        raise ValueError("--seeds, --pretrain-epochs and --finetune-steps must each be >= 1")
    if "stacked" in inits and pretrain_epochs < 3:
        raise ValueError(f"--pretrain-epochs must be >= 3 with the stacked init (each of its 2 layers alone, then "
                         f"the stack fine-tuned, a third each), got {pretrain_epochs}")
    data = load_dataset(data_source, 0.2, 0)
    if data.train_labels is None:
        raise ValueError(f"{data_source}: the study needs labels (a .npz with arrays x and y, or a .pt dict)")
    n_classes = int(max(data.train_labels.max(), data.val_labels.max())) + 1
    results: dict[tuple[str, float, bool], list[float]] = {}
    start = time.perf_counter()
    with tqdm(total=seeds * len(inits), desc="pretrain + fine-tune", unit="init", leave=False,
              disable=None if progress is None else not progress) as bar:
        for seed in range(seeds):
            for init in inits:
                layers = pretrain(init, data, pretrain_epochs, seed)
                for fraction in fractions:
                    rows = labelled_rows(data.train_labels, fraction, seed)
                    for batchnorm in (False, True):
                        torch.manual_seed(seed)
                        classifier = Classifier(data.train.shape[1], n_classes, init in RELU_INITS, batchnorm, layers)
                        finetune(classifier, data.train[rows], data.train_labels[rows], finetune_steps, seed)
                        results.setdefault((init, fraction, batchnorm), []).append(
                            accuracy(classifier, data.val, data.val_labels))
                bar.update(1)
    rows = [{"init": init, "label_fraction": fraction, "batchnorm": batchnorm,
             "labelled_rows": len(labelled_rows(data.train_labels, fraction, 0)),
             "mean": _mean(values), "std": _std(values), "accuracies": values}
            for (init, fraction, batchnorm), values in results.items()]
    return {"data": data.name, "train_rows": len(data.train), "test_rows": len(data.val), "seeds": seeds,
            "pretrain_epochs": pretrain_epochs, "finetune_steps": finetune_steps, "hidden": list(HIDDEN),
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "results": rows}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    """The sample standard deviation (0 for a single seed)."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(study: dict[str, Any]) -> str:
    fractions = sorted({r["label_fraction"] for r in study["results"]})
    inits = list(dict.fromkeys(r["init"] for r in study["results"]))
    by_key = {(r["init"], r["label_fraction"], r["batchnorm"]): r for r in study["results"]}
    labelled = {r["label_fraction"]: r["labelled_rows"] for r in study["results"]}
    columns = [(f, bn) for bn in (False, True) for f in fractions]
    header = "| init | " + " | ".join(f"{labelled[f]} labels{' + BN' if bn else ''}" for f, bn in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for init in inits:
        cells = [by_key[(init, f, bn)] for f, bn in columns]
        lines.append(f"| {init} | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
    lines += ["", f"Test accuracy, mean ± standard deviation over {study['seeds']} seeds; {study['data']}: "
              f"{study['train_rows']} training rows (all used, unlabelled, for pretraining; the label fractions "
              f"{', '.join(f'{f:g}' for f in fractions)} of them, stratified, for the classifier), "
              f"{study['test_rows']} test rows. Classifier D -> {' -> '.join(map(str, study['hidden']))} -> classes, "
              f"{study['finetune_steps']} Adam steps (lr {FINETUNE_LR:g}, batch {FINETUNE_BATCH}); autoencoders "
              f"pretrained {study['pretrain_epochs']} epochs. BN: BatchNorm before each hidden activation. "
              f"{study['seconds']:.0f} s, torch {study['torch']}, {study['threads']} thread(s)."]
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["label_fraction"] for r in study["results"]})
    inits = list(dict.fromkeys(r["init"] for r in study["results"]))
    by_key = {(r["init"], r["label_fraction"], r["batchnorm"]): r for r in study["results"]}
    labelled = [by_key[(inits[0], f, False)]["labelled_rows"] for f in fractions]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, batchnorm in zip(axes, (False, True)):
        for i, init in enumerate(inits):
            cells = [by_key[(init, f, batchnorm)] for f in fractions]
            axis.errorbar(labelled, [c["mean"] for c in cells], yerr=[c["std"] for c in cells], marker="o",
                          capsize=3, label=init, linestyle="--" if init.startswith("random") else "-",
                          color="black" if init.startswith("random") else f"C{i}",
                          alpha=0.6 if init == "random-relu" else 1.0)
        axis.set_xscale("log")
        axis.set_xlabel("labelled training rows")
        axis.set_title("with BatchNorm" if batchnorm else "without BatchNorm", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Does autoencoder pretraining help? {study['data']}, {study['seeds']} seeds", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(study: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "study.png"]
    paths[0].write_text(json.dumps(study, indent=2) + "\n")
    paths[1].write_text(markdown(study))
    plot(study, paths[2])
    return paths
