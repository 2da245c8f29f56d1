"""Smoke tests of every model of aefast.models (built as `aefast train` builds them):
a few steps on a small batch of digits, every loss term finite, the loss falling; plus
the parts of models with special training (stacked, top-k SAE, denoising)."""

import math
import re
import subprocess
import sys

import pytest
import torch

from aefast.data import load_dataset
from aefast.models import (
    GSN,
    ConvAutoencoder,
    ConvWTAAutoencoder,
    DenoisingAutoencoder,
    JumpReLUSAE,
    StackedAutoencoder,
    TopKSAE,
)
from aefast.models.base import decoder_layer
from aefast.train.config import MODELS, build_model, defaults

pytestmark = pytest.mark.usefixtures("one_thread")

# The adversarial terms are a game, not a descent: for the AAE the reconstruction falls.
FALLING_TERM = {"aae": "reconstruction"}


@pytest.fixture(scope="module")
def digits_batch():
    return load_dataset("digits").train[:96]


def _model(spec: str):
    config = defaults(spec.removesuffix("-conv"), conv=spec.endswith("-conv"))
    torch.manual_seed(0)
    return build_model(config, (1, 8, 8)), config


@pytest.mark.parametrize("spec", list(MODELS))
def test_model_trains_a_few_steps(spec, digits_batch):
    model, config = _model(spec)
    optimizers = model.configure_optimizers(config["lr"])
    model.begin_epoch(10**6)  # past any pretraining: the whole model trains
    model.train()
    history = []
    for _ in range(15):
        terms = model.train_step(digits_batch, optimizers)
        assert all(math.isfinite(float(v)) for v in terms.values()), terms
        history.append(float(terms[FALLING_TERM.get(spec, "loss")]))
    assert history[-1] < history[0], history
    model.eval()
    with torch.no_grad():
        assert model.reconstruct(digits_batch).shape == digits_batch.shape
        assert model.encode(digits_batch).shape[0] == len(digits_batch)
        reconstruction, code = model.reconstruct_and_encode(digits_batch)  # the evaluation's
        assert torch.equal(reconstruction, model.reconstruct(digits_batch))
        assert torch.equal(code, model.encode(digits_batch))
        if hasattr(model, "sample"):
            assert model.sample(5).shape == (5, 64)


def _params_with_grad(model):
    return {name for name, p in model.named_parameters() if p.grad is not None}


def test_stacked_pretrains_one_layer_at_a_time_then_fine_tunes(digits_batch):
    model = StackedAutoencoder(64, layers=(16, 8), pretrain_epochs=2)
    phases = [model.begin_epoch(epoch) for epoch in range(6)]
    assert phases == ["pretrain layer 1/2"] * 2 + ["pretrain layer 2/2"] * 2 + ["fine-tune"] * 2
    for epoch, trained in [(0, {"encoders.0", "decoders.0"}), (2, {"encoders.1", "decoders.1"}),
                           (4, {"encoders.0", "decoders.0", "encoders.1", "decoders.1"})]:
        model.zero_grad(set_to_none=True)
        model.begin_epoch(epoch)
        model.loss(digits_batch)["loss"].backward()
        assert {name.rsplit(".", 1)[0] for name in _params_with_grad(model)} == trained


def test_topk_sae_unit_norm_decoder_and_auxk_on_dead_latents(digits_batch):
    torch.manual_seed(0)
    model = TopKSAE(64, n_latents=32, k=4, k_aux=8, dead_steps=2)
    optimizers = model.configure_optimizers(1e-2)
    for _ in range(3):
        terms = model.train_step(digits_batch, optimizers)
        norms = model.decoder_weight.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    dead = model.dead_latents()
    assert dead.any() and float(terms["auxk"]) > 0
    model.zero_grad(set_to_none=True)
    model.loss(digits_batch)["loss"].backward()
    # AuxK gives dead latents a gradient they would not get from the top-k reconstruction
    assert model.encoder_weight.grad[dead].abs().sum() > 0


