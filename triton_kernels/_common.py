"""What the Triton launchers of every family share."""

from __future__ import annotations

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype):
    """The accumulation type: float64 for float64 tensors, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32
