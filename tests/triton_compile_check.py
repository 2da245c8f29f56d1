"""Every Triton kernel of aefast compiled for a real GPU, on a machine without one.

Triton's own JIT runs under a stand-in driver whose target is an sm_90 (or sm_80) GPU:
each launch of a launcher in aefast.triton_kernels compiles the kernel to PTX and
cubin with the ptxas of the triton wheel, for exactly the specializations that launch
produces. The launch itself is replaced by a check of its geometry against the limits
of an H200 (grid, threads, shared memory). The launchers run on meta tensors, which
they plan for as GPU tensors: users' sizes cost no memory, and any host
synchronisation (reading a device value) fails, as meta tensors hold no values.

    python tests/triton_compile_check.py                  # check; print the ptxas table
    python tests/triton_compile_check.py --write docs/triton-kernels.md

Run without TRITON_INTERPRET (tests/test_triton_compile.py does so in a subprocess).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
# A fresh cache: every specialization is compiled (and its ptxas figures read) each run.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aefast-triton-cache-")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

# An H200 (sm_90): 227 KiB of shared memory per block, 1024 threads, 132 SMs.
MAX_SHARED = 227 * 1024
MAX_THREADS = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Compiled:
    """ptxas -v's figures for one specialization of one kernel."""

    kernel: str
    arch: int
    signature: str
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    threads: int


COMPILED: list[Compiled] = []
LAUNCHED: set[tuple[str, int]] = set()
ERRORS: list[str] = []


PTXAS_LOGS: list[str] = []


def capture_ptxas_logs():
    """Keep the log of the `ptxas -v` that Triton runs for each compile (Triton deletes it)."""
    import subprocess as real
    import types

    from triton.backends.nvidia import compiler as nvidia

    def run(cmd, *args, **kwargs):
        result = real.run(cmd, *args, **kwargs)
        log = kwargs.get("stderr")
        if "ptxas" in str(cmd[0]) and hasattr(log, "name"):
            PTXAS_LOGS.append(pathlib.Path(log.name).read_text())
        return result

    nvidia.subprocess = types.SimpleNamespace(**{**vars(real), "run": run})


def ptxas_figures(log: str) -> tuple[int, int, int]:
    """(registers, spill stores + loads in bytes, stack frame bytes) from ptxas -v."""
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(frame.group(2)) + int(frame.group(3)), int(frame.group(1))


class Launcher:
    """Stands in for the CUDA launcher: checks the launch instead of running it."""

    def __init__(self, src, metadata):
        self.name = src.fn.__name__
        self.metadata = metadata
        self.arch = driver.active.arch

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        threads = self.metadata.num_warps * 32
        where = f"{self.name} (sm_{self.arch})"
        LAUNCHED.add((self.name, self.arch))
        for axis, (n, most) in enumerate(zip((grid_x, grid_y, grid_z), MAX_GRID)):
            if not 0 <= n <= most:
                ERRORS.append(f"{where}: grid axis {axis} of {n} programs (at most {most})")
        if threads > MAX_THREADS:
            ERRORS.append(f"{where}: {threads} threads a block (at most {MAX_THREADS})")
        if self.metadata.shared > MAX_SHARED:
            ERRORS.append(f"{where}: {self.metadata.shared} bytes of shared memory (at most {MAX_SHARED})")


class Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

    def load_binary(self, name, kernel, shared, device):
        # Called once per compiled specialization: read its resource use from ptxas.
        return (None, name, 0, 0, MAX_THREADS)


