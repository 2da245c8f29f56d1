"""Every trainable model with its defaults, and how a run's configuration is assembled:
built-in defaults, then --config FILE.toml, then command-line flags (on --resume the
run's saved configuration replaces the defaults, and flags still override it).

A configuration is one flat dict: the model's name, the training settings common to all
models (TRAINING) and the model's own hyper-parameters (ModelSpec.params), which are the
keyword arguments of its class."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aefast import models
from aefast._files import replace_text_atomically
from aefast.reference import CORRUPTION_KINDS

TRAINING: dict[str, Any] = {
    "epochs": 30,
    "batch_size": 64,
    "grad_accum": 1,
    "lr": 3e-3,
    "seed": 0,
    "data": "digits",
    "val_fraction": 0.2,
    "device": "auto",
    "amp": True,
    "cpu_amp": False,
    "compile": False,
    "conv": False,
    "buffer_mib": 256,
    "checkpoint_minutes": 10.0,
    "timeout": 300.0,
    "shard_latents": 0,
    "target": "",
}

TRAINING_HELP = {
    "epochs": "passes over the training rows",
    "batch_size": "rows per forward pass (also the chunk size of validation and codes)",
    "grad_accum": "batches whose gradients add up to one optimizer step (a step sees grad_accum x batch_size "
                  "rows, memory stays that of one batch)",
    "lr": "Adam learning rate",
    "seed": "seed of the initialisation, the noise, the shuffling and the train/validation split",
    "data": "digits (scikit-learn's 8x8 digits, scaled to [0, 1]), synthetic (a sparse superposition "
            "of known features), a .npz/.pt file of an (N, D) or (N, C, H, W) array (loaded), or a .npy "
            "file or a folder of .npy shards of one (float16, bfloat16 or float32, float64 at twice the bytes; streamed from disk, "
            "its last rows held out for validation)",
    "val_fraction": "fraction of the rows held out for validation",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "amp": "bfloat16 autocast on GPU (--no-amp for float32; CPU runs are float32 unless --cpu-amp)",
    "cpu_amp": "bfloat16 autocast on a CPU too (with --amp): worth it where the CPU multiplies bfloat16 in "
               "hardware (AMX): a topk-sae step at 1024 x 768 -> 16384 took 57 against 130 ms in float32 on a "
               "2-thread Xeon with AMX; where bfloat16 matmuls are emulated it is slower (aefast info says which)",
    "compile": "wrap the model's loss in torch.compile",
    "conv": "the convolutional form of the model (wta)",
    "buffer_mib": "streamed data: MiB of rows in memory at once (a shuffling window, read by a background "
                  "thread; it also bounds the validation rows)",
    "checkpoint_minutes": "also write a checkpoint mid-epoch after this many minutes (besides each epoch's end, "
                          "and Ctrl-C or SIGTERM, which stop after the current step; 0: after every step)",
    "timeout": "under torchrun: seconds a collective may wait for the other processes before every process "
               "ends with an error naming its rank and step (a process that died ends the others at once)",
    "target": "a transcoder: a second streamed array (.npy or folder of shards) of the same rows as --data, "
              "which the model predicts from --data (topk-sae, batchtopk-sae, matryoshka-sae); empty: none",
    "shard_latents": "topk-sae under torchrun: split the latents over N processes (latent-parallel: each holds "
                     "1/N of the encoder and decoder and sees its replica's whole batch); the processes form "
                     "world / N data-parallel replicas of N shards each; 0: data-parallel only",
}

PARAM_HELP = {
    "layers": "encoder widths, the last one the code size, comma-separated",
    "hidden": "hidden units",
    "pretrain_epochs": "epochs of greedy pretraining per layer before fine-tuning the stack",
    "kind": "corruption: gaussian, masking, salt_pepper or dropout",
    "level": "corruption strength (noise std, or fraction of inputs corrupted)",
    "rho": "target mean activation",
    "beta": "weight of the KL sparsity penalty",
    "weight_decay": "L2 penalty on the weights, inside the loss (UFLDL's lambda)",
    "momentum": "estimate rho_hat as a moving average across batches with this weight",
    "latent": "code size",
    "lam": "weight of the contractive (Jacobian) penalty",
    "channels": "channels of the convolutional layers, comma-separated",
    "kernel_size": "convolution kernel size",
    "decoder_kernel_size": "kernel size of the deconvolution decoder",
    "walkback": "walkback steps of the chain per example",
    "sample_steps": "chain steps per sample",
    "rate": "lifetime sparsity: fraction of the batch each unit fires for",
    "discriminator_hidden": "hidden units of the discriminator's two layers",
    "prior_std": "standard deviation of the Gaussian prior on codes",
    "n_latents": "latents (dictionary size)",
    "k": "active latents per example",
    "k_aux": "dead latents used by the AuxK loss",
    "aux_coef": "weight of the AuxK loss",
    "dead_steps": "steps without firing after which a latent counts as dead",
    "tied": "tied weights: each decoder layer uses its encoder layer's weight transposed",
    "switches": "unpool at the encoder's max-pool positions (Masci's switches: the decoder reads them besides "
                "the code); --no-switches repeats each pooled value, so the code alone reconstructs",
    "prefixes": "Matryoshka: the nested dictionary sizes, comma-separated, increasing to --n-latents "
                "(default: an eighth, a quarter, half and all of it)",
    "l0_coef": "weight of the L0 penalty (active latents per row)",
    "bandwidth": "width of the rectangle kernel of JumpReLU's straight-through gradients",
    "threshold": "initial JumpReLU threshold of every latent",
    "pool": "max-pooling of the feature maps the codes are read from after training (the paper's classifier input)",
}

NONE_SHOWN = {"prefixes": "n/8,n/4,n/2,n"}  # what a default of None stands for, where it is not "off"
PARAM_TYPES: dict[str, type] = {"momentum": float, "prefixes": list}  # where the default (None) does not tell


def _at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


_POSITIVE = (lambda v: 0 < v < math.inf), "> 0"
_NONNEGATIVE = (lambda v: 0 <= v < math.inf), ">= 0"
_OPEN_UNIT = (lambda v: 0 < v < 1), "in (0, 1)"
_UNIT_RIGHT_CLOSED = (lambda v: 0 < v <= 1), "in (0, 1]"
_ODD = (lambda v: v >= 1 and v % 2 == 1), "odd and >= 1 (same padding keeps an odd kernel's image size)"

# The values each option may take, checked wherever a value comes from (a flag, the
# --config file, a resumed run's configuration), the flag named in the message. A list's
# test applies to each of its elements.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": _at_least(1),
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "buffer_mib": _at_least(1),
    "checkpoint_minutes": _NONNEGATIVE,
    "timeout": _POSITIVE,
    "shard_latents": _at_least(0),
    "lr": _POSITIVE,
    "seed": ((lambda v: 0 <= v < 2**63), "in [0, 2**63)"),
    "val_fraction": _OPEN_UNIT,
    "device": ((lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", v) is not None),
               "auto, cpu, cuda or cuda:N"),
    "layers": _at_least(1),
    "hidden": _at_least(1),
    "pretrain_epochs": _at_least(0),
    "kind": ((lambda v: v in CORRUPTION_KINDS), f"one of {', '.join(CORRUPTION_KINDS)}"),
    "level": _NONNEGATIVE,
    "rho": _OPEN_UNIT,
    "beta": _NONNEGATIVE,
    "weight_decay": _NONNEGATIVE,
    "momentum": _UNIT_RIGHT_CLOSED,
    "latent": _at_least(1),
    "lam": _NONNEGATIVE,
    "channels": _at_least(1),
    "kernel_size": _ODD,
    "decoder_kernel_size": _ODD,
    "walkback": _at_least(1),
    "sample_steps": _at_least(1),
    "rate": _UNIT_RIGHT_CLOSED,
    "discriminator_hidden": _at_least(1),
    "prior_std": _POSITIVE,
    "n_latents": _at_least(1),
    "k": _at_least(1),
    "k_aux": _at_least(0),
    "aux_coef": _NONNEGATIVE,
    "dead_steps": _at_least(1),
    "pool": _at_least(1),
    "prefixes": _at_least(1),
    "l0_coef": _NONNEGATIVE,
    "bandwidth": _POSITIVE,
    "threshold": _POSITIVE,
}


@dataclass(frozen=True)
class ModelSpec:
    summary: str
    build: Callable[..., models.AutoencoderModel]  # build(image_shape, **params)
    params: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)  # overrides of TRAINING
    check: Callable[[dict[str, Any]], None] | None = None  # of a whole configuration


def pretrained_layers(config: dict[str, Any]) -> int:
    """The layers a layer-wise model (stacked, conv) pretrains one at a time."""
    return len(config.get("layers") or config["channels"])


def _reaches_fine_tuning(config: dict[str, Any]) -> None:
    """Greedy pretraining takes pretrain_epochs per layer; the epochs after it fine-tune."""
    layers, per_layer = pretrained_layers(config), config["pretrain_epochs"]
    if config["epochs"] <= layers * per_layer:
        raise ValueError(
            f"{config['model']}: --epochs {config['epochs']} ends before fine-tuning: greedy pretraining takes {layers} "
            f"layers x --pretrain-epochs {per_layer} = {layers * per_layer} epochs; give --epochs above "
            f"{layers * per_layer} or a smaller --pretrain-epochs")


def _flat(cls) -> Callable[..., models.AutoencoderModel]:
    return lambda image_shape, **params: cls(math.prod(image_shape), **params)


def _images(cls) -> Callable[..., models.AutoencoderModel]:
    return lambda image_shape, **params: cls(image_shape, **params)


MODELS: dict[str, ModelSpec] = {
    "linear": ModelSpec("linear autoencoder: the PCA baseline (linear layers, squared error)",
                        _flat(models.LinearAutoencoder), {"hidden": 16, "tied": False},
                        {"epochs": 200, "lr": 1e-2}),
    "ae": ModelSpec("autoencoder: MLP to an undercomplete code", _flat(models.Autoencoder),
                    {"layers": [128, 32], "tied": False}),
    "stacked": ModelSpec("stacked autoencoder: greedy layer-wise pretraining, then fine-tuning",
                         _flat(models.StackedAutoencoder), {"layers": [128, 32], "pretrain_epochs": 10, "tied": False},
                         {"epochs": 60}, check=_reaches_fine_tuning),
    "denoising": ModelSpec("denoising autoencoder: reconstruct x from a corrupted copy",
                           _flat(models.DenoisingAutoencoder),
                           {"hidden": 128, "kind": "masking", "level": 0.3, "tied": False}),
    "sparse": ModelSpec("sparse autoencoder: overcomplete sigmoid code with the KL(rho || rho_hat) penalty (UFLDL)",
                        _flat(models.SparseAutoencoder),
                        {"hidden": 128, "rho": 0.05, "beta": 3.0, "weight_decay": 1e-4, "momentum": None,
                         "tied": False},
                        {"epochs": 60, "lr": 2e-2}),
    "vae": ModelSpec("variational autoencoder: Gaussian posterior, reparameterisation",
                     _flat(models.VariationalAutoencoder), {"hidden": 128, "latent": 16}),
    "contractive": ModelSpec("contractive autoencoder: penalise the encoder's Jacobian",
                             _flat(models.ContractiveAutoencoder), {"hidden": 128, "lam": 0.1, "tied": False}),
    "conv": ModelSpec("stacked convolutional autoencoder: conv + max-pool, unpool + conv, layer-wise (Masci 2011)",
                      _images(models.ConvAutoencoder),
                      {"channels": [16, 32], "kernel_size": 3, "pretrain_epochs": 10, "switches": True},
                      check=_reaches_fine_tuning),
    "gsn": ModelSpec("generative stochastic network: walkback-trained denoising chain that samples",
                     _flat(models.GSN), {"hidden": 256, "kind": "salt_pepper", "level": 0.3, "walkback": 3,
                                         "sample_steps": 30, "tied": False}),
    "wta": ModelSpec("winner-take-all autoencoder, fully connected: lifetime sparsity (--conv: spatial)",
                     _flat(models.WTAAutoencoder), {"hidden": 256, "rate": 0.05, "tied": False}),
    "wta-conv": ModelSpec("winner-take-all autoencoder, convolutional: spatial + lifetime sparsity",
                          _images(models.ConvWTAAutoencoder),
                          {"channels": [32, 32], "kernel_size": 5, "decoder_kernel_size": 7, "rate": 0.2, "pool": 2}),
    "aae": ModelSpec("adversarial autoencoder: a discriminator matches the codes to a Gaussian prior",
                     _flat(models.AdversarialAutoencoder),
                     {"hidden": 128, "latent": 8, "discriminator_hidden": 64, "prior_std": 1.0},
                     {"epochs": 50, "lr": 1e-3}),
    "topk-sae": ModelSpec("top-k sparse autoencoder: k active latents, AuxK, unit-norm decoder",
                          _flat(models.TopKSAE),
                          {"n_latents": 256, "k": 8, "k_aux": 32, "aux_coef": 1 / 32, "dead_steps": 100}),
    "batchtopk-sae": ModelSpec("BatchTopK sparse autoencoder: the k * B largest activations of the batch, "
                               "a threshold at inference", _flat(models.BatchTopKSAE),
                               {"n_latents": 256, "k": 8, "k_aux": 32, "aux_coef": 1 / 32, "dead_steps": 100}),
    "matryoshka-sae": ModelSpec("Matryoshka BatchTopK SAE: nested dictionaries, each reconstructing on its own",
                                _flat(models.MatryoshkaSAE),
                                {"n_latents": 256, "k": 8, "k_aux": 32, "aux_coef": 1 / 32, "dead_steps": 100,
                                 "prefixes": None}),
    "jumprelu-sae": ModelSpec("JumpReLU SAE: a learned threshold per latent, an L0 penalty, straight-through "
                              "gradients", _flat(models.JumpReLUSAE),
                              {"n_latents": 256, "l0_coef": 0.01, "bandwidth": 0.05, "threshold": 0.1}),
}

CONV_SUFFIX = "-conv"
MODEL_NAMES = [name for name in MODELS if not name.endswith(CONV_SUFFIX)]


def spec_name(model: str, conv: bool) -> str:
    if not conv:
        return model
    if model + CONV_SUFFIX not in MODELS:
        convolutional = [n.removesuffix(CONV_SUFFIX) for n in MODELS if n.endswith(CONV_SUFFIX)]
        raise ValueError(f"--conv applies to {', '.join(convolutional)} only, not {model}")
    return model + CONV_SUFFIX


def defaults(model: str, conv: bool = False) -> dict[str, Any]:
    spec = MODELS[spec_name(model, conv)]
    return {"model": model, **TRAINING, "conv": conv, **spec.training, **spec.params}


def resolve(model: str, overrides: dict[str, Any], config_file: str | None = None,
            saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's configuration: `saved` (a resumed run's) or the model's defaults, then
    the TOML file's values, then `overrides` (the flags given)."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_NAMES)}")
    from_file = read_toml(config_file) if config_file else {}
    if from_file.pop("model", model) != model:
        raise ValueError(f"{config_file} is a configuration for another model than {model}")
    if saved is not None and saved["model"] != model:
        raise ValueError(f"the run to resume trained {saved['model']}, not {model}")
    given = {**from_file, **overrides}
    conv = _coerce("conv", given["conv"], False) if "conv" in given else bool(saved and saved["conv"])
    config = {**defaults(model, conv), **(saved or {})}
    for key, value in given.items():
        if key not in config:
            where = f"{config_file}: key {key!r}" if key in from_file and key not in overrides else _flag(key)
            raise ValueError(f"{where} does not apply to model {spec_name(model, conv)} "
                             f"(its options: {', '.join(_flag(k) for k in config if k != 'model')})")
        config[key] = _coerce(key, value, config[key])
    spec = MODELS[spec_name(model, conv)]
    if spec.check is not None:
        spec.check(config)
    return config


TRANSCODERS = ("topk-sae", "batchtopk-sae", "matryoshka-sae")  # the models that take n_out (--target)


def build_model(config: dict[str, Any], image_shape: tuple[int, int, int],
                n_out: int | None = None) -> models.AutoencoderModel:
    """The configured model; `n_out`: a transcoder predicting n_out values (--target)."""
    spec = MODELS[spec_name(config["model"], config["conv"])]
    params = {key: config[key] for key in spec.params}
    if n_out is not None:
        if config["model"] not in TRANSCODERS:
            raise ValueError(f"--target trains a transcoder: {', '.join(TRANSCODERS)}, not {config['model']}")
        params["n_out"] = n_out
    return spec.build(tuple(image_shape), **params)


# ---------------------------------------------------------------- TOML


def read_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None


def write_toml(config: dict[str, Any], path: Path) -> None:
    """The flat configuration as TOML, readable back with --config (None values, which
    TOML cannot hold, are left out: they are the defaults)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [f"{key} = {value(v)}" for key, v in config.items() if v is not None]
    replace_text_atomically(path, "\n".join(lines) + "\n")  # a resumed run's: whole or as it was


