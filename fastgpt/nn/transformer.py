"""fastgpt.nn.Transformer and its parts: torch.nn's encoder-decoder Transformer on fastgpt's ops.

Subclasses of the torch.nn classes: constructors, parameters, state_dict keys, forward signatures and
generate_square_subsequent_mask are PyTorch's own (so a checkpoint of the torch.nn model loads unchanged, and a
seeded construction draws the very same weights). The constructors build PyTorch's sub-modules and then turn the
MultiheadAttention and LayerNorm ones into their fastgpt twins (same state, different forward; see convert.py).

What runs, per layer (post-LN, the default; norm_first=True gives the pre-LN form x + f(norm(x))):
    self-attention    fastgpt.nn.MultiheadAttention (fused attention, one merged mask)
    x = LN(x + f(x))  fastgpt.ops.add_layer_norm(f(x), x, dropout_p): the sub-layer's dropout, the sum and the
                      norm in one pass
    feed-forward      fastgpt.ops.feed_forward for GELU and ReLU when the inner dropout is off (eval, or p = 0),
                      else linear_gelu + dropout + linear (GELU) or plain PyTorch (ReLU, other callables).
Only plain sub-modules are fused away: a Linear, LayerNorm, Dropout or activation that is a subclass, a wrapper or
has hooks (pruning, adapters, profilers) runs its own forward, as in PyTorch.

Differences from PyTorch: no nested-tensor fast path (so, in eval mode with a key-padding mask, the outputs at
padded positions are computed like any other rather than set to 0; the outputs at real positions are the same; an
encoder layer handed a nested batch, as torch.nn.TransformerEncoder does there, runs it padded);
a causal mask is detected (as PyTorch does when is_causal is None) only outside torch.compile, where the mask is
then applied as a mask: same result, without the kernels' causal fast path. Pass is_causal=True to get it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastgpt.nn.layer_norm import LayerNorm
from fastgpt.nn.multihead_attention import MultiheadAttention
from fastgpt.ops.layer_norm import add_layer_norm
from fastgpt.ops.linear_gelu import feed_forward, linear_gelu


def _runs_as_is(module, *classes) -> bool:
    """Whether `module` may be fused away: exactly one of `classes` (not a user's subclass or wrapper) with no hooks
    on it or on every module (a pruning mask, an adapter, a profiler). Any other module runs its own forward."""
    if type(module) not in classes:
        return False
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    global_hooks = (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks,
                    torch.nn.modules.module._global_backward_hooks,
                    torch.nn.modules.module._global_backward_pre_hooks)
    return not any(hooks) and not any(global_hooks)


def _activation_name(activation) -> str | None:
    """fastgpt.ops.feed_forward's name for `activation` ("gelu", "gelu_tanh", "relu"), or None for others."""
    if activation is F.gelu:
        return "gelu"
    if activation is F.relu:
        return "relu"
    if _runs_as_is(activation, torch.nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if _runs_as_is(activation, torch.nn.ReLU):
        return "relu"
    return None


def _attend(attn, x: torch.Tensor, memory: torch.Tensor, mask, padding, causal: bool) -> torch.Tensor:
    """attn(x, memory, memory) without weights: the fused attention path."""
    return attn(x, memory, memory, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                is_causal=causal)[0]


def _feed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """linear2(dropout(activation(linear1(x)))), on the fused ops where they apply (plain modules, _runs_as_is); the
    output dropout is the caller's (fused into add_layer_norm after post-LN layers)."""
    linear1, linear2, dropout = layer.linear1, layer.linear2, layer.dropout
    activation = _activation_name(layer.activation)
    if activation is None or not _runs_as_is(linear1, torch.nn.Linear):
        return linear2(dropout(layer.activation(linear1(x))))
    # A plain Dropout that is off in its own mode (eval, or MC dropout) or by p = 0; any other module in its place
    # (nn.Identity, to strip dropout) runs its own forward.
    dropout_off = _runs_as_is(dropout, torch.nn.Dropout) and (not dropout.training or dropout.p == 0.0)
    if dropout_off and _runs_as_is(linear2, torch.nn.Linear):
        return feed_forward(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, activation)
    if activation in ("gelu", "gelu_tanh"):
        hidden = linear_gelu(x, linear1.weight, linear1.bias, "tanh" if activation == "gelu_tanh" else "none")
    else:
        hidden = layer.activation(linear1(x))
    return linear2(dropout(hidden))


def add_norm(sublayer_out: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module,
             dropout: torch.nn.Dropout | None = None) -> torch.Tensor:
    """norm(residual + dropout(sublayer_out)), in one fused op (dropout included) when `norm` is a plain LayerNorm
    and `dropout` a plain Dropout (_runs_as_is)."""
    if not (_runs_as_is(norm, torch.nn.LayerNorm, LayerNorm)
            and (dropout is None or _runs_as_is(dropout, torch.nn.Dropout))):
        return norm(residual + (sublayer_out if dropout is None else dropout(sublayer_out)))
    if sublayer_out.dtype != residual.dtype:
        # Under autocast the sub-layer gives bf16/fp16 while the residual stream stays float32: add in the wider
        # type, as `residual + sublayer_out` would.
        dtype = torch.promote_types(sublayer_out.dtype, residual.dtype)
        sublayer_out, residual = sublayer_out.to(dtype), residual.to(dtype)
    return add_layer_norm(sublayer_out, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps,
                          dropout_p=0.0 if dropout is None else dropout.p,
                          training=dropout is not None and dropout.training)


def _adopt(module: torch.nn.Module) -> None:
    """Turns `module`'s torch.nn MultiheadAttention and LayerNorm children into their fastgpt twins."""
    for child in module.children():
        if type(child) is torch.nn.MultiheadAttention:
            child.__class__ = MultiheadAttention
        elif type(child) is torch.nn.LayerNorm:
            child.__class__ = LayerNorm


def _is_causal(mask: torch.Tensor | None, is_causal: bool | None, size: int | None, name: str) -> bool:
    """PyTorch's rule: an explicit hint wins; otherwise a mask equal to the causal mask counts as causal (of the
    sequence's length, or of its own size when the length is unknown: a nested batch)."""
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"expected {name} to be a bool or floating-point mask, got {mask.dtype}")
    if is_causal is not None:
        return bool(is_causal)
    if mask is None or mask.dim() != 2 or torch.compiler.is_compiling():
        return False
    size = mask.shape[-2] if size is None else size
    if mask.shape != (size, size):
        return False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(size, device=mask.device, dtype=mask.dtype)
    return bool(torch.equal(mask, causal))


def _seq_len(x: torch.Tensor, batch_first: bool) -> int | None:
    """The sequence length, or None for a nested batch (ragged lengths; a nested tensor has no shape)."""
    if x.is_nested:
        return None
    return x.shape[1 if (batch_first and x.dim() == 3) else 0]


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if src.is_nested:
            return _over_nested(self, src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = add_norm(_attend(self.self_attn, x, x, src_mask, src_key_padding_mask, is_causal), x,
                     self.norm1, self.dropout1)
        return add_norm(_feed_forward(self, x), x, self.norm2, self.dropout2)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(_feed_forward(self, x))


def _over_nested(layer: TransformerEncoderLayer, src: torch.Tensor, src_mask, src_key_padding_mask,
                 is_causal: bool) -> torch.Tensor:
    """The layer over a nested batch of sequences (B, ragged L, E), as torch.nn.TransformerEncoder hands its layers
    in inference with a key-padding mask (its fast path, chosen for any subclass of torch's layer): run padded, with
    the key-padding mask the lengths give, and nested again."""
    if not layer.self_attn.batch_first or src.dim() != 3 or src_mask is not None or src_key_padding_mask is not None:
        raise ValueError("TransformerEncoderLayer: a nested src takes neither src_mask nor src_key_padding_mask (its "
                         "lengths are the padding) and needs batch_first=True")
    lengths = [row.shape[0] for row in src.unbind()]
    padded = src.to_padded_tensor(0.0)  # (B, L, E)
    padding = torch.arange(padded.shape[1], device=src.device) >= torch.tensor(lengths, device=src.device)[:, None]
    out = layer(padded, src_key_padding_mask=padding, is_causal=is_causal)  # (B, L, E)
    return torch.nested.as_nested_tensor([row[:n] for row, n in zip(out, lengths)])


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            return x + self._ff_block(self.norm3(x))
        x = add_norm(_attend(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x,
                     self.norm1, self.dropout1)
        x = add_norm(_attend(self.multihead_attn, x, memory, memory_mask, memory_key_padding_mask,
                             memory_is_causal), x, self.norm2, self.dropout2)
        return add_norm(_feed_forward(self, x), x, self.norm3, self.dropout3)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(_feed_forward(self, x))


class TransformerEncoder(torch.nn.TransformerEncoder):
    """The layers in turn, then `norm`; no nested-tensor conversion (see the module docstring)."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        is_causal = _is_causal(mask, is_causal, _seq_len(src, self.layers[0].self_attn.batch_first), "mask")
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(torch.nn.TransformerDecoder):
    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        tgt_is_causal = _is_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, self.layers[0].self_attn.batch_first),
                                   "tgt_mask")
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                           memory_is_causal=memory_is_causal)
        return output if self.norm is None else self.norm(output)


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer whose default encoder and decoder are fastgpt's (custom ones are used as given)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu, custom_encoder: Any | None = None,
                 custom_decoder: Any | None = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation, custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias,
                         device, dtype)
        from fastgpt.nn.convert import convert
        if custom_encoder is None:
            convert(self.encoder)
        if custom_decoder is None:
            convert(self.decoder)
