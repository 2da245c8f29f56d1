"""Builds the real csrc/cuda/*.cu with g++ against the CUDA emulation in this folder.

Each .cu is read, its launches `NAME<<<CFG>>>(` rewritten to `::emu::Launch(CFG)(NAME, `
(only the prefix: the argument list stays as written), written out as a .cpp and
compiled with g++ (its .bss, the __shared__ variables, renamed emu_shared: see
cuda_emu.h); the objects, runtime.cpp and api.cpp are linked into one shared
library for ctypes. Objects and libraries are cached under build/cuda_emu by a hash of
their inputs, so a variant that edits one .cu recompiles only that one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA = ROOT / "csrc" / "cuda"
FAMILIES = ("decode", "jumprelu", "kl", "noise", "topk")
CACHE = ROOT / "build" / "cuda_emu"
CXX = shutil.which("g++")
OBJCOPY = shutil.which("objcopy")  # binutils, which g++ needs anyway
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
         f"-I{HERE}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{CUDA}"]

# A kernel name (an identifier, optionally with template arguments), then <<<config>>>(.
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\((?=(\s*\))?)", re.S)


def rewrite_launches(source: str) -> str:
    def launch(m: re.Match) -> str:
        name, config, no_args = m.groups()
        text = f"::emu::Launch({config})({name}" + ("" if no_args else ", ")
        return text + "\n" * (m.group(0).count("\n") - text.count("\n"))  # keep __LINE__ right

    out, n = LAUNCH.subn(launch, source)
    assert n > 0 and "<<<" not in out, "a launch was not rewritten"
    return out


def _headers_digest() -> str:
    h = hashlib.sha256(" ".join([CXX or "", *FLAGS]).encode())
    for d, pattern in ((HERE, "*.h"), (CUDA, "*.h"), (CUDA, "*.cuh"), (ROOT / "csrc" / "include", "**/*.h")):
        for p in sorted(d.glob(pattern)):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _publish(tmp: Path, dest: Path) -> None:
    os.replace(tmp, dest)  # atomic: a concurrent build never sees half a file


def _object(name: str, text: str, headers: str, kernels: bool) -> Path:
    key = hashlib.sha256((headers + name + text).encode()).hexdigest()[:20]
    obj = CACHE / "obj" / f"{name}-{key}.o"
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            src = Path(tmp) / f"{name}.cpp"  # quoted includes fall through to -I csrc/cuda
            src.write_text(text)
            proc = subprocess.run([CXX, *FLAGS, "-c", str(src), "-o", str(Path(tmp) / "out.o")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed on {name}:\n{proc.stderr[-6000:]}")
            if kernels:  # its .bss is the __shared__ variables: poisoned before each block (cuda_emu.h)
                subprocess.run([OBJCOPY, "--rename-section", ".bss=emu_shared", str(Path(tmp) / "out.o")],
                               check=True)
            _publish(Path(tmp) / "out.o", obj)
    return obj


def build(edits: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """The shared library of the emulated kernels. `edits` maps a family to (old, new)
    text replacements applied to its .cu first (each `old` must occur): variants with a
    planted bug or a removed barrier. Returns the library's path."""
    if CXX is None or OBJCOPY is None:
        raise RuntimeError("g++ or objcopy not found")
    edits = edits or {}
    headers = _headers_digest()
    objects = []
    for name in FAMILIES:
        text = (CUDA / f"{name}.cu").read_text()
        for old, new in edits.get(name, []):
            assert old in text, f"{old!r} not in {name}.cu"
            text = text.replace(old, new, 1)
        objects.append(_object(name, rewrite_launches(text), headers, kernels=True))
    for name in ("runtime", "api"):
        objects.append(_object(name, (HERE / f"{name}.cpp").read_text(), headers, kernels=False))
    key = hashlib.sha256("".join(o.name for o in objects).encode()).hexdigest()[:20]
    lib = CACHE / f"libcuda_emu-{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            out = Path(tmp) / "lib.so"
            proc = subprocess.run([CXX, "-shared", "-o", str(out), *map(str, objects)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"linking failed:\n{proc.stderr[-6000:]}")
            _publish(out, lib)
    return lib


if __name__ == "__main__":
    print(build())
