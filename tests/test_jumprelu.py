"""The JumpReLU family against aefast/reference.py, on every backend here."""

import pytest
import torch

import aefast as ae
from aefast import reference
from aefast.ops._declare import kernels
from conftest import (
    assert_compiled_matches_eager,
    assert_within_sizes,
    dtypes_for,
    leaf,
    op_backends,
)

SHAPES = [(1, 1), (1, 7), (3, 1000), (4097, 33), (65, 129)]
BANDWIDTH = 0.25


def inputs(shape, dtype, device, seed=0):
    """z around the thresholds (a quarter within the kernel's window) and one entry
    exactly at its threshold (inactive: H(0) = 0)."""
    g = torch.Generator().manual_seed(seed)
    threshold = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.2
    z = threshold + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    threshold, z = threshold.to(dtype), z.to(dtype)
    z[0, 0] = threshold[0]
    return z.to(device), threshold.to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_jumprelu_matches_reference(device, backend, shape, poisoned):
    for dtype in dtypes_for(device, backend):
        z, threshold = map(leaf, inputs(shape, dtype, device))
        with ae.backend(backend):
            out, l0 = ae.jumprelu(z, threshold, BANDWIDTH)
        g = torch.randn(shape, dtype=dtype, device=device)
        g_l0 = torch.randn(shape[0], dtype=l0.dtype, device=device)
        grad_z, grad_t = torch.autograd.grad((out, l0), (z, threshold), (g, g_l0))
        z_ref, t_ref = leaf(z.detach()), leaf(threshold.detach())
        want, want_l0 = reference.jumprelu(z_ref, t_ref, BANDWIDTH)
        want_z, want_t = torch.autograd.grad((want, want_l0), (z_ref, t_ref), (g, g_l0))
        assert out.dtype == dtype and l0.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(out, want) and torch.equal(l0, want_l0)  # a comparison and a count: exact
        assert out[0, 0] == 0  # z at its threshold is off
        assert torch.equal(grad_z, want_z)
        # The threshold's gradient sums a column's terms of either sign: its error is
        # relative to the sum of their sizes (the same gradient for |g| and |g_l0|).
        _, size_t = torch.autograd.grad(reference.jumprelu(z_ref, t_ref, BANDWIDTH), (z_ref, t_ref),
                                        (g.abs(), g_l0.abs()))
        assert_within_sizes(grad_t, want_t, size_t, dtype)


@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_gradient_through_the_output_alone_or_the_count_alone(device, backend):
    z, threshold = map(leaf, inputs((9, 6), torch.float32, device))
    with ae.backend(backend):
        out, l0 = ae.jumprelu(z, threshold, BANDWIDTH)
        (via_count,) = torch.autograd.grad(l0.sum(), threshold, retain_graph=True)
        via_out = torch.autograd.grad(out.sum(), (z, threshold))
    near = ((z - threshold).abs() < BANDWIDTH / 2).float()
    torch.testing.assert_close(via_count, -near.sum(0) / BANDWIDTH)
    torch.testing.assert_close(via_out[0], (z > threshold).float())
    torch.testing.assert_close(via_out[1], -(threshold / BANDWIDTH) * near.sum(0))


@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_gradcheck_float64_with_the_straight_through_rule(device, backend):
    if device == "cuda" and backend == "triton":
        pytest.skip("float64 gradcheck runs on CPU (and with the CUDA C++ kernels)")
    z, threshold = inputs((6, 5), torch.float64, device, seed=3)
    z = z + torch.sign(z - threshold) * 0.01  # no entry within gradcheck's step of a jump
    z[0, 0] = threshold[0] + 0.05
    with ae.backend(backend):
        # through z the straight-through gradient is the true one away from the jumps
        assert torch.autograd.gradcheck(lambda x: ae.jumprelu(x, threshold, BANDWIDTH)[0], (leaf(z),))
        # through the threshold, the count's gradient is the derivative of the step
        # smoothed by the rectangle kernel: H_eps(u) = clamp(u / eps + 1/2, 0, 1)
        t = leaf(threshold)
        (got,) = torch.autograd.grad(ae.jumprelu(z, t, BANDWIDTH)[1].sum(), t)
    smoothed = lambda th: ((z - th) / BANDWIDTH + 0.5).clamp(0, 1).sum(0)
    step = 1e-6
    numeric = torch.stack([(smoothed(threshold + step * e) - smoothed(threshold - step * e))[i] / (2 * step)
                           for i, e in enumerate(torch.eye(5, dtype=torch.float64, device=device))])
    torch.testing.assert_close(got, numeric)