@pytest.mark.parametrize("build", [lambda: TopKSAE(64, n_latents=32, k=4, k_aux=8, dead_steps=2),
                                   lambda: JumpReLUSAE(64, n_latents=32, threshold=0.05)], ids=["topk", "jumprelu"])
def test_sae_step_takes_the_decoder_gradient_along_each_row_out(digits_batch, build):
    torch.manual_seed(0)
    model = build()
    model.loss(digits_batch)["loss"].backward()
    grad, rows = model.decoder_weight.grad.clone(), model.decoder_weight.detach()
    model.before_step()
    along = (grad * rows).sum(1, keepdim=True)
    assert along.abs().max() > 1e-3  # something to take out
    torch.testing.assert_close(model.decoder_weight.grad, grad - along * rows)
    assert (model.decoder_weight.grad * rows).sum(1).abs().max() < 1e-6
    # train_step takes it out before the optimizer sees it: SGD moves the rows perpendicular to themselves
    moved = build()
    moved.load_state_dict(model.state_dict())
    moved.after_step = lambda: None  # the step's own movement, not renormalised
    before = moved.decoder_weight.detach().clone()
    moved.train_step(digits_batch, {"model": torch.optim.SGD(moved.parameters(), lr=0.1)})
    step = moved.decoder_weight.detach() - before
    assert step.abs().max() > 1e-4 and (step * before).sum(1).abs().max() < 1e-6


def test_topk_sae_step_of_accumulated_batches_is_one_larger_batch(digits_batch):
    """Gradient accumulation is one larger batch, dead-latent bookkeeping included: a
    latent on the verge of dead is not dead for the step's later batches, and a step
    counts once however many batches it has."""
    import copy

    torch.manual_seed(0)
    whole = TopKSAE(64, n_latents=32, k=4, k_aux=8, dead_steps=3)
    whole.steps_since_fired[::2] = 2  # one step from dead
    whole.steps_since_fired[::4] = 3  # dead
    split = copy.deepcopy(whole)
    totals = [model.train_step(batches, model.configure_optimizers(1e-2))
              for model, batches in [(whole, digits_batch), (split, list(digits_batch.split(32)))]]
    assert torch.equal(split.steps_since_fired, whole.steps_since_fired)
    assert (whole.steps_since_fired == 3).any() and (whole.steps_since_fired == 0).any()
    assert not split.fired_in_step.any()
    for name in totals[0]:
        torch.testing.assert_close(totals[1][name], totals[0][name], msg=name)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize("cls", ["TopKSAE", "BatchTopKSAE"])
def test_a_step_counts_once_for_a_latent_that_never_fires(digits_batch, cls):
    import aefast.models as models

    torch.manual_seed(0)
    model = getattr(models, cls)(64, n_latents=32, k=4, k_aux=8, dead_steps=100)
    with torch.no_grad():
        model.encoder_bias[:3] = -1e4  # never a positive value
    optimizers = model.configure_optimizers(1e-3)
    for step in (1, 2):
        model.train_step(list(digits_batch.split(32)), optimizers)  # 3 batches a step
        assert model.steps_since_fired[:3].tolist() == [step] * 3
        assert (model.steps_since_fired[3:] < step).any()
    model.eval()
    model.after_step()  # renormalising outside training counts no step
    assert model.steps_since_fired[:3].tolist() == [2] * 3


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("n_latents", 0, "n_latents must be >= 1, got 0"), ("dead_steps", 0, "dead_steps must be >= 1, got 0"),
    ("aux_coef", -1.0, "aux_coef must be >= 0, got -1.0"), ("aux_coef", float("nan"), "aux_coef must be >= 0")])
