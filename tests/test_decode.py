"""The decode family (sparse_decode, topk_encode, and the top-k sparse autoencoders
built on them) against aefast/reference.py, on every backend with kernels."""

import os
import subprocess
import sys

import pytest
import torch

import aefast as ae
from aefast import reference
from aefast.ops._declare import OPERATORS, kernels
from conftest import (
    DEVICES,
    assert_close,
    assert_compiled_matches_eager,
    assert_within_sizes,
    dtypes_for,
    interpreted,
    leaf,
    op_backends,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_matches_reference(device, backend, poisoned):
    # 19 columns: one narrow block; 300: full blocks (256 columns in the CPU forward with
    # AVX-512, else 128; 64 in its backward's walk by latent) and a narrow one. 50 latents for 185 pairs: some
    # latents with 4 pairs or more, some with fewer. Latent L - 1 is named by no pair:
    # its weight gradient row is zeros.
    for dtype, D in [(dtype, D) for dtype in DTYPES for D in (19, 300)]:
        B, K, L = 37, 5, 50
        values = leaf(torch.rand(B, K, dtype=torch.float64).to(device, dtype))
        indices = torch.randint(0, L - 1, (B, K), device=device)
        weight = leaf(torch.randn(L, D, dtype=torch.float64).to(device, dtype))
        bias = leaf(torch.randn(D, dtype=torch.float64).to(device, dtype))
        with ae.backend(backend):
            out = ae.sparse_decode(values, indices, weight, bias)
        g = torch.randn(B, D, dtype=dtype, device=device)
        grads = torch.autograd.grad(out, (values, weight, bias), g)
        ref64 = [leaf(t.double()) for t in (values, weight, bias)]
        want = reference.sparse_decode(ref64[0], indices, ref64[1], ref64[2])
        want_grads = torch.autograd.grad(want, ref64, g.double())
        sizes64 = [leaf(t.detach().abs()) for t in ref64]  # each sum's terms, their sizes
        sizes = reference.sparse_decode(sizes64[0], indices, sizes64[1], sizes64[2])
        assert_within_sizes(out, want, sizes, dtype)
        for got_g, want_g, size_g in zip(grads, want_grads, torch.autograd.grad(sizes, sizes64, g.double().abs())):
            assert_within_sizes(got_g, want_g, size_g, dtype)


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_weight_gradient_is_deterministic(device, backend):
    B, K, L, D = 64, 4, 4, 33  # few latents: each collects 64 (row, slot) pairs on average
    values = torch.rand(B, K, device=device)
    indices = torch.randint(0, L, (B, K), device=device)
    weight = leaf(torch.randn(L, D, device=device))
    g = torch.randn(B, D, device=device)
    with ae.backend(backend):
        runs = [torch.autograd.grad(ae.sparse_decode(values, indices, weight), weight, g)[0] for _ in range(4)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_gradcheck_float64(device, backend):
    values = leaf(torch.rand(4, 3, dtype=torch.float64, device=device))
    indices = torch.randint(0, 6, (4, 3), device=device)
    weight = leaf(torch.randn(6, 5, dtype=torch.float64, device=device))
    bias = leaf(torch.randn(5, dtype=torch.float64, device=device))
    with ae.backend(backend):
        assert torch.autograd.gradcheck(
            lambda v, w, b: ae.sparse_decode(v, indices, w, b), (values, weight, bias)
        )


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode"))
def test_decoder_and_fused_encoder_differentiate_twice(device, backend):
    """sparse_decode's backward kernel has a derivative (its own kernels again), so the
    decoder and the fused encoder, whose backward is built from them, differentiate
    twice: float64 gradgradcheck, and a gradient penalty as the reference's."""
    values = leaf(torch.rand(4, 3, dtype=torch.float64, device=device))
    indices = torch.randint(0, 6, (4, 3), device=device)
    weight = leaf(torch.randn(6, 5, dtype=torch.float64, device=device))
    bias = leaf(torch.randn(5, dtype=torch.float64, device=device))
    x = leaf(torch.randn(4, 5, dtype=torch.float64, device=device))
    fast = interpreted(device, backend)
    cases = {"sparse_decode": (lambda v, w, b: ae.sparse_decode(v, indices, w, b), (values, weight, bias)),
             "topk_encode": (lambda x, w: ae.topk_encode(x, w, None, 3)[0], (x, weight))}
    for name, (fn, inputs) in cases.items():
        with ae.backend(backend):
            assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast), name

        def penalty_gradients(backend):
            with ae.backend(backend):
                grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs, create_graph=True)
                return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)

        for got, want in zip(penalty_gradients(backend), penalty_gradients("reference")):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