@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_the_backward_kernel_differentiates_and_a_gradient_penalty_is_the_reference_s(device, backend):
    """Double backward: the backward kernel is linear in the incoming gradients and in
    the threshold through its factor (its steps have no derivative): gradcheck of the
    kernel itself away from the steps, and a gradient penalty as the reference's."""
    if device == "cuda" and backend == "triton":
        pytest.skip("float64 gradcheck runs on CPU (and with the CUDA C++ kernels)")
    z, threshold = inputs((6, 5), torch.float64, device, seed=4)
    z = z + torch.sign(z - threshold) * 0.01
    z[0, 0] = threshold[0] + 0.05  # within the kernel's window: the threshold's gradient is not 0
    grad_out, grad_l0 = torch.randn(6, 5, dtype=torch.float64, device=device), torch.randn(6, dtype=torch.float64,
                                                                                          device=device)
    ops = kernels(backend)
    with ae.backend(backend):
        assert torch.autograd.gradcheck(lambda g, c, t: ops.jumprelu_backward(g, c, z, t, BANDWIDTH),
                                        (leaf(grad_out), leaf(grad_l0), leaf(threshold)))

    def penalty_gradients(backend):
        t = leaf(threshold)
        with ae.backend(backend):
            out, l0 = ae.jumprelu(z, t, BANDWIDTH)
            (g,) = torch.autograd.grad((out * grad_out).sum() + (l0 * grad_l0).sum(), t, create_graph=True)
            return torch.autograd.grad(g.square().sum(), t)[0]

    got, want = penalty_gradients(backend), penalty_gradients("reference")
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want)


def _op_samples(device, dtype=torch.float32):
    z, threshold = inputs((9, 6), dtype, device)
    return {
        "jumprelu_forward": (z.requires_grad_(True), threshold.requires_grad_(True), BANDWIDTH),
        "jumprelu_backward": (torch.randn(9, 6, dtype=dtype, device=device), torch.randn(9, device=device),
                              z.detach(), threshold.detach(), BANDWIDTH),
    }


@pytest.mark.parametrize("op_name", ["jumprelu_forward", "jumprelu_backward"])
@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_opcheck(device, backend, op_name):
    torch.library.opcheck(getattr(kernels(backend), op_name), _op_samples(device)[op_name])


@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_bad_input_names_the_argument(device, backend):
    z, threshold = inputs((4, 3), torch.float32, device)
    with ae.backend(backend):
        with pytest.raises(ValueError, match=r"threshold must have shape \(L=3,\)"):
            ae.jumprelu(z, threshold[:2], BANDWIDTH)
        with pytest.raises(ValueError, match="threshold must have z's dtype"):
            ae.jumprelu(z, threshold.double(), BANDWIDTH)
        for bad in (0.0, -1.0, float("inf"), True):
            with pytest.raises(ValueError, match="bandwidth must be a positive number"):
                ae.jumprelu(z, threshold, bad)
        with pytest.raises(ValueError, match="z must be 2-D"):
            ae.jumprelu(z[0], threshold, BANDWIDTH)


class TinyJumpReLUSAE(torch.nn.Module):
    def __init__(self, d=12, latents=20):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(d, latents), torch.nn.Linear(latents, d)
        self.log_threshold = torch.nn.Parameter(torch.full((latents,), -1.0))

    def forward(self, x):
        code, l0 = ae.jumprelu(self.enc(x), self.log_threshold.exp(), BANDWIDTH)
        return (self.dec(code) - x).pow(2).sum(1).mean() + 0.1 * l0.mean()


@pytest.mark.slow
@pytest.mark.parametrize(("device", "backend"), op_backends("jumprelu"))
def test_torch_compile_fullgraph(device, backend):
    torch.manual_seed(0)
    model = TinyJumpReLUSAE().to(device)
    assert_compiled_matches_eager(model, torch.randn(10, 12, device=device), model.log_threshold, backend)
