"""Backend choice: AEFAST_BACKEND, aefast.backend(...), and clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import aefast as ae
from aefast import backends
from conftest import device_backends


def test_available_backends_lists_what_is_built():
    names = ae.available_backends()
    assert names[0] == "reference"
    assert ("cpp" in names) == backends.CPP_BUILT
    assert ("cuda" in names) == (backends.CUDA_BUILT and torch.cuda.is_available())
    assert set(ae.available_backends("cpu")) <= set(names)


def test_the_extension_is_built_here():
    # The README's install builds aefast._C; a test run without it would test nothing compiled.
    assert backends.CPP_BUILT, backends.BUILD_ERROR


@pytest.mark.parametrize("asked", ["none", "avx2", None])
def test_cpu_simd_reports_the_instruction_set_the_kernels_take(asked):
    # The widest the CPU has, narrowed by AEFAST_SIMD; benchmarks record it. Where Linux
    # lists the CPU's flags, the widest is known exactly (simd_level reads the same CPUID).
    order = ["none", "avx2", "avx512"]
    env = {k: v for k, v in os.environ.items() if k != "AEFAST_SIMD"}
    if asked is not None:
        env["AEFAST_SIMD"] = asked
    run = subprocess.run([sys.executable, "-c", "from aefast import _C; print(_C.cpu_simd())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = run.stdout.strip()
    assert got in order and order.index(got) <= order.index(asked or "avx512")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
        widest = ("avx512" if {"avx512f", "avx512bw"} <= flags else
                  "avx2" if {"avx2", "fma", "f16c", "popcnt"} <= flags else "none")
        assert got == order[min(order.index(widest), order.index(asked or "avx512"))]


@pytest.mark.parametrize("name", ["missing.so", "text.so", "module.py"])
def test_a_build_asked_for_that_does_not_load_is_an_error(name, tmp_path):
    # AEFAST_EXTENSION (the tests' AVX-512 emulation build) names a build to load in place
    # of aefast._C: one that does not load raises, naming the variable, rather than
    # leaving the C++ backend off as a missing build does; a Python file is not run.
    path = str(tmp_path / name)
    if name != "missing.so":
        (tmp_path / name).write_text("raise SystemExit('ran')\n")
    run = subprocess.run([sys.executable, "-c", "import aefast"], env=dict(os.environ, AEFAST_EXTENSION=path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f"AEFAST_EXTENSION={path!r}" in run.stderr, run.stderr[-2000:]


def test_auto_picks_cpp_on_cpu():
    assert ae.current_backend() == "auto"
    assert backends.resolve(torch.device("cpu")) == "cpp"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"), ae.backend("fastest"):
        pass


def test_forced_backend_that_cannot_run_raises():
    a = torch.rand(4, 3)
    if not torch.cuda.is_available():
        with ae.backend("cuda"), pytest.raises(RuntimeError, match="'cuda' cannot run cpu tensors"):
            ae.kl_sparsity(a, 0.1)
    else:
        with ae.backend("cpp"), pytest.raises(RuntimeError, match="'cpp' cannot run cuda tensors"):
            ae.kl_sparsity(a.cuda(), 0.1)


def test_context_nests_and_restores():
    with ae.backend("reference"):
        assert ae.current_backend() == "reference"
        with ae.backend("cpp"):
            assert ae.current_backend() == "cpp"
        assert ae.current_backend() == "reference"
    assert ae.current_backend() == "auto"


@pytest.mark.parametrize(("device", "backend"), device_backends())
def test_the_chosen_backend_runs(device, backend):
    a = torch.rand(5, 4, device=device, requires_grad=True)
    with ae.backend(backend):
        penalty = ae.kl_sparsity(a, 0.1)
    expected = "triton" if backend == "triton" else "aefast_kl_sparsity_forward_default"
    assert expected in type(penalty.grad_fn).__name__
    with ae.backend("reference"):
        assert "aefast" not in type(ae.kl_sparsity(a, 0.1).grad_fn).__name__


def test_environment_variable_chooses_the_backend():
    code = "import aefast, torch; print(aefast.current_backend(), aefast.backends.resolve(torch.device('cpu')))"
    env = dict(os.environ, AEFAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "reference"]


def test_stored_gpu_ranking_drives_auto(tmp_path, monkeypatch):
    import json

    from aefast.bench import ranking

    def row(op, contender, size, ms):
        return {"op": op, "contender": contender, "size": size, "mode": "forward+backward",
                "dtype": "float32", "median_ms": ms}

    rows = [row("corrupt", "aefast[cuda]", "large", 2.0), row("corrupt", "aefast[triton]", "large", 1.0),
            row("corrupt", "aefast[cuda]", "small", 0.1), row("corrupt", "aefast[triton]", "small", 0.2),
            row("corrupt", "eager", "large", 9.0)]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"environment": {"device_type": "cuda", "device": "H100"}, "results": rows}))
    written = ranking.write_ranking(bench, tmp_path / "gpu_ranking.json")
    assert written["ranking"] == {"corrupt": ["triton", "cuda"]}  # the largest size decides

    monkeypatch.setattr(backends, "CUDA_BUILT", True)  # both GPU backends "available"
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "GPU_RANKING", {})  # none stored (the package ships one)
    assert backends.resolve(cuda, "corrupt") == "cuda"  # no ranking: GPU_PREFERENCE
    monkeypatch.setattr(backends, "GPU_RANKING", written["ranking"])
    assert backends.resolve(cuda, "corrupt") == "triton"
    assert backends.resolve(cuda, "kl_sparsity") == "cuda"  # not ranked: the default order
    assert backends.resolve(torch.device("cpu"), "corrupt") == "cpp"

    bench.write_text(json.dumps({"environment": {"device_type": "cpu", "device": "x"}, "results": rows}))
    with pytest.raises(ValueError, match="no GPU run"):
        ranking.write_ranking(bench, tmp_path / "gpu_ranking.json")


def test_the_forced_backend_belongs_to_the_thread_that_forced_it():
    """As torch.no_grad: a block in one thread does not change what another runs."""
    import threading

    seen, entered, release = {}, threading.Event(), threading.Event()

    def forcing():
        with ae.backend("reference"):
            entered.set()
            release.wait(10)
            seen["forcing"] = ae.current_backend()

    thread = threading.Thread(target=forcing)
    thread.start()
    entered.wait(10)
    seen["other"] = ae.current_backend()
    release.set()
    thread.join()
    assert seen == {"forcing": "reference", "other": "auto"}


def test_a_thread_without_its_own_block_runs_the_main_thread_s_choice():
    """torch's own threads (autograd's device threads, a checkpoint's recomputation in
    them) do not inherit a Python thread-local: they see the main thread's block."""
    import threading

    seen = {}
    with ae.backend("reference"):
        thread = threading.Thread(target=lambda: seen.setdefault("worker", ae.current_backend()))
        thread.start()
        thread.join()
    assert seen == {"worker": "reference"}
