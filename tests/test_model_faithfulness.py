"""Each model does what its paper (and the source notes) say it does: WTA codes that do
not depend on the batch after training, a conv code that says what the decoder reads, a
GSN chain that samples, x's reconstruction as the stacked models' reconstruction column,
tied weights that are one parameter, a linear autoencoder that finds PCA's subspace, and
a sparsity gradient that reaches dead units."""

import copy
import math

import pytest
import torch

import aefast as ae
from aefast.data import load_dataset
from aefast.models import (
    GSN,
    ConvAutoencoder,
    ConvWTAAutoencoder,
    LinearAutoencoder,
    StackedAutoencoder,
    WTAAutoencoder,
)
from aefast.models.base import TiedDecoder, squared_error
from aefast.reference import lifetime_count
from aefast.train.config import MODELS, build_model, defaults
from aefast.train.evaluate import largest_angle, principal_components

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").train


def _train(model, x, steps=20, lr=3e-3, batch=64):
    optimizers = model.configure_optimizers(lr)
    model.train()
    for step in range(steps):
        start = (step * batch) % (len(x) - batch)
        model.train_step(x[start:start + batch], optimizers)
    return model.eval()


# ---------------------------------------------------------------- winner-take-all


def _wta_models():
    return [WTAAutoencoder(64, hidden=48, rate=0.1), ConvWTAAutoencoder((1, 8, 8), channels=(8,), rate=0.2)]


@pytest.mark.parametrize("index", [0, 1], ids=["fc", "conv"])
def test_wta_codes_do_not_depend_on_the_batch_in_eval_mode(index, digits):
    torch.manual_seed(0)
    model = _train(_wta_models()[index], digits)
    x = digits[:77]  # an odd batch: lifetime top-k would keep ceil(rate * 77) per unit
    with torch.no_grad():
        whole = {name: getattr(model, name)(x) for name in ("encode", "code", "reconstruct")}
        for i in (0, 5, 76):
            for name, batch_result in whole.items():
                alone = getattr(model, name)(x[i:i + 1])
                torch.testing.assert_close(alone[0], batch_result[i], msg=f"{name} of row {i}")
        for name, batch_result in whole.items():  # the same rows in another batch
            torch.testing.assert_close(getattr(model, name)(digits[:40]), batch_result[:40], msg=name)


def test_wta_features_are_the_relu_outputs_and_training_codes_the_winners(digits):
    torch.manual_seed(0)
    fc, conv = _wta_models()
    x = digits[:64]
    fc.eval()
    with torch.no_grad():
        torch.testing.assert_close(fc.encode(x), torch.relu(fc.encoder(x)))  # no sparsity after training
        conv_features = conv.eval().features(x)
        torch.testing.assert_close(conv.encode(x), torch.nn.functional.max_pool2d(conv_features, 2).flatten(1))
    fc.train()
    code = fc.code(x)
    kept = (code != 0).sum(0)
    assert torch.all(kept <= lifetime_count(fc.rate, 64))  # exactly the lifetime winners (fewer if ReLU'd to 0)
    torch.testing.assert_close(code, ae.lifetime_topk(torch.relu(fc.encoder(x)), fc.rate))


def test_wta_eval_thresholds_keep_about_the_training_rate(digits):
    """The running thresholds are the smallest winners of past batches: in eval mode, on
    the data it was trained on, a unit keeps about its rate (on every row, independently)."""
    torch.manual_seed(0)
    model = _train(WTAAutoencoder(64, hidden=48, rate=0.1), digits, steps=60)
    assert int(model.thresholds_tracked) == 60
    with torch.no_grad():
        active = float((model.code(digits) != 0).float().mean())
    assert 0.05 < active < 0.2, active
    restored = WTAAutoencoder(64, hidden=48, rate=0.1)  # thresholds travel in the checkpoint
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.winner_threshold, model.winner_threshold)


# ---------------------------------------------------------------- stacked conv autoencoder


