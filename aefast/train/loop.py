"""The training loop: epochs of model.train_step over shuffled batches (aefast.batches:
in memory, or streamed from disk), validation, checkpoints (written atomically) from
which --resume continues exactly, then the final evaluation and the figures.

Exact resumption: the checkpoint holds the model, every optimizer, the epoch, the loss
history, the position in the current epoch and the states of every random generator
the run draws from (torch's CPU and CUDA generators, which the noise ops and the
initialisation use, and the shuffling generator, as it was when the epoch began).
Checkpoints are written after each epoch's validation, every --checkpoint-minutes
mid-epoch, and when Ctrl-C or SIGTERM stops the run; a resumed run sees the generators
exactly as the uninterrupted run did at that point.

Under torchrun the same loop trains data-parallel (aefast.train.distributed): each
process trains on its share of every global batch, rank 0 writes the files, and a
checkpoint of any world size resumes on any other."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aefast._files import replace_atomically, replace_text_atomically
from aefast._memory import freed_memory_kept
from aefast.activations import read_manifest, spliced_loss
from aefast.batches import StreamedBatches, open_training_data
from aefast.data import load_dataset
from aefast.models import AutoencoderModel
from aefast.models.topk_sae_sharded import LatentShardedTopKSAE
from aefast.train import config as configuration
from aefast.train.distributed import Cluster, launched_by_torchrun
from aefast.train.evaluate import evaluate, infer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
EVALUATION = "evaluation.json"


def default_out_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = out_dir / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: {out_dir} holds no {CHECKPOINT} to resume from")
    try:
        # Memory-mapped: a large SAE's tensors are read as they are loaded into the model.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None


def train(config: dict[str, Any], out_dir: Path, checkpoint: dict[str, Any] | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Train (or, given `checkpoint`, continue) the run described by `config`, writing
    into out_dir; returns the final evaluation. `progress`: show progress bars (None: only
    when stderr is a terminal). Under torchrun: one process of a data-parallel run
    (rank 0 writes the files and returns the evaluation, the others return {})."""
    cluster = Cluster.from_environment(config["device"], config["timeout"]) if launched_by_torchrun() else None
    try:
        if cluster is not None and config["shard_latents"]:
            cluster.split_latents(config["shard_latents"])
        # On CPU, each step's large tensors come from the heap, not from fresh mappings
        # faulted in again every step (aefast._memory).
        device = cluster.device if cluster else _device(config["device"])
        with freed_memory_kept(device):
            return _train(config, out_dir, checkpoint, progress, cluster, device)
    except RuntimeError as exc:  # gloo's failures are plain RuntimeErrors, NCCL's DistErrors
        if cluster is None:
            raise
        cluster.failed = True
        raise cluster.failure(exc) from None
    finally:
        if cluster is not None:
            cluster.close()


