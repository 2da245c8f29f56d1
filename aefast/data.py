"""Training data that needs no download: scikit-learn's bundled 8x8 digits, a synthetic
superposition of known features, or any array file. Rows are flattened to (N, D)
float32; `image_shape` says how to view a row as an image (figures, conv models).
`ArrayFile` reads rows of an array on disk without loading it whole (aefast.batches
streams them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Dataset:
    name: str
    train: Tensor                       # (N_train, D) float32
    val: Tensor                         # (N_val, D) float32
    image_shape: tuple[int, int, int]   # (C, H, W) with C * H * W = D
    train_labels: Tensor | None = None  # (N_train,) int64, for the linear probe
    val_labels: Tensor | None = None
    features: Tensor | None = None      # (K, D) ground-truth features (synthetic data)
    # A transcoder's targets (--target): what the model predicts from each row of train/val.
    train_target: Tensor | None = None  # (N_train, D_out) float32
    val_target: Tensor | None = None


def load_dataset(source: str = "digits", val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """`digits`, `synthetic`, or the path of a .npy / .npz / .pt file holding an (N, D)
    or (N, C, H, W) array (.npz: arrays `x` and optionally `y` labels, else the first
    array; .pt: a tensor or a dict with `x` and optionally `y`). Split into train and
    validation rows by a permutation drawn from `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    features = None
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = torch.from_numpy(bunch.data).float().view(-1, 1, 8, 8) / 16.0, torch.from_numpy(bunch.target)
    elif source == "synthetic":
        x, y, features = synthetic_superposition(seed=seed)
        x = x.view(-1, 1, 8, 8)
    else:
        x, y = _read_array_file(Path(source))
    x, y = _check_array(x, y, source)
    image_shape = _image_shape(x)
    x = x.reshape(x.shape[0], -1)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * x.shape[0])))
    if n_val >= x.shape[0]:
        raise ValueError(f"{source}: {x.shape[0]} rows are too few to split off a validation set")
    val, train = order[:n_val], order[n_val:]
    return Dataset(Path(source).name, x[train], x[val], image_shape,
                   None if y is None else y[train], None if y is None else y[val], features)


def synthetic_superposition(n: int = 4000, n_features: int = 32, active: int = 3, side: int = 8,
                            seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(x, labels, features): each row is the mean of `active` of `n_features` sparse
    non-negative ground-truth patterns (side x side images, peak 1) with coefficients
    uniform in [0.2, 1], so x lies in [0, 1]; a row's label is its strongest feature.
    A good dictionary learner recovers the features (cosine similarity near 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    d = side * side
    features = (torch.rand(n_features, d, generator=g) < 0.2) * (0.5 + 0.5 * torch.rand(n_features, d, generator=g))
    features = features / features.amax(1, keepdim=True).clamp_min(1e-6)
    chosen = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    coefficients = torch.zeros(n, n_features).scatter_(1, chosen, 0.2 + 0.8 * torch.rand(n, active, generator=g))
    return coefficients @ features / active, coefficients.argmax(1), features


def _read_array_file(path: Path) -> tuple[object, object]:
    import numpy as np

    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt"):
        raise ValueError(f"data must be digits, synthetic or a .npy, .npz or .pt file, got {str(path)!r}")
    if not path.is_file():
        raise OSError(f"cannot read data file {str(path)!r}: no such file")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                if not arrays.files:
                    raise ValueError("it holds no array")
                return arrays["x" if "x" in arrays.files else arrays.files[0]], arrays.get("y")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # numpy, zipfile and pickle raise many kinds; all mean "unreadable"
        # Never numpy's own words: they suggest allow_pickle=True, which runs code from the file.
        why = {".pt": "not a torch.save file of a tensor or of a dict of tensors",
               ".npy": "corrupt, or not a .npy array of numbers",
               ".npz": "corrupt, or not a .npz archive of arrays of numbers"}[suffix]
        raise ValueError(f"cannot read data file {str(path)!r}: {why}") from None
    if isinstance(obj, dict):
        if "x" not in obj:
            raise ValueError(f"data file {str(path)!r} holds a dict without an 'x' entry")
        return obj["x"], obj.get("y")
    return obj, None


class ArrayFile:
    """An (N, D) or (N, C, H, W) array on disk, read by rows and never loaded whole: one
    .npy file, or a folder of .npy shards of one row shape and dtype (in name order; in
    its manifest's order, checked against it, for a folder `aefast activations` wrote).
    Rows are read with plain file reads into buffers the caller owns, so the process
    holds only what it asked for (the operating system's page cache keeps the rest,
    and gives it back under pressure). A 2-byte void dtype is bfloat16, which is how
    ml_dtypes (JAX) saves it: numpy has no bfloat16 of its own."""

    def __init__(self, path: str | Path):
        import numpy as np

        from aefast.activations import MANIFEST as MANIFEST_NAME
        from aefast.activations import read_manifest

        path = Path(path)
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is not None:  # `aefast activations` wrote it: its shards, in its order
            files = [path / name for name in manifest["shards"]]
            missing = [file.name for file in files if not file.is_file()]
            if missing or not files:
                raise ValueError(f"data folder {str(path)!r}: its manifest lists shards that are not there "
                                 f"({', '.join(missing[:3]) or 'none listed'}); to train on the shards present, "
                                 f"remove its {MANIFEST_NAME}")
        elif path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise ValueError(f"data folder {str(path)!r} holds no .npy shards")
        elif path.is_file():
            files = [path]
        else:
            raise OSError(f"cannot read data file {str(path)!r}: no such file or folder")
        self.name, self.files, self.starts, self.offsets = path.name, files, [0], []
        for file in files:
            shape, dtype, offset = _npy_header(file)
            if len(shape) not in (2, 4):
                raise ValueError(f"{file}: expected an (N, D) or (N, C, H, W) array, got shape {shape}")
            if file is files[0]:
                self.row_shape, self.numpy_dtype = shape[1:], dtype
            elif (shape[1:], dtype) != (self.row_shape, self.numpy_dtype):
                raise ValueError(f"{file}: rows of shape {shape[1:]} and dtype {dtype}, but "
                                 f"{files[0].name} has {self.row_shape} and {self.numpy_dtype}: shards must agree")
            if file.stat().st_size < offset + math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{file}: the file ends before the {shape[0]} rows its header announces (truncated?)")
            self.offsets.append(offset)
            self.starts.append(self.starts[-1] + shape[0])
        self.rows = self.starts[-1]
        if manifest is not None and self.rows != manifest["tokens"]:
            raise ValueError(f"data folder {str(path)!r}: its shards hold {self.rows} rows, its manifest says "
                             f"{manifest['tokens']}: the shards changed after `aefast activations` wrote them "
                             f"(to train on them as they are, remove its {MANIFEST_NAME})")
        self.dim = math.prod(self.row_shape)
        if self.dim == 0:
            raise ValueError(f"{files[0]}: rows of shape {self.row_shape} hold no values")
        self.row_bytes = self.dim * self.numpy_dtype.itemsize
        self.bfloat16 = self.numpy_dtype == np.dtype("V2")
        self.image_shape = _image_shape(torch.empty((0, *self.row_shape), dtype=torch.uint8))

    def read(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows [start, stop) as an (n, D) tensor of the file's dtype (bfloat16 for a
        2-byte void dtype), into `out` if given; an array of anything but floats comes
        back as numpy, for the caller's check to name what it holds."""
        import numpy as np

        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.rows} rows of {self.name}")
        if out is None:
            buffer = np.empty((stop - start, self.dim), dtype=np.uint16 if self.bfloat16 else self.numpy_dtype)
        else:
            buffer = (out.view(torch.int16) if self.bfloat16 else out).numpy()
            if buffer.shape != (stop - start, self.dim) or buffer.itemsize != self.numpy_dtype.itemsize:
                raise ValueError(f"out: expected ({stop - start}, {self.dim}) of {self.numpy_dtype}, got "
                                 f"{tuple(out.shape)} of {out.dtype}")
        for i, file in enumerate(self.files):
            low, high = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if low >= high:
                continue
            view = memoryview(buffer[low - start:high - start]).cast("B")
            with open(file, "rb") as f:
                f.seek(self.offsets[i] + (low - self.starts[i]) * self.row_bytes)
                if f.readinto(view) != len(view):
                    raise OSError(f"{file}: the file ended while reading rows (truncated while training?)")
        if out is not None:
            return out
        if self.bfloat16:
            return torch.from_numpy(buffer).view(torch.bfloat16)
        return torch.from_numpy(buffer) if buffer.dtype.kind == "f" else buffer

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype `read` returns: the file's, bfloat16 for a 2-byte void dtype."""
        import numpy as np

        return torch.bfloat16 if self.bfloat16 else torch.from_numpy(np.empty(0, self.numpy_dtype)).dtype


class PairedArrays:
    """Two arrays of the same rows read side by side, as one array whose row is the
    first's row then the second's: a transcoder's inputs and targets (`split` columns
    of input). The interface of ArrayFile that StreamedBatches reads."""

    def __init__(self, inputs: ArrayFile, targets: ArrayFile):
        if inputs.rows != targets.rows:
            raise ValueError(f"--target: {targets.name} has {targets.rows} rows, but {inputs.name} has "
                             f"{inputs.rows}: a target row for every input row")
        if inputs.torch_dtype != targets.torch_dtype:
            raise ValueError(f"--target: {targets.name} holds {targets.torch_dtype}, {inputs.name} "
                             f"{inputs.torch_dtype}: save both in one dtype")
        self.inputs, self.targets = inputs, targets
        self.name = f"{inputs.name} -> {targets.name}"
        self.rows, self.split = inputs.rows, inputs.dim
        self.dim, self.row_bytes = inputs.dim + targets.dim, inputs.row_bytes + targets.row_bytes
        self.image_shape = inputs.image_shape
        self.torch_dtype = inputs.torch_dtype

    def read(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        out = out if out is not None else torch.empty((stop - start, self.dim), dtype=self.torch_dtype)
        out[:, :self.split] = self.inputs.read(start, stop)
        out[:, self.split:] = self.targets.read(start, stop)
        return out


def _npy_header(file: Path) -> tuple[tuple[int, ...], object, int]:
    """(shape, dtype, offset of the data) of a .npy file, from its header alone."""
    import numpy as np

    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
    except Exception:  # bad magic, an unknown version, a header numpy cannot parse
        raise ValueError(f"cannot read data file {str(file)!r}: corrupt, or not a .npy array of numbers") from None
    if dtype.hasobject:
        raise ValueError(f"cannot read data file {str(file)!r}: it holds Python objects, not numbers")
    if not dtype.isnative and dtype.itemsize > 1:
        raise ValueError(f"{file}: the array's bytes are in {'big' if dtype.byteorder == '>' else 'little'}-endian "
                         f"order, not this machine's; save it with np.save(path, x.astype(x.dtype.newbyteorder('=')))")
    if fortran_order and len(shape) > 1:
        raise ValueError(f"{file}: the array is stored in Fortran order; save it with "
                         f"np.save(path, np.ascontiguousarray(x)) to read rows from disk")
    return shape, dtype, offset


def _check_array(x, y, source: str) -> tuple[Tensor, Tensor | None]:
    kind = getattr(getattr(x, "dtype", None), "kind", "f")  # numpy's: b bool, i/u integer, f float, ...
    if kind in "biufc" and (x.ndim not in (2, 4) or x.shape[0] < 2 or math.prod(x.shape) == 0):
        raise ValueError(f"{source}: expected an (N, D) or (N, C, H, W) array with N >= 2, got shape {tuple(x.shape)}")
    x = check_values(x, source)
    if y is not None:
        y = torch.as_tensor(y).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{source}: {y.shape[0]} labels for {x.shape[0]} rows")
    return x, y


def check_values(x, source: str) -> Tensor:
    """x (numpy or torch) as float32, if it holds real, finite floating-point numbers;
    otherwise an error that says what it holds instead."""
    kind = getattr(getattr(x, "dtype", None), "kind", "f")
    if kind not in "biufc":
        raise ValueError(f"{source}: expected an array of numbers, got {x.dtype} ({_KIND_WORDS.get(kind, 'not numbers')})")
    x = torch.as_tensor(x)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{source}: expected real numbers, got {x.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"{source}: the array holds integers ({x.dtype}, values {int(x.min())}..{int(x.max())}); "
                         f"save it as floats scaled to [0, 1] (e.g. x / 255 for 8-bit pixels)")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{source}: the array contains NaN or infinite values")
    return x


_KIND_WORDS = {"U": "strings", "S": "bytes", "O": "Python objects", "M": "dates", "m": "time spans", "V": "records"}


def _image_shape(x: Tensor) -> tuple[int, int, int]:
    if x.dim() == 4:
        return tuple(x.shape[1:])
    side = math.isqrt(x.shape[1])
    return (1, side, side) if side * side == x.shape[1] else (1, 1, x.shape[1])
