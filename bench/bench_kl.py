"""Sparse-KL family, forward + backward: aefast backends against the plain-PyTorch
formula (eager and torch.compile) and against the memory floor, alternating.

    python bench/bench_kl.py                 # CPU, 4096 x 4096 float32
    python bench/bench_kl.py --device cuda --sizes 4096x4096,16384x16384

The floor is the bytes an ideal fused op must move, timed as plain copies of the
same tensors with the same fresh allocations (harness.fresh_clone: huge pages, as the
CPU kernels ask for): two clones of the input for
sigmoid_kl_sparsity (forward writes h, backward writes grad z), one full read plus
one clone for kl_sparsity.
"""

from __future__ import annotations

import torch

import aefast as ae
from aefast import reference
from aefast.bench import harness

RHO, BETA = 0.05, 3.0

# Targets of the foundation issue, as (contender, at least this many times faster)
# and the floor ratio not to exceed.
TARGETS = {
    "sigmoid_kl_sparsity": {"eager": 1.6, "compiled": 1.2, "floor": 1.3},
    "kl_sparsity": {"eager": 1.0, "compiled": 1.0, "floor": 1.2},
}


def step_sigmoid_kl(fn, z, grad_h, one):
    def run():
        x = z.detach().requires_grad_(True)
        h, penalty = fn(x, RHO, BETA)
        torch.autograd.backward([h, penalty], [grad_h, one])
    return run


def step_kl(fn, a, one):
    def run():
        x = a.detach().requires_grad_(True)
        fn(x, RHO, BETA).backward(one)
    return run


def with_backend(name, fn):
    def run(*args):
        with ae.backend(name):
            return fn(*args)
    return run


def contenders(op: str, device: torch.device, rows: int, cols: int, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    one = torch.ones((), device=device, dtype=dtype)
    if op == "sigmoid_kl_sparsity":
        z = torch.randn(rows, cols, generator=gen).to(device, dtype)
        grad_h = torch.randn(rows, cols, generator=gen).to(device, dtype)
        fused, ref = ae.sigmoid_kl_sparsity, reference.sigmoid_kl_sparsity
        make = lambda fn: step_sigmoid_kl(fn, z, grad_h, one)
        floor = lambda: (harness.fresh_clone(z), harness.fresh_clone(z))
    else:
        a = torch.rand(rows, cols, generator=gen).to(device, dtype)
        fused, ref = ae.kl_sparsity, reference.kl_sparsity
        make = lambda fn: step_kl(fn, a, one)
        floor = lambda: (a.sum(), harness.fresh_clone(a))
    runs = {
        f"aefast[{b}]": make(with_backend(b, fused))
        for b in ae.available_backends(device)
        if b != "reference"
    }
    runs["eager"] = make(ref)
    runs["compiled"] = make(torch.compile(ref))
    runs["floor"] = floor
    return runs


def measure(op, device, rows, cols, dtype, rounds):
    times = harness.alternate(contenders(op, device, rows, cols, dtype), device, rounds=rounds)
    ms = {name: harness.median_ms(t) for name, t in times.items()}
    best = min((n for n in ms if n.startswith("aefast")), key=ms.get)
    targets = TARGETS[op]
    checks = {
        "speedup_vs_eager": ms["eager"] / ms[best],
        "speedup_vs_compiled": ms["compiled"] / ms[best],
        "ratio_to_floor": ms[best] / ms["floor"],
    }
    met = {
        "speedup_vs_eager": checks["speedup_vs_eager"] >= targets["eager"],
        "speedup_vs_compiled": checks["speedup_vs_compiled"] >= targets["compiled"],
        "ratio_to_floor": checks["ratio_to_floor"] <= targets["floor"],
    }
    return {"op": op, "shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."),
            "median_ms": ms, "best": best, "ratios": checks, "targets": targets, "met": met}


def markdown(records, env) -> str:
    lines = [
        f"Measured on {env['device']} ({env['threads']} threads), torch {env['torch']}, {env['date']}.",
        "Forward + backward, median of alternating rounds.",
        "",
        "| op | shape | contender | median ms | contender / best aefast |",
        "|---|---|---|---:|---:|",
    ]
    for r in records:
        shape = "x".join(map(str, r["shape"])) + " " + r["dtype"]
        for name, ms in r["median_ms"].items():
            ratio = "" if name.startswith("aefast") else f"{ms / r['median_ms'][r['best']]:.2f}"
            lines.append(f"| {r['op']} | {shape} | {name} | {ms:.1f} | {ratio} |")
    lines += [
        "",
        "| op | shape | vs eager (target) | vs compiled (target) | / floor (target) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        q, t, m = r["ratios"], r["targets"], r["met"]
        mark = lambda k: "" if m[k] else " **missed**"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['op']} | {shape} | {q['speedup_vs_eager']:.2f}x (>= {t['eager']}){mark('speedup_vs_eager')} "
            f"| {q['speedup_vs_compiled']:.2f}x (>= {t['compiled']}){mark('speedup_vs_compiled')} "
            f"| {q['ratio_to_floor']:.2f} (<= {t['floor']}){mark('ratio_to_floor')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = harness.script_parser(__doc__, rounds=15)
    p.add_argument("--sizes", default="4096x4096", help="comma-separated ROWSxCOLS")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    records = [
        measure(op, device, rows, cols, dtype, args.rounds) for rows, cols in sizes for op in TARGETS
    ]
    env = harness.environment(device)
    table = markdown(records, env)
    print(table)
    out = harness.results_dir(device, args.out)
    harness.write(out, "kl_sparsity", {"environment": env, "results": records}, table)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
