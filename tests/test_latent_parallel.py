"""Latent-parallel TopKSAE (aefast.models.topk_sae_sharded, `--shard-latents N`): the
latents split over ranks, exact against one process, forward and gradients, alone and
in a 2-D grid with data parallelism; checkpoints move between the modes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aefast.models import TopKSAE
from aefast.models.topk_sae_sharded import LatentShardedTopKSAE
from launch import DIGITS, MODEL_ARGS, assert_same_weights, one_process, one_rank_run, torchrun

D, L, K, K_AUX = 12, 40, 5, 6


def _models(world: int, rank: int | None = None):
    """The whole model and rank's (or every rank's) shard, from the same seed."""
    torch.manual_seed(7)
    whole = TopKSAE(D, L, K, K_AUX, dead_steps=2).double()
    ranks = range(world) if rank is None else [rank]
    shards = []
    for r in ranks:
        torch.manual_seed(7)
        shards.append(LatentShardedTopKSAE(D, L, K, K_AUX, dead_steps=2, rank=r, world=world).double())
    return whole, shards


def test_each_shard_holds_its_rows_of_the_whole_model_and_a_quarter_of_its_parameters():
    whole, shards = _models(4)
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    for rank, shard in enumerate(shards):
        rows = slice(rank * L // 4, (rank + 1) * L // 4)
        for name in ("encoder_weight", "decoder_weight", "encoder_bias"):
            assert torch.equal(getattr(shard, name), getattr(whole, name)[rows]), name
        shard_bytes = sum(p.numel() * p.element_size() for p in shard.parameters())
        replicated = whole.pre_bias.numel() * whole.pre_bias.element_size()
        assert shard_bytes - replicated == (whole_bytes - replicated) // 4


def test_bad_shard_sizes_are_refused():
    with pytest.raises(ValueError, match="--n-latents 40 must be a multiple of the 3 processes"):
        LatentShardedTopKSAE(D, 40, K, rank=0, world=3)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\] \(the latents each process holds\), got 12"):
        LatentShardedTopKSAE(D, 40, 12, rank=0, world=4)


def _forward_and_gradients(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _, (shard,) = _models(world, rank)
    shard.latent_group = dist.group.WORLD
    # some latents dead, on one rank only: the AuxK exchange must prefer them to the
    # other rank's live fillers
    shard.steps_since_fired.fill_(5 if rank == 0 else 0)
    shard.steps_since_fired[1:] = 0
    x = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    terms = shard.loss(x)
    terms["loss"].backward()
    shard.after_step()  # counts the step (and renormalises the decoder: the gradients stay)
    torch.save({"terms": {n: v.detach() for n, v in terms.items()},
                "grads": {n: p.grad for n, p in shard.named_parameters()},
                "fired": shard.steps_since_fired.clone()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # gloo's teardown has aborted a finished rank before (tests/test_distributed.py)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_forward_and_gradients_equal_one_process(tmp_path, world):
    mp.spawn(_forward_and_gradients, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    whole, _ = _models(world)
    whole.steps_since_fired.zero_()
    whole.steps_since_fired[0] = 5  # rank 0's first latent: the one dead latent
    whole.train()
    x = torch.randn(9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    terms = whole.loss(x)
    terms["loss"].backward()
    whole.after_step()
    assert float(terms["auxk"]) > 0  # the AuxK path ran
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * L // world, (rank + 1) * L // world)
        for name, value in terms.items():
            torch.testing.assert_close(got["terms"][name], value.detach(), msg=f"{name}, rank {rank}")
        for name, p in whole.named_parameters():
            want = p.grad if name == "pre_bias" else p.grad[rows]
            torch.testing.assert_close(got["grads"][name], want, msg=f"grad {name}, rank {rank}")
        torch.testing.assert_close(got["fired"], whole.steps_since_fired[rows], msg=f"dead counters, rank {rank}")


ARGS = ["topk-sae", *DIGITS, *MODEL_ARGS["topk-sae"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc, shards", [(2, 2), (4, 2)])  # latent-parallel; a 2 x 2 grid with data parallelism
def test_latent_parallel_training_equals_one_process(tmp_path, nproc, shards):
    run = torchrun(nproc, [*ARGS, "--epochs", "2", "--shard-latents", str(shards), "--out", str(tmp_path / "split")])
    assert run.returncode == 0, run.stderr
    assert f"{nproc // shards} data-parallel replicas of {shards} latent shards" in run.stdout
    one_process([*ARGS, "--epochs", "2", "--out", str(tmp_path / "one")])
    assert_same_weights(tmp_path / "split", tmp_path / "one")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoints_move_between_latent_parallel_and_one_process(tmp_path):
    out = ["--out", str(tmp_path / "moved")]
    first = torchrun(2, [*ARGS, "--epochs", "1", "--shard-latents", "2", *out])
    assert first.returncode == 0, first.stderr
    one_process([*ARGS, "--epochs", "2", "--shard-latents", "0", "--resume", *out])
    third = torchrun(2, [*ARGS, "--epochs", "3", "--shard-latents", "2", "--resume", *out])
    assert third.returncode == 0, third.stderr
    one_process([*ARGS, "--epochs", "3", "--out", str(tmp_path / "one")])
    assert_same_weights(tmp_path / "moved", tmp_path / "one")


def test_shard_latents_without_torchrun_or_for_another_model_is_refused(tmp_path, capsys):
    from aefast.cli import main

    assert main(["train", *ARGS, "--epochs", "1", "--shard-latents", "2", "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "--shard-latents 2 splits the latents over processes: start the run with torchrun" in error
    assert "give --shard-latents 0 to train on one process" in error
    code, error = one_rank_run(tmp_path, ["sparse", *DIGITS, "--epochs", "1", "--shard-latents", "1",
                                           "--out", str(tmp_path / "b")])
    assert code == 2 and "--shard-latents splits a top-k SAE's latents over the processes; not sparse" in error
