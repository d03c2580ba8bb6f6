"""fastgpt.nn.convert: swap a model's torch.nn LayerNorm, MultiheadAttention and Transformer modules for fastgpt's.

Each fastgpt twin is a subclass of its torch.nn class that adds no state and overrides only forward, so a module
becomes its twin by changing its class in place: parameters, buffers, hooks, training mode, device and dtype all
stay as they are, and nothing is copied. Only modules whose class is exactly the torch.nn one are converted: a
user's subclass may override forward or add state, so it is kept as it is and named in a warning.
"""

from __future__ import annotations

import warnings

import torch

from fastgpt.nn.layer_norm import LayerNorm
from fastgpt.nn.multihead_attention import MultiheadAttention
from fastgpt.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                    TransformerEncoderLayer)

TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Turns, in place, every torch.nn.{LayerNorm, MultiheadAttention, Transformer, TransformerEncoder,
    TransformerDecoder, TransformerEncoderLayer, TransformerDecoderLayer} inside `model` (`model` included) into its
    fastgpt twin, and returns `model`. Subclasses of those classes are kept and listed in a UserWarning."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    fastgpt_classes = set(TWINS.values())
    kept = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in TWINS:
            module.__class__ = TWINS[cls]
        elif cls not in fastgpt_classes and isinstance(module, tuple(TWINS)):
            kept.append(f"{name or '<model>'} ({cls.__module__}.{cls.__qualname__})")
    if kept:
        warnings.warn("fastgpt.nn.convert kept these modules as they are (subclasses of torch.nn modules, whose "
                      "forward or state may differ from the original's): " + ", ".join(kept), stacklevel=2)
    return model
