"""aefast's TopKSAE against EleutherAI's sparsify (`pip install eai-sparsify`), side by side.

    python bench/sae_peer.py [--rows 1024] [--width 768] [--latents 16384 65536] [--k 32]
                             [--steps 5] [--repeats 2] [--device cpu|cuda] [--dtype float32|bfloat16]
                             [--out FILE.md]

First a check in this process, at a small size: the two models, given the same weights
and inputs, reconstruct the same x_hat and give the same gradients of all four
parameters (encoder weight and bias, decoder weight, decoder bias) for the same loss
(sparsify's FVU, sum of squared errors over the total variance). Then, per size, each
library times a full training step (encode, decode, FVU, backward, Adam) in a process
of its own (fused Adam for both), the two alternating; each child reports its median step time and its
transient memory: the peak resident set during a step minus the resident set before
it (Linux: VmHWM is reset through /proc/self/clear_refs before each step; glibc is
told to return large blocks on free, MALLOC_MMAP_THRESHOLD_, so freed tensors do not
stay resident). Both run float32 on the CPU with torch's default threads.

On a GPU (`--device cuda`, the GPU suite runs `--dtype bfloat16`: both under bfloat16
autocast, parameters in float32), time comes from synchronised wall clocks, transient
memory is the allocator's peak in a step minus what was allocated before it, and peak
memory the allocator's peak over the run. There the script also races aefast's
`topk_encode` against cuBLAS (F.linear) followed by `torch.topk` at each size, forward,
the two alternating. Without the peer installed (the GPU machines have no network) it
times aefast alone and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LIBRARIES = ("aefast", "sparsify")
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the peer's Triton decoder needs a GPU


def fvu(x, x_hat):
    """Sparsify's loss: the fraction of variance unexplained, sum of squared errors over
    the total variance of the batch."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def build(library: str, width: int, latents: int, k: int, seed: int = 0, device: str = "cpu"):
    """(model, step inputs -> (x_hat, loss)), both libraries from one set of weights."""
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.randn(latents, width, generator=generator) / width**0.5
    decoder = torch.nn.functional.normalize(torch.randn(latents, width, generator=generator), dim=1)
    encoder_bias = torch.randn(latents, generator=generator) * 0.01
    decoder_bias = torch.randn(width, generator=generator) * 0.01
    if library == "aefast":
        from aefast.models import TopKSAE

        model = TopKSAE(width, n_latents=latents, k=k, k_aux=0)
        params = (model.encoder_weight, model.encoder_bias, model.decoder_weight, model.pre_bias)

        def forward(x, exact=False):
            x_hat = model.reconstruct(x)
            return x_hat, fvu(x, x_hat)
    else:
        from sparsify import SparseCoder, SparseCoderConfig

        model = SparseCoder(width, SparseCoderConfig(num_latents=latents, k=k))
        params = (model.encoder.weight, model.encoder.bias, model.W_dec, model.b_dec)

        def forward(x, exact=False):
            if exact:  # its forward runs under bfloat16 autocast on a GPU: its float32 math, for the check
                top_acts, top_indices, _ = model.encode(x)
                x_hat = model.decode(top_acts, top_indices)
                return x_hat, fvu(x, x_hat)
            out = model(x)
            return out.sae_out, out.fvu
    model.to(device)
    with torch.no_grad():
        for param, value in zip(params, (encoder, encoder_bias, decoder, decoder_bias)):
            param.copy_(value)
    return model, params, forward


def check_agreement(width: int = 96, latents: int = 1024, k: int = 16, rows: int = 64, device: str = "cpu") -> str:
    # On the device timed: there the peer's decoder is its Triton kernel, which takes no CPU tensor.
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for library in LIBRARIES:
        _, params, forward = build(library, width, latents, k, device=device)
        x_hat, loss = forward(x, exact=True)
        results[library] = (x_hat, loss, torch.autograd.grad(loss, params))
    (ours_hat, ours_loss, ours_grads), (peer_hat, peer_loss, peer_grads) = results.values()
    torch.testing.assert_close(ours_hat, peer_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loss, peer_loss, rtol=1e-5, atol=1e-7)
    names = ("encoder weight", "encoder bias", "decoder weight", "decoder bias")
    for name, ours, peer in zip(names, ours_grads, peer_grads):
        torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-7, msg=f"gradient of the {name}")
    return (f"agreement at B={rows}, D={width}, L={latents}, k={k}: x_hat, FVU and the gradients of "
            f"{', '.join(names)} equal within float32 rounding ({device})")


