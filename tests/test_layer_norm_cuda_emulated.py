"""The CUDA LayerNorm kernels (csrc/cuda/layer_norm.cuh), run on the CPU without a GPU.

tests/cuda_emulator/layer_norm.cpp compiles the unmodified kernels with the system g++ against the host emulator of
tests/cuda_emulator (FASTGPT_PTX_EMULATION) and launches them as csrc/cuda/layer_norm.cu does: the same
instantiations (fp32, fp16 and bf16 inputs, parameters in the input's dtype or fp32, 16-byte vectors or scalars,
blocks of up to 256 threads or, for rows wider than 4096, up to 1024), the same launch geometry, the forward's mean
and rstd fed to the backward. Blocks run one warp at a time as far as it goes, in ascending and descending order,
so a missing __syncthreads around the shared reduction slots changes the results. The harness compares y, mean,
rstd, dx, dresidual (under dropout) and dweight, dbias (from the row kernel's partial rows, or the column kernel's
for wide rows) with a float64 reference on rows with a large mean, with and without residual, affine parameters
and dropout (the Philox mask of fastgpt/ops/philox.py), over widths 1 to 16384, odd widths, misaligned tensors and a
backward grid that strides over more rows than it has threads.

What this cannot check: timing, occupancy, register spills (`make cuda-check` does), the hardware's rsqrtf, memory
ordering and races through plain shared-memory accesses other than the skewed schedules above. Those need
tests/test_layer_norm.py on a GPU.
"""

import subprocess


def test_layer_norm_kernels_emulated(emulated_kernels):
    harness = emulated_kernels("layer_norm")
    res = subprocess.run([str(harness)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"harness failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
