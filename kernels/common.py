"""Small @triton.jit helpers shared by the kernels of several ops, and the autotuning policy."""

import os

import triton
import triton.language as tl
import triton.testing

# Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) converts float32 to bfloat16 by
# truncation instead of rounding to nearest-even, doubling the rounding error of every bf16 result.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """float32 `x` converted to `dtype`, rounded to nearest-even also under the interpreter.

    bf16 keeps the top 16 bits of the float32 pattern; adding 0x7FFF plus the lowest kept bit before dropping the
    rest rounds to nearest, ties to even (NaN and Inf do not occur in these kernels' outputs).
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def stream_uniforms(seed, c1, c2, c3, n0, BLOCK: tl.constexpr):
    """Uniforms in [0, 1) of elements n0 .. n0 + BLOCK - 1 of the Philox stream (c1, c2, c3), along a new last axis:
    element n takes word n % 4 of Philox4x32-10 at counters (n // 4, c1, c2, c3) (fastgpt/ops/philox.py; csrc/philox.h
    draws the same). One call serves four elements: the words of the BLOCK // 4 calls are interleaved. n0 is a
    multiple of 4 and BLOCK of 4 or more; c1, c2, c3 are int32, scalars or (R, 1) columns (giving (R, BLOCK))."""
    groups = n0 // 4 + tl.arange(0, BLOCK // 4)
    c0 = groups + c1 * 0 + c2 * 0 + c3 * 0
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1 + zero, c2 + zero, c3 + zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # r0[g], r1[g], r2[g], r3[g], r0[g + 1], ...
    return tl.random.uint_to_uniform_float(words)


@triton.jit
def elementwise_dropout_uniform(seed, row, col0, BLOCK_N: tl.constexpr):
    """Uniforms of columns col0 .. col0 + BLOCK_N - 1 of row(s) `row` (an int32 scalar, or an (R, 1) column) of a
    row-major (M, N) activation: its element-wise dropout stream is (c1, c2, c3) = (row, 0, 1). col0 is a multiple
    of 4; an element is kept iff its uniform >= p."""
    return stream_uniforms(seed, row, 0, 1, col0, BLOCK_N)


# How autotuned kernels choose their config, from FASTGPT_TRITON_TUNING:
#   "autotune" (default): benchmark the launch's candidate configs once per autotuning key and keep the fastest;
#   "first": take the first candidate without benchmarking. Every distinct specialisation then costs one compilation
#            instead of one per candidate: the GPU test suite meets hundreds of them (dtypes x head dims x masks x
#            flags), which autotuning would turn into an hour of compiling; tests/conftest.py sets it on GPUs;
#   an integer i: the i-th candidate (wrapping around), so a test can run every config of a kernel on a GPU.
# Read at each new autotuning key, so a test may change it (and clear the autotuners' caches) between calls.
TUNING = os.environ.get("FASTGPT_TRITON_TUNING", "autotune")


def tuned_candidates(candidates: list) -> list:
    """The configs an autotuner tries for one key under TUNING (for its `early_config_prune`)."""
    if TUNING not in ("autotune", "first") and not TUNING.isdigit():
        raise ValueError(f"FASTGPT_TRITON_TUNING: expected autotune, first or a config index, got {TUNING!r}")
    if TUNING == "autotune":
        return candidates
    return [candidates[(0 if TUNING == "first" else int(TUNING)) % len(candidates)]]


def benchmark_candidates(kernel_call, quantiles):
    """`do_bench` for triton.autotune: Triton's own benchmark, skipped when TUNING fixes the single candidate."""
    if TUNING == "autotune":
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return [0.0] * len(quantiles)
