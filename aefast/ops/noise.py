"""The noise-injection family: corrupt, noisy_linear and reparameterize.

Every random number is Philox4x32-10 of (seed, element index) (see
csrc/include/aefast/philox.h): the seed is the only state, so a backward
regenerates the noise instead of saving it, and every backend draws the same
numbers. The seed travels as a 0-dim int64 tensor on the input's device, made
there by a fill (seed_tensor): no host-to-device copy waits for the GPU, and
torch.compile traces it.

Kernels: csrc/cpu/noise.cpp, csrc/cuda/noise.cu, triton_kernels/noise.py.
noisy_linear is a Python composite for cpp and cuda (the C++ corrupt, then
F.linear, with a backward that regenerates corrupt(x)); on CPU it corrupts x one
window at a time just before the matmul of that window (corrupt_window), so the
corrupted input never exists whole; with Triton, one matmul kernel corrupts the
tiles of x as it loads them where its dot runs on tensor cores (bfloat16, float16,
TF32), and Triton's corrupt feeds PyTorch's matmul at full float32 precision (on a
GPU's FMA units the fused kernel ran at 14% of cuBLAS's rate).
"""

from __future__ import annotations

import functools
import glob
import numbers
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor

from aefast import reference
from aefast.ops._declare import (
    CPP,
    Bench,
    dense_like,
    kernel,
    kernels,
    linear_flops,
    nbytes,
    operator,
    triton_launcher,
)
from aefast.ops.checks import (
    argument,
    autocast_inputs,
    check_finite,
    check_float_dtype,
    check_linear_params,
    check_tensor,
    without_values,
)

KINDS = reference.CORRUPTION_KINDS


def _triton():
    from aefast.triton_kernels import noise

    return noise


def _kind(kind: str) -> int:
    """The kind as the Triton kernels take it: its index in KINDS."""
    return KINDS.index(kind)


def _corrupt_grad(corrupt, grad: Tensor, kind: str, level: float, seed: Tensor) -> Tensor:
    """The gradient through corrupt: identity for gaussian; otherwise the same mask
    (and dropout's scale) applied to the gradient: corrupt with low = high = 0."""
    return grad if kind == "gaussian" else corrupt(grad, kind, level, seed, 0.0, 0.0)


# ---------------------------------------------------------------- kernels


def _corrupt_setup(ctx, inputs, output):
    _, ctx.kind, ctx.level, seed, _, _ = inputs
    ctx.save_for_backward(seed)


def _corrupt_backward(ops, ctx, grad):
    (seed,) = ctx.saved_tensors
    return _corrupt_grad(ops.corrupt, grad, ctx.kind, ctx.level, seed), None, None, None, None, None


# kind is gaussian, masking, salt_pepper or dropout; seed a 0-dim int64 tensor on the
# input's device. The backward is corrupt itself applied to the gradient (same seed,
# same mask).
kernel(
    "corrupt(Tensor x, str kind, float level, Tensor seed, float low, float high) -> Tensor",
    fake=lambda x, kind, level, seed, low, high: dense_like(x),
    reference=reference.corrupt,
    native=CPP,
    triton=lambda x, kind, level, seed, low, high: _triton().corrupt(x, _kind(kind), level, seed, low, high),
    setup=_corrupt_setup, backward=_corrupt_backward,
)


def _corrupt_window_reference(x, row_offset, col_offset, row_length, kind, level, seed, low, high):
    whole = x.new_zeros(row_offset + x.shape[0], row_length)
    window = (slice(row_offset, None), slice(col_offset, col_offset + x.shape[1]))
    whole[window] = x
    return reference.corrupt(whole, kind, level, seed, low, high)[window]


# corrupt(x) of a window x (R, C) of a row-major matrix with row_length columns, at
# (row_offset, col_offset): each element draws by its index in the whole matrix.
# CPU only; the CPU noisy_linear's building block (no autograd of its own).
kernel(
    "corrupt_window(Tensor x, int row_offset, int col_offset, int row_length, str kind, float level, Tensor seed, "
    "float low, float high) -> Tensor",
    fake=lambda x, row_offset, col_offset, row_length, kind, level, seed, low, high: dense_like(x),
    reference=_corrupt_window_reference,
    native=CPP, native_devices=("cpu",),
)


