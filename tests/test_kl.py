"""The sparse-KL family against aefast/reference.py, on every backend here."""

import itertools
import re

import pytest
import torch

import aefast as ae
from aefast import reference
from aefast.ops._declare import kernels
from conftest import (
    DEVICES,
    assert_close,
    assert_compiled_matches_eager,
    assert_kl_gradient_close,
    dtypes_for,
    leaf,
    op_backends,
)

SHAPES = [(1, 1), (1, 7), (3, 1000), (4097, 33), (65, 129)]
RHO, BETA = 0.07, 2.5
EPS = reference.RHO_HAT_EPS


def activations(shape, dtype, device, *, dead_unit=True):
    """Values in (0, 1); unit 0 dead (all zero) to exercise the rho_hat clamp."""
    a = torch.rand(shape, dtype=torch.float64) * 0.98 + 0.01
    if dead_unit and shape[1] > 1:
        a[:, 0] = 0.0
    return a.to(device=device, dtype=dtype)


def ref_grads(fn, inputs, grad_outputs):
    """Run a reference function on float64 copies; return (outputs, input grads)."""
    x64 = [leaf(x.double()) for x in inputs]
    out = fn(*x64)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(out, x64, [g.double() for g in grad_outputs])
    return out, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_kl_sparsity_matches_reference(device, backend, shape, poisoned):
    for dtype in dtypes_for(device, backend):
        a = leaf(activations(shape, dtype, device))
        with ae.backend(backend):
            penalty = ae.kl_sparsity(a, RHO, BETA)
        g = torch.randn((), dtype=dtype, device=device)
        (grad,) = torch.autograd.grad(penalty, a, g)
        (expected,), (expected_grad,) = ref_grads(
            lambda x: reference.kl_sparsity(x, RHO, BETA), [a], [g]
        )
        assert penalty.shape == () and penalty.dtype == dtype
        assert grad.shape == a.shape and grad.dtype == dtype
        assert_close(penalty, expected, dtype, scale=shape[1])
        assert_kl_gradient_close(grad, expected_grad, dtype)
        if shape[1] > 1:  # the dead unit: pushed up (negative gradient) through the clamp
            assert torch.all(grad[:, 0] * g < 0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("device", "backend"), op_backends("sigmoid_kl_sparsity"))
def test_sigmoid_kl_sparsity_matches_reference(device, backend, shape, poisoned):
    for dtype in dtypes_for(device, backend):
        # At most 5: sigmoid(z > 5.5) rounds to exactly 1 in bfloat16, where the Triton kernel
        # (rho_hat from the h it returns) and the float64 reference part by far more than
        # a rounding error, through the clamp (one row: rho_hat is that h). It failed 1 run in 30.
        z = leaf((torch.randn(shape, dtype=torch.float64) * 3 - 2).clamp(max=5.0).to(device, dtype))
        with ae.backend(backend):
            h, penalty = ae.sigmoid_kl_sparsity(z, RHO, BETA)
        gh = torch.randn(shape, dtype=dtype, device=device)
        gp = torch.randn((), dtype=dtype, device=device)
        (grad,) = torch.autograd.grad((h, penalty), z, (gh, gp))
        (eh, _), _ = ref_grads(lambda x: reference.sigmoid_kl_sparsity(x, RHO, BETA), [z], [gh, gp])
        # The gradient in float64 from the h returned, as the kernels take it (h (1 - h) from
        # the rounded h, as torch's own sigmoid backward: in bfloat16 at z = 5 that is 17%
        # from the exact one): (g_h + d penalty / d h) h (1 - h), each element to its own precision.
        h64 = leaf(h.detach().double())
        (of_penalty,) = torch.autograd.grad(reference.kl_sparsity(h64, RHO, BETA), h64, gp.double())
        egrad = (gh.double() + of_penalty) * h64 * (1 - h64)
        assert h.dtype == dtype and penalty.dtype == dtype and grad.dtype == dtype
        assert_close(h, eh, dtype)
        # The penalty is that of the h returned (rho_hat its mean, as the reference in the
        # same dtype computes it): at z = 5, bfloat16's h is 0.9922 against 0.9933, 1 - h 17%
        # apart, and the float64 reference's penalty 4% away failed about 1 run in 100.
        assert_close(penalty, reference.kl_sparsity(h.detach().double(), RHO, BETA), dtype, scale=shape[1])
        assert_close(grad, egrad, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("device", "backend"), op_backends("contractive_penalty"))
