"""One declaration per operator: everything else is derived from it.

A family module (aefast/ops/<family>.py) declares two kinds of things.

`kernel(schema, ...)`: an internal operator that each backend computes. The schema
is written once, here in Python, and registered with torch.library once per
implementation of it:
- `aefast::<name>`, serving the `cpp` and `cuda` backends: C++ kernels compiled into
  aefast._C (`native=CPP`; csrc/cpu and csrc/cuda register them per dispatch key)
  or a Python composite of other C++ kernels (`native=function`);
- `aefast::<name>_triton`, serving the `triton` backend (`triton=function`);
- the `reference` backend runs `reference`, plain PyTorch differentiated by torch
  itself (it returns only what the public bodies read; the rest may be None).
Its fake (meta) function and its autograd formula (`setup`, `backward`) are
registered for every implementation; `backward(ops, ctx, *grads)` receives the
kernels of the backend that ran the forward as `ops` (the native implementation's
backward: `cuda` for CUDA tensors, `cpp` otherwise; see backward_kernels).

`@operator(...)`: a public op. Its body takes `ops`, the kernels of the backend
chosen for this call, then the public arguments; the decorator turns it into the
public function: bind the arguments, run the declared checks (the same for every
backend, the reference included; a check may also normalise an argument), pick the
backend (aefast.backends.resolve, among the backends that have every kernel the op
`uses`), run the body. The tests' backend matrix (tests/conftest.py) and the
benchmark cases (aefast/bench/cases.py, from `bench=`) read OPERATORS.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from aefast import backends

CPP = "C++ kernels in aefast._C"  # native=CPP: the op's kernels are compiled C++
BACKENDS = backends.BACKENDS


@dataclass
class Kernel:
    name: str
    schema: str  # "(args) -> results", the op's arguments without its name
    fake: Callable
    reference: Callable | None
    native: Callable | str | None = None
    native_devices: tuple[str, ...] = ("cpu", "cuda")
    triton: Callable | None = None
    setup: Callable | None = None
    backward: Callable | None = None
    ops: dict[str, object] = field(default_factory=dict)  # backend -> what runs it

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.ops)


KERNELS: dict[str, Kernel] = {}


class Kernels:
    """The kernels of one backend, by name: `kernels("cpp").topk_forward(x, k, relu)`."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        kernel = KERNELS.get(name)
        if kernel is None or self.backend not in kernel.ops:
            raise AttributeError(f"aefast backend {self.backend!r} has no kernel {name!r}")
        return kernel.ops[self.backend]

    def get(self, name: str, default=None):
        kernel = KERNELS.get(name)
        return kernel.ops.get(self.backend, default) if kernel is not None else default

    def __repr__(self) -> str:
        return f"Kernels({self.backend!r})"


_KERNEL_SETS = {b: Kernels(b) for b in BACKENDS}


def kernels(backend: str) -> Kernels:
    return _KERNEL_SETS[backend]


def triton_launcher(family: str, name: str) -> Callable:
    """The launcher `name` of triton_kernels/<family>.py, called with the kernel's own
    arguments: the Triton implementation of every kernel that needs nothing more.
    Imported at the first call, so aefast imports without Triton."""

    def launch(*args):
        return getattr(importlib.import_module(f"aefast.triton_kernels.{family}"), name)(*args)

    launch.__name__ = launch.__qualname__ = name
    return launch


def _python_op(qualname: str, schema: str, fn: Callable):
    @functools.wraps(fn)
    def body(*args):  # custom_op reads the schema, not the signature
        return fn(*args)

    torch.library.custom_op(qualname, body, mutates_args=(), schema=schema)
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def kernel(schema: str, *, fake: Callable, reference: Callable | None, native=None,
           native_devices: Sequence[str] = ("cpu", "cuda"), triton: Callable | None = None,
           setup: Callable | None = None, backward: Callable | None = None) -> Kernel:
    """Declare and register the kernel `name(args) -> results` (see the module doc)."""
    name, _, arguments = schema.partition("(")
    if name in KERNELS:
        raise ValueError(f"kernel {name} is declared twice")
    k = Kernel(name, "(" + arguments, fake, reference, native, tuple(native_devices), triton, setup, backward)
    if reference is not None:
        k.ops["reference"] = reference
    if native is CPP and backends.CPP_BUILT:
        torch.library.define(f"aefast::{name}", k.schema)
        op = getattr(torch.ops.aefast, name).default
    elif callable(native) and backends.CPP_BUILT:  # a composite of C++ kernels
        op = _python_op(f"aefast::{name}", k.schema, native)
    else:
        op = None
    if op is not None:
        _register(k, op, "native")
        for device in k.native_devices:
            k.ops[{"cpu": "cpp", "cuda": "cuda"}[device]] = op
    if triton is not None:
        op = _python_op(f"aefast::{name}_triton", k.schema, triton)
        _register(k, op, "triton")
        k.ops["triton"] = op
    KERNELS[name] = k
    return k


def backward_kernels(implementation: str, device: torch.device) -> Kernels:
    """The kernels a backward formula gets: those of the implementation that ran the
    forward; the native one serves two backends, `cuda` for CUDA tensors, else `cpp`."""
    if implementation == "native":
        return kernels("cuda" if device.type == "cuda" else "cpp")
    return kernels(implementation)


