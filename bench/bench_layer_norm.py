"""LayerNorm, and the post-LN epilogue LN(residual + dropout(x)), forward, backward and forward+backward:
fastgpt's backends against PyTorch eager and torch.compile.

    python -m bench.bench_layer_norm             # the full grid on a GPU (or a CPU-sized one on CPU)
    python -m bench.bench_layer_norm --quick     # a smoke run

Two ops: "layer_norm" (F.layer_norm) and "add_layer_norm" (fastgpt.ops.add_layer_norm with GPT-1's dropout 0.1,
against F.layer_norm(residual + F.dropout(x, 0.1)) eager and compiled). Bytes moved (the GB/s below), for M rows
of N elements of `e` bytes, parameters in float32; the second term of each is add_layer_norm's extra traffic:
    forward   read x (M N e) + write y (M N e) + read weight, bias (2 N 4) + write mean, rstd (2 M 4)
              + read residual (M N e)
    backward  read dy, x (2 M N e) + write dx (M N e) + read weight, mean, rstd (N 4 + 2 M 4)
              + write dweight, dbias (2 N 4)
              + read residual (M N e) + write dresidual (M N e: under dropout it differs from dx)
    fwd+bwd   the sum of the two
The dropout mask is the same traffic for every implementation counted: none (fastgpt draws it again in the
backward pass; eager's boolean mask is extra traffic it pays and this formula does not credit).
The ceiling is the device's measured copy rate (read + write), so "of ceil" is the fraction of the memory
bandwidth that a copy achieves.
"""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

import fastgpt
from fastgpt.ops.layer_norm import add_layer_norm, layer_norm
from fastgpt.ops.philox import draw_seed, elementwise_dropout_keep

from .common import (Row, check_gradients, chosen_compile_modes, chosen_dtypes, copy_bandwidth_gbs, environment,
                     fastgpt_backends, optional_peer, peak_memory_mb, rotations, run_grid, standard_parser, time_calls)

# GPT-1's residual dropout: the rate the add_layer_norm rows are timed at.
DROPOUT_P = 0.1


def bytes_moved(rows: int, cols: int, elem: int, add: bool) -> dict[str, int]:
    fwd = (3 if add else 2) * rows * cols * elem + 2 * cols * 4 + 2 * rows * 4
    bwd = (5 if add else 3) * rows * cols * elem + cols * 4 + 2 * rows * 4 + 2 * cols * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def implementations(device: torch.device, include_interpreter: bool, compile_modes: list[str]) -> dict:
    def fastgpt_backend(name):
        def run(x, w, b):
            with fastgpt.use_backend(name):
                return layer_norm(x, (x.shape[-1],), w, b)
        return run

    def eager(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b)

    impls = {}
    for name in fastgpt_backends(device, include_interpreter):
        impls[f"fastgpt-{name}"] = fastgpt_backend(name)
    impls["torch-eager"] = eager
    for mode in compile_modes:
        impls[f"torch-compile-{mode}"] = torch.compile(eager, mode=None if mode == "default" else mode)

    def module_peer(make_module):
        # The peers are modules: one per width, parameters taken from the call.
        def build():
            cache = {}

            def run(x, w, b):
                module = cache.get(x.shape[-1])
                if module is None:
                    module = cache[x.shape[-1]] = make_module(x.shape[-1]).to(x.device)
                # The call's w and b in place of the module's parameters: gradients reach them (Parameters made
                # of them would be new leaves, cut off from the gradient the benchmark asks for).
                return torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))
            return run
        return build

    def apex():
        from apex.normalization import FusedLayerNorm
        return module_peer(FusedLayerNorm)()

    def liger():
        from liger_kernel.transformers import LigerLayerNorm
        return module_peer(LigerLayerNorm)()

    def transformer_engine():
        import transformer_engine.pytorch as te
        return module_peer(lambda n: te.LayerNorm(n))()
    optional_peer(impls, "apex", device, apex)
    optional_peer(impls, "liger-kernel", device, liger)
    optional_peer(impls, "transformer-engine", device, transformer_engine)
    return impls


def add_implementations(device: torch.device, include_interpreter: bool, compile_modes: list[str]) -> dict:
    """LN(residual + dropout(x, p)): fn(x, residual, w, b, p). No fused peer is installed anywhere we run (apex,
    Liger and Transformer Engine fuse the add, not the dropout), so the peers are eager and torch.compile."""
    def fastgpt_backend(name):
        def run(x, r, w, b, p):
            with fastgpt.use_backend(name):
                return add_layer_norm(x, r, (x.shape[-1],), w, b, dropout_p=p)
        return run

    def eager(x, r, w, b, p):
        return F.layer_norm(r + F.dropout(x, p), (x.shape[-1],), w, b)

    impls = {f"fastgpt-{name}": fastgpt_backend(name) for name in fastgpt_backends(device, include_interpreter)}
    impls["torch-eager"] = eager
    for mode in compile_modes:
        impls[f"torch-compile-{mode}"] = torch.compile(eager, mode=None if mode == "default" else mode)
    return impls


