"""The CUDA kernels of csrc/cuda, compiled with g++ and run on the CPU under an emulation
of the CUDA execution model (tests/cuda_emu), against aefast/reference.py.

Every case runs under several schedules -- threads and blocks in forward, reversed and
shuffled order -- and must give the reference's result, the same bits under every
schedule (every reduction here has a fixed order), and write every output element
(outputs start as NaN or all-ones bytes). A missing __syncthreads() or a race between
threads shows up as a wrong or schedule-dependent result; a misused collective or
barrier as an emulator error. CUDA_EMU_PLANT="family:old text=>new text" builds the
suite's library from an edited copy of csrc/cuda/<family>.cu (to see a planted bug fail).
"""

import ctypes
import faulthandler
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from aefast import reference
from conftest import TOLERANCES, assert_close, assert_kl_gradient_close, assert_within_sizes

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objcopy") is None,
                                reason="g++ or objcopy not found: the emulation compiles csrc/cuda with them")

_spec = importlib.util.spec_from_file_location("cuda_emu_build", Path(__file__).parent / "cuda_emu" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # csrc/cuda/dtype.h
FORWARD, REVERSED, SHUFFLED = 0, 1, 2
# (name, thread order, block order, shuffle seed)
POLICIES = [("forward", FORWARD, FORWARD, 0), ("reversed", REVERSED, REVERSED, 0),
            ("shuffled", SHUFFLED, SHUFFLED, 2024)]
SMS = 2  # what cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) answers
BIG_SEED = 0x7EDC_BA98_7654_3210

P, I64, F64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_float, ctypes.c_int
LAUNCHERS = {  # tests/cuda_emu/api.cpp
    "jumprelu_forward": [P, P, P, P, INT, I64, I64],
    "jumprelu_backward": [P, P, P, P, P, P, P, INT, I64, I64, F64, I64],
    "kl_sparsity_forward": [P, INT, I64, I64, F64, F64, F64, I64, P, P, P],
    "kl_sparsity_backward": [P, P, P, INT, I64, I64, F64, F64, F64],
    "sigmoid_kl_sparsity_forward": [P, P, INT, I64, I64, F64, F64, F64, I64, P, P, P],
    "sigmoid_kl_sparsity_backward": [P, P, P, P, P, INT, I64, I64, F64, F64, F64],
    "contractive_penalty_forward": [P, P, INT, I64, I64, I64, I64, P, P, P, P],
    "contractive_penalty_backward": [P, P, P, P, P, P, P, INT, I64, I64, I64],
    "corrupt": [P, P, INT, I64, INT, F32, F64, F64, F64, P],
    "reparameterize_forward": [P, P, P, P, P, INT, I64, I64, P],
    "reparameterize_backward": [P, P, P, P, P, P, INT, I64, I64, P],
    "sparse_decode_forward": [P, P, P, P, P, INT, INT, I64, I64, I64, I64],
    "sparse_decode_backward": [P, P, P, P, P, P, P, P, INT, INT, I64, I64, I64, I64],
    "topk_select": [P, INT, I64, I64, I64, I64, INT, INT, P, P, P, P, P],
}
QUERIES = {"column_splits": [I64, I64, INT], "jumprelu_splits": [I64, I64, INT], "reparameterize_blocks": [I64], "topk_row_chunks": [I64, I64, INT],
           "topk_workspace_bytes": [I64, I64], "topk_packs_keys": [INT, I64],
           "topk_filters_rows": [INT, I64, I64, I64]}


class EmulatorError(AssertionError):
    """The emulator found a misuse: an exited lane in a collective, a deadlock, ..."""


class Emulator:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_configure.argtypes = [INT, INT, ctypes.c_ulonglong, INT]
        self.lib.emu_error.restype = ctypes.c_char_p
        for name, argtypes in LAUNCHERS.items():
            fn = getattr(self.lib, "emu_" + name)
            fn.argtypes, fn.restype = argtypes, INT
        for name, argtypes in QUERIES.items():
            fn = getattr(self.lib, "emu_" + name)
            fn.argtypes, fn.restype = argtypes, I64
        self.configure(POLICIES[0])

    def configure(self, policy):
        _, threads, blocks, seed = policy
        self.lib.emu_configure(threads, blocks, seed, SMS)

    def query(self, name, *args):
        return getattr(self.lib, "emu_" + name)(*args)

    def __call__(self, name, *args):
        def raw(a):
            if isinstance(a, torch.Tensor):
                assert a.is_contiguous()
                return a.data_ptr() if a.numel() else None
            return DTYPE_CODE[a] if isinstance(a, torch.dtype) else a

        status = getattr(self.lib, "emu_" + name)(*map(raw, args))
        if status == -1:
            raise EmulatorError(f"{name}: {self.lib.emu_error().decode()}")
        assert status == 0, f"{name} returned cudaError_t {status}"


def build_emulator(edits=None):
    return Emulator(build.build(edits))


@pytest.fixture(scope="module")
def emu():
    plant = os.environ.get("CUDA_EMU_PLANT")
    edits = None
    if plant:
        family, edit = plant.split(":", 1)
        old, new = edit.split("=>", 1)
        edits = {family: [(old.replace("\\n", "\n"), new.replace("\\n", "\n"))]}
    return build_emulator(edits)


_guarded = []  # (buffer, its poisoned margins) of the outputs of the current run


def poisoned(shape, dtype):
    """An output buffer no element of which is a plausible result (NaN, or all bytes
    0xFF), between poisoned margins that a kernel writing out of bounds would change."""
    n = torch.Size(shape).numel()
    margin = n + 1024
    fill = float("nan") if dtype.is_floating_point else -1
    buffer = torch.full((n + 2 * margin,), fill, dtype=dtype)
    _guarded.append((buffer, margin))
    return buffer[margin:margin + n].view(shape)


def assert_margins_intact():
    for buffer, margin in _guarded:
        clean = torch.full((margin,), float("nan") if buffer.dtype.is_floating_point else -1, dtype=buffer.dtype)
        assert same_bits(buffer[:margin], clean) and same_bits(buffer[-margin:], clean), (
            "a kernel wrote outside an output buffer")
    _guarded.clear()


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def under_policies(emu, run, check, policies=POLICIES):
    """run() (a tuple of tensors) under every schedule: check(*result) passes under each,
    and every schedule gives the bits of the first."""
    first = None
    for policy in policies:
        emu.configure(policy)
        try:
            _guarded.clear()
            result = run()
            assert_margins_intact()
            check(*result)
            if first is not None:
                for i, (a, b) in enumerate(zip(first, result)):
                    assert same_bits(a, b), f"output {i} differs from the {policies[0][0]} schedule's"
        except Exception as e:
            raise AssertionError(f"under the {policy[0]} schedule: {type(e).__name__}: {e}") from e
        first = first or result


def grads64(fn, inputs, grad_outputs):
    """fn's outputs and input gradients on float64 copies of the inputs."""
    x64 = [x.detach().double().requires_grad_(True) for x in inputs]
    out = fn(*x64)
    out = out if isinstance(out, tuple) else (out,)
    return out, torch.autograd.grad(out, x64, [g.double() for g in grad_outputs])


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_emulated_half_conversions_round_to_nearest_even(emu):
    bits = torch.randint(-(2**31), 2**31, (20000,), dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 65504.0, 65520.0, 6e-8, 3e-8, 1e-40,
                                                           float("inf"), -float("inf"), 1.00048828125])])
    x = x[~torch.isnan(x)]
    for bf16, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        out = torch.empty(x.shape, dtype=torch.int16)
        emu.lib.emu_to_half(ctypes.c_void_p(x.data_ptr()), x.numel(), bf16, ctypes.c_void_p(out.data_ptr()))
        assert torch.equal(out, x.to(dtype).view(torch.int16)), dtype


