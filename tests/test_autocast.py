"""Under autocast the matmul-like ops take mixed-precision inputs, as F.linear does; the
decode family (sparse_decode, topk_encode) reads a float32 weight beside bfloat16 or
float16 activations as it is, so autocast casts neither the weight nor its gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import aefast as ae
from aefast import reference
from aefast.ops._declare import kernels
from conftest import assert_close, dtypes_for, leaf, op_backends

HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_dtypes(device, backend):
    return [dtype for dtype in dtypes_for(device, backend) if dtype in HALF_DTYPES]


class CastsOfShape(TorchDispatchMode):
    """Counts the dtype conversions (aten._to_copy) of tensors of one shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_noisy_linear_and_sparse_decode_follow_autocast():
    x, w, b = torch.rand(6, 10), torch.randn(4, 10), torch.randn(4)
    values = torch.rand(6, 3, dtype=torch.bfloat16)
    indices = torch.randint(0, 5, (6, 3))
    table = torch.randn(5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae.noisy_linear(x, w, b, "masking", 0.3, seed=1)
        want = F.linear(ae.corrupt(x, "masking", 0.3, seed=1), w, b)  # the same mask: corrupt's draws
        decoded = ae.sparse_decode(values, indices, table)
    assert out.dtype == want.dtype == torch.bfloat16
    assert not torch.equal(ae.corrupt(x, "masking", 0.3, seed=1), x)
    torch.testing.assert_close(out, want)
    assert decoded.dtype == torch.bfloat16
    # The float32 table read as it is: the mixed-precision call outside autocast, bit for bit.
    assert torch.equal(decoded, ae.sparse_decode(values, indices, table))


def test_contractive_penalty_takes_the_wider_dtype_under_autocast():
    h, w = torch.rand(5, 4).bfloat16(), torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = ae.contractive_penalty(h, w)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, ae.contractive_penalty(h.float(), w))


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_reads_a_float32_weight_beside_16_bit_values(device, backend, poisoned):
    """Output and values gradient in the values' dtype, the weight gradient in float32,
    summed in float32: within float32's tolerance of the float64 reference, which a
    gradient rounded to 16 bits on its way would miss. 19 and 300 columns: the CPU's
    narrow rows and its walk by latent (and the weight-only gradient, the same bits)."""
    B, K, L = 37, 5, 50
    for dtype in half_dtypes(device, backend):
        for D in (19, 300):
            values = leaf(torch.rand(B, K, dtype=torch.float64).to(device, dtype))
            indices = torch.randint(0, L - 1, (B, K), device=device)
            weight = leaf(torch.randn(L, D, dtype=torch.float64, device=device).float())
            # the bias in the values' dtype, or in the weight's (an nn.Linear's float32 bias)
            bias = leaf(torch.randn(D, dtype=torch.float64).to(device, dtype if D == 19 else torch.float32))
            with ae.backend(backend):
                out = ae.sparse_decode(values, indices, weight, bias)
            g = torch.randn(B, D, device=device).to(dtype)
            grad_values, grad_weight, grad_bias = torch.autograd.grad(out, (values, weight, bias), g)
            assert (out.dtype, grad_values.dtype, grad_weight.dtype) == (dtype, dtype, torch.float32)
            assert grad_bias.dtype == bias.dtype
            ref64 = [leaf(t.double()) for t in (values, weight, bias)]
            want = reference.sparse_decode(ref64[0], indices, ref64[1], ref64[2])
            want_values, want_weight, want_bias = torch.autograd.grad(want, ref64, g.double())
            assert_close(out, want, dtype, scale=10)
            assert_close(grad_values, want_values, dtype, scale=10)
            assert_close(grad_weight, want_weight, torch.float32, scale=10)
            assert_close(grad_bias, want_bias, dtype, scale=10)
            only_weight = kernels(backend).sparse_decode_backward(g, values.detach(), indices, weight.detach(), False)[1]
            assert torch.equal(only_weight, grad_weight)


