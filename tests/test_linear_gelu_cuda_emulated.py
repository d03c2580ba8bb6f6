"""The element-wise CUDA kernels of linear_gelu (csrc/cuda/linear_gelu.cuh), run on the CPU without a GPU.

tests/cuda_emulator/linear_gelu.cpp compiles them unmodified with the system g++ against the host emulator of
tests/cuda_emulator (FASTGPT_PTX_EMULATION) and launches them as csrc/cuda/linear_gelu.cu does after its cuBLASLt
products: the activation (none, exact and tanh GELU, relu) and output dropout over a product's output, in a separate
buffer or in place, and the backward through them with the bias gradient's partial rows (the grid of
elementwise.cuh), its output in a fresh buffer, over grad or over pre. Compared with a float64 reference in fp32,
fp16 and bf16, with the Philox dropout mask of fastgpt/ops/philox.py.

What this cannot check: the cuBLASLt products and their epilogues (GELU_AUX_BIAS, DGELU_BGRAD), timing and the
device's erff / tanhf / expf. Those need tests/test_linear_gelu.py on a GPU.
"""

import subprocess


def test_linear_gelu_kernels_emulated(emulated_kernels):
    harness = emulated_kernels("linear_gelu")
    res = subprocess.run([str(harness)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"harness failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