# ------------------------------------------------------------------ sparse-KL family

RHO, BETA = 0.07, 2.5
EPS = reference.RHO_HAT_EPS
KL_SHAPES = [(1, 1), (1, 7), (5, 1), (37, 45), (300, 33), (130, 70), (3, 333)]
CONTRACTIVE_D = {(1, 1): 1, (5, 1): 300}  # the weight's width; 19 otherwise


def kl_splits(emu, B, H):
    """The bindings' choice (column_splits), and more."""
    return sorted({emu.query("column_splits", B, H, SMS), 2, 7})


def activations(shape, dtype, dead_unit=True):
    a = torch.rand(shape, dtype=torch.float64) * 0.98 + 0.01
    if dead_unit and shape[1] > 1:
        a[:, 0] = 0.0  # rho_hat clamped: the gradient at the clamp
    return a.to(dtype)


def check_kl_sparsity(emu, shape, dtype, splits, policies=POLICIES):
    B, H = shape
    stat = reference.stat_dtype(dtype)
    a, g = activations(shape, dtype), randn(dtype=dtype)
    (want,), (want_grad,) = grads64(lambda x: reference.kl_sparsity(x, RHO, BETA), [a], [g])

    def run():
        partial, rho_hat, penalty = poisoned((splits, H), stat), poisoned((H,), stat), poisoned((), dtype)
        emu("kl_sparsity_forward", a, dtype, B, H, RHO, BETA, EPS, splits, partial, rho_hat, penalty)
        grad = poisoned((B, H), dtype)
        emu("kl_sparsity_backward", g, rho_hat, grad, dtype, B, H, RHO, BETA, EPS)
        return penalty, rho_hat, grad

    def check(penalty, rho_hat, grad):
        assert_close(rho_hat, a.double().mean(0), stat)
        assert_close(penalty, want, dtype, scale=H)
        assert_kl_gradient_close(grad, want_grad, dtype)

    under_policies(emu, run, check, policies)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
def test_kl_sparsity(emu, shape, dtype):
    for splits in kl_splits(emu, *shape):
        check_kl_sparsity(emu, shape, dtype, splits)


