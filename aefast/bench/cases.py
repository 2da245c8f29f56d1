"""The benchmark case of every operator, derived from its declaration
(aefast/ops/<family>.py, `bench=`): how to build its inputs at a named size, how to
run it (forward, or forward + backward), its plain-PyTorch reference, the bytes it
must move at minimum (the memory floor used for GB/s), and the backends with its
kernels.

A case's `run(fn, inputs, backward)` calls `fn` (the aefast op under a backend, the
eager reference, or the compiled reference) with the inputs; with backward=True it
also back-propagates a gradient of ones (made once per shape) into every input that takes one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import aefast  # noqa: F401  (declares every operator)
from aefast.ops._declare import OPERATORS, Bench

# Named sizes per device type: small, medium, and large (large fills the device).
SIZES = {
    "cpu": {"small": (256, 1024), "medium": (1024, 4096), "large": (4096, 4096)},
    "cuda": {"small": (1024, 4096), "medium": (4096, 16384), "large": (4096, 65536)},
}


@dataclass(frozen=True)
class Case:
    op: str
    bench: Bench
    aefast: Callable[..., object]  # the public op on the case's inputs
    kernels: tuple[str, ...]  # backends with a kernel for it

    @property
    def reference(self) -> Callable[..., object]:
        return self.bench.reference

    @property
    def differentiable(self) -> tuple[str, ...]:
        return self.bench.differentiable

    @property
    def compile_reference(self) -> bool:
        return self.bench.compile_reference

    @property
    def library(self) -> tuple[str, Callable[..., object]] | None:
        return self.bench.library

    def describe(self, inputs: dict) -> str:
        """The case's settings and its inputs' shapes: `k=32; x 1024x4096`."""
        shapes = ", ".join(f"{name} {'x'.join(map(str, t.shape))}" for name, t in inputs.items()
                           if isinstance(t, torch.Tensor))
        return f"{self.bench.params}; {shapes}" if self.bench.params else shapes

    def bytes_moved(self, inputs: dict, backward: bool) -> int:
        return int(self.bench.bytes_moved(inputs, backward))

    @property
    def matmul_bound(self) -> bool:
        """An op built around a matmul: its floor is F.linear on the same inputs."""
        return self.bench.flops is not None

    def flops(self, inputs: dict, backward: bool) -> int | None:
        """The operations of the matmul the op contains, or None for a memory-bound op."""
        return None if self.bench.flops is None else int(self.bench.flops(inputs, backward))

    def inputs(self, size: str, dtype: torch.dtype, device: torch.device) -> dict:
        rows, cols = SIZES[device.type][size]
        torch.manual_seed(0)
        return self.bench.make(rows, cols, dtype, device)


# The outputs' gradients, made once per shape: in training they come from the layers
# above, so filling a fresh one (16 MB at the CPU's medium size) is no part of any
# contender's time.
_OUTPUT_GRADIENTS: dict[tuple, torch.Tensor] = {}


def output_gradient(out: torch.Tensor) -> torch.Tensor:
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _OUTPUT_GRADIENTS:
        _OUTPUT_GRADIENTS[key] = torch.ones_like(out, memory_format=torch.contiguous_format)
    return _OUTPUT_GRADIENTS[key]


def run(case: Case, fn, inputs: dict, backward: bool) -> None:
    """One call of fn on the case's inputs (fresh leaves), then its backward with a
    gradient of ones for each floating output (the same tensor every call)."""
    if not backward:
        with torch.no_grad():
            fn(**inputs)
        return
    leaves = {k: (v.detach().requires_grad_(True) if k in case.differentiable else v) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point() and o.requires_grad]
    torch.autograd.backward(outs, [output_gradient(o) for o in outs])


CASES: dict[str, Case] = {
    name: Case(name, op.bench, functools.partial(op.bench.call, op.function), op.kernel_backends)
    for name, op in OPERATORS.items()
    if op.bench is not None
}
