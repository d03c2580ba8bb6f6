"""fastgpt.nn.LayerNorm: torch.nn.LayerNorm on fastgpt's kernels.

A subclass, so the constructor, parameters, state_dict keys, extra_repr and isinstance checks are PyTorch's own;
only forward changes.
"""

import torch

from fastgpt.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
