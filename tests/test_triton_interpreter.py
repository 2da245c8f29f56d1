"""The interpreter shortcuts of tests/triton_interpreter.py give Triton's own results."""

import functools
import operator
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only")


def test_shortcuts_are_installed():
    from triton_interpreter import speed_up_interpreter

    assert speed_up_interpreter()  # Triton 3.6 is pinned: a layout change should be seen, not silently slow


def test_xor_sum_by_numpy_matches_a_plain_fold():
    import triton
    import triton.language as tl

    @triton.jit
    def xor_sums(x_ptr, rows_ptr, cols_ptr, all_ptr, R: tl.constexpr, C: tl.constexpr):
        offsets = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        x = tl.load(x_ptr + offsets)
        tl.store(rows_ptr + tl.arange(0, R), tl.xor_sum(x, axis=1))
        tl.store(cols_ptr + tl.arange(0, C)[None, :], tl.xor_sum(x, axis=0, keep_dims=True))
        tl.store(all_ptr, tl.xor_sum(tl.reshape(x, (R * C,)), axis=0))

    for dtype in (torch.int32, torch.int64):
        x = torch.randint(-2**31, 2**31 - 1, (4, 8), dtype=dtype)
        if dtype == torch.int64:
            x = x * 2**31 + torch.randint_like(x, 0, 2**31)  # the high bits set too
        rows, cols, whole = torch.empty(4, dtype=dtype), torch.empty(8, dtype=dtype), torch.empty(1, dtype=dtype)
        xor_sums[(1,)](x, rows, cols, whole, R=4, C=8)
        fold = functools.partial(functools.reduce, operator.xor)
        assert rows.tolist() == [fold(r) for r in x.tolist()]
        assert cols.tolist() == [fold(c) for c in x.t().tolist()]
        assert whole.item() == fold(x.flatten().tolist())