def _train(config: dict[str, Any], out_dir: Path, checkpoint: dict[str, Any] | None, progress: bool | None,
           cluster: Cluster | None, device: torch.device) -> dict[str, Any]:
    leader = cluster is None or cluster.leader
    data, batches = open_training_data(config["data"], config["val_fraction"], config["seed"],
                                       config["batch_size"], config["buffer_mib"], device, config["target"] or None)
    torch.manual_seed(config["seed"])
    try:
        model = _build_model(config, data.image_shape, cluster, _target_dim(data)).to(device)
    except ValueError as exc:
        raise configuration.named_as_flags(exc, config) from None
    check_data_range(model, data)
    if cluster is not None and not config["shard_latents"] and not model.data_parallel:
        raise ValueError(f"{config['model']}{' --conv' if config['conv'] else ''} trains on one process only "
                         f"({type(model).__name__}.data_parallel is False); start it without torchrun")
    if cluster is not None and cluster.replicas > 1:  # latent shards too: each replica its share of a batch
        cluster.check_batches(batches.rows, config["batch_size"])
    if config["grad_accum"] > 1 and not model.accumulates_gradients:
        raise ValueError(f"--grad-accum: {config['model']} takes several optimizer steps per batch "
                         f"({type(model).__name__}.train_step); it trains with --grad-accum 1 only")
    if config["amp"] and (device.type == "cuda" or config["cpu_amp"]):
        model.autocast_dtype = torch.bfloat16
    model.eval()
    with torch.no_grad(), model.autocast():  # a bad hyper-parameter fails here, before anything is written
        try:
            model.loss(_rows(data.train, data.train_target)[:config["batch_size"]].to(device))
        except ValueError as exc:
            raise configuration.named_as_flags(exc, config) from None
    optimizers = model.configure_optimizers(config["lr"])
    shuffle = torch.Generator().manual_seed(config["seed"])
    history: list[dict[str, Any]] = []
    position = _EpochPosition()
    if checkpoint is not None:
        # The optimizers' settings as configured now: a flag given on --resume (--lr) wins
        # over the saved state's.
        configured = {name: [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                      for name, optimizer in optimizers.items()}
        try:
            if isinstance(model, LatentShardedTopKSAE):  # this rank's part of the whole model
                model.load_whole_state(checkpoint["model"], checkpoint["optimizers"]["model"], optimizers["model"])
            else:
                model.load_state_dict(checkpoint["model"])
                for name, optimizer in optimizers.items():
                    optimizer.load_state_dict(checkpoint["optimizers"][name])
        except (RuntimeError, ValueError, KeyError) as exc:  # a flag changed the model's shape
            shaping = [k for k in config if k not in configuration.TRAINING or k in ("conv", "data", "target")]
            changed = configuration.changed_settings(checkpoint["config"], config, shaping)
            raise ValueError(f"--resume: the checkpoint's model does not fit the one configured now "
                             f"({'; '.join(changed) or exc}): resume with the run's own model settings") from None
        for name, optimizer in optimizers.items():
            for group, settings in zip(optimizer.param_groups, configured[name]):
                group.update(settings)
        history = checkpoint["history"]
        _set_rng_states(checkpoint["rng"], shuffle, device)
        position = _EpochPosition.restore(checkpoint.get("position"), config["batch_size"])
    if cluster is not None:
        _check_same_start(cluster, checkpoint is not None, history, position.rows)
        _seed_rank(cluster, config["seed"], checkpoint, position)
        if cluster.replica:  # the epoch's sums so far are counted once, by the first replica
            position.sums = {}

    if leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        configuration.write_toml(config, out_dir / CONFIG)
        replace_text_atomically(out_dir / METRICS, "".join(json.dumps(record) + "\n" for record in history))
    if config["compile"]:
        # The trainer calls loss(), not forward(); compiling the bound method leaves the
        # module (and so its state_dict and checkpoints) untouched.
        model.loss = torch.compile(model.loss)

    val_x = _rows(data.val, data.val_target).to(device)  # a transcoder's rows: input, then target
    n_params = sum(p.numel() for p in model.parameters())
    say = _say if leader else (lambda line: None)
    if history or position.rows:
        mid = f", {position.rows} rows into epoch {len(history) + 1}" if position.rows else ""
        say(f"resuming {out_dir} after epoch {len(history)} of {config['epochs']}{mid}"
            + ("; the training is done: evaluating it" if len(history) == config["epochs"] else ""))
    if checkpoint is not None:
        from_disk = isinstance(batches, StreamedBatches)
        changed = configuration.changed_settings(checkpoint["config"], config, configuration.DATA_SETTINGS
                                                 + (configuration.STREAM_SETTINGS if from_disk else ()))
        if not changed and checkpoint.get("train_rows", batches.rows) != batches.rows:  # the same flags, other data
            changed.append(f"the training rows {checkpoint['train_rows']} -> {batches.rows}")
        if changed:
            say(f"note: {'; '.join(changed)} since the run began: it goes on with other rows than it trained on, "
                f"not exactly as if never stopped")
        noted = configuration.DATA_SETTINGS + configuration.STREAM_SETTINGS + ("epochs",)
        others = configuration.changed_settings(  # not options newer than the checkpoint
            checkpoint["config"], config, [k for k in config if k not in noted and k in checkpoint["config"]])
        if others:
            say(f"note: {'; '.join(others)} since the run began: it goes on with the new value"
                f"{'s' if len(others) > 1 else ''}")
    streamed = (f" (streamed from disk, {min(batches.window_rows, batches.rows)} rows in memory at a time)"
                if isinstance(batches, StreamedBatches) else "")
    processes = ""
    if cluster:
        processes = f"; {cluster.world} processes, " + (f"{cluster.replicas} data-parallel replicas of {cluster.shards} "
                                                        f"latent shards (these parameters on each)"
                                                        if config["shard_latents"] else "data-parallel")
    say(f"{config['model']}{' --conv' if config['conv'] else ''} on {data.name}: {batches.rows} train{streamed} / "
        f"{len(val_x)} validation rows of {'x'.join(map(str, data.image_shape))}, {n_params:,} parameters, "
        f"{_backend(device)} on {device}{', bfloat16 autocast' if model.autocast_dtype else ''}{processes}; "
        f"writing {out_dir}")
    run = _Run(out_dir, config, model, optimizers, shuffle, history, data.image_shape, batches.rows, cluster)
    table = _EpochTable(say)
    for record in history:
        table.row(record)
    with _StopRequests() as stop:
        for epoch in range(len(history), config["epochs"]):
            phase = model.begin_epoch(epoch)
            run.epoch_start_shuffle = shuffle.get_state()
            train_terms, seconds = _train_epoch(run, batches, position, stop,
                                                f"epoch {epoch + 1}/{config['epochs']}" + (f" ({phase})" if phase else ""),
                                                progress if leader else False)
            with _failing_on_divergence(model, f"epoch {epoch + 1}, validation", out_dir):
                val_terms = _validate(model, val_x, config["batch_size"])
            _check_finite(train_terms, val_terms, epoch, out_dir)
            peak = _peak_memory_mib(device)
            record = {"epoch": epoch + 1, "train": train_terms, "val": val_terms,
                      "seconds": round(seconds, 4), "samples_per_s": round(batches.rows / seconds, 1),
                      "peak_memory_mib": round(cluster.max(peak) if cluster else peak, 1)}
            if phase:
                record["phase"] = phase
            history.append(record)
            position = _EpochPosition()
            run.save(position)
            if leader:
                with open(out_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
            table.row(record)
            if cluster.agree(stop.requested)[0] if cluster else stop.requested:
                raise KeyboardInterrupt

    if isinstance(model, LatentShardedTopKSAE):  # rank 0 evaluates the whole model
        whole = model.gather_state(optimizers["model"], cluster.latent_control) if cluster.replica == 0 else None
        if leader:
            model = configuration.build_model(config, data.image_shape, _target_dim(data)).to(device)
            model.load_state_dict(whole[0])
            model.eval()
    if not leader:
        return {}
    model.distribute(None)
    from aefast.train.figures import write_figures

    # Stopped from here on (Ctrl-C or SIGTERM), --resume does the evaluation again: it
    # is complete once EVALUATION is written, last.
    with _StopRequests(at_once=True):
        val = infer(model, val_x, config["batch_size"])
        result = evaluate(model, data, config["batch_size"], val)
        figures = write_figures(out_dir, model, data, val)
        _language_model_evaluation(config, model, device, result)
        replace_text_atomically(out_dir / EVALUATION, json.dumps(result, indent=2) + "\n")
    _say(_summary(result))
    _say(f"wrote {out_dir}/: {CONFIG}, {METRICS}, {CHECKPOINT}, {EVALUATION}, "
        + ", ".join(path.name for path in figures))
    return result


@dataclass
class _EpochPosition:
    """How far the current epoch has come: rows trained on, the sums of their loss
    terms, seconds spent. A checkpoint written mid-epoch holds it; --resume goes on
    from there."""

    rows: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def restore(cls, saved: dict[str, Any] | None, batch_size: int) -> _EpochPosition:
        if not saved:
            return cls()
        if saved["rows"] % batch_size:
            raise ValueError(f"--resume: the checkpoint was written {saved['rows']} rows into an epoch, which is "
                             f"not a whole number of batches of --batch-size {batch_size}: resume with the "
                             f"batch size the run had")
        return cls(saved["rows"], saved["sums"], saved["seconds"])


@dataclass
class _Run:
    """What a checkpoint holds, gathered once."""

    out_dir: Path
    config: dict[str, Any]
    model: AutoencoderModel
    optimizers: dict[str, torch.optim.Optimizer]
    shuffle: torch.Generator
    history: list[dict[str, Any]]
    image_shape: tuple[int, int, int]
    train_rows: int  # checked on --resume: a folder of shards can change under the same --data
    cluster: Cluster | None = None
    epoch_start_shuffle: torch.Tensor | None = None
    saved_at: float = field(default_factory=time.monotonic)

    def save(self, position: _EpochPosition) -> None:
        """Every rank calls it at the same point; rank 0 writes."""
        # Mid-epoch, the shuffling generator is saved as it was when the epoch began:
        # the resumed epoch draws the same order again and skips the rows done.
        shuffle = self.epoch_start_shuffle if position.rows else self.shuffle.get_state()
        rank_rngs, model_state, optimizer_states = None, None, None
        if isinstance(self.model, LatentShardedTopKSAE) and self.cluster.replica == 0:  # whole, on rank 0
            model_state, optimizer_state = (self.model.gather_state(self.optimizers["model"], self.cluster.latent_control)
                                            or (None, None))
            optimizer_states = {"model": optimizer_state}
        if self.cluster is not None:
            rank_rngs = self.cluster.gather(_generator_states(self.cluster.device))
            if position.rows:  # the epoch's sums so far, over every replica
                sums = _replicas_sum(self.cluster, position.sums)
                position = _EpochPosition(position.rows, {n: torch.tensor(v) for n, v in sums.items()},
                                          position.seconds)
        if self.cluster is None or self.cluster.leader:
            if model_state is None:
                model_state = self.model.state_dict()
                optimizer_states = {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}
            _save_checkpoint(self.out_dir, model_state, optimizer_states, shuffle, self.history, self.config,
                             self.image_shape, self.train_rows, rank_rngs, next(self.model.parameters()).device,
                             position)
        self.saved_at = time.monotonic()


def _train_epoch(run: _Run, batches, position: _EpochPosition, stop: _StopRequests, description: str,
                 progress: bool | None) -> tuple[dict[str, float], float]:
    """Train one epoch from `position` on; (the mean loss terms over its rows, seconds)."""
    from tqdm import tqdm

    model, config, cluster = run.model, run.config, run.cluster
    model.train()
    device = next(model.parameters()).device
    _reset_peak_memory(device)
    batch_size, accumulate = config["batch_size"], config["grad_accum"]
    every = config["checkpoint_minutes"] * 60
    sums = dict(position.sums)  # of this process's rows
    done, seconds, start = position.rows, position.seconds, time.perf_counter()  # done: global rows
    source = contextlib.closing(batches.epoch(run.shuffle, skip=done // batch_size))  # a step that raises stops the reader
    step_options: dict[str, Any] = {}
    shares = cluster is not None and cluster.replicas > 1  # data-parallel: each replica its share of the batch
    if shares:
        model.distribute(cluster.group)
        step_options["loss"] = cluster.wrap(model, model.loss)
    with source as epoch, tqdm(total=batches.rows, initial=done, desc=description, unit="row", unit_scale=True,
                               leave=False, file=sys.stderr, disable=None if progress is None else not progress,
                               dynamic_ncols=True) as bar:
        for step, group in enumerate(_groups(epoch, accumulate)):
            rows = sum(len(batch) for batch in group)
            if shares:
                group = [cluster.share(batch) for batch in group]
                step_options["mean_rows"] = rows / cluster.replicas
            group = [batch.to(device, non_blocking=True).float() for batch in group]
            if cluster is not None:
                cluster.where = f"{description}, step {step + 1}"
            with _failing_on_divergence(model, f"{description}, step {step + 1}", run.out_dir):
                terms = model.train_step(group, run.optimizers, **step_options)
            for name, value in terms.items():  # weighted by the rows they are the mean of
                sums[name] = sums.get(name, 0.0) + value.detach().float() * step_options.get("mean_rows", rows)
            done += rows
            due = done < batches.rows and time.monotonic() - run.saved_at >= every
            stop_now, save_now = cluster.agree(stop.requested, due and cluster.leader) if cluster else (stop.requested, due)
            bar.update(rows)
            if step % 10 == 0 and not bar.disable:  # reading the sums waits for the GPU: not every step
                shown = done / cluster.replicas if shares else done  # rank 0's rows, about
                bar.set_postfix({**{name: f"{float(v) / shown:.4g}" for name, v in sums.items()},
                                 "peak": f"{_peak_memory_mib(device):.0f}MiB"}, refresh=False)
            if done < batches.rows and (stop_now or save_now):
                # A diverged state must not replace the last good checkpoint.
                diverged = not (all(bool(torch.isfinite(v)) for v in sums.values()) and _parameters_finite(model))
                if cluster.agree(diverged)[0] if cluster else diverged:
                    raise _diverged(f"{description}, step {step + 1}",
                                    "the training loss or the parameters are no longer finite", run.out_dir)
                run.save(_EpochPosition(done, sums, seconds + time.perf_counter() - start))
                if stop_now:
                    raise KeyboardInterrupt
    if cluster is not None:
        cluster.where = f"{description}, after its last step (validation, checkpoint)"
    if shares:
        model.distribute(None)
        sums = _replicas_sum(cluster, sums)
    return {name: float(value) / batches.rows for name, value in sums.items()}, seconds + time.perf_counter() - start


def _groups(batches, size: int):
    """Lists of `size` consecutive batches (the last may be shorter): one optimizer step each."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class _StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM while training ends the run after the step in
    progress, with a checkpoint of that point, instead of abandoning a half-done
    optimizer step; a second signal ESCALATE_AFTER seconds or more after the first
    stops at once. Sooner it is the same request again: under torchrun every worker
    gets the terminal's Ctrl-C or a scheduler's SIGTERM (sent to the whole job) and
    then the same signal forwarded by torchrun, milliseconds apart. `at_once`: the
    first stops at once (SIGTERM too, which would otherwise kill the process without a
    word). Only in the main thread (the only one that may set signal handlers)."""

    ESCALATE_AFTER = 1.0

    def __init__(self, at_once: bool = False):
        self._previous = {}
        self._first = -math.inf if at_once else None  # when the first request came

    @property
    def requested(self) -> bool:
        return self._first is not None

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self._first = now
        elif now - self._first >= self.ESCALATE_AFTER:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: the peak resident set (VmHWM) := the resident set now
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mib(device: torch.device) -> float:
    """The peak memory since the epoch began: the GPU's allocated, or on the CPU the
    process's resident set (Linux; elsewhere its peak over the whole run). On the CPU
    freed memory is kept by the process (aefast._memory), so the resident set does not
    fall between epochs: in effect the peak of the run so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def _validate(model: AutoencoderModel, x: torch.Tensor, batch_size: int) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        with model.autocast():
            terms = model.loss(batch)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(batch)
    return {name: value / len(x) for name, value in sums.items()}


def _save_checkpoint(out_dir: Path, model_state: dict, optimizer_states: dict, shuffle: torch.Tensor, history, config,
                     image_shape, train_rows: int, rank_rngs: list[dict] | None, device: torch.device,
                     position: _EpochPosition) -> None:
    state = {
        "epoch": len(history),
        "image_shape": list(image_shape),
        "train_rows": train_rows,
        "model": model_state,
        "optimizers": optimizer_states,
        "rng": {"torch": torch.get_rng_state(), "shuffle": shuffle,
                "cuda": _generator_states(device)["cuda"],  # the training GPU's alone: it resumes on any machine
                "ranks": rank_rngs or []},  # data-parallel: each process's torch generator, in rank order
        "history": history,
        "position": {"rows": position.rows, "sums": position.sums, "seconds": position.seconds}
                    if position.rows else None,
        "config": config,
    }
    replace_atomically(out_dir / CHECKPOINT, lambda file: torch.save(state, file))


def check_data_range(model: AutoencoderModel, data) -> None:
    """Models that reconstruct through a sigmoid, or score pixels as Bernoulli, need data
    in [0, 1]: anything else trains to nonsense (or NaN) without an error."""
    if not model.unit_interval_data:
        return
    low, high = float(min(data.train.min(), data.val.min())), float(max(data.train.max(), data.val.max()))
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{data.name}: values lie in [{low:g}, {high:g}], but {type(model).__name__} reconstructs "
                         f"through a sigmoid: scale the data to [0, 1] (e.g. (x - x.min()) / (x.max() - x.min()))")


def _check_finite(train_terms: dict[str, float], val_terms: dict[str, float], epoch: int, out_dir: Path) -> None:
    """A loss that became NaN or infinite ends the run; the last good checkpoint stays
    as it was (this epoch's is not written)."""
    bad = [f"{part} {name} = {value}" for part, terms in (("training", train_terms), ("validation", val_terms))
           for name, value in terms.items() if not math.isfinite(value)]
    if bad:
        raise _diverged(f"epoch {epoch + 1}", ", ".join(bad), out_dir)


def _diverged(where: str, what: str, out_dir: Path) -> ValueError:
    path = out_dir / CHECKPOINT
    kept = f"the last good checkpoint, {path}, is kept" if path.is_file() else "no checkpoint was written"
    return ValueError(f"{where}: {what}: training diverged (try a smaller --lr); {kept}")


@contextlib.contextmanager
def _failing_on_divergence(model: torch.nn.Module, where: str, out_dir: Path):
    """An op's error on non-finite input (a top-k of NaN pre-activations) from parameters
    that diverged says so, instead of blaming the data."""
    try:
        yield
    except (ValueError, RuntimeError):
        if not _parameters_finite(model):
            raise _diverged(where, "the parameters are no longer finite", out_dir) from None
        raise


def _parameters_finite(model: torch.nn.Module) -> bool:
    """One host synchronisation: called only before a checkpoint or after a failed step."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def load_run(run_dir: str | Path) -> tuple[AutoencoderModel, dict[str, Any]]:
    """The trained model of an `aefast train` output folder (in eval mode, on the CPU) and
    its configuration: `model, config = aefast.load_run("runs/sparse-...")`."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ValueError(f"{run_dir} holds no {CHECKPOINT}: not an aefast train output folder")
    checkpoint = load_checkpoint(run_dir)
    config = checkpoint["config"]
    image_shape = checkpoint.get("image_shape")
    if image_shape is None:  # a run written before the shape was saved: ask its data
        image_shape = load_dataset(config["data"], config["val_fraction"], config["seed"]).image_shape
    n_out = checkpoint["model"]["decoder_weight"].shape[1] if config.get("target") else None
    model = configuration.build_model(config, tuple(image_shape), n_out)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config


def _replicas_sum(cluster: Cluster, sums: dict[str, Any]) -> dict[str, float]:
    """Loss sums over the data-parallel replicas (the shards of one replica hold the
    same: summed over every rank and divided by their number, in one collective)."""
    return {name: value / cluster.shards for name, value in
            cluster.sum({name: float(value) for name, value in sums.items()}).items()}


def _language_model_evaluation(config: dict[str, Any], model: AutoencoderModel, device: torch.device,
                               result: dict[str, Any]) -> None:
    """For activations written by `aefast activations`: the language model's loss with
    the model spliced in, added to `result`. A failure here (no transformers, a model
    not at hand) is recorded, not fatal."""
    try:
        manifest = read_manifest(config["data"]) if Path(config["data"]).is_dir() else None
        target = read_manifest(config["target"]) if config["target"] and Path(config["target"]).is_dir() else None
        if manifest is None or (config["target"] and target is None):  # a transcoder needs both sites' manifests
            return
        result.update(spliced_loss(manifest, model, device=device, target_manifest=target))
    except Exception as exc:  # after the training: whatever went wrong here must not cost the rest
        result["lm_eval_error"] = " ".join(str(exc).split())
        _say(f"the language-model evaluation failed: {result['lm_eval_error']}")


def _rows(x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The rows a model's loss reads: x, or a transcoder's x then its target."""
    return x if target is None else torch.cat([x, target], dim=1)


def _target_dim(data) -> int | None:
    return None if data.val_target is None else data.val_target.shape[1]


def _build_model(config: dict[str, Any], image_shape, cluster: Cluster | None, n_out: int | None) -> AutoencoderModel:
    """The run's model; with --shard-latents, this rank's part of it."""
    if not config["shard_latents"]:
        return configuration.build_model(config, image_shape, n_out)
    if n_out is not None:
        raise ValueError("--shard-latents does not train transcoders (--target) yet")
    if config["model"] != "topk-sae":
        raise ValueError(f"--shard-latents splits a top-k SAE's latents over the processes; not {config['model']}")
    if cluster is None:
        raise ValueError(f"--shard-latents {config['shard_latents']} splits the latents over processes: start the "
                         f"run with torchrun (torchrun --nproc_per_node N -m aefast train topk-sae --shard-latents N "
                         f"...), or give --shard-latents 0 to train on one process")
    params = {key: config[key] for key in configuration.MODELS["topk-sae"].params}
    return LatentShardedTopKSAE(math.prod(image_shape), **params, rank=cluster.shard, world=cluster.shards,
                                latent_group=cluster.latent_group)


def _check_same_start(cluster: Cluster, resumed: bool, history: list[dict[str, Any]], rows: int) -> None:
    """Every process reads OUT/checkpoint.pt itself (on several nodes, each node's own
    copy): one that found none, or another run's or an older one, would train on other
    batches with other optimizer state, silently (DDP copies rank 0's weights alone)."""
    digest = hashlib.sha256(json.dumps(history, sort_keys=True).encode()).hexdigest()[:12]
    starts = cluster.gather((resumed, len(history), rows, digest))
    if len(set(starts)) > 1:
        found = "; ".join(f"rank {rank}: " + (f"{epochs} epochs and {done} rows done, history {its_digest}"
                                               if its_resumed else "no checkpoint")
                          for rank, (its_resumed, epochs, done, its_digest) in enumerate(starts))
        raise ValueError(f"--resume: the processes found different checkpoints in the output folder ({found}): "
                         "every node must read the same checkpoint.pt (a shared folder, or copies of rank 0's)")


def _seed_rank(cluster: Cluster, seed: int, checkpoint: dict[str, Any] | None, position: _EpochPosition) -> None:
    """Each process its own noise (rank 0 keeps the generator a one-process run has):
    the state it had when the checkpoint was written when the world size is the same,
    else one derived from the seed, the rank and the run's position."""
    if cluster.rank == 0:  # restored from the checkpoint's own generators, as one process is
        return
    saved = (checkpoint or {}).get("rng", {}).get("ranks") or []
    if len(saved) == cluster.world:
        torch.set_rng_state(saved[cluster.rank]["cpu"])
        if saved[cluster.rank]["cuda"] is not None and cluster.device.type == "cuda":
            torch.cuda.set_rng_state(saved[cluster.rank]["cuda"], cluster.device)
        return
    epochs = len(checkpoint["history"]) if checkpoint else 0
    torch.manual_seed(hash((seed, cluster.rank, epochs, position.rows)) % 2**63)  # seeds CUDA's too


def _generator_states(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's torch generators: the CPU's and its GPU's (the noise ops draw there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_states(states: dict[str, Any], shuffle: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    shuffle.set_state(states["shuffle"])
    cuda = states["cuda"]
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list):  # checkpoints before 2026-12-07 hold every visible GPU's generator
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _backend(device: torch.device) -> str:
    from aefast import backends

    try:
        return f"backend {backends.resolve(device)}"
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def _summary(result: dict[str, Any]) -> str:
    parts = [f"validation MSE {result['val_mse']:.5f}"]
    if "probe_accuracy" in result:
        parts.append(f"linear probe accuracy {result['probe_accuracy']:.3f} on the codes, "
                     f"{result['raw_probe_accuracy']:.3f} on the raw inputs")
    if "feature_recovery" in result:
        parts.append(f"feature recovery {result['feature_recovery']:.3f} (mean best cosine)")
    if "pca_largest_angle" in result:
        parts.append(f"largest principal angle to PCA's subspace {result['pca_largest_angle']:.2f} degrees "
                     f"(PCA's validation MSE {result['pca_val_mse']:.5f})")
    if "fvu" in result:
        fvu = "undefined (one validation row)" if result["fvu"] is None else f"{result['fvu']:.4f}"
        parts.append(f"FVU {fvu}, L0 {result['l0']:.1f}, {result['dead_fraction']:.1%} of the latents "
                     f"dead and {result['dense_fraction']:.1%} dense over {result['density_rows']} rows")
    if "loss_recovered" in result:
        parts.append(f"next-token loss {result['lm_loss_clean']:.4f} clean, {result['lm_loss_spliced']:.4f} with the "
                     f"reconstruction spliced in, {result['lm_loss_ablated']:.4f} zero-ablated: "
                     f"{result['loss_recovered']:.1%} of the loss recovered")
    if "side_channel" in result:
        parts.append(f"the decoder also reads the {result['side_channel']}, besides the {result['code_size']} code values")
    return "evaluation: " + "; ".join(parts)


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # to stdout, keeping the line clear of an open progress bar


class _EpochTable:
    """One line per epoch: the training loss terms, then the validation loss and
    reconstruction, then the phase (stacked pretraining) if any."""

    columns: list[tuple[str, str]] | None = None

    def __init__(self, say=None):
        self.say = say or _say

    def row(self, record: dict[str, Any]) -> None:
        if self.columns is None:
            val = ["loss"] + (["reconstruction"] if "reconstruction" in record["val"] else [])
            self.columns = [("train", k) for k in record["train"]] + [("val", k) for k in val]
            self.names = [k if part == "train" else f"val {k}" for part, k in self.columns]
            self.widths = [max(11, len(name)) for name in self.names]
            self.say(f"{'epoch':>5}" + "".join(f" {name:>{w}}" for name, w in zip(self.names, self.widths)))
        # A space before every cell and 5 significant digits (at most 11 characters, e.g.
        # -1.2346e+06): the columns stay apart for any magnitude.
        cells = "".join(f" {record[part][k]:>{w}.5g}" for (part, k), w in zip(self.columns, self.widths))
        self.say(f"{record['epoch']:5d}{cells}" + (f"  {record['phase']}" if "phase" in record else ""))
