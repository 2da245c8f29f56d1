"""The `aefast` command: info, and the short sparse-autoencoder run on digits."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from aefast.cli import main


def test_info_reports_the_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "aefast._C: built" in out
    assert re.search(r"cpu: available reference, cpp.*; runs cpp", out)
    # Whether --cpu-amp pays: AMX as the CPU's flags list it (where they can be read).
    bf16 = re.search(r"CPU bfloat16 matmuls: (.*)", out).group(1)
    try:
        with open("/proc/cpuinfo") as f:
            amx = "amx_bf16" in f.read().split()
    except OSError:
        amx = None
    if amx is not None:
        assert bf16.startswith("AMX") == amx, bf16


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
    assert proc.stderr.strip().splitlines() == ["aefast: error: --rho must be in (0, 1), got 1.5"]  # the flag named


def test_bench_prints_the_table_and_writes_json_markdown_png(capsys, tmp_path, one_thread):
    import json

    # The C++ kernels alone: Triton's interpreter took 20 of this test's 24 s (the next
    # test's run takes every backend).
    assert main(["bench", "--op", "kl_sparsity", "--op", "corrupt", "--size", "small", "--rounds", "1",
                 "--backend", "cpp", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kl_sparsity | small 256x1024 | rho=0.05, beta=3.0; a 256x1024 | float32 | forward+backward | aefast[cpp] |" in out
    assert "| corrupt | small 256x1024 | masking, level=0.3; x 256x1024 | float32 | forward | torch: x * (torch.rand_like(x) >= level) |" in out
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["results"]
    assert {r["op"] for r in rows} == {"kl_sparsity", "corrupt"} and record["environment"]["copy_GBps"] > 0
    from aefast import _C

    assert record["environment"]["cpu_simd"] == _C.cpu_simd()  # what the C++ kernels ran with
    for r in rows:
        assert r["median_ms"] > 0 and r["bytes"] > 0
        assert abs(r["GBps"] - r["bytes"] / (r["median_ms"] * 1e6)) < 0.01
        # The floor, timed in the same alternation: the op's bytes at the rate of a fresh copy.
        assert r["floor_ms"] > 0 and abs(r["copy_share"] - r["floor_ms"] / r["median_ms"]) < 2e-3
        # (copy_GBps is recorded to 0.01 GB/s: up to 0.005 / copy_GBps relative, 1% at a loaded CI's 0.5 GB/s)
        rounding = 1e-3 + 0.005 / r["copy_GBps"]
        assert abs(r["floor_ms"] - r["bytes"] / (r["copy_GBps"] * 1e6)) < rounding * r["floor_ms"] + 1e-4
        assert (r["vs_eager"] == 1.0) == (r["contender"] == "eager")
        # Every round kept, the floor contender's too: the median is the middle of the rounds.
        assert len(r["rounds_ms"]) == len(r["floor_contender_rounds_ms"]) == 1
        assert abs(r["rounds_ms"][0] - r["median_ms"]) < 1e-3
    assert (tmp_path / "bench.md").read_text().startswith("Measured on")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_floor_of_a_matmul_op_is_f_linear_on_its_inputs(capsys, tmp_path, one_thread):
    import json

    assert main(["bench", "--op", "noisy_linear", "--backend", "cpp", "--size", "small", "--rounds", "1", "--no-compile", "--no-library",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["mode"] for r in rows} == {"forward", "forward+backward"}
    for r in rows:
        assert "copy_share" not in r and abs(r["matmul_share"] - r["floor_ms"] / r["median_ms"]) < 2e-3
    assert "of F.linear" in capsys.readouterr().out


def test_bench_records_a_failing_contender_and_goes_on(capsys, tmp_path, one_thread, monkeypatch):
    import dataclasses
    import json

    from aefast.bench import cases

    def broken(**inputs):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(cases.CASES, "kl_sparsity", dataclasses.replace(cases.CASES["kl_sparsity"], aefast=broken))
    assert main(["bench", "--op", "kl_sparsity", "--op", "corrupt", "--size", "small", "--mode", "forward",
                 "--rounds", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    failed = [r for r in rows if "error" in r]
    assert failed and all(r["op"] == "kl_sparsity" and "planted failure" in r["error"] for r in failed)
    assert {r["contender"] for r in rows if r["op"] == "kl_sparsity" and "error" not in r} == {"eager"}
    assert any(r["op"] == "corrupt" and r["contender"].startswith("aefast") for r in rows)  # the run went on
    import aefast

    backends = {f"aefast[{b}]" for b in aefast.available_backends("cpu") if b != "reference"}
    assert backends <= {r["contender"] for r in rows if r["op"] == "corrupt"}  # every backend a contender
    assert "error: RuntimeError: planted failure" in (tmp_path / "bench.md").read_text()


def test_gpu_suite_dry_runs_fit_the_device_budget():
    for flags, budget in (([], 515), (["--smoke"], 150)):
        suite = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.sh"
        proc = subprocess.run(["bash", str(suite), "--dry-run", *flags], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"of {budget}s)" in proc.stdout and "gpu_suite: dry run passed" in proc.stdout


def test_readme_tables_come_from_the_newest_stored_run(tmp_path):
    import json

    from aefast.bench import readme

    def run(folder, date, ms, ops=("corrupt",), size="medium"):
        path = tmp_path / "results" / folder
        path.mkdir(parents=True)
        rows = [{"op": op, "size": size, "shape": "1024x4096", "mode": "forward", "contender": "aefast[cpp]",
                 "median_ms": ms, "copy_share": 0.5, "vs_eager": 3.0, "vs_compiled": None} for op in ops]
        env = {"device": "cpu-x", "threads": 2, "torch": "2.13", "date": date, "copy_GBps": 4.0, "device_type": "cpu"}
        (path / "bench.json").write_text(json.dumps({"environment": env, "results": rows}))

    run("old", "2026-01-01T00:00:00", 9.99)
    run("new", "2026-02-01T00:00:00", 1.25)
    run("large", "2026-03-01T00:00:00", 7.77, size="large")  # not the size shown for the CPU
    page = tmp_path / "README.md"
    page.write_text("intro\n<!-- aefast-bench:cpu -->\nstale\n<!-- /aefast-bench:cpu -->\n"
                    "<!-- aefast-bench:cuda -->\n<!-- /aefast-bench:cuda -->\nend\n")
    assert readme.update(page, tmp_path / "results") == ["cpu"]
    first = page.read_text()
    assert "| corrupt |  | forward | cpp | 1.25 | 50% | 3.00x |  |  |" in first and "9.99" not in first
    assert "stale" not in first and first.startswith("intro\n") and first.endswith("end\n")
    readme.update(page, tmp_path / "results")
    assert page.read_text() == first  # idempotent
    # A later run of fewer operators (a check of one change) leaves the full run's table.
    run("full", "2026-04-01T00:00:00", 2.5, ops=("corrupt", "reparameterize"))
    run("one-op", "2026-05-01T00:00:00", 6.66, ops=("reparameterize",))
    readme.update(page, tmp_path / "results")
    assert "| reparameterize |  | forward | cpp | 2.50 |" in page.read_text() and "6.66" not in page.read_text()


def test_version_and_a_bogus_backend_variable():
    import os

    import aefast

    proc = subprocess.run([sys.executable, "-m", "aefast", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"aefast {aefast.__version__}"
    env = {**os.environ, "AEFAST_BACKEND": "bogus"}
    proc = subprocess.run([sys.executable, "-m", "aefast", "info"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("aefast: error: AEFAST_BACKEND must be one of auto, reference, cpp, triton, cuda, "
                                   "got 'bogus'")
    proc = subprocess.run([sys.executable, "-c", "import aefast"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "ValueError: AEFAST_BACKEND must be one of auto" in proc.stderr


def test_readme_table_names_the_case_and_the_pytorch_call(tmp_path):
    import json

    from aefast.bench import readme

    base = {"op": "topk_sparse", "size": "medium", "shape": "1024x4096", "case": "k=32; x 1024x4096",
            "dtype": "float32", "mode": "forward", "copy_share": 0.4, "vs_compiled": None}
    rows = [{**base, "contender": "aefast[cpp]", "median_ms": 2.0, "vs_eager": 9.0},
            {**base, "contender": "torch: torch.topk", "median_ms": 5.0, "vs_eager": 3.6}]
    env = {"device": "cpu-x", "threads": 2, "torch": "2.13", "date": "2026-03-01T00:00:00", "copy_GBps": 4.0,
           "device_type": "cpu"}
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "bench.json").write_text(json.dumps({"environment": env, "results": rows}))
    page = tmp_path / "README.md"
    page.write_text("<!-- aefast-bench:cpu -->\n<!-- /aefast-bench:cpu -->\n")
    readme.update(page, tmp_path / "results")
    assert "| topk_sparse | k=32; x 1024x4096 | forward | cpp | 2.00 | 40% | 9.00x |  | 2.50x (`torch.topk`) |" in (
        page.read_text())


def test_bench_figure_has_a_labelled_panel_per_mode(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from aefast.bench.run import plot

    rows = [{"op": op, "size": "small", "mode": mode, "contender": name, "vs_eager": v}
            for op in ("topk_sparse", "corrupt") for mode in ("forward", "forward+backward")
            for name, v in (("aefast[cpp]", 4.0), ("eager", 1.0), ("torch: call", 2.0))]
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or savefig(fig, *a, **k))
    plot(rows, tmp_path / "bench.png", {"device": "cpu-x", "torch": "2.13"})
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["forward", "forward+backward"]
    assert all(ax.get_ylabel() == "speedup over the eager reference" for ax in fig.axes)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["aefast[cpp]", "torch"]
    assert "cpu-x" in fig._suptitle.get_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_verdict_names_each_ops_floor_and_the_ops_below_half_of_it():
    from aefast.bench.run import verdicts

    def row(op, contender, share, **more):
        return {"op": op, "contender": contender, "size": "medium", "dtype": "float32", "mode": "forward",
                "copy_share": share, **more}

    rows = [row("slow", "aefast[cpp]", 0.9), row("slow", "aefast[cpp]", 0.3) | {"size": "large"},
            row("slow", "eager", 0.01), row("fast", "aefast[cpp]", 0.7),
            row("matmul", "aefast[cpp]", 0.05, matmul_share=0.92)]
    lines = verdicts(rows)
    assert lines[1] == "- slow: floor copy; worst 30% (aefast[cpp], large float32 forward): BELOW 50%"
    assert lines[2].startswith("- fast: floor copy; worst 70%") and lines[2].endswith(": ok")
    assert lines[3].startswith("- matmul: floor F.linear; worst 92%") and lines[3].endswith(": ok")
    below = "Below their goal (50% of the floor or the share named, or the ratio to F.linear named): "
    assert lines[-1] == below + "slow."
    assert verdicts([row("fast", "aefast[cpp]", 0.7)])[-1] == \
        "Every op measured meets its goal (50% of the floor or the share named, or the ratio to F.linear named)."
    # an op whose larger sizes all failed is named, not left out for its small size's row
    failed = verdicts([row("fast", "aefast[cpp]", 0.7), row("oom", "aefast[cpp]", 0.9) | {"size": "small"},
                       {k: v for k, v in row("oom", "aefast[cpp]", 0).items() if k != "copy_share"} | {"error": "OOM"}])
    assert failed[2] == "- oom: every aefast row failed (bench.md has the errors): NOT MEASURED"
    assert failed[-1] == below + "oom."
    # An op declared with a goal against its matmul (noisy_linear: at most 1.1x F.linear)
    # is judged by it: 90% of F.linear is 1.11x, above the goal though above half.
    noisy = verdicts([row("noisy_linear", "aefast[cpp]", 0.05, matmul_share=0.90)])
    assert noisy[1] == ("- noisy_linear: floor F.linear, goal at most 1.10x its time; worst 90% "
                        "(aefast[cpp], medium float32 forward): BELOW (1.111x its time)")
    assert noisy[-1] == below + "noisy_linear."
    assert verdicts([row("noisy_linear", "aefast[cpp]", 0.05, matmul_share=0.92)])[1].endswith(": ok")
    # One declared with a share of its copy floor above half (reparameterize: 60%) is
    # judged by that share.
    vae = verdicts([row("reparameterize", "aefast[cpp]", 0.55)])
    assert vae[1] == "- reparameterize: floor copy, goal 60%; worst 55% (aefast[cpp], medium float32 forward): BELOW 60%"
    assert vae[-1] == below + "reparameterize."
    assert verdicts([row("reparameterize", "aefast[cpp]", 0.61)])[1].endswith(": ok")
    # The small size is a call's fixed cost: judged only when no larger size ran.
    small = row("fast", "aefast[cpp]", 0.1) | {"size": "small"}
    with_small = verdicts([row("fast", "aefast[cpp]", 0.7), small])
    assert with_small[0].endswith("over this run's rows but the small size's):") and with_small[-1].startswith("Every op")
    assert verdicts([small])[-1] == below + "fast."


def test_bench_contenders_alternate_in_a_fresh_order_each_round():
    from aefast.bench import harness

    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.alternate(contenders, torch.device("cpu"), rounds=30, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 30, "b": 30, "c": 30}
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after the warm-up
    assert all(sorted(r) == list("abc") for r in rounds)
    followers = {(r[i - 1], r[i]) for r in rounds for i in range(1, 3)}
    assert len(followers) == 6  # each contender has run right after each other one
    assert all(calls[i] != calls[i + 1] for i in range(3, len(calls) - 1))  # never twice in a row
    # each case its own seed: another case of as many contenders meets other orders
    orders = []
    for seed in (1, 2):
        calls.clear()
        harness.alternate(contenders, torch.device("cpu"), rounds=5, warmup=0, seed=seed)
        orders.append(list(calls))
    assert orders[0] != orders[1]


def test_bench_results_of_a_later_run_of_the_day_go_to_a_folder_of_their_own(tmp_path, monkeypatch):
    from aefast.bench import harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    first = harness.results_dir(torch.device("cpu"))
    assert harness.results_dir(torch.device("cpu")) == first  # nothing written there yet
    (first / "bench.json").write_text("{}")
    second = harness.results_dir(torch.device("cpu"))
    assert second.name == first.name + "-2" and second.is_dir()
    (second / "bench.json").write_text("{}")
    assert harness.results_dir(torch.device("cpu")).name == first.name + "-3"
    (second.with_name(first.name + "-3") / "summary.md").write_text("")  # a suite's run cut short
    assert harness.results_dir(torch.device("cpu")).name == first.name + "-4"
    assert harness.results_dir(torch.device("cpu"), str(first)) == first  # --out: as given


def test_bench_machine_names_tell_cpus_of_one_model_name_apart():
    """Two VMs that both call themselves "AMD EPYC" (a Zen 3 and a Zen 5) get names of
    their own from the family and model numbers; an ARM's cpuinfo, without them, the
    fallback name alone."""
    from aefast.bench import harness

    def cpuinfo(family, model):
        cpu = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
              "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
        return cpu.format(0) + cpu.format(1)

    assert harness.cpu_name(cpuinfo(25, 1), "x86_64") == "AMD EPYC f25m1"
    assert harness.cpu_name(cpuinfo(26, 2), "x86_64") == "AMD EPYC f26m2"
    assert harness.cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n", "aarch64") == "aarch64"
    assert harness.machine_name(torch.device("cpu")).startswith(f"cpu-{torch.get_num_threads()}t-")


def test_bench_keeps_freed_memory_in_the_process_for_its_run():
    from aefast.bench import harness

    def resident_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    # Sizes over anything an earlier test may have left in this process's heap.
    with harness.freed_memory_kept(torch.device("cpu")) as kept:
        assert kept
        before = resident_mib()
        x = torch.ones((256 << 20) // 4)
        del x  # stays in the heap for the next large tensor
        freed = resident_mib()
        assert freed - before > 192
    after = resident_mib()  # malloc_trim hands the heap back where it can (not a heap brk could not grow)
    y = torch.ones((512 << 20) // 4)
    del y  # over the restored 32 MiB threshold: a mapping of its own, returned when freed
    assert resident_mib() < after + 64


@pytest.mark.parametrize("refused", ["mmap", "trim"])
def test_freed_memory_kept_sets_back_only_the_thresholds_it_set(monkeypatch, refused):
    """glibc stops adjusting a threshold once mallopt sets it: one it refused is left alone."""
    from aefast import _memory

    calls = []

    class FakeGlibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            name = "mmap" if parameter == _memory._M_MMAP_THRESHOLD else "trim"
            return 0 if name == refused and len(calls) <= 2 else 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(_memory, "libc", lambda: FakeGlibc())
    with _memory.freed_memory_kept(torch.device("cpu")) as kept:
        assert not kept
        setting = list(calls)
    restored = calls[len(setting):]
    if refused == "mmap":
        assert setting == [(_memory._M_MMAP_THRESHOLD, _memory._MMAP_KEPT)] and restored == []
    else:
        assert restored == [(_memory._M_MMAP_THRESHOLD, _memory._MMAP_AFTER), ("trim", 0)]
