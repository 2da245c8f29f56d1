"""The `aefast` command (also `python -m aefast`): info, train, activations, study, bench."""

from __future__ import annotations

import argparse
import platform
import sys


def _cpu_flags() -> list[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return None


def _cpu_vector_isa() -> str:
    flags = _cpu_flags()
    if flags is None:
        return "unknown"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2+FMA" if {"avx2", "fma"} <= set(flags) else "baseline x86-64"


def _cpu_bfloat16_matmuls() -> str:
    """Whether the CPU multiplies bfloat16 matrices in hardware (AMX), which decides
    whether `aefast train --cpu-amp` pays. torch's own check also asks the OS for the
    AMX state (private; the CPU's flags where it is missing)."""
    import torch

    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    amx = bool(init_amx()) if init_amx is not None else "amx_bf16" in (_cpu_flags() or [])
    return ("AMX (aefast train --cpu-amp pays)" if amx
            else "no AMX (emulated: aefast train --cpu-amp would be slower than float32)")


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
    print(f"CPU bfloat16 matmuls: {_cpu_bfloat16_matmuls()}")
    print(f"backend asked for: {backends.current_backend()} (AEFAST_BACKEND or aefast.backend())")
    for device in ["cpu"] + (["cuda"] if cuda else []):
        try:
            choice = backends.resolve(torch.device(device))
        except RuntimeError as exc:
            choice = f"error: {exc}"
        print(f"  {device}: available {', '.join(aefast.available_backends(device))}; runs {choice}")
    return 0


def cmd_train(args) -> int:
    from pathlib import Path

    from aefast.train import config as configuration
    from aefast.train.loop import CHECKPOINT, EVALUATION, default_out_dir, load_checkpoint, train

    given = configuration.given_options(args)
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        out, checkpoint = Path(args.out), load_checkpoint(Path(args.out))
        config = configuration.resolve(args.model, given, args.config, saved=checkpoint["config"])
        done = len(checkpoint["history"])
        # --epochs equal to the epochs done only evaluates the run again, where that was stopped:
        # not mid-epoch (that would report part of the next epoch's training as `done` epochs).
        mid_epoch = bool((checkpoint.get("position") or {}).get("rows"))
        finished = done == config["epochs"] and ((out / EVALUATION).is_file() or mid_epoch)
        if config["epochs"] < done or finished:
            raise ValueError(f"--resume: the run in {out} has done {done} epochs; to train on, give --epochs "
                             f"above {done} (it is {config['epochs']})")
    else:
        config = configuration.resolve(args.model, given, args.config)
        out, checkpoint = Path(args.out) if args.out else default_out_dir(args.model), None
        if (out / CHECKPOINT).exists():
            raise ValueError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    train(config, out, checkpoint)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import aefast
    from aefast.train.config import add_train_arguments

    parser = _Parser(prog="aefast", description="Fast autoencoder training.")
    parser.add_argument("--version", action="version", version=f"aefast {aefast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backend runs where").set_defaults(fn=cmd_info)
    train = sub.add_parser(
        "train", help="train an autoencoder of the source notes (default data: the bundled digits)",
        description="Train one autoencoder, write its configuration, per-epoch metrics, checkpoint, "
                    "evaluation and figures to an output folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG)
    add_train_arguments(train)
    train.set_defaults(fn=cmd_train)
    activations = sub.add_parser(
        "activations", help="a language model's activations at one layer, as .npy shards for aefast train --data",
        description=activations_module().__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    activations.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                             help="a Hugging Face causal LM: a local folder, or a Hub name (downloaded)")
    activations.add_argument("--layer", type=int, required=True, metavar="N", help="decoder layer, from 0")
    activations.add_argument("--site", choices=activations_module().SITES, default="resid",
                             help="resid: the layer's output (residual stream); mlp_in, mlp_out: its MLP's "
                                  "input and output (default resid)")
    source = activations.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file; blank lines separate documents")
    source.add_argument("--dataset", metavar="NAME",
                        help="a Hugging Face dataset with a text column (streamed; needs the datasets package)")
    activations.add_argument("--tokens", type=int, required=True, metavar="N", help="activations (tokens) to write")
    activations.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    activations.add_argument("--context", type=int, default=128, metavar="N",
                             help="tokens per sequence, BOS included (default 128)")
    activations.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    activations.add_argument("--shard-tokens", type=int, default=2**18, metavar="N",
                             help="rows per .npy shard (default 262144)")
    activations.add_argument("--target-site", choices=activations_module().SITES,
                             help="also write this site's activations of the same tokens to OUT/target: a "
                                  "transcoder's targets (aefast train ... --data OUT --target OUT/target)")
    activations.add_argument("--target-layer", type=int, metavar="N", help="the target site's layer (default --layer)")
    activations.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    activations.set_defaults(fn=cmd_activations)
    study = sub.add_parser(
        "study", help="studies that answer a question with aefast's models: pretraining",
        description=study_module().__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("question", choices=["pretraining"],
                       help="pretraining: does autoencoder pretraining help a classifier, at 1%%, 10%% and "
                            "100%% of the labels, with and without BatchNorm?")
    study.add_argument("--data", default="digits",
                       help="digits (default) or a labelled .npz (arrays x, y) / .pt (dict with x, y) file")
    study.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per setting (default 3)")
    study.add_argument("--label-fractions", type=_fractions, default=(0.01, 0.1, 1.0), metavar="F,F",
                       help="fractions of the training labels the classifier sees (default 0.01,0.1,1)")
    study.add_argument("--inits", type=lambda text: tuple(p for p in text.split(",") if p),
                       default=study_module().INITS, metavar="NAME,NAME",
                       help="starting points, from: " + ", ".join(study_module().INITS) + " (default all)")
    study.add_argument("--pretrain-epochs", type=int, default=20, metavar="N",
                       help="epochs of autoencoder pretraining (default 20)")
    study.add_argument("--finetune-steps", type=int, default=400, metavar="N",
                       help="Adam steps of classifier training (default 400)")
    study.add_argument("--out", metavar="DIR", help="output folder (default runs/study-pretraining-YYYYmmdd-HHMMSS)")
    study.set_defaults(fn=cmd_study)
    bench = sub.add_parser(
        "bench", help="microbenchmarks of every operator against the eager and compiled reference",
        description=bench_module().__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_module().add_arguments(bench)
    bench.set_defaults(fn=lambda args: bench_module().main(args))
    return parser


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def activations_module():
    from aefast import activations

    return activations


def cmd_activations(args) -> int:
    from pathlib import Path

    from aefast.train.loop import _device

    manifest = activations_module().write_activations(
        args.model, args.layer, args.site, Path(args.out), args.tokens, text=args.text, dataset=args.dataset,
        context=args.context, batch_size=args.batch_size, shard_tokens=args.shard_tokens, device=_device(args.device),
        target_site=args.target_site, target_layer=args.target_layer)
    target = f" --target {args.out}/target" if args.target_site else ""
    print(f"wrote {manifest['tokens']:,} activations of {args.site} at layer {args.layer} (d_model "
          f"{manifest['d_model']}, mean norm {manifest['mean_norm']:.4g}) in {len(manifest['shards'])} shards to "
          f"{args.out}/{' (and the target site to ' + args.out + '/target/)' if target else ''}; train on them: "
          f"aefast train topk-sae --data {args.out}{target}")
    return 0


def study_module():
    from aefast.train import study

    return study


def cmd_study(args) -> int:
    import time
    from pathlib import Path

    study = study_module()
    out = Path(args.out) if args.out else Path("runs") / f"study-{args.question}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = study.run_study(args.data, args.seeds, args.label_fractions, args.inits, args.pretrain_epochs,
                             args.finetune_steps)
    paths = study.write(result, out)
    print(study.markdown(result), end="")
    print(f"wrote {out}/: " + ", ".join(path.name for path in paths))
    return 0


def bench_module():
    from aefast.bench import run

    return run


TRAIN_EPILOG = """\
output folder (--out DIR):
  config.toml        the configuration used (give it back with --config)
  metrics.jsonl      one JSON line per epoch: train and validation loss terms, seconds, samples/s,
                     peak memory
  checkpoint.pt      model, optimizers, random generators, history, the position in the epoch;
                     rewritten atomically each epoch, every --checkpoint-minutes and on Ctrl-C
  evaluation.json    validation MSE, linear-probe accuracy on the codes and on the raw inputs
                     (labelled data), feature recovery (synthetic data), the angle to PCA's
                     subspace (linear), what the decoder reads besides the code (conv); for
                     exactly sparse codes FVU, L0, dead and dense latents over every validation row
  reconstructions.png, filters.png (fully connected encoders), samples.png (vae, aae, gsn),
  sparsity.png (sparse, wta, the SAEs), density.png (wta, the SAEs: firing frequency per latent)

examples:
  aefast train sparse
  aefast train wta --conv --epochs 10
  aefast train topk-sae --data synthetic --k 3
  aefast train topk-sae --data acts/ --n-latents 16384 --k 32 --batch-size 4096 --epochs 1
  aefast train vae --out runs/vae --epochs 10 && aefast train vae --out runs/vae --epochs 20 --resume
  torchrun --nproc_per_node 2 -m aefast train sparse   (data-parallel: --batch-size is the global batch)
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as exc:
        message = " ".join(str(exc).split()).removeprefix("aefast: ")  # one line, always; the ops' own prefix once
        print(f"aefast: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aefast: interrupted (--resume continues from the last checkpoint)", file=sys.stderr)
        return 130
