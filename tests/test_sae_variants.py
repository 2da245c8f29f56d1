"""BatchTopK and Matryoshka SAEs against plain-PyTorch references of their losses and
gradients, their inference threshold, compile, and the SAE metrics of the evaluation."""

from __future__ import annotations

import pytest
import torch

from aefast import reference
from aefast.models import BatchTopKSAE, MatryoshkaSAE
from aefast.train.evaluate import dictionary_metrics

D, L, K, K_AUX = 10, 24, 3, 5


def _model(cls, **kw):
    torch.manual_seed(0)
    model = cls(D, L, K, K_AUX, dead_steps=2, **kw).double()
    with torch.no_grad():  # away from the tied, zero-bias start, so every term matters
        model.encoder_bias.normal_(0, 0.3)
        model.pre_bias.normal_(0, 0.3)
    model.steps_since_fired[::4] = 5  # every fourth latent dead
    return model


def _reference_loss(model, x, prefixes):
    """The loss written out in plain PyTorch (aefast.reference for the selections)."""
    pre = (x - model.pre_bias) @ model.encoder_weight.T + model.encoder_bias
    z = reference.batch_topk(pre, K)
    losses = []
    for stop in prefixes:
        x_hat = model.pre_bias + z[:, :stop] @ model.decoder_weight[:stop]
        losses.append(0.5 * (x_hat - x).pow(2).sum(1).mean())
    dead = model.steps_since_fired >= 2
    values, indices = reference.topk_sparse(pre.masked_fill(~dead, float("-inf")), K_AUX, relu=True)
    aux_hat = torch.zeros(len(x), L, dtype=x.dtype).scatter(1, indices, values) @ model.decoder_weight
    aux = 0.5 * (aux_hat - (x - x_hat).detach()).pow(2).sum(1).mean()
    return torch.stack(losses).mean() + model.aux_coef * aux


@pytest.mark.parametrize("cls, prefixes", [(BatchTopKSAE, [L]), (MatryoshkaSAE, [4, 10, L])])
def test_loss_and_gradients_match_the_reference(cls, prefixes):
    kw = {"prefixes": prefixes} if cls is MatryoshkaSAE else {}
    model = _model(cls, **kw)
    x = torch.randn(13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = _reference_loss(model, x, prefixes)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model.loss(x)
    assert float(got["auxk"]) > 0  # dead latents: the AuxK term is in play
    got_grads = torch.autograd.grad(got["loss"], list(model.parameters()))
    torch.testing.assert_close(got["loss"], want)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)
    assert float(got["l0"]) == pytest.approx(K)  # k * B winners over B rows (no ties at this size)


def test_the_inference_threshold_is_the_mean_of_the_batches_smallest_kept_activation():
    model = _model(BatchTopKSAE)
    smallest = []
    for seed in range(3):
        x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        model.loss(x)
        pre = (x - model.pre_bias) @ model.encoder_weight.T + model.encoder_bias
        kept = reference.batch_topk(pre.detach(), K)
        smallest.append(kept[kept > 0].min())
    torch.testing.assert_close(model.threshold, torch.stack(smallest).mean())
    model.eval()  # then the code depends on the row alone
    x = torch.randn(5, D, dtype=torch.float64)
    pre = (x - model.pre_bias) @ model.encoder_weight.T + model.encoder_bias
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), torch.where(pre > model.threshold, pre, 0.0))
        torch.testing.assert_close(model.encode(x[:1]), model.encode(x)[:1])


def test_bad_prefixes_are_refused():
    for prefixes in ([4, 10], [10, 4, L], [0, L], []):
        with pytest.raises(ValueError, match="prefixes must increase from >= 1 to n_latents"):
            MatryoshkaSAE(D, L, K, K_AUX, prefixes=prefixes)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BatchTopKSAE, MatryoshkaSAE])
def test_the_loss_compiles_without_graph_breaks(cls):
    kw = {"prefixes": [8, L]} if cls is MatryoshkaSAE else {}
    model = _model(cls, **kw).float()
    x = torch.randn(12, D)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    eager = model.loss(x)["loss"]
    after = {name: t.clone() for name, t in model.state_dict().items()}
    model.load_state_dict(before)  # the buffers (dead counters, threshold) as they were
    compiled = torch.compile(model.loss, fullgraph=True)(x)["loss"]
    torch.testing.assert_close(compiled, eager)
    for name, t in model.state_dict().items():  # and updated the same way
        torch.testing.assert_close(t, after[name], msg=name)


def test_dictionary_metrics():
    x = torch.randn(50, 6, dtype=torch.float64)
    codes = torch.zeros(50, 8)
    codes[:, 0] = 1.0        # fires always: dense
    codes[:3, 1] = 2.0       # fires on 3 of 50
    # latents 2..7 never fire: dead
    result = dictionary_metrics(x, x * 0.5 + x.mean(0) * 0.5, (codes != 0).sum(0))
    assert result["fvu"] == pytest.approx(0.25)
    assert result["l0"] == pytest.approx(1 + 3 / 50)
    assert result["dead_fraction"] == pytest.approx(6 / 8)
    assert result["dense_fraction"] == pytest.approx(1 / 8)
    assert result["density_rows"] == 50
    assert dictionary_metrics(x[:1], x[:1] * 0.5, (codes[:1] != 0).sum(0))["fvu"] is None  # no variance: undefined, not inf


