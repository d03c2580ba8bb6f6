"""Argument checks shared by the ops. They run before dispatch, so every backend raises the same error."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, value, *, floating: bool = True) -> None:
    """`value` must be a tensor (of a floating dtype when `floating`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected {name} to have a floating-point dtype "
                        f"(float16, bfloat16, float32, float64), got {value.dtype}")


def as_real(value) -> float | None:
    """`value` as a Python float when it is a real number as torch's float arguments take them (int, float, a NumPy
    scalar, a 0-d tensor), else None. bool is not taken for a number."""
    if type(value) is float or type(value) is int:  # the common case, before the ABC check (a us)
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return float(value)
    return None


def check_dropout_p(op: str, dropout_p) -> float:
    """dropout_p as a float, which must be in [0, 1)."""
    p = as_real(dropout_p)
    if p is None or not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: expected dropout_p in [0, 1), got {dropout_p!r}")
    return p


def check_scale(op: str, scale) -> float | None:
    """scale as a float (or None), which must be finite."""
    if scale is None:
        return None
    value = as_real(scale)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{op}: expected scale to be a finite number or None, got {scale!r}")
    return value


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
