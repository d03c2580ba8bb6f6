"""Scaled dot-product attention forward, backward and forward+backward: fastgpt's backends against PyTorch's SDPA
backends, flash-attn (if installed) and fastgpt's reference under torch.compile.

    python -m bench.bench_attention             # GPT-1's shape and the L = 512..16384 sweep on a GPU
    python -m bench.bench_attention --quick     # a smoke run (CPU-sized on CPU)

FLOPs (the TFLOP/s below), for q (B, H, Lq, D), k and v (B, H, Lk, D): the two matrix products of the forward
pass are 2 * 2 B H Lq Lk D, halved when causal (only the lower triangle is computed); the backward pass does
five such products (recomputing S, then dV, dP, dQ, dK), counted as 2.5x the forward. Peak memory is what one
call allocates beyond its inputs: O(B H L) for the fused kernels, O(B H L^2) for the math path; the full run
ends with a memory sweep at L = 8192 and 16384 (one call per pass, after a warm-up call), written to
attention_memory.json.

GPT-1 trains with dropout 0.1 on the attention probabilities, so its shape is also timed with it: fastgpt's kernels
draw the mask inside (and again in the backward pass), PyTorch's fused backends too. Every implementation is checked
against float64 without dropout; fastgpt's also with it, against the mask its seed draws (PyTorch and torch.compile
draw other masks).
"""

from __future__ import annotations

import os
import time

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

import fastgpt
from fastgpt.ops.attention import _reference, scaled_dot_product_attention
from fastgpt.ops.philox import draw_seed, stream_uniforms

from .common import (Row, check_gradients, chosen_compile_modes, chosen_dtypes, environment, fastgpt_backends, finish,
                     matmul_ceilings, optional_peer, peak_memory_mb, rates_text, rotations, run_grid, skip,
                     standard_parser, time_calls, triton_choices)


def flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool) -> dict[str, float]:
    fwd = 4 * B * H * Lq * Lk * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def _sdpa_backends(device: torch.device) -> dict:
    """PyTorch's SDPA with each of its backends forced; those that refuse a shape raise and are skipped there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {"math": SDPBackend.MATH}
    if device.type == "cuda":
        names.update(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                     cudnn=SDPBackend.CUDNN_ATTENTION)
    else:
        names.update(flash=SDPBackend.FLASH_ATTENTION)  # PyTorch's CPU flash kernel

    def make(backend):
        def run(q, k, v, causal, dropout_p):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        return run
    return {f"torch-sdpa-{name}": make(b) for name, b in names.items()}


def implementations(device: torch.device, include_interpreter: bool, compile_modes: list[str]) -> dict:
    def fastgpt_backend(name):
        def run(q, k, v, causal, dropout_p):
            with fastgpt.use_backend(name):
                return scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        return run

    def mma_sync_products(run):
        """run with the CUDA attention kernels' products as mma.sync (wgmma is their default on Hopper)."""
        def wrapped(*args):
            previous = os.environ.get("FASTGPT_CUDA_WGMMA")
            os.environ["FASTGPT_CUDA_WGMMA"] = "off"
            try:
                return run(*args)
            finally:
                if previous is None:
                    del os.environ["FASTGPT_CUDA_WGMMA"]
                else:
                    os.environ["FASTGPT_CUDA_WGMMA"] = previous
        return wrapped

    impls = {}
    for name in fastgpt_backends(device, include_interpreter):
        impls[f"fastgpt-{name}"] = fastgpt_backend(name)
    if "fastgpt-csrc" in impls and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        impls["fastgpt-csrc-mma-sync"] = mma_sync_products(fastgpt_backend("csrc"))
    impls.update(_sdpa_backends(device))

    def flash_attn():
        from flash_attn import flash_attn_func  # (B, L, H, D) layout
        return lambda q, k, v, causal, dropout_p: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal).transpose(1, 2)
    optional_peer(impls, "flash-attn", device, flash_attn)
    for mode in compile_modes:
        impls[f"torch-compile-{mode}-reference"] = torch.compile(fastgpt_backend("reference"),
                                                                  mode=None if mode == "default" else mode)
    return impls


