"""Timing harness for the benchmarks: contenders are timed in one run, alternating
round by round, so drift in the machine (frequency, other load) hits them alike."""

from __future__ import annotations

import ctypes
import datetime
import json
import pathlib
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

from aefast import backends
from aefast._memory import freed_memory_kept  # noqa: F401 (the bench times under it)
from aefast._memory import libc as _libc

# Stored results, relative to the folder the command runs in (the checkout's root).
RESULTS = pathlib.Path("bench") / "results"

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def fresh_clone(x: torch.Tensor) -> torch.Tensor:
    """A copy of x into a fresh tensor allocated as aefast's CPU kernels allocate their
    large outputs (csrc/cpu/common.h: transparent huge pages asked for before the first
    touch), so that a memory floor pays the same page faults as the op it bounds. On
    GPU, and where the hint is unavailable, a plain clone."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and sys.platform == "linux" and nbytes >= 4 * _HUGE_PAGE:
        begin = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        libc = _libc()
        libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), ctypes.c_int(_MADV_HUGEPAGE))
    return out.copy_(x)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(contenders: dict[str, Callable[[], object]], device: torch.device,
              rounds: int = 15, warmup: int = 3, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each contender, `rounds` samples each, interleaved. Each
    round runs them in a fresh order (from `seed`: give each case its own, or every
    case of as many contenders meets the same orders), so that no contender always
    follows the same one: what a call leaves in the caches and the allocator meets the
    next. No contender runs twice in a row across rounds either (it would find its own
    data in cache)."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order, shuffle = list(contenders), random.Random(seed).shuffle
    for _ in range(rounds):
        last = order[-1]
        shuffle(order)
        if len(order) > 1 and order[0] == last:
            order.append(order.pop(0))
        for name in order:
            fn = contenders[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def cpu_name(cpuinfo: str, fallback: str) -> str:
    """The CPU's model name from /proc/cpuinfo's text, with its family and model numbers
    where it gives them (`AMD EPYC f26m2`): a VM may show a bare "AMD EPYC" for a Zen 3 and
    a Zen 5 alike."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fallback
    if fields.get("cpu family") and fields.get("model"):
        name += f" f{fields['cpu family']}m{fields['model']}"
    return name


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        fallback = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = cpu_name(f.read(), fallback)
        except OSError:
            name = fallback
        name = f"cpu-{torch.get_num_threads()}t-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def results_dir(device: torch.device, out: str | None = None) -> pathlib.Path:
    """`out`, or bench/results/<machine>-<date>: -2, -3, ... for a later run of the same
    day (a run of one op must not replace the day's full run, nor a smoke run the files
    of a full one cut short). bench/gpu_suite.sh names its folder here too."""
    if out:
        path = pathlib.Path(out)
    else:
        stem = RESULTS / f"{machine_name(device)}-{datetime.date.today()}"
        path, n = stem, 1
        while path.is_dir() and any(path.iterdir()):
            n += 1
            path = stem.with_name(f"{stem.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name(device),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cpu" and backends.CPP_BUILT:
        from aefast import _C

        env["cpu_simd"] = _C.cpu_simd()  # the instruction set the C++ kernels took
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


SIMD_NAMES = {"avx512": "AVX-512", "avx2": "AVX2", "none": "no vector extension"}


def threads_note(env: dict) -> str:
    """'2 threads, C++ kernels on AVX2': what a CPU run's figures depend on."""
    simd = env.get("cpu_simd")
    return f"{env['threads']} threads" + (f", C++ kernels on {SIMD_NAMES.get(simd, simd)}" if simd else "")


def write(path: pathlib.Path, stem: str, record: dict, markdown: str) -> None:
    (path / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (path / f"{stem}.md").write_text(markdown + "\n")


def ratio_table(groups: dict[str, dict[str, Callable[[], object]]], targets: dict[str, dict[str, float]],
                device: torch.device, rounds: int) -> tuple[list[str], list[dict]]:
    """Times each group's contenders (alternating; "aefast" among them) and returns
    Markdown table rows and JSON records. A target is the least `contender time /
    aefast time` wanted: 3.0 = three times faster; 1 / 1.3 = within 1.3x of it."""
    lines = ["| op | contender | median ms | contender / aefast | target |", "|---|---|---:|---:|---|"]
    records = []
    for op, runs in groups.items():
        ms = {n: median_ms(t) for n, t in alternate(runs, device, rounds=rounds).items()}
        records.append({"op": op, "median_ms": ms, "targets": targets.get(op, {})})
        for name, value in ms.items():
            ratio = value / ms["aefast"]
            target = targets.get(op, {}).get(name)
            verdict = "" if target is None else f">= {target:.2f}" + ("" if ratio >= target else " **missed**")
            shown = "" if name == "aefast" else f"{ratio:.2f}"
            lines.append(f"| {op} | {name} | {value:.1f} | {shown} | {verdict} |")
    return lines, records


def report(stem: str, header: list[str], groups, targets, device: torch.device, rounds: int,
           out: str | None) -> int:
    """Times the groups (ratio_table), prints the table under `header` and writes
    <stem>.json and <stem>.md to the results folder."""
    env = environment(device)
    rows, records = ratio_table(groups, targets, device, rounds)
    table = "\n".join([f"Measured on {env['device']} ({threads_note(env)}), torch {env['torch']}, "
                       f"{env['date']}.", *header, "", *rows])
    print(table)
    folder = results_dir(device, out)
    write(folder, stem, {"environment": env, "results": records}, table)
    print(f"\nwritten to {folder}")
    return 0
