"""Scaled dot-product attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

    out = dropout(softmax(q @ k^T * scale + mask)) @ v

query (..., H, Lq, D), key (..., Hk, Lk, D), value (..., Hk, Lk, Dv); with enable_gqa, H is a multiple of Hk and
query head h reads key/value head h // (H // Hk). is_causal is aligned top-left, as in PyTorch: query i sees keys
j <= i, also when Lq != Lk. attn_mask is boolean (True = may attend) or additive float, broadcastable to
(..., H, Lq, Lk). A query row whose keys are all masked gives 0, and 0 gradients.

Backends: reference (this file); the triton and csrc kernels are added by their own modules' registrations.
"""

from __future__ import annotations

import math

import torch

from fastgpt.ops._checks import check_like, check_tensor

_OP = "scaled_dot_product_attention"


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(_OP, name, t)
        if name != "query":
            check_like(_OP, name, t, "query", query)
        if t.dim() < 3:
            raise ValueError(f"{_OP}: expected {name} with at least 3 dims (..., heads, length, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{_OP}: expected query, key and value with the same number of dims, got "
                         f"{query.dim()}, {key.dim()} and {value.dim()}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"{_OP}: expected query, key and value with the same batch dims, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{_OP}: expected key's head dim to equal query's ({query.shape[-1]}), "
                         f"got {key.shape[-1]}")
    if key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(f"{_OP}: expected key and value with the same heads and length, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if enable_gqa:
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"{_OP}: with enable_gqa, query's heads ({heads}) must be a multiple of key's "
                             f"({kv_heads})")
    elif heads != kv_heads:
        raise ValueError(f"{_OP}: expected query and key with the same number of heads ({heads} vs {kv_heads}); "
                         f"pass enable_gqa=True for grouped-query attention")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{_OP}: expected dropout_p in [0, 1), got {dropout_p}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{_OP}: expected scale to be a finite number or None, got {scale}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"{_OP}: pass either attn_mask or is_causal=True, not both")
        check_tensor(_OP, "attn_mask", attn_mask, floating=False)
        check_like(_OP, "attn_mask", attn_mask, "query", query, dtype=False)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"{_OP}: expected attn_mask to be bool or of query's dtype ({query.dtype}), "
                            f"got {attn_mask.dtype}")
        target = (*query.shape[:-1], key.shape[-2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
            broadcastable = len(attn_mask.shape) <= len(target)
        except RuntimeError:
            broadcastable = False
        if not broadcastable or torch.broadcast_shapes(attn_mask.shape, target) != target:
            raise ValueError(f"{_OP}: expected attn_mask broadcastable to {target} (..., H, Lq, Lk), "
                             f"got {tuple(attn_mask.shape)}")


def _reference(query, key, value, attn_mask, dropout_keep, dropout_p, is_causal, scale):
    """Attention by its definition, in the inputs' dtype: fully masked rows give 0 (not NaN)."""
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=-3)
        value = value.repeat_interleave(heads // kv_heads, dim=-3)
    lq, lk = query.shape[-2], key.shape[-2]
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., H, Lq, Lk)
    allowed = None
    if is_causal:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).to(query.dtype)  # rows with every key masked: 0, not NaN
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return probs @ value


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on fastgpt's kernels (same arguments, same result)."""
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    dropout_keep = None
    if dropout_p > 0.0:
        from fastgpt.ops.philox import attention_dropout_keep
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        batch = math.prod(query.shape[:-3])
        dropout_keep = attention_dropout_keep(seed, batch, query.shape[-3], query.shape[-2], key.shape[-2],
                                              dropout_p, query.device).view(*query.shape[:-1], key.shape[-2])
    return _reference(query, key, value, attn_mask, dropout_keep, dropout_p, is_causal, scale)
