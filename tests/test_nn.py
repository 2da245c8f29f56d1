"""nn.Module wrappers: KLSparsity (with and without the moving average) and ContractivePenalty."""

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
    (want,) = torch.autograd.grad(expected, a2)
    torch.testing.assert_close(got, want)
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
    with pytest.raises(ValueError, match="momentum"):
        ae.nn.KLSparsity(0.1, momentum=momentum)


def test_bad_rho_and_beta():
    with pytest.raises(ValueError, match="rho"):
        ae.nn.KLSparsity(1.0)
    with pytest.raises(ValueError, match="beta"):
        ae.nn.KLSparsity(0.1, -2.0)


def test_contractive_module():
    h, w = batch(), torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(
        ae.nn.ContractivePenalty(0.3)(h, w), 0.3 * reference.contractive_penalty(h, w)
    )
