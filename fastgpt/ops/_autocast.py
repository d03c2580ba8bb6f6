"""Autocast for the ops whose PyTorch namesakes autocast casts (F.linear, F.scaled_dot_product_attention)."""

from __future__ import annotations

import contextlib

import torch


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False where autocast does not exist (meta tensors: it would raise).
    Under torch.compile the tensors are fake ones of real devices, and is_autocast_available is not asked: dynamo
    traces it in torch 2.13 but not in 2.11 (the GPU machine's), where it broke every fullgraph compile of the ops."""
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_inputs(*values):
    """Under autocast on the first value's device, the floating-point tensors among `values` cast to autocast's
    dtype as PyTorch's lower-precision policy casts them (float64 is left alone); anything else (a first value that
    is no tensor included) is returned as it is, for the op's checks to judge. The op casts before its checks (mixed
    float32 and bf16 inputs are what autocast is for), then runs its kernels under autocast_disabled, so that ATen
    products inside them are not cast again."""
    if not isinstance(values[0], torch.Tensor):
        return values
    device_type = values[0].device.type
    if not _autocast_enabled(device_type):
        return values
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
                 else v for v in values)


def autocast_disabled(device_type: str):
    """torch.autocast(device_type, enabled=False), or nothing where autocast is off already (entering and leaving
    torch.autocast costs 3 us a call) or does not exist (meta tensors)."""
    if not _autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
