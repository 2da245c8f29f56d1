"""Activations of a Hugging Face causal language model, for SAE training, and the
language-model loss with an SAE spliced in.

`aefast activations` runs the model over a text, takes one site of one layer, and
writes float16 `.npy` shards plus `manifest.json`; `aefast train --data DIR` streams the
shards, and when the folder has a manifest the evaluation adds the next-token loss of
the model clean, with the SAE's reconstruction spliced in at that site, and with the
site zeroed (`spliced_loss`).

The token stream (the recipe of SAELens and sparsify): the text's documents (blocks
separated by blank lines) tokenized without special tokens, joined by the end-of-text
token, cut into sequences of context - 1 tokens, each preceded by BOS. The BOS
position, whose activations are outliers many times the others' norm, is left out of
the shards, and left alone when splicing.

Sites of decoder layer N: `resid` the residual stream after the layer (its output),
`mlp_in` the MLP's input (after the layer's norm), `mlp_out` the MLP's output."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aefast._files import replace_atomically, replace_text_atomically

SITES = ("resid", "mlp_in", "mlp_out")
MANIFEST = "manifest.json"
FORMAT = "aefast-activations/1"
# Where the decoder layers live in the architectures transformers ships (Llama, Mistral,
# Qwen, Gemma: model.layers; GPT-2: transformer.h; Pythia: gpt_neox.layers; OPT).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def load_language_model(name: str, device: torch.device):
    """(model, tokenizer) from a local folder or a Hub name, in eval mode; bfloat16 on a
    GPU, float32 on the CPU."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("aefast activations needs Hugging Face transformers: pip install 'aefast[hf]'") from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        raise ValueError(f"--model {name}: {' '.join(str(exc).split())}") from None
    return model.to(device).eval(), tokenizer


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings take, where its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in LAYER_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})")


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    if site not in SITES:
        raise ValueError(f"--site must be one of {', '.join(SITES)}, got {site!r}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"--layer must be in [0, {len(layers) - 1}] for this model, got {layer}")
    block = layers[layer]
    if site == "resid":
        return block
    if not isinstance(getattr(block, "mlp", None), nn.Module):
        raise ValueError(f"--site {site}: layer {layer} ({type(block).__name__}) has no .mlp")
    return block.mlp


def _forward_order(layer: int, site: str) -> tuple[int, int]:
    """Where a site's activations appear in a decoder's forward pass: a layer's MLP input,
    its MLP output, then its output (the residual stream)."""
    return layer, ("mlp_in", "mlp_out", "resid").index(site)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, first):
    return (first, *value[1:]) if isinstance(value, tuple) else first


@contextlib.contextmanager
def at_site(model: nn.Module, layer: int, site: str, edit=None) -> Iterator[list[Tensor]]:
    """While open, each forward pass appends the site's activations (B, T, D) to the
    yielded list; `edit(activations) -> activations` (if given) replaces them."""
    seen: list[Tensor] = []
    module = site_module(model, layer, site)

    def read(value):
        seen.append(_first(value).detach())
        return _with_first(value, edit(_first(value))) if edit is not None else None

    if site == "mlp_in":
        handle = module.register_forward_pre_hook(lambda mod, args: read(args))
    else:
        handle = module.register_forward_hook(lambda mod, args, output: read(output))
    try:
        yield seen
    finally:
        handle.remove()


def read_documents(text: str | None, dataset: str | None) -> Iterator[str]:
    """Documents of a text file (separated by blank lines) or of a Hugging Face dataset's
    train split (its `text` column, streamed)."""
    if text is not None:
        with open(text, encoding="utf-8") as f:
            document: list[str] = []
            for line in f:
                if line.strip():
                    document.append(line)
                elif document:
                    yield "".join(document)
                    document = []
            if document:
                yield "".join(document)
        return
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset needs the Hugging Face datasets package (pip install datasets), "
                         "or give --text FILE") from None
    for row in datasets.load_dataset(dataset, split="train", streaming=True):
        yield row["text"]


