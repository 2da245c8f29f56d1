"""`aefast bench`: every operator, forward and forward + backward, on the current
device, for each available backend against the plain-PyTorch reference eager and
under torch.compile, at named sizes; contenders alternate round by round
(aefast.bench.harness). Each row: median time, achieved GB/s (the bytes the op must
move at minimum, aefast.bench.cases), its share of its floor (a fresh copy of the
case's largest input, or F.linear on the same inputs for the ops built around a
matmul, timed in the same alternation), and the speedup over the eager and the
compiled reference. Writes a table on screen, bench.json, bench.md and bench.png
(speedups over eager)."""

from __future__ import annotations

import argparse
import zlib

import torch

import aefast as ae
from aefast.bench import harness
from aefast.bench.cases import CASES, SIZES, run

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = {"forward": False, "forward+backward": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=sorted(CASES), help="an operator (repeatable; default: all)")
    p.add_argument("--backend", action="append", choices=[b for b in ae.backends.BACKENDS if b != "reference"],
                   help="an aefast backend (repeatable; default: every available one with a kernel)")
    p.add_argument("--size", action="append", choices=["small", "medium", "large"],
                   help="a named size (repeatable; default: all). CPU: 256x1024, 1024x4096, 4096x4096; "
                        "CUDA: 1024x4096, 4096x16384, 4096x65536 (rows x units; per-op shapes derive from these)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="(repeatable; default: float32)")
    p.add_argument("--mode", action="append", choices=sorted(MODES), help="(repeatable; default: both)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile(reference) contender")
    p.add_argument("--no-library", action="store_true",
                   help="leave out the plain-PyTorch call a user would write (torch.topk, F.embedding_bag, ...)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per contender (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<machine>-<date>/)")


def copy_bandwidth(device: torch.device, rounds: int) -> float:
    """GB/s of a clone (read + write, fresh allocation as aefast's kernels allocate) of a
    tensor larger than the caches: the best of at least 11 rounds. (On the CPU dev
    machine the first process to touch fresh memory after a pause ran 4x slower for
    a few calls: the rate reachable is the reference, not a median of such calls.)"""
    x = torch.empty((64 << 20) // 4 if device.type == "cpu" else (1 << 30) // 4, device=device).fill_(1.0)
    samples = harness.alternate({"clone": lambda: harness.fresh_clone(x)}, device, rounds=max(rounds, 11))["clone"]
    return 2 * x.numel() * 4 / min(samples) / 1e9


def matmul_tflops(device: torch.device, rounds: int) -> float:
    """float32 matmul rate (TFLOP/s) of this device, for reading the compute-bound ops."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    ms = harness.median_ms(harness.alternate({"mm": lambda: a @ b}, device, rounds=rounds)["mm"])
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _with_backend(name, fn):
    def call(**inputs):
        with ae.backend(name):
            return fn(**inputs)
    return call


FLOOR = "floor"  # the contender that times the case's floor, alternating with the others


def _linear(x, weight, bias=None, **_):
    return torch.nn.functional.linear(x, weight, bias)


def _largest(inputs: dict) -> torch.Tensor:
    return max((t for t in inputs.values() if isinstance(t, torch.Tensor)), key=lambda t: t.numel() * t.element_size())


def _floor_contender(case, inputs: dict, backward: bool):
    """What bounds the op, on the same inputs, in the same alternation (so it meets the
    same caches and the same fresh memory): F.linear for an op built around a matmul
    (forward, and backward where the op's is timed), else a fresh copy of its largest
    input, allocated as the CPU kernels allocate their outputs."""
    if case.matmul_bound:
        return lambda: run(case, _linear, inputs, backward)
    largest = _largest(inputs)
    return lambda: harness.fresh_clone(largest)


def _floor_fields(case, inputs: dict, measured_ms: float, gbytes: float) -> tuple[str, float, dict]:
    """(the share's key, the floor's time for this op's work, more fields): the matmul's
    own time, or the op's bytes at the rate of the copy."""
    if case.matmul_bound:
        return "matmul_share", measured_ms, {}
    largest = _largest(inputs)
    copy_gbps = 2 * largest.numel() * largest.element_size() / 1e9 / (measured_ms * 1e-3)  # read + write
    return "copy_share", gbytes / copy_gbps * 1e3, {"copy_GBps": round(copy_gbps, 2)}


def _failing(contenders: dict) -> dict[str, str]:
    """{name: error} of the contenders that raise when called once."""
    failed = {}
    for name, fn in contenders.items():
        try:
            fn()
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return failed


def measure(args, progress=None) -> tuple[list[dict], dict]:
    """Times every case asked for; `progress(rows, env)` after each operator (the
    results so far are written then, so a run cut short keeps what it measured)."""
    device = torch.device(args.device)
    with harness.freed_memory_kept(device) as kept:
        return _measure(args, device, kept, progress)


def _measure(args, device: torch.device, kept: bool, progress) -> tuple[list[dict], dict]:
    env = harness.environment(device)
    env["device_type"] = device.type
    if kept:
        env["freed_memory_kept"] = True
    env["copy_GBps"] = round(copy_bandwidth(device, args.rounds), 1)
    env["matmul_fp32_TFLOPs"] = round(matmul_tflops(device, args.rounds), 3)
    rows = []
    for op in args.op or sorted(CASES):
        case = CASES[op]
        backends = [b for b in ae.available_backends(device) if b in case.kernels and b != "reference"]
        backends = [b for b in backends if not args.backend or b in args.backend]
        for size in args.size or ["small", "medium", "large"]:
            for dtype_name in args.dtype or ["float32"]:
                # compiled afresh for each shape and dtype: one function across them would be
                # recompiled with dynamic shapes (generic code), and past torch._dynamo's
                # recompile limit run eager under the name "compiled"
                compiled = None
                if not args.no_compile and case.compile_reference:
                    torch._dynamo.reset()
                    compiled = torch.compile(case.reference, dynamic=False)
                inputs = case.inputs(size, DTYPES[dtype_name], device)
                shape = "x".join(map(str, SIZES[device.type][size]))
                for mode in args.mode or list(MODES):
                    backward = MODES[mode]
                    fns = {f"aefast[{b}]": _with_backend(b, case.aefast) for b in backends}
                    fns["eager"] = case.reference
                    if compiled is not None:
                        fns["compiled"] = compiled
                    if case.library is not None and not args.no_library:
                        fns[f"torch: {case.library[0]}"] = case.library[1]
                    contenders = {name: (lambda f=f: run(case, f, inputs, backward)) for name, f in fns.items()}
                    contenders[FLOOR] = _floor_contender(case, inputs, backward)
                    base = {"op": op, "size": size, "shape": shape, "case": case.describe(inputs),
                            "dtype": dtype_name, "mode": mode}
                    for name, error in _failing(contenders).items():  # recorded; the run goes on
                        if name == FLOOR:
                            raise RuntimeError(f"{op} {size}: the floor contender failed: {error}")
                        rows.append({**base, "contender": name, "error": error})
                        print(f"  {op} {size} {dtype_name} {mode}: {name} FAILED: {error}", flush=True)
                        del contenders[name]
                    if "eager" not in contenders:
                        continue
                    seed = zlib.crc32(f"{op} {size} {dtype_name} {mode}".encode())  # each case its own orders
                    samples = harness.alternate(contenders, device, args.rounds, seed=seed)
                    ms = {n: harness.median_ms(t) for n, t in samples.items()}
                    # Every round's time, the floor contender's too (its raw call, before the
                    # copy's rate is applied to the op's bytes): how much a median moves.
                    rounds_ms = {n: [round(1e3 * t, 4) for t in ts] for n, ts in samples.items()}
                    gbytes = case.bytes_moved(inputs, backward) / 1e9
                    share_key, floor_ms, extra = _floor_fields(case, inputs, ms.pop(FLOOR), gbytes)
                    for name, value in ms.items():
                        rows.append({
                            **base, "contender": name, "median_ms": round(value, 5),
                            "GBps": round(gbytes / (value * 1e-3), 2), "bytes": int(gbytes * 1e9),
                            share_key: round(floor_ms / value, 3), "floor_ms": round(floor_ms, 5), **extra,
                            "vs_eager": round(ms["eager"] / value, 3),
                            "vs_compiled": round(ms["compiled"] / value, 3) if "compiled" in ms else None,
                            "rounds_ms": rounds_ms[name], "floor_contender_rounds_ms": rounds_ms[FLOOR],
                        })
                    print(f"  {op} {size} {dtype_name} {mode}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()),
                          flush=True)
        if progress is not None:
            progress(rows, env)
    return rows, env


def markdown(rows: list[dict], env: dict) -> str:
    kept = ("freed memory kept by the process, so no contender times the system's page faults "
            "(harness.freed_memory_kept); " if env.get("freed_memory_kept") else "")
    lines = [
        f"Measured on {env['device']} ({harness.threads_note(env)}), torch {env['torch']}, {env['date']}; "
        f"copy bandwidth {env['copy_GBps']} GB/s (the best clone of a fresh "
        f"{'1 GB' if env.get('device_type') == 'cuda' else '64 MB'} tensor, in this run); {kept}"
        f"float32 matmul {env['matmul_fp32_TFLOPs']} TFLOP/s. Each row's floor is timed with it, in the same "
        "alternation: a fresh copy of the case's largest input (its rate applied to the bytes the op must "
        "move), or for an op built around a matmul, F.linear on the same inputs. Contenders: aefast[backend]; eager, aefast's "
        "plain-PyTorch reference (aefast/reference.py); compiled, the same under torch.compile; torch: ..., "
        "the call a user would write with PyTorch alone.",
        "",
        "| op | size | case | dtype | mode | contender | median ms | GB/s | share of floor (copy; F.linear where named) | vs eager | vs compiled |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['op']} | {r['size']} {r['shape']} | {r.get('case', '')} | {r['dtype']} | {r['mode']} | {r['contender']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | |")
            continue
        compiled = "" if r["vs_compiled"] is None else f"{r['vs_compiled']:.2f}x"
        lines.append(f"{head} {r['median_ms']:.2f} | {r['GBps']:.1f} | {floor_share(r)} | {r['vs_eager']:.2f}x | {compiled} |")
    return "\n".join(lines + ["", *verdicts(rows)])


FLOOR_SHARE = 0.5  # an op below half its floor is called out
GOAL_WORDS = f"{FLOOR_SHARE:.0%} of the floor or the share named, or the ratio to F.linear named"


def goal_share(op: str, matmul: bool) -> float:
    """The share of its floor (F.linear where `matmul`, else the copy) an op must reach:
    half of it, the share of the copy its declaration names (Bench.copy_share_goal), or
    for an op with a goal against its matmul (Bench.matmul_ratio_goal), the inverse of
    that ratio."""
    bench = CASES[op].bench if op in CASES else None
    goal = None if bench is None else bench.matmul_ratio_goal if matmul else bench.copy_share_goal
    return FLOOR_SHARE if goal is None else 1 / goal if matmul else goal


def floor_share(row: dict) -> str:
    """A row's share of its floor as the tables print it: of the copy bandwidth, or of the matmul rate."""
    return f"{row['copy_share']:.0%}" if "matmul_share" not in row else f"{row['matmul_share']:.0%} of F.linear"


# The size whose time is mostly a call's fixed cost (checks, dispatch, waking the
# threads for 1 MB in cache), not bandwidth: judged only when nothing larger ran.
CALL_BOUND_SIZE = "small"


def verdicts(rows: list[dict], over: str = "this run's rows") -> list[str]:
    """One line per op: its floor (a copy, or F.linear on the same inputs for the ops
    built around a matmul), aefast's worst share of it over the sizes (the small size
    only if no other ran), dtypes and modes measured, and whether that is below the
    op's goal (goal_share: half, or the share of the copy or the ratio to F.linear its
    declaration names)."""
    lines, below = [], []
    larger = [r for r in rows if r["size"] != CALL_BOUND_SIZE]
    if larger and len(larger) < len(rows):
        rows, over = larger, f"{over} but the {CALL_BOUND_SIZE} size's"
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op and r["contender"].startswith("aefast[") and "error" not in r]
        if not mine:  # every aefast row at these sizes failed (out of memory, ...): said, not dropped
            if any(r["op"] == op and r["contender"].startswith("aefast[") for r in rows):
                lines.append(f"- {op}: every aefast row failed (bench.md has the errors): NOT MEASURED")
                below.append(op)
            continue
        matmul = "matmul_share" in mine[0]
        worst = min(mine, key=lambda r: r["matmul_share" if matmul else "copy_share"])
        share = worst["matmul_share" if matmul else "copy_share"]
        goal = goal_share(op, matmul)
        floor = "F.linear" if matmul else "copy"
        ratio_goal = matmul and goal != FLOOR_SHARE  # a goal against the matmul's time
        if ratio_goal:
            floor += f", goal at most {1 / goal:.2f}x its time"
        elif goal != FLOOR_SHARE:
            floor += f", goal {goal:.0%}"
        ratio = f"{1 / share:.3f}x" if share > 0 else "no measurable share of"
        verdict = "ok" if share >= goal else f"BELOW ({ratio} its time)" if ratio_goal else f"BELOW {goal:.0%}"
        lines.append(f"- {op}: floor {floor}; worst {share:.0%} ({worst['contender']}, {worst['size']} {worst.get('dtype', 'float32')} "
                     f"{worst['mode']}): {verdict}")
        if share < goal:
            below.append(op)
    summary = (f"Below their goal ({GOAL_WORDS}): {', '.join(below)}." if below
               else f"Every op measured meets its goal ({GOAL_WORDS}).")
    return [f"Verdict per op (aefast's worst share of its floor over {over}):", *lines, summary] if lines else []


def plot(rows: list[dict], path, env: dict | None = None) -> None:
    """Speedup over the eager reference of every contender but eager: one panel per mode,
    a group of bars per op and size, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r and r["contender"] != "eager"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES)[:1]
    labels = sorted({f"{r['op']}\n{r['size']}" for r in rows})
    contenders = sorted({r["contender"].split(":")[0] for r in rows})  # "torch: <call>" as one colour
    width = 0.8 / max(1, len(contenders))
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(7, 0.45 * len(labels) * max(1, len(contenders))), 3.6 * len(modes)))
    for ax, mode in zip(axes[:, 0], modes):
        for i, name in enumerate(contenders):
            by_label = {f"{r['op']}\n{r['size']}": r["vs_eager"] for r in rows
                        if r["mode"] == mode and r["contender"].split(":")[0] == name}
            xs = [j + i * width for j, label in enumerate(labels) if label in by_label]
            ax.bar(xs, [by_label[label] for label in labels if label in by_label], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("speedup over the eager reference")
        ax.set_title(mode, fontsize=10)
        ax.legend(fontsize=7)
    where = f"{env['device']}, torch {env['torch']}" if env else ""
    fig.suptitle(f"aefast bench{': ' + where if where else ''}\n(above 1: faster than aefast's plain-PyTorch reference)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    out = harness.results_dir(torch.device(args.device), args.out)

    def save(rows, env):
        harness.write(out, "bench", {"environment": env, "results": rows}, markdown(rows, env))

    rows, env = measure(args, progress=save)
    print(markdown(rows, env))
    plot(rows, out / "bench.png", env)
    print(f"\nwritten to {out}/bench.json, bench.md, bench.png")
    return 0
