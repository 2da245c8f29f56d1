"""Data-parallel training (aefast.train.distributed): N gloo processes on the CPU train
as one process on the concatenated batch, checkpoints move between world sizes, and a
process that dies or stalls ends the others with an error naming the rank and step.

Each test starts real processes: torchrun for the launcher users run, or the same
environment variables set by hand where the test must kill one rank."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch import (
    DIGITS,
    MODEL_ARGS,
    assert_same_weights,
    one_process,
    one_rank_run,
    start_ranks,
    torchrun,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

@pytest.mark.parametrize("model", MODEL_ARGS)
def test_two_processes_train_as_one_process_on_the_concatenated_batch(tmp_path, model):
    # topk-sae with gradient accumulation: the processes average the gradients once a step
    accumulate = ["--grad-accum", "2"] if model == "topk-sae" else []
    args = [model, *DIGITS, *MODEL_ARGS[model], "--epochs", "2", *accumulate]
    two = torchrun(2, [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    assert "2 processes, data-parallel" in two.stdout
    assert two.stdout.count("evaluation:") == 1  # rank 0 alone evaluates and prints
    one_process([*args, "--out", str(tmp_path / "one")])
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    got, want = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                 for run in ("two", "one"))
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):  # the metrics are the global batch's, not rank 0's
        for part in ("train", "val"):
            assert a[part].keys() == b[part].keys()
            for name in a[part]:
                assert a[part][name] == pytest.approx(b[part][name], rel=1e-4, abs=1e-6), (part, name)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_world_size(tmp_path, first, second):
    args = ["topk-sae", *DIGITS, *MODEL_ARGS["topk-sae"]]

    def train(nproc: int, out: str, *more: str) -> None:
        if nproc == 1:
            one_process([*args, "--out", str(tmp_path / out), *more])
        else:
            result = torchrun(nproc, [*args, "--out", str(tmp_path / out), *more])
            assert result.returncode == 0, result.stderr

    train(first, "resumed", "--epochs", "1")
    train(second, "resumed", "--epochs", "2", "--resume")
    train(1, "uninterrupted", "--epochs", "2")
    assert_same_weights(tmp_path / "resumed", tmp_path / "uninterrupted")


def _wait_for_epochs(metrics: Path, epochs: int, ranks: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs:
            return
        assert all(rank.poll() is None for rank in ranks), "a rank ended before training got going"
        time.sleep(0.2)
    raise AssertionError("training did not get going")


@pytest.mark.parametrize("fault, mode", [("killed", []), ("stalled", []), ("stalled", ["--shard-latents", "2"])],
                         ids=["killed", "stalled", "stalled-latent-parallel"])
def test_a_rank_that_dies_or_stalls_ends_the_others_within_the_timeout(tmp_path, fault, mode):
    timeout = 10
    ranks = start_ranks(tmp_path, 2, ["topk-sae", *DIGITS, *MODEL_ARGS["topk-sae"], "--epochs", "10000",
                                      "--timeout", str(timeout), *mode, "--out", str(tmp_path / "run")])
    try:
        _wait_for_epochs(tmp_path / "run" / "metrics.jsonl", 2, ranks)
        ranks[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        code = ranks[0].wait(timeout=timeout + 60)
        waited = time.monotonic() - start
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    error = (tmp_path / "rank0.err").read_text()
    assert code != 0, error
    assert waited < timeout + 30, f"rank 0 took {waited:.1f} s to notice"
    assert "aefast: error: rank 0 of 2, epoch " in error, error
    assert ", step " in error or ", after its last step (validation, checkpoint)" in error, error  # where it was
    assert "another process died or stalled for more than --timeout 10 s" in error
    # what was checkpointed before the fault is intact and resumable
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] >= 2


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step_and_resumes_on_one_process(tmp_path):
    """SIGTERM to rank 1 alone: the per-step agreement stops both ranks after the same
    step, with one checkpoint (mid-epoch when it lands there); one process resumes it
    and ends where an uninterrupted one-process run ends."""
    args = ["topk-sae", *DIGITS, *MODEL_ARGS["topk-sae"], "--epochs", "4"]
    ranks = start_ranks(tmp_path, 2, [*args, "--out", str(tmp_path / "stopped")])
    try:
        _wait_for_epochs(tmp_path / "stopped" / "metrics.jsonl", 1, ranks)
        ranks[1].send_signal(signal.SIGTERM)
        codes = [rank.wait(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert codes == [130, 130], (tmp_path / "rank0.err").read_text()
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert 1 <= saved["epoch"] < 4
    one_process([*args, "--resume", "--out", str(tmp_path / "stopped")])
    one_process([*args, "--out", str(tmp_path / "uninterrupted")])
    assert_same_weights(tmp_path / "stopped", tmp_path / "uninterrupted")


def test_a_model_that_trains_on_one_process_only_says_so(tmp_path):
    code, error = one_rank_run(tmp_path, ["aae", *DIGITS, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "aae trains on one process only" in error and "start it without torchrun" in error


def test_batches_too_small_to_give_every_rank_a_row_are_refused_before_training(tmp_path):
    from aefast.train.distributed import Cluster

    cluster = Cluster(rank=0, world=4, local_rank=0, device=torch.device("cpu"), timeout_s=60)
    cluster.check_batches(rows=1438, batch_size=61)  # last batch: 35 rows
    with pytest.raises(ValueError, match="--batch-size 3 .* over 4 data-parallel processes: .*each batch"):
        cluster.check_batches(rows=1438, batch_size=3)
    with pytest.raises(ValueError, match="--batch-size 718 .* the last batch of the 1438 training rows has 2"):
        cluster.check_batches(rows=1438, batch_size=718)
    # latent-parallel: 8 processes as 4 replicas of 2 shards, each replica its share of a batch
    sharded = Cluster(rank=0, world=8, local_rank=0, device=torch.device("cpu"), timeout_s=60, shards=2)
    with pytest.raises(ValueError, match="--batch-size 718 .* over 4 data-parallel processes: .* has 2"):
        sharded.check_batches(rows=1438, batch_size=718)


def test_a_gpu_index_under_torchrun_is_refused(tmp_path):
    code, error = one_rank_run(tmp_path, ["ae", *DIGITS[:-1], "cuda:1", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert code == 2 and "--device cuda:1: under torchrun each process takes the GPU of its LOCAL_RANK" in error


def test_shares_of_a_batch_are_contiguous_and_cover_it_once():
    from aefast.train.distributed import Cluster

    batch = torch.arange(35)
    for world in (1, 2, 3, 4, 7):
        shares = [Cluster(rank, world, rank, torch.device("cpu"), 60).share(batch) for rank in range(world)]
        assert torch.equal(torch.cat(shares), batch)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