def test_contractive_penalty_matches_reference(device, backend, shape, poisoned):
    for dtype in dtypes_for(device, backend):
        h = leaf(activations(shape, dtype, device, dead_unit=False))
        w = leaf((torch.randn(shape[1], 19, dtype=torch.float64) * 0.3).to(device, dtype))
        with ae.backend(backend):
            penalty = ae.contractive_penalty(h, w)
        g = torch.randn((), dtype=dtype, device=device)
        grad_h, grad_w = torch.autograd.grad(penalty, (h, w), g)
        (expected,), (egh, egw) = ref_grads(reference.contractive_penalty, [h, w], [g])
        assert penalty.dtype == dtype and grad_h.dtype == dtype and grad_w.dtype == dtype
        assert_close(penalty, expected, dtype)  # a sum of positive terms: relative to itself
        assert_close(grad_h, egh, dtype)
        assert_close(grad_w, egw, dtype)


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_non_contiguous_inputs(device, backend):
    """Views of a (40, 90) matrix, and the contractive weight column-major: the values
    and the gradients that reach the base tensors, against the reference's."""
    torch.manual_seed(0)
    base = activations((40, 90), torch.float32, device, dead_unit=False)
    views = {"transposed": lambda t: t.t(), "strided": lambda t: t[::3, ::2], "offset": lambda t: t[5:, 7:]}
    ops = {"kl_sparsity": lambda m, a, w: (m.kl_sparsity(a, RHO, BETA),),
           "sigmoid_kl_sparsity": lambda m, a, w: m.sigmoid_kl_sparsity(a, RHO, BETA),
           "contractive_penalty": lambda m, a, w: (m.contractive_penalty(a, w),)}
    for (view_name, view), (op_name, op) in itertools.product(views.items(), ops.items()):
        results, weight = [], torch.randn(11, view(base).shape[1], device=device) * 0.3
        for module in (ae, reference):
            a_base, w_base = leaf(base), leaf(weight)
            a, w = view(a_base), w_base.t()  # a (H, 11) weight, column-major
            with ae.backend(backend):
                outputs = op(module, a, w)
            torch.manual_seed(1)  # the same weights of the outputs for both
            loss = sum((out * torch.randn(out.shape, device=device)).sum() for out in outputs)  # not _like: strides
            results.append((*outputs, *torch.autograd.grad(loss, (a_base, w_base), allow_unused=True)))
        for got, want in zip(*results):
            if want is None:
                assert got is None
                continue
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{op_name} of {view_name}")


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_gradcheck_float64(device, backend):
    if device == "cuda" and backend == "triton":
        pytest.skip("float64 gradcheck runs on CPU (and with the CUDA C++ kernels)")
    torch.manual_seed(1)
    a = leaf(activations((6, 5), torch.float64, device, dead_unit=False))
    z = leaf(torch.randn(6, 5, dtype=torch.float64, device=device))
    w = leaf(torch.randn(5, 3, dtype=torch.float64, device=device))
    with ae.backend(backend):
        assert torch.autograd.gradcheck(lambda x: ae.kl_sparsity(x, RHO, BETA), (a,))
        assert torch.autograd.gradcheck(lambda x: ae.sigmoid_kl_sparsity(x, RHO, BETA), (z,))
        assert torch.autograd.gradcheck(ae.contractive_penalty, (a, w))


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_gradgradcheck_float64_and_a_gradient_penalty_as_the_reference(device, backend):
    """Double backward: the backward kernels have derivatives (a formula each, the
    statistics rho_hat, s2, w2 differentiated back to the input). A dead unit's clamp
    passes the gradient straight through, the curvature too (as the reference's, which a
    finite difference does not see): checked against the reference, not gradgradcheck."""
    if device == "cuda" and backend == "triton":
        pytest.skip("float64 gradcheck runs on CPU (and with the CUDA C++ kernels)")
    torch.manual_seed(2)
    a = leaf(activations((6, 5), torch.float64, device, dead_unit=False))
    dead = leaf(activations((6, 5), torch.float64, device))  # unit 0 dead: the clamp is active
    z = leaf(torch.randn(6, 5, dtype=torch.float64, device=device))
    w = leaf(torch.randn(5, 3, dtype=torch.float64, device=device))
    cases = {"kl": (lambda x: ae.kl_sparsity(x, RHO, BETA), (a,)),
             "kl, a dead unit": (lambda x: ae.kl_sparsity(x, RHO, BETA), (dead,)),
             "sigmoid_kl": (lambda x: ae.sigmoid_kl_sparsity(x, RHO, BETA), (z,)),
             "contractive": (lambda x, weight: ae.contractive_penalty(torch.sigmoid(x), weight), (z, w))}
    for name, (fn, inputs) in cases.items():
        if "dead" not in name:
            with ae.backend(backend):
                assert torch.autograd.gradgradcheck(fn, inputs), name

        def penalty_gradients(backend):
            with ae.backend(backend):
                out = fn(*inputs)
                out = sum(t.sum() for t in out) if isinstance(out, tuple) else out
                grads = torch.autograd.grad(out, inputs, create_graph=True)
                return torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)

        for got, want in zip(penalty_gradients(backend), penalty_gradients("reference")):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


