"""Winner-take-all family: aefast against plain PyTorch, contenders alternating.

    python bench/bench_wta.py             # CPU: 1024 x 16384, k = 32; decoder L = 16384, D = 768

- topk_sparse (forward) against torch.topk, and one read of x (the memory floor);
- topk_mask forward + backward against torch.topk then scatter into a dense mask
  (eager), and against a clone of x (the memory floor of the forward);
- topk_encode forward + backward (the fused encoder, no (B, L) pre-activation kept)
  against F.linear, ReLU and torch.topk eager;
- sparse_decode forward + backward against F.embedding_bag with per-sample weights
  (the best plain-PyTorch sparse decoder) and the dense decode (scatter the code
  into (B, L), then a matmul);
- on GPU also topk_mask forward + backward at 4096 x 65536, k = 32 and 128, for the
  cuda and triton backends against eager, torch.compile and the copy floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import aefast as ae
from aefast.bench import harness

TARGETS = {  # contender: aefast must be at least this many times faster
    "topk_sparse": {"torch.topk": 3.0},
    "topk_mask": {"topk+scatter eager": 1.5},
    "sparse_decode": {"embedding_bag": 1.3, "dense decode": 10.0},
}


def topk_contenders(device, B, H, k):
    x = torch.randn(B, H, device=device)
    grad = torch.randn(B, H, device=device)

    def eager_mask():
        xx = x.detach().requires_grad_(True)
        values, indices = torch.topk(xx, k)
        torch.zeros_like(xx).scatter(1, indices, torch.relu(values)).backward(grad)

    def fused_mask():
        xx = x.detach().requires_grad_(True)
        ae.topk_mask(xx, k).backward(grad)

    return {
        "topk_sparse": {"aefast": lambda: ae.topk_sparse(x, k), "torch.topk": lambda: torch.topk(x, k),
                        "one read (floor)": lambda: x.sum()},
        "topk_mask": {"aefast": fused_mask, "topk+scatter eager": eager_mask,
                      "clone (floor)": lambda: harness.fresh_clone(x)},
    }


def gpu_topk_mask_groups(device, B=4096, H=65536, ks=(32, 128)):
    """GPU: topk_mask forward + backward at 4096 x 65536 per backend with a top-k kernel,
    against eager topk + scatter and its torch.compile, and the memory floor: fresh
    copies of x and of the gradient (read x, write the mask; read the gradient, write
    x's). floor / aefast is the share of copy bandwidth reached."""
    x = torch.randn(B, H, device=device)
    grad = torch.randn(B, H, device=device)

    def step(fn):
        def run():
            fn(x.detach().requires_grad_(True)).backward(grad)
        return run

    groups = {}
    for k in ks:
        def eager(xx, k=k):
            values, indices = torch.topk(xx, k)
            return torch.zeros_like(xx).scatter(1, indices, torch.relu(values))

        compiled = torch.compile(eager)
        for backend in [b for b in ("cuda", "triton") if b in ae.available_backends(device)]:
            def fused(xx, k=k, backend=backend):
                with ae.backend(backend):
                    return ae.topk_mask(xx, k)

            groups[f"topk_mask {B}x{H} k={k} [{backend}]"] = {
                "aefast": step(fused), "topk+scatter eager": step(eager), "compiled": step(compiled),
                "copies (floor)": lambda: (harness.fresh_clone(x), harness.fresh_clone(grad))}
    return groups


def decode_contenders(device, B, k, L, D):
    weight = torch.randn(L, D, device=device) * 0.02
    values = torch.rand(B, k, device=device)
    indices = torch.randint(0, L, (B, k), device=device)
    grad = torch.randn(B, D, device=device)

    def run(decode):
        def step():
            w = weight.detach().requires_grad_(True)
            v = values.detach().requires_grad_(True)
            decode(v, w).backward(grad)
        return step

    def dense(v, w):
        code = torch.zeros(B, L, device=device).scatter(1, indices, v)
        return code @ w

    x = torch.randn(B, D, device=device)
    encoder = weight.detach().clone()  # (L, D), as nn.Linear(D, L).weight
    bias = torch.zeros(L, device=device)
    grad_values = torch.randn(B, k, device=device)

    def encode_step(encode):
        def step():
            w = encoder.detach().requires_grad_(True)
            encode(x, w).backward(grad_values)
        return step

    def eager_encode(x, w):
        return torch.topk(torch.relu(F.linear(x, w, bias)), k).values

    return {
        "topk_encode": {
            "aefast": encode_step(lambda x, w: ae.topk_encode(x, w, bias, k)[0]),
            "linear+relu+topk eager": encode_step(eager_encode),
        },
        "sparse_decode": {
            "aefast": run(lambda v, w: ae.sparse_decode(v, indices, w)),
            "embedding_bag": run(lambda v, w: F.embedding_bag(indices, w, per_sample_weights=v, mode="sum")),
            "dense decode": run(dense),
        }
    }


def main(argv=None) -> int:
    args = harness.script_parser(__doc__, rounds=11).parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    groups = {**topk_contenders(device, 1024, 16384, 32), **decode_contenders(device, 1024, 32, 16384, 768)}
    header = ["float32; topk: 1024 x 16384, k = 32; topk_encode and sparse_decode: B = 1024, k = 32, L = 16384, D = 768."]
    if device.type == "cuda":
        groups.update(gpu_topk_mask_groups(device))
        header.append("GPU: topk_mask forward + backward at 4096 x 65536 per backend; floor / aefast = share of copy bandwidth.")
    return harness.report("wta", header, groups, TARGETS, device, args.rounds, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