def _coerce(key: str, value: Any, default: Any) -> Any:
    """`value` (from TOML or a flag) checked against the type of `default`."""
    kind = PARAM_TYPES.get(key, type(default))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }.get(kind, True)
    if value is None and default is None:
        ok = True
    if not ok:
        raise ValueError(f"{_flag(key)} must be {_TYPE_WORDS.get(kind, kind.__name__)}, got {value!r}")
    value = float(value) if kind is float and value is not None else (list(value) if kind is list else value)
    test, words = RANGES.get(key, (None, ""))
    if test is not None and value is not None and not all(test(v) for v in (value if kind is list else [value])):
        shown = ",".join(map(str, value)) if kind is list else value
        raise ValueError(f"{_flag(key)} must be {words}{' (each)' if kind is list else ''}, got {shown}")
    return value


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a non-empty list of integers"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def changed_settings(saved: dict[str, Any], config: dict[str, Any], keys) -> list[str]:
    """`--key saved -> now` for each of `keys` whose value a resumed run changed."""
    return [f"{_flag(key)} {_shown(saved.get(key))} -> {_shown(config[key])}"
            for key in keys if saved.get(key) != config[key]]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# What the rows are and their order: changing one on --resume trains on other rows than
# the run did. STREAM_SETTINGS: the same for streamed data (--buffer-mib sets the chunks an
# epoch permutes, so mid-epoch some rows would come twice and others not at all, and caps
# the validation rows).
DATA_SETTINGS = ("data", "target", "val_fraction", "seed")
STREAM_SETTINGS = ("buffer_mib",)


