"""Every csrc/cuda/*.cu compiles with plain nvcc for sm_80 and sm_90, with no
register spills: the CUDA kernels are checked on machines without a GPU too.

The compiles of all the selected tests of this file start together, two at a time
(the `compiles` fixture), and each test waits for its own: one after another they
took 100 s of the suite, each compiler waiting on one core."""

import concurrent.futures
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
# What torch.utils.cpp_extension passes to nvcc: no implicit half/bfloat16 conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def nvcc_command(source: pathlib.Path, arch: str, out: pathlib.Path) -> list[str]:
    return [
        NVCC, "-c", "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}", *TORCH_NVCC_DEFINES,
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-Werror", "all-warnings",
        str(source), "-o", str(out),
    ]


def bindings_command(bindings: pathlib.Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [
        CXX, "-std=c++20", "-fsyntax-only",  # torch 2.13 headers need C++20
        f"-I{ROOT / 'tests' / 'cuda_stubs'}", *[f"-I{p}" for p in include_paths()],
        f"-I{CUDA_INCLUDE}", f"-I{ROOT / 'csrc' / 'include'}",
        str(bindings),
    ]


@pytest.fixture(scope="module")
def compiles(request):
    """The finished compile (a CompletedProcess) of each selected test of this file, by
    ("nvcc", source, arch) or ("bindings", bindings): all submitted at the first use,
    two compilers running at a time."""
    commands = {}
    out = pathlib.Path(tempfile.mkdtemp(prefix="aefast-nvcc-"))
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is not request.module:
            continue
        if "source" in params and NVCC:  # (the tests skip without their compilers)
            source, arch = params["source"], params["arch"]
            commands[("nvcc", source, arch)] = nvcc_command(source, arch, out / f"{source.stem}-{arch}.o")
        elif "bindings" in params and BINDINGS_CHECKABLE:
            commands[("bindings", params["bindings"])] = bindings_command(params["bindings"])
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        yield {key: pool.submit(subprocess.run, cmd, capture_output=True, text=True) for key, cmd in commands.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(out, ignore_errors=True)


def test_there_are_cuda_sources():
    assert SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI installs and runs it)")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_without_spills(source, arch, compiles):
    proc = compiles[("nvcc", source, arch)].result()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    spills = [
        line for line in log.splitlines()
        if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)
    ]
    assert "bytes spill" in log, "ptxas -v printed no resource usage: " + log[-2000:]
    assert not spills, "register spills:\n" + "\n".join(spills)


def _cuda_runtime_include():
    """A folder holding cuda_runtime_api.h: CUDA_HOME's, nvcc's, or the copy Triton ships."""
    import os

    candidates = [os.environ.get("CUDA_HOME", "")]
    if NVCC:
        candidates.append(str(pathlib.Path(NVCC).resolve().parent.parent))
    try:
        import triton

        candidates.append(str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia"))
    except ImportError:
        pass
    for base in candidates:
        if base and (pathlib.Path(base) / "include" / "cuda_runtime_api.h").exists():
            return pathlib.Path(base) / "include"
    return None


CXX = shutil.which("c++") or shutil.which("g++")
CUDA_INCLUDE = _cuda_runtime_include()
BINDINGS_CHECKABLE = CXX is not None and CUDA_INCLUDE is not None


BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*_bindings.cpp"))


def test_every_family_has_its_cuda_bindings():
    assert [b.name for b in BINDINGS] == [f"{f}_bindings.cpp" for f in ("decode", "jumprelu", "kl", "noise", "topk")]


@pytest.mark.skipif(not BINDINGS_CHECKABLE, reason="no C++ compiler or CUDA headers")
@pytest.mark.parametrize("bindings", BINDINGS, ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(bindings, compiles):
    """csrc/cuda/<family>_bindings.cpp are compiled only in CUDA builds of torch: check
    their syntax and types here against torch's headers, with stand-ins for the two
    CUDA headers a CPU build of torch lacks (tests/cuda_stubs)."""
    proc = compiles[("bindings", bindings)].result()
    assert proc.returncode == 0, proc.stderr[-4000:]
