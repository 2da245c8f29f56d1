"""Where a top-k SAE training step spends its GPU time and memory, at issue 14's size.

    python bench/profile_sae_step.py [--rows 4096] [--width 2048] [--latents 65536] [--k 32]
                                     [--dtype bfloat16] [--steps 5] [--out FILE.md]

For aefast's TopKSAE (and sparsify's SparseCoder where it is installed), built as
bench/sae_peer.py builds them (same weights, fused Adam, autocast): torch.profiler over a
few training steps, the CUDA kernels ranked by their total time; the memory allocated at
rest and the step's peak. Then the parts of aefast's step timed alone with CUDA events
(medians, contenders alternating): the encoder's matmul over one latent block and over all
latents, each backend's selection of one block, topk_encode whole, the sparse decoder
forward and backward, the fused Adam step, and the weights' casts to the autocast dtype.
A GPU tool: it needs a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_peer import LIBRARIES, build


def profile_library(library: str, rows: int, width: int, latents: int, k: int, dtype: torch.dtype,
                    steps: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    model, params, forward = build(library, width, latents, k, device="cuda")
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    x = torch.randn(rows, width, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype):
            _, loss = forward(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    resting = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    return [f"## {library}: {ms:.2f} ms a step; allocated at rest {resting / 2**20:.0f} MiB, "
            f"step peak {peak / 2**20:.0f} MiB (transient {(peak - resting) / 2**20:.0f} MiB)", "",
            "```", table, "```", ""]


def timed(contenders: dict, rounds: int = 20) -> dict[str, str]:
    """Median ms of each callable, alternating, CUDA events around each call; a
    contender that raises is reported by its error and dropped."""
    times, failed = {name: [] for name in contenders}, {}
    for round_ in range(rounds + 3):
        for name, run in contenders.items():
            if name in failed:
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                start.record()
                run()
                end.record()
                end.synchronize()
            except Exception as exc:  # one broken part must not lose the others' figures
                failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if round_ > 2:
                times[name].append(start.elapsed_time(end))
    return {name: failed.get(name) or f"{statistics.median(t):.3f}" for name, t in times.items()}


def parts(rows: int, width: int, latents: int, k: int, dtype: torch.dtype) -> list[str]:
    import torch.nn.functional as F

    import aefast as ae
    from aefast.ops._declare import kernels
    from aefast.ops.decode import _encoder_tile, _linear_relu

    def radix_passes(call):
        """call() with the CUDA top-k's long rows kept on its radix passes, not its one pass."""
        def run():
            os.environ["AEFAST_CUDA_TOPK"] = "radix"
            try:
                return call()
            finally:
                del os.environ["AEFAST_CUDA_TOPK"]
        return run

    def kernel_call(backend: str, name: str, *args):
        """A call of `backend`'s kernel `name`, looked up when it runs: a backend missing
        here fails its own parts alone."""
        return lambda: getattr(kernels(backend), name)(*args)

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(rows, width, generator=generator).to("cuda", dtype)
    weight32 = (torch.randn(latents, width, generator=generator) / width**0.5).cuda()
    weight = weight32.to(dtype)
    bias = torch.zeros(latents, device="cuda", dtype=dtype)
    block_rows, block_latents = _encoder_tile(rows, latents, gpu=True)
    block = F.linear(x[:block_rows], weight[:block_latents]).relu_()
    block_out = torch.empty_like(block)
    values, indices = ae.topk_encode(x, weight, bias, k)
    grad = torch.randn_like(values)
    out = ae.sparse_decode(values, indices, weight)
    grad_out = torch.randn_like(out)
    param = torch.nn.Parameter(weight32.clone())
    param.grad = torch.randn_like(param)
    adam = torch.optim.Adam([param], lr=1e-4, fused=True)
    adam.step()
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    contenders = {
        f"F.linear {rows}x{width} -> {latents}": lambda: F.linear(x, weight, bias),
        f"F.linear one block {block_rows}x{width} -> {block_latents}":
            lambda: F.linear(x[:block_rows], weight[:block_latents]),
        "the encoder's block: matmul, bias and ReLU in its epilogue": lambda: _linear_relu(
            x[:block_rows], weight[:block_latents], bias[:block_latents], block_out),
        "select one block, cuda": kernel_call("cpp", "topk_forward", block, k, False),
        "select one block, cuda, relu=True": kernel_call("cpp", "topk_forward", block, k, True),
        "select one block, cuda, radix passes only (AEFAST_CUDA_TOPK=radix)": radix_passes(
            kernel_call("cpp", "topk_forward", block, k, False)),
        "select one block, triton": kernel_call("triton", "topk_forward", block, k, False),
        "select one block, torch.topk": lambda: block.topk(k, dim=1),
        "topk_encode, auto": lambda: ae.topk_encode(x, weight, bias, k),
        "F.linear + relu + torch.topk": lambda: F.linear(x, weight, bias).relu_().topk(k, dim=1),
        **{f"sparse_decode forward, {name}": kernel_call(backend, "sparse_decode_forward", values, indices, weight, None)
           for name, backend in (("cuda", "cpp"), ("triton", "triton"))},
        **{f"sparse_decode_backward (grad values, grad weight), {name}": kernel_call(
            backend, "sparse_decode_backward", grad_out, values, indices, weight)
           for name, backend in (("cuda", "cpp"), ("triton", "triton"))},
        **{f"sparse_decode_backward (grad weight only, the encoder's), {name}": kernel_call(
            backend, "sparse_decode_backward", grad_out, values, indices, weight, False)
           for name, backend in (("cuda", "cpp"), ("triton", "triton"))},
        "topk_encode forward+backward (x, weight, bias)": lambda: torch.autograd.grad(
            ae.topk_encode(*leaves, k)[0], leaves, grad),
        f"fused Adam step, one {latents}x{width} float32 weight": lambda: adam.step(),
        f"cast one {latents}x{width} weight to {dtype}": lambda: weight32.to(dtype),
        "torch.zeros_like one float32 weight": lambda: torch.zeros_like(weight32),
    }
    ms = timed(contenders)
    lines = ["## aefast's parts, alone (median ms, CUDA events, alternating)", "", "| part | ms |", "|---|---:|"]
    lines += [f"| {name} | {t} |" for name, t in ms.items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("a GPU tool: no CUDA device here")
    dtype = getattr(torch, args.dtype)
    lines = [f"# TopKSAE step profile: B={args.rows}, D={args.width}, L={args.latents}, k={args.k}, {args.dtype}, "
             f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", ""]
    print("\n".join(lines), flush=True)
    for library in LIBRARIES:
        try:
            section = profile_library(library, args.rows, args.width, args.latents, args.k, dtype, args.steps)
        except ImportError as exc:
            section = [f"## {library}: not installed ({exc})", ""]
        torch.cuda.empty_cache()
        print("\n".join(section), flush=True)
        lines += section
    section = parts(args.rows, args.width, args.latents, args.k, dtype)
    print("\n".join(section), flush=True)
    lines += section
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
