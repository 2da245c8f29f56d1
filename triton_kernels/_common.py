"""What the Triton launchers of every family share: the accumulation type, where a
launch is planned for (a GPU or the interpreter), the limits of a CUDA grid, and a flat
grid over a matrix's tiles."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# A CUDA grid: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
# Streaming multiprocessors assumed for a meta tensor (an H200's), see planned_for_gpu.
DEFAULT_SMS = 132


@triton.jit
def tile_of_program(columns, BLOCK_C: tl.constexpr):
    """(row block, column block) of this program in a flat grid over a matrix's tiles,
    column blocks fastest: axis 0 alone takes 2^31 - 1 programs, where a 2-D grid's
    axis 1 stops at 65535 (8,388,480 columns in blocks of 128, 4,194,240 of 64)."""
    column_blocks = tl.cdiv(columns, BLOCK_C)
    pid = tl.program_id(0)
    return pid // column_blocks, pid % column_blocks


def tile_grid(rows: int, cols: int, block_rows: int, block_cols: int) -> tuple[int]:
    """The flat grid that tile_of_program reads: one program per (block_rows, block_cols) tile."""
    return (triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols),)


def acc_dtype(dtype: torch.dtype):
    """The accumulation type: float64 for float64 tensors, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-unit statistics a forward returns: the accumulation type
    (as the C++ kernels and aefast.reference.stat_dtype keep them)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def planned_for_gpu(device: torch.device) -> bool:
    """Whether launches on `device` are planned for a GPU (tile sizes, program counts).
    CUDA tensors are, and so are meta tensors: they stand for CUDA tensors when launch
    plans are checked at full size without memory (tests/triton_compile_check.py).
    CPU tensors run under the interpreter, which wants few, large programs."""
    return device.type in ("cuda", "meta")


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def on_input_device(launcher):
    """Runs `launcher` with its first tensor argument's device current: Triton launches
    on the current device, which need not be the tensors' (torch's own ops follow the
    tensors)."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        device = torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
        with device:
            return launcher(*args, **kwargs)

    return run
