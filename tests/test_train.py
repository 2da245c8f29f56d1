"""`aefast train` end to end on tiny settings: the output folder, valid PNG figures,
exact resumption, configuration layering, and one-line errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from aefast.cli import build_parser, main
from aefast.data import load_dataset
from aefast.train.config import MODEL_NAMES, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(*argv):
    assert main(["train", *argv]) == 0


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """160 unlabelled digit rows: no probe to fit, so runs take a fraction of a second."""
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, load_dataset("digits").train[:160].numpy())
    return str(path)


def _assert_valid_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 20 and image.shape[1] > 20


@pytest.mark.parametrize("model, data, figures, evaluation", [
    ("vae", "digits", {"reconstructions", "filters", "samples"}, {"probe_accuracy", "raw_probe_accuracy"}),
    ("topk-sae", "synthetic", {"reconstructions", "filters", "sparsity", "density"},
     {"probe_accuracy", "feature_recovery", "fvu", "l0", "dead_fraction", "dense_fraction"}),
    ("linear", "digits", {"reconstructions", "filters"}, {"pca_largest_angle", "pca_val_mse"}),
])
def test_output_folder_and_figures(tmp_path, capsys, model, data, figures, evaluation):
    _train(model, "--epochs", "2", "--data", data, "--out", str(tmp_path), "--seed", "3")
    out = capsys.readouterr().out
    assert "evaluation: validation MSE" in out
    written = {p.name for p in tmp_path.iterdir()}
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "evaluation.json"} <= written
    assert not any(name.endswith(".tmp") for name in written)
    assert {p.stem for p in tmp_path.glob("*.png")} == figures
    for png in tmp_path.glob("*.png"):
        _assert_valid_png(png)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["samples_per_s"] > 0 and "loss" in r["train"] and "loss" in r["val"] for r in records)
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation <= set(result) and 0 <= result["val_mse"] < 1
    config = resolve(model, {}, str(tmp_path / "config.toml"))  # the written config reads back
    assert config["seed"] == 3 and config["data"] == data and config["epochs"] == 2


def test_cpu_amp_trains_under_bfloat16_autocast_only_when_asked(tmp_path, capsys, small_digits, monkeypatch):
    """--cpu-amp: bfloat16 autocast on a CPU (the matmuls in bfloat16, the parameters and
    the optimizer in float32); without it, or with --no-amp, a CPU run stays float32."""
    from aefast.train import loop

    dtypes = []
    step = loop._train_epoch

    def seen(run, *args, **kwargs):
        dtypes.append(run.model.autocast_dtype)
        return step(run, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", seen)
    common = ["topk-sae", "--data", small_digits, "--epochs", "1", "--device", "cpu", "--n-latents", "48", "--k", "4"]
    for flags, dtype in [(["--cpu-amp"], torch.bfloat16), ([], None), (["--cpu-amp", "--no-amp"], None)]:
        out_dir = tmp_path / "-".join(flags or ["default"])
        _train(*common, *flags, "--out", str(out_dir))
        header = capsys.readouterr().out.splitlines()[0]
        assert ("bfloat16 autocast" in header) == (dtype is not None), header
        assert dtypes.pop() == dtype
        result = json.loads((out_dir / "evaluation.json").read_text())
        assert 0 <= result["val_mse"] < 1
        model = torch.load(out_dir / "checkpoint.pt", weights_only=True)["model"]
        assert all(t.dtype == torch.float32 for t in model.values() if t.is_floating_point())


@pytest.mark.parametrize("model, flags", [
    ("aae", []),                                 # three optimizers, prior samples
    ("stacked", ["--pretrain-epochs", "1"]),     # greedy phases change across the resume point
    ("conv", ["--pretrain-epochs", "1"]),        # the same for the convolutional stack
    ("wta", []),                                 # running winner thresholds (buffers) carry over
    ("gsn", ["--walkback", "2"]),                # noise ops drawing their seeds from torch's generator
])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, small_digits, model, flags, monkeypatch, capsys):
    from aefast.train import loop

    common = [model, "--data", small_digits, "--batch-size", "32", *flags]
    _train(*common, "--epochs", "4", "--out", str(tmp_path / "straight"))
    save = loop._save_checkpoint

    def interrupted_after_epoch_2(out_dir, model, optimizers, shuffle, history, *rest):
        save(out_dir, model, optimizers, shuffle, history, *rest)
        if len(history) == 2:
            raise KeyboardInterrupt  # as Ctrl-C right after the checkpoint of epoch 2

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_save_checkpoint", interrupted_after_epoch_2)
        assert main(["train", *common, "--epochs", "4", "--out", str(tmp_path / "resumed")]) == 130
    capsys.readouterr()
    _train(model, "--out", str(tmp_path / "resumed"), "--resume")
    assert f"resuming {tmp_path / 'resumed'} after epoch 2 of 4" in capsys.readouterr().out

    def curve(run):
        return [(r["epoch"], r["train"], r["val"]) for r in
                map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert len(curve("straight")) == 4
    assert curve("resumed") == curve("straight")
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"]
                         for run in ("straight", "resumed"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_config_layers_defaults_toml_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('hidden = 16\nrho = 0.1\nepochs = 3\n')
    config = resolve("sparse", {"hidden": 8}, str(toml))
    assert (config["hidden"], config["rho"], config["epochs"], config["beta"]) == (8, 0.1, 3, 3.0)
    assert resolve("wta", {"conv": True})["channels"] == [32, 32]
    toml.write_text('rhoo = 0.1\n')
    with pytest.raises(ValueError, match="key 'rhoo' does not apply to model sparse"):
        resolve("sparse", {}, str(toml))
    with pytest.raises(ValueError, match="--rho does not apply to model vae"):
        resolve("vae", {"rho": 0.1})
    with pytest.raises(ValueError, match="--conv applies to wta only"):
        resolve("ae", {"conv": True})
    toml.write_text('hidden = "many"\n')
    with pytest.raises(ValueError, match="--hidden must be an integer"):
        resolve("sparse", {}, str(toml))
    toml.write_text('conv = "false"\n')  # a string, not TOML's false: refused, not read as True
    with pytest.raises(ValueError, match="--conv must be true or false, got 'false'"):
        resolve("wta", {}, str(toml))
    for model, key in (("stacked", "layers"), ("conv", "channels"), ("matryoshka-sae", "prefixes")):
        toml.write_text(f"{key} = []\n")
        with pytest.raises(ValueError, match=f"--{key} must be a non-empty list of integers, got \\[\\]"):
            resolve(model, {}, str(toml))


def test_help_documents_every_model_and_option():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for word in [*MODEL_NAMES, "--resume", "--config", "--data", "--device", "--compile", "--conv", "--rho",
                 "--k-aux", "--walkback", "metrics.jsonl", "sparsity.png"]:
        assert word in text, word


def _one_line_error(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    found = match.search(err[0]) if isinstance(match, re.Pattern) else match in err[0]  # a pattern, or a substring
    assert code == 2 and len(err) == 1 and found, err
    return err[0]


def test_bad_flags_and_data_are_one_line_errors(tmp_path, capsys, small_digits):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive")
    for argv, match in [
        (["train", "sparse", "--hidden", "many"], "argument --hidden: invalid int value"),
        (["train", "sparse", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train", "nosuchmodel"], "invalid choice"),
        (["train", "vae", "--rho", "0.1"], "--rho does not apply to model vae"),
        (["train", "sparse", "--data", str(tmp_path / "missing.npy")], "no such file"),
        (["train", "sparse", "--data", str(garbage)], "cannot read data file"),
        (["train", "sparse", "--data", "data.csv"], "must be digits, synthetic or a .npy, .npz or .pt file"),
        (["train", "sparse", "--resume", "--out", str(tmp_path)], "holds no checkpoint.pt"),
        (["train", "sparse", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got tpu"),
        (["train", "sparse", "--device", "cuda:abc"], "--device must be auto, cpu, cuda or cuda:N, got cuda:abc"),
        (["train", "sparse", "--device", "cuda:-1"], "--device must be auto, cpu, cuda or cuda:N, got cuda:-1"),
        (["train", "topk-sae", "--k", "1000", "--out", str(tmp_path / "k")], "k must be an integer in [1, 256]"),
    ]:
        _one_line_error(capsys, argv, match)
    assert not (tmp_path / "k").exists()  # checked before anything is written
    _train("ae", "--data", small_digits, "--epochs", "1", "--out", str(tmp_path / "run"))
    capsys.readouterr()
    _one_line_error(capsys, ["train", "ae", "--data", small_digits, "--out", str(tmp_path / "run")],
                    "already holds a run")


def test_resume_restores_the_training_gpus_generator_from_new_and_old_checkpoints(monkeypatch):
    from aefast.train import loop

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    shuffle = torch.Generator()
    saved = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    mine, other = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    for cuda, device in [(mine, "cuda:1"),  # this run's checkpoints: the training GPU's alone
                         ([other, mine], "cuda"),  # older ones: every GPU's, the current one's taken
                         ([other], "cuda:1"),  # from a machine with fewer GPUs: nothing to restore
                         (None, "cpu"), ([mine], "cpu")]:  # a GPU run resumed on the CPU
        loop._set_rng_states({**saved, "cuda": cuda}, shuffle, torch.device(device))
    assert restored == [(1, torch.device("cuda:1")), (1, torch.device("cuda"))]


def test_a_gpu_the_machine_lacks_is_named(monkeypatch):
    from aefast.train import loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        loop._device("cuda:7")
    assert loop._device("cuda:1") == torch.device("cuda", 1)


def test_python_m_gives_one_line_for_an_unreadable_file(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"\x00garbage")
    proc = subprocess.run([sys.executable, "-m", "aefast", "train", "ae", "--data", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"aefast: error: cannot read data file '{bad}'")


def test_array_files_with_labels_and_images(tmp_path):
    x = torch.rand(50, 3, 4, 4)
    y = torch.arange(50) % 5
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    for name in ("d.pt", "d.npz"):
        data = load_dataset(str(tmp_path / name), val_fraction=0.2, seed=1)
        assert data.image_shape == (3, 4, 4) and data.train.shape == (40, 48) and data.val.shape == (10, 48)
        assert torch.equal(torch.sort(torch.cat([data.train_labels, data.val_labels])).values, torch.sort(y).values)


def test_bad_data_is_refused_before_training(tmp_path, capsys):
    digits = load_dataset("digits").train[:60].numpy()
    files = {
        "strings.npy": np.array(["a", "b"] * 40).reshape(40, 2),
        "ints.npy": (digits * 255).astype(np.int64),
        "wide.npy": digits * 255,
    }
    for name, array in files.items():
        np.save(tmp_path / name, array)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage that is no array")
    for argv, match in [
        (["train", "ae", "--data", str(tmp_path / "strings.npy")], "expected an array of numbers, got <U1 (strings)"),
        (["train", "ae", "--data", str(tmp_path / "ints.npy")], "the array holds integers (torch.int64, values 0..255)"),
        (["train", "vae", "--data", str(tmp_path / "wide.npy")], "values lie in [0, 255], but VariationalAutoencoder"),
        (["train", "ae", "--data", str(tmp_path / "garbage.npy")], "corrupt, or not a .npy array of numbers"),
    ]:
        _one_line_error(capsys, [*argv, "--out", str(tmp_path / "never")], match)
    assert not (tmp_path / "never").exists()
    (tmp_path / "garbage.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x76\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 60 + b"\n")
    line = _one_line_error(capsys, ["train", "ae", "--data", str(tmp_path / "garbage.npy")], "cannot read data file")
    assert "pickle" not in line  # numpy's advice to unpickle is never passed on
    _train("topk-sae", "--data", str(tmp_path / "wide.npy"), "--epochs", "1", "--out", str(tmp_path / "sae"))  # any range


def test_bad_flags_name_the_flag(tmp_path, capsys):
    for argv, match in [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be > 0, got nan"),
        (["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
        (["--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["--rho", "2"], "--rho must be in (0, 1), got 2.0"),
    ]:
        _one_line_error(capsys, ["train", "sparse", *argv, "--out", str(tmp_path / "never")], match)
    _one_line_error(capsys, ["train", "ae", "--layers", "64,0", "--out", str(tmp_path / "never")],
                    "--layers must be >= 1 (each), got 64,0")
    _one_line_error(capsys, ["train", "wta", "--rate", "1.5"], "--rate must be in (0, 1], got 1.5")
    _one_line_error(capsys, ["train", "conv", "--kernel-size", "4"], "--kernel-size must be odd and >= 1")
    _one_line_error(capsys, ["train", "wta", "--conv", "--decoder-kernel-size", "6"],
                    "--decoder-kernel-size must be odd and >= 1")
    _one_line_error(capsys, ["train", "gsn", "--walkback", "0"], "--walkback must be >= 1, got 0")
    toml = tmp_path / "c.toml"
    toml.write_text("epochs = 0\n")
    _one_line_error(capsys, ["train", "ae", "--config", str(toml)], "--epochs must be >= 1, got 0")
    assert not (tmp_path / "never").exists()


def test_a_loss_that_diverges_stops_the_run(tmp_path, capsys, small_digits):
    _one_line_error(capsys, ["train", "ae", "--data", small_digits, "--epochs", "3", "--lr", "1e30",
                             "--out", str(tmp_path / "run")],
                    "epoch 1: training loss = nan, training reconstruction = nan")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    from aefast.train.loop import _check_finite

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"epoch 4: validation loss = nan: training diverged \(try a smaller --lr\); "
                                         r"the last good checkpoint, .*checkpoint.pt, is kept"):
        _check_finite({"loss": 1.0}, {"loss": float("nan")}, 3, tmp_path)


def test_divergence_mid_epoch_keeps_the_last_good_checkpoint(tmp_path, capsys, small_digits):
    """A checkpoint due mid-epoch after the loss became infinite is not written: it would
    replace the last good one with a state no resume can recover from."""
    run = tmp_path / "run"
    _train("ae", "--data", small_digits, "--epochs", "1", "--out", str(run))
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    _one_line_error(capsys, ["train", "ae", "--out", str(run), "--resume", "--epochs", "3", "--lr", "1e30",
                             "--batch-size", "1", "--checkpoint-minutes", "1e-6"],
                    re.compile(r"epoch 2/3, step [0-9]+: the training loss or the parameters are no longer finite: "
                               r"training diverged \(try a smaller --lr\); the last good checkpoint, "
                               + re.escape(str(run / "checkpoint.pt")) + ", is kept"))
    kept = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in (kept["position"] or {}).get("sums", {}).values())
    assert kept["history"] == good["history"]


@pytest.mark.parametrize("model", ["topk-sae", "wta"])
def test_divergence_in_a_top_k_model_is_called_divergence(tmp_path, capsys, small_digits, model):
    """Its top-k meets NaN pre-activations first: the error says the training diverged, not
    that the data holds NaN."""
    _one_line_error(capsys, ["train", model, "--data", small_digits, "--epochs", "2", "--lr", "1e20",
                             "--out", str(tmp_path / "run")],
                    re.compile("^aefast: error: epoch 1[^:]*: .*: training diverged .*; no checkpoint was written$"))


def test_op_and_model_range_errors_name_the_flag(tmp_path, capsys, small_digits):
    for argv, match in [
        (["topk-sae", "--k", "300"], "error: --k must be an integer in [1, 256]"),
        (["topk-sae", "--k-aux", "5000"], "error: --k-aux must be an integer in [1, 256]"),
        (["matryoshka-sae", "--prefixes", "8,4"], "error: --prefixes must increase"),
        (["denoising", "--kind", "dropout", "--level", "1"], "error: --level (the drop probability) must be in"),
    ]:
        _one_line_error(capsys, ["train", *argv, "--data", small_digits, "--out", str(tmp_path / "never")], match)
    assert not (tmp_path / "never").exists()


def test_a_signal_repeated_at_once_is_one_stop_request_and_a_later_one_stops_at_once(monkeypatch):
    """torchrun forwards the Ctrl-C or SIGTERM its workers already got: two signals
    milliseconds apart must still end the run after its step, with a checkpoint."""
    import os
    import signal

    from aefast.train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    with loop._StopRequests() as stop:
        try:  # (an escaping KeyboardInterrupt would end pytest's whole session)
            os.kill(os.getpid(), signal.SIGINT)
            now[0] += 0.01
            os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy: no escalation
            now[0] += 0.01
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("a signal repeated within ESCALATE_AFTER stopped the run at once, with no checkpoint")
        assert stop.requested
        now[0] += stop.ESCALATE_AFTER
        with pytest.raises(KeyboardInterrupt):  # the user, again, later: stop now
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stop.check()


def test_processes_that_found_different_checkpoints_are_refused():
    """On several nodes each reads its own copy of OUT/checkpoint.pt: a missing or stale
    one must not start training beside the others."""
    from aefast.train import loop

    class TwoRanks:  # Cluster.gather as two processes see it: rank 1's start from rank 0's
        def __init__(self, other):
            self.other = other

        def gather(self, value):
            return [value, self.other(value)]

    history = [{"epoch": 1, "loss": 0.5}]
    loop._check_same_start(TwoRanks(lambda mine: mine), True, history, 128)  # the same start: fine
    for other, shown in [(lambda mine: (False, 0, 0, mine[3]), "rank 1: no checkpoint"),
                         (lambda mine: (True, 1, 64, mine[3]), "rank 1: 1 epochs and 64 rows done"),
                         (lambda mine: (True, 1, 128, "0123456789ab"), "history 0123456789ab")]:
        with pytest.raises(ValueError, match=f"found different checkpoints .*{shown}"):
            loop._check_same_start(TwoRanks(other), True, history, 128)


def test_a_stopped_evaluation_is_done_again_on_resume(tmp_path, capsys, small_digits):
    import os
    import signal

    from aefast.train.loop import _StopRequests

    with pytest.raises(KeyboardInterrupt), _StopRequests(at_once=True):  # SIGTERM: stop now, not a silent kill
        os.kill(os.getpid(), signal.SIGTERM)
    run = tmp_path / "run"
    _train("ae", "--data", small_digits, "--epochs", "2", "--out", str(run))
    evaluation = json.loads((run / "evaluation.json").read_text())
    (run / "evaluation.json").unlink()  # as if stopped while evaluating
    capsys.readouterr()
    _train("ae", "--out", str(run), "--resume")
    assert "the training is done: evaluating it" in capsys.readouterr().out
    assert json.loads((run / "evaluation.json").read_text()) == evaluation
    _one_line_error(capsys, ["train", "ae", "--out", str(run), "--resume"], "has done 2 epochs")


def test_resume_names_what_changed_and_takes_a_new_lr(tmp_path, capsys, small_digits):
    run = str(tmp_path / "run")
    _train("topk-sae", "--data", small_digits, "--epochs", "1", "--out", run)
    _one_line_error(capsys, ["train", "topk-sae", "--out", run, "--resume", "--epochs", "2", "--n-latents", "128"],
                    "--resume: the checkpoint's model does not fit the one configured now (--n-latents 256 -> 128)")
    capsys.readouterr()
    _train("topk-sae", "--out", run, "--resume", "--epochs", "2", "--val-fraction", "0.3", "--lr", "0.0123",
           "--k-aux", "64")
    out = capsys.readouterr().out
    assert "note: --val-fraction 0.2 -> 0.3 since the run began" in out
    assert "note: --lr 0.003 -> 0.0123; --k-aux 32 -> 64 since the run began: it goes on with the new values" in out
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {group["lr"] for state in saved["optimizers"].values() for group in state["param_groups"]} == {0.0123}


def test_resume_names_other_rows_under_the_same_data_flag(tmp_path, capsys, small_digits):
    data = tmp_path / "acts.npy"
    rows = np.load(small_digits)
    np.save(data, rows)
    run = str(tmp_path / "run")
    _train("ae", "--data", str(data), "--epochs", "1", "--out", run)
    np.save(data, rows[:100])  # shards added or removed: the flag is the same, the rows are not
    capsys.readouterr()
    _train("ae", "--out", run, "--resume", "--epochs", "2")
    assert "note: the training rows 128 -> 80 since the run began" in capsys.readouterr().out
    _train("ae", "--out", run, "--resume", "--epochs", "3", "--buffer-mib", "64")
    assert "note: --buffer-mib 256 -> 64 since the run began" in capsys.readouterr().out


def test_the_epoch_table_keeps_its_columns_apart(capsys):
    from aefast.train.loop import _EpochTable

    table = _EpochTable()
    for epoch, value in enumerate([1680070.5, -680070.5e10, 691701.6875, 1e-12], start=1):
        table.row({"epoch": epoch, "train": {"loss": value, "reconstruction": value}, "val": {"loss": value}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["epoch", "loss", "reconstruction", "val", "loss"]
    assert all(len(line.split()) == 4 for line in lines[1:])
    assert float(lines[2].split()[1]) == pytest.approx(-680070.5e10, rel=1e-4)


def test_stacked_refuses_a_budget_that_never_reaches_fine_tuning(capsys):
    _one_line_error(capsys, ["train", "stacked", "--epochs", "2"],
                    "stacked: --epochs 2 ends before fine-tuning: greedy pretraining takes 2 layers x "
                    "--pretrain-epochs 10 = 20 epochs")
    assert resolve("stacked", {"epochs": 21})["epochs"] == 21


def test_resume_refuses_epochs_already_done_and_keeps_the_config(tmp_path, capsys, small_digits):
    run = str(tmp_path / "run")
    _train("ae", "--data", small_digits, "--epochs", "3", "--out", run)
    before = (tmp_path / "run" / "config.toml").read_text()
    for epochs in ("3", "2"):
        _one_line_error(capsys, ["train", "ae", "--out", run, "--resume", "--epochs", epochs],
                        f"--resume: the run in {run} has done 3 epochs; to train on, give --epochs above 3")
    _one_line_error(capsys, ["train", "ae", "--out", run, "--resume"], "has done 3 epochs")
    assert (tmp_path / "run" / "config.toml").read_text() == before


def test_resume_notes_no_option_newer_than_the_checkpoint(tmp_path, capsys, small_digits):
    run = tmp_path / "run"
    _train("ae", "--data", small_digits, "--epochs", "1", "--out", str(run))
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    del checkpoint["config"]["timeout"]  # as a checkpoint written before --timeout existed
    torch.save(checkpoint, run / "checkpoint.pt")
    capsys.readouterr()
    _train("ae", "--out", str(run), "--resume", "--epochs", "2")
    assert "note:" not in capsys.readouterr().out


def test_resume_mid_epoch_refuses_epochs_equal_to_those_done(tmp_path, capsys, small_digits):
    """A checkpoint written 2 batches into epoch 3: --epochs 2 would report part of epoch
    3's training as a 2-epoch run."""
    run = tmp_path / "run"
    _train("ae", "--data", small_digits, "--epochs", "2", "--out", str(run))
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    checkpoint["position"] = {"rows": 2 * checkpoint["config"]["batch_size"], "sums": {}, "seconds": 1.0}
    torch.save(checkpoint, run / "checkpoint.pt")
    (run / "evaluation.json").unlink()
    _one_line_error(capsys, ["train", "ae", "--out", str(run), "--resume", "--epochs", "2"],
                    f"--resume: the run in {run} has done 2 epochs; to train on, give --epochs above 2")


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_load_run_rebuilds_every_model(tmp_path, small_digits, model):
    import aefast

    flags = ["--pretrain-epochs", "0"] if model in ("stacked", "conv") else []
    for conv in ([False, True] if model == "wta" else [False]):
        out = tmp_path / f"{model}{'-conv' if conv else ''}"
        _train(model, "--data", small_digits, "--epochs", "1", "--out", str(out), *flags, *(["--conv"] if conv else []))
        loaded, config = aefast.load_run(out)
        assert config["model"] == model and config["conv"] == conv and not loaded.training
        saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert saved.keys() == loaded.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
        x = torch.from_numpy(np.load(small_digits)[:5])
        assert loaded.reconstruct(x).reshape(5, -1).shape == (5, 64)
    with pytest.raises(ValueError, match="holds no checkpoint.pt: not an aefast train output folder"):
        aefast.load_run(tmp_path)


