"""The decode family: sparse_decode (the decoder of a top-k sparse autoencoder,
without a dense (B, L) code) and topk_encode (the fused top-k encoder, whose backward
is the decoder's kernels). Kernels: csrc/cpu/decode.cpp, csrc/cuda/decode.cu,
triton_kernels/decode.py; the selection is the top-k family's (aefast/ops/topk.py).
"""

from __future__ import annotations

import functools

import torch
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
)
from aefast.ops.checks import (
    autocast_inputs,
    autocast_weight,
    check_linear_params,
    mixed_precision,
    without_values,
)
from aefast.ops.topk import K, check_dense, check_k

# ---------------------------------------------------------------- kernels


def _triton():
    from aefast.triton_kernels import decode

    return decode


def _check_indices_on_cpu(indices: Tensor, latents: int) -> None:
    """An index out of range raises on CPU, on every backend (the reference too), where
    reading the check costs nothing; on a GPU the kernels make its outputs NaN instead
    of stalling the host every call."""
    # Not while torch.compile traces (a data-dependent branch would break the graph: the
    # compiled call runs the kernels, which read nothing out of range), nor on fake tensors.
    if indices.device.type == "cpu" and indices.numel() and not without_values(indices) and (
            bool(indices.min() < 0) or bool(indices.max() >= latents)):
        raise IndexError(f"aefast: indices must be in [0, {latents})")


def _decode_forward_triton(values, indices, weight, bias):
    _check_indices_on_cpu(indices, weight.shape[0])  # called directly, as opcheck does
    return _triton().sparse_decode_forward(values, indices, weight, bias)


def _decode_backward_triton(grad_out, values, indices, weight, values_grad=True):
    _check_indices_on_cpu(indices, weight.shape[0])
    return _triton().sparse_decode_backward(grad_out, values, indices, weight, values_grad)


def _decode_setup(ctx, inputs, output):
    values, indices, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(values, indices, weight)


def _decode_backward(ops, ctx, grad_out):
    values, indices, weight = ctx.saved_tensors
    grad_values, grad_weight = ops.sparse_decode_backward(grad_out, values, indices, weight)
    grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    need = ctx.needs_input_grad
    return grad_values if need[0] else None, None, grad_weight if need[2] else None, grad_bias


def _decode_grad_setup(ctx, inputs, output):
    *tensors, ctx.values_grad = inputs
    ctx.save_for_backward(*tensors)


def _decode_grad_backward(ops, ctx, grad_of_values, grad_of_weight):
    """Both gradients are bilinear, in (grad_out, weight) and in (grad_out, values): their
    derivatives are the decoder's own kernels again (a double backward, e.g. through the
    fused encoder's backward, which is built from them)."""
    grad_out, values, indices, weight = ctx.saved_tensors
    upstream_weight = grad_of_weight.to(weight.dtype)
    d_grad_out = ops.sparse_decode_forward(values, indices, upstream_weight, None)
    d_values = ops.sparse_decode_backward(grad_out, values, indices, upstream_weight)[0]
    d_weight = None
    if ctx.values_grad:  # grad_values[b, k] = <grad_out[b], W[idx[b, k]]>
        upstream = grad_of_values.to(values.dtype)
        d_grad_out = d_grad_out + ops.sparse_decode_forward(upstream, indices, weight, None)
        d_weight = ops.sparse_decode_backward(grad_out, upstream, indices, weight, False)[1]
    return d_grad_out.to(grad_out.dtype), d_values, None, d_weight, None


# out[b] = bias + sum_k values[b, k] * weight[indices[b, k]], weight (L, D).
kernel(
    "sparse_decode_forward(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor",
    fake=lambda values, indices, weight, bias: values.new_empty((values.shape[0], weight.shape[1])),
    reference=reference.sparse_decode,
    native=CPP,
    triton=_decode_forward_triton,
    setup=_decode_setup, backward=_decode_backward,
)
# Gradients of values and weight; the weight gradient is reduced per latent in (row,
# slot) order: deterministic, no atomics. With values_grad=False, grad_values is an
# empty tensor and costs nothing: the fused encoder's weight gradient is this one with
# x in the place of grad_out, and its "values gradient" (B * K dot products of D, a
# decoder forward's worth) would be thrown away.
kernel(
    "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weight, "
    "bool values_grad=True) -> (Tensor grad_values, Tensor grad_weight)",
    fake=lambda grad_out, values, indices, weight, values_grad=True: (
        dense_like(values) if values_grad else values.new_empty((0,)), dense_like(weight)),
    reference=None,
    native=CPP,
    triton=_decode_backward_triton,
    setup=_decode_grad_setup, backward=_decode_grad_backward,
)


