"""fastgpt.ops.philox against Triton's own tl.philox / uint_to_uniform_float (bit for bit), and the layout of its
streams: element n of a stream takes word n % 4 of the call at counter n // 4."""

import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton
import triton.language as tl

from fastgpt.ops.philox import attention_dropout_keep, elementwise_dropout_keep, philox_words, word_uniform


@triton.jit
def _philox_uniform_kernel(Out,  # (4, N) float32 uniforms: one row per output word
                           C0, C1, C2, C3,  # (N,) int32 counters
                           seed, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    c0 = tl.load(C0 + offs, mask=valid, other=0)
    c1 = tl.load(C1 + offs, mask=valid, other=0)
    c2 = tl.load(C2 + offs, mask=valid, other=0)
    c3 = tl.load(C3 + offs, mask=valid, other=0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(Out + offs, tl.random.uint_to_uniform_float(r0), mask=valid)
    tl.store(Out + N + offs, tl.random.uint_to_uniform_float(r1), mask=valid)
    tl.store(Out + 2 * N + offs, tl.random.uint_to_uniform_float(r2), mask=valid)
    tl.store(Out + 3 * N + offs, tl.random.uint_to_uniform_float(r3), mask=valid)


def _triton_uniforms(seed, c0, c1, c2, c3):
    """(4, N): the uniforms of Triton's four Philox words at each of the N counters."""
    n = c0.numel()
    out = torch.empty(4, n, dtype=torch.float32)
    _philox_uniform_kernel[(triton.cdiv(n, 256),)](out, c0, c1, c2, c3, seed, n, BLOCK=256)
    return out


def _int32(*values):
    return [torch.tensor([v], dtype=torch.int32) for v in values]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 + 7, 0x7EDCBA9876543210])
def test_philox_words_match_triton(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    n = 1000
    # Full 32-bit range of counter words (as int32 patterns), plus small structured counters.
    words = [torch.randint(-2**31, 2**31, (n,), dtype=torch.int32, generator=g) for _ in range(4)]
    words[0][:10] = torch.arange(10, dtype=torch.int32)
    words[1][:10] = 0
    expected = _triton_uniforms(seed, *words)
    got = torch.stack([word_uniform(w) for w in philox_words(seed, *(w.to(torch.int64) for w in words))])
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert 0.0 <= got.min() and got.max() < 1.0


def test_attention_dropout_keep_layout():
    seed, B, H, Lq, Lk, p = 77, 2, 3, 5, 7, 0.3
    keep = attention_dropout_keep(seed, B, H, Lq, Lk, p)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    for b, h, i, j in [(1, 2, 4, 6), (0, 1, 3, 0), (1, 0, 2, 3), (0, 0, 0, 5)]:
        u = _triton_uniforms(seed, *_int32(j // 4, i, b * H + h, 0))[j % 4]
        assert keep[b, h, i, j].item() == bool(u.item() >= p), (b, h, i, j)
    # Kept fraction within 5 binomial standard deviations of 1 - p.
    big = attention_dropout_keep(seed, 4, 4, 64, 64, p)
    n = big.numel()
    assert abs(big.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def test_elementwise_dropout_keep_layout():
    """Every element of a (7, 10) mask (a partial last group of columns) against its Triton word."""
    seed, rows, cols, p = 2**40 + 3, 7, 10, 0.5
    keep = elementwise_dropout_keep(seed, rows, cols, p)
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    row, col = row.flatten().to(torch.int32), col.flatten().to(torch.int32)
    u = _triton_uniforms(seed, col // 4, row, torch.zeros_like(row), torch.ones_like(row))
    expected = u.gather(0, (col % 4).long().view(1, -1)).view(rows, cols) >= p
    assert torch.equal(keep, expected)
    # Neighbouring groups and rows are not copies of one another.
    assert not torch.equal(keep[:, :4], keep[:, 4:8]) and not torch.equal(keep[0], keep[1])


# The CPU kernels' dropout_factors for each instruction set (its lanes are AVX-512, AVX2 or plain arrays), whichever
# one the extension here was built for: the instruction-set flags of setup.py's CPU_CAPABILITY_FLAGS that the lanes
# depend on.
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
              "AVX2": ["-mavx2", "-mfma"], "DEFAULT": []}
_ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.parametrize("isa", list(_ISA_FLAGS))
def test_cpu_dropout_factors_match_philox(isa, tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    have = torch.backends.cpu.get_cpu_capability()
    if have not in _ISA_ORDER or _ISA_ORDER.index(isa) > _ISA_ORDER.index(have):
        pytest.skip(f"this CPU's capability is {have}, not {isa}")
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "dropout_factors"
    build = subprocess.run([cxx, "-std=c++20", "-O2", "-Wall", "-Werror", *_ISA_FLAGS[isa], f"-I{root / 'csrc'}",
                            str(root / "tests" / "cpu_harness" / "dropout_factors.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bit-identical" in run.stdout
