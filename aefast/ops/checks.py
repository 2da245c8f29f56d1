"""Argument checks of the operators, and of the models and modules that take the same
arguments: each raises a ValueError that names the argument and what it may be."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_matrix(t: Tensor, name: str) -> None:
    check_tensor(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, units), got shape {tuple(t.shape)}")
    check_float_dtype(t, name)
    if t.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (an empty batch has no mean)")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(t.shape)}")


def _finite(x) -> bool:
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument
    # may arrive as a SymFloat, which math.isfinite cannot trace. NaN fails both.
    return -math.inf < x < math.inf


def check_open_unit(x, name: str) -> float:
    if not isinstance(x, numbers.Real) or not 0.0 < float(x) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {x!r}")
    return float(x)


def check_finite(x, name: str) -> float:
    if not isinstance(x, numbers.Real) or isinstance(x, bool) or not _finite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def check_bool(x, name: str) -> bool:
    # not truthiness: relu=None or "no" would pass as a choice (numpy's bool is a bool)
    if not isinstance(x, bool) and not (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_")):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return bool(x)


def check_rate(rate, name: str) -> float:
    """A fraction of a batch: in (0, 1]."""
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {rate!r}")
    return float(rate)


def check_nonnegative(x, name: str) -> float:
    if not isinstance(x, numbers.Real) or isinstance(x, bool) or not _finite(x) or x < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


def without_values(t: Tensor) -> bool:
    """Whether t's values cannot be read now: while torch.compile traces, or for a fake
    or meta tensor (FakeTensorMode, shape propagation). Checks of values skip then."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for `device` (never for meta tensors, which have none)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_inputs(device: torch.device, *tensors):
    """Under autocast, the floating tensors in the autocast dtype, as F.linear's
    inputs would be (a drop-in matmul-like op then takes mixed-precision inputs);
    float64 stays float64, as autocast leaves it."""
    if not autocasting(device):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def mixed_precision(activations: torch.dtype, weight: torch.dtype) -> bool:
    """A float32 weight beside float16 or bfloat16 activations: the decode family's
    kernels read such a weight as it is, sum in float32 and return its gradient in
    float32 (mixed precision without a cast of the whole weight each step)."""
    return weight == torch.float32 and activations in (torch.float16, torch.bfloat16)


def autocast_weight(device: torch.device, weight):
    """Under autocast, a weight for the decode family: float32 kept (see mixed_precision),
    any other floating dtype but float64 in the autocast dtype."""
    if isinstance(weight, Tensor) and weight.dtype == torch.float32:
        return weight
    return autocast_inputs(device, weight)[0]


def check_linear_params(x: Tensor, weight, bias, out_name: str, mixed: bool = False) -> None:
    """weight (out_name, D) and bias (out_name,) or None, of x's dtype, D = x's last size.
    With `mixed`, a float32 weight and bias also beside float16 or bfloat16 x."""
    width = x.shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != width:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be 2-D of shape ({out_name}, D={width}), got {shape}")
    if bias is not None and not isinstance(bias, Tensor):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got {type(bias).__name__}")
    allowed = {x.dtype, torch.float32} if mixed and mixed_precision(x.dtype, torch.float32) else {x.dtype}
    if weight.dtype not in allowed or (bias is not None and bias.dtype not in allowed):
        also = " (or float32)" if len(allowed) > 1 else ""
        raise ValueError(f"weight and bias must have x's dtype {x.dtype}{also}, got {weight.dtype} weight and "
                         f"{None if bias is None else bias.dtype} bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be None or of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def argument(name: str, check, *extra):
    """A declared check of the public argument `name` (aefast/ops/_declare.py):
    `check(value, name, *extra)`; what it returns, if not None, replaces the value."""

    def run(args: dict) -> None:
        value = check(args[name], name, *extra)
        if value is not None:
            args[name] = value

    run.__name__ = f"check_{name}"
    return run
