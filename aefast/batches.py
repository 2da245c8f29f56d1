"""Where the trainer's batches come from: rows held in memory, shuffled whole each epoch,
or an array on disk (`aefast.data.ArrayFile`) read in shuffled windows by a background
thread, so that resident memory stays bounded whatever the size of the file.

Both draw an epoch's order from a generator the caller owns and yield the epoch's
batches from batch `skip` on: given the generator's state at the start of the epoch,
a resumed epoch yields exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from aefast.data import ArrayFile, Dataset, check_values

# A window is read as this many chunks of consecutive rows, taken in a random order
# over the whole file: a row's batch-mates come from chunks far apart in the file.
CHUNKS_PER_WINDOW = 8
# Batches made ahead of the training step (the reader runs while the step computes).
PREFETCH_BATCHES = 2


class InMemoryBatches:
    """Batches of `x` (already on its device) in an order drawn afresh each epoch."""

    def __init__(self, x: Tensor, batch_size: int):
        self.x, self.batch_size, self.rows = x, batch_size, len(x)

    def epoch(self, generator: torch.Generator, skip: int = 0) -> Iterator[Tensor]:
        order = torch.randperm(self.rows, generator=generator).to(self.x.device)
        for start in range(skip * self.batch_size, self.rows, self.batch_size):
            yield self.x[order[start:start + self.batch_size]]


class StreamedBatches:
    """Batches of rows [0, rows) of an ArrayFile, read in windows of `window_rows`.

    An epoch permutes the file's chunks (window_rows / CHUNKS_PER_WINDOW consecutive rows
    each), reads CHUNKS_PER_WINDOW of them at a time into one window, and cuts batches
    from a random permutation of the window's rows; a batch that the end of a window cuts
    short is completed from the next window, so every batch but the epoch's last has
    `batch_size` rows. A background thread reads the next window while the trainer
    works, PREFETCH_BATCHES batches ahead; it holds one window and those batches, never
    more. Batches come as float32 for the CPU, or, for a CUDA `device`, in the file's
    dtype in pinned memory (the caller converts on the GPU, after a transfer half the size).
    """

    def __init__(self, array: ArrayFile, rows: int, batch_size: int, window_rows: int,
                 device: torch.device | None = None):
        self.array, self.rows, self.batch_size = array, rows, batch_size
        self.device = device or torch.device("cpu")
        self.chunk_rows = max(1, window_rows // CHUNKS_PER_WINDOW)
        self.window_rows = self.chunk_rows * CHUNKS_PER_WINDOW
        self.largest_window_rows = 0  # the most rows a window has held (the tests check the bound)

    def epoch(self, generator: torch.Generator, skip: int = 0) -> Iterator[Tensor]:
        seed = int(torch.randint(2**62, (), generator=generator))
        chunks = torch.randperm(math.ceil(self.rows / self.chunk_rows),
                                generator=torch.Generator().manual_seed(seed)).tolist()
        windows = [chunks[i:i + CHUNKS_PER_WINDOW] for i in range(0, len(chunks), CHUNKS_PER_WINDOW)]
        batches: queue.Queue = queue.Queue(PREFETCH_BATCHES)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(windows, seed, skip * self.batch_size, batches, stop),
                                  name="aefast-batch-reader", daemon=True)
        reader.start()
        try:
            while (item := batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the consumer stops early: the reader must not wait on a full queue
            stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):
                    batches.get(timeout=0.05)

    def _read(self, windows, seed: int, skip_rows: int, batches: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            pending: list[Tensor] = []  # rows of a batch that a window's end cut short
            pending_rows, seen = 0, 0
            for w, chunks in enumerate(windows):
                spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.rows)) for c in chunks]
                size = sum(stop_ - start for start, stop_ in spans)
                if seen + size <= skip_rows:  # resuming: this window was used up before the interruption
                    seen += size
                    continue
                window = torch.empty((size, self.array.dim), dtype=self.array.torch_dtype)
                filled = 0
                for start, stop_ in spans:  # straight into the window: no second copy of it
                    self.array.read(start, stop_, out=window[filled:filled + stop_ - start])
                    filled += stop_ - start
                self.largest_window_rows = max(self.largest_window_rows, len(window))
                order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1 + w))
                order = order[max(0, skip_rows - seen):]
                seen += size
                position = 0
                while position < len(order):
                    take = order[position:position + self.batch_size - pending_rows]
                    pending.append(window[take])
                    pending_rows += len(take)
                    position += len(take)
                    if pending_rows == self.batch_size:
                        if not put(self._finish(pending)):
                            return
                        pending, pending_rows = [], 0
                del window
            if pending and not put(self._finish(pending)):
                return
            put(None)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(exc)

    def _finish(self, pieces: list[Tensor]) -> Tensor:
        batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.device.type == "cuda":
            return batch.pin_memory()
        return batch.float()


def open_training_data(source: str, val_fraction: float, seed: int, batch_size: int, buffer_mib: int,
                       device: torch.device, target: str | None = None
                       ) -> tuple[Dataset, InMemoryBatches | StreamedBatches]:
    """The run's data: a Dataset (validation rows, and the training rows, or for a
    streamed array a sample of them, for the evaluation) and the source of its training
    batches. `.npy` files and folders of `.npy` shards are streamed from disk, holding
    about 1.5 x `buffer_mib` of data in memory whatever their size: the last rows (a
    `val_fraction` of them, at most a quarter of the buffer as float32) are the
    validation set, the rest train; the first training rows (as many) are the sample.
    Everything else is loaded (aefast.data.load_dataset). With `target` (a second
    streamed array of the same rows: a transcoder's targets) each batch row is the
    input's row then the target's, and the Dataset holds the targets apart."""
    from pathlib import Path

    from aefast.data import PairedArrays, load_dataset

    path = Path(source)
    streamed = path.suffix.lower() == ".npy" or path.is_dir()
    if target and (not streamed or not (Path(target).suffix.lower() == ".npy" or Path(target).is_dir())):
        raise ValueError("--target (a transcoder's targets) needs --data and --target both a .npy file or a folder "
                         "of .npy shards, of the same rows")
    if not streamed or source in ("digits", "synthetic"):
        data = load_dataset(source, val_fraction, seed)
        return data, InMemoryBatches(data.train.to(device), batch_size)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    array = PairedArrays(ArrayFile(path), ArrayFile(target)) if target else ArrayFile(path)
    window_rows = max(CHUNKS_PER_WINDOW, buffer_mib * 2**20 // max(1, array.row_bytes))
    # The validation rows and the training sample (for the data checks and the
    # evaluation) stay in memory as float32: each at most a quarter of the buffer.
    held_rows = max(1, buffer_mib * 2**20 // 4 // (4 * array.dim))
    n_val = min(max(1, round(val_fraction * array.rows)), held_rows)
    n_train = array.rows - n_val
    if n_train < 1:
        raise ValueError(f"{source}: {array.rows} rows are too few to split off a validation set")
    sample = check_values(array.read(0, min(n_train, held_rows)), source)
    val = check_values(array.read(n_train, array.rows), source)
    if target:
        data = Dataset(array.name, sample[:, :array.split], val[:, :array.split], array.image_shape,
                       train_target=sample[:, array.split:], val_target=val[:, array.split:])
    else:
        data = Dataset(array.name, sample, val, array.image_shape)
    return data, StreamedBatches(array, n_train, batch_size, window_rows, device)
