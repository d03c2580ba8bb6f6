"""Host time per call: what each op costs the CPU where its kernel costs next to nothing, fastgpt's backends against
the PyTorch call they replace.

    python -m bench.bench_overhead            # on the GPU if there is one, else on CPU
    python -m bench.bench_overhead --quick    # fewer calls

Every op at one token-sized shape (GPT-1's widths, 8 rows; attention: one query per head over 8 keys), without
grad ("fwd") and forward+backward ("fwd+bwd": the backward's host work, autograd's included, through
torch.autograd.grad). On a GPU the calls are queued back to back and the device synchronized once per batch of
calls: the kernels are shorter than their launches, so the time per call is the host's, the floor under any call
of the op in eager mode (decoding a token at a time, small batches). On a CPU it includes the (tiny) kernels.
The metric is microseconds per call; speedup_vs_best_peer is PyTorch's time over fastgpt's.
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

from .common import Row, chosen_dtypes, environment, fastgpt_backends, finish, standard_parser

ROWS, D_MODEL, D_FF, HEADS, HEAD_DIM = 8, 768, 3072, 12, 64

# op -> (shape label, inputs(device, dtype) -> tensors (the ones to differentiate first), PyTorch's call,
# fastgpt's call): both calls take the tensors.
OPS = {
    "layer_norm": (f"{ROWS}x{D_MODEL}",
                   lambda dev, dt: (torch.randn(ROWS, D_MODEL, device=dev, dtype=dt),
                                    torch.rand(D_MODEL, device=dev, dtype=dt) + 0.5,
                                    torch.randn(D_MODEL, device=dev, dtype=dt)),
                   lambda x, w, b: F.layer_norm(x, (D_MODEL,), w, b),
                   lambda x, w, b: layer_norm(x, D_MODEL, w, b)),
    "add_layer_norm": (f"{ROWS}x{D_MODEL}",
                       lambda dev, dt: (torch.randn(ROWS, D_MODEL, device=dev, dtype=dt),
                                        torch.randn(ROWS, D_MODEL, device=dev, dtype=dt),
                                        torch.rand(D_MODEL, device=dev, dtype=dt) + 0.5,
                                        torch.randn(D_MODEL, device=dev, dtype=dt)),
                       lambda x, r, w, b: F.layer_norm(x + r, (D_MODEL,), w, b),
                       lambda x, r, w, b: add_layer_norm(x, r, D_MODEL, w, b)),
    "linear_gelu": (f"{ROWS}x{D_MODEL}->{D_FF}",
                    lambda dev, dt: (torch.randn(ROWS, D_MODEL, device=dev, dtype=dt),
                                     torch.randn(D_FF, D_MODEL, device=dev, dtype=dt) * D_MODEL ** -0.5,
                                     torch.randn(D_FF, device=dev, dtype=dt)),
                    lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
                    lambda x, w, b: linear_gelu(x, w, b, approximate="tanh")),
    "attention": (f"1x{HEADS}x1x{ROWS}x{HEAD_DIM}",
                  lambda dev, dt: (torch.randn(1, HEADS, 1, HEAD_DIM, device=dev, dtype=dt),
                                   torch.randn(1, HEADS, ROWS, HEAD_DIM, device=dev, dtype=dt),
                                   torch.randn(1, HEADS, ROWS, HEAD_DIM, device=dev, dtype=dt)),
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


def bench_op(op: str, dtype: torch.dtype, device: torch.device, impls: list[str], calls: int) -> list[Row]:
    shape, make, peer, ours = OPS[op]
    tensors = make(device, dtype)
    leaves = [t.detach().requires_grad_() for t in tensors]
    with torch.no_grad():
        expected = peer(*tensors).float()
    rows = []
    for impl in impls:
        backend = impl.removeprefix("fastgpt-")
        call = peer if impl == "torch-eager" else ours

        def forward():
            with torch.no_grad():
                return call(*tensors)

        def forward_backward():
            out = call(*leaves)
            return torch.autograd.grad(out, leaves, out)

        with fastgpt.use_backend(backend) if impl != "torch-eager" else contextlib.nullcontext():
            # Validate before timing: the same output as PyTorch's, to the dtype's rounding.
            torch.testing.assert_close(forward().float(), expected, atol=2e-2, rtol=2e-2)
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
    rows = [row for op in OPS for dtype in dtypes for row in bench_op(op, dtype, device, impls, calls)]
    finish("overhead", rows, info, args)


if __name__ == "__main__":
    main()
