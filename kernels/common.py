"""Small @triton.jit helpers shared by the kernels of several ops, and the autotuning policy."""

import os

import torch
import triton
import triton.language as tl
import triton.testing


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python ints, for the launchers: triton.cdiv and triton.next_power_of_2 are constexpr functions
    that cost 2 us a call from Python (Triton 3.6 and 3.9), a dozen of them per attention forward and backward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), as triton.next_power_of_2 for the launchers (see cdiv)."""
    return 1 << max(n - 1, 0).bit_length()


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
    """`do_bench` for triton.autotune: Triton's own benchmark, skipped when TUNING fixes the single candidate and
    when interpreting (one candidate is left there, which Triton 3.6's autotuner would still time, on a GPU driver
    the interpreter does not have)."""
    if TUNING == "autotune" and not INTERPRET:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return [0.0] * len(quantiles)


# How the matrix products' tiles reach shared memory (FASTGPT_TRITON_TMA), for the kernels with two copy paths
# (kernels/linear_gelu.py, kernels/attention.py; the constexpr USE_TMA of their configs):
#   "auto" (default): on a GPU with the TMA engine (CUDA, compute capability >= 9), operands TMA can address get
#           tensor descriptors and the autotuner tries the TMA configs beside the pointer ones, keeping the faster;
#   "only": the TMA configs alone wherever the operands can be addressed, on such a GPU or the CPU interpreter:
#           tests check the TMA path with it, and a GPU benchmark times it alone;
#   "off":  the pointer path only.
# Read at every launch; the launch's effective policy is part of the autotuning key.
TMA = os.environ.get("FASTGPT_TRITON_TMA", "auto")
_TMA_PATHS = {"off": (False,), "auto": (True, False), "only": (True,)}  # the USE_TMA values each policy lets run


def tma_device(device: torch.device) -> bool:
    """Whether `device` has the Tensor Memory Accelerator: an NVIDIA GPU of compute capability 9.0 or later."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def tma_policy(device: torch.device) -> str:
    """The TMA policy of a launch on `device`: TMA's, or "off" where the device has no TMA engine (a forced "only"
    also runs the TMA path on the CPU interpreter)."""
    if TMA not in _TMA_PATHS:
        raise ValueError(f"FASTGPT_TRITON_TMA: expected auto, only or off, got {TMA!r}")
    if not (tma_device(device) or (TMA == "only" and device.type == "cpu")):
        return "off"
    return TMA


def copy_path_candidates(configs: list, policy: str) -> list:
    """The configs an autotuner with both copy paths tries for a launch under TMA policy `policy` (its USE_TMA
    values), then the tuning policy's choice among them (tuned_candidates)."""
    return tuned_candidates([c for c in configs if c.kwargs["USE_TMA"] in _TMA_PATHS[policy]])


def tma_addressable(t: torch.Tensor) -> bool:
    """Whether the copy engine can address `t` as it is: 16-bit elements, a unit last stride, and a 16-byte aligned
    base and other strides. Size-1 dims are exempt (tma_descriptor gives them a stride of its own); a broadcast dim
    (stride 0) is refused."""
    item = t.element_size()
    return (t.dtype in (torch.float16, torch.bfloat16) and t.numel() > 0 and t.stride(-1) == 1
            and t.data_ptr() % 16 == 0
            and all(size == 1 or (stride > 0 and stride * item % 16 == 0)
                    for size, stride in zip(t.shape[:-1], t.stride()[:-1])))


def tma_descriptor(t: torch.Tensor):
    """A host tensor descriptor of a tma_addressable `t` with its own shape and strides, a placeholder box until a
    config's pre_hook sets the tile. A size-1 dim, whose index is always 0, takes a stride past the whole tensor's
    extent: any value TMA accepts would do, and PyTorch leaves such strides arbitrary (not 16-byte multiples)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    align = 16 // t.element_size()
    shape, strides = list(t.shape), list(t.stride())
    if 1 in shape[:-1]:
        extent = cdiv(max(size * stride for size, stride in zip(shape, strides)), align) * align
        strides = [extent if size == 1 else stride for size, stride in zip(shape[:-1], strides)] + [1]
    return TensorDescriptor(t, shape, strides, [1] * (len(shape) - 1) + [align])
