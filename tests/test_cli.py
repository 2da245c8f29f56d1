"""The `aefast` command: info, and the short sparse-autoencoder run on digits."""

import re
import subprocess
import sys

from aefast.cli import main


def test_info_reports_the_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "aefast._C: built" in out
    assert re.search(r"cpu: available reference, cpp.*; runs cpp", out)


def test_train_sparse_loss_falls_and_activation_approaches_rho(capsys, tmp_path, one_thread):
    # A slower schedule than the default, so the first epoch still starts far from rho
    assert main(["train", "sparse", "--epochs", "12", "--rho", "0.1", "--lr", "0.01", "--batch-size", "128",
                 "--out", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+ ", line)]
    assert len(rows) == 12
    loss = [float(r[1]) for r in rows]
    activation = [float(r[4]) for r in rows]
    assert loss[-1] < 0.5 * loss[0]
    assert abs(activation[-1] - 0.1) < 0.03 < abs(activation[0] - 0.1)


def test_bad_argument_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "aefast", "train", "sparse", "--rho", "1.5", "--epochs", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["aefast: error: rho must be a number in the open interval (0, 1), got 1.5"]


def test_bench_prints_the_table_and_writes_json_markdown_png(capsys, tmp_path, one_thread):
    import json

    assert main(["bench", "--op", "kl_sparsity", "--op", "corrupt", "--size", "small", "--rounds", "1",
                 "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kl_sparsity | small 256x1024 | float32 | forward+backward | aefast[cpp] |" in out
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["results"]
    assert {r["op"] for r in rows} == {"kl_sparsity", "corrupt"} and record["environment"]["copy_GBps"] > 0
    for r in rows:
        assert r["median_ms"] > 0 and r["bytes"] > 0
        assert abs(r["GBps"] - r["bytes"] / (r["median_ms"] * 1e6)) < 0.01
        assert (r["vs_eager"] == 1.0) == (r["contender"] == "eager")
    assert (tmp_path / "bench.md").read_text().startswith("Measured on")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
