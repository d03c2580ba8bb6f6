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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_fwd_bwd(benchmark, backend):
    from fastgpt.ops.attention import scaled_dot_product_attention
    q, k, v = (torch.randn(1, 4, 256, 64, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 4, 256, 64)

    def step():
        with fastgpt.use_backend(backend):
            out = scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    with fastgpt.use_backend(backend):
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-5)
    benchmark(step)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gelu_ffn_fwd_bwd(benchmark, backend):
    from fastgpt.ops.linear_gelu import gelu_ffn
    x = torch.randn(512, 128, requires_grad=True)
    w1, b1 = (torch.randn(512, 128) * 128 ** -0.5).requires_grad_(), torch.randn(512, requires_grad=True)
    w2, b2 = (torch.randn(128, 512) * 512 ** -0.5).requires_grad_(), torch.randn(128, requires_grad=True)
    params = (x, w1, b1, w2, b2)
    dout = torch.randn(512, 128)

    def step():
        with fastgpt.use_backend(backend):
            return torch.autograd.grad(gelu_ffn(*params), params, dout)

    with fastgpt.use_backend(backend):
        torch.testing.assert_close(gelu_ffn(*params),
                                   F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2),
                                   rtol=1e-4, atol=1e-4)
    benchmark(step)
