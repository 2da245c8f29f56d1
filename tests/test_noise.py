"""The noise-injection family against aefast/reference.py, on every backend."""

import math

import pytest
import torch

import aefast as ae
from aefast import reference
from aefast.ops._declare import kernels
from aefast.ops.noise import KINDS
from conftest import (
    TOLERANCES,
    assert_close,
    assert_compiled_matches_eager,
    dtypes_for,
    leaf,
    op_backends,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LEVELS = {"gaussian": 0.3, "masking": 0.3, "salt_pepper": 0.25, "dropout": 0.4}
BIG_SEED = 0x7EDC_BA98_7654_3210  # both key words non-zero


def interpreter_rounds_down(device, backend, dtype):
    """Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)."""
    return backend == "triton" and device == "cpu" and dtype == torch.bfloat16


def assert_noise_close(actual, expected, dtype):
    """Normals agree to a few float32 ulps (log and cos differ by library)."""
    rtol, atol = TOLERANCES[torch.float32 if dtype == torch.float64 else dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=4 * rtol, atol=4 * atol)


# ------------------------------------------------------------ the generator


def test_reference_philox_matches_the_known_answer():
    # Random123's known-answer test for Philox4x32-10: counter 0, key 0.
    words = reference.philox(0, torch.zeros(1, dtype=torch.long))
    assert [w.item() for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_reference_philox_matches_triton_randint4x_at_large_counters():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def words(index_ptr, out_ptr, seed, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, tl.load(index_ptr + i))
        tl.store(out_ptr + 4 * i, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3], device=device)
    out = torch.empty(4 * len(index), dtype=torch.long, device=device)
    words[(1,)](index, out, BIG_SEED, BLOCK=len(index))
    assert torch.equal(out.view(-1, 4), torch.stack(reference.philox(BIG_SEED, index), 1))


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_uniform_and_normal_distributions(device, backend):
    from scipy import stats

    n = 1 << 18 if backend != "triton" or device == "cuda" else 1 << 16
    zeros = torch.zeros(n, device=device)
    with ae.backend(backend):
        normal = ae.corrupt(zeros, "gaussian", 1.0, seed=7).double().cpu()
        hits = [(ae.corrupt(zeros + 1, "masking", p, seed=11) == 0).double().mean().item()
                for p in (0.05, 0.3, 0.5, 0.9)]
    assert abs(normal.mean()) < 5 / math.sqrt(n) and abs(normal.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(normal.numpy(), "norm").pvalue > 1e-3
    for p, frac in zip((0.05, 0.3, 0.5, 0.9), hits):
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    uniforms = reference.element_draws(zeros.cpu(), 3, normal=False)
    assert stats.kstest(uniforms.double().numpy(), "uniform").pvalue > 1e-3


# ------------------------------------------------------------------ corrupt


SHAPES = [(1,), (1, 1), (37, 129), (3, 5, 7, 11)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_corrupt_matches_reference(device, backend, shape, kind, poisoned):
    for dtype in dtypes_for(device, backend):
        x = leaf(torch.rand(shape, dtype=torch.float64).to(device, dtype))
        with ae.backend(backend):  # low and high not exact in float32: float64 keeps them
            out = ae.corrupt(x, kind, LEVELS[kind], seed=BIG_SEED, low=-0.1, high=2.3)
        want = reference.corrupt(x, kind, LEVELS[kind], BIG_SEED, -0.1, 2.3)
        assert out.dtype == dtype and out.shape == x.shape
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, x, g)
        (want_grad,) = torch.autograd.grad(want, x, g)
        if kind == "gaussian":
            assert_noise_close(out, want, dtype)
            assert torch.equal(grad, g)
        elif interpreter_rounds_down(device, backend, dtype):
            assert torch.equal(out == 0, want == 0) and torch.equal(grad == 0, want_grad == 0)
            assert_close(out, want, dtype)
            assert_close(grad, want_grad, dtype)
        else:  # same uniform bits, same masks: exact
            assert torch.equal(out, want) and torch.equal(grad, want_grad)


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_corrupt_takes_any_strides_and_depends_on_logical_index_only(device, backend):
    x = torch.rand(40, 30, device=device)
    with ae.backend(backend):
        strided = ae.corrupt(x.t(), "masking", 0.5, seed=5)
        dense = ae.corrupt(x.t().contiguous(), "masking", 0.5, seed=5)
        other_seed = ae.corrupt(x.t().contiguous(), "masking", 0.5, seed=6)
    assert torch.equal(strided, dense) and not torch.equal(dense, other_seed)


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_seed_none_follows_torch_manual_seed(device, backend):
    x = torch.rand(64, 33, device=device)
    with ae.backend(backend):
        torch.manual_seed(3)
        first = ae.corrupt(x, "dropout", 0.5)
        second = ae.corrupt(x, "dropout", 0.5)
        torch.manual_seed(3)
        again = ae.corrupt(x, "dropout", 0.5)
    assert torch.equal(first, again) and not torch.equal(first, second)


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_levels_at_the_edges(device, backend):
    x = torch.rand(16, 17, device=device) + 0.5
    with ae.backend(backend):
        assert torch.equal(ae.corrupt(x, "masking", 0.0, seed=1), x)
        assert torch.equal(ae.corrupt(x, "masking", 1.0, seed=1), torch.zeros_like(x))
        assert torch.equal(ae.corrupt(x, "gaussian", 0.0, seed=1), x)
        pepper = ae.corrupt(x, "salt_pepper", 1.0, seed=1, low=-3.0, high=3.0)
    assert set(pepper.unique().tolist()) == {-3.0, 3.0}


# ---------------------------------------------------------- noisy_linear


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("device", "backend"), op_backends("noisy_linear"))
def test_noisy_linear_matches_reference(device, backend, kind, poisoned):
    _check_noisy_linear_against_reference(device, backend, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("device", "backend"), [p for p in op_backends("noisy_linear") if p.values[1] == "triton"])
def test_noisy_linear_with_triton_unfused_matches_reference(device, backend, kind, monkeypatch, poisoned):
    """Triton's corrupt, then PyTorch's matmul: what the triton backend runs at full
    float32 (or float64) precision on a GPU, here on every device and dtype."""
    from aefast.ops import noise

    monkeypatch.setattr(noise, "_fused_noisy_matmul", lambda t: False)
    _check_noisy_linear_against_reference(device, backend, kind)


@pytest.mark.parametrize(("device", "backend"), [p for p in op_backends("noisy_linear") if p.values[1] == "triton"])
def test_triton_noisy_matmul_writes_every_tile_of_its_flat_grid(device, backend, poisoned):
    """The fused matmul's flat grid (column blocks fastest, so that no axis stops at
    65535 blocks): 17 whole row blocks and a partial one by 2 whole column blocks and a
    partial one, for the output and both matmul gradients (the compile check plans the
    sizes past 65535 blocks)."""
    from aefast.triton_kernels import noise as triton_noise

    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the fused kernel's dtypes
    block_m, block_n, _, _ = triton_noise._matmul_tiles(torch.device(device), dtype, triton_noise.dot_precision(dtype))
    rows, features, out_features = 17 * block_m + 5, 2 * block_n + 3, 2 * block_n + 5
    x = leaf(torch.rand(rows, features, dtype=torch.float64).to(device, dtype))
    w = leaf(torch.randn(out_features, features, dtype=torch.float64).to(device, dtype))
    b = leaf(torch.randn(out_features, dtype=torch.float64).to(device, dtype))
    with ae.backend(backend):
        out = ae.noisy_linear(x, w, b, "dropout", LEVELS["dropout"], seed=BIG_SEED)
    assert_noisy_linear_close(out, x, w, b, "dropout", dtype)


def _check_noisy_linear_against_reference(device, backend, kind):
    for dtype in dtypes_for(device, backend):
        for shape, out_features, with_bias in [((37, 70), 11, True), ((1, 1), 1, False), ((2, 3, 33), 65, True)]:
            x = leaf(torch.rand(shape, dtype=torch.float64).to(device, dtype))
            w = leaf(torch.randn(out_features, shape[-1], dtype=torch.float64).to(device, dtype))
            b = leaf(torch.randn(out_features, dtype=torch.float64).to(device, dtype)) if with_bias else None
            with ae.backend(backend):
                out = ae.noisy_linear(x, w, b, kind, LEVELS[kind], seed=BIG_SEED)
            assert_noisy_linear_close(out, x, w, b, kind, dtype)


def assert_noisy_linear_close(out, x, w, b, kind, dtype):
    """`out` and its gradients for a random upstream gradient against the float64
    reference. Each element is a dot product: its rounding error is relative to the sum
    of its terms' sizes (which the corruption's own rounding, the input's in float32
    for gaussian noise, also stays within), not to its value, which may cancel to 0."""
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn(out.shape, dtype=torch.float64).to(out.device, out.dtype)
    got = (out, *torch.autograd.grad(out, inputs, g))
    x64, w64 = x.detach().double().flatten(0, -2), w.detach().double()
    b64 = b.detach().double() if b is not None else None
    g64 = g.double().flatten(0, -2)
    leaves = [leaf(t) for t in (x64, w64, b64) if t is not None]
    want = reference.noisy_linear(leaves[0], leaves[1], leaves[2] if b is not None else None, kind, LEVELS[kind],
                                  BIG_SEED)
    wants = (want, *torch.autograd.grad(want, leaves, g64))
    corrupted = reference.corrupt(x64, kind, LEVELS[kind], BIG_SEED).abs()
    most_scaled = 1 / (1 - LEVELS[kind]) if kind == "dropout" else 1.0
    sizes = [torch.nn.functional.linear(corrupted, w64.abs(), None if b64 is None else b64.abs()),
             g64.abs() @ w64.abs() * most_scaled, g64.abs().T @ corrupted, g64.abs().sum(0)][:len(wants)]
    rtol, atol = TOLERANCES[torch.float32 if dtype == torch.float64 and kind == "gaussian" else dtype]
    for name, a, e, size in zip(("out", "grad x", "grad weight", "grad bias"), got, wants, sizes):
        error = (a.double().cpu().reshape(e.shape) - e.cpu()).abs()
        bound = rtol * size.cpu() + atol
        assert (error <= bound).all(), f"{name} {dtype}: {float((error - bound).max())} past the bound"


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_window_is_the_window_of_the_whole_corrupted_matrix(kind, poisoned):
    """The CPU noisy_linear's building block: any window, odd offsets, strided rows."""
    window = kernels("cpp").corrupt_window
    seed = torch.tensor(BIG_SEED)
    for dtype in DTYPES:
        whole = torch.rand(23, 301, dtype=torch.float64).to(dtype)
        want = reference.corrupt(whole, kind, LEVELS[kind], seed, -0.1, 2.3)
        for rows, cols in [(slice(0, 23), slice(0, 301)), (slice(5, 6), slice(0, 301)), (slice(3, 20), slice(7, 263)),
                           (slice(22, 23), slice(300, 301)), (slice(1, 9), slice(0, 1))]:
            got = window(whole[rows, cols], rows.start, cols.start, 301, kind, LEVELS[kind], seed, -0.1, 2.3)
            assert got.is_contiguous() and got.dtype == dtype
            if kind == "gaussian":
                assert_noise_close(got, want[rows, cols], dtype)
            else:
                assert torch.equal(got, want[rows, cols])
    x = torch.rand(9, 13)
    torch.library.opcheck(window, (x, 4, 20, 40, kind, LEVELS[kind], seed, 0.0, 1.0))
    torch.library.opcheck(window, (x.t(), 0, 3, 12, kind, LEVELS[kind], seed, 0.0, 1.0))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gaussian"])
def test_corrupt_window_and_mask_draws_once_for_x_and_its_gradient(kind, poisoned):
    """corrupt_window of x, and the same window's gradient masked in place as corrupt's
    gradient masks it: the reference's mask of the whole matrix, for whole rows (one
    range) and for column windows and row-strided gradients (row by row)."""
    both, window = kernels("cpp").corrupt_window_and_mask, kernels("cpp").corrupt_window
    seed = torch.tensor(BIG_SEED)
    for dtype in DTYPES:
        whole = torch.rand(23, 301, dtype=torch.float64).to(dtype)
        grad = torch.randn(23, 301, dtype=torch.float64).to(dtype)
        want = reference.corrupt(whole, kind, LEVELS[kind], seed, -0.1, 2.3)
        want_grad = torch.autograd.functional.vjp(
            lambda t: reference.corrupt(t, kind, LEVELS[kind], seed, -0.1, 2.3), whole.double(), grad.double())[1]
        for rows, cols in [(slice(0, 23), slice(0, 301)), (slice(5, 6), slice(0, 301)), (slice(3, 20), slice(7, 263)),
                           (slice(22, 23), slice(300, 301))]:
            for padded in (grad.clone(), torch.nn.functional.pad(grad, (0, 5)).clone()):  # rows of 301 and 306
                got_grad = padded[rows, cols]
                # the bits of the gradient's mask as corrupt_window draws it alone (low = high = 0)
                alone = window(got_grad, rows.start, cols.start, 301, kind, LEVELS[kind], seed, 0.0, 0.0)
                got = both(whole[rows, cols], got_grad, rows.start, cols.start, 301, kind, LEVELS[kind], seed, -0.1,
                           2.3)
                assert got.dtype == got_grad.dtype == dtype
                assert torch.equal(got, want[rows, cols])
                assert torch.equal(got_grad, alone)
                assert_close(got_grad, want_grad[rows, cols], dtype)
    x = torch.rand(9, 13)
    torch.library.opcheck(both, (x, torch.randn(9, 13), 4, 20, 40, kind, LEVELS[kind], seed, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"grad must be a window of x's shape \[9, 13\]"):
        both(x, torch.randn(9, 12), 0, 0, 13, kind, 0.3, seed, 0.0, 1.0)
    with pytest.raises(ValueError, match="with rows of unit stride"):
        both(x, torch.randn(13, 9).t(), 0, 0, 13, kind, 0.3, seed, 0.0, 1.0)
    with pytest.raises(ValueError, match="gradient of gaussian noise is the identity"):
        both(x, torch.randn(9, 13), 0, 0, 13, "gaussian", 0.3, seed, 0.0, 1.0)


@pytest.mark.parametrize("create_graph", [False, True])
def test_cpu_noisy_linear_backward_draws_once_for_both_gradients(create_graph, monkeypatch):
    """The CPU backward draws each window's noise once for grad x and grad W (three
    windows here), not once per gradient; where the gradients are differentiated again
    (create_graph) it keeps the differentiable kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from aefast.ops import noise

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(noise, "WINDOW_ELEMENTS", 700)  # windows of 70, 70 and 60 rows of 10
    x, w, b = leaf(torch.rand(200, 10)), leaf(torch.randn(5, 10)), leaf(torch.randn(5))
    g = torch.randn(200, 5)
    with ae.backend("cpp"):
        out = ae.noisy_linear(x, w, b, "dropout", 0.4, seed=BIG_SEED)
        calls = Calls()
        with calls:
            grads = torch.autograd.grad(out, (x, w, b), g, create_graph=create_graph)
    want = torch.autograd.grad(reference.noisy_linear(x, w, b, "dropout", 0.4, BIG_SEED), (x, w, b), g)
    for got, expected in zip(grads, want):
        assert_close(got, expected, torch.float32, scale=40)
    drawn = [n for n in calls.names if n.startswith("corrupt_window") or n.startswith("noisy_linear_grad")]
    assert drawn == (["noisy_linear_grad_input", "noisy_linear_grad_weight"] if create_graph
                     else ["corrupt_window_and_mask"] * 3), drawn


def test_outputs_of_32_mib_and_more_are_streamed_to_the_same_results(poisoned):
    """The CPU kernels write float32 outputs of 32 MiB and more around the caches
    (noise.cpp, write_block): the same bits as windows below that size, written in place,
    and every element written (the last block is not whole lines: written in place)."""
    window, seed = kernels("cpp").corrupt_window, torch.tensor(BIG_SEED)
    x = torch.rand(2049, 4097)  # 33.6 MB
    with ae.backend("cpp"):
        for kind in KINDS:
            whole = ae.corrupt(x, kind, LEVELS[kind], seed=BIG_SEED, low=-0.1, high=2.3)
            parts = [window(x[rows], rows.start, 0, 4097, kind, LEVELS[kind], seed, -0.1, 2.3)
                     for rows in (slice(0, 1000), slice(1000, 2049))]
            assert torch.equal(whole, torch.cat(parts)), kind
        mu, logvar = leaf(torch.randn(2049, 4097)), leaf(torch.randn(2049, 4097) * 0.5)
        z, kl = ae.reparameterize(mu, logvar, seed=BIG_SEED)
    want_z, want_kl = reference.reparameterize(mu, logvar, BIG_SEED)
    gz, gkl = torch.randn_like(z), torch.randn(())
    grads = torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    want_grads = torch.autograd.grad((want_z, want_kl), (mu, logvar), (gz, gkl))
    for got, expected in zip((z, kl, *grads), (want_z, want_kl, *want_grads)):
        assert_noise_close(got, expected, torch.float32)


def test_corrupt_window_refuses_a_window_outside_its_rows():
    window, seed = kernels("cpp").corrupt_window, torch.tensor(1)
    with pytest.raises(ValueError, match="must lie in rows of row_length 10"):
        window(torch.rand(3, 4), 0, 7, 10, "masking", 0.3, seed, 0.0, 1.0)
    with pytest.raises(ValueError, match="must lie in rows"):
        window(torch.rand(3, 4), -1, 0, 10, "masking", 0.3, seed, 0.0, 1.0)
    with pytest.raises(ValueError, match="2-D window"):
        window(torch.rand(3), 0, 0, 10, "masking", 0.3, seed, 0.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_noisy_linear_on_cpu_in_many_windows_matches_reference(kind, monkeypatch, poisoned):
    """Windows of a few rows forward and backward (and of a few columns for the
    weight's gradient, summed over row windows for tall x), their edges inside
    Philox's blocks of 256 elements."""
    from aefast.ops import noise

    monkeypatch.setattr(noise, "WINDOW_ELEMENTS", 1000)
    monkeypatch.setattr(noise, "MIN_WINDOW_COLUMNS", 64)  # tall x: windows of 64 columns and 15 rows, summed
    for dtype in DTYPES:
        for rows, cols, out_features, with_bias in [(37, 301, 11, True), (64, 512, 5, False), (5, 1003, 3, True),
                                                    (130, 200, 4, True)]:
            x = leaf(torch.rand(rows, cols, dtype=torch.float64).to(dtype))
            w = leaf(torch.randn(out_features, cols, dtype=torch.float64).to(dtype))
            b = leaf(torch.randn(out_features, dtype=torch.float64).to(dtype)) if with_bias else None
            with ae.backend("cpp"):
                out = ae.noisy_linear(x, w, b, kind, LEVELS[kind], seed=BIG_SEED)
            assert_noisy_linear_close(out, x, w, b, kind, dtype)


@pytest.mark.parametrize(("device", "backend"), op_backends("noisy_linear"))
def test_noisy_linear_saves_no_corrupted_input(device, backend):
    x = leaf(torch.rand(64, 48, device=device))
    w = leaf(torch.randn(16, 48, device=device))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def corrupted_copies():
        return [t for t in saved if t.shape == x.shape and t.data_ptr() != x.data_ptr()]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference.noisy_linear(x, w, None, "masking", 0.5, 1).sum()
        assert corrupted_copies(), "the eager composite saves corrupt(x): the check can fail"
        saved.clear()
        with ae.backend(backend):
            ae.noisy_linear(x, w, None, "masking", 0.5, seed=1).sum()
    assert saved and not corrupted_copies()


# --------------------------------------------------------- reparameterize


@pytest.mark.parametrize("shape", [(1, 1), (33, 17), (4, 1000)], ids=str)
@pytest.mark.parametrize(("device", "backend"), op_backends("reparameterize"))
def test_reparameterize_matches_reference(device, backend, shape, poisoned):
    for dtype in dtypes_for(device, backend):
        mu = leaf(torch.randn(shape, dtype=torch.float64).to(device, dtype))
        logvar = leaf(torch.randn(shape, dtype=torch.float64).to(device, dtype))
        with ae.backend(backend):
            z, kl = ae.reparameterize(mu, logvar, seed=BIG_SEED)
        want_z, want_kl = reference.reparameterize(mu, logvar, BIG_SEED)
        assert z.dtype == kl.dtype == dtype and kl.dim() == 0
        gz, gkl = torch.randn_like(z), torch.randn((), dtype=dtype, device=device)
        grads = torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
        want_grads = torch.autograd.grad((want_z, want_kl), (mu, logvar), (gz, gkl))
        for got, expected in zip((z, kl, *grads), (want_z, want_kl, *want_grads)):
            assert_noise_close(got, expected, dtype)


def test_reparameterize_on_cpu_is_the_same_on_any_thread_count():
    """The CPU kernels split 256-element blocks among threads (64 blocks a grain) and sum
    the KL terms per block: z, kl and both gradients bit for bit alike on 1 and 2
    threads, at 250 blocks with a partial last one."""
    mu, logvar = torch.randn(61, 1049), torch.randn(61, 1049) * 0.5
    gz, gkl = torch.randn(61, 1049), torch.randn(())
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m, lv = leaf(mu), leaf(logvar)
            with ae.backend("cpp"):
                z, kl = ae.reparameterize(m, lv, seed=BIG_SEED)
            runs.append((z, kl, *torch.autograd.grad((z, kl), (m, lv), (gz, gkl))))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


_REPARAMETERIZE_RUN = """
import sys, torch, aefast as ae
torch.manual_seed(5)
results = []
for shape in [(61, 1049), (3, 7), (1, 1), (5, 33), (2, 4096)]:
    mu, logvar = torch.randn(shape).requires_grad_(), (torch.randn(shape) * 3).requires_grad_()
    with ae.backend("cpp"):
        z, kl = ae.reparameterize(mu, logvar, seed=int(sys.argv[2]))
    results.append((z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (torch.randn(shape), torch.tensor(0.7)))))
torch.save([[t.detach() for t in r] for r in results], sys.argv[1])
"""


def test_reparameterize_on_cpu_is_the_same_in_every_vector_path(tmp_path):
    """float32 takes register kernels with AVX-512 or AVX2 (two running sums standing for
    AVX-512's 16 lanes): z, kl and both gradients bit for bit alike, tails included. Here
    with the widest the CPU has against AEFAST_SIMD=avx2 (on a CPU without AVX-512, AVX2
    against itself, and the AVX-512 path emulated against AVX2 when
    test_every_simd_path_gives_the_same_selection runs this with its emulated build)."""
    import os
    import subprocess
    import sys

    runs = []
    for level in ("avx512", "avx2"):
        out = tmp_path / f"{level}.pt"
        subprocess.run([sys.executable, "-c", _REPARAMETERIZE_RUN, str(out), str(BIG_SEED)], check=True, timeout=300,
                       env=dict(os.environ, AEFAST_SIMD=level, OMP_NUM_THREADS="2"))
        runs.append(torch.load(out, weights_only=True))
    for wide, narrow in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(wide, narrow))


def test_reparameterize_on_cpu_keeps_nan_where_it_is():
    """A NaN logvar gives NaN at its element (and in kl) and changes no other element."""
    mu, logvar = torch.randn(9, 301), torch.randn(9, 301)
    with ae.backend("cpp"):
        clean, _ = ae.reparameterize(mu, logvar, seed=BIG_SEED)
        logvar[4, 17] = float("nan")
        z, kl = ae.reparameterize(mu, logvar, seed=BIG_SEED)
    assert torch.isnan(z[4, 17]) and torch.isnan(kl)
    z[4, 17] = clean[4, 17]
    assert torch.equal(z, clean)


# ------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_gradcheck_float64(device, backend):
    x = torch.rand(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    mu, logvar = (torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    # Under the interpreter every launch costs ~0.1 s: there, the fast (vJu) check.
    fast = backend == "triton" and device == "cpu"
    with ae.backend(backend):
        for kind in KINDS:
            assert torch.autograd.gradcheck(lambda t, k=kind: ae.corrupt(t, k, LEVELS[k], seed=9), (x,),
                                            fast_mode=fast)
            assert torch.autograd.gradcheck(
                lambda t, u, v, k=kind: ae.noisy_linear(t, u, v, k, LEVELS[k], seed=9), (x, w, b), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda m, v: ae.reparameterize(m, v, seed=9), (mu, logvar),
                                        fast_mode=fast)


@pytest.mark.parametrize(("device", "backend"), op_backends("noisy_linear"))
def test_noisy_linear_differentiates_twice(device, backend):
    """Both backward kernels have derivatives (matmuls with the corruption's mask), every
    kind: float64 gradgradcheck, and a gradient penalty as the reference's."""
    x = torch.rand(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    for kind in KINDS:
        def layer(x, w, b, kind=kind):
            return ae.noisy_linear(x, w, b, kind, LEVELS[kind], seed=4, low=-1.0, high=2.0)

        with ae.backend(backend):
            assert torch.autograd.gradgradcheck(layer, (x, w, b), fast_mode=backend == "triton" and device == "cpu")

        def penalty_gradients(backend):
            with ae.backend(backend):
                grads = torch.autograd.grad(layer(x, w, b).square().sum(), (x, w), create_graph=True)
                return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, w, b))

        # (gaussian: the kernels' normals agree with the reference's to float32's precision)
        for got, want in zip(penalty_gradients(backend), penalty_gradients("reference")):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=kind)


@pytest.mark.parametrize(("device", "backend"), op_backends("reparameterize"))
def test_reparameterize_differentiates_twice(device, backend):
    """The backward kernel's derivative (eps from the kernel's own forward at 0, 0):
    float64 gradgradcheck, and a gradient penalty as the reference's (whose normals
    agree with the kernels' to float32's precision)."""
    mu = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    logvar = (0.3 * torch.randn(4, 5, dtype=torch.float64, device=device)).requires_grad_()
    with ae.backend(backend):
        assert torch.autograd.gradgradcheck(lambda m, v: ae.reparameterize(m, v, seed=9), (mu, logvar),
                                            fast_mode=backend == "triton" and device == "cpu")

    def penalty_gradients(backend):
        with ae.backend(backend):
            z, kl = ae.reparameterize(mu, logvar, seed=9)
            grads = torch.autograd.grad(z.square().sum() + kl, (mu, logvar), create_graph=True)
            return torch.autograd.grad(sum(g.square().sum() for g in grads), (mu, logvar))

    for got, want in zip(penalty_gradients(backend), penalty_gradients("reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_opcheck(device, backend):
    ops = kernels(backend)
    seed = torch.tensor(BIG_SEED, device=device)
    x = torch.rand(9, 13, device=device, requires_grad=True)
    w = torch.randn(5, 13, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    mu, logvar = (torch.randn(6, 5, device=device, requires_grad=True) for _ in range(2))
    for kind in KINDS:
        torch.library.opcheck(ops.corrupt, (x, kind, LEVELS[kind], seed, 0.0, 1.0))
        torch.library.opcheck(ops.noisy_linear, (x, w, b, kind, LEVELS[kind], seed, 0.0, 1.0))
        torch.library.opcheck(ops.noisy_linear, (x, w, None, kind, LEVELS[kind], seed, 0.0, 1.0))
        torch.library.opcheck(ops.noisy_linear_grad_input,
                              (torch.randn(9, 5, device=device), w.detach(), kind, LEVELS[kind], seed))
        torch.library.opcheck(ops.noisy_linear_grad_weight,
                              (torch.randn(9, 5, device=device), x.detach(), kind, LEVELS[kind], seed, 0.0, 1.0))
    torch.library.opcheck(ops.reparameterize_forward, (mu, logvar, seed))
    torch.library.opcheck(ops.reparameterize_backward,
                          (torch.randn(6, 5, device=device), torch.tensor(0.5, device=device),
                           mu.detach(), logvar.detach(), seed))


@pytest.mark.parametrize(("device", "backend"), op_backends("corrupt"))
def test_torch_compile_fullgraph(device, backend):
    x = torch.rand(8, 12, device=device)
    w = torch.randn(6, 12, device=device, requires_grad=True)

    def model(x):
        h = ae.noisy_linear(ae.corrupt(x, "salt_pepper", 0.2, seed=4), w, None, "dropout", 0.3, seed=5)
        z, kl = ae.reparameterize(h[:, :3], h[:, 3:], seed=6)
        return z.square().sum() + kl

    assert_compiled_matches_eager(model, x, w, backend)

    def unseeded(x):  # seed=None: the seed draw is traced too
        return ae.corrupt(x, "masking", 0.5).sum()

    with ae.backend(backend):
        torch.manual_seed(3)
        want = unseeded(x)
        torch.manual_seed(3)
        torch.testing.assert_close(torch.compile(unseeded, fullgraph=True, backend="aot_eager")(x), want)


# -------------------------------------------------------- modules, bad input


@pytest.mark.parametrize(("kind", "level"), [("masking", 0.5), ("gaussian", 0.3), ("dropout", 0.25),
                                           ("salt_pepper", 1.0)])  # every element low or high
def test_modules_corrupt_as_the_ops_do_in_training_only(kind, level):
    """The modules pass their kind, level, low and high on, and draw the seed from
    torch's generator (torch.manual_seed reproduces them): the reference's result for
    that seed."""
    from aefast.ops.noise import SEED_RANGE

    x = torch.rand(10, 20)
    corrupt = ae.nn.Corrupt(kind, level, low=-2.0, high=3.0)
    linear = ae.nn.NoisyLinear(20, 4, kind, level, low=-2.0, high=3.0)
    torch.manual_seed(7)
    seed = int(torch.randint(0, SEED_RANGE - 1, ()))
    for module, want in ((corrupt, reference.corrupt(x, kind, level, seed, -2.0, 3.0)),
                         (linear, reference.noisy_linear(x, linear.weight, linear.bias, kind, level, seed, -2.0, 3.0))):
        torch.manual_seed(7)
        with torch.no_grad():
            torch.testing.assert_close(module(x), want)
    if kind == "salt_pepper":
        assert set(corrupt(x).unique().tolist()) == {-2.0, 3.0}
    corrupt.eval(), linear.eval()
    assert torch.equal(corrupt(x), x)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


def test_bad_arguments_name_what_is_wrong():
    x = torch.rand(4, 5)
    with pytest.raises(ValueError, match="kind must be one of gaussian, masking, salt_pepper, dropout"):
        ae.corrupt(x, "blur", 0.1)
    for kind, level in [("gaussian", -0.1), ("masking", 1.5), ("dropout", 1.0), ("salt_pepper", -0.5),
                        ("masking", float("nan"))]:
        with pytest.raises(ValueError, match=rf"level (\(.*\) )?must be .*{kind if level == level else 'finite'}.*, got {level}"):
            ae.corrupt(x, kind, level)
    for seed in (-1, 2**63, 1.5, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=r"seed must be (None or an integer in \[0, 2\*\*63\)|an int or a 0-dim)"):
            ae.corrupt(x, "masking", 0.1, seed=seed)
    with pytest.raises(ValueError, match="x must be float32"):
        ae.corrupt(torch.ones(3, dtype=torch.long), "masking", 0.1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ae.noisy_linear(x, torch.randn(3, 4), None, "masking", 0.1)
    with pytest.raises(ValueError, match=r"bias must be None or of shape \(3,\), got \(4,\)"):
        ae.noisy_linear(x, torch.randn(3, 5), torch.randn(4), "masking", 0.1)
    with pytest.raises(ValueError, match="logvar must match"):
        ae.reparameterize(x, torch.rand(4, 6))
    with pytest.raises(ValueError, match="mu must be"):
        ae.reparameterize(torch.rand(5), torch.rand(5))
    with pytest.raises(ValueError, match="kind must be one of gaussian, masking, salt_pepper, dropout; got 'blur'"):
        ae.nn.Corrupt("blur", 0.1)


def test_the_triton_kind_numbers_are_the_reference_order():
    from aefast.triton_kernels import noise as kernels

    assert tuple(
        KINDS.index(kind) for kind in ("gaussian", "masking", "salt_pepper", "dropout")) == (kernels.GAUSSIAN, kernels.MASKING, kernels.SALT_PEPPER, kernels.DROPOUT)