def test_kl_sparsity_more_rows_than_the_grid(emu):
    """B > 4096: the elementwise gradient kernels loop over rows past gridDim.y."""
    B, H = 4100, 3
    check_kl_sparsity(emu, (B, H), torch.float32, emu.query("column_splits", B, H, SMS), POLICIES[:1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
def test_sigmoid_kl_sparsity(emu, shape, dtype):
    B, H = shape
    stat = reference.stat_dtype(dtype)
    z, gh, gp = randn(B, H, dtype=dtype, scale=3, shift=-2), randn(B, H, dtype=dtype), randn(dtype=dtype)
    (want_h, want), (want_grad,) = grads64(lambda x: reference.sigmoid_kl_sparsity(x, RHO, BETA), [z], [gh, gp])
    for splits in kl_splits(emu, B, H):
        def run():
            h, partial, rho_hat, penalty = (poisoned((B, H), dtype), poisoned((splits, H), stat),
                                            poisoned((H,), stat), poisoned((), dtype))
            emu("sigmoid_kl_sparsity_forward", z, h, dtype, B, H, RHO, BETA, EPS, splits, partial, rho_hat, penalty)
            grad = poisoned((B, H), dtype)
            emu("sigmoid_kl_sparsity_backward", gh, gp, h, rho_hat, grad, dtype, B, H, RHO, BETA, EPS)
            return h, penalty, rho_hat, grad

        def check(h, penalty, rho_hat, grad):
            assert_close(h, want_h, dtype)
            assert_close(rho_hat, h.double().mean(0), stat)  # the mean of the h returned
            assert_close(penalty, want, dtype, scale=H)
            assert_close(grad, want_grad, dtype)

        under_policies(emu, run, check)


JUMPRELU_BANDWIDTH = 0.25


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (37, 45), (300, 33), (130, 257)], ids=str)
def test_jumprelu(emu, shape, dtype):
    """Forward and backward against aefast.reference.jumprelu: the output, the counts and
    z's gradient exactly; the threshold's gradient to rounding, the same bits under
    every schedule."""
    B, L = shape
    stat = reference.stat_dtype(dtype)
    threshold = (torch.rand(L, dtype=torch.float64) + 0.2).to(dtype)
    z = (threshold.double() + torch.randn(B, L, dtype=torch.float64) * 0.5).to(dtype)
    z[0, 0] = threshold[0]  # at its threshold: off
    g, g_l0 = randn(B, L, dtype=dtype), randn(B, dtype=stat)
    z_ref, t_ref = z.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
    want, want_l0 = reference.jumprelu(z_ref, t_ref, JUMPRELU_BANDWIDTH)
    want_z, want_t = torch.autograd.grad((want, want_l0), (z_ref, t_ref), (g, g_l0))
    # The threshold's gradient sums a column's terms of either sign: its error is
    # relative to the sum of their sizes (the same gradient for |g| and |g_l0|).
    _, size_t = torch.autograd.grad(reference.jumprelu(z_ref, t_ref, JUMPRELU_BANDWIDTH), (z_ref, t_ref),
                                    (g.abs(), g_l0.abs()))
    for splits in sorted({emu.query("jumprelu_splits", B, L, SMS), 2, 7}):
        def run():
            out, l0 = poisoned((B, L), dtype), poisoned((B,), stat)
            emu("jumprelu_forward", z, threshold, out, l0, dtype, B, L)
            grad_z, partial, grad_t = poisoned((B, L), dtype), poisoned((splits, L), stat), poisoned((L,), dtype)
            emu("jumprelu_backward", g, g_l0, z, threshold, grad_z, partial, grad_t, dtype, B, L,
                JUMPRELU_BANDWIDTH, splits)
            return out, l0, grad_z, grad_t

        def check(out, l0, grad_z, grad_t):
            assert torch.equal(out, want.detach()) and torch.equal(l0, want_l0.detach())
            assert torch.equal(grad_z, want_z)
            assert_within_sizes(grad_t, want_t, size_t, dtype)

        under_policies(emu, run, check)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=str)
def test_contractive_penalty(emu, shape, dtype):
    B, H = shape
    D = CONTRACTIVE_D.get(shape, 19)
    stat = reference.stat_dtype(dtype)
    h, w, g = activations(shape, dtype, dead_unit=False), randn(H, D, dtype=dtype, scale=0.3), randn(dtype=dtype)
    (want,), (want_gh, want_gw) = grads64(reference.contractive_penalty, [h, w], [g])
    h64, w64 = h.double(), w.double()
    for splits in kl_splits(emu, B, H):
        def run():
            partial = poisoned((splits + 1, H), stat)
            s2, w2, penalty = poisoned((H,), stat), poisoned((H,), stat), poisoned((), dtype)
            emu("contractive_penalty_forward", h, w, dtype, B, H, D, splits, partial, s2, w2, penalty)
            grad_h, grad_w = poisoned((B, H), dtype), poisoned((H, D), dtype)
            emu("contractive_penalty_backward", g, h, w, s2, w2, grad_h, grad_w, dtype, B, H, D)
            return penalty, s2, w2, grad_h, grad_w

        def check(penalty, s2, w2, grad_h, grad_w):
            assert_close(s2, (h64 * (1 - h64)).pow(2).sum(0), stat, scale=B)
            assert_close(w2, w64.pow(2).sum(1), stat, scale=D)
            assert_close(penalty, want, dtype)  # a sum of positive terms: relative to itself
            assert_close(grad_h, want_gh, dtype)
            assert_close(grad_w, want_gw, dtype)

        under_policies(emu, run, check)


# ------------------------------------------------------------------ noise injection

KINDS = {"gaussian": (0, 0.3), "masking": (1, 0.3), "salt_pepper": (2, 0.25), "dropout": (3, 0.4)}  # philox.h Kind


def assert_noise_close(actual, expected, dtype):
    """Normals agree to a few float32 ulps (log, cos and exp are polynomials here)."""
    rtol, atol = TOLERANCES[torch.float32 if dtype == torch.float64 else dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 1001, 5003])
def test_corrupt(emu, n, kind, dtype):
    code, level = KINDS[kind]
    scale = 1.0 / (1.0 - level) if kind == "dropout" else 1.0  # noise_args::survivor_scale
    x, seed = torch.rand(n, dtype=torch.float64).to(dtype), torch.tensor(BIG_SEED)
    want = reference.corrupt(x, kind, level, BIG_SEED, -0.1, 2.3)

    def run():
        out = poisoned((n,), dtype)
        emu("corrupt", x, out, dtype, n, code, level, scale, -0.1, 2.3, seed)
        return (out,)

    def check(out):
        if kind == "gaussian":
            assert_noise_close(out, want, dtype)
        else:  # the same uniform bits, the same masks: exact
            assert torch.equal(out, want)

    under_policies(emu, run, check)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 17), (5, 1001)], ids=str)