class StandInDriver(DriverBase):
    """A CUDA driver with no device behind it: Triton compiles for `arch` and launches
    through Launcher."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = Utils()
        self.launcher_cls = Launcher

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        raise NotImplementedError("nothing runs under the stand-in driver")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return divmod(self.arch, 10)


def record_compiles():
    """Wrap CompiledKernel's handle set-up: it runs once per compiled specialization."""
    from triton.compiler.compiler import CompiledKernel

    original = CompiledKernel._init_handles

    @functools.wraps(original)
    def init_handles(self):
        if self.module is None and PTXAS_LOGS:  # compiled now, not found in Triton's cache
            arch = driver.active.arch
            regs, spills, stack = ptxas_figures(PTXAS_LOGS.pop())
            PTXAS_LOGS.clear()  # a compile that failed before its launch leaves no stale log
            COMPILED.append(Compiled(self.name, arch, _signature(self.src), regs, spills, stack,
                                     self.metadata.shared, self.metadata.num_warps * 32))
        return original(self)

    CompiledKernel._init_handles = init_handles


def _signature(src) -> str:
    """The specialization: constexprs and argument types, compactly."""
    names = src.fn.arg_names
    parts = []
    for key, value in src.constants.items():
        name = names[key[0]] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.isupper():
            parts.append(f"{name}={getattr(value, 'name', value)}")
    pointers = [str(t).lstrip("*") for n, t in src.signature.items() if str(t).startswith("*")]
    return " ".join(parts) + (f" [{pointers[0]}]" if pointers else "")


# ------------------------------------------------------------------ the launches


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def kl_launches():
    from aefast.reference import RHO_HAT_EPS
    from aefast.triton_kernels import kl

    for dtype in FLOATS:
        for B, H in ((37, 65), (65536, 65536), (3, 1 << 24)):  # past 65535 column blocks of 128 too
            a = meta(B, H, dtype=dtype)
            g = meta(dtype=dtype)
            for x in (a, meta(H, B, dtype=dtype).t()):  # contiguous and transposed input
                _, rho_hat = kl.kl_sparsity_forward(x, 0.05, 3.0, RHO_HAT_EPS)
                kl.kl_sparsity_backward(g, rho_hat, B, 0.05, 3.0, RHO_HAT_EPS, dtype)
                h, _, rho_hat = kl.sigmoid_kl_sparsity_forward(x, 0.05, 3.0, RHO_HAT_EPS)
                kl.sigmoid_kl_sparsity_backward(x, g, h, rho_hat, 0.05, 3.0, RHO_HAT_EPS)
        # contractive: a (1M x 8192) weight, and a small one
        for B, H, D in ((37, 65, 11), (4096, 1 << 20, 8192), (3, 1 << 24, 16)):
            h, w = meta(B, H, dtype=dtype), meta(H, D, dtype=dtype)
            _, s2, w2 = kl.contractive_penalty_forward(h, w)
            kl.contractive_penalty_backward(meta(dtype=dtype), h, w, s2, w2)
            kl.contractive_penalty_forward(h, meta(D, H, dtype=dtype).t())