_DECODE_BOTH_WIDTHS = """
import sys, torch
from aefast.ops._declare import kernels
ops = kernels("cpp")
torch.manual_seed(0)
results = []
for dtype, weight_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
    values = torch.randn(37, 9).to(dtype)
    indices = torch.randint(0, 40, (37, 9))
    weight, bias = torch.randn(41, 300).to(weight_dtype), torch.randn(300).to(dtype)
    grad = torch.randn(37, 300).to(dtype)
    results += [ops.sparse_decode_forward(values, indices, weight, bias),
                ops.sparse_decode_backward(grad, values, indices, weight, False)[1]]
torch.save(results, sys.argv[1])
"""


def test_sparse_decode_gives_the_same_bits_at_either_block_width(tmp_path):
    """The CPU forward adds 256 columns a block with AVX-512 and 128 with AVX2 (and the
    weight gradient alone sums its latents' rows the same way): each column summed in
    the same order, so the same bits. AEFAST_SIMD=avx2 in a second process gives 128."""
    from aefast import _C

    if _C.cpu_simd() != "avx512":
        pytest.skip("this CPU adds 128 columns a block at every level: one width to compare")
    files = []
    for level in ("avx512", "avx2"):
        files.append(tmp_path / f"{level}.pt")
        env = dict(os.environ, AEFAST_SIMD=level, OMP_NUM_THREADS="2")
        subprocess.run([sys.executable, "-c", _DECODE_BOTH_WIDTHS, str(files[-1])], env=env, check=True, timeout=300)
    wide, narrow = (torch.load(f) for f in files)
    for a, b in zip(wide, narrow, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_opcheck(device, backend):
    forward, backward = kernels(backend).sparse_decode_forward, kernels(backend).sparse_decode_backward
    values = torch.rand(6, 3, device=device, requires_grad=True)
    indices = torch.randint(0, 9, (6, 3), device=device)
    weight = torch.randn(9, 4, device=device, requires_grad=True)
    torch.library.opcheck(forward, (values, indices, weight, None))
    torch.library.opcheck(forward, (values, indices, weight, torch.randn(4, device=device)))
    torch.library.opcheck(backward, (torch.randn(6, 4, device=device), values.detach(), indices, weight.detach()))
    torch.library.opcheck(backward, (torch.randn(6, 4, device=device), values.detach(), indices, weight.detach(), False))


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_backward_without_the_values_gradient(device, backend, poisoned):
    """values_grad=False (the fused encoder's weight gradient): the same weight gradient,
    bit for bit, and an empty values gradient instead of B * K dot products. (On CPU, rows
    of 64 columns or more take both gradients in one walk by latent: still the same bits.)
    Latent L - 1 is named by no pair."""
    backward = kernels(backend).sparse_decode_backward
    B, K, L = 37, 5, 23
    for dtype, D in [(dtype, D) for dtype in dtypes_for(device, backend) for D in (19, 300)]:
        values = torch.randn(B, K, device=device).to(dtype)
        indices = torch.randint(0, L - 1, (B, K), device=device)
        weight, grad_out = torch.randn(L, D, device=device).to(dtype), torch.randn(B, D, device=device).to(dtype)
        grad_values, grad_weight = backward(grad_out, values, indices, weight)
        no_values, only_weight = backward(grad_out, values, indices, weight, False)
        assert grad_values.shape == (B, K) and no_values.numel() == 0
        assert torch.equal(only_weight, grad_weight)
        want = torch.zeros(L, D, dtype=torch.float64, device=device).index_add_(
            0, indices.flatten(), values.double().flatten()[:, None] * grad_out.double().repeat_interleave(K, 0))
        assert_close(only_weight, want, dtype, scale=10)


class TinyTopKSAE(torch.nn.Module):
    def __init__(self, d=12, latents=40, k=4):
        super().__init__()
        self.enc = torch.nn.Linear(d, latents)
        self.dec = torch.nn.Parameter(torch.randn(latents, d) * 0.1)
        self.bias = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def forward(self, x):
        values, indices = ae.topk_sparse(self.enc(x), self.k)
        return (ae.sparse_decode(values, indices, self.dec, self.bias) - x).pow(2).mean()


class DenseWTA(torch.nn.Module):
    """Every op with a dense output (through scatter_rows on CPU), one loss."""

    def __init__(self, d=12, hidden=40):
        super().__init__()
        self.enc = torch.nn.Linear(d, hidden)

    def forward(self, x):
        h = self.enc(x)
        maps = h.view(x.shape[0], 4, 2, 5)
        dense = (ae.topk_mask(h, 4), ae.batch_topk(h, 3), ae.lifetime_topk(h, 0.3),
                 ae.spatial_wta(maps, lifetime_rate=0.5).view_as(h))
        return sum((d * h).sum() for d in dense)


# ---------------------------------------------------------------- top-k encoder


def integer_valued(shape, device, dtype, low=-3, high=4):
    """Small integers: every matmul order gives the same exact pre-activations (and many ties)."""
    return torch.randint(low, high, shape).to(device, dtype)


def assert_same_gradients(outputs, want_outputs, inputs, grad_outputs):
    """The gradients of `inputs` through `outputs` are those through `want_outputs`, bit for bit."""
    got = torch.autograd.grad(outputs, inputs, grad_outputs)
    want = torch.autograd.grad(want_outputs, inputs, grad_outputs)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode"))
def test_topk_encode_matches_reference(device, backend, poisoned):
    cases = [((37, 20, 300, 16), True), ((1, 1, 1, 1), False), ((130, 9, 5000, 64), True)]
    if interpreted(device, backend):
        cases = [((7, 20, 300, 6), True), ((1, 1, 1, 1), False)]
    for dtype in DTYPES:
        for (B, D, L, k), with_bias in cases:
            x = leaf(integer_valued((B, D), device, dtype))
            w = leaf(integer_valued((L, D), device, dtype, -2, 3))
            b = leaf(integer_valued((L,), device, dtype, -2, 3)) if with_bias else None
            with ae.backend(backend):
                values, indices = ae.topk_encode(x, w, b, k)
            want_values, want_indices = reference.topk_encode(x, w, b, k)
            assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
            g = integer_valued((B, k), device, dtype)
            assert_same_gradients(values, want_values, [t for t in (x, w, b) if t is not None], g)


@pytest.mark.parametrize("blocks", ["whole rows", "tiny blocks"])
@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_encode_rows_with_fewer_than_k_positive_units(device, backend, blocks, monkeypatch, poisoned):
    """A row with fewer than k positive pre-activations takes the ReLU's zeros at the
    lowest latent indices, not at its largest negative units (a CPU selects first and
    clamps after: such rows are chosen again). The negative units here are largest at
    every third latent, so the two differ."""
    import aefast.ops.decode as decode

    if blocks == "tiny blocks":  # short rows in some latent blocks and not in others
        for prefix in ("", "GPU_"):
            monkeypatch.setattr(decode, prefix + "ENCODER_BLOCK_ROWS", 5)
            monkeypatch.setattr(decode, prefix + "ENCODER_BLOCK_ELEMENTS", 5 * 37)
    B, D, L, k = 12, 5, 150, 16
    width = decode._encoder_tile(B, L)[1]
    # Under Triton's interpreter, tiny blocks are many launches: one dtype (the whole rows
    # take every dtype there, and tiny blocks every dtype on the other backends).
    for dtype in DTYPES[:1] if blocks == "tiny blocks" and interpreted(device, backend) else DTYPES:
        x = integer_valued((B, D), device, dtype, -1, 2)
        x[:4] = 0  # the bias alone: 4 positive units
        x[8:] *= 3  # many positive units
        x = leaf(x)
        w = leaf(integer_valued((L, D), device, dtype, -2, 3))
        bias = -1.0 - torch.arange(L) % 3
        bias[[7, 50, 123, 149]] = 2.0
        b = leaf(bias.to(device, dtype))
        positive = torch.stack([(part > 0).sum(1) for part in
                                torch.nn.functional.linear(x, w, b).split(width, 1)])  # per latent block and row
        assert (positive < k).any() and (positive >= min(k, width)).any()
        with ae.backend(backend):
            values, indices = ae.topk_encode(x, w, b, k)
            aux = ae.topk_encode_aux(x, w, b, k, (torch.arange(L) % 2 == 0).to(device), 20)
            few_dead = ae.topk_encode_aux(x, w, b, k, (torch.arange(L) < 6).to(device), 20)
        want_values, want_indices = reference.topk_encode(x, w, b, k)
        assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
        for got, dead in [(aux, torch.arange(L) % 2 == 0), (few_dead, torch.arange(L) < 6)]:
            for g, e in zip(got, reference.topk_encode_aux(x, w, b, k, dead.to(device), 20)):
                assert torch.equal(g, e)
        assert_same_gradients(values, want_values, (x, w, b), integer_valued((B, k), device, dtype))


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode"))
def test_topk_encode_gradcheck_opcheck_and_saved_tensors(device, backend):
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, device=device, requires_grad=True)
    with ae.backend(backend):
        assert torch.autograd.gradcheck(lambda *t: ae.topk_encode(*t, 7)[0], (x, w, b),
                                        fast_mode=interpreted(device, backend))
    torch.library.opcheck(kernels(backend).topk_encode, (x.float(), w.float(), b.float(), 7))
    torch.library.opcheck(kernels(backend).topk_encode, (x.float(), w.float(), None, 7))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with ae.backend(backend):
            ae.topk_encode(x, w, b, 7)
        assert saved and not [t for t in saved if t.shape == (5, 40)]
        reference.topk_encode(x, w, b, 7)
        assert [t for t in saved if t.shape == (5, 40)], "the reference saves the pre-activation: the check can fail"


