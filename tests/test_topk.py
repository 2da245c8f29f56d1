"""The top-k family (topk_sparse, topk_mask, batch_topk, lifetime_topk, spatial_wta,
scatter_rows, and the CPU's topk_mask_rows, topk_mask_index_order, column_topk and keep_rows) against
aefast/reference.py, on every backend with kernels."""

import os
import pathlib
import shlex
import subprocess
import sys
import sysconfig

import pytest
import torch
from background import BackgroundRun

import aefast as ae
from aefast import backends, reference
from aefast.ops._declare import KERNELS, OPERATORS, kernels
from conftest import DEVICES, interpreted, leaf, op_backends

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_topk_sparse_matches_reference(x, k, backend):
    """topk_sparse (relu=False) on `backend`: the reference's indices and values exactly."""
    with ae.backend(backend):
        values, indices = ae.topk_sparse(x, k, relu=False)
    want_values, want_indices = reference.topk_sparse(x, k, relu=False)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    return values, indices


def rows(shape, dtype, device, *, ties=False):
    # With ties, few distinct values: most of the selection is decided by tie-breaking.
    x = torch.randint(-3, 4, shape).double() if ties else torch.randn(shape, dtype=torch.float64)
    return x.to(device, dtype)


# The CPU's three ways (topk.cpp): block selection for rows of 256 or more with more
# than 16 elements per winner ((5, 512) with k = 31; (2, 4100) and (3, 30000) with k =
# 200 end in a short tile, (3, 2000) is one tile, (2, 70001) several; their cut keeps
# more than 128 candidates in index order, as at (3, 30000)); radix select from 8 winners where they
# are more, or the row is too short for blocks ((5, 512) and (5, 496) with k = 32, (3,
# 1000) with k = 1000, (4, 4096) with k = 300, (4, 2048) with k = 200, (2, 100000) with
# k = 3000: too many winners for blocks); the heap below 8 winners in short rows ((4097,
# 33), (3, 100)). Winners are ranked by counting up to 128, with AVX-512 up to 256 (k =
# 200), by radix sort beyond (k = 300, 1000, 3000).
CASES = [((1, 1), 1), ((1, 7), 3), ((3, 1000), 1), ((3, 1000), 32), ((3, 1000), 1000),
         ((4097, 33), 5), ((2, 70001), 64), ((2, 40000), 1), ((3, 30000), 200), ((2, 4100), 8),
         ((3, 2000), 3), ((5, 512), 31), ((5, 512), 32), ((5, 496), 32), ((3, 100), 7), ((4, 4096), 300),
         ((4, 2048), 200), ((2, 100000), 3000)]
# Under Triton's interpreter every selection round is NumPy code: smaller rows there.
INTERPRETED_CASES = [((1, 1), 1), ((1, 7), 3), ((3, 300), 1), ((3, 300), 7), ((3, 300), 300), ((5, 33), 5)]


def topk_cases():
    return [pytest.param(d, b, shape, k, id=f"{d}-{b}-{shape}-{k}")
            for d, b in (p.values for p in op_backends("topk_sparse"))
            for shape, k in (INTERPRETED_CASES if interpreted(d, b) else CASES)]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize(("device", "backend", "shape", "k"), topk_cases())