def test_conv_without_switches_reconstructs_from_the_code_alone(digits):
    x, other = digits[:16], digits[16:32]
    for switches in (False, True):
        torch.manual_seed(0)
        model = ConvAutoencoder((1, 8, 8), channels=(4, 6), switches=switches).eval()
        with torch.no_grad():
            code, own = model._encode(x)
            _, foreign = model._encode(other)
            same = torch.equal(model._decode(code, own), model._decode(code, foreign))
        # with switches, where the maxima were is information the code does not hold
        assert same != switches
        assert model.side_channel == ("pooling switches" if switches else None)


def test_conv_pretrains_layer_by_layer_then_fine_tunes(digits):
    model = ConvAutoencoder((1, 8, 8), channels=(4, 6), pretrain_epochs=1)
    assert [model.begin_epoch(e) for e in range(3)] == ["pretrain layer 1/2", "pretrain layer 2/2", "fine-tune"]
    for epoch, trained in [(0, {"encoders.0", "decoders.0"}), (1, {"encoders.1", "decoders.1"}),
                           (2, {"encoders.0", "decoders.0", "encoders.1", "decoders.1"})]:
        model.zero_grad(set_to_none=True)
        model.begin_epoch(epoch)
        terms = model.loss(digits[:32])
        terms["loss"].backward()
        assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None} == trained
        with torch.no_grad():  # the reconstruction column is x's, through the layers trained so far
            code, switches = model._encode(digits[:32], epoch + 1 if epoch < 2 else None)
            want = squared_error(model._decode(code, switches).flatten(1), digits[:32])
        torch.testing.assert_close(terms["reconstruction"], want)


# ---------------------------------------------------------------- stacked (fully connected)


def test_stacked_reconstruction_column_is_x_through_the_trained_layers(digits):
    torch.manual_seed(0)
    model, x = StackedAutoencoder(64, layers=(16, 8), pretrain_epochs=1), digits[:32]
    for epoch, depth in [(0, 1), (1, 2), (2, 2)]:
        model.begin_epoch(epoch)
        terms = model.loss(x)
        with torch.no_grad():
            want = squared_error(model.decode(model.encode(x, depth), depth), x)
        torch.testing.assert_close(terms["reconstruction"], want)
    model.begin_epoch(0)  # pretraining layer 1: its loss is its own input's reconstruction, here x's too
    torch.testing.assert_close(model.loss(x)["loss"], model.loss(x)["reconstruction"])
    model.begin_epoch(1)  # layer 2 reconstructs layer 1's codes: another number
    terms = model.loss(x)
    assert not torch.allclose(terms["loss"], terms["reconstruction"])


# ---------------------------------------------------------------- GSN


def test_gsn_samples_are_draws_of_the_chain(digits):
    torch.manual_seed(0)
    model = _train(GSN(64, hidden=32, sample_steps=5), digits, steps=10)
    torch.manual_seed(1)
    first = model.sample(16)
    torch.manual_seed(2)
    second = model.sample(16)
    torch.manual_seed(2)
    means = model.sample(16, mean=True)
    assert not torch.equal(first, second)  # two seeds, two chains
    assert set(first.unique().tolist()) <= {0.0, 1.0}  # pixels drawn from Bernoulli(P(X | x~)), not means
    assert 0.05 < float(first.mean()) < 0.95
    grey = ((means > 0.05) & (means < 0.95)).float().mean()
    assert grey > 0.1  # what returning the means would have given: grey levels


