"""pytest-benchmark cases that run on CPU, so regressions show as comparisons between saved runs:

    pytest bench/ --benchmark-only --benchmark-autosave          # record a run
    pytest bench/ --benchmark-only --benchmark-compare           # compare with the last saved one

Not part of the test suite (pyproject's testpaths is tests/); correctness is checked once before timing.
"""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.ops.layer_norm import layer_norm

CPU_BACKENDS = [b for b in fastgpt.available_backends("cpu") if b != "triton"]  # the interpreter is not a speed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows,cols", [(2048, 768)])
def test_layer_norm_fwd_bwd(benchmark, backend, rows, cols):
    x = torch.randn(rows, cols, requires_grad=True)
    w, b = torch.randn(cols, requires_grad=True), torch.randn(cols, requires_grad=True)
    dy = torch.randn(rows, cols)

    def step():
        with fastgpt.use_backend(backend):
            return torch.autograd.grad(layer_norm(x, (cols,), w, b), (x, w, b), dy)

    with fastgpt.use_backend(backend):
        torch.testing.assert_close(layer_norm(x, (cols,), w, b), F.layer_norm(x, (cols,), w, b),
                                   rtol=1e-5, atol=1e-5)
    benchmark(step)