def _corrupt_window_and_mask_reference(x, grad, row_offset, col_offset, row_length, kind, level, seed, low, high):
    where = (row_offset, col_offset, row_length, kind, level, seed)
    grad.copy_(_corrupt_window_reference(grad, *where, 0.0, 0.0))
    return _corrupt_window_reference(x, *where, low, high)


# corrupt_window of x, and from the same draws grad (a window of x's shape, rows of unit
# stride) masked in place as corrupt's gradient masks it (zero where hit, survivors scaled
# for dropout; not for gaussian noise, whose gradient is the identity). CPU only; the CPU
# noisy_linear's backward draws once for both its gradients with it (no autograd of its own).
kernel(
    "corrupt_window_and_mask(Tensor x, Tensor(a!) grad, int row_offset, int col_offset, int row_length, str kind, "
    "float level, Tensor seed, float low, float high) -> Tensor",
    fake=lambda x, grad, row_offset, col_offset, row_length, kind, level, seed, low, high: dense_like(x),
    reference=_corrupt_window_and_mask_reference,
    native=CPP, native_devices=("cpu",),
)


def _reparameterize_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # mu, logvar, seed: eps is regenerated


def _reparameterize_backward(ops, ctx, grad_z, grad_kl):
    grad_mu, grad_logvar = ops.reparameterize_backward(grad_z, grad_kl, *ctx.saved_tensors)
    return grad_mu, grad_logvar, None


def _reparameterize_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _reparameterize_grad_backward(ops, ctx, grad_of_mu, grad_of_logvar):
    """grad_mu = g_z + g_kl mu / B, grad_logvar = g_z eps std / 2 + g_kl (exp(logvar) - 1) / 2B
    (std = exp(logvar / 2)): their derivative in each input. eps is the kernel's own:
    its forward at mu = 0, logvar = 0."""
    grad_z, grad_kl, mu, logvar, seed = ctx.saved_tensors
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    eps = ops.reparameterize_forward(torch.zeros_like(mu), torch.zeros_like(logvar), seed)[0].to(acc)
    g_mu, g_lv, gz, gkl = grad_of_mu.to(acc), grad_of_logvar.to(acc), grad_z.to(acc), grad_kl.to(acc)
    m, lv, per_row = mu.to(acc), logvar.to(acc), 1.0 / mu.shape[0]
    std, var = torch.exp(0.5 * lv), torch.exp(lv)
    d_grad_kl = per_row * ((g_mu * m).sum() + 0.5 * (g_lv * (var - 1.0)).sum())
    return ((g_mu + 0.5 * g_lv * eps * std).to(grad_z.dtype), d_grad_kl.to(grad_kl.dtype),
            (g_mu * gkl * per_row).to(mu.dtype),
            (g_lv * (0.25 * gz * eps * std + 0.5 * per_row * gkl * var)).to(logvar.dtype), None)


# z = mu + eps * exp(logvar / 2); kl = batch mean of -1/2 sum(1 + logvar - mu^2 - exp(logvar)).
kernel(
    "reparameterize_forward(Tensor mu, Tensor logvar, Tensor seed) -> (Tensor z, Tensor kl)",
    fake=lambda mu, logvar, seed: (dense_like(mu), mu.new_empty(())),
    reference=reference.reparameterize,
    native=CPP,
    triton=triton_launcher("noise", "reparameterize_forward"),
    setup=_reparameterize_setup, backward=_reparameterize_backward,
)
kernel(
    "reparameterize_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor seed) "
    "-> (Tensor grad_mu, Tensor grad_logvar)",
    fake=lambda grad_z, grad_kl, mu, logvar, seed: (dense_like(mu), dense_like(mu)),
    reference=None,
    native=CPP,
    triton=triton_launcher("noise", "reparameterize_backward"),
    setup=_reparameterize_grad_setup, backward=_reparameterize_grad_backward,
)