DEAD_PATTERNS = {"some": lambda L: torch.arange(L) % 3 == 1, "none": lambda L: torch.zeros(L, dtype=torch.bool),
                 "all": lambda L: torch.ones(L, dtype=torch.bool), "fewer than k_aux": lambda L: torch.arange(L) < 2}


@pytest.mark.parametrize("pattern", list(DEAD_PATTERNS))
@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_encode_aux_matches_reference(device, backend, pattern, poisoned):
    cases = [(37, 20, 300, 16, 40), (1, 1, 3, 1, 3), (130, 9, 5000, 64, 256)]
    if interpreted(device, backend):
        cases = [(7, 20, 300, 6, 9), (1, 1, 3, 1, 3)]
    for dtype in DTYPES:
        for B, D, L, k, k_aux in cases:
            x = leaf(integer_valued((B, D), device, dtype))  # many ties: the tie rule is tested too
            w = leaf(integer_valued((L, D), device, dtype, -2, 3))
            b = leaf(integer_valued((L,), device, dtype, -2, 3))
            dead = DEAD_PATTERNS[pattern](L).to(device)
            with ae.backend(backend):
                got = ae.topk_encode_aux(x, w, b, k, dead, k_aux)
            want = reference.topk_encode_aux(x, w, b, k, dead, k_aux)
            for g, e in zip(got, want):
                assert torch.equal(g, e)
            assert torch.equal(got[0], reference.topk_encode(x, w, b, k)[0])  # the main selection unchanged
            live = ~dead[got[3]]  # aux slots on live latents are the padding: value 0
            assert torch.all(got[2][live] == 0) and torch.all(got[2] >= 0)
            g_main, g_aux = integer_valued((B, k), device, dtype), integer_valued((B, k_aux), device, dtype)
            assert_same_gradients((got[0], got[2]), (want[0], want[2]), (x, w, b), (g_main, g_aux))


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_encode_aux_gradcheck_opcheck_determinism(device, backend):
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, device=device, requires_grad=True)
    dead = (torch.arange(40) % 4 == 0).to(device)

    def both(*t):
        values, _, aux_values, _ = ae.topk_encode_aux(*t, 7, dead, 5)
        return values, aux_values

    with ae.backend(backend):
        assert torch.autograd.gradcheck(both, (x, w, b), fast_mode=interpreted(device, backend))
    torch.library.opcheck(kernels(backend).topk_encode_aux, (x.float(), w.float(), b.float(), 7, dead, 5))
    if not interpreted(device, backend):  # a minute in the interpreter; the bias path is the same code
        torch.library.opcheck(kernels(backend).topk_encode_aux, (x.float(), w.float(), None, 7, dead, 5))
    rows = 40 if interpreted(device, backend) else 300  # latents repeat across rows either way
    xs, ws = torch.randn(rows, 16, device=device), torch.randn(64, 16, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        with ae.backend(backend):
            values, _, aux_values, _ = ae.topk_encode_aux(xs, ws, None, 8, dead[:40].repeat(2)[:64], 16)
        runs.append(torch.autograd.grad(values.sum() + aux_values.pow(2).sum(), ws)[0])
    assert torch.equal(runs[0], runs[1])  # the same bits: no atomics in the weight gradient


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_encode_aux_with_an_infinite_live_latent(device, backend, poisoned):
    # A live latent at +inf (float16 overflows that way) is a main winner and no aux
    # candidate: the mask of live latents must make it -inf, not NaN (+inf + -inf).
    x = torch.randn(5, 6, device=device)
    w = torch.randn(20, 6, device=device)
    b = torch.zeros(20, device=device)
    b[3] = float("inf")
    dead = (torch.arange(20) % 5 == 0).to(device)  # latent 3 is live
    with ae.backend(backend):
        got = ae.topk_encode_aux(x, w, b, 4, dead, 6)
    for g, e in zip(got, reference.topk_encode_aux(x, w, b, 4, dead, 6)):
        assert torch.equal(g, e)
    assert (got[1][:, 0] == 3).all() and not got[2].isnan().any()


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_encode_blocks_merge_to_the_whole_rows_selection(device, backend, monkeypatch, poisoned):
    """Tiny blocks (3 rows x 5 latents): many latent blocks per row, candidates merged
    across them, ties (small integers) still to the lower latent index."""
    import aefast.ops.decode as decode

    for prefix in ("", "GPU_"):
        monkeypatch.setattr(decode, prefix + "ENCODER_BLOCK_ROWS", 3)
        monkeypatch.setattr(decode, prefix + "ENCODER_BLOCK_ELEMENTS", 15)
    assert decode._encoder_tile(10, 47) == decode._encoder_tile(10, 47, gpu=True) == (3, 5)
    x = leaf(integer_valued((10, 6), device, torch.float32))
    w = leaf(integer_valued((47, 6), device, torch.float32, -2, 3))
    b = leaf(integer_valued((47,), device, torch.float32, -2, 3))
    # Dead latents in every block; then only in the last two (blocks without any; with
    # fewer dead than k_aux = 9, slots of 0 at the lowest live latents; on CPU, with
    # k_aux = 5 of 7, each block's dead columns gathered, and none in most blocks).
    for dead, k, k_aux in [(torch.arange(47) % 4 == 1, 7, 9), (torch.arange(47) % 4 == 1, 1, 1),
                           (torch.arange(47) % 4 == 1, 12, 40), (torch.arange(47) >= 40, 7, 9),
                           (torch.arange(47) >= 40, 3, 5)]:
        dead = dead.to(device)  # k past a block's width, k_aux past the dead count
        with ae.backend(backend):
            got = ae.topk_encode_aux(x, w, b, k, dead, k_aux)
            main = ae.topk_encode(x, w, b, k)
        want = reference.topk_encode_aux(x, w, b, k, dead, k_aux)
        for g, e in zip((*got, *main), (*want, *want[:2])):
            assert torch.equal(g, e)
        assert_same_gradients((got[0], got[2]), (want[0], want[2]), (x, w, b),
                              (torch.ones_like(got[0]), torch.ones_like(got[2])))


class TinyFusedTopKSAE(TinyTopKSAE):
    def forward(self, x):
        values, indices = ae.topk_encode(x, self.enc.weight, self.enc.bias, self.k)
        return (ae.sparse_decode(values, indices, self.dec, self.bias) - x).pow(2).mean()


@pytest.mark.slow
@pytest.mark.parametrize(("model_class", "parameter"),
                         [(TinyTopKSAE, "dec"), (TinyFusedTopKSAE, "enc.weight"), (DenseWTA, "enc.weight")],
                         ids=["topk_sparse+sparse_decode", "topk_encode", "dense_outputs"])
@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode"))
def test_torch_compile_fullgraph(device, backend, model_class, parameter):
    torch.manual_seed(0)
    model = model_class().to(device)
    assert_compiled_matches_eager(model, torch.randn(10, 12, device=device), model.get_parameter(parameter), backend)


@pytest.mark.parametrize("device", DEVICES)
class TestBadInput:
    def test_topk_encode_arguments(self, device):
        x, w = torch.randn(4, 6, device=device), torch.randn(10, 6, device=device)
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\]"):
            ae.topk_encode(x, w, None, 11)
        with pytest.raises(ValueError, match="weight must be 2-D of shape"):
            ae.topk_encode(x, w.t(), None, 2)
        with pytest.raises(ValueError, match="bias must be None or of shape"):
            ae.topk_encode(x, w, torch.randn(6, device=device), 2)

    def test_topk_encode_aux_arguments(self, device):
        x, w = torch.randn(4, 6, device=device), torch.randn(10, 6, device=device)
        dead = torch.zeros(10, dtype=torch.bool, device=device)
        with pytest.raises(ValueError, match=r"k_aux must be an integer in \[1, 10\]"):
            ae.topk_encode_aux(x, w, None, 2, dead, 11)
        with pytest.raises(ValueError, match=r"dead must be a bool tensor of shape \(L=10,\)"):
            ae.topk_encode_aux(x, w, None, 2, dead.long(), 3)
        with pytest.raises(ValueError, match=r"dead must be a bool tensor of shape \(L=10,\)"):
            ae.topk_encode_aux(x, w, None, 2, dead[:5], 3)

    def test_sparse_decode_arguments(self, device):
        values = torch.rand(4, 2, device=device)
        indices = torch.randint(0, 5, (4, 2), device=device)
        weight = torch.randn(5, 3, device=device)
        with pytest.raises(ValueError, match="indices must be an int64 tensor"):
            ae.sparse_decode(values, indices.int(), weight)
        with pytest.raises(ValueError, match="weight must be 2-D"):
            ae.sparse_decode(values, indices, weight.double())
        with pytest.raises(ValueError, match="bias must be None or of shape"):
            ae.sparse_decode(values, indices, weight, torch.zeros(4, device=device))
        linear = torch.nn.Linear(5, 3).to(device)  # weight (3, 5): its own layout is the transposed one
        with pytest.raises(ValueError, match=r"the weight looks transposed .* pass its weight.t\(\)"):
            ae.sparse_decode(values, indices, linear.weight, linear.bias)
        assert ae.sparse_decode(values, indices, linear.weight.t(), linear.bias).shape == (4, 3)
        if device == "cpu":
            for backend in ["reference"] + [b for b in ae.available_backends(device) if b in OPERATORS["sparse_decode"].kernel_backends]:
                with ae.backend(backend), pytest.raises(IndexError, match=r"indices must be in \[0, 5\)"):
                    ae.sparse_decode(values, indices - 5, weight)  # negative: the reference once took them
        else:  # no host check on a GPU: the rows with a bad index come back NaN
            assert torch.isnan(ae.sparse_decode(values, indices + 5, weight)).all()


