"""The `aefast` command (also `python -m aefast`): info, train."""

from __future__ import annotations

import argparse
import platform
import sys


def _cpu_vector_isa() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2+FMA" if {"avx2", "fma"} <= set(flags) else "baseline x86-64"


def cmd_info(_args) -> int:
    import torch

    import aefast
    from aefast import backends

    print(f"aefast {aefast.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}" + ("  (interpreter: TRITON_INTERPRET=1)" if backends.TRITON_INTERPRET else ""))
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    print(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    if backends.CPP_BUILT:
        print("aefast._C: built; C++ CPU kernels: yes; CUDA kernels: "
              + ("yes" if backends.CUDA_BUILT else "no (skipped at build time)"))
    else:
        print(f"aefast._C: not built ({backends.BUILD_ERROR}); only reference/triton backends")
    print(f"CPU vector kernels: {_cpu_vector_isa()} (chosen at run time)")
    print(f"backend asked for: {backends.current_backend()} (AEFAST_BACKEND or aefast.backend())")
    for device in ["cpu"] + (["cuda"] if cuda else []):
        try:
            choice = backends.resolve(torch.device(device))
        except RuntimeError as exc:
            choice = f"error: {exc}"
        print(f"  {device}: available {', '.join(aefast.available_backends(device))}; runs {choice}")
    return 0


def cmd_train(args) -> int:
    import torch

    from aefast import backends
    from aefast.data import digits
    from aefast.models import SparseAutoencoder

    torch.manual_seed(args.seed)
    train, val = digits(seed=args.seed)
    device = torch.device(args.device)
    train, val = train.to(device), val.to(device)
    model = SparseAutoencoder(train.shape[1], args.hidden, args.rho, args.beta, args.weight_decay,
                              args.momentum).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"sparse autoencoder on digits: {train.shape[0]} train / {val.shape[0]} validation rows, "
          f"{args.hidden} hidden units, rho={args.rho}, beta={args.beta}, "
          f"backend {backends.resolve(device)} on {device}")
    print(f"{'epoch':>5} {'loss':>9} {'recon':>9} {'KL':>9} {'mean act':>9} {'val recon':>9}")
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(train.shape[0], device=device)
        totals, batches = {}, 0
        for start in range(0, train.shape[0], args.batch_size):
            terms = model.loss(train[order[start:start + args.batch_size]])
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            batches += 1
        model.eval()
        with torch.no_grad():
            val_recon = float(model.loss(val)["reconstruction"])
        mean = {k: v / batches for k, v in totals.items()}
        print(f"{epoch:5d} {mean['loss']:9.4f} {mean['reconstruction']:9.4f} {mean['sparsity']:9.4f} "
              f"{mean['mean_activation']:9.4f} {val_recon:9.4f}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aefast", description="Fast autoencoder training.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backend runs where").set_defaults(fn=cmd_info)
    train = sub.add_parser("train", help="train an autoencoder on the bundled digits data")
    train.add_argument("model", choices=["sparse"], help="the model to train")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--hidden", type=int, default=64, help="hidden units")
    train.add_argument("--rho", type=float, default=0.05, help="target mean activation")
    train.add_argument("--beta", type=float, default=3.0, help="weight of the sparsity penalty")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--momentum", type=float, default=None,
                       help="estimate rho_hat as a moving average across batches")
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(fn=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError) as exc:
        print(f"aefast: error: {exc}", file=sys.stderr)
        return 2
