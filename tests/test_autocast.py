"""Under autocast the matmul-like ops take mixed-precision inputs, as F.linear does."""

import torch
import torch.nn.functional as F

import aefast as ae


def test_noisy_linear_and_sparse_decode_follow_autocast():
    x, w, b = torch.rand(6, 10), torch.randn(4, 10), torch.randn(4)
    values = torch.rand(6, 3, dtype=torch.bfloat16)
    indices = torch.randint(0, 5, (6, 3))
    table = torch.randn(5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae.noisy_linear(x, w, b, "masking", 0.0, seed=1)
        want = F.linear(x, w, b)
        decoded = ae.sparse_decode(values, indices, table)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    assert decoded.dtype == torch.bfloat16
    torch.testing.assert_close(decoded, ae.sparse_decode(values, indices, table.bfloat16()))


def test_contractive_penalty_takes_the_wider_dtype_under_autocast():
    h, w = torch.rand(5, 4).bfloat16(), torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = ae.contractive_penalty(h, w)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, ae.contractive_penalty(h.float(), w))