def token_sequences(tokenizer, documents: Iterator[str], context: int) -> Iterator[list[int]]:
    """Sequences of `context` token ids: BOS, then the next context - 1 tokens of the
    documents joined by the end-of-text token."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an end-of-text token to begin sequences with")
    if context < 2:
        raise ValueError(f"--context must be >= 2 (BOS and one token), got {context}")
    pending: list[int] = []
    for document in documents:
        pending += tokenizer(document, add_special_tokens=False)["input_ids"] + [separator]
        start = 0  # a cursor, trimmed once per document: slicing per sequence is quadratic in its length
        while len(pending) - start >= context - 1:
            yield [bos] + pending[start:start + context - 1]
            start += context - 1
        del pending[:start]


def _batches(sequences: Iterator[list[int]], size: int) -> Iterator[Tensor]:
    batch = []
    for sequence in sequences:
        batch.append(sequence)
        if len(batch) == size:
            yield torch.tensor(batch)
            batch = []
    if batch:
        yield torch.tensor(batch)


class _ShardWriter:
    """Rows of one site's activations, written as float16 shards of `shard_tokens` rows
    into `out`; the manifest last, atomically."""

    def __init__(self, out: Path, shard_tokens: int):
        out.mkdir(parents=True, exist_ok=True)
        if (out / MANIFEST).exists() or any(out.glob("*.npy")):
            raise ValueError(f"{out} already holds activations: choose an empty --out folder")
        self.out, self.shard_tokens = out, shard_tokens
        self.shards: list[str] = []
        self.pending: list[np.ndarray] = []
        self.pending_rows = self.written = 0
        self.norm_sum = 0.0

    def add(self, acts: Tensor) -> None:
        self.norm_sum += float(acts.float().norm(dim=1).sum())
        half = acts.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError(f"{self.out}: activations beyond float16's range (largest magnitude "
                             f"{float(acts.float().abs().max()):.4g}): this site cannot be stored as float16")
        self.pending.append(half.cpu().numpy())
        self.pending_rows += len(acts)
        while self.pending_rows >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self.pending)
        name = f"shard{len(self.shards):05d}.npy"
        replace_atomically(self.out / name, lambda file: np.save(file, block[:rows]))  # on disk before the manifest
        self.shards.append(name)
        self.written += rows
        self.pending, self.pending_rows = [block[rows:]], len(block) - rows

    def finish(self, about: dict[str, Any]) -> dict[str, Any]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        manifest = {"format": FORMAT, **about, "tokens": self.written,
                    "d_model": int(np.load(self.out / self.shards[0], mmap_mode="r").shape[1]), "dtype": "float16",
                    "mean_norm": self.norm_sum / self.written, "shards": self.shards}
        replace_text_atomically(self.out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: the set is whole
        return manifest


@torch.no_grad()
def write_activations(model_name: str, layer: int, site: str, out: Path, tokens: int, text: str | None = None,
                      dataset: str | None = None, context: int = 128, batch_size: int = 16,
                      shard_tokens: int = 2**18, device: torch.device | None = None, progress: bool | None = None,
                      target_site: str | None = None, target_layer: int | None = None) -> dict[str, Any]:
    """Run `model_name` over the text until `tokens` activations (BOS positions left
    out) of `site` at `layer` are written to `out` as float16 shards of `shard_tokens`
    rows; the manifest, written last, describes them. Returns the manifest. With
    `target_site` (at `target_layer`, default `layer`), the same rows of that site go to
    out/target in the same pass: a transcoder's targets (aefast train --target)."""
    from tqdm import tqdm

    if (text is None) == (dataset is None):
        raise ValueError("give one of --text FILE or --dataset NAME")
    if context < 2:
        raise ValueError(f"--context must be >= 2 (BOS and one token), got {context}")
    for name, value, low in (("--tokens", tokens, 1), ("--batch-size", batch_size, 1),
                             ("--shard-tokens", shard_tokens, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_language_model(model_name, device)
    positions = max_positions(model)
    if positions is not None and context > positions:
        raise ValueError(f"--context {context} is longer than the {positions} positions {model_name} takes")
    sites = [(layer, site, out)]
    if target_site is not None:
        sites.append((layer if target_layer is None else target_layer, target_site, out / "target"))
        if _forward_order(*sites[1][:2]) <= _forward_order(layer, site):
            raise ValueError(f"--target-site {target_site} at layer {sites[1][0]} must come after --site {site} at "
                             f"layer {layer} in the forward pass: a transcoder predicts a later site from an earlier")
    for at_layer, at, _ in sites:  # a bad --layer or --site fails before anything is written
        site_module(model, at_layer, at)
    writers = [_ShardWriter(folder, shard_tokens) for _, _, folder in sites]
    sequences = 0
    with contextlib.ExitStack() as hooks, \
            tqdm(total=tokens, unit="tok", unit_scale=True, disable=None if progress is None else not progress) as bar:
        seen = [hooks.enter_context(at_site(model, at_layer, at)) for at_layer, at, _ in sites]
        for ids in _batches(token_sequences(tokenizer, read_documents(text, dataset), context), batch_size):
            model(input_ids=ids.to(device))
            sequences += len(ids)
            take = tokens - writers[0].written - writers[0].pending_rows
            for writer, acts in zip(writers, seen):
                writer.add(acts.pop()[:, 1:].flatten(0, 1)[:take])  # BOS left out
            bar.update(min(take, len(ids) * (context - 1)))
            if take <= len(ids) * (context - 1):
                break
    if writers[0].written + writers[0].pending_rows == 0:
        raise ValueError("the text gave no complete sequence of --context tokens: give more text or a smaller --context")
    local = Path(model_name)
    about = {"model": str(local.resolve()) if local.exists() else model_name, "context": context, "sequences": sequences,
             "text": str(Path(text).resolve()) if text else None, "dataset": dataset}
    manifests = [writer.finish({**about, "layer": at_layer, "site": at})
                 for writer, (at_layer, at, _) in zip(writers, sites)]
    return manifests[0]


# What the readers of a manifest use (ArrayFile, spliced_loss).
MANIFEST_KEYS = ("tokens", "shards", "model", "context", "sequences", "text", "dataset", "layer", "site")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of an `aefast activations` folder, or None for other data (a
    folder without one, or with another tool's manifest.json)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({' '.join(str(exc).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{path}: the manifest lacks {', '.join(missing)}")
    return manifest


@torch.no_grad()
def spliced_loss(manifest: dict[str, Any], sae: nn.Module, sequences: int = 32, batch_size: int = 8,
                 device: torch.device | None = None, target_manifest: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Next-token loss (mean cross-entropy, nats) of the manifest's model on `sequences`
    sequences of its text that follow the ones the activations came from (held out;
    the first ones when the text has no more), three ways: clean, with the site's
    activations replaced by `sae.reconstruct` of them, and with them zeroed (BOS
    position untouched in both). loss_recovered = (ablated - spliced) / (ablated - clean).
    A transcoder (`target_manifest`: its targets' site): the target site's activations
    are replaced by the transcoder's prediction from the input site's, in the same pass."""
    device = device or next(sae.parameters()).device
    if target_manifest is not None and any(target_manifest.get(key) != manifest.get(key)
                                           for key in ("model", "context", "text", "dataset")):
        raise ValueError("--target's activations come from another model or text than --data's")
    model, tokenizer = load_language_model(manifest["model"], device)
    if manifest.get("text") is None and manifest.get("dataset") is None:
        raise ValueError("the manifest names no text to evaluate on")
    stream = token_sequences(tokenizer, read_documents(manifest.get("text"), manifest.get("dataset")),
                             manifest["context"])
    # the sequences after those the activations came from (skipped, not kept)
    chosen = list(itertools.islice(stream, manifest["sequences"], manifest["sequences"] + sequences))
    held_out = bool(chosen)
    if not held_out:  # the text has no more: the first sequences
        chosen = list(itertools.islice(token_sequences(tokenizer, read_documents(
            manifest.get("text"), manifest.get("dataset")), manifest["context"]), sequences))
    sae_dtype = next(sae.parameters()).dtype
    replaced = target_manifest or manifest  # the site whose activations the model's output replaces
    inputs: list[Tensor] = []  # a transcoder's input site, seen earlier in the same pass

    def splice(acts: Tensor) -> Tensor:
        if target_manifest is not None and not inputs:
            raise ValueError(f"the transcoder's input site ({manifest['site']}, layer {manifest['layer']}) does not run "
                             f"before its target ({replaced['site']}, layer {replaced['layer']}) in the forward pass")
        source = inputs.pop() if target_manifest is not None else acts
        flat = source[:, 1:].flatten(0, 1).to(sae_dtype)
        rebuilt = torch.cat([sae.reconstruct(flat[i:i + 4096]) for i in range(0, len(flat), 4096)])
        return torch.cat([acts[:, :1], rebuilt.to(acts.dtype).view_as(acts[:, 1:])], dim=1)

    def zero(acts: Tensor) -> Tensor:
        return torch.cat([acts[:, :1], torch.zeros_like(acts[:, 1:])], dim=1)

    losses = {}
    sae.eval()
    for name, edit in (("clean", None), ("spliced", splice), ("ablated", zero)):
        total, count = 0.0, 0
        for ids in _batches(iter(chosen), batch_size):
            ids = ids.to(device)
            with contextlib.ExitStack() as hooks:
                if target_manifest is not None and edit is splice:
                    inputs = hooks.enter_context(at_site(model, manifest["layer"], manifest["site"]))
                hooks.enter_context(at_site(model, replaced["layer"], replaced["site"], edit))
                logits = model(input_ids=ids).logits.float()
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
        losses[name] = total / count
    gap = losses["ablated"] - losses["clean"]
    return {"lm_loss_clean": losses["clean"], "lm_loss_spliced": losses["spliced"],
            "lm_loss_ablated": losses["ablated"],
            "loss_recovered": (losses["ablated"] - losses["spliced"]) / gap if gap else math.nan,
            "lm_eval_sequences": len(chosen), "lm_eval_held_out": held_out}
