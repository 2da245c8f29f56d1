"""Scaling of `aefast train` under torchrun: steps/s and memory per process on 1, 2 and
4 processes, data-parallel or latent-parallel.

    python bench/distributed_scaling.py [--mode data|latent] [--procs 1 2 4] [--threads 1]
                                        [--rows 32768] [--width 256] [--latents 4096] [--k 32]
                                        [--batch-size 1024] [--epochs 3] [--out FILE.md]

A strong-scaling run: the same global batch (`--batch-size`) and the same data for
every process count, so each of N processes trains on 1/N of every batch. The data is
a Gaussian (rows, width) float32 `.npy` written once to a temporary folder; the model
a TopKSAE (`--latents`, `--k`). Each process gets `--threads` intra-op threads; the
script says how many cores the machine has, because N processes x threads beyond that
share cores and cannot scale. The first epoch (start-up, allocator warm-up) is left
out: the rate is the median samples/s of the other epochs, as `metrics.jsonl` reports
them (rank 0's wall clock over the global batch's rows), and the memory the largest
peak resident set of any process (CPU) or its allocator's peak (GPU).

Linear scaling: N processes take N times the steps/s of one. The table gives each
count's speed-up over one process and its efficiency (speed-up / N); on a GPU node run
it with `--device cuda` and --procs up to the GPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(procs: int, threads: int, data: Path, out: Path, args) -> tuple[float, float]:
    """Median samples/s of epochs 2.. of one training run on `procs` processes, and the
    peak memory (MiB) of its busiest process."""
    train = ["topk-sae", "--data", str(data), "--n-latents", str(args.latents), "--k", str(args.k),
             "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--device", args.device,
             "--val-fraction", "0.02", "--buffer-mib", "16", "--out", str(out)]
    if args.mode == "latent" and procs > 1:
        train += ["--shard-latents", str(procs)]
    launcher = ([sys.executable, "-m", "aefast", "train"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                 "-m", "aefast", "train"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, *train], check=True, env=env, stdout=subprocess.DEVNULL)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [epoch["samples_per_s"] for epoch in epochs]
    return statistics.median(rates[1:] or rates), max(epoch["peak_memory_mib"] for epoch in epochs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["data", "latent"], default="data")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the table (markdown) and the figures (JSON beside it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "acts.npy"
        np.save(data, np.random.default_rng(0).standard_normal((args.rows, args.width), dtype=np.float32))
        rates, memory = {}, {}
        for procs in args.procs:
            start = time.perf_counter()
            rates[procs], memory[procs] = run(procs, args.threads, data, Path(folder) / f"run{procs}", args)
            print(f"{procs} process(es): {rates[procs]:.0f} rows/s, {memory[procs]:.0f} MiB "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    first = args.procs[0]
    lines = [f"{args.mode}-parallel TopKSAE D={args.width} L={args.latents} k={args.k}, global batch {args.batch_size}, "
             f"{args.rows} rows, {args.device}, {args.threads} thread(s) per process, "
             f"{os.cpu_count()} cores on this machine",
             "", f"| processes | rows/s | steps/s | speed-up over {first} | efficiency | peak MiB per process |",
             "|---:|---:|---:|---:|---:|---:|"]
    for procs, rate in rates.items():
        speedup = rate / rates[first]
        lines.append(f"| {procs} | {rate:.0f} | {rate / args.batch_size:.2f} | {speedup:.2f}x | "
                     f"{speedup / (procs / first):.0%} | {memory[procs]:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"config": vars(args), "cores": os.cpu_count(), "rows_per_s": rates, "peak_mib": memory}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
