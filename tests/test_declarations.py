"""What aefast/ops/_declare.py derives from each op's one declaration: the public
function and its signature, the checks run before every backend (the reference too),
the backends an op has, the benchmark cases."""

import contextlib
import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

import aefast as ae
from aefast import backends
from aefast.bench.cases import CASES
from aefast.ops._declare import KERNELS, OPERATORS, kernels
from conftest import dtypes_for, op_backends

PUBLIC_OPS = sorted(n for n in ae.__all__ if callable(getattr(ae, n)) and n not in (
    "available_backends", "backend", "current_backend", "load_run"))


def test_every_public_op_is_declared_once_with_a_benchmark_case():
    assert sorted(OPERATORS) == PUBLIC_OPS
    for name, op in OPERATORS.items():
        assert getattr(ae, name) is op.function
        assert op.family in ("kl", "topk", "decode", "noise", "jumprelu")
        assert CASES[name].kernels == op.kernel_backends
        assert "reference" in op.backends


def test_every_kernel_is_registered_once_per_implementation():
    for name, k in KERNELS.items():
        assert set(k.backends) <= set(backends.BACKENDS)
        if "triton" in k.ops:
            assert k.ops["triton"] is getattr(torch.ops.aefast, f"{name}_triton").default
        if backends.CPP_BUILT and k.native is not None:
            assert k.ops["cpp"] is getattr(torch.ops.aefast, name).default
        if "cuda" in k.ops:
            assert k.ops["cuda"] is k.ops["cpp"]  # one op, a kernel per dispatch key


