"""Which implementation runs an operator: reference, cpp, triton or cuda.

`auto` (the default) picks `cpp` for CPU tensors and, for CUDA tensors, the first
available of GPU_PREFERENCE, falling back to `reference` where nothing is built.
A backend chosen by name (AEFAST_BACKEND=..., or `with aefast.backend(...)`) that
cannot run the tensors at hand raises; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
import threading

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")

# Where no stored GPU benchmark ranks an op's backends (GPU_RANKING), the compiled
# CUDA kernels come first.
GPU_PREFERENCE = ("cuda", "triton")


def _load_extension_from(path: str) -> None:
    """Another build of aefast._C, loaded in its place before the import below: the tests'
    build with AVX-512 emulated (AEFAST_EXTENSION; tests/test_topk.py). A build asked for
    that does not load raises: it is not the missing build the reference falls back for."""
    spec = importlib.util.spec_from_file_location("aefast._C", path)
    if not path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) or spec is None or spec.loader is None:
        raise RuntimeError(f"AEFAST_EXTENSION={path!r} is not an extension module "
                           f"(its name ends in none of {importlib.machinery.EXTENSION_SUFFIXES})")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise RuntimeError(f"AEFAST_EXTENSION={path!r} does not load: {exc}") from exc
    sys.modules["aefast._C"] = module
    sys.modules["aefast"]._C = module


if os.environ.get("AEFAST_EXTENSION"):
    _load_extension_from(os.environ["AEFAST_EXTENSION"])
try:
    from aefast import _C

    CPP_BUILT: bool = True
    CUDA_BUILT: bool = bool(_C.cuda_kernels_built())
    BUILD_ERROR: str | None = None
except ImportError as exc:  # not built: the reference (and Triton) backends still work
    CPP_BUILT = CUDA_BUILT = False
    BUILD_ERROR = str(exc)

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Triton's interpreter runs the kernels on CPU tensors; it must be chosen before the
# kernels are defined, so it is read once, here.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# {op: backends, fastest first} from the newest GPU run of `aefast bench`, written by
# aefast.bench.ranking; shipped with the package.
RANKING_FILE = pathlib.Path(__file__).resolve().parent / "gpu_ranking.json"


def _load_gpu_ranking() -> dict[str, list[str]]:
    """The stored ranking (RANKING_FILE); empty if none."""
    try:
        return json.loads(RANKING_FILE.read_text())["ranking"]
    except (OSError, ValueError, KeyError):
        return {}


GPU_RANKING: dict[str, list[str]] = _load_gpu_ranking()


def _started_as_the_command() -> bool:
    """Whether this process is the `aefast` command (the script, or python -m aefast)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    by_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "aefast"
    return by_module or os.path.basename(sys.argv[0]) == "aefast"


_default = os.environ.get("AEFAST_BACKEND", "auto")
if _default != "auto" and _default not in BACKENDS:
    _message = f"AEFAST_BACKEND must be one of {', '.join(('auto',) + BACKENDS)}, got {_default!r}"
    if _started_as_the_command():  # the package is imported before the command can catch it
        print(f"aefast: error: {_message}", file=sys.stderr)
        raise SystemExit(2)
    raise ValueError(_message)
# Each thread's stack of `backend(...)` blocks. A thread with none of its own open sees
# the importing (main) thread's: torch's own worker threads (autograd's device threads,
# a checkpoint's recomputation in them, DataParallel's replicas) then run what the
# training loop chose, while a thread that opens its own block keeps it to itself.
_main_names: list[str] = []
_forced = threading.local()
_forced.names = _main_names


def _forced_names() -> list[str]:
    if not hasattr(_forced, "names"):
        _forced.names = []
    return _forced.names


def _why_unavailable(name: str, device_type: str) -> str | None:
    """None if `name` can run tensors on `device_type`, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "cpp":
        if not CPP_BUILT:
            return f"aefast._C is not built ({BUILD_ERROR})"
        # meta: the native ops' registered fakes give their exact output shapes
        return None if device_type in ("cpu", "meta") else "it runs CPU tensors only"
    if name == "cuda":
        if not CUDA_BUILT:
            return "aefast._C was built without CUDA kernels (see `aefast info`)"
        return None if device_type == "cuda" else "it runs CUDA tensors only"
    if name == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRET):
            return None
        return "it runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run tensors on `device` (default: on any device here)."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [b for b in BACKENDS if any(_why_unavailable(b, t) is None for t in types)]


def current_backend() -> str:
    """The backend asked for now: `auto` or a name from BACKENDS."""
    names = getattr(_forced, "names", None) or _main_names
    return names[-1] if names else _default


@contextlib.contextmanager
def backend(name: str):
    """Run the aefast operators inside the block with backend `name` (or `auto`), in this
    thread, and in threads that have no block of their own open (torch's autograd and
    DataParallel threads) when this is the main thread."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    names = _forced_names()
    names.append(name)
    try:
        yield
    finally:
        names.pop()


def resolve(device: torch.device, op: str = "", kernels: tuple[str, ...] = BACKENDS,
            gpu_preference: tuple[str, ...] | None = None) -> str:
    """The backend that runs operator `op`, which has kernels for `kernels`, on
    tensors of `device` now. Under `auto` on GPU: the stored benchmark ranking of `op`
    if there is one, else `gpu_preference` (the op's own order), else GPU_PREFERENCE."""
    name = current_backend()
    if name == "auto":
        if device.type in ("cpu", "meta"):
            preference = ("cpp",)
        else:
            preference = tuple(GPU_RANKING.get(op, ())) or gpu_preference or GPU_PREFERENCE
        for candidate in preference:
            if candidate in kernels and _why_unavailable(candidate, device.type) is None:
                return candidate
        return "reference"
    if name != "reference" and name not in kernels:
        why = _why_unavailable(name, device.type)
        raise RuntimeError(f"aefast backend {name!r} has no kernel for {op} here (it has: {', '.join(kernels)})"
                           + (f"; {name} cannot run {device.type} tensors here either: {why}" if why else ""))
    why = _why_unavailable(name, device.type)
    if why is not None:
        raise RuntimeError(f"aefast backend {name!r} cannot run {device.type} tensors: {why}")
    return name
