"""The decode family: sparse_decode (the decoder of a top-k sparse autoencoder,
without a dense (B, L) code) and topk_encode (the fused top-k encoder, whose backward
is the decoder's kernels). Kernels: csrc/cpu/decode.cpp, csrc/cuda/decode.cu,
triton_kernels/decode.py; the selection is the top-k family's (aefast/ops/topk.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aefast import backends, reference
from aefast.ops.checks import autocast_inputs, check_linear_params
from aefast.ops.topk import TOPK_OPS, _check_k, _check_x

# ------------------------------------------------------------- sparse decoder


@torch.library.custom_op("aefast::sparse_decode_forward_triton", mutates_args=())
def _decode_forward_triton(
    values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    from aefast.triton_kernels import decode as kernels

    _check_indices_on_cpu(indices, weight.shape[0])
    return kernels.sparse_decode_forward(values, indices, weight, bias)


@torch.library.custom_op("aefast::sparse_decode_backward_triton", mutates_args=())
def _decode_backward_triton(
    grad_out: Tensor, values: Tensor, indices: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    from aefast.triton_kernels import decode as kernels

    _check_indices_on_cpu(indices, weight.shape[0])
    return kernels.sparse_decode_backward(grad_out, values, indices, weight)


def _check_indices_on_cpu(indices: Tensor, latents: int) -> None:
    """An index out of range raises on CPU, on every backend (the reference too), where
    reading the check costs nothing; on a GPU the kernels make its outputs NaN instead
    of stalling the host every call."""
    # Not while torch.compile traces (a data-dependent branch would break the graph):
    # the compiled call runs the ops, whose kernels check or read nothing out of range.
    if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling() and (
            bool(indices.min() < 0) or bool(indices.max() >= latents)):
        raise IndexError(f"aefast: indices must be in [0, {latents})")


# (forward, backward) of the sparse decoder per backend; one C++ op serves cpp and
# cuda (the dispatcher picks the CPU or CUDA kernel).
DECODE_OPS = {
    "triton": (
        torch.ops.aefast.sparse_decode_forward_triton.default,
        torch.ops.aefast.sparse_decode_backward_triton.default,
    )
}
if backends.CPP_BUILT:
    DECODE_OPS["cpp"] = DECODE_OPS["cuda"] = (
        torch.ops.aefast.sparse_decode_forward.default,
        torch.ops.aefast.sparse_decode_backward.default,
    )


def _register_decode(forward, backward) -> None:
    @torch.library.register_fake(forward)
    def _(values, indices, weight, bias):
        return values.new_empty((values.shape[0], weight.shape[1]))

    @torch.library.register_fake(backward)
    def _(grad_out, values, indices, weight):
        return torch.empty_like(values, memory_format=torch.contiguous_format), torch.empty_like(
            weight, memory_format=torch.contiguous_format
        )

    def setup(ctx, inputs, output):
        values, indices, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(values, indices, weight)

    def grads(ctx, grad_out):
        values, indices, weight = ctx.saved_tensors
        grad_values, grad_weight = backward(grad_out, values, indices, weight)
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (
            grad_values if ctx.needs_input_grad[0] else None,
            None,
            grad_weight if ctx.needs_input_grad[2] else None,
            grad_bias,
        )

    torch.library.register_autograd(forward, grads, setup_context=setup)


for _forward, _backward in dict.fromkeys(DECODE_OPS.values()):  # cpp and cuda share one op
    _register_decode(_forward, _backward)


# ---------------------------------------------------------------- top-k encoder


def _encoder_rows(latents: int) -> int:
    """Rows of the pre-activation computed at a time: about 8M elements (at 1024 x 768
    -> 16384 on 2 CPU threads, blocks of 1M took 2.2x as long: small matmuls)."""
    return max(16, (1 << 23) // max(latents, 1))


def _make_topk_encode(name: str, select, decode_forward, decode_backward):
    """The fused top-k encoder over one backend's selection and decoder ops."""

    @torch.library.custom_op(f"aefast::{name}", mutates_args=())
    def encode(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        # Row blocks: the (B, L) pre-activation never exists, only (rows, L) at a time.
        B, L = x.shape[0], weight.shape[0]
        values = x.new_empty((B, k))
        indices = torch.empty((B, k), dtype=torch.long, device=x.device)
        step = _encoder_rows(L)
        for r0 in range(0, B, step):
            pre = torch.nn.functional.linear(x[r0:r0 + step], weight, bias).relu_()
            values[r0:r0 + step], indices[r0:r0 + step] = select(pre, k, False)
        return values, indices

    @encode.register_fake
    def _(x, weight, bias, k):
        return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)

    def setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.has_bias = bias is not None
        ctx.latents = weight.shape[0]
        ctx.save_for_backward(x, weight, *output)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_values, _grad_indices):
        x, weight, values, indices = ctx.saved_tensors
        grad_pre = grad_values.to(values.dtype) * (values > 0)  # through the ReLU
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        # grad x = sum_k grad_pre[b, k] W[idx[b, k]]: the sparse decoder's forward;
        # grad W[l] = sum over (b, k) with idx = l of grad_pre[b, k] x[b]: its weight
        # gradient (deterministic, no atomics) with x in the place of grad_out.
        grad_x = decode_forward(grad_pre, indices, weight, None) if need_x else None
        grad_weight = decode_backward(x, grad_pre, indices, weight)[1] if need_weight else None
        grad_bias = None
        if ctx.has_bias and need_bias:
            grad_bias = grad_pre.new_zeros(ctx.latents).index_add_(0, indices.flatten(), grad_pre.flatten())
        return grad_x, grad_weight, grad_bias, None

    encode.register_autograd(backward, setup_context=setup)
    return getattr(torch.ops.aefast, name).default


