"""fastgpt.ops.philox against Triton's own tl.philox / uint_to_uniform_float (bit for bit)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton
import triton.language as tl

from fastgpt.ops.philox import attention_dropout_keep, philox_uniform


@triton.jit
def _philox_uniform_kernel(Out,  # (N,) float32 uniforms
                           C0, C1, C2, C3,  # (N,) int32 counters
                           seed, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    c0 = tl.load(C0 + offs, mask=valid, other=0)
    c1 = tl.load(C1 + offs, mask=valid, other=0)
    c2 = tl.load(C2 + offs, mask=valid, other=0)
    c3 = tl.load(C3 + offs, mask=valid, other=0)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    tl.store(Out + offs, tl.random.uint_to_uniform_float(r0), mask=valid)


def _triton_uniform(seed, c0, c1, c2, c3):
    n = c0.numel()
    out = torch.empty(n, dtype=torch.float32)
    _philox_uniform_kernel[(triton.cdiv(n, 256),)](out, c0, c1, c2, c3, seed, n, BLOCK=256)
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 + 7, 0x7EDCBA9876543210])
def test_philox_uniform_matches_triton(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    n = 1000
    # Full 32-bit range of counter words (as int32 patterns), plus small structured counters.
    words = [torch.randint(-2**31, 2**31, (n,), dtype=torch.int32, generator=g) for _ in range(4)]
    words[0][:10] = torch.arange(10, dtype=torch.int32)
    words[1][:10] = 0
    expected = _triton_uniform(seed, *words)
    got = philox_uniform(seed, *(w.to(torch.int64) for w in words))
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert 0.0 <= got.min() and got.max() < 1.0


def test_attention_dropout_keep_layout():
    seed, B, H, Lq, Lk, p = 77, 2, 3, 5, 7, 0.3
    keep = attention_dropout_keep(seed, B, H, Lq, Lk, p)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    b, h, i, j = 1, 2, 4, 6
    u = _triton_uniform(seed, *(torch.tensor([c], dtype=torch.int32) for c in (j, i, b * H + h, 0)))
    assert keep[b, h, i, j].item() == bool(u.item() >= p)
    # Kept fraction within 5 binomial standard deviations of 1 - p.
    big = attention_dropout_keep(seed, 4, 4, 64, 64, p)
    n = big.numel()
    assert abs(big.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
