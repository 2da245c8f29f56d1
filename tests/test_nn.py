"""nn.Module wrappers: KLSparsity (with and without the moving average) and ContractivePenalty."""

import re

import pytest
import torch

import aefast as ae
from aefast import reference


def batch(rows=9, units=6):
    return (torch.rand(rows, units, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)


def test_without_momentum_equals_the_functional():
    a = batch()
    torch.testing.assert_close(ae.nn.KLSparsity(0.1, 3.0)(a), ae.kl_sparsity(a, 0.1, 3.0))


def test_moving_average_estimate_and_gradient():
    module = ae.nn.KLSparsity(0.1, 2.0, momentum=0.25)
    a1, a2 = batch(), batch(rows=4)
    p1 = module(a1)
    torch.testing.assert_close(p1, reference.kl_sparsity(a1, 0.1, 2.0))
    torch.testing.assert_close(module.running_rho_hat, a1.mean(0).detach())

    p2 = module(a2)
    estimate = 0.75 * a1.mean(0).detach() + 0.25 * a2.mean(0)
    expected = reference.kl_penalty_from_rho_hat(estimate, 0.1, 2.0)
    torch.testing.assert_close(p2, expected)
    torch.testing.assert_close(module.running_rho_hat, estimate.detach())
    (got,) = torch.autograd.grad(p2, a2)
    # UFLDL's sparsity gradient with the estimate in place of the batch mean: full beta,
    # not beta * momentum (what a gradient through the batch part alone would give).
    r = estimate.detach().double()
    want = (2.0 * (-0.1 / r + 0.9 / (1 - r)) / a2.shape[0]).expand(a2.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
    assert got.abs().sum() > 0


def test_eval_does_not_update_the_running_estimate():
    module = ae.nn.KLSparsity(0.1, momentum=0.5)
    module(batch())
    before = module.running_rho_hat.clone()
    module.eval()
    module(batch())
    torch.testing.assert_close(module.running_rho_hat, before)


def test_state_dict_round_trip():
    module = ae.nn.KLSparsity(0.1, momentum=0.5)
    module(batch())
    fresh = ae.nn.KLSparsity(0.1, momentum=0.5)
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh.running_rho_hat, module.running_rho_hat)


def test_unit_count_must_not_change():
    module = ae.nn.KLSparsity(0.1, momentum=0.5)
    module(batch(units=6))
    with pytest.raises(ValueError, match="running estimate has 6"):
        module(batch(units=5))


@pytest.mark.parametrize("momentum", [0.0, 1.5, -0.1, "0.1"])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"momentum must be None or a number in \(0, 1\], got"):
        ae.nn.KLSparsity(0.1, momentum=momentum)


def test_bad_rho_and_beta():
    with pytest.raises(ValueError, match=r"rho must be a number in the open interval \(0, 1\), got 1.0"):
        ae.nn.KLSparsity(1.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -2.0"):
        ae.nn.KLSparsity(0.1, -2.0)


def test_contractive_module():
    h, w = batch(), torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(
        ae.nn.ContractivePenalty(0.3)(h, w), 0.3 * reference.contractive_penalty(h, w)
    )


def test_the_module_exports_its_modules_only():
    assert "torch" not in ae.nn.__all__ and "check_matrix" not in ae.nn.__all__
    assert all(isinstance(getattr(ae.nn, name), type) for name in ae.nn.__all__)


def test_selection_modules_in_a_sequential():
    torch.manual_seed(0)
    x = torch.randn(6, 10)
    net = torch.nn.Sequential(torch.nn.Linear(10, 12), ae.nn.TopK(3))
    out = net(x)
    assert torch.equal(out, ae.topk_mask(net[0](x), 3)) and ((out != 0).sum(1) <= 3).all()
    assert torch.equal(ae.nn.BatchTopK(2)(x), ae.batch_topk(x, 2))
    lifetime = ae.nn.LifetimeTopK(0.5)
    assert torch.equal(lifetime(x), ae.lifetime_topk(x, 0.5))
    assert torch.equal(lifetime.eval()(x), x)  # training only: an eval code does not depend on its batch
    maps = torch.randn(4, 3, 5, 5)
    spatial = ae.nn.SpatialWTA(lifetime_rate=0.5)
    assert torch.equal(spatial(maps), ae.spatial_wta(maps, lifetime_rate=0.5))
    assert torch.equal(spatial.eval()(maps), ae.spatial_wta(maps))
    for bad, message in ((lambda: ae.nn.TopK(0), "k must be an integer >= 1, got 0"),
                         (lambda: ae.nn.LifetimeTopK(1.5), "rate must be a number in (0, 1], got 1.5"),
                         (lambda: ae.nn.SpatialWTA(lifetime_rate=0), "lifetime_rate must be a number in (0, 1], got 0")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            bad()


@pytest.mark.slow
def test_modules_with_default_float_arguments_compile_with_dynamic_shapes():
    """Under dynamic=True a default float (beta, low, high) may arrive as a symbolic float:
    the checks compare it instead of calling math.isfinite, which broke the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    noisy, penalty = ae.nn.NoisyLinear(12, 6, "gaussian", 0.1), ae.nn.KLSparsity(0.05)
    corrupt = ae.nn.Corrupt("salt_pepper", 0.2)

    def loss(x):
        h = torch.sigmoid(noisy(corrupt(x)))
        return h.square().mean() + penalty(h) + ae.kl_sparsity(h, 0.1)

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (7, 9):
        x = torch.rand(rows, 12)
        torch.manual_seed(rows)  # the modules' seeds come from torch's generator: the same draws
        want = loss(x)
        torch.manual_seed(rows)
        value = compiled(x)
        assert value.shape == () and torch.isfinite(value)
        torch.testing.assert_close(value, want)