def test_reparameterize(emu, shape, dtype):
    B, Z = shape
    n = B * Z
    stat = reference.stat_dtype(dtype)
    mu, logvar, gz = (randn(B, Z, dtype=dtype) for _ in range(3))
    gkl = randn(dtype=dtype)
    seed = torch.tensor(BIG_SEED)
    want, want_grads = grads64(lambda m, lv: reference.reparameterize(m, lv, BIG_SEED), [mu, logvar], [gz, gkl])
    blocks = emu.query("reparameterize_blocks", n)

    def run():
        z, partial, kl = poisoned((B, Z), dtype), poisoned((blocks,), stat), poisoned((), dtype)
        emu("reparameterize_forward", mu, logvar, z, partial, kl, dtype, B, n, seed)
        grad_mu, grad_logvar = poisoned((B, Z), dtype), poisoned((B, Z), dtype)
        emu("reparameterize_backward", gz, gkl, mu, logvar, grad_mu, grad_logvar, dtype, B, n, seed)
        return z, kl, grad_mu, grad_logvar

    def check(*got):
        for g, w in zip(got, (*want, *want_grads)):
            assert_noise_close(g, w, dtype)

    under_policies(emu, run, check)


def test_noise_past_one_block_per_256_and_past_the_grid_limit(emu):
    """kl_finish_kernel's loop over more partial sums than threads (over 256 blocks), and
    the grid-stride loop of corrupt past kMaxBlocks = 4096 blocks (one schedule: no barrier)."""
    B, Z = 3, 90001  # 270003 elements: 264 blocks
    mu, logvar, seed = randn(B, Z, dtype=torch.float32), randn(B, Z, dtype=torch.float32), torch.tensor(BIG_SEED)
    want_z, want_kl = reference.reparameterize(mu, logvar, BIG_SEED)
    blocks = emu.query("reparameterize_blocks", B * Z)
    assert blocks > 256

    def run():
        z, partial = poisoned((B, Z), torch.float32), poisoned((blocks,), torch.float32)
        kl = poisoned((), torch.float32)
        emu("reparameterize_forward", mu, logvar, z, partial, kl, torch.float32, B, B * Z, seed)
        return z, kl

    def check(z, kl):
        assert_noise_close(z, want_z, torch.float32)
        assert_noise_close(kl, want_kl, torch.float32)

    under_policies(emu, run, check)

    n = 4 * 256 * 4096 + 4 * 300 + 3  # 300 threads take a second counter
    x = torch.rand(n)
    want = reference.corrupt(x, "masking", 0.3, BIG_SEED)

    def run_corrupt():
        out = poisoned((n,), torch.float32)
        emu("corrupt", x, out, torch.float32, n, KINDS["masking"][0], 0.3, 1.0, 0.0, 1.0, seed)
        return (out,)

    under_policies(emu, run_corrupt, lambda out: torch.testing.assert_close(out, want, rtol=0, atol=0),
                   POLICIES[:1])


# ------------------------------------------------------------------ sparse decoder

def latent_runs(indices, L):
    """As csrc/cuda/decode_bindings.cpp: the (row, slot) pairs sorted by latent, stably, and where
    each latent's run starts (a search of the sorted indices: pairs out of range fall in none)."""
    latents, order = torch.sort(indices.flatten(), stable=True)
    return order, torch.searchsorted(latents, torch.arange(L + 1))


DECODE_CASES = [(37, 5, 50, 19, True), (37, 5, 50, 19, False), (1, 1, 1, 1, True), (3, 0, 4, 7, True),
                (4, 3, 6, 300, False), (64, 4, 4, 33, False), (33, 6, 40, 1, False), (3, 2, 5, 1100, False)]
# (B, K, L, D, bias): (64, 4, 4, 33) long runs per latent; D = 1 as in the encoder bias
# gradient; D = 1100: a weight-gradient row over two blocks of 1024 columns, a tail of 76


