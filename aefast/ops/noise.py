"""The noise-injection family: corrupt, noisy_linear and reparameterize.

Every random number is Philox4x32-10 of (seed, element index) (see
csrc/include/aefast/philox.h): the seed is the only state, so a backward
regenerates the noise instead of saving it, and every backend draws the same
numbers. The seed travels as a 0-dim int64 tensor on the input's device, made
there by a fill (seed_tensor): no host-to-device copy waits for the GPU, and
torch.compile traces it.

C++ ops (csrc/ops.cpp; CPU and CUDA kernels) and Triton ops (custom ops below)
share signatures, fake implementations and autograd formulas. noisy_linear is a
Python op on either side: with the C++ kernels it is corrupt + F.linear with a
backward that regenerates corrupt(x); with Triton, one matmul kernel corrupts the
tiles of x as it loads them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aefast import backends, reference
from aefast.ops.checks import (
    autocast_inputs,
    check_finite,
    check_float_dtype,
    check_linear_params,
    check_tensor,
)

KINDS = reference.CORRUPTION_KINDS

# ---------------------------------------------------------------- Triton ops


def _triton():
    from aefast.triton_kernels import noise as kernels

    return kernels


@torch.library.custom_op("aefast::corrupt_triton", mutates_args=())
def _corrupt_triton(x: Tensor, kind: str, level: float, seed: Tensor, low: float, high: float) -> Tensor:
    return _triton().corrupt(x, kind, level, seed, low, high)


@torch.library.custom_op("aefast::reparameterize_forward_triton", mutates_args=())
def _reparameterize_forward_triton(mu: Tensor, logvar: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _triton().reparameterize_forward(mu, logvar, seed)


@torch.library.custom_op("aefast::reparameterize_backward_triton", mutates_args=())
def _reparameterize_backward_triton(
    grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor
) -> tuple[Tensor, Tensor]:
    return _triton().reparameterize_backward(grad_z, grad_kl, mu, logvar, seed)


@torch.library.custom_op("aefast::noisy_linear_triton", mutates_args=())
def _noisy_linear_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, level: float, seed: Tensor,
    low: float, high: float,
) -> Tensor:
    return _triton().noisy_linear_forward(x, weight, bias, kind, level, seed, low, high)


@torch.library.custom_op("aefast::noisy_linear_grad_input_triton", mutates_args=())
def _noisy_linear_grad_input_triton(
    grad_out: Tensor, weight: Tensor, kind: str, level: float, seed: Tensor
) -> Tensor:
    return _triton().noisy_linear_grad_input(grad_out, weight, kind, level, seed)


@torch.library.custom_op("aefast::noisy_linear_grad_weight_triton", mutates_args=())
def _noisy_linear_grad_weight_triton(
    grad_out: Tensor, x: Tensor, kind: str, level: float, seed: Tensor, low: float, high: float
) -> Tensor:
    return _triton().noisy_linear_grad_weight(grad_out, x, kind, level, seed, low, high)


# ------------------------------------------ noisy_linear over the C++ corrupt op


def _corrupt_grad(corrupt_op, grad: Tensor, kind: str, level: float, seed: Tensor) -> Tensor:
    """The gradient through corrupt: identity for gaussian; otherwise the same mask
    (and dropout's scale) applied to the gradient: corrupt with low = high = 0."""
    return grad if kind == "gaussian" else corrupt_op(grad, kind, level, seed, 0.0, 0.0)


@torch.library.custom_op("aefast::noisy_linear", mutates_args=())
def _noisy_linear_cpp(
    x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, level: float, seed: Tensor,
    low: float, high: float,
) -> Tensor:
    # The corrupted input lives only until the matmul returns; it is not saved.
    return F.linear(torch.ops.aefast.corrupt(x, kind, level, seed, low, high), weight, bias)


@torch.library.custom_op("aefast::noisy_linear_grad_input", mutates_args=())
def _noisy_linear_grad_input_cpp(grad_out: Tensor, weight: Tensor, kind: str, level: float, seed: Tensor) -> Tensor:
    return _corrupt_grad(torch.ops.aefast.corrupt, grad_out.to(weight.dtype) @ weight, kind, level, seed)


@torch.library.custom_op("aefast::noisy_linear_grad_weight", mutates_args=())
def _noisy_linear_grad_weight_cpp(
    grad_out: Tensor, x: Tensor, kind: str, level: float, seed: Tensor, low: float, high: float
) -> Tensor:
    return grad_out.to(x.dtype).t() @ torch.ops.aefast.corrupt(x, kind, level, seed, low, high)


# ------------------------------------------- fake implementations and autograd


@dataclass(frozen=True)
class FamilyOps:
    """The operators of one backend."""

    corrupt: object
    reparameterize_forward: object
    reparameterize_backward: object
    noisy_linear: object
    noisy_linear_grad_input: object
    noisy_linear_grad_weight: object


OPS: dict[str, FamilyOps] = {
    "triton": FamilyOps(
        torch.ops.aefast.corrupt_triton.default,
        torch.ops.aefast.reparameterize_forward_triton.default,
        torch.ops.aefast.reparameterize_backward_triton.default,
        torch.ops.aefast.noisy_linear_triton.default,
        torch.ops.aefast.noisy_linear_grad_input_triton.default,
        torch.ops.aefast.noisy_linear_grad_weight_triton.default,
    )
}
if backends.CPP_BUILT:  # one C++ op serves both: the dispatcher picks the CPU or CUDA kernel
    OPS["cpp"] = OPS["cuda"] = FamilyOps(
        torch.ops.aefast.corrupt.default,
        torch.ops.aefast.reparameterize_forward.default,
        torch.ops.aefast.reparameterize_backward.default,
        torch.ops.aefast.noisy_linear.default,
        torch.ops.aefast.noisy_linear_grad_input.default,
        torch.ops.aefast.noisy_linear_grad_weight.default,
    )


def _dense_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _register(ops: FamilyOps) -> None:
    torch.library.register_fake(ops.corrupt)(lambda x, kind, level, seed, low, high: _dense_like(x))
    torch.library.register_fake(ops.reparameterize_forward)(
        lambda mu, logvar, seed: (_dense_like(mu), mu.new_empty(()))
    )
    torch.library.register_fake(ops.reparameterize_backward)(
        lambda grad_z, grad_kl, mu, logvar, seed: (_dense_like(mu), _dense_like(mu))
    )
    torch.library.register_fake(ops.noisy_linear)(
        lambda x, weight, bias, kind, level, seed, low, high: x.new_empty((x.shape[0], weight.shape[0]))
    )
    torch.library.register_fake(ops.noisy_linear_grad_input)(
        lambda grad_out, weight, kind, level, seed: grad_out.new_empty((grad_out.shape[0], weight.shape[1]),
                                                                      dtype=weight.dtype)
    )
    torch.library.register_fake(ops.noisy_linear_grad_weight)(
        lambda grad_out, x, kind, level, seed, low, high: x.new_empty((grad_out.shape[1], x.shape[1]))
    )

    def corrupt_setup(ctx, inputs, output):
        _, ctx.kind, ctx.level, seed, _, _ = inputs
        ctx.save_for_backward(seed)

    def corrupt_backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return _corrupt_grad(ops.corrupt, grad, ctx.kind, ctx.level, seed), None, None, None, None, None

    def reparameterize_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # mu, logvar, seed: eps is regenerated

    def reparameterize_backward(ctx, grad_z, grad_kl):
        grad_mu, grad_logvar = ops.reparameterize_backward(grad_z, grad_kl, *ctx.saved_tensors)
        return grad_mu, grad_logvar, None

    def noisy_linear_setup(ctx, inputs, output):
        x, weight, bias, ctx.kind, ctx.level, seed, ctx.low, ctx.high = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, seed)  # never the corrupted x

    def noisy_linear_backward(ctx, grad_out):
        x, weight, seed = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = ops.noisy_linear_grad_input(grad_out, weight, ctx.kind, ctx.level, seed) if need_x else None
        grad_weight = (
            ops.noisy_linear_grad_weight(grad_out, x, ctx.kind, ctx.level, seed, ctx.low, ctx.high)
            if need_weight else None
        )
        grad_bias = grad_out.sum(0).to(x.dtype) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None

    torch.library.register_autograd(ops.corrupt, corrupt_backward, setup_context=corrupt_setup)
    torch.library.register_autograd(
        ops.reparameterize_forward, reparameterize_backward, setup_context=reparameterize_setup
    )
    torch.library.register_autograd(
        ops.noisy_linear, noisy_linear_backward, setup_context=noisy_linear_setup
    )