def test_topk_sparse_and_mask_match_reference(device, backend, shape, k, ties, poisoned):
    for dtype in DTYPES:
        for relu in (True, False):
            x = leaf(rows(shape, dtype, device, ties=ties))
            with ae.backend(backend):
                values, indices = ae.topk_sparse(x, k, relu=relu)
                mask = ae.topk_mask(x, k, relu=relu)
            want_values, want_indices = reference.topk_sparse(x, k, relu)
            assert indices.dtype == torch.long and values.dtype == dtype
            assert torch.equal(indices, want_indices)
            assert torch.equal(values, want_values)
            assert torch.equal(mask, reference.topk_mask(x, k, relu))
            g = torch.randn_like(values)
            (grad,) = torch.autograd.grad(values, x, g)
            (want_grad,) = torch.autograd.grad(want_values, x, g)
            assert torch.equal(grad, want_grad)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_opcheck(device, backend):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    torch.library.opcheck(kernels(backend).topk_forward, (x, 3, True))
    torch.library.opcheck(kernels(backend).topk_forward, (x, 20, False))
    if backend == "cpp":
        values, indices = torch.randn(6, 4, requires_grad=True), torch.randperm(20)[:4].repeat(6, 1)
        torch.library.opcheck(kernels(backend).scatter_rows, (values, indices, 20))


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_topk_with_infinities_and_long_rows(device, backend, poisoned):
    x = torch.randn(2, 1 << (10 if interpreted(device, backend) else 20), device=device)
    x[0, :1000] = float("-inf")
    x[1] = float("-inf")
    hot = 12345 % x.shape[1]
    x[1, hot] = 3.0
    _, indices = assert_topk_sparse_matches_reference(x, 64, backend)
    rest = torch.tensor([i for i in range(64) if i != hot][:63], device=device)  # -inf ties: lowest first
    assert indices[1, 0] == hot and torch.equal(indices[1, 1:], rest)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_rows_mostly_tied_at_the_bar(device, backend, poisoned):
    """Rows of one repeated value (ReLU's zeros; AuxK's -inf on live latents) with a few
    values above it, fewer and more than k, early and late in long rows: the winners
    are those, then the lowest-index ties (the CPU's block selection keeps only the
    first k ties it meets)."""
    torch.manual_seed(0)
    width = 1 << (9 if interpreted(device, backend) else 14)  # 2 chunks of 256 interpreted
    for fill in (0.0, float("-inf")):
        for above in (0, 1, 5, 31, 32, 33, 200):
            x = torch.full((3, width), fill, dtype=torch.float64)
            for r in range(3):
                x[r, torch.randperm(width)[:above]] = torch.rand(above, dtype=torch.float64) + 0.5
            x[2, :above] = fill  # none of them at the front
            for dtype in DTYPES:
                assert_topk_sparse_matches_reference(x.to(device, dtype), 32, backend)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_signed_zeros_tie_by_index_in_every_dtype(device, backend, poisoned):
    # -0.0 and +0.0 are one value: ties to the lower index whatever the sign bits (the
    # CUDA kernel compares integer keys of the bits, where -0.0 must take +0.0's). The
    # C++ kernels return x's own elements, sign bits included (Triton's stores the
    # maximum it found, a zero of either sign). A long row too, which the CUDA kernel
    # splits over blocks.
    torch.manual_seed(0)
    choices = torch.tensor([-0.0, 0.0, 1.0, -1.0, float("-inf"), float("inf")], dtype=torch.float64)
    shapes = [((3, 300), (1, 7, 150, 300))]
    if not interpreted(device, backend):
        shapes.append(((1, 1 << 18), (1, 64, 5000)))
    for shape, ks in shapes:
        x = choices[torch.randint(0, len(choices), shape)]
        for dtype in DTYPES:
            xd = x.to(device, dtype)
            for k in ks:
                with ae.backend(backend):
                    values, indices = ae.topk_sparse(xd, k, relu=False)
                want_values, want_indices = reference.topk_sparse(xd.cpu(), k, relu=False)
                assert torch.equal(indices.cpu(), want_indices)
                assert torch.equal(values.cpu(), want_values)
                if backend != "triton":
                    assert torch.equal(values.cpu().signbit(), want_values.signbit())


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_one_winner_per_block_of_sixteen(device, backend, poisoned):
    """Each block of 16 holds one large value, the rest far below: k winners need k
    blocks, the bound the CPU's block selection rests on (at k = blocks + 1 the
    smallest block maximum has fewer than k elements at or above it)."""
    torch.manual_seed(0)
    for width, k in [(496, 32), (512, 32), (512, 31), (4096, 256), (4112, 257)]:
        x = torch.full((3, width), -1e6)
        x[:, torch.arange(0, width, 16) + torch.randint(0, 16, (width // 16,))] = torch.randn(3, width // 16)
        x = x.to(device)
        with ae.backend(backend):
            values, indices = ae.topk_sparse(x, k, relu=False)
        want_values, want_indices = reference.topk_sparse(x.cpu(), k, relu=False)
        assert torch.equal(indices.cpu(), want_indices) and torch.equal(values.cpu(), want_values)


def sampled_lines(width):
    """Where the CPU's radix select samples a row of `width` for its bar (topk_radix.cpp,
    bracketed_candidates): 16 lines of 16 elements spread evenly."""
    return torch.cat([torch.arange(16) + (width - 16) * line // 15 for line in range(16)])


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_many_winners_whatever_the_sample_shows(device, backend, poisoned):
    """Rows with many winners (the CPU's radix select): a sample that holds the row's
    largest values (its bar misses, and the whole row is counted), one that holds its
    smallest (a bar that keeps most of the row), ReLU rows with fewer positives than k
    (ties at zero to the lowest indices), and NaN anywhere, in rows long enough for a
    sampled bar and in shorter ones."""
    torch.manual_seed(0)
    for width, k in [(4096, 300), (8192, 128), (20000, 1000), (700, 100)]:
        lines = sampled_lines(width)
        high, low, relu = torch.randn(3, width), torch.randn(3, width), torch.randn(3, width)
        high[:, lines] += 100.0
        low[:, lines] -= 100.0
        relu[:, : width - k // 2] = relu[:, : width - k // 2].clamp_max(0.0)  # k / 2 positives at most
        for x in (high, low, relu.relu()):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                assert_topk_sparse_matches_reference(x.to(device, dtype), k, backend)
        for where in (int(lines[37]), width - 1, width // 3):  # in the sample, last, elsewhere
            x = torch.randn(2, width)
            x[1, where] = float("nan")
            assert_nan_reported(device, backend, lambda: ae.topk_sparse(x.to(device), k)[0])


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_one_long_row_split_into_parallel_chunks(device, backend, poisoned):
    # A single row (as batch_topk makes) is scanned in chunks whose candidates are
    # merged: ties across chunk boundaries must still go to the lower index.
    for x in (torch.randn(1, 1 << 20), torch.randint(-2, 3, (1, 1 << 20)).float()):
        x = x.to(device)
        for k in (1, 64, 5000):
            assert_topk_sparse_matches_reference(x, k, backend)


def test_scatter_rows_writes_every_element_once(poisoned):
    # The CPU kernel behind dense top-k outputs and the selection's gradient.
    op = torch.ops.aefast.scatter_rows
    for dtype in DTYPES:
        for B, k, width in ((1, 1, 1), (5, 7, 33), (3, 64, 20001)):
            values = torch.randn(B, k, dtype=torch.float64).to(dtype)
            indices = torch.stack([torch.randperm(width)[:k] for _ in range(B)])
            want = torch.zeros(B, width, dtype=dtype).scatter_(1, indices, values)
            assert torch.equal(op(values, indices, width), want)
    values = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(9)[:3] for _ in range(4)])
    assert torch.autograd.gradcheck(lambda v: op(v, indices, 9), (values,))
    assert torch.autograd.gradgradcheck(lambda v: op(v, indices, 9), (values,))
    torch.library.opcheck(op.default, (values, indices, 9))
    with pytest.raises(IndexError, match=r"indices must be in \[0, 9\)"):
        op(values.detach(), indices + 7, 9)
    with pytest.raises(ValueError, match="values and indices must both be"):
        op(values.detach(), indices[:, :2], 9)


def test_scatter_rows_streams_large_outputs_and_still_checks_indices(poisoned):
    # From 8 MiB on, float32 rows on 32-byte boundaries are built in a zeroed buffer and
    # written around the caches: every element still written, a bad index still reported.
    op = torch.ops.aefast.scatter_rows
    B, k, width = 257, 40, 8192  # 8.4 MB
    values = torch.randn(B, k)
    indices = torch.rand(B, width).argsort(1)[:, :k]
    want = torch.zeros(B, width).scatter_(1, indices, values)
    assert torch.equal(op(values, indices, width), want)
    assert torch.equal(op(values, indices, width), want)  # the buffer is left zeroed
    for wrong in (width, -1):  # past the end, before the start: reported, never written
        bad = indices.clone()
        bad[-1, 3] = wrong
        with pytest.raises(IndexError, match=rf"indices must be in \[0, {width}\)"):
            op(values, bad, width)


def test_scatter_rows_with_fewer_rows_than_threads(poisoned):
    # Fewer rows than threads: the threads zero ranges of 64K elements, and write the
    # values of a range right after its zeros where every row's indices ascend.
    op = torch.ops.aefast.scatter_rows
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            # The last two from 8 MiB on: float32 ranges streamed (a tail past a multiple of 8)
            for B, k, width in ((1, 5000, 300007), (2, 3000, 70001), (2, 1, 1), (1, 20000, 2100003), (2, 7000, 1050001)):
                values = torch.randn(B, k).to(dtype)
                picked = torch.stack([torch.randperm(width)[:k] for _ in range(B)])
                for indices in (picked.sort(1).values, picked):  # ascending, then in no order
                    want = torch.zeros(B, width, dtype=dtype).scatter_(1, indices, values)
                    assert torch.equal(op(values, indices, width), want)
        for width in (300000, 2100000):
            indices = torch.arange(0, width, 100).view(1, -1)
            values = torch.randn(indices.shape)
            for bad in (indices - 1, indices + 1000, indices.flip(1) + 1000):  # below, above, not ascending
                with pytest.raises(IndexError, match=rf"indices must be in \[0, {width}\)"):
                    op(values, bad, width)
    finally:
        torch.set_num_threads(threads)


def assert_nan_reported(device, backend, topk_values):
    """NaN in x raises on CPU and with the reference; aefast's GPU kernels, which would
    stall the host to raise, return NaN values instead."""
    with ae.backend(backend):
        if device == "cuda" and backend != "reference":
            assert torch.isnan(topk_values()).all()
        else:
            with pytest.raises(ValueError, match="x contains NaN"):
                topk_values()


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_nan_is_found_in_every_kind_of_block(device, backend):
    # A row of 820: six runs of 8 blocks of 16 (the vector loop), three blocks one at a
    # time (still vectors), then a tail of 4 (scalar); a NaN in any of them raises.
    for at in (3, 700, 775, 800, 818):
        x = torch.randn(3, 820, device=device)
        x[1, at] = float("nan")
        assert_nan_reported(device, backend, lambda: ae.topk_sparse(x, 32, relu=False)[0])
        x[1, at] = 0.0
        with ae.backend(backend):
            got = ae.topk_sparse(x, 32, relu=False)
        for g, e in zip(got, reference.topk_sparse(x, 32, relu=False)):
            assert torch.equal(g, e)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_enough_long_rows_for_a_block_each_in_one_pass_or_by_radix(device, backend, monkeypatch, poisoned):
    """Rows enough to fill a GPU with a block each, long enough for the CUDA top-k's one
    pass (a bar from a sample, then the candidates): it and the radix passes
    (AEFAST_CUDA_TOPK=radix) both give the reference's winners, on ReLU outputs (half of
    them zeros, some -0.0), rows of seven values, rows with infinities and rows of -inf
    with ten values. (The CPU and Triton take the same rows their own ways.)"""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 16
    x = torch.randn(8 * sms, 16384, device=device).relu_()
    x[::5] = torch.randint(-3, 4, x[::5].shape, device=device).float()
    x[1::5, ::3] = -0.0  # ties with +0.0
    x[2::5, 100:130] = float("inf")
    x[3::5] = float("-inf")  # AuxK's live latents: every key one value, but for a few
    x[3::5, 5000:5010] = 1.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for way in ("", "radix") if backend == "cuda" else ("",):  # (the CUDA kernels' choice)
            monkeypatch.setenv("AEFAST_CUDA_TOPK", way)
            assert_topk_sparse_matches_reference(x.to(dtype), 32, backend)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse", interpreted_too=False))
def test_long_rows_with_signed_zeros_late_winners_and_late_nan(device, backend, poisoned):
    # -0.0 and +0.0 tie (lower index first); winners only in the last tile; blocks of
    # -inf and a few +inf; a NaN after the first tile of a long row is still found.
    x = torch.zeros(4, 50000)
    x[:, 1::3] = -0.0
    x[1, -100:] = torch.arange(100.0)
    x[2] = -torch.rand(50000)
    x[2, 49000:49010] = 5.0
    x[3] = torch.randn(50000)  # masked logits: -inf runs, and a few +inf
    x[3, :3000] = float("-inf")
    x[3, [7, 20000, 45001]] = float("inf")
    x = x.to(device)
    for k in (1, 40, 300):
        assert_topk_sparse_matches_reference(x, k, backend)
    x[0, 40000] = float("nan")
    assert_nan_reported(device, backend, lambda: ae.topk_sparse(x, 8)[0])


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_batch_lifetime_and_spatial_match_reference(device, backend, poisoned):
    batch = 9 if interpreted(device, backend) else 37
    for dtype in DTYPES:
        x = leaf(rows((batch, 29), dtype, device))
        conv = leaf(rows((9, 4, 5, 7), dtype, device))
        with ae.backend(backend):
            got = [ae.batch_topk(x, 3), ae.batch_topk(x, 2, relu=False), ae.lifetime_topk(x, 0.1),
                   ae.spatial_wta(conv), ae.spatial_wta(conv, lifetime_rate=0.3)]
        want = [reference.batch_topk(x, 3), reference.batch_topk(x, 2, False), reference.lifetime_topk(x, 0.1),
                reference.spatial_wta(conv), reference.spatial_wta(conv, 0.3)]
        for a, b in zip(got, want):
            assert torch.equal(a, b)
            g = torch.randn_like(a)
            inputs = x if a.dim() == 2 else conv
            assert torch.equal(torch.autograd.grad(a, inputs, g)[0], torch.autograd.grad(b, inputs, g)[0])
    with ae.backend(backend):
        assert int((ae.batch_topk(x, 3, relu=False) != 0).sum()) == 3 * batch
        assert ((ae.lifetime_topk(x, 0.1) != 0).sum(0) == reference.lifetime_count(0.1, batch)).all()


@pytest.mark.parametrize(("device", "backend"), [p for p in op_backends("batch_topk") if p.values[1] == "triton"])
def test_triton_sorts_a_long_row_in_segments_with_the_same_winners(device, backend, monkeypatch):
    """Past MAX_ROUNDS_K winners the Triton top-k sorts; a row longer than SORT_CHUNK (as
    BatchTopK's one row of B * L can be, past the 2^31 elements torch.sort takes) goes a
    segment at a time (here 320: 3 or 4 segments, then a second level of merging for the
    (3, 400)), ties still to the lowest index."""
    import aefast.triton_kernels.topk as triton_topk

    monkeypatch.setattr(triton_topk, "SORT_CHUNK", 320)
    for shape, k, ties in [((13, 57), 11, True), ((13, 57), 12, False), ((3, 400), 45, True)]:
        x = leaf(rows(shape, torch.float32, device, ties=ties))
        assert triton_topk.MAX_ROUNDS_K < k * shape[0] < 320 // 2  # the sort path, in segments
        with ae.backend(backend):
            got = ae.batch_topk(x, k)
        want = reference.batch_topk(x, k)
        assert torch.equal(got, want)
        g = torch.randn_like(got)
        assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
    x = rows((13, 57), torch.float32, device)
    x[7, 30] = float("nan")  # found in its segment, and again in the merge
    with ae.backend(backend):
        if device == "cuda":  # no host check on a GPU: NaN comes back
            assert torch.isnan(ae.batch_topk(x, 11)).any()
        else:
            with pytest.raises(ValueError, match="x contains NaN"):
                ae.batch_topk(x, 11)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_gradcheck_float64(device, backend):
    # distinct, well separated, and never 0 (where ReLU has no derivative for gradcheck to agree on)
    x = leaf(((torch.randperm(60).double().view(4, 15) + 0.5) / 7 - 4).to(device))
    fast = interpreted(device, backend)  # the interpreter: the fast (vJu) check
    with ae.backend(backend):
        assert torch.autograd.gradcheck(lambda t: ae.topk_sparse(t, 4)[0], (x,), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda t: ae.topk_mask(t, 3, relu=False), (x,), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda t: ae.batch_topk(t, 2), (x,), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda t: ae.lifetime_topk(t, 0.5), (x,), fast_mode=fast)
        # 4 images of 3 maps of 5 x 1 (each map's winner, then the lifetime cut over them)
        assert torch.autograd.gradcheck(lambda t: ae.spatial_wta(t.view(4, 3, 5, 1), lifetime_rate=0.5), (x,),
                                        fast_mode=fast)


def test_every_backend_has_topk_kernels_and_a_forced_one_that_cannot_run_says_so():
    if backends.CPP_BUILT:  # one C++ op (and one fused encoder over it) for cpp and cuda
        for op in ("topk_sparse", "topk_mask", "batch_topk", "lifetime_topk", "spatial_wta", "topk_encode"):
            assert OPERATORS[op].backends == backends.BACKENDS
        assert kernels("cuda").topk_forward is kernels("cpp").topk_forward
        assert kernels("cuda").topk_encode is kernels("cpp").topk_encode
        assert KERNELS["scatter_rows"].backends == ("reference", "cpp")  # a CPU kernel only
    x, w = torch.randn(3, 5), torch.randn(7, 5)
    for run in (lambda: ae.topk_sparse(x, 2), lambda: ae.batch_topk(x, 2), lambda: ae.lifetime_topk(x, 0.5),
                lambda: ae.spatial_wta(x.view(3, 5, 1, 1)), lambda: ae.topk_encode(x, w, None, 2)):
        with ae.backend("cuda"), pytest.raises(RuntimeError, match="'cuda' cannot run cpu tensors"):
            run()
    with ae.backend("cuda"), pytest.raises(RuntimeError, match="has no kernel for topk_sparse"):
        backends.resolve(torch.device("cuda"), "topk_sparse", ("cpp", "triton"))
    with ae.backend("reference"):
        assert torch.equal(ae.topk_sparse(x, 2)[1], reference.topk_sparse(x, 2)[1])


@pytest.mark.parametrize("device", DEVICES)
class TestBadInput:
    def test_k_out_of_range(self, device):
        x = torch.randn(3, 5, device=device)
        for k in (0, -1, 6, 2.0, True):
            with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
                ae.topk_sparse(x, k)
            with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
                ae.batch_topk(x, k)

    def test_rate_out_of_range(self, device):
        x = torch.randn(3, 5, device=device)
        for rate in (0.0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\]"):
                ae.lifetime_topk(x, rate)
            with pytest.raises(ValueError, match=r"lifetime_rate must be a number in \(0, 1\]"):
                ae.spatial_wta(x.view(3, 5, 1, 1), lifetime_rate=rate)

    def test_wrong_rank(self, device):
        with pytest.raises(ValueError, match="x must be 2-D"):
            ae.topk_mask(torch.randn(3, device=device), 1)
        with pytest.raises(ValueError, match="x must be 4-D"):
            ae.spatial_wta(torch.randn(3, 4, device=device))

    def test_nan(self, device):
        x = torch.randn(3, 100, device=device)
        x[1, 57] = float("nan")
        for backend in ["reference"] + [b for b in ae.available_backends(device)
                                     if b in OPERATORS["topk_sparse"].kernel_backends]:
            assert_nan_reported(device, backend, lambda: ae.topk_sparse(x, 3)[0])


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_sparse"))
def test_spatial_wta_with_dead_maps_has_no_nan(device, backend):
    x = torch.randn(6, 3, 4, 4, device=device)
    x[2, 1] = float("-inf")  # a map with no finite value: its maximum loses the lifetime cut
    with ae.backend(backend):
        out = ae.spatial_wta(x, lifetime_rate=0.5)
    assert not torch.isnan(out).any()
    assert torch.equal(out, reference.spatial_wta(x, 0.5))
    assert ((out != 0).flatten(2).sum(2) <= 1).all()


def test_triton_launchers_report_nan_and_bad_indices_on_the_device():
    """The Triton launchers never read a device value on the host (a GPU would stall
    every call): NaN in x comes back as a flag and NaN values, and an index out of
    range reads nothing and makes its outputs NaN. The ops raise on CPU tensors only."""
    from aefast.triton_kernels import decode as decode_kernels
    from aefast.triton_kernels import topk as topk_kernels

    x = torch.randn(3, 700)
    for k in (5, 200):  # the chunked rounds and the sort path
        values, indices, nan = topk_kernels.topk_forward(x, k, True)
        assert not bool(nan) and torch.equal(indices, reference.topk_sparse(x, k)[1])
        x[1, 650] = float("nan")
        values, indices, nan = topk_kernels.topk_forward(x, k, True)
        assert bool(nan) and torch.isnan(values).all()
        assert torch.equal(indices, torch.arange(k).expand(3, k))  # safe to scatter
        x[1, 650] = 0.0
    values, weight = torch.randn(4, 3), torch.randn(9, 5)
    indices = torch.randint(0, 9, (4, 3))
    indices[2, 1] = -1
    out = decode_kernels.sparse_decode_forward(values, indices, weight, None)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()
    grad_values, grad_weight = decode_kernels.sparse_decode_backward(torch.ones(4, 5), values, indices, weight)
    assert torch.isnan(grad_values[2, 1]) and not torch.isnan(grad_values.flatten()[[0, 1, 2, 3, 4, 6]]).any()
    kept = indices.clone()
    kept[2, 1] = 0
    masked = values.clone()
    masked[2, 1] = 0.0  # the bad pair adds to no latent's gradient
    expected = reference.sparse_decode(masked, kept, weight)
    torch.testing.assert_close(out[[0, 1, 3]], expected[[0, 1, 3]])  # the rows with good indices
    torch.testing.assert_close(grad_weight, torch.autograd.functional.vjp(
        lambda w: reference.sparse_decode(masked, kept, w), weight, torch.ones(4, 5))[1])


# ------------------------------------------- topk_mask_index_order: batch_topk on CPU


def mask_index_order_reference(x, k, relu):
    """The winners' indices in increasing order, and x with all but them zeroed."""
    values, indices = reference.topk_sparse(x, k, relu)
    indices, order = indices.sort(dim=1)
    return torch.zeros_like(x, memory_format=torch.contiguous_format).scatter(1, indices, values.gather(1, order)), indices


def index_order_inputs(shape, kind, dtype, *, transposed):
    """(R, n) inputs, as a contiguous tensor or as the transpose of one (lifetime_topk's x.t())."""
    stored = shape[::-1] if transposed else shape
    if kind == "normal":
        x = torch.randn(stored, dtype=torch.float64)
    elif kind == "ties":  # most of the selection decided at the bar, by index
        x = torch.randint(-3, 4, stored).double()
    elif kind == "zeros":  # signed zeros tie; infinities at both ends
        choices = torch.tensor([-0.0, 0.0, 1.0, -1.0, float("-inf"), float("inf")], dtype=torch.float64)
        x = choices[torch.randint(0, len(choices), stored)]
    elif kind == "relu":  # ReLU's zeros, a few values above them: fewer than k in most columns
        x = torch.relu(torch.randn(stored, dtype=torch.float64) - 2.0)
    elif kind == "close":  # float32's within one bfloat16 step: lifetime_topk's first passes cannot part them
        x = 1.0 + 1e-4 * torch.randn(stored, dtype=torch.float64)
    else:  # "sorted": every winner at the end, where a sampled bar's chunks overflow
        x = torch.arange(stored[0] * stored[1], dtype=torch.float64).view(stored) / 7
    x = x.to(dtype)
    return x.t() if transposed else x


# Long rows take the sampled bar and write the output as they filter (n >= 65536,
# k >= 256; most of the row winning too: (1, 2^17) with k = 50000, (1, 70000) with k =
# 69000, whose bar is the sample's smallest); anything else (a transposed input too)
# topk_forward, then a scatter. 3 x (2^20 + 1) float32 is streamed (8 MiB or more), its
# first row's chunks on whole lines, the others not.
INDEX_ORDER_CASES = [((1, 1 << 20), 5000, False), ((2, 70001), 300, False), ((1, 1 << 17), 16384, False),
                     ((1, 1 << 17), 50000, False), ((1, 70000), 69000, False),
                     ((37, 1000), 52, True), ((3, 1000), 40, False), ((3, (1 << 20) + 1), 5000, False)]


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "relu", "sorted"])
@pytest.mark.parametrize(("shape", "k", "transposed"), INDEX_ORDER_CASES, ids=str)
def test_mask_index_order_matches_reference(shape, k, transposed, kind, poisoned):
    op = kernels("cpp").topk_mask_index_order
    streamed = shape[0] * shape[1] * 4 >= 8 << 20
    for dtype in (torch.float32,) if streamed else DTYPES:
        x = leaf(index_order_inputs(shape, kind, dtype, transposed=transposed))
        for relu in (True, False):
            out, indices = op(x, k, relu)
            want_out, want_indices = mask_index_order_reference(x, k, relu)
            assert torch.equal(indices, want_indices), (dtype, relu)
            assert torch.equal(out, want_out) and torch.equal(out.signbit(), want_out.signbit()), (dtype, relu)
            g = torch.randn_like(want_out)
            assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want_out, x, g)[0])


def test_mask_index_order_reports_nan_late_in_a_long_row():
    op = kernels("cpp").topk_mask_index_order
    for dtype in DTYPES:
        for where in (-3, 1 << 19):  # past every sample position's stratum start; mid-row
            long_row = torch.randn(1, 1 << 20).to(dtype)
            long_row[0, where] = float("nan")
            with pytest.raises(ValueError, match="x contains NaN"):
                op(long_row, 300, False)


def test_mask_index_order_bad_arguments_name_what_is_wrong():
    op = kernels("cpp").topk_mask_index_order
    with pytest.raises(ValueError, match="x must be 2-D, got 1-D"):
        op(torch.randn(10), 2, False)
    for x in (torch.randn(3, 1000), torch.randn(1000, 3).t(), torch.randn(1, 1 << 16)):
        for k in (0, x.shape[1] + 1):
            with pytest.raises(ValueError, match=rf"k must be in \[1, {x.shape[1]}\], got {k}"):
                op(x, k, False)


def test_mask_index_order_gradcheck_and_opcheck():
    op = kernels("cpp").topk_mask_index_order
    x = leaf((torch.randperm(444).double().view(12, 37) + 0.5) / 7 - 22)  # distinct, a third negative
    assert torch.autograd.gradcheck(lambda t: op(t.t(), 5, False)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: op(t, 9, True)[0], (x,))
    torch.library.opcheck(op, (torch.randn(6, 20, requires_grad=True), 3, True))
    torch.library.opcheck(op, (torch.randn(20, 6, requires_grad=True).t(), 4, False))
    torch.library.opcheck(op, (torch.randn(1, 1 << 16, requires_grad=True), 512, True))


# ------------------------------------------- topk_mask_rows: topk_mask and spatial_wta on CPU

# Rows in one pass (block selection, the heap), one winner per row, and an output of
# 8 MiB or more (selected, then streamed by scatter_rows; 513 x 4100 is not on
# 32-byte boundaries past its first row, so it is not streamed).
MASK_ROWS_CASES = [((37, 1000), 32), ((5, 496), 32), ((4096, 64), 1), ((3, 7), 7), ((513, 4096), 32),
                   ((513, 4100), 5)]


@pytest.mark.parametrize(("shape", "k"), MASK_ROWS_CASES, ids=str)
def test_mask_rows_matches_reference(shape, k, poisoned):
    op = kernels("cpp").topk_mask_rows
    large = shape[0] * shape[1] * 4 >= 8 << 20
    for dtype in (torch.float32,) if large else DTYPES:
        for ties in (False, True):
            x = leaf(rows(shape, dtype, "cpu", ties=ties))
            for relu in (True, False):
                out, indices = op(x, k, relu)
                want_out, want_indices = KERNELS["topk_mask_rows"].reference(x, k, relu)
                assert torch.equal(indices, want_indices) and torch.equal(out, want_out), (dtype, ties, relu)
                g = torch.randn_like(out)
                (grad,) = torch.autograd.grad(out, x, g)
                (want_grad,) = torch.autograd.grad(want_out, x, g)
                assert torch.equal(grad, want_grad)


def test_mask_rows_gradcheck_opcheck_and_bad_arguments():
    op = kernels("cpp").topk_mask_rows
    # distinct, signs mixed; 37 columns: whole vector blocks and a tail (a full Jacobian: N^2)
    x = leaf((torch.randperm(444).double().view(12, 37) + 0.5) / 7 - 32)
    assert torch.autograd.gradcheck(lambda t: op(t, 9, True)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: op(t, 1, False)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, 9, True)[0], (x,))
    torch.library.opcheck(op, (torch.randn(6, 20, requires_grad=True), 3, True))
    torch.library.opcheck(op, (torch.randn(20, 6, requires_grad=True).t(), 4, False))
    with pytest.raises(ValueError, match="x must be 2-D, got 1-D"):
        op(torch.randn(10), 2, False)
    for k in (0, 8):
        with pytest.raises(ValueError, match=rf"k must be in \[1, 7\], got {k}"):
            op(torch.randn(3, 7), k, False)
    x = torch.randn(9, 300)
    x[8, 299] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        op(x, 4, True)
    # A NaN among the first k of a row on the heap path (k > 128: the winners are sorted):
    # reported before any ranking, for both kernels of the row selection.
    x = torch.randn(3, 1000)
    x[0, 5] = float("nan")
    for select in (op, kernels("cpp").topk_forward):
        with pytest.raises(ValueError, match="x contains NaN"):
            select(x, 200, False)