# Elements of the pre-activation computed at a time (32 MiB in float32): at 1024 x 768
# -> 16384 on 2 CPU threads, blocks of 1M elements took 2.2x as long (small matmuls).
ENCODER_BLOCK_ELEMENTS = 1 << 23
ENCODER_BLOCK_ROWS = 1024
# On a GPU, larger blocks (256 MiB of float32): each block is a few launches, and with
# the CPU's blocks (32 of 1024 x 8192) the forward at 4096 x 768 -> 65536 took 54 ms on
# an H200, against 46 ms for F.linear and torch.topk over the whole pre-activation.
GPU_ENCODER_BLOCK_ELEMENTS = 1 << 26
GPU_ENCODER_BLOCK_ROWS = 4096


def _encoder_tile(rows: int, latents: int, gpu: bool = False) -> tuple[int, int]:
    """(rows, latents) of a block of the pre-activation. Up to 1024 rows a block (GPU:
    4096), and as many latents as fit: each block row-range reads the weight once, so
    the weight is read ceil(B / 1024) times (blocks of rows alone, at L = 131072, read it
    16 times per 1024 rows: 6 GiB, slower than the dense peer)."""
    elements, most_rows = (GPU_ENCODER_BLOCK_ELEMENTS, GPU_ENCODER_BLOCK_ROWS) if gpu else \
        (ENCODER_BLOCK_ELEMENTS, ENCODER_BLOCK_ROWS)
    block_rows = min(rows, most_rows)
    return block_rows, max(1, min(latents, elements // block_rows))


def _merged(select, parts: list[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """The top k of the candidates of every latent block (each block's top k, in latent
    order, indices already global): ties still go to the lower latent index, since the
    candidates of lower blocks come first and each block's are in its tie order."""
    if len(parts) == 1:
        return parts[0]
    values, where = select(torch.cat([v for v, _ in parts], 1), k, False)
    return values, torch.cat([i for _, i in parts], 1).gather(1, where)


def _preactivation(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, relu: bool) -> Tensor:
    """x @ weight.T + bias into `out`, and with `relu` its ReLU: with a bias, in the
    matmul's epilogue (cuBLASLt on a GPU: no second pass over the block, 0.06 ms of a
    4096 x 16384 bfloat16 block on an H200; elsewhere addmm then relu)."""
    if not relu:
        return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)
    if bias is None:
        return torch.mm(x, weight.t(), out=out).relu_()
    return torch._addmm_activation(bias, x, weight.t(), out=out)


def _top_of_relu(select, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top k of relu(pre), ties to the lower index, from a block pre itself: on a CPU
    the ReLU is a pass of its own over the block (1.5 ms of a 1024 x 8192 float32 block's
    70 ms addmm in a slow phase, 1.9 of bfloat16's 17). Selecting, then clamping the
    winners, agrees with it wherever a row's k-th largest is positive. A row whose is not
    has fewer than k positive units in the block, and the ReLU's zeros go to the lowest
    indices among the rest, not to the largest negatives: such rows are selected again
    over their ReLU."""
    values, where = select(pre, k, True)
    short = (values[:, -1] == 0).nonzero().squeeze(1)  # values sorted: the k-th is the last
    if short.numel():
        values[short], where[short] = select(pre[short].clamp_min_(0.0), k, False)
    return values, where


def _encode_in_blocks(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                      dead: Tensor | None = None, k_aux: int = 0):
    """The fused encoder over `backend`'s selection kernel: the (B, L) pre-activation
    never exists, only a block of it at a time (`_encoder_tile`), each reduced to its
    top k candidates and those merged. With `dead`, a second selection from the same
    blocks: the top k_aux among the dead latents."""
    select = kernels(backend).topk_forward
    B, L = x.shape[0], weight.shape[0]
    values = x.new_empty((B, k))
    indices = torch.empty((B, k), dtype=torch.long, device=x.device)
    # On CPU the aux selection runs on each block's dead columns alone, gathered (reading
    # their number costs nothing there: no device to wait for), and the reference's
    # slots past the dead latents (-inf, clamped to 0) are put at the lowest live ones
    # after. Elsewhere, on the whole block with the live latents at -inf.
    dead_latents = None
    if dead is not None:
        aux_values = x.new_empty((B, k_aux))
        aux_indices = torch.empty((B, k_aux), dtype=torch.long, device=x.device)
        if x.device.type == "cpu":
            dead_latents = dead.nonzero().squeeze(1)  # in latent order
            aux_found = min(k_aux, dead_latents.numel())
            aux_values[:, aux_found:] = 0.0
            aux_indices[:, aux_found:] = (~dead).nonzero().squeeze(1)[:k_aux - aux_found]
        else:
            # -inf on the live latents, +inf on the dead: a block's minimum with it is the
            # reference's fill of -inf on the live ones (+inf and -0.0 kept), one broadcast
            # op (0.6 ms for a 1024 x 8192 block on a CPU, where masked_fill_ took 2.7).
            live_to_minus_inf = torch.where(dead, float("inf"), float("-inf")).to(x.dtype)
    block_rows, block_latents = _encoder_tile(B, L, gpu=x.device.type == "cuda")
    relu_in_selection = x.device.type == "cpu"  # no matmul epilogue to put it in (_top_of_relu)
    if dead_latents is not None:
        # Where each latent block's dead latents begin and end in dead_latents, and one
        # buffer for the largest block's gathered columns.
        dead_bounds = torch.searchsorted(dead_latents, torch.arange(0, L + block_latents, block_latents)).tolist()
        most_dead = max(b - a for a, b in zip(dead_bounds, dead_bounds[1:]))
        gathered = x.new_empty(block_rows * most_dead)
    # Every block in one buffer: a fresh 32 MiB block is fresh pages on a CPU (glibc maps
    # blocks that large anew each time), and faulting them in took 6.6 ms a block at
    # 1024 x 768 -> 16384, 4% of a training step; with 8 blocks a call at L = 65536, 8x that.
    buffer = x.new_empty(block_rows * block_latents)  # block_rows <= B
    for r0 in range(0, B, block_rows):
        rows = slice(r0, r0 + block_rows)
        parts, aux_parts = [], []
        for c0 in range(0, L, block_latents):
            cols = slice(c0, c0 + block_latents)
            # A float32 weight beside float16 or bfloat16 x (mixed precision) is cast a block
            # at a time for the matmul; the backward reads it as it is.
            x_block, w_block = x[rows], weight[cols].to(x.dtype)
            out = buffer[:x_block.shape[0] * w_block.shape[0]].view(x_block.shape[0], w_block.shape[0])
            b_block = None if bias is None else bias[cols].to(x.dtype)
            pre = _preactivation(x_block, w_block, b_block, out, relu=not relu_in_selection)
            if relu_in_selection:
                chosen, where = _top_of_relu(select, pre, min(k, pre.shape[1]))
            else:
                chosen, where = select(pre, min(k, pre.shape[1]), False)
            parts.append((chosen, where + c0))
            if dead_latents is not None:
                # The block's dead columns, in latent order: 1024 x 8192 with one in 8 dead,
                # gathering and selecting 3.7 ms against 4.8 for the minimum and a selection
                # over the whole block. torch.gather into a kept buffer, not index_select:
                # 1.1 against 1.5-3.9 ms for those 1024 x 1024.
                first, last = dead_bounds[c0 // block_latents], dead_bounds[c0 // block_latents + 1]
                if last > first:
                    block_dead = dead_latents[first:last]
                    columns = gathered[:pre.shape[0] * (last - first)].view(pre.shape[0], last - first)
                    torch.gather(pre, 1, (block_dead - c0).expand(pre.shape[0], -1), out=columns)
                    # The ReLU here, not after: most rows' dead units are short of positive ones.
                    chosen, where = select(columns.clamp_min_(0.0), min(k_aux, last - first), False)
                    aux_parts.append((chosen, block_dead[where]))
            elif dead is not None:
                chosen, where = select(torch.minimum(pre, live_to_minus_inf[cols], out=pre), min(k_aux, pre.shape[1]),
                                       False)
                aux_parts.append((chosen, where + c0))
        values[rows], indices[rows] = _merged(select, parts, k)
        if dead_latents is not None:
            if aux_found:  # the slots past them were filled before the loop
                aux_values[rows, :aux_found], aux_indices[rows, :aux_found] = _merged(select, aux_parts, aux_found)
        elif dead is not None:
            chosen, aux_indices[rows] = _merged(select, aux_parts, k_aux)
            aux_values[rows] = chosen.clamp_min_(0.0)  # a slot past the dead latents: zero
    return (values, indices) if dead is None else (values, indices, aux_values, aux_indices)


def _encode_setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.latents = weight.shape[0]
    ctx.save_for_backward(x, weight, *output)
    ctx.mark_non_differentiable(*output[1::2])  # the indices


def _winners_backward(ops, ctx, x, weight, values, indices, grad_values):
    grad_pre = grad_values.to(values.dtype) * (values > 0)  # through the ReLU
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    # grad x = sum_k grad_pre[b, k] W[idx[b, k]]: the sparse decoder's forward;
    # grad W[l] = sum over (b, k) with idx = l of grad_pre[b, k] x[b]: its weight
    # gradient (deterministic, no atomics) with x in the place of grad_out.
    grad_x = ops.sparse_decode_forward(grad_pre, indices, weight, None) if need_x else None
    grad_weight = ops.sparse_decode_backward(x, grad_pre, indices, weight, False)[1] if need_weight else None
    grad_bias = None
    if ctx.has_bias and need_bias:
        # grad bias[l] = sum over (b, k) with idx = l of grad_pre[b, k]: the same weight
        # gradient of a one-column input of ones, in the same fixed order (index_add_
        # adds with atomics on a GPU: runs would differ in the last bits).
        ones = grad_pre.new_ones((grad_pre.shape[0], 1))
        no_weight = grad_pre.new_zeros((ctx.latents, 1), dtype=ctx.bias_dtype)  # the gradient's dtype
        grad_bias = ops.sparse_decode_backward(ones, grad_pre, indices, no_weight, False)[1].squeeze(1)
    return grad_x, grad_weight, grad_bias


def _encode_backward(ops, ctx, grad_values, _grad_indices):
    x, weight, values, indices = ctx.saved_tensors
    return *_winners_backward(ops, ctx, x, weight, values, indices, grad_values), None


def _encode_aux_backward(ops, ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
    # Both selections in one pass of the winners' backward: their slots side by side.
    x, weight, values, indices, aux_values, aux_indices = ctx.saved_tensors
    return *_winners_backward(ops, ctx, x, weight, torch.cat([values, aux_values], 1),
                              torch.cat([indices, aux_indices], 1), torch.cat([grad_values, grad_aux_values], 1)), \
        None, None, None


def _fake_winners(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)


# topk_sparse(relu(x @ weight.T + bias), k) without the (B, L) pre-activation: a Python
# composite of the backend's own selection and decoder kernels.
kernel(
    "topk_encode(Tensor x, Tensor weight, Tensor? bias, int k) -> (Tensor values, Tensor indices)",
    fake=lambda x, weight, bias, k: _fake_winners(x, k),
    reference=reference.topk_encode,
    native=functools.partial(_encode_in_blocks, "cpp"),
    triton=functools.partial(_encode_in_blocks, "triton"),
    setup=_encode_setup, backward=_encode_backward,
)
# The same, plus the top k_aux among the dead latents (AuxK) from the same blocks.
kernel(
    "topk_encode_aux(Tensor x, Tensor weight, Tensor? bias, int k, Tensor dead, int k_aux) "
    "-> (Tensor values, Tensor indices, Tensor aux_values, Tensor aux_indices)",
    fake=lambda x, weight, bias, k, dead, k_aux: (*_fake_winners(x, k), *_fake_winners(x, k_aux)),
    reference=reference.topk_encode_aux,
    native=functools.partial(_encode_in_blocks, "cpp"),
    triton=functools.partial(_encode_in_blocks, "triton"),
    setup=_encode_setup, backward=_encode_aux_backward,
)


# ---------------------------------------------------------------- checks


def _decode_inputs(args: dict) -> None:
    values = args["values"]
    args["values"], args["bias"] = values, bias = autocast_inputs(values.device, values, args["bias"])
    args["weight"] = weight = autocast_weight(values.device, args["weight"])
    indices = args["indices"]
    if not isinstance(indices, Tensor) or indices.shape != values.shape or indices.dtype != torch.long:
        raise ValueError(f"indices must be an int64 tensor of the values' shape {tuple(values.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not (
            weight.dtype == values.dtype or mixed_precision(values.dtype, weight.dtype)):
        raise ValueError(f"weight must be 2-D (L, D) of the values' dtype {values.dtype} (or float32 under float16 "
                         f"or bfloat16 values)")
    if isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == weight.shape[0] != weight.shape[1]:
        raise ValueError(f"weight must be (L, D) and bias (D,), got weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)}: the weight looks transposed (an nn.Linear(L, D) holds (D, L): "
                         f"pass its weight.t())")
    if isinstance(bias, Tensor) and mixed_precision(values.dtype, bias.dtype):
        # a float32 bias beside 16-bit values is added in the values' dtype, as F.linear
        # under autocast adds it: D elements cast, its gradient (summed in float32, then
        # rounded once to the values' dtype) cast back
        args["bias"] = bias = bias.to(values.dtype)
    if bias is not None and (bias.shape != (weight.shape[1],) or bias.dtype != values.dtype):
        also = " (or float32)" if mixed_precision(values.dtype, torch.float32) else ""
        raise ValueError(f"bias must be None or of shape ({weight.shape[1]},) and dtype {values.dtype}{also}")
    _check_indices_on_cpu(indices, weight.shape[0])


def _encode_inputs(args: dict) -> None:
    x = args["x"]
    args["x"], args["bias"] = x, bias = autocast_inputs(x.device, x, args["bias"])
    args["weight"] = weight = autocast_weight(x.device, args["weight"])
    check_linear_params(x, weight, bias, "L", mixed=True)
    args["k"] = check_k(args["k"], weight.shape[0], "the number of latents")


def _dead_mask(args: dict) -> None:
    dead, latents = args["dead"], args["weight"].shape[0]
    if not isinstance(dead, Tensor) or dead.dtype != torch.bool or tuple(dead.shape) != (latents,):
        shown = f"{dead.dtype} {tuple(dead.shape)}" if isinstance(dead, Tensor) else type(dead).__name__
        raise ValueError(f"dead must be a bool tensor of shape (L={latents},), got {shown}")
    if dead.device != args["x"].device:
        raise ValueError(f"dead must be on x's device {args['x'].device}, got {dead.device}")
    args["k_aux"] = check_k(args["k_aux"], latents, "the number of latents", name="k_aux")


# ---------------------------------------------------------------- benchmark cases

WIDTH = 768  # the decoder's output width, the encoder's input width


def _codes(rows, cols, dtype, device):
    latents = 4 * cols
    return {
        "values": torch.rand(rows, K, device=device).to(dtype),
        "indices": torch.randint(0, latents, (rows, K), device=device),
        "weight": (torch.randn(latents, WIDTH, device=device) * 0.02).to(dtype),
    }


def _decode_bytes(inputs, backward):
    values, weight = inputs["values"], inputs["weight"]
    # each weight row the indices select, once (B * K uniform draws over L rows select
    # about L (1 - exp(-B K / L)) distinct ones)
    rows_used = inputs["indices"].unique().numel() * weight.shape[1] * weight.element_size()
    out = values.shape[0] * weight.shape[1] * weight.element_size()
    forward = nbytes(values, inputs["indices"]) + rows_used + out
    return forward + ((out + rows_used + nbytes(weight, values)) if backward else 0)


def _encoder_inputs(rows, cols, dtype, device):
    latents = 4 * cols
    return {
        "x": torch.randn(rows, WIDTH, device=device).to(dtype),
        "weight": (torch.randn(latents, WIDTH, device=device) * WIDTH**-0.5).to(dtype),
        "bias": torch.zeros(latents, device=device).to(dtype),
    }


def _encode_bytes(inputs, backward):  # back: read the codes' gradients, x and weight again; write theirs
    x, dense = inputs["x"], nbytes(inputs["x"], inputs["weight"], inputs["bias"])
    slots = K + (4 * K if "dead" in inputs else 0)  # with AuxK's k_aux = 4 k
    codes = x.shape[0] * slots * (x.element_size() + 8)
    forward = dense + codes + (nbytes(inputs["dead"]) if "dead" in inputs else 0)
    return forward + ((2 * dense + codes) if backward else 0)


# ---------------------------------------------------------------- public API


@operator(
    uses=("sparse_decode_forward",),
    checks=(check_dense("values"), _decode_inputs),
    bench=Bench(make=_codes, call=lambda op, **inputs: op(**inputs), reference=reference.sparse_decode,
                bytes_moved=_decode_bytes, differentiable=("values", "weight"), params=f"k={K}",
                library=("F.embedding_bag", lambda values, indices, weight: torch.nn.functional.embedding_bag(
                    indices, weight, per_sample_weights=values, mode="sum"))),
)
def sparse_decode(ops, values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out[b] = bias + sum_k values[b, k] * weight[indices[b, k]]`` for values and
    int64 indices of shape (B, k) and weight (L, D): the decoder of a top-k sparse
    autoencoder without a dense (B, L) code, forward or backward.

    The weight gradient is deterministic: the (row, slot) pairs are sorted by latent
    and each latent's gradient row is reduced in (row, slot) order, with no atomics,
    so every run gives the same bits. The weight may be float32 beside float16 or
    bfloat16 values (mixed precision): its rows are read as they are, the sums kept in
    float32, the output in the values' dtype and the weight gradient in float32. Under
    autocast, values and bias run in the autocast dtype and a float32 weight so, without
    a cast of the whole weight or of its gradient. An index out of [0, L) raises an IndexError
    on CPU; on a GPU it makes its row of the output NaN (a check would stall the host)."""
    return ops.sparse_decode_forward(values, indices, weight, bias)


@operator(
    uses=("topk_encode",),
    checks=(check_dense(), _encode_inputs),
    bench=Bench(make=_encoder_inputs, call=lambda op, x, weight, bias: op(x, weight, bias, K),
                reference=lambda x, weight, bias: reference.topk_encode(x, weight, bias, K),
                bytes_moved=_encode_bytes, differentiable=("x", "weight", "bias"), params=f"k={K}", flops=linear_flops,
                matmul_ratio_goal=1.2, library=("torch.topk(relu(F.linear))", lambda x, weight, bias: torch.topk(
                    torch.nn.functional.linear(x, weight, bias).relu(), K))),
)
def topk_encode(ops, x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The fused top-k encoder of a sparse autoencoder:
    ``topk_sparse(relu(x @ weight.T + bias), k)`` for x (B, D) and weight (L, D),
    without ever holding the (B, L) pre-activation: forward, it is computed a block at
    a time (on CPU up to 1024 rows by 8M / 1024 latents, so the weight is read once per
    1024 rows; on a GPU 4096 by 16384), each block reduced to its k best candidates and
    those merged; backward, the
    gradients come from the winners alone (the sparse decoder's kernels: grad x is a
    sparse decode of the winners' gradients through W, grad W a deterministic
    per-latent scatter of them times x). ReLU before selection: a row with fewer
    than k positive units fills up with zeros at the lowest remaining indices.
    Under autocast, x and bias run in the autocast dtype; a float32 weight (and bias)
    may also come beside float16 or bfloat16 x: each block of it is cast for its
    matmul, and the backward reads it as it is and returns its gradient in float32."""
    return ops.topk_encode(x, weight, bias, k)


def _encoder_inputs_with_dead(rows, cols, dtype, device):
    inputs = _encoder_inputs(rows, cols, dtype, device)
    latents = inputs["weight"].shape[0]
    return {**inputs, "dead": torch.arange(latents, device=device) % 8 == 0}  # one latent in 8 dead


@operator(
    uses=("topk_encode_aux",),
    checks=(check_dense(), _encode_inputs, _dead_mask),
    bench=Bench(make=_encoder_inputs_with_dead,
                call=lambda op, x, weight, bias, dead: op(x, weight, bias, K, dead, 4 * K),
                reference=lambda x, weight, bias, dead: reference.topk_encode_aux(x, weight, bias, K, dead, 4 * K),
                bytes_moved=_encode_bytes, differentiable=("x", "weight", "bias"), params=f"k={K}, k_aux={4 * K}",
                flops=linear_flops, matmul_ratio_goal=1.2),
)
def topk_encode_aux(ops, x: Tensor, weight: Tensor, bias: Tensor | None, k: int, dead: Tensor,
                    k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``topk_encode`` and, from the same pass over the pre-activation, the AuxK
    selection of a top-k sparse autoencoder (Gao et al. 2024): the top ``k_aux`` of
    ``relu(x @ weight.T + bias)`` among the latents marked in ``dead`` (bool (L,)).
    Returns (values, indices, aux_values, aux_indices); a row's aux slots past its
    dead latents (fewer than k_aux dead) hold value 0, so they decode to nothing, and
    no count of dead latents is read back to the host. The backward of both
    selections is one pass of topk_encode's (the winners alone, deterministic)."""
    return ops.topk_encode_aux(x, weight, bias, k, dead, k_aux)