for _ops in {id(o): o for o in OPS.values()}.values():
    _register(_ops)


# ------------------------------------------------------------------ checks

SEED_RANGE = 2**63  # seeds are 0 <= seed < 2^63 (a 64-bit Philox key)


def _check_float_tensor(t, name: str) -> None:
    check_tensor(t, name)
    check_float_dtype(t, name)


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


def seed_tensor(seed, device: torch.device) -> Tensor:
    """The seed as a 0-dim int64 tensor on `device`, made by a fill on the device (a
    copy from the host would wait for the GPU's queue). None draws one from torch's
    default CPU generator, so torch.manual_seed reproduces a run on any device (under
    torch.compile the draw is traced as a device-side torch.randint instead)."""
    if seed is None:
        if torch.compiler.is_compiling():
            return torch.randint(0, SEED_RANGE - 1, (), dtype=torch.long, device=device)
        seed = int(torch.randint(0, SEED_RANGE - 1, (), dtype=torch.long))
    elif isinstance(seed, Tensor):
        if seed.dim() != 0 or seed.dtype != torch.long:
            raise ValueError(f"seed must be an int or a 0-dim int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.to(device)
    elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < SEED_RANGE:
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    return torch.full((), int(seed), dtype=torch.long, device=device)


def _resolve(device: torch.device, op: str) -> str:
    # On GPU the fused Triton matmul is the point of noisy_linear: it comes first.
    preference = ("triton", "cuda") if op == "noisy_linear" else None
    return backends.resolve(device, op, tuple(OPS), gpu_preference=preference)


# --------------------------------------------------------------- public API


def corrupt(x: Tensor, kind: str, level: float, *, seed=None, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Corrupt x (any shape) for a denoising autoencoder:

    - ``gaussian``: ``x + level * N(0, 1)``;
    - ``masking``: a fraction ``level`` of the elements set to 0;
    - ``salt_pepper``: a fraction ``level`` set to ``low`` or ``high``, each with probability 1/2;
    - ``dropout``: zero with probability ``level``, survivors scaled by ``1 / (1 - level)``.

    Element i (row-major) is hit when the uniform draw of Philox(seed, i) is below
    float32(level); the same seed gives the same mask on every backend. The backward
    regenerates the mask from the seed: nothing else is saved. ``seed=None`` draws
    the seed from torch's default generator (``torch.manual_seed`` reproduces it)."""
    _check_float_tensor(x, "x")
    level = check_kind_level(kind, level)
    low, high = check_finite(low, "low"), check_finite(high, "high")
    seed = seed_tensor(seed, x.device)
    name = _resolve(x.device, "corrupt")
    if name == "reference":
        return reference.corrupt(x, kind, level, seed, low, high)
    return OPS[name].corrupt(x, kind, level, seed, low, high)


def noisy_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, level: float, *, seed=None,
    low: float = 0.0, high: float = 1.0,
) -> Tensor:
    """``F.linear(corrupt(x, kind, level, seed=seed), weight, bias)`` without storing
    the corrupted input: autograd saves x, weight and the seed, and the backward
    regenerates corrupt(x). x (..., D), weight (O, D), bias (O,) or None. On GPU with
    the Triton backend the corruption happens inside the matmul's loads of x. Under
    autocast, x, weight and bias run in the autocast dtype, as for F.linear."""
    _check_float_tensor(x, "x")
    x, weight, bias = autocast_inputs(x.device, x, weight, bias)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be non-empty with at least 1 dimension, got shape {tuple(x.shape)}")
    check_linear_params(x, weight, bias, "O")
    level = check_kind_level(kind, level)
    low, high = check_finite(low, "low"), check_finite(high, "high")
    seed = seed_tensor(seed, x.device)
    rows = x.reshape(-1, x.shape[-1])  # row-major indices of x are those of its rows
    name = _resolve(x.device, "noisy_linear")
    if name == "reference":
        out = reference.noisy_linear(rows, weight, bias, kind, level, seed, low, high)
    else:
        out = OPS[name].noisy_linear(rows, weight, bias, kind, level, seed, low, high)
    return out.view(*x.shape[:-1], weight.shape[0])


def reparameterize(mu: Tensor, logvar: Tensor, *, seed=None) -> tuple[Tensor, Tensor]:
    """The VAE's reparameterization trick fused with its KL term: returns
    ``z = mu + eps * exp(logvar / 2)`` (eps ~ N(0, 1) from Philox(seed, index)) and
    ``kl = mean over the batch of -1/2 sum_j (1 + logvar - mu^2 - exp(logvar))``.
    mu and logvar (B, Z) of one dtype. The backward regenerates eps from the seed."""
    _check_float_tensor(mu, "mu")
    _check_float_tensor(logvar, "logvar")
    if mu.dim() != 2 or mu.numel() == 0:
        raise ValueError(f"mu must be a non-empty 2-D (batch, latent) tensor, got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape or logvar.dtype != mu.dtype or logvar.device != mu.device:
        raise ValueError(
            f"logvar must match mu's shape, dtype and device ({tuple(mu.shape)}, {mu.dtype}, {mu.device}), "
            f"got {tuple(logvar.shape)}, {logvar.dtype}, {logvar.device}"
        )
    seed = seed_tensor(seed, mu.device)
    name = _resolve(mu.device, "reparameterize")
    if name == "reference":
        return reference.reparameterize(mu, logvar, seed)
    return OPS[name].reparameterize_forward(mu, logvar, seed)