def bench_shape(op: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device, impls: dict,
                ceiling_gbs: float) -> list[Row]:
    """Times `impls` of `op` ("layer_norm": fn(x, w, b); "add_layer_norm": fn(x, residual, w, b, p)) at one shape.
    Each is checked first against float64 without dropout, and fastgpt's also with the timed dropout, against the
    mask their seed draws (PyTorch's dropout draws another)."""
    add = op == "add_layer_norm"
    elem = torch.empty((), dtype=dtype).element_size()
    moved = bytes_moved(rows, cols, elem, add)
    copies = rotations(moved["fwd+bwd"])
    inputs = []  # (differentiable inputs, dy)
    for _ in range(copies):
        x = torch.randn(rows, cols, device=device, dtype=dtype).requires_grad_()
        w = (torch.rand(cols, device=device) + 0.5).requires_grad_()
        b = torch.randn(cols, device=device).requires_grad_()
        r = torch.randn(rows, cols, device=device, dtype=dtype).requires_grad_()
        inputs.append(((x, r, w, b) if add else (x, w, b), torch.randn(rows, cols, device=device, dtype=dtype)))
    timed = (DROPOUT_P,) if add else ()
    first = inputs[0][0]
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    checks = []  # (dropout p, float64 expectation, whether PyTorch's own dropout may be checked against it)
    if add:
        x0, r0, w0, b0 = (t.double() for t in first)
        checks.append((0.0, F.layer_norm(r0 + x0, (cols,), w0, b0), True))
        torch.manual_seed(0)
        keep = elementwise_dropout_keep(draw_seed(), rows, cols, DROPOUT_P, device)
        checks.append((DROPOUT_P, F.layer_norm(r0 + x0 * keep / (1 - DROPOUT_P), (cols,), w0, b0), False))
    else:
        x0, w0, b0 = (t.double() for t in first)
        checks.append((None, F.layer_norm(x0, (cols,), w0, b0), True))
    out = []
    dy = inputs[0][1]
    leaves = [t.detach().double().requires_grad_() for t in first]
    if add:
        expected_grads = torch.autograd.grad(F.layer_norm(leaves[1] + leaves[0], (cols,), *leaves[2:]), leaves,
                                             dy.double())
    else:
        expected_grads = torch.autograd.grad(F.layer_norm(leaves[0], (cols,), *leaves[1:]), leaves, dy.double())
    for impl, fn in impls.items():
        for p, expected, peers_too in checks:
            if not (peers_too or impl.startswith("fastgpt")):
                continue
            torch.manual_seed(0)  # the seed the expectation's mask was drawn with
            got = fn(*first, *(() if p is None else (p,)))
            error = (got.double() - expected).abs().max().item()
            assert error < tolerance, f"{impl} {op} (dropout {p}) is wrong at {rows}x{cols} {dtype}: max error {error}"
            if not p:  # no dropout: the gradients too
                check_gradients(f"{impl} {op} at {rows}x{cols} {dtype}", torch.autograd.grad(got, first, dy),
                                expected_grads, dtype)
        graphs = [(fn(*args, *timed), args, dy) for args, dy in inputs]
        calls = {
            "fwd": [lambda args=args: fn(*args, *timed) for args, _ in inputs],
            "bwd": [lambda y=y, args=args, dy=dy: torch.autograd.grad(y, args, dy, retain_graph=True)
                    for y, args, dy in graphs],
            "fwd+bwd": [lambda args=args, dy=dy: torch.autograd.grad(fn(*args, *timed), args, dy)
                        for args, dy in inputs],
        }
        for pass_, fns in calls.items():
            median, p20, p80 = time_calls(fns, device)
            gbs = moved[pass_] / (median * 1e-3) / 1e9
            out.append(Row(op, f"{rows}x{cols}", str(dtype).replace("torch.", ""), pass_, impl, median,
                           p20, p80, gbs, "GB/s", gbs / ceiling_gbs, peak_memory_mb(fns[0], device),
                           extra={"tokens": rows, "hidden": cols, "dropout_p": DROPOUT_P if add else 0.0}))
        del graphs
    return out


def main(argv=None) -> None:
    args = standard_parser(__doc__).parse_args(argv)

    device = torch.device(args.device)
    # The backward pass is timed alone by replaying one graph (retain_graph=True), which compiled graphs that
    # donate their saved buffers refuse.
    functorch_config.donated_buffer = False
    cuda = device.type == "cuda"
    if args.quick:
        grid = [(1024, 768), (4096, 1024)] if cuda else [(512, 768), (2048, 1024)]
        add_grid = grid[:1]
    elif cuda:
        grid = [(m, n) for m in (4096, 32768) for n in (768, 1024, 2048, 4096, 8192, 16384)]
        # GPT-1's epilogue (768 wide; 32k tokens is issue #4's target shape), and wider models'.
        add_grid = [(m, n) for m in (32768, 4096) for n in (768, 1024, 4096)]
    else:
        grid = [(m, n) for m in (1024, 8192) for n in (768, 2048, 4096)]
        add_grid = [(m, 768) for m in (1024, 8192)]
    dtypes = chosen_dtypes(args, [torch.bfloat16, torch.float32] if cuda else [torch.float32])
    compile_modes = chosen_compile_modes(args, ["default", "max-autotune"] if cuda and not args.quick else ["default"])

    info = environment(device)
    ceiling = copy_bandwidth_gbs(device)
    info["copy_bandwidth_gbs"] = ceiling
    print(f"measured copy bandwidth: {ceiling:.1f} GB/s")
    impls = implementations(device, args.include_interpreter, compile_modes)
    add_impls = add_implementations(device, args.include_interpreter, compile_modes)
    # add_layer_norm first: its 32k x 768 row (first of add_grid on a GPU) is issue #4's target.
    shapes = [("add_layer_norm", m, n, dtype) for dtype in dtypes for m, n in add_grid]
    shapes += [("layer_norm", m, n, dtype) for dtype in dtypes for m, n in grid]
    run_grid("layer_norm", shapes, lambda op, m, n, dtype: bench_shape(
        op, m, n, dtype, device, add_impls if op == "add_layer_norm" else impls, ceiling), info, args)


if __name__ == "__main__":
    main()