def test_jumprelu_sae_loss_and_gradients_match_the_reference():
    from aefast.models import JumpReLUSAE

    torch.manual_seed(0)
    model = JumpReLUSAE(D, L, l0_coef=0.3, bandwidth=0.5, threshold=0.2).double()
    with torch.no_grad():
        model.encoder_bias.normal_(0, 0.3)
        model.pre_bias.normal_(0, 0.3)
    x = torch.randn(13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pre = (x - model.pre_bias) @ model.encoder_weight.T + model.encoder_bias
    code, l0 = reference.jumprelu(pre, model.log_threshold.exp(), 0.5)
    want = 0.5 * (code @ model.decoder_weight + model.pre_bias - x).pow(2).sum(1).mean() + 0.3 * l0.mean()
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model.loss(x)
    got_grads = torch.autograd.grad(got["loss"], list(model.parameters()))
    torch.testing.assert_close(got["loss"], want)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)
    assert got_grads[-1].abs().sum() > 0  # the thresholds learn (through the straight-through rule)
    assert 0 < float(got["l0"]) < L


@pytest.mark.slow
def test_jumprelu_sae_loss_compiles_without_graph_breaks():
    from aefast.models import JumpReLUSAE

    torch.manual_seed(0)
    model = JumpReLUSAE(D, L)
    x = torch.randn(12, D)
    eager = model.loss(x)["loss"]
    compiled = torch.compile(model.loss, fullgraph=True)(x)["loss"]
    torch.testing.assert_close(compiled, eager)


def test_a_transcoder_predicts_the_target_from_the_input():
    from aefast.models import TopKSAE

    torch.manual_seed(0)
    n_out = 7
    model = TopKSAE(D, L, K, 0, n_out=n_out).double()
    with torch.no_grad():
        model.encoder_bias.normal_(0, 0.3)
        model.pre_bias.normal_(0, 0.3)
    assert model.encoder_weight.shape == (L, D) and model.decoder_weight.shape == (L, n_out)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, D, dtype=torch.float64, generator=g), torch.randn(13, n_out, dtype=torch.float64, generator=g)
    values, indices = reference.topk_encode(x, model.encoder_weight, model.encoder_bias, K)  # x as it is
    code = torch.zeros(13, L, dtype=torch.float64).scatter(1, indices, values)
    want = 0.5 * (code @ model.decoder_weight + model.pre_bias - y).pow(2).sum(1).mean()
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model.loss(torch.cat([x, y], dim=1))
    torch.testing.assert_close(got["loss"], want)
    for (name, _), gg, w in zip(model.named_parameters(), torch.autograd.grad(got["loss"], list(model.parameters())),
                                want_grads):
        torch.testing.assert_close(gg, w, msg=name)
    with torch.no_grad():  # inputs alone or whole rows: the same prediction
        torch.testing.assert_close(model.reconstruct(x), model.reconstruct(torch.cat([x, y], dim=1)))


def test_paired_arrays_read_side_by_side(tmp_path):
    import numpy as np

    from aefast.data import ArrayFile, PairedArrays

    a, b = np.random.rand(50, 6).astype(np.float16), np.random.rand(50, 3).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "short.npy", b[:40])
    pair = PairedArrays(ArrayFile(tmp_path / "a.npy"), ArrayFile(tmp_path / "b.npy"))
    assert (pair.rows, pair.dim, pair.split, pair.row_bytes) == (50, 9, 6, 18)
    np.testing.assert_array_equal(pair.read(7, 31).numpy(), np.concatenate([a, b], axis=1)[7:31])
    with pytest.raises(ValueError, match="--target: short.npy has 40 rows, but a.npy has 50"):
        PairedArrays(ArrayFile(tmp_path / "a.npy"), ArrayFile(tmp_path / "short.npy"))


def test_jumprelu_sae_threshold_gradient_is_the_same_under_bfloat16_autocast():
    """bfloat16 pre-activations near a threshold of 6 lie 1/32 apart: a bandwidth of 0.05
    would see the threshold's grid point alone (0.625 of the density). The encoder runs
    in float32 under autocast, so the L0 term's threshold gradient is float32's."""
    from aefast.models import JumpReLUSAE

    torch.manual_seed(0)
    model = JumpReLUSAE(16, 8, bandwidth=0.05, threshold=6.0)
    with torch.no_grad():
        model.encoder_bias.fill_(6.0)  # pre-activations ~ N(6, 1): many near the threshold
    x = torch.randn(4096, 16)
    gradients = []
    for dtype in (None, torch.bfloat16):
        model.autocast_dtype = dtype
        model.zero_grad()
        with model.autocast():
            code, l0 = model._code(x)
        l0.sum().backward()
        gradients.append(model.log_threshold.grad.clone())
        assert code.dtype == torch.float32
    assert torch.equal(gradients[0], gradients[1])
    assert (gradients[0] < 0).all()  # a larger threshold, fewer active