def _last_level_cache_bytes() -> int | None:
    """The largest cache the CPU reports to Linux (sysfs), or None."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = pathlib.Path(path).read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KM")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


# On CPU the corrupted input is made one window of about this many elements at a time,
# each multiplied while it is still in cache: no fresh tensor of x's size to fault in,
# no pass over it in memory. A sixteenth of the last-level cache in elements (a quarter
# in float32), within 8-32 MiB of float32: 8 MiB on a 32 MiB L3 (AMD EPYC, where windows
# beat one corrupt pass); 32 MiB on a 480 MiB L3 (Xeon), where smaller windows cost
# more in thinner matmuls than they saved (4096x4096 -> 1024 fwd+bwd: 1.17x F.linear
# in windows of 8 MiB, 1.10x of 32 MiB); over 32 MiB glibc gives blocks back to the
# system, whose fresh pages this VM faults in slowly. (Tests make it small.)
WINDOW_ELEMENTS = min(max((_last_level_cache_bytes() or 0) // 16, 1 << 21), 1 << 23)
MIN_WINDOW_COLUMNS = 512
MIN_WINDOW_ROWS = 64


def _row_windows(rows: int, cols: int):
    step = max(1, WINDOW_ELEMENTS // cols)
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def _noisy_linear_composite(x, weight, bias, kind, level, seed, low, high, backend="cpp"):
    # The corrupted input lives only until the matmul returns; it is not saved.
    ops = kernels(backend)
    if x.device.type != "cpu" or backend != "cpp":
        return F.linear(ops.corrupt(x, kind, level, seed, low, high), weight, bias)
    rows, cols = x.shape
    out = x.new_empty(rows, weight.shape[0])
    for r, n in _row_windows(rows, cols):
        window = ops.corrupt_window(x[r:r + n], r, 0, cols, kind, level, seed, low, high)
        if bias is None:
            torch.mm(window, weight.t(), out=out[r:r + n])
        else:
            torch.addmm(bias, window, weight.t(), out=out[r:r + n])
    return out


def _noisy_linear_grad_input_composite(grad_out, weight, kind, level, seed, backend="cpp"):
    ops, grad_out = kernels(backend), grad_out.to(weight.dtype)
    if grad_out.device.type != "cpu" or backend != "cpp" or kind == "gaussian":
        return _corrupt_grad(ops.corrupt, grad_out @ weight, kind, level, seed)
    rows, cols = grad_out.shape[0], weight.shape[1]
    grad_x = grad_out.new_empty(rows, cols)
    for r, n in _row_windows(rows, cols):  # the mask applied while the window is in cache
        product = torch.mm(grad_out[r:r + n], weight, out=grad_x[r:r + n])
        grad_x[r:r + n] = ops.corrupt_window(product, r, 0, cols, kind, level, seed, 0.0, 0.0)
    return grad_x


def _noisy_linear_grad_weight_composite(grad_out, x, kind, level, seed, low, high, backend="cpp"):
    ops, grad_t = kernels(backend), grad_out.to(x.dtype).t()
    if x.device.type != "cpu" or backend != "cpp":
        return grad_t @ ops.corrupt(x, kind, level, seed, low, high)
    rows, cols = x.shape
    grad_weight = x.new_empty(grad_out.shape[1], cols)
    # Windows of whole columns where they fit; for tall x, of MIN_WINDOW_COLUMNS columns
    # and as many rows as fit, summed (narrower windows would draw whole Philox blocks
    # of 256 for a few elements of each row, and make thin matmuls).
    step = max(MIN_WINDOW_COLUMNS, WINDOW_ELEMENTS // rows)
    row_step = max(1, WINDOW_ELEMENTS // step)
    for c in range(0, cols, step):
        columns = grad_weight[:, c:c + step]
        for r in range(0, rows, row_step):
            window = ops.corrupt_window(x[r:r + row_step, c:c + step], r, c, cols, kind, level, seed, low, high)
            if r == 0:
                torch.mm(grad_t[:, :row_step], window, out=columns)
            else:
                columns.addmm_(grad_t[:, r:r + row_step], window)
    return grad_weight


def _windows_of_many_rows(rows: int, cols: int) -> bool:
    """Whether x's row windows are one, or of MIN_WINDOW_ROWS rows or more: thinner ones
    would make thin matmuls of the weight gradient (very wide x keeps its column windows)."""
    return rows * cols <= WINDOW_ELEMENTS or WINDOW_ELEMENTS // cols >= MIN_WINDOW_ROWS


def _noisy_linear_grads_in_windows(ops, grad_out, x, weight, kind, level, seed, low, high):
    """Both gradients of the CPU noisy_linear from one draw of the noise: by row windows
    of x, each window's draws making corrupt(x) (for grad W = G^T corrupt(x)) and masking
    G W (grad x) while both are in cache. The two gradients apart draw it twice. Not for
    gaussian noise (grad x needs no draw) nor where the gradients are differentiated
    again (corrupt_window_and_mask has no derivative)."""
    grad_out = grad_out.to(x.dtype)
    rows, cols = x.shape
    grad_x, grad_weight = x.new_empty(rows, cols), x.new_empty(weight.shape[0], cols)
    for r, n in _row_windows(rows, cols):
        product = torch.mm(grad_out[r:r + n], weight, out=grad_x[r:r + n])  # masked in place below
        window = ops.corrupt_window_and_mask(x[r:r + n], product, r, 0, cols, kind, level, seed, low, high)
        if r == 0:
            torch.mm(grad_out[r:r + n].t(), window, out=grad_weight)
        else:
            grad_weight.addmm_(grad_out[r:r + n].t(), window)
    return grad_x, grad_weight


def _fused_noisy_matmul(t: Tensor) -> bool:
    """Whether Triton's noisy matmul (x corrupted tile by tile as it is loaded) runs,
    rather than Triton's corrupt followed by PyTorch's matmul: where its dot runs on
    tensor cores (bfloat16, float16, TF32 when PyTorch's matmuls allow it) or under the
    interpreter. A float32 dot at full precision runs on the FMA units, where the fused
    kernel ran at 14% of cuBLAS's rate (H200, 4096x65536 @ 65536x16384: 1200 ms against
    174 ms); a corrupt pass costs under 1 ms of that."""
    return t.device.type == "cpu" or t.dtype in (torch.float16, torch.bfloat16) or \
        _triton().dot_precision(t.dtype) == "tf32"


def _noisy_linear_triton(x, weight, bias, kind, level, seed, low, high):
    if _fused_noisy_matmul(x):
        return _triton().noisy_linear_forward(x, weight, bias, _kind(kind), level, seed, low, high)
    return _noisy_linear_composite(x, weight, bias, kind, level, seed, low, high, backend="triton")


def _noisy_linear_grad_input_triton(grad_out, weight, kind, level, seed):
    if _fused_noisy_matmul(weight):
        return _triton().noisy_linear_grad_input(grad_out, weight, _kind(kind), level, seed)
    return _noisy_linear_grad_input_composite(grad_out, weight, kind, level, seed, backend="triton")


def _noisy_linear_grad_weight_triton(grad_out, x, kind, level, seed, low, high):
    if _fused_noisy_matmul(x):
        return _triton().noisy_linear_grad_weight(grad_out, x, _kind(kind), level, seed, low, high)
    return _noisy_linear_grad_weight_composite(grad_out, x, kind, level, seed, low, high, backend="triton")


def _noisy_linear_setup(ctx, inputs, output):
    x, weight, bias, ctx.kind, ctx.level, seed, ctx.low, ctx.high = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, seed)  # never the corrupted x


def _noisy_linear_backward(ops, ctx, grad_out):
    x, weight, seed = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    both_from_one_draw = ops.get("corrupt_window_and_mask") and _windows_of_many_rows(*x.shape)
    if both_from_one_draw and need_x and need_weight and ctx.kind != "gaussian" and not torch.is_grad_enabled():
        grad_x, grad_weight = _noisy_linear_grads_in_windows(ops, grad_out, x, weight, ctx.kind, ctx.level, seed,
                                                             ctx.low, ctx.high)
    else:
        grad_x = ops.noisy_linear_grad_input(grad_out, weight, ctx.kind, ctx.level, seed) if need_x else None
        grad_weight = (
            ops.noisy_linear_grad_weight(grad_out, x, ctx.kind, ctx.level, seed, ctx.low, ctx.high)
            if need_weight else None
        )
    grad_bias = grad_out.sum(0).to(x.dtype) if ctx.has_bias and need_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


# Double backward: grad_x = M(G W) and grad_weight = G^T corrupt(x), where M, the
# gradient through corrupt, is an elementwise mask (or the identity): linear in G and W,
# and in x through M. Their derivatives are matmuls with M applied, in plain PyTorch.
def _grad_input_setup(ctx, inputs, output):
    grad_out, weight, ctx.kind, ctx.level, seed = inputs
    ctx.save_for_backward(grad_out, weight, seed)


def _grad_input_backward(ops, ctx, upstream):
    grad_out, weight, seed = ctx.saved_tensors
    masked = _corrupt_grad(ops.corrupt, upstream.to(weight.dtype), ctx.kind, ctx.level, seed)
    return ((masked @ weight.t()).to(grad_out.dtype), None if not ctx.needs_input_grad[1] else
            grad_out.to(weight.dtype).t() @ masked, None, None, None)


def _grad_weight_setup(ctx, inputs, output):
    grad_out, x, ctx.kind, ctx.level, seed, ctx.low, ctx.high = inputs
    ctx.save_for_backward(grad_out, x, seed)


def _grad_weight_backward(ops, ctx, upstream):
    grad_out, x, seed = ctx.saved_tensors
    upstream = upstream.to(x.dtype)
    d_grad_out = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad_out = (ops.corrupt(x, ctx.kind, ctx.level, seed, ctx.low, ctx.high) @ upstream.t()).to(grad_out.dtype)
    if ctx.needs_input_grad[1]:
        d_x = _corrupt_grad(ops.corrupt, grad_out.to(x.dtype) @ upstream, ctx.kind, ctx.level, seed)
    return d_grad_out, d_x, None, None, None, None, None


kernel(
    "noisy_linear(Tensor x, Tensor weight, Tensor? bias, str kind, float level, Tensor seed, float low, "
    "float high) -> Tensor",
    fake=lambda x, weight, bias, kind, level, seed, low, high: x.new_empty((x.shape[0], weight.shape[0])),
    reference=reference.noisy_linear,
    native=_noisy_linear_composite,
    triton=_noisy_linear_triton,
    setup=_noisy_linear_setup, backward=_noisy_linear_backward,
)
kernel(
    "noisy_linear_grad_input(Tensor grad_out, Tensor weight, str kind, float level, Tensor seed) -> Tensor",
    fake=lambda grad_out, weight, kind, level, seed: grad_out.new_empty(
        (grad_out.shape[0], weight.shape[1]), dtype=weight.dtype),
    reference=None,
    native=_noisy_linear_grad_input_composite,
    triton=_noisy_linear_grad_input_triton,
    setup=_grad_input_setup, backward=_grad_input_backward,
)
kernel(
    "noisy_linear_grad_weight(Tensor grad_out, Tensor x, str kind, float level, Tensor seed, float low, "
    "float high) -> Tensor",
    fake=lambda grad_out, x, kind, level, seed, low, high: x.new_empty((grad_out.shape[1], x.shape[1])),
    reference=None,
    native=_noisy_linear_grad_weight_composite,
    triton=_noisy_linear_grad_weight_triton,
    setup=_grad_weight_setup, backward=_grad_weight_backward,
)


# ---------------------------------------------------------------- checks

SEED_RANGE = 2**63  # seeds are 0 <= seed < 2^63 (a 64-bit Philox key)


def check_kind_level(kind, level) -> float:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    level = check_finite(level, "level")
    if kind == "gaussian" and level < 0.0:
        raise ValueError(f"level (the noise's standard deviation) must be >= 0 for gaussian, got {level}")
    if kind == "dropout" and not 0.0 <= level < 1.0:
        raise ValueError(f"level (the drop probability) must be in [0, 1) for dropout, got {level}")
    if kind in ("masking", "salt_pepper") and not 0.0 <= level <= 1.0:
        raise ValueError(f"level (the fraction corrupted) must be in [0, 1] for {kind}, got {level}")
    return level


def seed_tensor(seed, like: Tensor) -> Tensor:
    """The seed as a 0-dim int64 tensor on `like`'s device, made by a fill on the device (a
    copy from the host would wait for the GPU's queue). None draws one from torch's
    default CPU generator, so torch.manual_seed reproduces a run on any device (under
    torch.compile, or for fake tensors, the draw is a device-side torch.randint instead)."""
    device = like.device
    if seed is None:
        if without_values(like):
            return torch.randint(0, SEED_RANGE - 1, (), dtype=torch.long, device=device)
        seed = int(torch.randint(0, SEED_RANGE - 1, (), dtype=torch.long))
    elif isinstance(seed, Tensor):
        if seed.dim() != 0 or seed.dtype != torch.long:
            raise ValueError(f"seed must be an int or a 0-dim int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.to(device)
    elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_RANGE:
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    return torch.full((), int(seed), dtype=torch.long, device=device)


def _float_tensor(name: str):
    def check(t, name):
        check_tensor(t, name)
        check_float_dtype(t, name)

    return argument(name, check)


def _noise_params(on: str):
    """kind and level, low and high, and the seed made a tensor on the device of `on`."""

    def check(args: dict) -> None:
        args["level"] = check_kind_level(args["kind"], args["level"])
        args["low"], args["high"] = check_finite(args["low"], "low"), check_finite(args["high"], "high")
        args["seed"] = seed_tensor(args["seed"], args[on])

    return check


def _linear_inputs(args: dict) -> None:
    x = args["x"]
    args["x"], args["weight"], args["bias"] = x, weight, bias = autocast_inputs(
        x.device, x, args["weight"], args["bias"])
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be non-empty with at least 1 dimension, got shape {tuple(x.shape)}")
    check_linear_params(x, weight, bias, "O")


def _gaussian_params(args: dict) -> None:
    mu, logvar = args["mu"], args["logvar"]
    if mu.dim() != 2 or mu.numel() == 0:
        raise ValueError(f"mu must be a non-empty 2-D (batch, latent) tensor, got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape or logvar.dtype != mu.dtype or logvar.device != mu.device:
        raise ValueError(
            f"logvar must match mu's shape, dtype and device ({tuple(mu.shape)}, {mu.dtype}, {mu.device}), "
            f"got {tuple(logvar.shape)}, {logvar.dtype}, {logvar.device}"
        )
    args["seed"] = seed_tensor(args["seed"], mu)


# ---------------------------------------------------------------- benchmark cases

LEVEL, SEED = 0.3, 1


@functools.cache
def _seed(device) -> Tensor:  # made once: a copy from the host in every timed call would cost eager on a GPU
    return torch.tensor(SEED, device=device)


def _torch_reparameterize(mu, logvar):
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    return z, (-0.5 * (1 + logvar - mu * mu - torch.exp(logvar)).sum(1)).mean()


def _linear_case_inputs(rows, cols, dtype, device):
    return {
        "x": torch.rand(rows, cols, device=device).to(dtype),
        "weight": (torch.randn(cols // 4, cols, device=device) * cols**-0.5).to(dtype),
        "bias": torch.zeros(cols // 4, device=device).to(dtype),
    }


def _linear_bytes(inputs, backward):  # back: read out's gradient, x and weight again; write their gradients
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    out = x.shape[0] * weight.shape[0] * x.element_size()
    return nbytes(x, weight, bias) + out + ((out + 2 * nbytes(x, weight, bias)) if backward else 0)


# ---------------------------------------------------------------- public API


@operator(
    uses=("corrupt",),
    checks=(_float_tensor("x"), _noise_params("x")),
    bench=Bench(
        make=lambda r, c, dtype, device: {"x": torch.rand(r, c, device=device).to(dtype)},
        call=lambda op, x: op(x, "masking", LEVEL, seed=SEED),
        reference=lambda x: reference.corrupt(x, "masking", LEVEL, _seed(x.device)),
        bytes_moved=lambda inputs, backward: nbytes(inputs["x"]) * (4 if backward else 2),
        differentiable=("x",), compile_reference=False, params=f"masking, level={LEVEL}",
        library=("x * (torch.rand_like(x) >= level)", lambda x: x * (torch.rand_like(x) >= LEVEL)),
    ),
)
def corrupt(ops, x: Tensor, kind: str, level: float, *, seed=None, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Corrupt x (any shape) for a denoising autoencoder:

    - ``gaussian``: ``x + level * N(0, 1)``;
    - ``masking``: a fraction ``level`` of the elements set to 0;
    - ``salt_pepper``: a fraction ``level`` set to ``low`` or ``high``, each with probability 1/2;
    - ``dropout``: zero with probability ``level``, survivors scaled by ``1 / (1 - level)``.

    Element i (row-major) is hit when the uniform draw of Philox(seed, i) is below
    float32(level); the same seed gives the same mask on every backend. The backward
    regenerates the mask from the seed: nothing else is saved. ``seed=None`` draws
    the seed from torch's default generator (``torch.manual_seed`` reproduces it)."""
    return ops.corrupt(x, kind, level, seed, low, high)


