"""Drop-in replacements for torch.nn modules, on fastgpt's ops."""

from fastgpt.nn.feed_forward import FeedForward
from fastgpt.nn.layer_norm import LayerNorm
from fastgpt.nn.multihead_attention import MultiheadAttention
from fastgpt.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                    TransformerEncoderLayer)
from fastgpt.nn.convert import convert

__all__ = ["FeedForward", "LayerNorm", "MultiheadAttention", "Transformer", "TransformerDecoder",
           "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer", "convert"]