def test_mask_rows_with_fewer_rows_than_threads_and_a_changed_output(poisoned):
    # Fewer rows than threads: each long row scanned in chunks, the dense rows written
    # after (scatter_rows_into); then the output changed in place by the caller, which
    # the backward does not read.
    op = kernels("cpp").topk_mask_rows
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = leaf(torch.randn(2, 1 << 16).to(dtype))
            out, indices = op(x, 40, True)
            want_out, want_indices = KERNELS["topk_mask_rows"].reference(x, 40, True)
            assert torch.equal(indices, want_indices) and torch.equal(out, want_out)
            g = torch.randn_like(out)
            (want_grad,) = torch.autograd.grad(want_out, x, g)
            out.mul_(2.0)
            (grad,) = torch.autograd.grad(out, x, g)
            assert torch.equal(grad, 2.0 * want_grad)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------- column_topk, keep_rows: lifetime_topk on CPU

# (B, H, k): partial panels of 16-column tiles (37: 16 + 16 + 5), full panels of 64
# and a partial one (130), one row per winner (k = B), one winner per column, more rows
# than a 16-bit count holds (the CPU counts in 16-bit lanes, widened every 32766 rows).
COLUMN_CASES = [(1000, 37, 52), (700, 130, 40), (300, 20, 300), (5, 17, 1), (70001, 17, 3500)]


