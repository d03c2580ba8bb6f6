"""fastgpt: Triton and CUDA C++ kernels for GPT-style training, as PyTorch ops, modules and models."""

from fastgpt.backends import BACKENDS, available_backends, use_backend
from fastgpt import ops, nn

__all__ = ["BACKENDS", "available_backends", "use_backend", "ops", "nn"]
__version__ = "0.1.0"
