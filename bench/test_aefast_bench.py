"""pytest-benchmark cases of every operator (not part of the test run): the cases of
`aefast bench` (aefast/bench/cases.py) at the small size, forward + backward, each
aefast backend and the eager reference.

    pytest bench/test_aefast_bench.py --benchmark-group-by=param:op
"""

import pytest
import torch

import aefast as ae
from aefast.bench.cases import CASES, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def contenders():
    for op, case in sorted(CASES.items()):
        for backend in ae.available_backends(DEVICE):
            # Triton on CPU is its interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
            # when tests/ is collected too): NumPy code, minutes a case, nothing to time.
            if backend in case.kernels and not (backend == "triton" and DEVICE.type == "cpu"):
                yield pytest.param(op, backend, id=f"{op}-{backend}")
        yield pytest.param(op, "eager", id=f"{op}-eager")


@pytest.mark.parametrize(("op", "contender"), contenders())
def test_forward_backward(benchmark, op, contender):
    case = CASES[op]
    inputs = case.inputs("small", torch.float32, DEVICE)

    def timed():
        if contender == "eager":
            run(case, case.reference, inputs, backward=True)
        else:
            with ae.backend(contender):
                run(case, case.aefast, inputs, backward=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    timed()  # warm up
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)