@operator(
    uses=("noisy_linear",),
    checks=(_float_tensor("x"), _linear_inputs, _noise_params("x")),
    # On GPU the fused Triton matmul is the point of noisy_linear: it comes first.
    gpu_preference=("triton", "cuda"),
    bench=Bench(
        make=_linear_case_inputs,
        call=lambda op, x, weight, bias: op(x, weight, bias, "masking", LEVEL, seed=SEED),
        reference=lambda x, weight, bias: reference.noisy_linear(x, weight, bias, "masking", LEVEL, _seed(x.device)),
        bytes_moved=_linear_bytes, differentiable=("x", "weight", "bias"), compile_reference=False,
        params=f"masking, level={LEVEL}", flops=linear_flops, matmul_ratio_goal=1.1,
        library=("F.linear(x * (torch.rand_like(x) >= level))",
                 lambda x, weight, bias: F.linear(x * (torch.rand_like(x) >= LEVEL), weight, bias)),
    ),
)
def noisy_linear(ops, x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, level: float, *, seed=None,
                 low: float = 0.0, high: float = 1.0) -> Tensor:
    """``F.linear(corrupt(x, kind, level, seed=seed), weight, bias)`` without storing
    the corrupted input: autograd saves x, weight and the seed, and the backward
    regenerates corrupt(x). x (..., D), weight (O, D), bias (O,) or None. On CPU x is
    corrupted a window of rows at a time, just before that window's matmul. On GPU with
    the Triton backend, where the matmul runs on tensor cores (bfloat16, float16, TF32),
    the corruption happens inside the matmul's loads of x; in full-precision float32,
    and with the cuda backend, corrupt runs first and PyTorch's matmul reads its output
    (which autograd does not keep). Under autocast, x, weight and bias run in the
    autocast dtype, as for F.linear."""
    rows = x.reshape(-1, x.shape[-1])  # row-major indices of x are those of its rows
    out = ops.noisy_linear(rows, weight, bias, kind, level, seed, low, high)
    return out.view(*x.shape[:-1], weight.shape[0])


