"""`aefast study pretraining` on a tiny configuration: the outputs and their shape, the
pretrained layers really used, and one-line errors for bad settings."""

import json

import pytest
import torch

from aefast.cli import main
from aefast.data import load_dataset
from aefast.train import study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_tiny_study_writes_its_table_json_and_plot(tmp_path, capsys):
    argv = ["study", "pretraining", "--seeds", "2", "--label-fractions", "0.05,1", "--inits", "random-relu,stacked,wta",
            "--pretrain-epochs", "3", "--finetune-steps", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert f"wrote {tmp_path}/: results.json, results.md, study.png" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["results"]
    assert len(rows) == 3 * 2 * 2  # inits x label fractions x BatchNorm
    assert {(r["init"], r["label_fraction"], r["batchnorm"]) for r in rows} == {
        (i, f, bn) for i in ("random-relu", "stacked", "wta") for f in (0.05, 1.0) for bn in (False, True)}
    for r in rows:
        assert len(r["accuracies"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracies"])
        assert r["mean"] == pytest.approx(sum(r["accuracies"]) / 2) and r["std"] >= 0
    assert {r["labelled_rows"] for r in rows} == {72, 1438}  # 5% of digits' 1438 training rows, and all
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].count("|") == 2 + 4 and len([line for line in table if line.startswith("| ")]) == 1 + 3
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrained_layers_start_the_classifier():
    data = load_dataset("digits")
    data.train = data.train[:200]
    layers = study.pretrain("stacked", data, 3, seed=0)
    assert [tuple(layer.weight.shape) for layer in layers] == [(128, 64), (64, 128)]
    classifier = study.Classifier(64, 10, relu=False, batchnorm=True, start=layers)
    for mine, pretrained in zip(classifier.hidden, layers):
        assert torch.equal(mine.weight, pretrained.weight) and torch.equal(mine.bias, pretrained.bias)
    (first,) = study.pretrain("denoising", data, 1, seed=0)
    assert first.weight.shape == (128, 64)
    assert study.pretrain("random-sigmoid", data, 1, seed=0) is None


def test_label_fractions_are_stratified():
    labels = torch.arange(500) % 10
    rows = study.labelled_rows(labels, 0.01, seed=3)  # 5 rows asked, 10 classes: one of each
    assert len(rows) == 10 and set(labels[rows].tolist()) == set(range(10))
    assert len(study.labelled_rows(labels, 1.0, seed=0)) == 500
    assert len(study.labelled_rows(labels, 0.995, seed=0)) == 500  # 3 rows left out for 10 classes: all taken


@pytest.mark.parametrize("argv, match", [
    (["--inits", "random,bogus"], "--inits: unknown random, bogus"),
    (["--label-fractions", "0,1"], "--label-fractions must each be in (0, 1], got 0.0,1.0"),
    (["--seeds", "0"], "--seeds, --pretrain-epochs and --finetune-steps must each be >= 1"),
    (["--inits", ""], "--inits: unknown (none given)"),
    (["--inits", "denoising,denoising"], "--inits names a setting twice: denoising,denoising"),
    (["--label-fractions", "0.1,0.1"], "--label-fractions names a setting twice: 0.1,0.1"),
    (["--inits", "stacked", "--pretrain-epochs", "2"], "--pretrain-epochs must be >= 3 with the stacked init"),
])
def test_bad_settings_end_in_one_line(tmp_path, capsys, argv, match):
    assert main(["study", "pretraining", *argv, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_unlabelled_data_is_refused(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.rand(50, 16).astype(np.float32))
    assert main(["study", "pretraining", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "never")]) == 2
    assert "the study needs labels" in capsys.readouterr().err
