"""group=: with torch.distributed, rho_hat is the mean over the global batch.

Two gloo processes on CPU, with uneven local batches, must give the penalty one
process gives on the concatenated batch; each rank's gradient is world_size times
the single-process gradient of its rows (the backward sums over ranks, as
SyncBatchNorm does, so DDP's averaging yields exactly the single-process step)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aefast as ae

ROWS = (5, 8)  # uneven on purpose
RHO, BETA = 0.1, 2.0

PENALTIES = {
    "kl_sparsity": lambda x, group: ae.kl_sparsity(x, RHO, BETA, group=group),
    "sigmoid_kl_sparsity": lambda x, group: ae.sigmoid_kl_sparsity(x, RHO, BETA, group=group)[1],
    "KLSparsity(momentum)": lambda x, group: ae.nn.KLSparsity(RHO, BETA, 0.3, group=group)(x),
}


def full_batch():
    g = torch.Generator().manual_seed(123)
    return torch.rand(sum(ROWS), 7, generator=g, dtype=torch.float64) * 0.9 + 0.05


def local_rows(rank):
    start = sum(ROWS[:rank])
    return slice(start, start + ROWS[rank])


def penalties_and_grads(a, group):
    results = {}
    for name, fn in PENALTIES.items():
        x = a.detach().clone().requires_grad_(True)
        value = fn(x, group)
        (grad,) = torch.autograd.grad(value, x)
        results[name] = (value.detach(), grad)
    return results


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = penalties_and_grads(full_batch()[local_rows(rank)], dist.group.WORLD)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    world = len(ROWS)
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    single = penalties_and_grads(full_batch(), None)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for name, (value, grad) in got.items():
            want_value, want_grad = single[name]
            torch.testing.assert_close(value, want_value, msg=f"{name}, rank {rank}")
            want = world * want_grad[local_rows(rank)]
            torch.testing.assert_close(grad, want, msg=f"{name} gradient, rank {rank}")


def test_group_without_initialised_distributed():
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        ae.kl_sparsity(torch.rand(3, 2), 0.1, group=object())