def column_inputs(batch, units, kind, dtype):
    """(B, H) contiguous, of index_order_inputs' kinds (sorted: each column increasing)."""
    return index_order_inputs((units, batch), kind, dtype, transposed=True).t()


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "relu", "sorted", "close"])
@pytest.mark.parametrize(("batch", "units", "k"), COLUMN_CASES, ids=str)
def test_column_topk_matches_reference(batch, units, k, kind, poisoned):
    op = kernels("cpp").column_topk
    for dtype in DTYPES:
        x = column_inputs(batch, units, kind, dtype)
        out, rows = op(x, k)
        want_out, want_rows = KERNELS["column_topk"].reference(x, k)
        assert out.is_contiguous() and torch.equal(rows, want_rows), dtype
        assert torch.equal(out, want_out) and torch.equal(out.signbit(), want_out.signbit()), dtype
    strided = torch.randn(units, 2 * batch)[:, ::2].t()  # any layout in, row-major out
    assert torch.equal(op(strided, k)[0], KERNELS["column_topk"].reference(strided.contiguous(), k)[0])


@pytest.mark.parametrize(("batch", "units", "k"), [(1000, 37, 50), (333, 130, 33), (1000, 20, 48), (1000, 37, 7)],
                         ids=str)
def test_column_topk_matches_reference_with_ties_at_the_cut(batch, units, k, poisoned):
    # Per column, 0-6 more copies of its k-th largest value at random rows: the last
    # candidates are cut among equal keys, and the first rows of them win. (A column's
    # candidates are a few more than k: the CPU cuts them one at a time, in vectors with
    # AVX-512 or AVX2. test_every_simd_path_gives_the_same_selection runs this under
    # AEFAST_SIMD=avx2 and none, and on a CPU without AVX-512 with AVX-512 emulated.)
    op = kernels("cpp").column_topk
    generator = torch.Generator().manual_seed(batch + units + k)
    for dtype in DTYPES:
        x = torch.randn(batch, units, generator=generator).to(dtype)
        kth = x.topk(k, dim=0).values[-1]
        for column in range(units):
            copies = torch.randperm(batch, generator=generator)[: column % 7]
            x[copies, column] = kth[column]
        out, rows = op(x, k)
        want_out, want_rows = KERNELS["column_topk"].reference(x, k)
        assert torch.equal(rows, want_rows) and torch.equal(out, want_out), dtype


