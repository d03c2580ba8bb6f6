"""Argument checks shared by the ops. They run before dispatch, so every backend raises the same error."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, value, *, floating: bool = True) -> None:
    """`value` must be a tensor (of a floating dtype when `floating`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected {name} to have a floating-point dtype "
                        f"(float16, bfloat16, float32, float64), got {value.dtype}")


def check_like(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor,
               *, dtype: bool = True) -> None:
    """`value` must live on `ref`'s device (and share its dtype when `dtype`)."""
    if value.device != ref.device:
        raise ValueError(f"{op}: expected {name} on the same device as {ref_name} ({ref.device}), "
                         f"got {value.device}")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{op}: expected {name} to have the same dtype as {ref_name} ({ref.dtype}), "
                        f"got {value.dtype}")


def check_shape(op: str, name: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{op}: expected {name} of shape {tuple(expected)}, got {tuple(value.shape)}")