def named_as_flags(exc: ValueError, config: dict[str, Any]) -> ValueError:
    """A model's or an op's check names the argument (`k_aux must be ...`); the user of
    the command line set a flag, so the error names that (`--k-aux must be ...`)."""
    message = str(exc)
    name = message.split(" ", 1)[0]
    if name in MODELS[spec_name(config["model"], config["conv"])].params:
        return ValueError(_flag(name) + message[len(name):])
    return exc


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `aefast train` arguments. Every option defaults to 'not given', so that
    resolve() can layer flags over the TOML file and the saved run."""
    parser.add_argument("model", choices=MODEL_NAMES, metavar="MODEL",
                        help="one of: " + "; ".join(f"{n} ({MODELS[n].summary})" for n in MODEL_NAMES))
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output folder (default runs/MODEL-YYYYmmdd-HHMMSS)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out DIR from its last checkpoint, exactly as if never stopped "
                          "(its saved configuration is used; flags still override, e.g. a larger --epochs)")
    run.add_argument("--config", metavar="FILE.toml",
                     help="settings as TOML keys (names of the flags below with _ for -); flags override them; "
                          "a run's config.toml can be given back here")
    common = parser.add_argument_group("training (all models; per-model defaults in brackets)")
    for key, default in TRAINING.items():
        shown = f" (default {'on' if default is True else 'off' if default is False else default})"
        _add_option(common, key, default, TRAINING_HELP[key] + shown + _model_defaults(key, training=True))
    params = parser.add_argument_group("model hyper-parameters (the models that use each, with its default)")
    seen: dict[str, Any] = {}
    for spec in MODELS.values():
        for key, default in spec.params.items():
            seen.setdefault(key, default)
    for key, default in seen.items():
        _add_option(params, key, default, PARAM_HELP[key] + _model_defaults(key, training=False))


def _model_defaults(key: str, training: bool) -> str:
    parts = []
    for name, spec in MODELS.items():
        label = name.removesuffix(CONV_SUFFIX) + (" --conv" if name.endswith(CONV_SUFFIX) else "")
        if training and key in spec.training:
            parts.append(f"{label}: {spec.training[key]}")
        elif not training and key in spec.params:
            value = spec.params[key]
            shown = ",".join(map(str, value)) if isinstance(value, list) else \
                NONE_SHOWN.get(key, "off") if value is None else value
            parts.append(f"{label}: {shown}")
    return f" [{'; '.join(parts)}]" if parts else ""


def _add_option(group, key: str, default: Any, text: str) -> None:
    if isinstance(default, bool):
        group.add_argument(_flag(key), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        return
    kind = PARAM_TYPES.get(key, type(default))
    kind = _int_list if kind is list else kind
    metavar = {int: "N", float: "X", _int_list: "N,N"}.get(kind, key.upper())
    group.add_argument(_flag(key), type=kind, default=argparse.SUPPRESS, metavar=metavar, help=text)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training and model options present on the command line."""
    keys = set(TRAINING) | {key for spec in MODELS.values() for key in spec.params}
    return {key: value for key, value in vars(args).items() if key in keys}