@operator(
    uses=("reparameterize_forward",),
    checks=(_float_tensor("mu"), _float_tensor("logvar"), _gaussian_params),
    bench=Bench(
        make=lambda r, c, dtype, device: {"mu": torch.randn(r, c, device=device).to(dtype),
                                          "logvar": (0.1 * torch.randn(r, c, device=device)).to(dtype)},
        call=lambda op, mu, logvar: op(mu, logvar, seed=SEED),
        reference=lambda mu, logvar: reference.reparameterize(mu, logvar, _seed(mu.device)),
        # read mu and logvar, write z; back: read z's gradient, mu and logvar, write their gradients
        bytes_moved=lambda inputs, backward: nbytes(inputs["mu"]) * (8 if backward else 3),
        differentiable=("mu", "logvar"), compile_reference=False,
        library=("mu + torch.randn_like(mu) * exp(logvar / 2), KL formula", _torch_reparameterize),
        copy_share_goal=0.6,
    ),
)
def reparameterize(ops, mu: Tensor, logvar: Tensor, *, seed=None) -> tuple[Tensor, Tensor]:
    """The VAE's reparameterization trick fused with its KL term: returns
    ``z = mu + eps * exp(logvar / 2)`` (eps ~ N(0, 1) from Philox(seed, index)) and
    ``kl = mean over the batch of -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))``.
    mu and logvar (B, Z) of one dtype. The backward regenerates eps from the seed."""
    return ops.reparameterize_forward(mu, logvar, seed)
