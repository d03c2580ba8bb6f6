"""The optimiser and the learning-rate schedule of GPT-1 pretraining.

AdamW with decoupled weight decay (Loshchilov & Hutter) on every weight matrix (embeddings, projections) and none on
biases and LayerNorm gains: GPT-1's "modified L2 regularization ... w = 0.01 on all non bias or gain weights".
The rule is by shape: parameters with two or more dimensions decay, vectors do not. A tied weight (the token
embedding and the output head) is one parameter and appears once.

The learning rate rises linearly from lr/warmup to lr over the first `warmup` updates, then follows half a cosine
down to `min_lr` at update `total` (GPT-1: lr 2.5e-4, 2,000 warm-up updates, cosine to 0), or a straight line
(GPT-1's fine-tuning: warm-up over 0.2% of the updates, linear decay to 0).
"""

from __future__ import annotations

import math

import torch


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "module.")


def _plain_name(name: str) -> str:
    """A parameter's name without the prefixes DDP, FSDP and torch.compile add to it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_dims(model: torch.nn.Module) -> dict[str, int]:
    return {_plain_name(n): p.dim() for n, p in model.named_parameters()}


def parameter_groups(model: torch.nn.Module, weight_decay: float, dims: dict[str, int] | None = None) -> list[dict]:
    """Two AdamW groups: matrices decay, vectors do not. Under FSDP pass `dims` (parameter_dims of the model taken
    before wrapping): FSDP flattens parameters into 1-D shards, so their shapes no longer tell matrix from vector."""
    dims = dims or parameter_dims(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if dims[_plain_name(name)] >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay, betas, eps, fused: bool, dims=None) -> torch.optim.AdamW:
    # fused=True runs the whole update as one multi-tensor CUDA kernel; it is CUDA-only (and needs float params).
    groups = parameter_groups(model, weight_decay, dims)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float, decay: str = "cosine") -> float:
    """Multiplier on the peak lr for update number `step` (0-based): linear warm-up, then `decay` ("cosine" or
    "linear") to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    falling = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * falling


def make_scheduler(optimizer, warmup: int, total: int, min_ratio: float,
                   decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_multiplier(step, warmup, total, min_ratio, decay))