# (values' dtype, weight's): each alone, and a float32 weight beside 16-bit values (mixed precision)
DECODE_DTYPES = [(dtype, dtype) for dtype in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize(("dtype", "weight_dtype"), DECODE_DTYPES, ids=str)
@pytest.mark.parametrize(("B", "K", "L", "D", "with_bias"), DECODE_CASES)
def test_sparse_decode(emu, B, K, L, D, with_bias, dtype, weight_dtype):
    """A float32 weight's gradient is summed and kept in float32: float32's tolerance."""
    values, weight = torch.rand(B, K, dtype=torch.float64).to(dtype), randn(L, D, dtype=weight_dtype)
    bias = randn(D, dtype=dtype) if with_bias else None
    indices, grad_out = torch.randint(0, L, (B, K)), randn(B, D, dtype=dtype)
    order, starts = latent_runs(indices, L)
    inputs = [values, weight] + ([bias] if with_bias else [])
    def decode(v, w, *b):
        return reference.sparse_decode(v, indices, w, *b)

    (want,), want_grads = grads64(decode, inputs, [grad_out])
    # each result sums terms of either sign: its error against the sum of their sizes
    (sizes,), size_grads = grads64(decode, [t.abs() for t in inputs], [grad_out.abs()])

    def run():
        out = poisoned((B, D), dtype)
        emu("sparse_decode_forward", values, indices, weight, bias, out, dtype, weight_dtype, B, K, L, D)
        grad_values, grad_weight = poisoned((B, K), dtype), poisoned((L, D), weight_dtype)
        emu("sparse_decode_backward", grad_out, values, indices, weight, order, starts, grad_values, grad_weight,
            dtype, weight_dtype, B, K, L, D)
        return out, grad_values, grad_weight  # the weight gradient: the same bits under every schedule

    def check(out, grad_values, grad_weight):
        assert_within_sizes(out, want, sizes, dtype)
        assert_within_sizes(grad_values, want_grads[0], size_grads[0], dtype)
        assert_within_sizes(grad_weight, want_grads[1], size_grads[1], weight_dtype)

    under_policies(emu, run, check)
    # grad_values null (values_grad=False in the bindings): the weight gradient alone, the same bits.
    grad_weight = poisoned((L, D), weight_dtype)
    emu("sparse_decode_backward", grad_out, values, indices, weight, order, starts, None, grad_weight,
        dtype, weight_dtype, B, K, L, D)
    assert torch.equal(grad_weight, run()[2])


def test_sparse_decode_index_out_of_range_reads_nothing_and_gives_nan(emu):
    B, K, L, D = 5, 3, 7, 40
    f32 = torch.float32
    # The weight's neighbours in memory hold finite values, and the outputs start finite:
    # a read of weight[-1] or weight[L], or an unwritten output, would not give NaN.
    framed = torch.full((L + 2, D), 1e30)
    weight = framed[1:L + 1]
    weight.copy_(randn(L, D, dtype=f32))
    values, grad_out = randn(B, K, dtype=f32), randn(B, D, dtype=f32)
    indices = torch.randint(0, L, (B, K))
    indices[1, 2], indices[3, 0] = -1, L  # no host check: the kernels must not read them
    order, starts = latent_runs(indices, L)
    kept, masked = indices.clamp(0, L - 1), values.clone()
    masked[1, 2] = masked[3, 0] = 0.0  # the bad pairs add to no latent's gradient
    want_weight = torch.autograd.functional.vjp(lambda w: reference.sparse_decode(masked.double(), kept, w),
                                                weight.double(), grad_out.double())[1]

    def run():
        out, grad_values, grad_weight = torch.full((B, D), 7.0), torch.full((B, K), 7.0), torch.full((L, D), 7.0)
        emu("sparse_decode_forward", values, indices, weight, None, out, f32, f32, B, K, L, D)
        emu("sparse_decode_backward", grad_out, values, indices, weight, order, starts, grad_values, grad_weight,
            f32, f32, B, K, L, D)
        return out, grad_values, grad_weight

    def check(out, grad_values, grad_weight):
        bad_rows = torch.tensor([False, True, False, True, False])
        assert torch.isnan(out[bad_rows]).all() and not torch.isnan(out[~bad_rows]).any()
        assert torch.isnan(grad_values[1, 2]) and torch.isnan(grad_values[3, 0])
        assert torch.isnan(grad_values).sum() == 2
        assert_close(grad_weight, want_weight, f32, scale=10)

    under_policies(emu, run, check)


# ------------------------------------------------------------------ top-k selection


def topk_rows(shape, dtype, values):
    if values == "distinct":
        x = torch.randn(shape, dtype=torch.float64)
    elif values == "ties":  # seven values: most winners are decided by ties, across chunks too
        x = torch.randint(-3, 4, shape).double()
    elif values == "mixed":  # rows that rank ties beside rows that do not
        x = torch.randn(shape, dtype=torch.float64)
        x[1::2] = torch.randint(-3, 4, x[1::2].shape).double()
    else:  # "special": infinities and signed zeros, all tied many times
        pool = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 2.5], dtype=torch.float64)
        x = pool[torch.randint(0, len(pool), shape)]
    return x.to(dtype)


def emulated_topk(emu, x, k, chunks, packed, filter=False, fallbacks=None):
    """topk_select, then the keys sorted and decoded as csrc/cuda/topk_bindings.cpp does:
    (nan flag, values, indices). fallbacks: an int32 tensor that gets the rows the one
    pass (filter) left to the radix passes."""
    B, H = x.shape
    workspace = torch.full((emu.query("topk_workspace_bytes", B, chunks),), 0xAB, dtype=torch.uint8)
    nan_flag = torch.zeros((), dtype=torch.int32)
    keys = poisoned((B, k), torch.int64)
    unordered = None if packed else poisoned((B, k), torch.int64)
    emu("topk_select", x, x.dtype, B, H, k, chunks, int(packed), int(filter), workspace, nan_flag, fallbacks, keys,
        unordered)
    if packed:  # ((~key) << 31) | index: one sort
        indices = keys.sort(dim=1).values & ((1 << 31) - 1)
    else:  # by index, then stably by key
        by_index, where = unordered.sort(dim=1)
        order = keys.gather(1, where).sort(dim=1, stable=True).indices
        indices = by_index.gather(1, order)
    assert ((indices >= 0) & (indices < H)).all(), "an index out of range (a winner not written?)"
    return nan_flag, x.gather(1, indices), indices


def check_topk(emu, shape, k, values, dtype, packed, chunks, policies=POLICIES, filter=False, x=None, fallbacks=0):
    """The reference's winners; with filter (the one pass), `fallbacks` rows of them left
    to the radix passes."""
    x = topk_rows(shape, dtype, values) if x is None else x
    want_values, want_indices = reference.topk_sparse(x, k, relu=False)

    def run():
        count = torch.zeros((), dtype=torch.int32)
        return (*emulated_topk(emu, x, k, chunks, packed, filter, count), count)

    def check(nan_flag, got_values, got_indices, count):
        assert nan_flag.item() == 0
        assert torch.equal(got_indices, want_indices), "indices differ from the reference's"
        assert torch.equal(got_values, want_values)
        assert count.item() == (fallbacks if filter else 0), "rows left to the radix passes"

    under_policies(emu, run, check, policies)


