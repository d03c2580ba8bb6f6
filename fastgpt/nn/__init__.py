"""Drop-in replacements for torch.nn modules, on fastgpt's ops."""

from fastgpt.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]