# The fused encoder per backend with both a top-k and a decoder kernel. cpp and cuda
# share one op, as their selection and decoder ops are the same C++ ops: its Python
# body runs on either device and the C++ ops it calls dispatch on the tensors' device.
ENCODE_OPS = {"triton": _make_topk_encode("topk_encode_triton", TOPK_OPS["triton"], *DECODE_OPS["triton"])}
if backends.CPP_BUILT:
    ENCODE_OPS["cpp"] = ENCODE_OPS["cuda"] = _make_topk_encode("topk_encode", TOPK_OPS["cpp"], *DECODE_OPS["cpp"])


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out[b] = bias + sum_k values[b, k] * weight[indices[b, k]]`` for values and
    int64 indices of shape (B, k) and weight (L, D): the decoder of a top-k sparse
    autoencoder without a dense (B, L) code, forward or backward.

    The weight gradient is deterministic: the (row, slot) pairs are sorted by latent
    and each latent's gradient row is reduced in (row, slot) order, with no atomics,
    so every run gives the same bits. Under autocast, values, weight and bias run in
    the autocast dtype, as for a matmul."""
    _check_x(values, "values")
    values, weight, bias = autocast_inputs(values.device, values, weight, bias)
    if not isinstance(indices, Tensor) or indices.shape != values.shape or indices.dtype != torch.long:
        raise ValueError(f"indices must be an int64 tensor of the values' shape {tuple(values.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.dtype != values.dtype:
        raise ValueError(f"weight must be 2-D (L, D) of the values' dtype {values.dtype}")
    if bias is not None and (bias.shape != (weight.shape[1],) or bias.dtype != values.dtype):
        raise ValueError(f"bias must be None or of shape ({weight.shape[1]},) and dtype {values.dtype}")
    _check_indices_on_cpu(indices, weight.shape[0])
    name = backends.resolve(values.device, "sparse_decode", tuple(DECODE_OPS))
    if name == "reference":
        return reference.sparse_decode(values, indices, weight, bias)
    return DECODE_OPS[name][0](values, indices, weight, bias)


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The fused top-k encoder of a sparse autoencoder:
    ``topk_sparse(relu(x @ weight.T + bias), k)`` for x (B, D) and weight (L, D),
    without ever holding the (B, L) pre-activation: forward, it is computed a block
    of rows at a time (about 8M elements) and reduced to the k winners; backward, the
    gradients come from the winners alone (the sparse decoder's kernels: grad x is a
    sparse decode of the winners' gradients through W, grad W a deterministic
    per-latent scatter of them times x). ReLU before selection: a row with fewer
    than k positive units fills up with zeros at the lowest remaining indices.
    Under autocast, x, weight and bias run in the autocast dtype."""
    _check_x(x)
    x, weight, bias = autocast_inputs(x.device, x, weight, bias)
    check_linear_params(x, weight, bias, "L")
    k = _check_k(k, weight.shape[0], "the number of latents")
    name = backends.resolve(x.device, "topk_encode", tuple(ENCODE_OPS))
    if name == "reference":
        return reference.topk_encode(x, weight, bias, k)
    return ENCODE_OPS[name](x, weight, bias, k)