def packings(dtype):
    return [False] if dtype == torch.float64 else [True, False]


# (shape, k, values); a block per row
ROW_CASES = [((1, 1), 1, "distinct"), ((1, 7), 3, "special"), ((3, 300), 1, "ties"), ((3, 300), 7, "special"),
             ((3, 300), 300, "ties"), ((5, 33), 5, "distinct"), ((2, 1000), 32, "ties"), ((4, 517), 100, "special"),
             ((4, 700), 50, "mixed"), ((2, 8300), 40, "mixed"), ((3, 8195), 64, "ties")]
# (2, 8300), (3, 8195): rows long enough for the counts' 16-byte loads (8192 16-bit values
# a step), then a tail; 8195 misaligns every other row's start for 16- and 32-bit values.
# (shape, k, values, chunks); few long rows, split into chunks (None: as the bindings choose)
SPLIT_CASES = [((1, 5000), 1, "distinct", None), ((1, 5000), 64, "ties", 5), ((2, 9000), 200, "special", None),
               ((2, 16000), 1000, "ties", None), ((2, 1000), 10, "ties", 7), ((1, 12000), 12000, "special", 4),
               ((1, 6001), 3001, "distinct", 2), ((3, 9000), 100, "mixed", 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "values"), ROW_CASES, ids=str)
def test_topk_a_block_per_row(emu, shape, k, values, dtype):
    assert emu.query("topk_packs_keys", DTYPE_CODE[dtype], shape[1]) == (dtype != torch.float64)
    for packed in packings(dtype):
        check_topk(emu, shape, k, values, dtype, packed, chunks=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "values", "chunks"), SPLIT_CASES, ids=str)
def test_topk_rows_split_into_chunks(emu, shape, k, values, chunks, dtype):
    chunks = chunks or emu.query("topk_row_chunks", *shape, SMS)
    assert chunks > 1
    for packed in packings(dtype):
        check_topk(emu, shape, k, values, dtype, packed, chunks)


# (shape, k, values); long rows in one pass (a bar from a sample, then the candidates):
# 16390 misaligns every other row's start for 16-bit values; seven values ("ties",
# "special", every other row of "mixed") put a few thousand candidates at the bar, all
# tied, so the winners among them are chosen by column.
FILTER_CASES = [((2, 16384), 32, "distinct"), ((3, 20000), 5, "ties"), ((2, 16390), 100, "special"),
                ((3, 17000), 1, "mixed"), ((1, 40000), 300, "distinct"), ((2, 16384), 700, "ties"),
                ((2, 70000), 40, "distinct")]
PACKED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "values"), FILTER_CASES, ids=str)
def test_topk_long_rows_in_one_pass(emu, shape, k, values, dtype):
    assert emu.query("topk_filters_rows", DTYPE_CODE[dtype], shape[1], k, 1)
    check_topk(emu, shape, k, values, dtype, packed=True, chunks=1, filter=True)


SAMPLED = torch.arange(1024) * 16384 // 1024  # where a row of 16384 is sampled (topk.cu)