def _register(k: Kernel, op, implementation: str) -> None:
    torch.library.register_fake(op)(k.fake)
    if k.backward is None and "!)" in k.schema:
        return  # a kernel that writes an argument in place takes no formula (torch refuses one)
    if k.backward is None:
        # Without a formula, autograd would warn once and give the kernel zero gradients
        # (a C++ op's fallback): a double backward through the backward kernels said 0
        # before they had formulas. A kernel without one says it is not there.
        def no_derivative(ctx, *grads):
            raise RuntimeError(f"aefast::{k.name} has no derivative on this backend (the reference backend, "
                               f"aefast.backend('reference'), differentiates every op)")

        torch.library.register_autograd(op, no_derivative)
        return

    def backward(ctx, *grads):
        # (no gradient at all reaches a formula that asked for None where one is unused)
        device = next((g.device for g in grads if isinstance(g, torch.Tensor)), torch.device("cpu"))
        return k.backward(backward_kernels(implementation, device), ctx, *grads)

    torch.library.register_autograd(op, backward, setup_context=k.setup)


def dense_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous tensor of t's shape and dtype: what a kernel's fake returns."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def linear_flops(inputs: dict, backward: bool) -> int:
    """The matmul of F.linear(inputs["x"], inputs["weight"]): 2 B D H operations forward,
    twice that again backward (grad input and grad weight)."""
    x, weight = inputs["x"], inputs["weight"]
    forward = 2 * x.shape[0] * x.shape[1] * weight.shape[0]
    return forward * (3 if backward else 1)


def nbytes(*tensors: torch.Tensor) -> int:
    """The bytes of the tensors' elements: the unit of a benchmark case's memory floor."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Bench:
    """How `aefast bench` and the pytest-benchmark cases time an op (aefast/bench/cases.py)."""

    make: Callable  # (rows, cols, dtype, device) -> {input name: tensor}
    call: Callable  # (public op, **inputs) -> outputs
    reference: Callable  # (**inputs) -> the same outputs, in plain PyTorch
    bytes_moved: Callable  # (inputs, backward) -> the bytes the op must move at minimum
    differentiable: tuple[str, ...] = ()  # inputs that take a gradient
    # Inductor spends over ten minutes on the plain-PyTorch Philox of the noise ops'
    # references on CPU: those are compared against the eager reference only.
    compile_reference: bool = True
    params: str = ""  # the case's settings besides its inputs' shapes, as the tables show them
    # The call a user would write with PyTorch alone, (label, (**inputs) -> outputs), where
    # it differs from the reference (torch.topk, F.embedding_bag, torch.rand_like ...).
    library: tuple[str, Callable] | None = None
    # For an op built around a matmul, (inputs, backward) -> the floating-point operations
    # of that matmul as F.linear does it (forward, and backward for grad input and weight):
    # its floor is then the measured matmul rate, not the copy bandwidth.
    flops: Callable | None = None
    # For such an op, the most time it may take against F.linear on the same inputs
    # (issue 15: 1.1 for noisy_linear, 1.2 for the fused encoder): `aefast bench` calls
    # it out below 1 / that share of the matmul. Unset, the goal is half of the floor.
    matmul_ratio_goal: float | None = None
    # For a memory-bound op held to more than half its floor, that share (issue 15: 60%
    # for reparameterize). Unset, half.
    copy_share_goal: float | None = None


@dataclass
class Operator:
    name: str
    family: str
    function: Callable  # the public function
    uses: tuple[str, ...]
    gpu_preference: tuple[str, ...] | None
    bench: Bench | None
    backends: tuple[str, ...] = ()  # with every kernel the op uses; `reference` always
    # Kernels the body takes instead of one of `uses` on the backends that have them
    # (ops.get(name, fallback)); they do not decide which backends can run the op.
    prefers: tuple[str, ...] = ()

    @property
    def kernel_backends(self) -> tuple[str, ...]:
        return tuple(b for b in self.backends if b != "reference")


OPERATORS: dict[str, Operator] = {}


def operator(*, uses: Sequence[str], checks: Sequence[Callable[[dict], None]] = (),
             device: str | None = None, gpu_preference: Sequence[str] | None = None,
             bench: Bench | None = None, prefers: Sequence[str] = ()):
    """Declare the public op whose body follows (see the module doc). `device` names
    the argument whose device picks the backend (default: the first); `prefers`, the
    kernels it takes where a backend has them, else one of `uses`."""

    def declare(body: Callable) -> Callable:
        params = list(inspect.signature(body).parameters.values())[1:]  # after `ops`
        bind = _binder(body.__name__, params)
        where = device or params[0].name
        unknown = [u for u in (*uses, *prefers) if u not in KERNELS]
        if unknown:
            raise ValueError(f"{body.__name__} uses undeclared kernels {unknown}")
        op = Operator(body.__name__, body.__module__.rsplit(".", 1)[-1], body, tuple(uses),
                      tuple(gpu_preference) if gpu_preference else None, bench,
                      tuple(b for b in BACKENDS if all(b in KERNELS[u].ops for u in uses)), tuple(prefers))

        @functools.wraps(body)
        def public(*args, **kwargs):
            bound = bind(args, kwargs)
            for check in checks:
                check(bound)
            name = backends.resolve(bound[where].device, op.name, op.backends, op.gpu_preference)
            return body(kernels(name), **bound)

        public.__signature__ = inspect.Signature(params)
        op.function = public
        OPERATORS[op.name] = op
        return public

    return declare


def _binder(name: str, params: list[inspect.Parameter]):
    """Arguments by name, defaults filled in, as Python binds them (plain dict work, so
    torch.compile traces it)."""
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    names = {p.name for p in params}
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = [p.name for p in params if p.default is p.empty]

    def bind(args: tuple, kwargs: dict) -> dict:
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes {len(positional)} positional arguments but {len(args)} were given")
        bound = dict(defaults)
        bound.update(zip(positional, args))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            if key in positional[:len(args)]:
                raise TypeError(f"{name}() got multiple values for argument {key!r}")
            bound[key] = value
        missing = [n for n in required if n not in bound]
        if missing:
            raise TypeError(f"{name}() missing required arguments: {', '.join(missing)}")
        return bound

    return bind
