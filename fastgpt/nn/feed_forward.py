"""fastgpt.nn.FeedForward: the Transformer's position-wise feed-forward block on fastgpt's fused kernels.

    FeedForward(x) = dropout(linear2(act(linear1(x))))

ReLU in the original Transformer, GELU in GPT-1 (its tanh form, "gelu_tanh"). The parameters are two nn.Linear
(`linear1`: d_model -> d_ff, `linear2`: d_ff -> d_model), so state dicts of torch models load as they are.
"""

import torch

from fastgpt.ops.linear_gelu import ACTIVATIONS, feed_forward


class FeedForward(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: expected activation to be one of {', '.join(ACTIVATIONS)}, "
                             f"got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FeedForward: expected dropout in [0, 1), got {dropout}")
        self.activation = activation
        self.dropout = dropout
        self.linear1 = torch.nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.linear2 = torch.nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                            activation=self.activation, dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"