def _op_samples(device, dtype=torch.float32):
    a = activations((9, 6), dtype, device).requires_grad_(True)
    z = torch.randn(9, 6, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(6, 4, dtype=dtype, device=device, requires_grad=True)
    rho_hat = torch.rand(6, dtype=torch.float32, device=device)
    g = torch.randn((), dtype=dtype, device=device)
    return {
        "kl_sparsity_forward": (a, RHO, BETA, EPS),
        "kl_sparsity_backward": (g, rho_hat, 9, RHO, BETA, EPS, dtype),
        "sigmoid_kl_sparsity_forward": (z, RHO, BETA, EPS),
        "sigmoid_kl_sparsity_backward": (torch.randn(9, 6, device=device), g, a.detach(), rho_hat, RHO, BETA, EPS),
        "contractive_penalty_forward": (a, w),
        "contractive_penalty_backward": (g, a.detach(), w.detach(), rho_hat, rho_hat + 1),
    }


@pytest.mark.parametrize(
    "op_name",
    ["kl_sparsity_forward", "kl_sparsity_backward", "sigmoid_kl_sparsity_forward", "sigmoid_kl_sparsity_backward",
     "contractive_penalty_forward", "contractive_penalty_backward"],
)
@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_opcheck(device, backend, op_name):
    op = getattr(kernels(backend), op_name)
    torch.library.opcheck(op, _op_samples(device)[op_name])


class TinySparseAE(torch.nn.Module):
    def __init__(self, d=12, h=7):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        h, kl = ae.sigmoid_kl_sparsity(self.enc(x), RHO, BETA)
        loss = (self.dec(h) - x).pow(2).mean() + kl + 0.1 * ae.contractive_penalty(h, self.enc.weight)
        return loss + ae.kl_sparsity(h, 0.2)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_torch_compile_fullgraph(device, backend):
    torch.manual_seed(0)
    model = TinySparseAE().to(device)
    assert_compiled_matches_eager(model, torch.rand(10, 12, device=device), model.enc.weight, backend)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    model = TinySparseAE()
    x = torch.rand(10, 12)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("device", DEVICES)
class TestBadInput:
    def test_rho_outside_open_unit_interval(self, device):
        a = torch.rand(4, 3, device=device)
        for rho in (0.0, 1.0, -0.1, 1.5, float("nan"), "0.1"):
            got = re.escape(repr(rho))
            with pytest.raises(ValueError, match=rf"rho must be a number in the open interval \(0, 1\), got {got}"):
                ae.kl_sparsity(a, rho)
            with pytest.raises(ValueError, match=rf"rho must be a number in the open interval \(0, 1\), got {got}"):
                ae.sigmoid_kl_sparsity(a, rho)

    def test_negative_beta(self, device):
        a = torch.rand(4, 3, device=device)
        for beta in (-1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match=rf"beta must be a finite number >= 0, got {beta}"):
                ae.kl_sparsity(a, 0.1, beta)

    def test_wrong_rank(self, device):
        for shape in [(5,), (2, 3, 4)]:
            with pytest.raises(ValueError, match="a must be 2-D"):
                ae.kl_sparsity(torch.rand(shape, device=device), 0.1)
            with pytest.raises(ValueError, match="z must be 2-D"):
                ae.sigmoid_kl_sparsity(torch.rand(shape, device=device), 0.1)
            with pytest.raises(ValueError, match="h must be 2-D"):
                ae.contractive_penalty(torch.rand(shape, device=device), torch.rand(3, 2))

    def test_empty_batch(self, device):
        with pytest.raises(ValueError, match="a must have at least one row"):
            ae.kl_sparsity(torch.rand(0, 3, device=device), 0.1)

    def test_integer_dtype(self, device):
        with pytest.raises(ValueError, match="a must be float32, float16, bfloat16 or float64"):
            ae.kl_sparsity(torch.ones(4, 3, dtype=torch.int64, device=device), 0.1)

    def test_contractive_weight_shape_and_dtype(self, device):
        h = torch.rand(4, 3, device=device)
        with pytest.raises(ValueError, match="weight must be 2-D of shape"):
            ae.contractive_penalty(h, torch.rand(5, 2, device=device))
        with pytest.raises(ValueError, match="weight must have h's dtype"):
            ae.contractive_penalty(h, torch.rand(3, 2, device=device, dtype=torch.float64))


@pytest.mark.parametrize("device,backend", [p for p in op_backends("kl_sparsity") if p.values[0] == "cpu"])
def test_offsets_past_2_to_the_31(device, backend):
    """A weight view whose elements lie 2^30 elements apart in a 4 GiB storage (never
    touched but for 15 elements): column offsets cols * stride pass 2^31 and must be
    computed in 64 bits."""
    storage = torch.empty(2**31 + 64, dtype=torch.float16)
    weight = storage.as_strided((5, 3), (1, 2**30)).t()  # (H=3, D=5); weight.t() strides (1, 2^30)
    weight.copy_(torch.randn(3, 5, dtype=torch.float16))
    h = torch.rand(4, 3, dtype=torch.float16)
    with ae.backend(backend):
        penalty = ae.contractive_penalty(h, weight)
    assert_close(penalty, reference.contractive_penalty(h.double(), weight.double()), torch.float16)


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_a_dead_unit_gets_the_gradient_at_the_clamp(device, backend):
    """A unit that never fires has rho_hat = 0, clamped to eps: its gradient is the KL
    gradient there (strongly negative: it pushes the unit back to life), the same through
    kl_sparsity and the fused sigmoid_kl_sparsity, on every backend."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    a = leaf(activations((16, 5), dtype, device))  # unit 0 all zero
    z = leaf(torch.randn(16, 5, dtype=dtype, device=device))
    with torch.no_grad():
        z[:, 0] = -60.0  # sigmoid rounds to ~1e-26: rho_hat far below eps
    with ae.backend(backend):
        (grad_a,) = torch.autograd.grad(ae.kl_sparsity(a, RHO, BETA), a)
        h, penalty = ae.sigmoid_kl_sparsity(z, RHO, BETA)
        (grad_z,) = torch.autograd.grad(penalty, z)
    want = BETA * (-RHO / EPS + (1 - RHO) / (1 - EPS)) / 16
    torch.testing.assert_close(grad_a[:, 0], torch.full_like(grad_a[:, 0], want), rtol=1e-5, atol=0)
    # through the sigmoid: times h (1 - h), tiny but not zero, and of the right sign
    torch.testing.assert_close(grad_z[:, 0], (want * h * (1 - h))[:, 0], rtol=1e-4, atol=0)
    assert torch.all(grad_z[:, 0] < 0)


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_the_clamp_is_the_eps_passed_in(device, backend):
    """The kernels clamp rho_hat to [eps, 1 - eps] with the eps they are given (the ops
    pass aefast.reference.RHO_HAT_EPS: one definition), not a constant of their own."""
    eps = 0.2
    a = activations((8, 6), torch.float64 if device == "cpu" else torch.float32, device)  # unit 0 dead
    rho_hat = a.double().mean(0)
    r = rho_hat.clamp(eps, 1 - eps)
    want = BETA * (RHO * torch.log(RHO / r) + (1 - RHO) * torch.log((1 - RHO) / (1 - r))).sum()
    ops = kernels(backend)
    penalty, _ = ops.kl_sparsity_forward(a, RHO, BETA, eps)
    _, penalty_of_h, _ = ops.sigmoid_kl_sparsity_forward(torch.logit(a.clamp(1e-3, 1 - 1e-3)), RHO, BETA, eps)
    assert_close(penalty, want, a.dtype, scale=10)
    assert_close(penalty_of_h, want, a.dtype, scale=10)  # sigmoid(logit(a)) is a; the dead unit's 1e-3 clamps to eps
    clamped = (rho_hat < eps) | (rho_hat > 1 - eps)
    grad = ops.kl_sparsity_backward(torch.ones((), dtype=a.dtype, device=device), rho_hat.to(_stat(a)), 8,
                                    RHO, BETA, eps, a.dtype)
    # Straight through the clamp: the UFLDL gradient at the clamped value, per element / B.
    want_grad = BETA * (-RHO / r + (1 - RHO) / (1 - r)) / 8
    assert clamped.any()
    assert_close(grad, want_grad.expand(8, -1), a.dtype, scale=10)
    reference_penalty, _ = kernels("reference").kl_sparsity_forward(a, RHO, BETA, eps)
    assert_close(reference_penalty, want, a.dtype, scale=10)


def _stat(x):
    return reference.stat_dtype(x.dtype)


@pytest.mark.parametrize(("device", "backend"), op_backends("kl_sparsity"))
def test_a_saturated_unit_in_float32_is_clamped_as_the_reference_clamps(device, backend):
    """In float32 the clamp's upper bound is float32(1 - 1e-6), 1 - that is 1.013e-6: the
    C++ kernels, in float64, used 1e-6 and a saturated unit's penalty and gradient came
    out 1.3% apart from the reference and the GPU kernels (which work in float32)."""
    a = leaf(activations((16, 6), torch.float32, device))  # unit 0 dead
    with torch.no_grad():
        a[:, 1] = 1.0  # saturated
    with ae.backend(backend):
        penalty = ae.kl_sparsity(a, RHO, BETA)
        (grad,) = torch.autograd.grad(penalty, a)
        h, sigmoid_penalty = ae.sigmoid_kl_sparsity(torch.logit(a.detach().clamp(1e-8, 1 - 1e-8)), RHO, BETA)
    expected = reference.kl_sparsity(a, RHO, BETA)
    (expected_grad,) = torch.autograd.grad(expected, a)
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(sigmoid_penalty, reference.kl_sparsity(h, RHO, BETA), rtol=1e-5, atol=0)