def noise_launches():
    from aefast.reference import CORRUPTION_KINDS
    from aefast.triton_kernels import noise

    seed = meta(dtype=torch.long)
    matmul = torch.backends.cuda.matmul
    for dtype in FLOATS:
        for n in (37, 8 << 20):
            x = meta(n // 37 if n > 37 else 1, 37 if n > 37 else n, dtype=dtype)
            for kind in range(len(CORRUPTION_KINDS)):  # the launchers take the kind's index
                noise.corrupt(x, kind, 0.25, seed, 0.0, 1.0)
            z, kl = noise.reparameterize_forward(x, x, seed)
            noise.reparameterize_backward(z, kl, x, x, seed)
        tf32_modes = (False, True) if dtype == torch.float32 else (False,)
        for tf32 in tf32_modes:
            old = matmul.fp32_precision
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
            try:
                for N, D, out in ((37, 29, 13), (8 << 20, 784, 1024), (3, 5 << 20, 7)):  # past 65535 blocks of 64
                    x, w, b = meta(N, D, dtype=dtype), meta(out, D, dtype=dtype), meta(out, dtype=dtype)
                    for kind in range(len(CORRUPTION_KINDS)):
                        y = noise.noisy_linear_forward(x, w, b, kind, 0.25, seed, 0.0, 1.0)
                        noise.noisy_linear_forward(x, w, None, kind, 0.25, seed, 0.0, 1.0)
                        noise.noisy_linear_grad_input(y, w, kind, 0.25, seed)
                        noise.noisy_linear_grad_weight(y, x, kind, 0.25, seed, 0.0, 1.0)
            finally:
                matmul.fp32_precision = old


def topk_launches():
    from aefast.triton_kernels import topk

    for dtype in FLOATS:
        # topk_sparse / topk_mask / topk_encode rows, lifetime_topk's columns (a
        # transposed view), spatial_wta's maps (k = 1), batch_topk's single row; rows
        # shorter than a chunk take chunks of their length (4 to 64 keys here).
        for (B, H), ks in {(37, 3): (1, 2), (37, 5): (1, 5), (37, 20): (3,), (37, 40): (1,), (37, 65): (1, 7, 65),
                           (4096, 65536): (1, 32, 128, 129), (65536, 1 << 20): (32, 128),
                           (1, 1 << 28): (100, 4096 * 32)}.items():
            for k in ks:
                topk.topk_forward(meta(B, H, dtype=dtype), k, True)
        topk.topk_forward(meta(4096, 8192, dtype=dtype).t(), 82, False)
        # topk_encode(_aux)'s blocks and merges at B = 4096, L = 65536, k = 32, k_aux = 1024:
        # blocks of (4096, 16384) on a GPU (aefast.ops.decode._encoder_tile), candidates of
        # 4 blocks merged; and the CPU's blocks of (1024, 8192), 8 merged
        for rows, width, k in ((4096, 16384, 32), (4096, 128, 32), (4096, 16384, 1024), (4096, 4096, 1024),
                               (1024, 8192, 32), (1024, 256, 32), (1024, 8192, 1024)):
            topk.topk_forward(meta(rows, width, dtype=dtype), k, False)


def decode_launches():
    from aefast.triton_kernels import decode

    # Each dtype alone, and a float32 weight beside 16-bit values (mixed precision, autocast's).
    pairs = [(dtype, dtype) for dtype in FLOATS] + [(dtype, torch.float32) for dtype in FLOATS if dtype.itemsize == 2]
    for dtype, weight_dtype in pairs:
        # sparse decoder (and topk_encode's backward): forward with and without bias, backward
        for B, K, L, D in ((37, 5, 91, 29), (65536, 32, 1 << 17, 4096)):
            values, indices = meta(B, K, dtype=dtype), meta(B, K, dtype=torch.long)
            weight = meta(L, D, dtype=weight_dtype)
            decode.sparse_decode_forward(values, indices, weight, meta(D, dtype=dtype))
            decode.sparse_decode_forward(values, indices, weight, None)
            decode.sparse_decode_backward(meta(B, D, dtype=dtype), values, indices, weight)


def jumprelu_launches():
    from aefast.triton_kernels import jumprelu

    for dtype in FLOATS:
        # a small case and a JumpReLU SAE's pre-activations at B = 4096, L = 1M
        for B, L in ((37, 65), (4096, 1 << 20)):
            z, threshold = meta(B, L, dtype=dtype), meta(L, dtype=dtype)
            jumprelu.jumprelu_forward(z, threshold, 0.001)
            jumprelu.jumprelu_backward(z, meta(B), z, threshold, 0.001)


FAMILIES = {"decode": decode_launches, "jumprelu": jumprelu_launches, "kl": kl_launches, "noise": noise_launches,
            "topk": topk_launches}


def all_kernels() -> list[str]:
    """Every launchable kernel (a @triton.jit function named *_kernel) of aefast."""
    import importlib

    names = []
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"aefast.triton_kernels.{path.stem}")
        names += [n for n, f in vars(module).items()
                  if isinstance(f, triton.runtime.JITFunction) and n.endswith("_kernel")]
    return sorted(names)