def sample_rank_of(k, H):
    """topk.cu's sample_rank: about twice the k-th's expected rank among the 1024 samples, plus six."""
    return min(-(-2 * k * 1024 // H) + 6, 1024)


def rows_with_candidates(n, H=16384, rows=2):
    """Rows of H whose bar lets exactly n keys through: with k = 99 or 100 the bar is the
    19th largest of the 1024 samples; 19 sampled places hold 100.0 .. 118.0 (the bar:
    100.0), n - 19 unsampled ones 100.5 (all tied), the rest less than 1."""
    x = torch.rand(rows, H, dtype=torch.float64)
    x[:, SAMPLED[:19]] = 100.0 + torch.arange(19, dtype=torch.float64)
    x[:, torch.tensor([c for c in range(H) if c % 16][:n - 19])] = 100.5
    return x


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
def test_topk_one_pass_at_the_edges_of_its_room(emu, dtype):
    """k candidates (all win), one fewer (the radix passes), exactly the room (4096) and
    one more (the radix passes), the winners among the 100.5 ties chosen by column where
    fewer win than tie, all of them where all win (k = 99 of 100: 18 above, 81 tied); too
    few (the samples hold the row's largest keys) and a row of one key."""
    assert sample_rank_of(100, 16384) == sample_rank_of(99, 16384) == 19
    for n, k, fallbacks in ((100, 100, 0), (99, 100, 2), (4096, 100, 0), (4097, 100, 2), (100, 99, 0)):
        x = rows_with_candidates(n).to(dtype)
        check_topk(emu, x.shape, k, None, dtype, True, 1, filter=True, x=x, fallbacks=fallbacks)
    few = torch.rand(2, 16384, dtype=torch.float64)
    few[:, SAMPLED] += 10
    many = torch.full((2, 16384), 1.5, dtype=torch.float64)
    for x in (few, many):
        check_topk(emu, x.shape, 100, None, dtype, True, 1, filter=True, x=x.to(dtype), fallbacks=2)


def test_topk_one_pass_is_for_long_rows_with_few_winners(emu):
    f32, f64 = DTYPE_CODE[torch.float32], DTYPE_CODE[torch.float64]
    for H, k in ((16384, 32), (65536, 32), (65536, 512), (131072, 32)):
        assert emu.query("topk_filters_rows", f32, H, k, 1), (H, k)
    assert not emu.query("topk_filters_rows", f64, 65536, 32, 1)  # 64-bit keys do not pack
    assert not emu.query("topk_filters_rows", f32, 65536, 32, 4)  # split rows
    assert not emu.query("topk_filters_rows", f32, 16383, 32, 1)  # shorter rows: their passes stay in cache
    assert not emu.query("topk_filters_rows", f32, 65536, 900, 1)  # the room would overflow too often
    assert not emu.query("topk_filters_rows", f32, 262144, 32, 1)
    # The launcher refuses the one pass where the rule does not allow it.
    x, keys = torch.zeros(2, 16384), torch.zeros(2, 4, dtype=torch.int64)
    nan_flag = torch.zeros((), dtype=torch.int32)
    assert emu.lib.emu_topk_select(x.data_ptr(), f32, 2, 16384, 4, 1, 1, 1, None, nan_flag.data_ptr(), None,
                                   keys.data_ptr(), None) == 0
    workspace = torch.zeros(emu.query("topk_workspace_bytes", 2, 2), dtype=torch.uint8)
    for dtype, H, chunks, packed in ((f64, 16384, 1, 0), (f32, 16384, 2, 1), (f32, 16383, 1, 1)):
        status = emu.lib.emu_topk_select(x.data_ptr(), dtype, 2, H, 4, chunks, packed, 1, workspace.data_ptr(),
                                         nan_flag.data_ptr(), None, keys.data_ptr(), keys.data_ptr())
        assert status == 1, (dtype, H, chunks, packed)  # cudaErrorInvalidValue


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "chunks"), [((3, 300), 1), ((2, 9000), 3)], ids=str)
def test_topk_flags_nan(emu, shape, chunks, dtype):
    x = topk_rows(shape, dtype, "distinct")
    x[-1, -1] = float("nan")  # the last element of the last chunk
    for policy in POLICIES:
        emu.configure(policy)
        assert emulated_topk(emu, x, 5, chunks, packed=dtype != torch.float64)[0].item() == 1, policy[0]


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
def test_topk_one_pass_cuts_ties_by_columns_past_16_bits(emu, dtype):
    # 100 keys of 5.0 at columns 60000 .. 69900, k = 80: the cut among them at column 67900.
    x = torch.randn(2, 70000, dtype=torch.float64).clamp(max=4.0)
    x[:, 60000::100] = 5.0
    check_topk(emu, x.shape, 80, None, dtype, True, 1, filter=True, x=x.to(dtype))


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
def test_topk_one_pass_flags_nan(emu, dtype):
    # Unsampled and last; at a sampled place; in a row of one key (the radix passes).
    for where, fill in ((16383, None), (int(SAMPLED[5]), None), (16383, 1.5)):
        x = topk_rows((2, 16384), dtype, "distinct") if fill is None else torch.full((2, 16384), fill, dtype=dtype)
        x[-1, where] = float("nan")
        for policy in POLICIES:
            emu.configure(policy)
            assert emulated_topk(emu, x, 5, 1, packed=True, filter=True)[0].item() == 1, (where, fill, policy[0])


# ------------------------------------------------------------------ the emulation catches bugs

# A __syncthreads() the kernel needs, and a case whose result depends on it.
BARRIERS = {
    "topk: the barrier that frees warp_sums in block_exclusive_sum": (
        "topk", "  __syncthreads();  // warp_sums is free again when this returns\n",
        lambda emu, policies: check_topk(emu, (2, 1000), 32, "ties", torch.float32, True, 1, policies)),
    "kl: the barrier before block_sum adds the warps' sums (the penalty)": (
        "kl", "  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = v;\n  __syncthreads();\n",
        lambda emu, policies: check_kl_sparsity(emu, (130, 70), torch.float32, 3, policies)),
}


def outcome_in_child(fn):
    """fn() in a forked child, which a racy kernel may crash: 'pass', 'fail' or 'crash'."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # a crash is an expected outcome here, not worth a traceback
        # The parent's OpenMP pool does not survive the fork: a parallel region in the
        # child would wait for its threads forever. One thread runs none.
        torch.set_num_threads(1)
        try:
            fn()
            code = 0
        except AssertionError:
            code = 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash"
    return {0: "pass", 1: "fail"}.get(os.WEXITSTATUS(status), "error")


@pytest.mark.parametrize("name", BARRIERS)
def test_a_removed_barrier_is_caught(emu, name):
    family, text, run_case = BARRIERS[name]
    run_case(emu, POLICIES)  # intact: passes under every schedule
    variant = build_emulator({family: [(text, text.replace("__syncthreads();", ""))]})
    outcomes = {policy[0]: outcome_in_child(lambda: run_case(variant, [policy])) for policy in POLICIES}
    assert set(outcomes.values()) - {"pass"}, f"no schedule noticed the missing barrier: {outcomes}"
    assert "error" not in outcomes.values(), outcomes


def test_a_collective_waiting_for_an_exited_lane_is_an_error_not_a_hang(emu):
    # decode_values_grad_kernel: lane 31 of each warp leaves before the shuffle reduction.
    variant = build_emulator(
        {"decode": [("if (e >= pairs) return;", "if (e >= pairs || lane == 31) return;")]})
    values, weight = torch.rand(3, 2), torch.randn(5, 4)
    indices, grad_out = torch.randint(0, 5, (3, 2)), torch.randn(3, 4)
    order, starts = torch.sort(indices.flatten(), stable=True).indices, torch.zeros(6, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(indices.flatten(), minlength=5), 0)
    args = (grad_out, values, indices, weight, order, starts, torch.empty(3, 2), torch.empty(5, 4),
            torch.float32, torch.float32, 3, 2, 5, 4)
    with pytest.raises(EmulatorError, match="lane 31 .*has exited"):
        variant("sparse_decode_backward", *args)
    emu("sparse_decode_backward", *args)  # the intact kernel runs


# ------------------------------------------------------------------ launch plans at users' sizes

H200_SMS = 132


@pytest.fixture
def planning(emu):
    """The emulator in plan-only mode on an H200's 132 SMs: the real launchers run at
    users' sizes with no memory (null pointers); each launch is recorded, not run, and a
    grid past CUDA's limits fails it."""
    emu.lib.emu_plan_only(1)
    emu.lib.emu_configure(0, 0, 0, H200_SMS)
    yield emu
    emu.lib.emu_plan_only(0)
    emu.configure(POLICIES[0])


