"""Noise-injection family: aefast against plain PyTorch, contenders alternating.

    python bench/bench_noise.py           # CPU: corrupt at 1024 x 16384, noisy_linear 1024 x 4096 -> 1024

- corrupt gaussian against ``x + level * torch.randn_like(x)`` (eager and compiled);
- corrupt masking against the eager mask and against a clone of x (the memory floor);
- noisy_linear (masking) forward + backward against F.linear on the clean input (the
  noise should cost next to nothing) and the eager corrupt-then-linear;
- reparameterize forward + backward against the eager formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import aefast as ae
from aefast.bench import harness

LEVEL = 0.3
TARGETS = {  # least contender time / aefast time (harness.ratio_table)
    "corrupt gaussian": {"x + level * randn_like": 3.0},
    "corrupt masking": {"clone (floor)": 1 / 1.3},
    "noisy_linear fwd+bwd": {"F.linear, clean input": 1 / 1.1},
}


def corrupt_contenders(device, B, D):
    x = torch.rand(B, D, device=device)

    def eager_gaussian(x):
        return x + LEVEL * torch.randn_like(x)

    compiled_gaussian = torch.compile(eager_gaussian)
    return {
        "corrupt gaussian": {
            "aefast": lambda: ae.corrupt(x, "gaussian", LEVEL),
            "x + level * randn_like": lambda: eager_gaussian(x),
            "compiled": lambda: compiled_gaussian(x),
            "clone (floor)": lambda: harness.fresh_clone(x),
        },
        "corrupt masking": {
            "aefast": lambda: ae.corrupt(x, "masking", LEVEL),
            "x * (rand_like >= level)": lambda: x * (torch.rand_like(x) >= LEVEL),
            "clone (floor)": lambda: harness.fresh_clone(x),
        },
    }


def noisy_linear_contenders(device, B, D, out_features):
    x = torch.rand(B, D, device=device)
    weight = torch.randn(out_features, D, device=device) * D**-0.5
    bias = torch.zeros(out_features, device=device)
    grad = torch.randn(B, out_features, device=device)

    def run(linear):
        def step():
            w = weight.detach().requires_grad_(True)
            b = bias.detach().requires_grad_(True)
            linear(x, w, b).backward(grad)
        return step

    def eager(x, w, b):
        return F.linear(x * (torch.rand_like(x) >= LEVEL), w, b)

    return {
        "noisy_linear fwd+bwd": {
            "aefast": run(lambda x, w, b: ae.noisy_linear(x, w, b, "masking", LEVEL)),
            "F.linear, clean input": run(F.linear),
            "corrupt then F.linear, eager": run(eager),
        }
    }


def reparameterize_contenders(device, B, Z):
    mu, logvar = torch.randn(B, Z, device=device), torch.randn(B, Z, device=device) * 0.1
    grad = torch.randn(B, Z, device=device)

    def eager(m, lv):
        z = m + torch.randn_like(m) * torch.exp(0.5 * lv)
        return z, (-0.5 * (1 + lv - m * m - lv.exp()).sum(1)).mean()

    def run(fn):
        def step():
            m, lv = mu.detach().requires_grad_(True), logvar.detach().requires_grad_(True)
            z, kl = fn(m, lv)
            torch.autograd.backward([z, kl], [grad, torch.ones((), device=device)])
        return step

    return {"reparameterize fwd+bwd": {"aefast": run(ae.reparameterize), "eager": run(eager)}}


def main(argv=None) -> int:
    args = harness.script_parser(__doc__, rounds=11).parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    groups = {
        **corrupt_contenders(device, 1024, 16384),
        **noisy_linear_contenders(device, 1024, 4096, 1024),
        **reparameterize_contenders(device, 1024, 16384),
    }
    header = [f"float32; corrupt and reparameterize: 1024 x 16384; noisy_linear: 1024 x 4096 -> 1024; level {LEVEL}."]
    return harness.report("noise", header, groups, TARGETS, device, args.rounds, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
