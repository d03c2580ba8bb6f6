"""Host time per call: what each op costs the CPU where its kernel costs next to nothing, fastgpt's backends against
the PyTorch call they replace.

    python -m bench.bench_overhead            # on the GPU if there is one, else on CPU
    python -m bench.bench_overhead --quick    # fewer calls

Every op at one small shape (8 rows of GPT-1's widths on a GPU, narrower on a CPU: WIDTHS; attention: one query per
head over 8 keys), without grad ("fwd") and forward+backward ("fwd+bwd": the backward's host work, autograd's
included, through torch.autograd.grad). On a GPU the calls are queued back to back and the device synchronized once
per batch of calls: the kernels are shorter than their launches, so the time per call is the host's, the floor under
any call of the op in eager mode (decoding a token at a time, small batches). On a CPU it includes the (tiny)
kernels. Each implementation's output and input gradients are checked against float64 before it is timed. The metric
is microseconds per call; speedup_vs_best_peer is PyTorch's time over fastgpt's.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.ops.attention import scaled_dot_product_attention
from fastgpt.ops.layer_norm import add_layer_norm, layer_norm
from fastgpt.ops.linear_gelu import linear_gelu

from .common import (GRAD_TOLERANCE, Row, check_gradients, chosen_dtypes, environment, fastgpt_backends, finish,
                     standard_parser)

ROWS = 8
# (d_model, d_ff, heads, head dim): GPT-1's on a GPU; on a CPU, where a GPT-1-sized product alone takes half a
# millisecond, widths small enough that the kernels cost little beside the host's work.
WIDTHS = {"cuda": (768, 3072, 12, 64), "cpu": (64, 256, 4, 16)}


def ops(device: torch.device, dtype: torch.dtype) -> dict:
    """op -> (shape label, inputs, PyTorch's call, fastgpt's call); both calls take the inputs."""
    d_model, d_ff, heads, head_dim = WIDTHS[device.type]

    def randn(*size, scale=1.0, shift=0.0):
        return torch.randn(*size, device=device, dtype=dtype) * scale + shift

    return {
        "layer_norm": (f"{ROWS}x{d_model}", (randn(ROWS, d_model), randn(d_model, scale=0.5, shift=1.0),
                                             randn(d_model)),
                       lambda x, w, b: F.layer_norm(x, (d_model,), w, b),
                       lambda x, w, b: layer_norm(x, d_model, w, b)),
        "add_layer_norm": (f"{ROWS}x{d_model}", (randn(ROWS, d_model), randn(ROWS, d_model),
                                                 randn(d_model, scale=0.5, shift=1.0), randn(d_model)),
                           lambda x, r, w, b: F.layer_norm(x + r, (d_model,), w, b),
                           lambda x, r, w, b: add_layer_norm(x, r, d_model, w, b)),
        "linear_gelu": (f"{ROWS}x{d_model}->{d_ff}", (randn(ROWS, d_model), randn(d_ff, d_model, scale=d_model ** -0.5),
                                                      randn(d_ff)),
                        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
                        lambda x, w, b: linear_gelu(x, w, b, approximate="tanh")),
        # One query per head (a decoding step) over ROWS keys.
        "attention": (f"1x{heads}x1x{ROWS}x{head_dim}", (randn(1, heads, 1, head_dim), randn(1, heads, ROWS, head_dim),
                                                          randn(1, heads, ROWS, head_dim)),
                      F.scaled_dot_product_attention, scaled_dot_product_attention),
    }


def per_call_us(fn, device: torch.device, calls: int, repeats: int = 7) -> list[float]:
    """Microseconds per call, one figure per batch of `calls` calls, the device synchronized around each batch."""
    cuda = device.type == "cuda"
    for _ in range(max(10, calls // 10)):
        fn()
    figures = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        figures.append((time.perf_counter() - started) / calls * 1e6)
    return sorted(figures)


def bench_op(op: str, spec: tuple, dtype: torch.dtype, device: torch.device, impls: list[str],
             calls: int) -> list[Row]:
    shape, tensors, peer, ours = spec
    leaves = [t.detach().requires_grad_() for t in tensors]
    with torch.no_grad():
        grad = peer(*tensors)  # the output's gradient in the backward pass: any tensor of its shape and dtype
    exact = [t.detach().double().requires_grad_() for t in tensors]
    expected = peer(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    rows = []
    for impl in impls:
        backend = impl.removeprefix("fastgpt-")
        call = peer if impl == "torch-eager" else ours

        def forward():
            with torch.no_grad():
                return call(*tensors)

        def forward_backward():
            out = call(*leaves)
            return torch.autograd.grad(out, leaves, grad)

        with fastgpt.use_backend(backend) if impl != "torch-eager" else contextlib.nullcontext():
            # Validate before timing: the output and the input gradients against float64.
            tolerance = GRAD_TOLERANCE[dtype]
            torch.testing.assert_close(forward().double(), expected.detach(), atol=tolerance, rtol=tolerance)
            check_gradients(f"{impl} {op} {shape} {dtype}", forward_backward(), expected_grads, dtype)
            for pass_, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                figures = per_call_us(fn, device, calls)
                median = statistics.median(figures)
                rows.append(Row(op, shape, str(dtype).removeprefix("torch."), pass_, impl, median / 1e3,
                                figures[len(figures) // 5] / 1e3, figures[(4 * len(figures)) // 5] / 1e3,
                                median, "us/call"))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = standard_parser(__doc__, "bfloat16").parse_args(argv)
    device = torch.device(args.device)
    dtypes = chosen_dtypes(args, [torch.bfloat16] if device.type == "cuda" else [torch.float32])
    impls = [f"fastgpt-{name}" for name in fastgpt_backends(device, args.include_interpreter)] + ["torch-eager"]
    calls = 50 if args.quick else 500
    info = environment(device)
    rows = [row for dtype in dtypes for op, spec in ops(device, dtype).items()
            for row in bench_op(op, spec, dtype, device, impls, calls)]
    finish("overhead", rows, info, args)


if __name__ == "__main__":
    main()
