"""The CUDA attention kernels (csrc/cuda/attention_fwd.cuh, attention_bwd.cuh), run on the CPU without a GPU.

tests/cuda_emulator/harness.cpp compiles the unmodified kernel sources with the system g++ against a host emulator
of the CUDA primitives they use (FASTGPT_PTX_EMULATION: csrc/cuda/attention_common.cuh then includes
tests/cuda_emulator/ptx_emulated.h instead of csrc/cuda/ptx.cuh). The emulator runs each thread block as 128
cooperative threads with the PTX register layouts of ldmatrix, mma.m16n8k16 and shfl, cp.async copies that land as
late as allowed, and checks for shared-memory races between warps, reads of in-flight copies, out-of-bounds
accesses and divergent barriers. The harness compares out, lse, delta, dQ, dK and dV with a float64 reference,
fp16 and bf16, head dims 64 and 128, over masks (causal, bool, key padding, additive with -inf and finfo.min rows),
dropout, GQA, packed strides and odd lengths, with a componentwise bound on the 16-bit roundings the kernels add.

What this cannot check: timing, bank conflicts, occupancy, register spills (scripts that run nvcc do that), the
real memory ordering beyond the cp.async landing rule, races through plain shared-memory loads and stores, the
hardware mma's accumulation order and the approximate exp2 / log2 of the GPU. Those need tests/test_attention_cuda.py
on a GPU.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tests" / "cuda_emulator"
CXX_FLAGS = ["-std=c++20", "-O2", "-fno-strict-aliasing", "-DFASTGPT_PTX_EMULATION",
             f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{EMULATOR}"]

# The emulator needs <ucontext.h> (POSIX, absent on Windows and deprecated on macOS) and the _Float16 type.
PROBE = """
#include <ucontext.h>
int main() { ucontext_t c; getcontext(&c); _Float16 h = static_cast<_Float16>(1.5f); return h == 1.5f ? 0 : 1; }
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CUDA kernel emulator is built with the system g++")
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the CUDA kernel emulator needs ucontext, which {sys.platform} lacks or deprecates")
    build = tmp_path_factory.mktemp("cuda_emulator")
    probe = build / "probe.cpp"
    probe.write_text(PROBE)
    res = subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(build / "probe")], capture_output=True, text=True)
    if res.returncode != 0 or subprocess.run([str(build / "probe")]).returncode != 0:
        pytest.skip(f"g++ here lacks ucontext or _Float16, which the CUDA kernel emulator needs:\n{res.stderr}")
    exe = build / "harness"
    res = subprocess.run([cxx, *CXX_FLAGS, str(EMULATOR / "harness.cpp"), "-o", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"compiling the emulator harness failed:\n{res.stdout}\n{res.stderr}"
    return exe


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_attention_kernel_emulated(harness, kernel):
    res = subprocess.run([str(harness), kernel], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"harness {kernel} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
