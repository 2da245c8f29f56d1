"""Starting aefast in several processes for the tests: torchrun as users run it, or
the same environment variables set by hand where a test needs each rank's pid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

# digits: 1438 training rows; a global batch of 61 splits 30/31 and the last batch
# (35 rows) 17/18: unequal shares, every one of them
DIGITS = ["--data", "digits", "--batch-size", "61", "--no-amp", "--device", "cpu"]
MODEL_ARGS = {
    "sparse": ["--hidden", "48"],
    "wta": ["--hidden", "64", "--rate", "0.1"],
    "topk-sae": ["--n-latents", "48", "--k", "4", "--k-aux", "8", "--dead-steps", "3"],
    "batchtopk-sae": ["--n-latents", "48", "--k", "4", "--k-aux", "8", "--dead-steps", "3"],
}


def environment() -> dict[str, str]:
    # One thread per process: two processes on a 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def one_process(args: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "aefast", "train", *args], env=environment(),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "aefast", "train", *args],
                          env=environment(), capture_output=True, text=True, timeout=240)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for name in a:
        # float32 sums in another order over a few dozen Adam steps (5e-7 measured)
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=5e-6, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(tmp_path: Path, world: int, args: list[str]) -> list[subprocess.Popen]:
    """The processes torchrun would start, by hand: the test needs their pids."""
    port = free_port()
    ranks = []
    for rank in range(world):
        env = {**environment(), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(tmp_path / f"rank{rank}.err", "w") as stderr:  # the child holds its own copy
            ranks.append(subprocess.Popen([sys.executable, "-m", "aefast", "train", *args], env=env, text=True,
                                          stdout=subprocess.DEVNULL, stderr=stderr))
    return ranks


def one_rank_run(tmp_path: Path, args: list[str]) -> tuple[int, str]:
    (rank,) = start_ranks(tmp_path, 1, args)
    rank.wait(timeout=120)
    return rank.returncode, (tmp_path / "rank0.err").read_text()