def test_gsn_walkback_continues_from_a_draw(digits, monkeypatch):
    """Each walkback step's chain state is a Bernoulli draw of the previous step's P(X | x~)."""
    model, seen = GSN(64, hidden=32, walkback=3), []
    step = model.chain_step_logits

    def spy(x):
        seen.append(x.detach().clone())
        return step(x)

    monkeypatch.setattr(model, "chain_step_logits", spy)
    model.loss(digits[:8])
    assert torch.equal(seen[0], digits[:8])
    for state in seen[1:]:
        assert set(state.unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------- tied weights

TIED = [name for name, spec in MODELS.items() if "tied" in spec.params]


def test_tied_is_offered_by_the_fully_connected_models():
    assert set(TIED) == {"linear", "ae", "stacked", "denoising", "sparse", "contractive", "gsn", "wta"}


@pytest.mark.parametrize("name", TIED)
def test_tied_decoders_use_the_encoders_weights(name, digits):
    config = {**defaults(name), "tied": True}
    torch.manual_seed(0)
    model = build_model(config, (1, 8, 8))
    decoders = [m for m in model.modules() if isinstance(m, TiedDecoder)]
    assert decoders
    for decoder in decoders:
        (encoder,) = decoder._tied_to
        assert decoder.weight.data_ptr() == encoder.weight.data_ptr()  # one parameter, transposed
    names = list(model.state_dict())
    assert not any(key.endswith("_tied_to") for key in names)
    n_untied = sum(p.numel() for p in build_model(defaults(name), (1, 8, 8)).parameters())
    n_tied = sum(p.numel() for p in model.parameters())
    assert n_tied == n_untied - sum(d.weight.numel() for d in decoders)

    # both sides train the shared weight, and a copy (as a checkpoint restores it) stays tied
    model.begin_epoch(10**6)
    model.train()
    terms = model.loss(digits[:32])
    terms["loss"].backward()
    assert all(d._tied_to[0].weight.grad is not None for d in decoders)
    restored = copy.deepcopy(model)
    restored.load_state_dict(model.state_dict())
    for decoder in [m for m in restored.modules() if isinstance(m, TiedDecoder)]:
        assert decoder.weight.data_ptr() == decoder._tied_to[0].weight.data_ptr()
        assert any(decoder._tied_to[0] is m for m in restored.modules())
    restored.double()
    decoder = next(m for m in restored.modules() if isinstance(m, TiedDecoder))
    assert decoder.weight.dtype == torch.float64


def test_tied_decoder_gradient_is_the_sum_of_both_uses():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 3)
    decoder = TiedDecoder(encoder)
    x = torch.randn(4, 5)
    loss = decoder(torch.tanh(encoder(x))).pow(2).sum()
    loss.backward()
    w = encoder.weight.detach().clone().requires_grad_(True)
    manual = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w, encoder.bias)), w.t(),
                                        decoder.bias).pow(2).sum()
    (want,) = torch.autograd.grad(manual, w)
    torch.testing.assert_close(encoder.weight.grad, want)


# ---------------------------------------------------------------- linear = PCA


def test_largest_angle():
    q = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64)).Q
    assert largest_angle(q[:, :3], q[:, :3] @ torch.randn(3, 3, dtype=torch.float64)) < 1e-5  # same span
    assert largest_angle(q[:, :3], q[:, 1:4]) == pytest.approx(90.0)
    tilted = q[:, :2].clone()
    tilted[:, 1] = math.cos(0.3) * q[:, 1] + math.sin(0.3) * q[:, 5]
    assert largest_angle(q[:, :2], tilted) == pytest.approx(math.degrees(0.3))


def test_linear_autoencoder_finds_the_principal_subspace(digits):
    """Baldi & Hornik: the optimum of a linear autoencoder spans PCA's subspace. Full-batch
    Adam on digits with 10 components (a clear eigengap after the 10th: variances 0.21,
    then 0.16 of the first's) gets within a degree (0.25 measured)."""
    torch.manual_seed(0)
    model = LinearAutoencoder(64, hidden=10)
    start = largest_angle(principal_components(digits, 10)[1], model.subspace())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3000):
        optimizer.zero_grad()
        model.loss(digits)["loss"].backward()
        optimizer.step()
    angle = largest_angle(principal_components(digits, 10)[1], model.subspace())
    assert angle < 1.0, angle
    assert start > 30  # a random start is far from it: the test can fail


# ---------------------------------------------------------------- sparse


def test_sparse_default_code_is_overcomplete():
    config = defaults("sparse")
    assert config["hidden"] > 64


def test_a_dead_unit_gets_a_sparsity_gradient():
    """rho_hat of a unit that never fires is clamped; the gradient still pushes it up,
    through the fused op and through the momentum estimate alike."""
    a = torch.rand(32, 6) * 0.5
    a[:, 2] = 0.0
    for module in (ae.nn.KLSparsity(0.05, 3.0), ae.nn.KLSparsity(0.05, 3.0, momentum=0.1)):
        leaf = a.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(leaf), leaf)
        assert torch.all(grad[:, 2] < 0), module
