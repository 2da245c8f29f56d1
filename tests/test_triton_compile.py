"""Every Triton kernel compiles for sm_80 and sm_90 with Triton's own compiler (not the
interpreter), at the specializations the launchers produce, with no register spills,
launch geometry within an H200's limits and no host synchronisation
(tests/triton_compile_check.py, run here in a subprocess without TRITON_INTERPRET)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from background import BackgroundRun

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "triton_compile_check.py"


def compiled_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


# The whole check takes minutes: it runs in the background from collection on.
COMPILE_CHECK = BackgroundRun([sys.executable, str(CHECK), "--check", str(ROOT / "docs" / "triton-kernels.md")],
                              env=compiled_env(), cwd=ROOT)
BACKGROUND = {"test_every_kernel_compiles_for_sm80_and_sm90_without_spills": COMPILE_CHECK}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    returncode, stdout, stderr = COMPILE_CHECK.wait()
    assert returncode == 0, stdout[-6000:] + stderr[-4000:]
    assert "ERROR" not in stdout


# What the interpreter accepts and the compiler refuses (the bug that kept every Triton
# top-k kernel off GPUs), a grid past CUDA's limits, and a launcher that reads a device
# value on the host: each must be caught.
PLANTED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, triton, triton.language as tl
    import triton_compile_check as c

    LIMIT = 2**62

    @triton.jit
    def global_read_kernel(x_ptr):
        tl.store(x_ptr, LIMIT)

    @triton.jit
    def fine_kernel(x_ptr):
        tl.store(x_ptr + tl.program_id(1), 1.0)

    c.capture_ptxas_logs(); c.record_compiles()
    c.driver.set_active(c.StandInDriver(90))
    x = c.meta(70000)
    try:
        global_read_kernel[(1,)](c.meta(1, dtype=torch.long))
    except Exception as exc:
        print("caught:", type(exc).__name__, str(exc).splitlines()[-1][:200])
    fine_kernel[(1, 70000)](x)
    print("errors:", c.ERRORS)
    try:
        bool(torch.isnan(x).any())
    except Exception as exc:
        print("sync refused:", type(exc).__name__)
""")


def test_planted_compile_error_grid_and_sync_are_caught(tmp_path):
    script = tmp_path / "planted.py"  # @triton.jit needs its source in a file
    script.write_text(PLANTED.format(tests=str(ROOT / "tests")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=compiled_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "caught: CompilationError" in proc.stdout and "global variable LIMIT" in proc.stdout, proc.stdout
    assert "fine_kernel (sm_90): grid axis 1 of 70000 programs (at most 65535)" in proc.stdout, proc.stdout
    assert "sync refused:" in proc.stdout, proc.stdout