def table(rows: list[Compiled]) -> str:
    """Markdown: per kernel and arch, the worst figures over its specializations."""
    worst: dict[tuple[str, int], dict] = {}
    for r in rows:
        w = worst.setdefault((r.kernel, r.arch), {"n": 0, "registers": 0, "spill_bytes": 0,
                                                   "stack_bytes": 0, "shared_bytes": 0, "threads": 0})
        w["n"] += 1
        for f in ("registers", "spill_bytes", "stack_bytes", "shared_bytes", "threads"):
            w[f] = max(w[f], getattr(r, f))
    lines = [
        "# Triton kernels compiled for sm_80 and sm_90",
        "",
        "Generated by `python tests/triton_compile_check.py --write docs/triton-kernels.md`",
        "(Triton 3.6.0 and the ptxas in its wheel, no GPU): every specialization that the",
        "launchers in `triton_kernels/` produce for the launches listed in",
        "`tests/triton_compile_check.py` (each op forward and backward, every dtype and",
        "constexpr branch, small sizes and users' sizes). Per kernel, the largest figures over",
        "its specializations; `tests/test_triton_compile.py` fails if a kernel spills or",
        "if this table is stale.",
        "",
        "| kernel | arch | specializations | registers | spills (bytes) | stack (bytes) | shared memory (bytes) | threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (kernel, arch), w in sorted(worst.items()):
        lines.append(f"| `{kernel}` | sm_{arch} | {w['n']} | {w['registers']} | {w['spill_bytes']} | "
                     f"{w['stack_bytes']} | {w['shared_bytes']} | {w['threads']} |")
    return "\n".join(lines) + "\n"


def compile_all(archs: list[int], families: list[str]) -> None:
    capture_ptxas_logs()
    record_compiles()
    for arch in archs:
        driver.set_active(StandInDriver(arch))
        for family in families:
            try:
                FAMILIES[family]()
            except Exception as exc:  # a compile error names its kernel and line
                ERRORS.append(f"{family} on sm_{arch}: {type(exc).__name__}: {exc}")
        if len(families) == len(FAMILIES):
            missing = [k for k in all_kernels() if (k, arch) not in LAUNCHED]
            if missing:
                ERRORS.append(f"sm_{arch}: never launched, so never compiled: {', '.join(missing)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90), help="default: both")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: all")
    parser.add_argument("--write", type=pathlib.Path, help="write the ptxas table (markdown) here")
    parser.add_argument("--check", type=pathlib.Path, help="fail if this file differs from the table")
    parser.add_argument("--json", type=pathlib.Path, help=argparse.SUPPRESS)  # a child's results
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]
    families = args.family or sorted(FAMILIES)
    # One process per arch beyond the first: the compiles are single-threaded.
    children = []
    for arch in archs[1:]:
        out = pathlib.Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--arch", str(arch), "--json", str(out)]
        cmd += [f"--family={f}" for f in args.family or []]
        children.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
    compile_all(archs[:1], families)
    for out, child in children:
        child.wait()
        result = json.loads(out.read_text() or "{}")
        out.unlink()
        COMPILED.extend(Compiled(**r) for r in result.get("compiled", []))
        ERRORS.extend(result.get("errors", [f"the child process failed (exit {child.returncode})"]))
    if args.json:
        args.json.write_text(json.dumps({"compiled": [dataclasses.asdict(r) for r in COMPILED],
                                         "errors": ERRORS}))
        return 0
    spills = sorted({f"{r.kernel} (sm_{r.arch}, {r.signature}): {r.spill_bytes} bytes"
                     for r in COMPILED if r.spill_bytes})
    ERRORS.extend(f"register spills in {s}" for s in spills)
    text = table(COMPILED)
    if args.write:
        args.write.write_text(text)
    print(text)
    print(f"{len(COMPILED)} specializations compiled for {', '.join(f'sm_{a}' for a in archs)}")
    if args.check and args.check.read_text() != text:
        ERRORS.append(f"{args.check} is stale: regenerate it with --write {args.check}")
    for e in ERRORS:
        print("ERROR:", e)
    return 1 if ERRORS else 0


if __name__ == "__main__":
    sys.exit(main())
