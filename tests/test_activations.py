"""aefast activations and the spliced-loss evaluation, on tiny GPT-2 and Llama models
built from a config, saved with save_pretrained and loaded by path (the real loading
code; nothing is downloaded)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the [hf] extra; the test extra installs it

from aefast.activations import read_manifest, spliced_loss, write_activations  # noqa: E402
from aefast.cli import main  # noqa: E402

CONTEXT = 24
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park", "while", "birds", "sang", "over", "green", "hills"]


def _text(path, documents=160, seed=0):
    """Documents of a small grammar-free language a tiny model can learn something of:
    each sentence repeats a few fixed phrases."""
    rng = random.Random(seed)
    phrases = [" ".join(WORDS[i:i + 4]) for i in range(0, len(WORDS) - 3, 2)]
    docs = ["\n".join(" ".join(rng.choice(phrases) for _ in range(3)) for _ in range(3)) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


def _tokenizer(docs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<unk>")


def _train_a_little(model, tokenizer, text_path, steps):
    """A few Adam steps of next-token prediction on the text: a model that has learned
    something, so zeroing a layer hurts and a good reconstruction does not."""
    from aefast.activations import read_documents, token_sequences

    sequences = torch.tensor(list(token_sequences(tokenizer, read_documents(str(text_path), None), CONTEXT)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = sequences[torch.randint(len(sequences), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{'gpt2': folder, 'llama': folder, 'text': file}: a GPT-2 trained a little, an
    untrained Llama, both with the same tokenizer."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    text = root / "text.txt"
    docs = _text(text)
    tokenizer = _tokenizer(docs)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64, **special))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=64, **special))
    folders = {"text": text}
    for name, model in (("gpt2", _train_a_little(gpt2, tokenizer, text, 150)), ("llama", llama.eval())):
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def _write(tiny_models, out, model="gpt2", layer=1, site="resid", tokens=700, **options):
    options = {"context": CONTEXT, "shard_tokens": 256, **options}
    return write_activations(str(tiny_models[model]), layer, site, out, tokens, text=str(tiny_models["text"]),
                             device=torch.device("cpu"), progress=False, **options)


def _rows(folder, manifest):
    return np.concatenate([np.load(folder / name) for name in manifest["shards"]])


def test_shards_hold_the_sites_activations_without_bos(tiny_models, tmp_path):
    manifest = _write(tiny_models, tmp_path / "acts", layer=0, tokens=700, batch_size=4)
    rows = _rows(tmp_path / "acts", manifest)
    assert rows.dtype == np.float16 and rows.shape == (700, 32)
    assert [np.load(tmp_path / "acts" / name).shape[0] for name in manifest["shards"]] == [256, 256, 188]
    assert read_manifest(tmp_path / "acts") == manifest
    assert manifest["tokens"] == 700 and manifest["d_model"] == 32 and manifest["site"] == "resid"
    assert manifest["mean_norm"] == pytest.approx(np.linalg.norm(rows.astype(np.float64), axis=1).mean(), rel=1e-3)
    # the same rows from the model's own hidden states: layer 0's output, positions 1..
    # (transformers' last hidden state has the final norm applied: not a layer's output)
    from aefast.activations import load_language_model, read_documents, token_sequences

    model, tokenizer = load_language_model(str(tiny_models["gpt2"]), torch.device("cpu"))
    sequences = torch.tensor(list(token_sequences(tokenizer, read_documents(str(tiny_models["text"]), None),
                                                  CONTEXT))[:manifest["sequences"]])
    assert sequences[:, 0].eq(tokenizer.bos_token_id).all()
    with torch.no_grad():
        hidden = model(input_ids=sequences, output_hidden_states=True).hidden_states[1]
    want = hidden[:, 1:].flatten(0, 1)[:700].to(torch.float16).numpy()
    np.testing.assert_array_equal(rows, want)
    # deterministic: written again, the same bits
    again = _write(tiny_models, tmp_path / "again", layer=0, tokens=700, batch_size=7)
    np.testing.assert_array_equal(_rows(tmp_path / "again", again), rows)


def test_mlp_sites_of_a_llama_are_the_mlps_input_and_output(tiny_models, tmp_path):
    inputs = _rows(tmp_path / "in", _write(tiny_models, tmp_path / "in", "llama", 0, "mlp_in", 300))
    outputs = _rows(tmp_path / "out", _write(tiny_models, tmp_path / "out", "llama", 0, "mlp_out", 300))
    from aefast.activations import decoder_layers, load_language_model

    model, _ = load_language_model(str(tiny_models["llama"]), torch.device("cpu"))
    with torch.no_grad():
        recomputed = decoder_layers(model)[0].mlp(torch.from_numpy(inputs).float())
    torch.testing.assert_close(recomputed, torch.from_numpy(outputs).float(), atol=2e-3, rtol=2e-2)
    assert np.abs(inputs - outputs).max() > 0.1  # two different sites


@pytest.mark.parametrize("options, message", [
    ({"site": "resid", "target_site": "mlp_out"}, "--target-site mlp_out at layer 1 must come after --site resid"),
    ({"site": "mlp_in", "target_site": "mlp_out", "target_layer": 0},
     "--target-site mlp_out at layer 0 must come after --site mlp_in at layer 1"),
    ({"site": "attn"}, "--site must be one of resid, mlp_in, mlp_out"),
    ({"layer": 2}, r"--layer must be in \[0, 1\] for this model, got 2"),
    ({"tokens": 0}, "--tokens must be >= 1"),
    ({"context": 1}, "--context must be >= 2"),
    ({"context": 65}, "--context 65 is longer than the 64 positions"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tiny_models, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _write(tiny_models, tmp_path / "acts", **options)
    assert not list(tmp_path.glob("acts/*.npy"))


class _Exact(torch.nn.Module):
    """Reconstructs perfectly (or, `zero`, not at all): the two ends of the spliced loss."""

    def __init__(self, zero=False):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.0 if zero else 1.0))

    def reconstruct(self, x):
        return x * self.scale


@pytest.mark.parametrize("site", ["resid", "mlp_in"])  # a forward hook's output, a pre-hook's argument
def test_spliced_loss_of_a_perfect_and_of_a_null_reconstruction(tiny_models, tmp_path, site):
    manifest = _write(tiny_models, tmp_path / "acts", site=site, tokens=300)
    perfect = spliced_loss(manifest, _Exact(), sequences=6)
    assert perfect["lm_loss_spliced"] == pytest.approx(perfect["lm_loss_clean"], abs=1e-6)
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["lm_eval_held_out"] and perfect["lm_eval_sequences"] == 6
    null = spliced_loss(manifest, _Exact(zero=True), sequences=6)
    assert null["lm_loss_spliced"] == pytest.approx(null["lm_loss_ablated"], abs=1e-6)
    assert null["lm_loss_ablated"] > null["lm_loss_clean"] + 0.01  # the trained model needs the site


@pytest.mark.slow
def test_workflow_activations_then_train_then_the_spliced_evaluation(tiny_models, tmp_path, capsys):
    acts, run = tmp_path / "acts", tmp_path / "sae"
    assert main(["activations", "--model", str(tiny_models["gpt2"]), "--layer", "1", "--text",
                 str(tiny_models["text"]), "--tokens", "3000", "--context", str(CONTEXT), "--out", str(acts),
                 "--device", "cpu"]) == 0
    assert "wrote 3,000 activations of resid at layer 1" in capsys.readouterr().out
    assert main(["train", "topk-sae", "--data", str(acts), "--n-latents", "128", "--k", "8", "--epochs", "8",
                 "--batch-size", "64", "--lr", "1e-2", "--out", str(run)]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["lm_loss_clean"] < result["lm_loss_spliced"] <= result["lm_loss_ablated"]
    assert 0.0 < result["loss_recovered"] < 1.0
    assert "of the loss recovered" in capsys.readouterr().out


@pytest.mark.slow
def test_a_transcoder_from_mlp_in_to_mlp_out_end_to_end(tiny_models, tmp_path, capsys):
    import aefast

    acts, run = tmp_path / "acts", tmp_path / "transcoder"
    assert main(["activations", "--model", str(tiny_models["gpt2"]), "--layer", "1", "--site", "mlp_in",
                 "--target-site", "mlp_out", "--text", str(tiny_models["text"]), "--tokens", "3000",
                 "--context", str(CONTEXT), "--out", str(acts), "--device", "cpu"]) == 0
    assert f"--target {acts}/target" in capsys.readouterr().out
    inputs, targets = read_manifest(acts), read_manifest(acts / "target")
    assert (inputs["site"], targets["site"], targets["layer"], targets["tokens"]) == ("mlp_in", "mlp_out", 1, 3000)
    from aefast.activations import decoder_layers, load_language_model

    model, _ = load_language_model(str(tiny_models["gpt2"]), torch.device("cpu"))
    x, y = _rows(acts, inputs)[:200], _rows(acts / "target", targets)[:200]  # the same tokens' rows
    with torch.no_grad():
        recomputed = decoder_layers(model)[1].mlp(torch.from_numpy(x).float()[None])[0]
    torch.testing.assert_close(recomputed, torch.from_numpy(y).float(), atol=5e-3, rtol=2e-2)

    assert main(["train", "topk-sae", "--data", str(acts), "--target", str(acts / "target"), "--n-latents", "128",
                 "--k", "8", "--epochs", "8", "--batch-size", "64", "--lr", "1e-2", "--out", str(run)]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    # the MLP's output predicted well enough that the model hardly notices (a transcoder's
    # prediction may even lower the loss a little: measured 1.0398 against 1.0406 clean)
    assert result["lm_loss_spliced"] < result["lm_loss_ablated"] and result["loss_recovered"] > 0.9
    assert 0.0 < result["fvu"] < 1.0
    loaded, config = aefast.load_run(run)
    assert loaded.transcoder and loaded.decoder_weight.shape == (128, 32) and config["target"] == str(acts / "target")


def test_token_sequences_cut_the_joined_documents_into_windows_led_by_bos():
    from aefast.activations import token_sequences

    class Tokenizer:
        bos_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens):
            assert not add_special_tokens
            return {"input_ids": [int(word) for word in text.split()]}

    documents = ["2 3 4 5 6 7 8", "9", "", " ".join(map(str, range(10, 41)))]
    stream = [*range(2, 9), 1, 9, 1, 1, *range(10, 41), 1]  # each document, then end-of-text
    for context in (2, 4, 9, 60):
        step = context - 1
        want = [[0, *stream[i:i + step]] for i in range(0, len(stream) - step + 1, step)]
        assert list(token_sequences(Tokenizer(), iter(documents), context)) == want, context
