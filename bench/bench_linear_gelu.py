"""The GELU feed-forward block (gelu_ffn) forward, backward and forward+backward: fastgpt's backends against PyTorch
eager (F.linear -> F.gelu -> F.linear) and torch.compile (default, max-autotune).

    python -m bench.bench_linear_gelu             # GPT-1's shapes and a larger one on a GPU
    python -m bench.bench_linear_gelu --quick     # a smoke run (CPU-sized on CPU)

FLOPs counted (the matrix products only; the element-wise work is the memory traffic the fusion removes), for M
tokens, model width d and hidden width f:
    forward   2 products of 2 M d f                                = 4 M d f
    backward  4 products (dh, dW2, dx, dW1) of 2 M d f             = 8 M d f
    fwd+bwd                                                        = 12 M d f
"of ceil" is the fraction of the measured dense matrix-product rate in the row's dtype (n^3 products: n = 8192 on a
GPU, 2048 on a CPU).
The activation is GELU's tanh form (GPT-1's), dropout off: the comparison is of the fused epilogues.
"""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

import fastgpt
from fastgpt.ops.linear_gelu import gelu_ffn

from .common import (Row, check_gradients, chosen_compile_modes, chosen_dtypes, environment, fastgpt_backends,
                     matmul_ceilings, peak_memory_mb, rates_text, rotations, run_grid, skip, standard_parser,
                     time_calls, triton_choices)


def flops(tokens: int, d_model: int, d_ff: int) -> dict[str, int]:
    fwd = 4 * tokens * d_model * d_ff
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}


def eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def implementations(device: torch.device, include_interpreter: bool, compile_modes: list[str]) -> dict:
    def fastgpt_backend(name):
        def run(x, w1, b1, w2, b2):
            with fastgpt.use_backend(name):
                return gelu_ffn(x, w1, b1, w2, b2, approximate="tanh")
        return run

    impls = {}
    for name in fastgpt_backends(device, include_interpreter):
        impls[f"fastgpt-{name}"] = fastgpt_backend(name)
    impls["torch-eager"] = eager
    for mode in compile_modes:
        impls[f"torch-compile-{mode}"] = torch.compile(eager, mode=None if mode == "default" else mode)

    # Transformer Engine fuses GELU only inside LayerNormMLP (LayerNorm + FFN), a different op from this one.
    skip("transformer-engine", "fuses GELU only inside LayerNormMLP, which includes a LayerNorm: not this op")
    skip("liger-kernel", "has no GELU feed-forward kernel to compare (it fuses GEGLU and SwiGLU)")
    return impls


def bench_shape(tokens: int, d_model: int, d_ff: int, dtype: torch.dtype, device: torch.device, impls: dict,
                ceiling_tflops: float) -> list[Row]:
    elem = torch.empty((), dtype=dtype).element_size()
    counted = flops(tokens, d_model, d_ff)
    # Activations read and written by one forward+backward: x, out, h, pre and their gradients, about 8 M f e.
    copies = rotations(8 * tokens * d_ff * elem)
    inputs = []
    for _ in range(copies):
        x = torch.randn(tokens, d_model, device=device, dtype=dtype).requires_grad_()
        w1 = (torch.randn(d_ff, d_model, device=device) * d_model ** -0.5).to(dtype).requires_grad_()
        b1 = (torch.randn(d_ff, device=device) * 0.1).to(dtype).requires_grad_()
        w2 = (torch.randn(d_model, d_ff, device=device) * d_ff ** -0.5).to(dtype).requires_grad_()
        b2 = (torch.randn(d_model, device=device) * 0.1).to(dtype).requires_grad_()
        inputs.append(((x, w1, b1, w2, b2), torch.randn(tokens, d_model, device=device, dtype=dtype)))
    params0 = inputs[0][0]
    check_rows = min(tokens, 2048)  # the float64 check on a slice of the tokens keeps it cheap
    leaves = [params0[0][:check_rows].detach().double().requires_grad_()] + \
        [p.detach().double().requires_grad_() for p in params0[1:]]
    expected = eager(*leaves)
    dy = inputs[0][1][:check_rows]
    expected_grads = torch.autograd.grad(expected, leaves, dy.double())
    out = []
    for impl, fn in impls.items():
        x_rows = params0[0][:check_rows].detach().requires_grad_()
        got = fn(x_rows, *params0[1:])
        error = (got.double() - expected).abs().max().item()
        assert error < {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype], \
            f"{impl} is wrong at {tokens}x{d_model}->{d_ff} {dtype}: max error {error}"
        check_gradients(f"{impl} at {tokens}x{d_model}->{d_ff} {dtype}",
                        torch.autograd.grad(got, (x_rows, *params0[1:]), dy), expected_grads, dtype)
        extra = {"tokens": tokens, "d_model": d_model, "d_ff": d_ff}
        with triton_choices(impl) as choices:
            graphs = [(fn(*params), params, dy) for params, dy in inputs]
            calls = {
                "fwd": [lambda params=params: fn(*params) for params, _ in inputs],
                "bwd": [lambda y=y, p=p, dy=dy: torch.autograd.grad(y, p, dy, retain_graph=True)
                        for y, p, dy in graphs],
                "fwd+bwd": [lambda params=params, dy=dy: torch.autograd.grad(fn(*params), params, dy)
                            for params, dy in inputs],
            }
            for pass_, fns in calls.items():
                median, p20, p80 = time_calls(fns, device, repeats=10 if device.type == "cuda" else 5)
                tflops = counted[pass_] / (median * 1e-3) / 1e12
                out.append(Row("gelu_ffn", f"{tokens}x{d_model}->{d_ff}", str(dtype).replace("torch.", ""), pass_,
                               impl, median, p20, p80, tflops, "TFLOP/s", tflops / ceiling_tflops,
                               peak_memory_mb(fns[0], device), extra=extra))
            del graphs
        if choices:  # the triton backend's rows: which configs its autotuner picked for this shape's products
            extra["triton_configs"] = sorted(choices)
    return out


def main(argv=None) -> None:
    args = standard_parser(__doc__).parse_args(argv)

    device = torch.device(args.device)
    functorch_config.donated_buffer = False  # the backward pass is timed by replaying one graph
    cuda = device.type == "cuda"
    if args.quick:
        grid = [(4096, 768, 3072)] if cuda else [(256, 128, 512), (1024, 256, 1024)]
    elif cuda:  # GPT-1 (768 -> 3072) at 16k and 32k tokens, and a larger model (4096 -> 16384)
        grid = [(16384, 768, 3072), (32768, 768, 3072), (8192, 4096, 16384)]
    else:
        grid = [(2048, 768, 3072)]
    dtypes = chosen_dtypes(args, [torch.bfloat16] if cuda else [torch.float32])
    compile_modes = chosen_compile_modes(args, ["default", "max-autotune"] if cuda and not args.quick else ["default"])

    info = environment(device)
    ceilings = matmul_ceilings(device, dtypes, info)
    print(f"measured matrix-product rates: {rates_text(info)}")
    impls = implementations(device, args.include_interpreter, compile_modes)
    run_grid("linear_gelu", [(shape, dtype) for dtype in dtypes for shape in grid],
             lambda shape, dtype: bench_shape(*shape, dtype, device, impls, ceilings[dtype]), info, args)


if __name__ == "__main__":
    main()
