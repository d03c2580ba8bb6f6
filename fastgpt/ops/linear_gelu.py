"""The GELU feed-forward block: linear_gelu = gelu(x @ W^T + b) and gelu_ffn = W2 gelu(W1 x + b1) + b2.

GELU, exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)); tanh form (GPT-1's):
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Backends: reference (this file); the fused kernels register their backends here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.ops._checks import check_like, check_tensor

APPROXIMATIONS = ("none", "tanh")


def _check_linear(op, input, weight, bias, input_name="input", weight_name="weight", bias_name="bias"):
    check_tensor(op, input_name, input)
    check_tensor(op, weight_name, weight)
    check_like(op, weight_name, weight, input_name, input)
    if weight.dim() != 2 or input.dim() < 1 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{op}: expected {weight_name} of shape (out_features, {input.shape[-1]}) to match "
                         f"{input_name}'s last dim, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, bias_name, bias)
        check_like(op, bias_name, bias, input_name, input)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: expected {bias_name} of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_approximate(op, approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{op}: expected approximate to be 'none' or 'tanh', got {approximate!r}")


def linear_gelu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none") -> torch.Tensor:
    """F.gelu(F.linear(input, weight, bias), approximate=approximate)."""
    _check_linear("linear_gelu", input, weight, bias)
    _check_approximate("linear_gelu", approximate)
    return F.gelu(F.linear(input, weight, bias), approximate=approximate)


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "tanh", dropout_p: float = 0.0,
             training: bool = True) -> torch.Tensor:
    """dropout(F.linear(gelu(F.linear(x, w1, b1)), w2, b2)): the position-wise feed-forward block."""
    _check_linear("gelu_ffn", x, w1, b1, "x", "w1", "b1")
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"gelu_ffn: expected w2 of shape (d_model, {w1.shape[0]}), got {tuple(w2.shape)}")
    _check_linear("gelu_ffn", torch.empty(0, w1.shape[0], dtype=x.dtype, device=x.device), w2, b2,
                  "the hidden activation", "w2", "b2")
    _check_approximate("gelu_ffn", approximate)
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"gelu_ffn: expected dropout_p in [0, 1), got {dropout_p}")
    out = F.linear(linear_gelu(x, w1, b1, approximate), w2, b2)
    return F.dropout(out, dropout_p, training) if dropout_p > 0.0 else out