@pytest.mark.parametrize(("batch", "units", "k"), COLUMN_CASES, ids=str)
def test_keep_rows_matches_reference(batch, units, k, poisoned):
    for dtype in DTYPES:
        _, rows = kernels("cpp").column_topk(torch.randn(batch, units).to(dtype), k)
        grad = torch.randn(batch, units).to(dtype)
        got = kernels("cpp").keep_rows(grad, rows)
        assert got.is_contiguous() and torch.equal(got, KERNELS["keep_rows"].reference(grad, rows)), dtype


def test_column_topk_reports_nan_in_any_tile():
    nan = torch.tensor(float("nan"))
    for dtype in DTYPES:
        # the last, partial tile; a full tile of a partial panel; a full panel
        for units, column in ((37, 36), (37, 3), (130, 70)):
            for value in (nan, -nan):  # a NaN's key lies above +inf's or below -inf's
                assert value.signbit() == (value is not nan)
                x = torch.randn(1000, units).to(dtype)
                x[999, column] = value.to(dtype)
                with pytest.raises(ValueError, match="x contains NaN"):
                    kernels("cpp").column_topk(x, 20)


def test_column_topk_and_keep_rows_bad_arguments_name_what_is_wrong():
    column_topk, keep_rows = kernels("cpp").column_topk, kernels("cpp").keep_rows
    with pytest.raises(ValueError, match="x must be 2-D, got 1-D"):
        column_topk(torch.randn(10), 2)
    for k in (0, 11):
        with pytest.raises(ValueError, match=rf"k must be in \[1, 10\], got {k}"):
            column_topk(torch.randn(10, 3), k)
    grad = torch.randn(10, 3)
    with pytest.raises(ValueError, match="rows must be \\(H, k\\)"):
        keep_rows(grad, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rows must be int64"):
        keep_rows(grad, torch.zeros(3, 2, dtype=torch.int32))
    for bad in (-1, 10):
        with pytest.raises(IndexError, match=r"rows must be in \[0, 10\)"):
            keep_rows(grad, torch.full((3, 2), bad, dtype=torch.long))


def test_column_topk_gradcheck_and_opcheck():
    column_topk, keep_rows = kernels("cpp").column_topk, kernels("cpp").keep_rows
    x = leaf((torch.randperm(444).double().view(37, 12) + 0.5) / 7 - 22)  # distinct, a third negative
    assert torch.autograd.gradcheck(lambda t: column_topk(t, 9)[0], (x,))
    _, rows = column_topk(x.detach(), 9)
    assert torch.autograd.gradgradcheck(lambda g: keep_rows(g, rows), (leaf(torch.randn(37, 12).double()),))
    torch.library.opcheck(column_topk, (torch.randn(50, 70, requires_grad=True), 6))
    torch.library.opcheck(keep_rows, (torch.randn(50, 70, requires_grad=True), column_topk(torch.randn(50, 70), 6)[1]))


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _avx512_emulation_unavailable() -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "this CPU has AVX-512: every test runs the real instructions"
    if capability != "AVX2":
        return f"the AVX-512 emulation is AVX2 code; this CPU's vectors: {capability}"
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        probe = subprocess.run([*compiler, "-x", "c++", "-E", "-", "-o", os.devnull],
                               input="#include <simde/x86/avx512.h>\n", capture_output=True, text=True)
    except OSError as exc:
        return f"no C++ compiler ({exc})"
    if probe.returncode != 0:
        return "SIMDe's headers not found (apt-get install libsimde-dev; .ci/run installs them)"
    return None


# aefast._C built with its AVX-512 paths emulated (csrc/cpu/avx512_emulation.h, SIMDe),
# for a CPU without AVX-512, in build/avx512-emulated, kept there (ninja rebuilds what
# changed): minutes from scratch, so in the background from collection on, one compile
# at a time.
AVX512_EMULATED = ROOT / "build" / "avx512-emulated"
AVX512_EMULATED_BUILD = BackgroundRun(
    [sys.executable, "setup.py", "build_ext", "--build-lib", str(AVX512_EMULATED / "lib"),
     "--build-temp", str(AVX512_EMULATED / "temp")],
    unavailable=_avx512_emulation_unavailable, cwd=ROOT,
    env=dict(os.environ, AEFAST_EMULATE_AVX512="1", MAX_JOBS="1"))
BACKGROUND = {"test_every_simd_path_gives_the_same_selection[avx512-emulated]": AVX512_EMULATED_BUILD}


@pytest.fixture(scope="module")
def avx512_emulated_build():
    """The emulated build's extension module (its path), checked to report it."""
    if AVX512_EMULATED_BUILD.unavailable:
        pytest.skip(AVX512_EMULATED_BUILD.unavailable)
    returncode, stdout, stderr = AVX512_EMULATED_BUILD.wait()
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    module = AVX512_EMULATED / "lib" / "aefast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    env = dict(os.environ, AEFAST_EXTENSION=str(module))
    env.pop("AEFAST_SIMD", None)
    took = subprocess.run([sys.executable, "-c", "from aefast import _C; print(_C.cpu_simd())"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert took.stdout.strip() == "avx512-emulated", took.stdout + took.stderr
    return module


@pytest.mark.parametrize("level", ["avx2", "none", "avx512-emulated"])
def test_every_simd_path_gives_the_same_selection(level, request):
    """The hand-written AVX-512 paths run wherever the CPU has them; AEFAST_SIMD forces
    the AVX2 and the portable ones, whatever this machine is; on a CPU without AVX-512,
    the AVX-512 paths run emulated (a build of aefast._C by avx512_emulated_build), and
    the selection's tests that compare two paths compare the emulated AVX-512 one with
    the AVX2 one. The path this process takes is left out: the whole suite runs it."""
    from aefast import _C

    if level == _C.cpu_simd():
        pytest.skip(f"this process's kernels take the {level} paths: every test runs them")
    env = dict(os.environ, AEFAST_SIMD=level, OMP_NUM_THREADS="2")
    if level == "avx512-emulated":
        env["AEFAST_EXTENSION"] = str(request.getfixturevalue("avx512_emulated_build"))
        del env["AEFAST_SIMD"]  # the widest: AVX-512, emulated
    noise = os.path.join(os.path.dirname(__file__), "test_noise.py")
    decode = os.path.join(os.path.dirname(__file__), "test_decode.py")  # 256-column blocks with AVX-512, else 128
    tests = ("mask_index_order_matches or mask_index_order_reports or column_topk_matches or column_topk_reports"
             " or many_winners"
             " or keep_rows_matches or long_row or infinities or batch_lifetime or corrupt_matches"
             " or reparameterize_matches or reparameterize_on_cpu or sparse_and_mask_match or one_winner_per_block or signed_zeros or mostly_tied"
             " or noisy_linear_on_cpu_in_many_windows or corrupt_window_is or corrupt_window_and_mask"
             " or 32_mib_and_more or mask_rows_matches or scatter_rows_streams"
             " or sparse_decode_matches or backward_without_the_values or topk_encode_matches")
    # AEFAST_SIMD reaches the C++ kernels alone: the Triton backend's cases are left out.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, noise,
                          decode, "-k", f"({tests}) and not triton"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
