"""fastgpt.nn.MultiheadAttention: torch.nn.MultiheadAttention on fastgpt's fused attention.

A subclass, so the constructor, parameters (in_proj_weight or q/k/v_proj_weight, in_proj_bias, out_proj, bias_k,
bias_v), state_dict keys and isinstance checks are PyTorch's own; only forward changes.

    out = out_proj(concat_h softmax(q_h k_h^T / sqrt(D) + mask) v_h)

Two paths:
- need_weights=False: fastgpt.ops.scaled_dot_product_attention (the fused kernels) with one merged mask.
- need_weights=True (PyTorch's default): the probabilities are formed explicitly, as PyTorch does, and returned
  (averaged over heads when average_attn_weights).

Masks, as in torch.nn.MultiheadAttention: key_padding_mask (B, S) (or (S,) unbatched), True = ignore that key, or an
additive float; attn_mask (L, S) or (B*H, L, S) (or (H, L, S) unbatched), True = may NOT attend, or additive float.
They are merged into one mask broadcastable to (B, H, L, S): boolean (True = may attend, the op's convention) when
both are boolean, else additive. A lone key_padding_mask stays (B, 1, 1, S) so kernels take their padding fast path.

Differences from PyTorch, all on inputs PyTorch rejects or leaves undefined: is_causal=True without attn_mask means
causal attention (PyTorch raises); a query whose keys are all masked gives 0 on the fused path (PyTorch's math path
gives NaN there, and so does need_weights=True here); there is no nested-tensor fast path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastgpt.ops.attention import scaled_dot_product_attention

_NAME = "MultiheadAttention"


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A PyTorch-convention mask (bool True = masked, or additive float) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        self_attention, shared_kv = query is key and key is value, key is value
        if not batched:  # unbatched (L, E): a batch of one
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)  # (H, L, S) -> (1, H, L, S)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt_len, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, tgt_len, -1)

        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv)  # (B, L|S|S, E)
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1).to(v.dtype)], dim=1)
            key_padding_mask, attn_mask = self._pad_masks(key_padding_mask, attn_mask)
        q = q.view(batch, tgt_len, heads, head_dim).transpose(1, 2)  # (B, H, L, D)
        k = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)  # (B, H, S, D)
        v = v.view(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:  # one all-zero key/value appended after projection
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            key_padding_mask, attn_mask = self._pad_masks(key_padding_mask, attn_mask)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = self._explicit(q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            mask, causal = self._merged_mask(key_padding_mask, attn_mask, is_causal, q.dtype, tgt_len, k.shape[2])
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
            weights = None
        out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)  # (B, L, E)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, weights

    # -----------------------------------------------------------------------------------------------------------

    def _check(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"{_NAME}: nested tensors are not supported (pad them and pass key_padding_mask)")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{_NAME}: expected query, key and value all 3-D (batched) or all 2-D (unbatched), "
                             f"got shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
        batched = query.dim() == 3
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{_NAME}: expected {name}'s last dim to be {width}, got shape {tuple(t.shape)}")
        seq = 1 if (self.batch_first and batched) else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{_NAME}: expected key and value with the same batch and length, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched and query.shape[1 - seq] != key.shape[1 - seq]:
            raise ValueError(f"{_NAME}: expected query and key with the same batch size, got "
                             f"{tuple(query.shape)} and {tuple(key.shape)}")
        batch = query.shape[1 - seq] if batched else None
        tgt_len, src_len = query.shape[seq], key.shape[seq]
        if key_padding_mask is not None:
            expected = (batch, src_len) if batched else (src_len,)
            if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != expected:
                shape = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else \
                    type(key_padding_mask).__name__
                raise ValueError(f"{_NAME}: expected key_padding_mask of shape {expected} "
                                 f"({'batch, ' if batched else ''}source length), got {shape}")
            self._check_mask_dtype("key_padding_mask", key_padding_mask)
        if attn_mask is not None:
            heads = (batch * self.num_heads,) if batched else (self.num_heads,)
            if not isinstance(attn_mask, torch.Tensor) or tuple(attn_mask.shape) not in (
                    (tgt_len, src_len), (*heads, tgt_len, src_len)):
                shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
                raise ValueError(f"{_NAME}: expected attn_mask of shape {(tgt_len, src_len)} or "
                                 f"{(*heads, tgt_len, src_len)}, got {shape}")
            self._check_mask_dtype("attn_mask", attn_mask)
        return batched

    @staticmethod
    def _check_mask_dtype(name, mask):
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{_NAME}: expected {name} to be bool or floating point, got {mask.dtype}")

    def _in_projection(self, query, key, value, self_attention, shared_kv):
        if self._qkv_same_embed_dim:
            bias = self.in_proj_bias
            if self_attention:  # one matrix product for q, k and v
                return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            if shared_kv:  # cross-attention on one memory: one matrix product for k and v
                e = self.embed_dim
                k, v = F.linear(key, self.in_proj_weight[e:], None if bias is None else bias[e:]).chunk(2, dim=-1)
                return F.linear(query, self.in_proj_weight[:e], None if bias is None else bias[:e]), k, v
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    @staticmethod
    def _pad_masks(key_padding_mask, attn_mask):
        """One more key (bias_k or the zero key): it is never padding and every query may attend to it."""
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        return key_padding_mask, attn_mask

    @staticmethod
    def _merged_mask(key_padding_mask, attn_mask, is_causal, dtype, tgt_len, src_len):
        """(mask for the op or None, is_causal for the op). PyTorch's rule: is_causal is a hint that attn_mask is
        the causal mask, trusted when there is no key_padding_mask."""
        if is_causal and key_padding_mask is None:
            return None, True
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=key_padding_mask.device).triu(1)
        kpm = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if kpm is None and attn_mask is None:
            return None, False
        if kpm is None or attn_mask is None:
            mask = kpm if attn_mask is None else attn_mask
            return (~mask if mask.dtype == torch.bool else mask.to(dtype)), False
        if kpm.dtype == torch.bool and attn_mask.dtype == torch.bool:
            return ~(kpm | attn_mask), False
        return _as_additive(kpm, dtype) + _as_additive(attn_mask, dtype), False

    def _explicit(self, q, k, v, key_padding_mask, attn_mask, is_causal, dropout_p):
        """softmax(q k^T / sqrt(D) + mask) v with the probabilities kept: (out (B, H, L, D), weights (B, H, L, S))."""
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # (B, H, L, S)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if mask is not None:
                scores = scores + _as_additive(mask, scores.dtype)
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return weights @ v, weights