def test_topk_sae_bad_arguments_are_named(argument, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TopKSAE(64, **{"n_latents": 32, "k": 4, argument: value})


def test_denoising_corrupts_in_training_only(digits_batch):
    torch.manual_seed(0)
    model = DenoisingAutoencoder(64, hidden=16, kind="masking", level=0.5)
    assert not torch.equal(model.encode(digits_batch), model.encode(digits_batch))
    model.eval()
    torch.testing.assert_close(model.encode(digits_batch), torch.sigmoid(model.encoder(digits_batch)))
    assert torch.equal(model.encode(digits_batch), model.encode(digits_batch))


@pytest.mark.parametrize("spec", list(MODELS))
def test_model_steps_under_bfloat16_autocast(spec, digits_batch):
    """The trainer's mixed-precision path (bfloat16 autocast on GPU), run on the CPU: the
    ops take no part in autocast, so a parameter passed beside an activation must have
    been cast to the activation's dtype."""
    model, config = _model(spec)
    model.autocast_dtype = torch.bfloat16
    optimizers = model.configure_optimizers(config["lr"])
    model.begin_epoch(10**6)
    for _ in range(2):
        terms = model.train_step(digits_batch, optimizers)
        assert all(math.isfinite(float(v)) for v in terms.values()), terms
    model.eval()
    with torch.no_grad(), model.autocast():
        assert model.reconstruct(digits_batch).shape == digits_batch.shape
        if hasattr(model, "sample"):
            assert model.sample(3).shape == (3, 64)


@pytest.mark.parametrize("spec", list(MODELS))
def test_model_trains_in_float64(spec, digits_batch):
    """`model.double()` (float64 parameters and buffers, gradcheck-style debugging): the
    loss keeps float64, buffers tracked in training follow the model's dtype, and
    samples come out in it."""
    model, config = _model(spec)
    model.double()
    x = digits_batch.double()
    optimizers = model.configure_optimizers(config["lr"])
    model.begin_epoch(10**6)
    model.train()
    for _ in range(2):
        terms = model.train_step(x, optimizers)
        assert terms["loss"].dtype == torch.float64, terms
        assert all(math.isfinite(float(v)) for v in terms.values()), terms
    model.eval()
    with torch.no_grad():
        assert model.reconstruct(x).dtype == torch.float64
        if hasattr(model, "sample"):
            assert model.sample(3).dtype == torch.float64


def test_decoder_layers_are_made_on_the_encoders_device_and_dtype():
    encoder = torch.nn.Linear(5, 3, device="meta", dtype=torch.float64)
    for tied in (False, True):
        decoder = decoder_layer(encoder, tied)
        assert {(p.device.type, p.dtype) for p in decoder.parameters()} == {("meta", torch.float64)}
        assert decoder(torch.empty(2, 3, device="meta", dtype=torch.float64)).shape == (2, 5)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ConvAutoencoder((1, 8, 8), kernel_size=4), "kernel_size must be odd and >= 1"),
    (lambda: ConvWTAAutoencoder((1, 8, 8), decoder_kernel_size=6), "decoder_kernel_size must be odd and >= 1"),
    (lambda: ConvWTAAutoencoder((1, 8, 8), kernel_size=0), "kernel_size must be odd and >= 1"),
    (lambda: GSN(64, sample_steps=0), "sample_steps must be >= 1, got 0"),
    (lambda: GSN(64, walkback=0), "walkback must be >= 1, got 0")])
def test_model_arguments_that_cannot_work_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("spec", ["batchtopk-sae", "wta", "wta-conv"])
def test_inference_thresholds_move_with_training_batches_only(digits_batch, spec):
    model, _ = _model(spec)
    model.train()
    tracked = "threshold_tracked" if spec == "batchtopk-sae" else "thresholds_tracked"
    with torch.no_grad():
        model.encode(digits_batch), model.reconstruct(digits_batch)  # train mode, but no training batch
    assert getattr(model, tracked).item() == 0
    model.loss(digits_batch)
    assert getattr(model, tracked).item() == 1


def test_the_models_are_reached_as_ae_models_after_import_aefast_alone():
    # (In this process aefast.models is imported already: a fresh interpreter tells.)
    code = "import aefast as ae; print(sorted(n for n in ae.models.__all__ if isinstance(getattr(ae.models, n), type)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import aefast.models

    assert out.strip() == str(sorted(aefast.models.__all__))
