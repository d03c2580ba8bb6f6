"""Helpers shared by the tests: devices and backends to run, and the low-precision tolerance rule."""

from __future__ import annotations

import pytest
import torch

import fastgpt

CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU here: the CUDA cases run on a GPU machine"

# Every (device, backend) pair that can run here; the CUDA pairs show up as skipped, with the reason, on CPU.
DEVICE_BACKENDS = [pytest.param("cpu", name, id=f"cpu-{name}") for name in fastgpt.available_backends("cpu")] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.skipif(not CUDA, reason=NO_GPU))
    for name in (fastgpt.available_backends("cuda") if CUDA else fastgpt.BACKENDS)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# A tiny absolute floor on top of the 2x rule (relative to the reference's magnitude): it only matters where
# PyTorch's own result happens to be exact.
_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, torch_result: torch.Tensor) -> None:
    """`actual`'s error against the float64 `expected` is at most twice the error of PyTorch's own computation
    in the same dtype (`torch_result`), plus a tiny floor. Prints the worst element when it is not."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == torch_result.dtype, f"{name}: dtype {actual.dtype} != {torch_result.dtype}"
    expected = expected.double()
    error = (actual.double() - expected).abs()
    torch_error = (torch_result.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    bound = 2 * torch_error + _FLOOR[actual.dtype] * scale
    worst = error.max().item() if error.numel() else 0.0
    if not worst <= bound:  # also catches NaN
        index = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(error, nan=float("inf")).argmax(),
                                                          error.shape))
        raise AssertionError(
            f"{name}: max error {worst:.3g} > bound {bound:.3g} (PyTorch's own {actual.dtype} error "
            f"{torch_error:.3g}); worst at {index}: got {actual[index].item():.6g}, "
            f"float64 reference {expected[index].item():.6g}")
