"""Small @triton.jit helpers shared by the kernels of several ops."""

import os

import triton
import triton.language as tl

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
def elementwise_dropout_uniform(seed, row, col):
    """Uniforms in [0, 1) of the element-wise dropout stream at (row, col) of a row-major (M, N) activation:
    Philox4x32-10 at counters (col, row, 0, 1) (fastgpt/ops/philox.py; csrc/philox.h draws the same). `row` and
    `col` are int32 and broadcast together; an element is kept iff its uniform >= p."""
    zero = row * 0 + col * 0
    r0, _, _, _ = tl.philox(seed, col + zero, row + zero, zero, zero + 1)
    return tl.random.uint_to_uniform_float(r0)
