"""The CUDA attention kernels (csrc/cuda/attention_fwd.cuh, attention_bwd.cuh), run on the CPU without a GPU.

tests/cuda_emulator/attention.cpp compiles the unmodified kernel sources with the system g++ against a host emulator
of the CUDA primitives they use (FASTGPT_PTX_EMULATION: csrc/cuda/attention_common.cuh then includes
tests/cuda_emulator/ptx_emulated.h instead of csrc/cuda/ptx.cuh). The emulator runs each thread block as 128
cooperative threads with the PTX register layouts of ldmatrix, mma.m16n8k16 and shfl, cp.async copies that land as
late as allowed, and checks for shared-memory races between warps, reads of in-flight copies, out-of-bounds accesses
and divergent barriers. Every kernel runs twice: with its mma.sync products ("fwd", "bwd") and with its sm_90a wgmma
products ("fwd-wgmma", "bwd-wgmma"), which the emulator computes at their wait from shared memory read through the
matrix descriptors as the PTX ISA's canonical 128-byte-swizzle layouts define them; it also checks the wgmma fence,
commit and wait sequence, descriptors that agree across the warpgroup, and the fence.proxy.async between the
cp.async copies and the products that read them. The harness compares out, lse, delta, dQ, dK and dV with a float64
reference, fp16 and bf16, head dims 64 and 128, over masks (causal, bool, key padding, additive with -inf and
finfo.min rows), dropout, GQA, packed strides and odd lengths, with a componentwise bound on the 16-bit roundings
the kernels add. It also counts the shared-memory wavefronts of every ldmatrix and cp.async (all of the kernels'
tile traffic) under the bank model of tests/cuda_emulator/emulator.h (32 banks of 4 bytes, 16-byte accesses served 8
lanes per phase) and fails on any phase that takes more than one: a bank conflict, which the swizzled tile layout of
csrc/cuda/attention_common.cuh is meant to rule out.

What this cannot check: timing, occupancy, bank conflicts of plain shared-memory loads and stores (the dK/dV kernel's
lse / delta rows), register spills (scripts that run nvcc do that), the real memory ordering beyond the cp.async
landing rule, races through plain shared-memory loads and stores, the hardware mma's accumulation order and the
approximate exp2 / log2 of the GPU; and for wgmma, whether the hardware reads the descriptors as the emulator does
(the PTX ISA's tables are the only source for both) and whether the compiler keeps accumulator accesses out of a
product's flight. Those need tests/test_attention_cuda.py on a GPU.
"""

import subprocess

import pytest


@pytest.mark.parametrize("kernel", ["fwd", "fwd-wgmma", "bwd", "bwd-wgmma"])
def test_attention_kernel_emulated(emulated_kernels, kernel):
    harness = emulated_kernels("attention")
    res = subprocess.run([str(harness), kernel], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"harness {kernel} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
