"""fastgpt's ops: the functions users call. Each checks its arguments, picks a backend and runs it."""

from fastgpt.ops.attention import scaled_dot_product_attention
from fastgpt.ops.layer_norm import add_layer_norm, layer_norm
from fastgpt.ops.linear_gelu import feed_forward, gelu_ffn, linear_gelu

__all__ = ["add_layer_norm", "feed_forward", "gelu_ffn", "layer_norm", "linear_gelu", "scaled_dot_product_attention"]
