"""Shared test set-up. Tests are parametrised by device and backend, so the same
suite runs on CUDA where a GPU is present; on a CPU-only machine the Triton kernels
run under Triton's interpreter (TRITON_INTERPRET=1, set before aefast is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import speed_up_interpreter

    speed_up_interpreter()  # same results, several times faster (tests/triton_interpreter.py)

import aefast
from aefast.ops._declare import OPERATORS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (rtol, atol) against a float64 reference, by the dtype the op ran in.
TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    # The slowest checks (every Triton kernel compiled for two GPUs, aefast._C built with
    # AVX-512 emulated) start in the background as soon as their tests are selected:
    # each test module's BACKGROUND, by test name (tests/background.py).
    for item in items:
        run = getattr(getattr(item, "module", None), "BACKGROUND", {}).get(item.name)
        if run is not None:
            run.start()
            config.add_cleanup(run.stop)


def device_backends():
    """(device, backend) pairs for every compiled backend that can run here."""
    return [
        pytest.param(d, b, id=f"{d}-{b}")
        for d in DEVICES
        for b in aefast.available_backends(d)
        if b != "reference"
    ]


def op_backends(op, interpreted_too=True):
    """(device, backend) pairs that can run here and have a kernel for every kernel
    the public op `op` uses, read from its declaration (aefast/ops/<family>.py). With
    interpreted_too=False, not Triton's interpreter: for sizes it would take minutes
    over (the same cases run compiled on a GPU)."""
    return [
        pytest.param(d, b, id=f"{d}-{b}")
        for d in DEVICES
        for b in aefast.available_backends(d)
        if b in OPERATORS[op].kernel_backends and (interpreted_too or not interpreted(d, b))
    ]


def interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def dtypes_for(device, backend):
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    if device == "cuda" and backend == "triton":
        dtypes.remove(torch.float64)  # fp64 is tested on CPU (and with the CUDA C++ kernels)
    return dtypes


def leaf(x):
    """A fresh leaf copy of x that takes a gradient."""
    return x.detach().clone().requires_grad_(True)


def assert_close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * scale
    )


def assert_within_sizes(actual, expected, sizes, dtype):
    """For a result that sums terms of either sign: its error bounded relative to the sum
    of the terms' sizes (`sizes`: the same computation on their absolute values), where
    a bound relative to the result itself fails on cancellation and one scaled by hand
    lets a wrong answer through."""
    rtol, atol = TOLERANCES[dtype]
    error = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = rtol * sizes.double().cpu().abs() + atol
    assert (error <= bound).all(), f"error above its bound by {float((error - bound).max())}"


def assert_kl_gradient_close(grad, expected, dtype):
    """A KL penalty's gradient of (B, H) activations whose unit 0 is dead (rho_hat at the
    clamp, where H > 1): its gradient, beta * rho / eps / B, dwarfs the others (and is
    past float16's range at B = 1: `expected` is cast to dtype), so it is checked relative
    to itself, apart, and the live units at the plain tolerance."""
    expected = expected.to(dtype)
    live = slice(1, None) if grad.shape[1] > 1 else slice(None)
    assert_close(grad[:, live], expected[:, live], dtype)
    if grad.shape[1] > 1:
        torch.testing.assert_close(grad[:, 0].double().cpu(), expected[:, 0].double().cpu(),
                                   rtol=TOLERANCES[dtype][0], atol=0)


def assert_compiled_matches_eager(model, x, parameter, backend):
    """torch.compile(fullgraph=True) traces `model` (no graph break) and gives the
    eager loss and gradient of `parameter` on `backend`."""
    torch._dynamo.reset()
    with aefast.backend(backend):
        eager = model(x)
        (eager_grad,) = torch.autograd.grad(eager, parameter)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (compiled_grad,) = torch.autograd.grad(compiled, parameter)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.fixture
def poisoned():
    """Fill every freshly allocated tensor with NaN, so an output element a kernel
    forgets to write fails the comparison."""
    import torch.utils.deterministic as det

    old_alg, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_alg)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread than on two (thread start-up costs more than
    the work), and on a busy 2-core machine spinning intra-op threads slow them tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