def test_the_evaluation_keeps_a_bounded_block_of_codes(monkeypatch):
    """A large SAE's codes of every validation row would not fit: the probe and the
    figures get the first rows' codes, as many as CODE_BYTES holds."""
    from aefast.models import TopKSAE
    from aefast.train import evaluate

    monkeypatch.setattr(evaluate, "CODE_BYTES", 4 * 256 * 100)  # 100 rows of 256 latents
    model, x = TopKSAE(64, n_latents=256, k=4).eval(), torch.randn(500, 64)
    reconstructions, codes, firings = evaluate.infer(model, x, 64)
    with torch.no_grad():
        assert torch.equal(reconstructions, model.reconstruct(x)) and torch.equal(codes, model.encode(x[:100]))
        # but the firings, and with them L0 and the dead latents, count every row
        assert torch.equal(firings, (model.encode(x) != 0).sum(0)) and int(firings.sum()) == 4 * 500
        assert int((firings == 0).sum()) < int(((codes != 0).sum(0) == 0).sum())  # the window's "dead" fire later


@pytest.mark.parametrize(("name", "kwargs", "encoder"), [("TopKSAE", {"k": 4}, "encoder_input"),
                                                        ("BatchTopKSAE", {"k": 4}, "encoder_input"),
                                                        ("JumpReLUSAE", {}, "_code")])