def test_the_public_signature_is_the_declared_one_without_ops():
    params = inspect.signature(ae.topk_sparse).parameters
    assert list(params) == ["x", "k", "relu"] and params["relu"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "Per row of x" in ae.topk_sparse.__doc__
    x = torch.randn(3, 5)
    assert torch.equal(ae.topk_sparse(x, k=2)[1], ae.topk_sparse(x, 2)[1])
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        ae.topk_sparse(x, kk=2)
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3"):
        ae.topk_sparse(x, 2, False)
    with pytest.raises(TypeError, match="missing required arguments: k"):
        ae.topk_sparse(x)
    with pytest.raises(TypeError, match="multiple values for argument 'k'"):
        ae.topk_sparse(x, 2, k=2)


def small_inputs(op):
    return OPERATORS[op].bench.make(8, 64, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_the_checks_run_before_every_backend_the_reference_too(op):
    declared = OPERATORS[op]
    inputs = small_inputs(op)
    first = next(iter(inputs))
    inputs[first] = inputs[first].tolist()
    for backend in ["reference", *(b for b in ae.available_backends("cpu") if b in declared.kernel_backends)]:
        with ae.backend(backend), pytest.raises(ValueError, match=rf"^{first} must be a torch\.Tensor, got list$"):
            declared.bench.call(declared.function, **inputs)


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_each_backend_runs_its_own_kernels(op, monkeypatch):
    """The body gets the chosen backend's kernels: with those of `cpp` replaced by a
    spy, the op under `cpp` calls it and the op under `reference` does not."""
    declared = OPERATORS[op]
    if "cpp" not in ae.available_backends("cpu"):
        pytest.skip("aefast._C is not built")
    calls = []
    preferred = [name for name in declared.prefers if "cpp" in KERNELS[name].ops]
    for name in (*declared.uses, *preferred):
        real = KERNELS[name].ops["cpp"]
        monkeypatch.setitem(KERNELS[name].ops, "cpp", lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for backend, expected in (("reference", []), ("cpp", list(declared.uses))):
        calls.clear()
        with ae.backend(backend):
            declared.bench.call(declared.function, **small_inputs(op))
        if backend == "cpp" and preferred:  # the preferred kernel stands in for one it uses
            assert set(preferred) <= set(calls) <= set(expected) | set(preferred), calls
        else:
            assert sorted(set(calls)) == sorted(expected), backend


def test_a_new_kernel_is_one_declaration_and_the_matrix_picks_it_up():
    """In a fresh process: an op declared with a reference and a Python kernel for cpp
    is registered (fake, autograd), chosen by auto on CPU, and listed for the tests."""
    code = textwrap.dedent("""
        import torch
        import aefast
        from aefast.ops._declare import OPERATORS, kernel, operator
        def twice(x):
            return x * 2
        kernel("twice_test_only(Tensor x) -> Tensor", fake=torch.empty_like, reference=twice, native=twice,
               setup=lambda ctx, inputs, output: None, backward=lambda ops, ctx, g: 2 * g)
        @operator(uses=("twice_test_only",))
        def twice_test_only(ops, x):
            return ops.twice_test_only(x)
        assert OPERATORS["twice_test_only"].kernel_backends == ("cpp", "cuda"), OPERATORS["twice_test_only"].backends
        x = torch.randn(3, requires_grad=True)
        twice_test_only(x).sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 2.0))
        torch.library.opcheck(torch.ops.aefast.twice_test_only.default, (torch.randn(3, requires_grad=True),))
        print("ok")
    """)
    if not backends.CPP_BUILT:
        pytest.skip("aefast._C is not built")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_kernels_of_a_backend_name_what_they_lack():
    with pytest.raises(AttributeError, match="'triton' has no kernel 'scatter_rows'"):
        kernels("triton").scatter_rows  # noqa: B018


def test_a_backward_gets_the_kernels_of_the_device_it_runs_on():
    """The native implementation serves cpp and cuda: its backward on CUDA tensors must
    not reach for a CPU-only kernel (scatter_rows)."""
    from aefast.ops._declare import backward_kernels

    assert backward_kernels("native", torch.device("cpu")) is kernels("cpp")
    assert backward_kernels("native", torch.device("cuda", 1)) is kernels("cuda")
    assert backward_kernels("triton", torch.device("cuda")) is kernels("triton")
    assert kernels("cuda").get("scatter_rows") is None  # so the top-k backward scatters with torch there


READ_IN_PART = {"sparse_decode": {"weight"}}  # only the rows its indices name
# Dense top-k outputs whose backward gathers the gradient where the winners lie only.
GRADIENT_READ_IN_PART = {"topk_mask", "batch_topk", "lifetime_topk", "spatial_wta"}


@pytest.mark.parametrize("op", sorted(CASES))
def test_a_benchmark_floor_counts_at_least_what_the_op_must_read_and_write(op):
    """The copy floor is the bytes an op must move: every input it reads whole and
    every output forward; backward, also the gradients of its outputs (read) and of
    its differentiable inputs (written). An undercount would flatter the op, and so
    would an overcount (a dense top-k's backward reads its output's gradient where the
    winners lie only: its own count says how much). A 0-dim output, a penalty, is a
    register, not memory traffic."""
    case = CASES[op]
    inputs = case.inputs("small", torch.float32, torch.device("cpu"))
    leaves = {k: (v.detach().requires_grad_(True) if k in case.differentiable else v) for k, v in inputs.items()}
    out = case.aefast(**leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor) and o.dim() > 0]
    read = [t for k, t in inputs.items() if isinstance(t, torch.Tensor) and k not in READ_IN_PART.get(op, ())]
    forward = sum(t.numel() * t.element_size() for t in [*read, *outs])
    gradients_read = [] if op in GRADIENT_READ_IN_PART else [o for o in outs if o.requires_grad]
    backward = forward + sum(o.numel() * o.element_size() for o in gradients_read) + sum(
        inputs[k].numel() * inputs[k].element_size() for k in case.differentiable)
    assert case.bytes_moved(inputs, False) >= forward
    assert case.bytes_moved(inputs, True) >= backward


def test_a_kernel_without_a_derivative_is_an_error_not_zero():
    """Autograd's fallback for a C++ op without a formula gives zero gradients with one
    warning (a double backward through the backward kernels said 0 before they had
    formulas). A kernel declared without one says so, by name."""
    if not backends.CPP_BUILT:
        pytest.skip("aefast._C is not built")
    assert [name for name, k in KERNELS.items() if k.backward is None] == ["corrupt_window", "corrupt_window_and_mask"]
    x = torch.rand(4, 6, requires_grad=True)
    window = kernels("cpp").corrupt_window(x, 0, 0, 6, "masking", 0.3, torch.tensor(1), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="aefast::corrupt_window has no derivative"):
        window.sum().backward()
    # It writes its gradient window in place, which takes no formula: refused where one is needed.
    args = (0, 0, 6, "masking", 0.3, torch.tensor(1), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="aefast::corrupt_window_and_mask has no derivative"):
        kernels("cpp").corrupt_window_and_mask(x, torch.rand(4, 6), *args)
    with torch.no_grad():
        kernels("cpp").corrupt_window_and_mask(x, torch.rand(4, 6), *args)


@pytest.mark.parametrize("op", sorted(OPERATORS))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_every_op_runs_meta_and_fake_tensors_with_the_shapes_of_a_real_run(op, backend):
    """Meta tensors (shape inference, `torch.device("meta")` model construction) and
    FakeTensorMode: auto takes the native ops' registered fakes; no check reads a value
    (sparse_decode's index range, an unseeded noise op's seed draw) or asks autocast
    about a device that has none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = OPERATORS[op].bench

    def run(device, mode=None):
        with mode or contextlib.nullcontext():
            return shapes(case.make(5, 37, torch.float32, torch.device(device)))

    def shapes(inputs):
        for name in case.differentiable:
            inputs[name].requires_grad_()
        with ae.backend(backend):
            out = case.call(getattr(ae, op), **inputs)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
        loss = sum(t.sum() for t in outs if t.is_floating_point())
        grads = torch.autograd.grad(loss, [inputs[n] for n in case.differentiable], allow_unused=True)
        return [(t.shape, t.dtype) for t in (*outs, *grads) if t is not None]

    assert run("meta") == run("cpu") == run("cpu", FakeTensorMode())
    if op in UNSEEDED:  # seed=None: drawn on the device, not read back
        with FakeTensorMode():
            out = UNSEEDED[op](**case.make(5, 37, torch.float32, torch.device("cpu")))
        assert (out if isinstance(out, tuple) else (out,))[0].shape[0] == 5


UNSEEDED = {
    "corrupt": lambda x: ae.corrupt(x, "masking", 0.3),
    "noisy_linear": lambda x, weight, bias: ae.noisy_linear(x, weight, bias, "gaussian", 0.3),
    "reparameterize": lambda mu, logvar: ae.reparameterize(mu, logvar),
}


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_every_op_compiles_fullgraph_with_dynamic_shapes(op):
    """torch.compile(fullgraph=True, dynamic=True): float arguments may arrive as symbolic
    floats, which the checks must compare, not pass to math; the reference's NaN check
    of the top-k family becomes an assertion in the graph, which still fires."""
    case = OPERATORS[op].bench
    for backend in ("cpp", "reference"):
        torch._dynamo.reset()
        inputs = case.make(5, 37, torch.float32, torch.device("cpu"))
        with ae.backend(backend):
            eager = case.call(getattr(ae, op), **inputs)
            compiled = torch.compile(lambda **kw: case.call(getattr(ae, op), **kw),
                                     fullgraph=True, dynamic=True, backend="aot_eager")(**inputs)
        torch.testing.assert_close(compiled, eager)
    if op == "topk_sparse":
        torch._dynamo.reset()
        x = torch.randn(5, 37)
        x[2, 3] = float("nan")
        with ae.backend("reference"), pytest.raises(RuntimeError, match="x contains NaN"):
            torch.compile(lambda x: ae.topk_sparse(x, 3), fullgraph=True, backend="aot_eager")(x)


_X, _W = torch.rand(6, 10), torch.randn(4, 10)
BAD_ARGUMENTS = {  # found by a review: each passed silently or raised something unnamed
    "relu=None": (lambda: ae.topk_sparse(_X, 3, relu=None), "relu must be True or False"),
    "relu=1": (lambda: ae.topk_mask(_X, 3, relu=1), "relu must be True or False"),
    "relu='no'": (lambda: ae.batch_topk(_X, 3, relu="no"), "relu must be True or False"),
    "beta=True": (lambda: ae.kl_sparsity(_X, 0.1, True), "beta must be a finite number >= 0"),
    "bias=list": (lambda: ae.noisy_linear(_X, _W, [0.0] * 4, "masking", 0.3), "bias must be None or a tensor"),
    "encoder bias=list": (lambda: ae.topk_encode(_X, _W, [0.0] * 4, 2), "bias must be None or a tensor"),
    "Corrupt low=nan": (lambda: ae.nn.Corrupt("salt_pepper", 0.3, low=float("nan")), "low must be a finite"),
    "NoisyLinear high=inf": (lambda: ae.nn.NoisyLinear(10, 4, "salt_pepper", 0.3, high=float("inf")),
                             "high must be a finite"),
    "TopK relu=None": (lambda: ae.nn.TopK(3, relu=None), "relu must be True or False"),
    # untested until a review of the suite named them
    "empty rows": (lambda: ae.topk_sparse(torch.empty(0, 5), 2), r"x must not be empty, got shape \(0, 5\)"),
    "empty columns": (lambda: ae.topk_mask(torch.empty(3, 0), 1), r"x must not be empty, got shape \(3, 0\)"),
    "corrupt low=nan": (lambda: ae.corrupt(_X, "salt_pepper", 0.2, low=float("nan")), "low must be a finite number"),
    "noisy_linear empty": (lambda: ae.noisy_linear(torch.empty(0, 10), _W, None, "masking", 0.2),
                           r"x must be non-empty with at least 1 dimension, got shape \(0, 10\)"),
    "jumprelu integer z": (lambda: ae.jumprelu(torch.ones(3, 4, dtype=torch.long), torch.ones(4, dtype=torch.long)),
                           "z must be float32, float16, bfloat16 or float64, got torch.int64"),
    "dead elsewhere": (lambda: ae.topk_encode_aux(_X, _W, None, 2, torch.zeros(4, dtype=torch.bool, device="meta"), 2),
                       "dead must be on x's device cpu, got meta"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_is_a_value_error_naming_it(case):
    call, message = BAD_ARGUMENTS[case]
    with pytest.raises(ValueError, match="^" + message):  # the argument's name first
        call()


def test_numpy_scalars_are_numbers_everywhere():
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(ae.jumprelu(_X, torch.full((10,), 0.3), np.float32(0.05))[0],
                               ae.jumprelu(_X, torch.full((10,), 0.3), 0.05)[0])
    torch.testing.assert_close(ae.nn.TopK(np.int64(3))(_X), ae.topk_mask(_X, 3))
    torch.testing.assert_close(ae.topk_mask(_X, 3, relu=np.False_), ae.topk_mask(_X, 3, relu=False))
    torch.testing.assert_close(ae.kl_sparsity(_X, np.float32(0.25), np.float64(2.0)), ae.kl_sparsity(_X, 0.25, 2.0))


@pytest.mark.parametrize(("op", "device", "backend"), [  # in float64: where the backend runs it
    (op, *pair.values) for op in sorted(OPERATORS) for pair in op_backends(op)
    if pair.values[1] != "reference" and torch.float64 in dtypes_for(*pair.values)])
def test_every_op_differentiates_twice_as_the_reference(op, device, backend):
    """A gradient penalty (the squared gradient of a weighted loss, differentiated again)
    through each op on every backend here equals the reference backend's."""
    case = OPERATORS[op].bench
    inputs = case.make(6, 40, torch.float64, torch.device(device))

    def penalty_gradients(backend):
        args = {k: v.detach().clone().requires_grad_(k in case.differentiable) for k, v in inputs.items()}
        wrt = [args[k] for k in case.differentiable]
        with ae.backend(backend):
            out = case.call(getattr(ae, op), **args)
            outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.is_floating_point()]
            loss = sum((t * torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype, device=t.device).view_as(t)).square().sum()
                       for t in outs)
            grads = torch.autograd.grad(loss, wrt, create_graph=True)
            return torch.autograd.grad(sum(g.square().sum() for g in grads), wrt)

    # (reparameterize: the kernels' normals agree with the reference's to float32's precision)
    rtol, atol = (1e-5, 1e-5) if op == "reparameterize" else (1e-6, 1e-9)
    for got, want in zip(penalty_gradients(backend), penalty_gradients("reference")):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _another_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout: matrices column-major, images channels
    last, vectors every other element of a longer buffer."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if t.dim() == 1:
        wide = t.new_zeros(2 * t.numel())
        wide[::2] = t
        return wide[::2]
    return t


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_every_op_gives_the_same_results_on_inputs_of_another_layout(op):
    """Every input non-contiguous (transposed storage, strided vectors) on each CPU
    backend: the outputs and the gradients of the contiguous run, in float64."""
    case = OPERATORS[op].bench
    inputs = case.make(6, 40, torch.float64, torch.device("cpu"))
    assert any(_another_layout(t).stride() != t.stride() for t in inputs.values() if isinstance(t, torch.Tensor))

    def run(backend, layout):
        args = {k: layout(v).detach().requires_grad_(k in case.differentiable) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}
        with ae.backend(backend):
            out = case.call(getattr(ae, op), **args)
            outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.is_floating_point()]
            loss = sum((t * torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype, device=t.device).view(t.shape)).sum() for t in outs)
            return (*outs, *torch.autograd.grad(loss, [args[k] for k in case.differentiable]))

    backends_here = [b for b in ae.available_backends("cpu") if b in OPERATORS[op].kernel_backends]
    assert backends_here
    for backend in backends_here:
        for got, want in zip(run(backend, _another_layout), run(backend, lambda t: t), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{op} on {backend}")


def test_benchmark_counts_the_weight_rows_and_gradient_lines_an_op_touches():
    """sparse_decode reads each selected weight row once, however often it is drawn;
    a dense top-k's backward reads the 64-byte lines of its output's gradient that hold
    a winner (lifetime_topk's winners share lines)."""
    decode = CASES["sparse_decode"]
    inputs = decode.inputs("small", torch.float32, torch.device("cpu"))
    one_row = dict(inputs, indices=torch.zeros_like(inputs["indices"]))
    distinct, row_bytes = inputs["indices"].unique().numel(), inputs["weight"][0].nbytes
    assert distinct < inputs["indices"].numel()  # drawn twice somewhere: counted once
    assert decode.bytes_moved(inputs, False) - decode.bytes_moved(one_row, False) == (distinct - 1) * row_bytes
    # 64 rows of 16 float32 (a line each): every column's 4 winners (rate 0.05) in rows 60-63
    x = torch.arange(64.0).repeat_interleave(16).view(64, 16)
    assert CASES["lifetime_topk"].bytes_moved({"x": x}, True) == 3 * x.nbytes + 4 * 64