@pytest.mark.parametrize(("device", "backend"), op_backends("sparse_decode"))
def test_sparse_decode_mixed_precision_opcheck_and_bad_dtypes(device, backend):
    forward, backward = kernels(backend).sparse_decode_forward, kernels(backend).sparse_decode_backward
    values = torch.rand(6, 3, device=device, dtype=torch.bfloat16)
    indices = torch.randint(0, 9, (6, 3), device=device)
    weight = torch.randn(9, 4, device=device)
    torch.library.opcheck(forward, (values, indices, weight, torch.randn(4, device=device, dtype=torch.bfloat16)))
    torch.library.opcheck(backward, (torch.randn(6, 4, device=device, dtype=torch.bfloat16), values, indices, weight))
    with ae.backend(backend):
        for v, w in ((values, weight.half()), (values.float(), weight.bfloat16()), (values.double(), weight)):
            with pytest.raises(ValueError, match=r"weight must be 2-D \(L, D\) of the values' dtype .*or float32"):
                ae.sparse_decode(v, indices, w)
        with pytest.raises(ValueError, match=r"bias must be None or of shape \(4,\) and dtype torch.bfloat16 \(or "):
            ae.sparse_decode(values, indices, weight, torch.randn(4, device=device, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"weight and bias must have x's dtype torch.bfloat16 \(or float32\)"):
            ae.topk_encode(torch.rand(6, 4, device=device, dtype=torch.bfloat16), weight.half(), None, 2)


@pytest.mark.parametrize(("device", "backend"), op_backends("topk_encode"))
def test_topk_encode_reads_a_float32_weight_beside_16_bit_x(device, backend, poisoned):
    """The winners of the 16-bit matmul (each block of the weight cast for it), and the
    weight and bias gradients in float32. Small integers: every sum is exact, so the
    results equal the reference's on the cast weight, bit for bit."""
    B, D, L, k = (7, 20, 300, 6) if backend == "triton" and device == "cpu" else (37, 20, 300, 16)
    for dtype in half_dtypes(device, backend):
        x = leaf(torch.randint(-3, 4, (B, D)).to(device, dtype))
        w = leaf(torch.randint(-2, 3, (L, D)).to(device, torch.float32))
        b = leaf(torch.randint(-2, 3, (L,)).to(device, torch.float32))
        with ae.backend(backend):
            values, indices = ae.topk_encode(x, w, b, k)
        want_values, want_indices = reference.topk_encode(x, w.to(dtype), b.to(dtype), k)
        assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
        g = torch.randint(-3, 4, (B, k)).to(device, dtype)
        got = torch.autograd.grad(values, (x, w, b), g)
        want = torch.autograd.grad(want_values, (x, w, b), g)
        assert [t.dtype for t in got] == [dtype, torch.float32, torch.float32]
        for got_g, want_g in zip(got, want):
            assert torch.equal(got_g, want_g)


@pytest.mark.parametrize(("device", "backend"), [p for p in op_backends("topk_encode") if p.values[0] == "cpu"])
def test_autocast_casts_no_whole_weight_in_a_topk_sae_step(device, backend):
    """Under bfloat16 autocast, a top-k SAE's step (fused encoder, sparse decoder) casts
    no (L, D) weight or gradient around the ops (the encoder casts its weight a block at
    a time inside, for its matmul): before, each step cast both weights and both weight
    gradients (on this project's CPU 8 ms each of a 77 ms step at 1024 x 768 -> 16384).
    Gradients arrive in float32."""
    B, D, L, k = 8, 12, 40, 4
    x = torch.randn(B, D)
    encoder_weight, decoder_weight = leaf(torch.randn(L, D)), leaf(torch.randn(L, D))
    encoder_bias = leaf(torch.randn(L))
    forward, backward = CastsOfShape((L, D)), CastsOfShape((L, D))
    with ae.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        with forward:
            values, indices = ae.topk_encode(x, encoder_weight, encoder_bias, k)
            x_hat = ae.sparse_decode(values, indices, decoder_weight)
        loss = (x_hat.float() - x).square().sum()
        with backward:
            loss.backward()
    assert x_hat.dtype == torch.bfloat16
    assert (forward.count, backward.count) == (0, 0)
    assert encoder_weight.grad.dtype == decoder_weight.grad.dtype == encoder_bias.grad.dtype == torch.float32