# ---------------------------------------------------------------- one library, one process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(library: str, rows: int, width: int, latents: int, k: int, steps: int,
              device: str = "cpu", dtype: str = "float32") -> dict:
    model, params, forward = build(library, width, latents, k, device=device)
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)  # the fastest Adam, for both
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(2)).to(device)
    cuda = device == "cuda"
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    times, transient = [], []
    for step in range(steps + 2):  # the first steps allocate Adam's state and compile kernels: not timed
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            resident = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        with autocast:
            _, loss = forward(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if step > 1:
            times.append(seconds)
            transient.append((torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - resident)
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"library": library, "ms": statistics.median(times) * 1e3, "transient_mib": max(transient) / 2**20,
            "peak_mib": peak / 2**20, "threads": torch.get_num_threads()}


def encoder_race(rows: int, width: int, latents: int, k: int, dtype: str, rounds: int = 20) -> dict:
    """Forward ms of aefast.topk_encode and of F.linear + ReLU + torch.topk (cuBLAS and
    torch's top-k), on the GPU, alternating; medians."""
    import torch.nn.functional as F

    import aefast as ae

    generator = torch.Generator().manual_seed(3)
    kind = getattr(torch, dtype)
    x = torch.randn(rows, width, generator=generator).to("cuda", kind)
    weight = (torch.randn(latents, width, generator=generator) / width**0.5).to("cuda", kind)
    bias = torch.zeros(latents, device="cuda", dtype=kind)
    contenders = {"topk_encode": lambda: ae.topk_encode(x, weight, bias, k),
                  "linear+topk": lambda: F.linear(x, weight, bias).relu_().topk(k, dim=1)}
    times = {name: [] for name in contenders}
    for round_ in range(rounds + 2):
        for name, run in contenders.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            if round_ > 1:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_in_process(library: str, rows: int, width: int, latents: int, k: int, steps: int,
                   device: str = "cpu", dtype: str = "float32", keep_freed_memory: bool = False) -> dict:
    # Every block of 64 KiB and more mapped anew and unmapped when freed: the resident
    # memory between steps falls back, so peak minus resident is the step's transient
    # memory. Each step then faults in its large tensors again; --keep-freed-memory times
    # the steps with freed memory kept instead (no memory figures then). Imported here:
    # each child imports only the library it times.
    from aefast._memory import kept_memory_environment

    threshold = kept_memory_environment() if keep_freed_memory else {"MALLOC_MMAP_THRESHOLD_": "65536"}
    env = {**os.environ, **threshold}
    command = [sys.executable, __file__, "--child", library, "--rows", str(rows), "--width", str(width),
               "--latents", str(latents), "--k", str(k), "--steps", str(steps), "--device", device, "--dtype", dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--latents", type=int, nargs="+", default=[16384])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per library and size, alternating")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: both libraries under bfloat16 autocast")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: both processes keep freed memory (glibc), so no step faults in fresh pages; "
                             "times only (the transient memory is not measured then)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.child:
        print(json.dumps(run_child(args.child, args.rows, args.width, args.latents[0], args.k, args.steps,
                                   args.device, args.dtype)))
        return 0
    try:
        import sparsify  # noqa: F401  (prints which decoder it uses)
        libraries = LIBRARIES
    except ImportError:
        if args.device == "cpu":
            print("sae_peer: the peer is not installed (pip install eai-sparsify)", file=sys.stderr)
            return 2
        libraries = ("aefast",)  # a GPU machine without the peer: aefast's own figures, and the encoder race

    memory = "transient MiB" if args.device == "cpu" else "transient / peak MiB"
    if libraries == LIBRARIES:
        lines = [check_agreement(device=args.device), "",
                 f"| B x D, L, k | aefast step ms | sparsify step ms | speed-up | aefast {memory} | "
                 f"sparsify {memory} | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    else:
        lines = ["sparsify is not installed here: aefast alone.", "",
                 f"| B x D, L, k | aefast step ms | aefast {memory} |", "|---|---:|---:|"]
    print(lines[0], flush=True)
    race = []
    for latents in args.latents:
        runs = {library: [] for library in libraries}
        for _ in range(args.repeats):
            for library in libraries:
                runs[library].append(run_in_process(library, args.rows, args.width, latents, args.k, args.steps,
                                                    args.device, args.dtype, args.keep_freed_memory))
        ms = {lib: min(r["ms"] for r in rs) for lib, rs in runs.items()}
        mib = {lib: max(r["transient_mib"] for r in rs) for lib, rs in runs.items()}
        peak = {lib: max(r["peak_mib"] for r in rs) for lib, rs in runs.items()}
        shown = {lib: f"{mib[lib]:.0f}" + ("" if args.device == "cpu" else f" / {peak[lib]:.0f}") for lib in libraries}
        if args.keep_freed_memory:
            shown = {lib: "-" for lib in libraries}
        size = f"{args.rows} x {args.width}, {latents}, {args.k}"
        if libraries == LIBRARIES:
            ratio = mib if args.device == "cpu" else peak
            memory_ratio = "-" if args.keep_freed_memory else f"{ratio['aefast'] / ratio['sparsify']:.2f}"
            lines.append(f"| {size} | {ms['aefast']:.1f} | {ms['sparsify']:.1f} | {ms['sparsify'] / ms['aefast']:.2f}x | "
                         f"{shown['aefast']} | {shown['sparsify']} | {memory_ratio} |")
        else:
            lines.append(f"| {size} | {ms['aefast']:.1f} | {shown['aefast']} |")
        print(lines[-1], flush=True)
        if args.device == "cuda":
            race.append((size, encoder_race(args.rows, args.width, latents, args.k, args.dtype)))
    threads = runs["aefast"][0]["threads"]
    where = f"CPU, {threads} torch threads" if args.device == "cpu" else torch.cuda.get_device_name(0)
    ratio_words = "" if args.device == "cpu" or libraries != LIBRARIES else "; memory ratio: of the peaks"
    if args.keep_freed_memory:
        ratio_words += "; freed memory kept in both processes (--keep-freed-memory): no page faults timed, no memory measured"
    lines += ["", f"{args.dtype}, {where}, torch {torch.__version__}; step: encode, decode, FVU, backward, Adam "
              f"(fused, for both); median of {args.steps} steps per process, best of {args.repeats} processes"
              f"{'' if args.keep_freed_memory else ' (memory: the worst step)'}{ratio_words}."]
    if race:
        lines += ["", "| B x D, L, k | topk_encode ms | F.linear + torch.topk ms | speed-up |", "|---|---:|---:|---:|"]
        lines += [f"| {size} | {r['topk_encode']:.3f} | {r['linear+topk']:.3f} | {r['linear+topk'] / r['topk_encode']:.2f}x |"
                  for size, r in race]
        print("\n".join(lines[-len(race) - 2:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
