"""Test set-up: Triton kernels run on CPU tensors through the interpreter when there is no GPU, and with fixed configs
(no autotuning) on a GPU.

TRITON_INTERPRET must be set before triton (and so fastgpt) is imported: @triton.jit reads it at decoration.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per kernel specialisation instead of autotuning each (kernels/common.py): the suite meets hundreds
    # of them. tests/test_triton_configs.py runs every config on a few cases instead.
    os.environ.setdefault("FASTGPT_TRITON_TUNING", "first")

import fastgpt  # noqa: E402  (after TRITON_INTERPRET)


def pytest_configure(config):
    """The Triton kernels run here through Triton's interpreter: refuse a pairing with NumPy it cannot run
    (fastgpt.backends says which) rather than fail hundreds of tests."""
    if fastgpt.backends.TRITON_INTERPRETER_PROBLEM is not None:
        raise pytest.UsageError(fastgpt.backends.TRITON_INTERPRETER_PROBLEM)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """For tests of many tiny ops (modules, models): on a busy 2-core machine OpenMP's thread hand-offs cost far more
    than the arithmetic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the CUDA kernel emulator (tests/cuda_emulator) ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tests" / "cuda_emulator"
EMULATOR_FLAGS = ["-std=c++20", "-O2", "-fno-strict-aliasing", "-DFASTGPT_PTX_EMULATION",
                  f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{EMULATOR}"]

# The emulator needs <ucontext.h> (POSIX, absent on Windows and deprecated on macOS) and the _Float16 type.
_EMULATOR_PROBE = """
#include <ucontext.h>
int main() { ucontext_t c; getcontext(&c); _Float16 h = static_cast<_Float16>(1.5f); return h == 1.5f ? 0 : 1; }
"""


@pytest.fixture
def copy_path(monkeypatch):
    """use(path): how the Triton kernels with two copy paths move their tiles in this test (the TMA policy of
    kernels/common.py): "tma" forces the TMA configs (on the CPU interpreter too), "pointer" the pointer ones. "tma"
    skips on a GPU without the copy engine (compute capability < 9)."""
    common = pytest.importorskip("fastgpt.kernels.common")

    def use(path):
        if path == "tma" and torch.cuda.is_available() and not common.tma_device(torch.device("cuda")):
            pytest.skip("this GPU has no TMA engine (compute capability < 9)")
        monkeypatch.setattr(common, "TMA", {"tma": "only", "pointer": "off"}[path])
    return use


@pytest.fixture(scope="session")
def emulated_kernels(tmp_path_factory):
    """build(name): compiles tests/cuda_emulator/<name>.cpp, a harness that runs the unmodified CUDA kernels of op
    <name> on the host emulator, with the system g++; returns the executable. Skips where g++ cannot build it."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CUDA kernel emulator is built with the system g++")
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the CUDA kernel emulator needs ucontext, which {sys.platform} lacks or deprecates")
    out = tmp_path_factory.mktemp("cuda_emulator")
    probe = out / "probe.cpp"
    probe.write_text(_EMULATOR_PROBE)
    res = subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(out / "probe")], capture_output=True, text=True)
    if res.returncode != 0 or subprocess.run([str(out / "probe")]).returncode != 0:
        pytest.skip(f"g++ here lacks ucontext or _Float16, which the CUDA kernel emulator needs:\n{res.stderr}")

    def build(name: str) -> Path:
        exe = out / name
        if not exe.exists():
            res = subprocess.run([cxx, *EMULATOR_FLAGS, str(EMULATOR / f"{name}.cpp"), "-o", str(exe)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, f"compiling the emulator harness {name}.cpp failed:\n{res.stdout}\n{res.stderr}"
        return exe

    return build