def planned(emu):
    out = (ctypes.c_uint * 6)()
    emu.lib.emu_planned.argtypes = [ctypes.c_longlong, ctypes.c_void_p]
    emu.lib.emu_planned_count.restype = ctypes.c_longlong
    launches = []
    for i in range(emu.lib.emu_planned_count()):
        emu.lib.emu_planned(i, out)
        launches.append(tuple(out))
    emu.lib.emu_plan_only(1)  # clears the record
    return launches


def test_launch_plans_at_users_sizes_stay_within_cuda_limits(planning):
    emu, f32 = planning, torch.float32
    rho, beta = 0.05, 3.0
    cases = []
    for B, H in ((65536, 65536), (4096, 1 << 20)):
        splits = emu.query("column_splits", B, H, H200_SMS)
        cases += [("kl_sparsity_forward", None, f32, B, H, rho, beta, EPS, splits, None, None, None),
                  ("kl_sparsity_backward", None, None, None, f32, B, H, rho, beta, EPS),
                  ("sigmoid_kl_sparsity_forward", None, None, f32, B, H, rho, beta, EPS, splits, None, None, None),
                  ("sigmoid_kl_sparsity_backward", None, None, None, None, None, f32, B, H, rho, beta, EPS)]
        jumprelu_splits = emu.query("jumprelu_splits", B, H, H200_SMS)
        cases += [("jumprelu_forward", None, None, None, None, f32, B, H),
                  ("jumprelu_backward", None, None, None, None, None, None, None, f32, B, H, 0.001, jumprelu_splits)]
    B, H, D = 4096, 1 << 20, 8192  # a 1M x 8192 weight
    splits = emu.query("column_splits", B, H, H200_SMS)
    cases += [("contractive_penalty_forward", None, None, f32, B, H, D, splits, None, None, None, None),
              ("contractive_penalty_backward", None, None, None, None, None, None, None, f32, B, H, D)]
    n = (8 << 20) * 784  # noisy_linear at N = 8M rows of 784: corrupt(x) before the matmul
    cases += [("corrupt", None, None, f32, n, 1, 0.25, 1.0, 0.0, 1.0, None),
              ("reparameterize_forward", None, None, None, None, None, f32, 8 << 20, (8 << 20) * 64, None),
              ("reparameterize_backward", None, None, None, None, None, None, f32, 8 << 20, (8 << 20) * 64, None)]
    B, K, L, D = 65536, 32, 1 << 20, 8192
    cases += [("sparse_decode_forward", None, None, None, None, None, f32, f32, B, K, L, D),
              ("sparse_decode_backward", None, None, None, None, None, None, None, None, f32, f32, B, K, L, D)]
    workspace = ctypes.c_void_p(1)  # never touched in plan-only mode
    for B, H, k in ((4096, 65536, 32), (65536, 1 << 20, 32), (1, 1 << 28, 4096 * 32), (3, 1 << 30, 7)):
        chunks = emu.query("topk_row_chunks", B, H, H200_SMS)
        filter = int(bool(emu.query("topk_filters_rows", DTYPE_CODE[f32], H, k, chunks)))
        assert filter == ((B, H, k) == (4096, 65536, 32)), (B, H, k)  # the SAE's rows take the one pass
        cases.append(("topk_select", None, f32, B, H, k, chunks, 1, filter, workspace if chunks > 1 else None,
                      None, None, None, None))
    for name, *args in cases:
        emu(name, *args)  # a grid past CUDA's limits fails the launch: cudaErrorInvalidConfiguration
        launches = planned(emu)
        assert launches, f"{name} launched nothing"
        for grid_x, grid_y, grid_z, *block in launches:
            assert grid_x < 2**31 and grid_y <= 65535 and grid_z <= 65535, (name, args, grid_x, grid_y, grid_z)
            assert block[0] * block[1] * block[2] <= 1024, (name, block)


def test_a_grid_past_cuda_limits_fails_its_launch_instead_of_truncating(planning):
    # 2^37 columns: 2^32 column blocks of 32, which a cast to unsigned would make 0.
    status = planning.lib.emu_kl_sparsity_forward(None, 0, 1, 1 << 37, 0.05, 1.0, EPS, 1, None, None, None)
    assert status == 9, f"expected cudaErrorInvalidConfiguration (9), got {status}"


def test_sparse_decode_refuses_other_dtype_pairs(emu):
    """Only a float32 weight beside 16-bit values mixes: float16 beside float32 values,
    or float32 beside float64, is refused rather than read as the wrong type."""
    values, indices, out = torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.empty(2, 3)
    for dtype, weight_dtype in ((torch.float32, torch.float16), (torch.float64, torch.float32)):
        with pytest.raises(AssertionError, match="returned cudaError_t 1"):  # cudaErrorInvalidValue
            emu("sparse_decode_forward", values.to(dtype), indices, randn(4, 3, dtype=weight_dtype), None,
                out.to(dtype), dtype, weight_dtype, 2, 1, 4, 3)