def bench_shape(B: int, H: int, L: int, D: int, causal: bool, dropout_p: float, dtype: torch.dtype,
                device: torch.device, impls: dict, ceiling_tflops: float) -> list[Row]:
    count = flops(B, H, L, L, D, causal)
    copies = rotations(4 * B * H * L * D * torch.empty((), dtype=dtype).element_size())
    inputs = [[torch.randn(B, H, L, D, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
              + [torch.randn(B, H, L, D, device=device, dtype=dtype)] for _ in range(copies)]
    # Checked in float64 on two heads of the first batch element and two of the last (the math needs the L x L
    # matrix), with dropout against the mask streams b H + h of those heads (fastgpt/ops/philox.py).
    slices = [(0, 0), (B - 1, H - 2)]  # (batch element, first of two heads)
    checks = []  # (p, batch element, first head, float64 expectation, whether peers are checked)
    if dropout_p > 0:
        torch.manual_seed(0)
        seed = draw_seed()
    for b, h in slices:
        q0, k0, v0 = (t[b:b + 1, h:h + 2].double() for t in inputs[0][:3])
        checks.append((0.0, b, h, _reference(q0, k0, v0, None, None, 0.0, causal, D ** -0.5), True))
        if dropout_p > 0:
            rows = torch.arange(L, device=device).view(1, 1, L)
            streams = (b * H + h + torch.arange(2, device=device)).view(1, 2, 1)
            keep = stream_uniforms(seed, L, rows, streams, 0, device) >= dropout_p
            checks.append((dropout_p, b, h, _reference(q0, k0, v0, None, keep, dropout_p, causal, D ** -0.5), False))
    shape = f"{B}x{H}x{L}x{D}{' causal' if causal else ''}{f' dropout {dropout_p}' if dropout_p else ''}"
    out = []
    for impl, fn in impls.items():
        try:
            out += _bench_impl(impl, fn, inputs, checks, causal, dropout_p, count, shape, dtype, device,
                               ceiling_tflops, {"seq_len": L, "head_dim": D, "causal": causal, "batch": B, "heads": H,
                                                "dropout_p": dropout_p})
        except RuntimeError as error:  # an SDPA backend that does not take this shape or dtype, or out of memory
            skip(f"{impl} at {shape} {dtype}", str(error).splitlines()[0][:120])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _bench_impl(impl, fn, inputs, checks, causal, dropout_p, count, shape, dtype, device, ceiling_tflops,
                extra) -> list[Row]:
    q0, k0, v0, do0 = inputs[0]
    for p, b, h, expected, peers_too in checks:
        if not (peers_too or impl.startswith("fastgpt")):
            continue
        torch.manual_seed(0)  # the seed the expectation's mask was drawn with
        got = fn(q0, k0, v0, causal, p)
        error = (got[b:b + 1, h:h + 2].double() - expected).abs().max().item()
        assert error < {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype], \
            f"{impl} (dropout {p}) is wrong at {shape} {dtype}, batch {b} heads {h}-{h + 1}: max error {error}"
        if p == 0.0:  # the gradients of the same heads: each (batch, head) is its own problem
            grads = [g[b:b + 1, h:h + 2] for g in torch.autograd.grad(got, (q0, k0, v0), do0)]
            leaves = [t[b:b + 1, h:h + 2].detach().double().requires_grad_() for t in (q0, k0, v0)]
            reference = _reference(*leaves, None, None, 0.0, causal, q0.shape[-1] ** -0.5)
            check_gradients(f"{impl} at {shape} {dtype}, batch {b} heads {h}-{h + 1}", grads,
                            torch.autograd.grad(reference, leaves, do0[b:b + 1, h:h + 2].double()), dtype)
    out = []
    with triton_choices(impl) as choices:
        graphs = [(fn(q, k, v, causal, dropout_p), (q, k, v), do) for q, k, v, do in inputs]
        calls = {
            "fwd": [lambda q=q, k=k, v=v: fn(q, k, v, causal, dropout_p) for q, k, v, _ in inputs],
            "bwd": [lambda y=y, p=p, do=do: torch.autograd.grad(y, p, do, retain_graph=True) for y, p, do in graphs],
            "fwd+bwd": [lambda q=q, k=k, v=v, do=do: torch.autograd.grad(fn(q, k, v, causal, dropout_p), (q, k, v),
                                                                         do) for q, k, v, do in inputs],
        }
        for pass_, fns in calls.items():
            median, p20, p80 = time_calls(fns, device)
            tflops = count[pass_] / (median * 1e-3) / 1e12
            out.append(Row("attention", shape, str(dtype).replace("torch.", ""), pass_, impl, median, p20, p80,
                           tflops, "TFLOP/s", tflops / ceiling_tflops, peak_memory_mb(fns[0], device), extra=extra))
        del graphs
    if choices:  # the triton backend's row: which configs its autotuner picked at this shape
        for row in out:
            row.extra = {**extra, "triton_configs": sorted(choices)}
    return out


def memory_sweep(dtype: torch.dtype, device: torch.device, impls: dict, lengths=(8192, 16384)) -> list[Row]:
    """Peak memory of one forward and one forward+backward call at long sequences, non-causal, D = 64: what each
    implementation allocates beyond its inputs (bench.common.peak_memory_mb), against the size of one B x H x L x L
    score matrix (extra["scores_mib"]). One warm-up call first, so that compilation and thread pools are not
    counted; the time reported is that of the single measured call."""
    B, H, D = 1, (16 if device.type == "cuda" else 1), 64
    out = []
    for L in lengths:
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype).requires_grad_() for _ in range(3))
        grad_out = torch.randn(B, H, L, D, device=device, dtype=dtype)
        shape = f"{B}x{H}x{L}x{D}"
        scores_mib = B * H * L * L * torch.empty((), dtype=dtype).element_size() / 2**20
        for impl, fn in impls.items():
            passes = {"fwd": lambda fn=fn: fn(q, k, v, False, 0.0),
                      "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(q, k, v, False, 0.0), (q, k, v), grad_out)}
            for pass_, call in passes.items():
                try:
                    call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    peak = peak_memory_mb(call, device)
                    ms = (time.perf_counter() - started) * 1e3
                except RuntimeError as error:  # out of memory, or a backend refusing the shape
                    skip(f"{impl} at {shape} {pass_} (memory sweep)", str(error).splitlines()[0][:120])
                    continue
                if peak is None:
                    skip(f"{impl} at {shape} (memory sweep)", "peak memory is not measurable on this device")
                    continue
                out.append(Row("attention-memory", shape, str(dtype).replace("torch.", ""), pass_, impl, ms, ms, ms,
                               peak, "MiB", None, peak, note="one call",
                               extra={"seq_len": L, "head_dim": D, "batch": B, "heads": H, "scores_mib": scores_mib}))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    args = standard_parser(__doc__, "bfloat16,float16").parse_args(argv)

    device = torch.device(args.device)
    functorch_config.donated_buffer = False  # the backward pass is timed by replaying one graph
    cuda = device.type == "cuda"
    # (B, H, L, D, causal, dropout). GPT-1: 12 heads of 64, context 512, 16k tokens per batch (B = 32), causal,
    # timed without dropout (the targets' shape) and with its training dropout.
    gpt1 = (32, 12, 512, 64, True, 0.0)
    gpt1_dropout = gpt1[:5] + (0.1,)
    if args.quick:
        grid = ([gpt1, gpt1_dropout, (2, 16, 2048, 128, False, 0.0)] if cuda
                else [(2, 12, 256, 64, True, 0.0), (2, 12, 256, 64, True, 0.1), (1, 8, 512, 128, False, 0.0)])
    elif cuda:
        # The sweep keeps 16k tokens per batch and a 2048-wide model (FlashAttention-2's benchmark). The targets'
        # shapes come first (GPT-1's, D = 128 at L = 4096 not causal): a run cut short has measured them.
        sweep = [(max(1, 16384 // L), 2048 // D, L, D, causal, 0.0) for D in (64, 128) for causal in (True, False)
                 for L in (512, 1024, 2048, 4096, 8192, 16384)]
        d128 = (4, 16, 4096, 128, False, 0.0)
        grid = [gpt1, d128, gpt1_dropout] + [shape for shape in sweep if shape != d128]
    else:
        grid = [(4, 12, 512, 64, True, 0.0), (4, 12, 512, 64, True, 0.1), (1, 8, 1024, 64, False, 0.0),
                (1, 8, 1024, 128, True, 0.0)]
    dtypes = chosen_dtypes(args, [torch.bfloat16] if cuda else [torch.float32])
    compile_modes = chosen_compile_modes(args, ["default"])

    info = environment(device)
    ceilings = matmul_ceilings(device, dtypes, info)
    print(f"measured dense matmul rates: {rates_text(info)}")
    impls = implementations(device, args.include_interpreter, compile_modes)
    run_grid("attention", [(shape, dtype) for dtype in dtypes for shape in grid],
             lambda shape, dtype: bench_shape(*shape, dtype, device, impls, ceilings[dtype]), info, args)
    if not args.quick:
        finish("attention_memory", memory_sweep(dtypes[0], device, impls), info, args)


if __name__ == "__main__":
    main()
