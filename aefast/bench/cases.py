"""The benchmark case of every operator: how to build its inputs at a named size, how
to run it (forward, or forward + backward), its plain-PyTorch reference, and the
bytes it must move at minimum (the memory floor used for GB/s).

A case's `run(fn, inputs, backward)` calls `fn` (the aefast op under a backend, the
eager reference, or the compiled reference) with the inputs; with backward=True it
also back-propagates a fixed random gradient into every input that takes one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import aefast as ae
from aefast import reference

# Named sizes per device type: small, medium, and large (large fills the device).
SIZES = {
    "cpu": {"small": (256, 1024), "medium": (1024, 4096), "large": (4096, 4096)},
    "cuda": {"small": (1024, 4096), "medium": (4096, 16384), "large": (4096, 65536)},
}


@dataclass(frozen=True)
class Case:
    op: str
    make: Callable[[int, int, torch.dtype, torch.device], dict]  # rows, cols -> named inputs
    aefast: Callable[..., object]  # the public op
    reference: Callable[..., object]  # the same function in plain PyTorch
    bytes_moved: Callable[[dict, bool], int]  # inputs, backward -> minimum bytes
    kernels: tuple[str, ...] = ("cpp", "triton", "cuda")  # backends with a kernel
    differentiable: tuple[str, ...] = ()  # inputs that take a gradient
    # Inductor spends over ten minutes on the plain-PyTorch Philox of the noise ops'
    # references on CPU: those are compared against the eager reference only.
    compile_reference: bool = True

    def inputs(self, size: str, dtype: torch.dtype, device: torch.device) -> dict:
        rows, cols = SIZES[device.type][size]
        torch.manual_seed(0)
        return self.make(rows, cols, dtype, device)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(case: Case, fn, inputs: dict, backward: bool) -> None:
    """One call of fn on the case's inputs (fresh leaves), then its backward."""
    if not backward:
        with torch.no_grad():
            fn(**inputs)
        return
    leaves = {k: (v.detach().requires_grad_(True) if k in case.differentiable else v) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point() and o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


# ------------------------------------------------------------------ the cases

RHO, BETA, K, LEVEL = 0.05, 3.0, 32, 0.3


def _matrix(rows, cols, dtype, device, low=0.02, high=0.98):
    return torch.empty(rows, cols, device=device).uniform_(low, high).to(dtype)


def _topk_bytes(inp, backward):
    x = inp["x"]
    out = x.shape[0] * K * (x.element_size() + 8)
    return nbytes(x) + out + (nbytes(x) if backward else 0)


def _dense_bytes(reads_writes_forward, reads_writes_backward):
    """Whole passes over the first input's size, forward and backward."""
    def count(inp, backward):
        n = nbytes(next(iter(inp.values())))
        return int(n * (reads_writes_forward + (reads_writes_backward if backward else 0)))
    return count


def _decode_inputs(rows, cols, dtype, device):
    latents, width = 4 * cols, 768
    return {
        "values": torch.rand(rows, K, device=device).to(dtype),
        "indices": torch.randint(0, latents, (rows, K), device=device),
        "weight": (torch.randn(latents, width, device=device) * 0.02).to(dtype),
    }


def _decode_bytes(inp, backward):
    values, weight = inp["values"], inp["weight"]
    rows_used = min(values.numel(), weight.shape[0]) * weight.shape[1] * weight.element_size()
    out = values.shape[0] * weight.shape[1] * weight.element_size()
    forward = nbytes(values, inp["indices"]) + rows_used + out
    return forward + ((out + rows_used + nbytes(weight) + nbytes(values)) if backward else 0)


def _encode_inputs(rows, cols, dtype, device):
    latents, width = 4 * cols, 768
    return {
        "x": torch.randn(rows, width, device=device).to(dtype),
        "weight": (torch.randn(latents, width, device=device) * width**-0.5).to(dtype),
        "bias": torch.zeros(latents, device=device).to(dtype),
    }


def _encode_bytes(inp, backward):
    x, weight = inp["x"], inp["weight"]
    forward = nbytes(x, weight) + x.shape[0] * K * (x.element_size() + 8)
    return forward + (nbytes(x, weight) * 2 if backward else 0)


def _linear_inputs(rows, cols, dtype, device):
    return {
        "x": torch.rand(rows, cols, device=device).to(dtype),
        "weight": (torch.randn(cols // 4, cols, device=device) * cols**-0.5).to(dtype),
        "bias": torch.zeros(cols // 4, device=device).to(dtype),
    }


def _linear_bytes(inp, backward):
    x, weight = inp["x"], inp["weight"]
    out = x.shape[0] * weight.shape[0] * x.element_size()
    return nbytes(x, weight) + out + ((out + 2 * nbytes(x, weight)) if backward else 0)


def _gaussian_inputs(rows, cols, dtype, device):
    return {"mu": torch.randn(rows, cols, device=device).to(dtype),
            "logvar": (0.1 * torch.randn(rows, cols, device=device)).to(dtype)}


CASES: dict[str, Case] = {
    c.op: c
    for c in [
        Case("kl_sparsity", lambda r, c, d, dev: {"a": _matrix(r, c, d, dev)},
             lambda a: ae.kl_sparsity(a, RHO, BETA), lambda a: reference.kl_sparsity(a, RHO, BETA),
             _dense_bytes(1, 1), differentiable=("a",)),
        Case("sigmoid_kl_sparsity", lambda r, c, d, dev: {"z": torch.randn(r, c, device=dev).to(d)},
             lambda z: ae.sigmoid_kl_sparsity(z, RHO, BETA), lambda z: reference.sigmoid_kl_sparsity(z, RHO, BETA),
             _dense_bytes(2, 3), differentiable=("z",)),
        Case("contractive_penalty",
             lambda r, c, d, dev: {"h": _matrix(r, c, d, dev), "weight": torch.randn(c, 784, device=dev).to(d)},
             ae.contractive_penalty, reference.contractive_penalty,
             lambda inp, bw: nbytes(inp["h"], inp["weight"]) * (3 if bw else 1), differentiable=("h", "weight")),
        Case("topk_sparse", lambda r, c, d, dev: {"x": torch.randn(r, c, device=dev).to(d)},
             lambda x: ae.topk_sparse(x, K), lambda x: reference.topk_sparse(x, K), _topk_bytes,
             differentiable=("x",)),
        Case("topk_mask", lambda r, c, d, dev: {"x": torch.randn(r, c, device=dev).to(d)},
             lambda x: ae.topk_mask(x, K), lambda x: reference.topk_mask(x, K), _dense_bytes(2, 1),
             differentiable=("x",)),
        Case("batch_topk", lambda r, c, d, dev: {"x": torch.randn(r, c, device=dev).to(d)},
             lambda x: ae.batch_topk(x, K), lambda x: reference.batch_topk(x, K), _dense_bytes(2, 1),
             differentiable=("x",)),
        Case("lifetime_topk", lambda r, c, d, dev: {"x": torch.randn(r, c, device=dev).to(d)},
             lambda x: ae.lifetime_topk(x, 0.05), lambda x: reference.lifetime_topk(x, 0.05), _dense_bytes(2, 1),
             differentiable=("x",)),
        Case("spatial_wta", lambda r, c, d, dev: {"x": torch.randn(r // 4, 16, 8, c // 32, device=dev).to(d)},
             ae.spatial_wta, reference.spatial_wta, _dense_bytes(2, 1), differentiable=("x",)),
        Case("sparse_decode", _decode_inputs, ae.sparse_decode, reference.sparse_decode, _decode_bytes,
             differentiable=("values", "weight")),
        Case("topk_encode", _encode_inputs, lambda x, weight, bias: ae.topk_encode(x, weight, bias, K),
             lambda x, weight, bias: reference.topk_encode(x, weight, bias, K), _encode_bytes,
             differentiable=("x", "weight", "bias")),
        Case("corrupt", lambda r, c, d, dev: {"x": torch.rand(r, c, device=dev).to(d)},
             lambda x: ae.corrupt(x, "masking", LEVEL, seed=1),
             lambda x: reference.corrupt(x, "masking", LEVEL, torch.tensor(1, device=x.device)),
             _dense_bytes(2, 2), differentiable=("x",), compile_reference=False),
        Case("noisy_linear", _linear_inputs, lambda x, weight, bias: ae.noisy_linear(x, weight, bias, "masking", LEVEL, seed=1),
             lambda x, weight, bias: reference.noisy_linear(x, weight, bias, "masking", LEVEL,
                                                            torch.tensor(1, device=x.device)),
             _linear_bytes, differentiable=("x", "weight", "bias"), compile_reference=False),
        Case("reparameterize", _gaussian_inputs, lambda mu, logvar: ae.reparameterize(mu, logvar, seed=1),
             lambda mu, logvar: reference.reparameterize(mu, logvar, torch.tensor(1, device=mu.device)),
             _dense_bytes(1.5, 2.5), differentiable=("mu", "logvar"), compile_reference=False),
    ]
}
