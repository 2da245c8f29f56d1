"""pytest-benchmark cases of the sparse-KL family (not part of the test run):

    pytest bench/ --benchmark-group-by=param:op

The ratios the issue sets as targets come from bench_kl.py, which times
all contenders alternating in one run; these cases give pytest-benchmark's
statistics per contender."""

import pytest
import torch
from bench_kl import contenders

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS = COLS = 4096
NAMES = list(contenders("kl_sparsity", DEVICE, 8, 8, torch.float32))


@pytest.mark.parametrize("contender", NAMES)
@pytest.mark.parametrize("op", ["sigmoid_kl_sparsity", "kl_sparsity"])
def test_forward_backward(benchmark, op, contender):
    run = contenders(op, DEVICE, ROWS, COLS, torch.float32)[contender]
    run()  # warm up (torch.compile compiles here)

    def timed():
        run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, warmup_rounds=1)
