"""Train every model with its defaults on digits and print the README's Markdown table:

    python -m aefast.train.table [--out runs/table] [--markdown FILE] [--epochs N]

Each model's run lands in OUT/<model> (a complete `aefast train` output folder)."""

from __future__ import annotations

import argparse
import io
import platform
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from aefast.data import load_dataset
from aefast.train.config import MODELS, defaults, pretrained_layers, resolve
from aefast.train.loop import train

# (model, --conv, flags): every model with its defaults, and the variants worth a row.
ROWS = [(name.removesuffix("-conv"), name.endswith("-conv"), {}) for name in MODELS]
ROWS.insert(ROWS.index(("conv", False, {})) + 1, ("conv", False, {"switches": False}))  # the code alone


def _flags(overrides: dict) -> str:
    return "".join(f" --{'' if value else 'no-'}{key.replace('_', '-')}" for key, value in overrides.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aefast.train.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/table", help="folder of the runs (default runs/table)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--epochs", type=int, help="override every model's default epochs (quick checks)")
    args = parser.parse_args(argv)

    lines = ["| command | epochs | train s | val MSE | probe accuracy (codes) | code size |",
             "|---|---:|---:|---:|---:|---:|"]
    raw_probe, notes = None, []
    configs = []  # every row checked as `aefast train` checks it, before any trains
    for model, conv, overrides in ROWS:
        given = {**overrides, **({"conv": True} if conv else {})}
        base = defaults(model, conv)
        if args.epochs is not None:  # a quick check: layer-wise models pretrain a share each layer, then fine-tune
            given["epochs"] = args.epochs
            if "pretrain_epochs" in base:
                given["pretrain_epochs"] = max(1, args.epochs // (pretrained_layers(base) + 1))
        configs.append(resolve(model, given))
    for (model, conv, overrides), config in zip(ROWS, configs):
        command = f"aefast train {model}" + (" --conv" if conv else "") + _flags(overrides)
        folder = command.removeprefix("aefast train ").replace(" --", "-")
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            result = train(config, Path(args.out) / folder, progress=False)
        seconds = time.perf_counter() - start
        raw_probe = result["raw_probe_accuracy"]
        code = str(result["code_size"]) + (f" + {result['side_channel']}" if "side_channel" in result else "")
        lines.append(f"| `{command}` | {config['epochs']} | {seconds:.1f} | {result['val_mse']:.4f} | "
                     f"{result['probe_accuracy']:.3f} | {code} |")
        if "pca_largest_angle" in result:
            notes.append(f"`{command}`: its subspace is {result['pca_largest_angle']:.2f} degrees from PCA's "
                         f"(largest principal angle); PCA with as many components: validation MSE "
                         f"{result['pca_val_mse']:.4f}.")
        print(lines[-1], flush=True)
    lines.append(f"| raw pixels (no model) | | | | {raw_probe:.3f} | 64 |")
    data = load_dataset("digits")
    table = "\n".join(lines) + (f"\n\nDigits ({len(data.train)} train / {len(data.val)} validation rows), seed 0, "
                                f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
                                f"{platform.machine()}; train s: the whole run (training, evaluation, figures)."
                                + "".join(f"\n\n{note}" for note in notes) + "\n")
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