def test_the_evaluation_encodes_each_validation_row_once(name, kwargs, encoder, monkeypatch):
    """An exactly sparse model's reconstruction and code (for the probe and the
    firings) come from one pass of its encoder, its one large matmul."""
    import aefast.models as models
    from aefast.train import evaluate

    model, x = getattr(models, name)(64, n_latents=256, **kwargs).eval(), torch.randn(300, 64)
    with torch.no_grad():
        want = model.reconstruct(x), model.encode(x)
    calls, encode = [], getattr(model, encoder)
    monkeypatch.setattr(model, encoder, lambda x: calls.append(len(x)) or encode(x))
    reconstructions, codes, _ = evaluate.infer(model, x, 64)
    assert calls == [64] * 4 + [44]
    assert torch.equal(reconstructions, want[0]) and torch.equal(codes, want[1])


def test_the_model_table_checks_each_row_as_aefast_train_does(monkeypatch, tmp_path):
    from aefast.train import table

    seen = []

    def fake_train(config, out, progress):
        seen.append(config)
        return {"raw_probe_accuracy": 0.9, "val_mse": 0.1, "probe_accuracy": 0.9, "code_size": 4}

    monkeypatch.setattr(table, "train", fake_train)
    assert table.main(["--epochs", "5", "--out", str(tmp_path)]) == 0  # quick: pretraining shrinks to fit
    assert len(seen) == len(table.ROWS) and {config["epochs"] for config in seen} == {5}
    assert [config["model"] for config in seen if config["conv"]] == ["wta"]
    assert {config["pretrain_epochs"] for config in seen if "pretrain_epochs" in config} == {1}
    seen.clear()
    with pytest.raises(ValueError, match="stacked: --epochs 2 ends before fine-tuning"):
        table.main(["--epochs", "2", "--out", str(tmp_path)])
    assert seen == []  # refused before any row trained
