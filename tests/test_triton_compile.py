"""Every Triton kernel compiles for sm_80 and sm_90 with Triton's own compiler (not the
interpreter), at the specializations the launchers produce, with no register spills,
launch geometry within an H200's limits and no host synchronisation
(tests/triton_compile_check.py, run here in a subprocess without TRITON_INTERPRET)."""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "triton_compile_check.py"


def compiled_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


_CHECK_RUN = {}


def start_compile_check():
    """Starts the whole check (minutes) once, in a low-priority process group of its
    own; conftest.py calls this at collection, so that it runs on the core the rest of
    the suite leaves idle, and stops it at the end of the session if no test waited
    for it. Its output goes to files: a pipe nobody reads would stall it."""
    if not _CHECK_RUN:
        # They outlive this call: the test reads them.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, str(CHECK), "--check", str(ROOT / "docs" / "triton-kernels.md")],
                                stdout=out, stderr=err, text=True, env=compiled_env(), cwd=ROOT,
                                start_new_session=True)
        # Lowered from here, not by a preexec_fn (unsafe once torch has started threads):
        # the group's members now, and the child it starts later inherits it.
        os.setpriority(os.PRIO_PGRP, proc.pid, 10)
        _CHECK_RUN.update(proc=proc, out=out, err=err)
    return _CHECK_RUN


def stop_compile_check():
    proc = _CHECK_RUN.get("proc")
    if proc is None:
        return
    if proc.poll() is None:  # the process and its child (the other arch)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _CHECK_RUN["out"].close()
    _CHECK_RUN["err"].close()


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    run = start_compile_check()
    returncode = run["proc"].wait()
    for f in (run["out"], run["err"]):
        f.seek(0)
    stdout, stderr = run["out"].read(), run["err"].read()
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