# ---------------------------------------------------------------- the top-k SAE model on the fused path


def _topk_sae(device, dead_steps=1):
    from aefast.models import TopKSAE

    torch.manual_seed(0)
    model = TopKSAE(12, n_latents=48, k=4, k_aux=6, dead_steps=dead_steps).to(device)
    model.steps_since_fired[::3] = 5  # a third of the latents dead: AuxK has work
    return model


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux"))
def test_topk_sae_loss_compiles_fullgraph_with_its_bookkeeping(device, backend):
    """No host sync, no branch on a tensor's value: the whole training loss, dead-latent
    bookkeeping included, is one graph, and gives the eager loss, gradients and counters."""
    x = torch.randn(10, 12, device=device)
    results = []
    for compiled in (False, True):
        model = _topk_sae(device)
        loss = torch.compile(lambda t: model.loss(t)["loss"], fullgraph=True, backend="aot_eager") \
            if compiled else (lambda t: model.loss(t)["loss"])
        torch._dynamo.reset()
        with ae.backend(backend):
            value = loss(x)
            grads = torch.autograd.grad(value, [model.encoder_weight, model.decoder_weight, model.encoder_bias])
        fired = model.fired_in_step.clone()
        model.after_step()  # counts the step
        results.append((value, grads, fired, model.steps_since_fired.clone()))
    (eager, eager_grads, *eager_counts), (compiled, compiled_grads, *compiled_counts) = results
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)
    assert eager_counts[0].any()
    for c, e in zip(compiled_counts, eager_counts):
        assert torch.equal(c, e)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode_aux", interpreted_too=False))
def test_topk_sae_keeps_no_dense_code_and_steps_deterministically(device, backend):
    model, x = _topk_sae(device), torch.randn(30, 12, device=device)
    saved = []
    with ae.backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        terms = model.loss(x)
    assert saved and not [t for t in saved if t.dim() == 2 and t.shape[-1] == 48]  # no (B, L) kept for backward
    assert float(terms["auxk"]) > 0
    values, _ = model.winners(x)
    assert torch.all(values >= 0)  # TopK(ReLU(.)): negative pre-activations never decode
    states = []
    for _ in range(2):
        model = _topk_sae(device)
        optimizers = model.configure_optimizers(1e-2)
        with ae.backend(backend):
            for _ in range(3):
                model.train_step(x, optimizers)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])  # bit-identical runs
