"""The whole GPT-1 training step (forward + backward): fastgpt's GPT1 with each backend against the same
architecture in plain PyTorch (eager and torch.compile) and Hugging Face's OpenAIGPTLMHeadModel.

    python -m bench.bench_model              # GPT-1 117M, batch x 512 tokens (CUDA: bf16 autocast, CPU: float32)
    python -m bench.bench_model --dtypes float32,bfloat16   # float32, then bf16 autocast
    python -m bench.bench_model --quick      # a tiny config (CPU-sized smoke run)

FLOPs per token (PaLM appendix B, as fastgpt.train reports): 6 N + 12 n_layer n_embd T, N the parameters without
the position embedding (a lookup); the tied output projection counts once, as the matrix product it is. MFU
("of ceil") is the achieved FLOP rate over the device's measured dense matrix-product rate in the benchmark's dtype
(bench.common.matmul_tflops); extra["mfu_datasheet"] divides by the data-sheet peak where the GPU is known.
Every implementation is checked against fastgpt's reference backend (same weights, dropout off) before timing.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn

import fastgpt
from fastgpt.models.gpt1 import GPT1, GPT1Config, to_hf

from .common import (Row, chosen_compile_modes, chosen_dtypes, environment, fastgpt_backends, finish, matmul_ceilings,
                     positive_int, probability, rates_text, skip, standard_parser, time_calls)

DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16


class PlainGPT1(nn.Module):
    """GPT-1 in plain PyTorch (nanoGPT style): the peer. Same parameter names and shapes as fastgpt's GPT1."""

    def __init__(self, c: GPT1Config):
        super().__init__()
        self.c = c
        self.tokens_embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.positions_embed = nn.Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = nn.ModuleList(nn.ModuleDict(dict(
            attn=nn.ModuleDict(dict(c_attn=nn.Linear(c.n_embd, 3 * c.n_embd), c_proj=nn.Linear(c.n_embd, c.n_embd))),
            ln_1=nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon),
            mlp=nn.ModuleDict(dict(c_fc=nn.Linear(c.n_embd, c.n_inner), c_proj=nn.Linear(c.n_inner, c.n_embd))),
            ln_2=nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon))) for _ in range(c.n_layer))

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c, (batch, length) = self.c, ids.shape
        x = self.drop(self.tokens_embed(ids) + self.positions_embed(torch.arange(length, device=ids.device)))
        dropout = lambda t, p: F.dropout(t, p, self.training)  # noqa: E731
        for block in self.h:
            q, k, v = block.attn.c_attn(x).view(batch, length, 3, c.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=c.attn_pdrop if self.training else 0)
            a = block.attn.c_proj(y.transpose(1, 2).reshape(batch, length, c.n_embd))
            x = block.ln_1(x + dropout(a, c.resid_pdrop))
            m = block.mlp.c_proj(F.gelu(block.mlp.c_fc(x), approximate=c.gelu_approximate))
            x = block.ln_2(x + dropout(m, c.resid_pdrop))
        logits = F.linear(x, self.tokens_embed.weight)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, c.vocab_size), labels[:, 1:].reshape(-1))


def flops_per_token(model: GPT1) -> float:
    c = model.config
    return 6.0 * model.num_parameters(exclude_position_embeddings=True) + 12.0 * c.n_layer * c.n_embd * c.n_positions


def implementations(config: GPT1Config, device: torch.device, include_interpreter: bool, compile_modes: list[str]):
    """name -> (module, loss function (module, ids) -> scalar, context manager factory)."""
    torch.manual_seed(0)
    ours = GPT1(config).to(device)
    impls = {}
    for name in fastgpt_backends(device, include_interpreter, with_reference=True):
        impls[f"fastgpt-{name}"] = (ours, lambda m, ids: m(ids, labels=ids).loss,
                                    lambda name=name: fastgpt.use_backend(name))
    plain = PlainGPT1(config).to(device)
    plain.load_state_dict(ours.state_dict())
    impls["torch-eager"] = (plain, lambda m, ids: m(ids, ids), contextlib.nullcontext)
    for mode in compile_modes:
        compiled = torch.compile(plain, mode=None if mode == "default" else mode)
        impls[f"torch-compile-{mode}"] = (compiled, lambda m, ids: m(ids, ids), contextlib.nullcontext)
    try:
        hf = to_hf(ours)
        impls["hf-openai-gpt"] = (hf, lambda m, ids: m(ids, labels=ids).loss, contextlib.nullcontext)
    except ImportError:
        skip("hf-openai-gpt", "transformers is not installed")
    return ours, impls


def run_settings(args, device: torch.device) -> tuple[list, list[str], dict, dict, float | None]:
    """(dtypes, torch.compile modes, environment, matrix-product ceilings, data-sheet peak or None) of a whole-model
    run. The dtypes: float32, or autocast to a 16-bit dtype (the products and attention in it; LayerNorm and the
    loss in float32); bf16 autocast on CUDA by default."""
    cuda = device.type == "cuda"
    dtypes = chosen_dtypes(args, [torch.bfloat16] if cuda else [torch.float32])
    info = environment(device)
    ceilings = matmul_ceilings(device, dtypes, info)
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if cuda and k in info["device"]), None)
    return dtypes, chosen_compile_modes(args, ["default"]), info, ceilings, datasheet


def time_training_steps(impls: dict, batches: list, dtypes, device: torch.device, tokens: int, step_flops: float,
                        ceilings: dict, datasheet: float | None, op: str, shape: str, extra: dict) -> list[Row]:
    """Rows timing one training step (forward, backward, gradients cleared) of every implementation in `impls`
    (name -> (module, loss function (module, batch) -> scalar, context manager factory)), rotating through
    `batches`, for each dtype (float32, or autocast to a 16-bit dtype). Before timing, every implementation's loss
    on batches[0], and the norm of all its parameters' gradients, are checked against the first one's (dropout off,
    float32). The norm is the same whatever the parameters' layout (fused or split projections, transposed weights)
    and moves with any wrong gradient, where the loss at initialisation barely notices a model that ignores its
    context."""
    cuda = device.type == "cuda"
    expected = None
    for name, (module, loss_fn, ctx) in impls.items():
        module.eval()
        module.zero_grad(set_to_none=True)
        with ctx():
            loss = loss_fn(module, batches[0]).float()
            loss.backward()
        grads = [p.grad.double() for p in module.parameters() if p.grad is not None]
        got = (loss.item(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        module.zero_grad(set_to_none=True)
        expected = got if expected is None else expected
        assert math.isclose(got[0], expected[0], rel_tol=1e-3), f"{name}: loss {got[0]} != {expected[0]}"
        assert math.isclose(got[1], expected[1], rel_tol=1e-3), \
            f"{name}: gradient norm {got[1]} != {expected[1]} (loss {got[0]})"
        module.train()

    rows = []
    for dtype in dtypes:
        def autocast(dtype=dtype):
            return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

        label = "float32" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')}-autocast"
        for name, (module, loss_fn, ctx) in impls.items():
            def step(module=module, loss_fn=loss_fn, ctx=ctx, x=None):
                with ctx(), autocast():
                    loss = loss_fn(module, x)
                loss.backward()
                module.zero_grad(set_to_none=True)

            fns = [lambda x=x: step(x=x) for x in batches]
            median, p20, p80 = time_calls(fns, device, warmup=3, repeats=10 if cuda else 3, min_seconds=0.5)
            rate = tokens / (median * 1e-3)
            tflops = step_flops / (median * 1e-3) / 1e12
            row_extra = {**extra, "tokens_per_s": rate, "tflops": tflops}
            if datasheet:
                row_extra["mfu_datasheet"] = tflops / datasheet
            rows.append(Row(op, shape, label, "fwd+bwd", name, median, p20, p80, rate, "tokens/s",
                            tflops / ceilings[dtype], None, extra=row_extra))
    return rows


def main(argv=None) -> None:
    parser = standard_parser(__doc__)
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="sequences per step (default 32 on CUDA: the issues' 16k tokens of GPT-1's shape; 2 "
                             "on CPU)")
    parser.add_argument("--dropout", type=probability, default=0.1, help="GPT-1's 0.1 everywhere by default")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    functorch_config.donated_buffer = False
    d = args.dropout
    if args.quick:
        config = GPT1Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=2, n_head=4, n_inner=512,
                            resid_pdrop=d, embd_pdrop=d, attn_pdrop=d)
    else:
        config = GPT1Config(resid_pdrop=d, embd_pdrop=d, attn_pdrop=d)
    # 32 x 512 on a GPU: the 16k-token batch of the attention and FFN targets, large enough that a step's time is
    # the GPU's (a few sequences would time the launches from Python more than the kernels).
    batch = args.batch or (32 if cuda else 2)
    dtypes, compile_modes, info, ceilings, datasheet = run_settings(args, device)
    ours, impls = implementations(config, device, args.include_interpreter, compile_modes)
    flops = flops_per_token(ours)
    length = config.n_positions
    tokens = batch * length
    ids = [torch.randint(0, config.vocab_size, (batch, length), device=device) for _ in range(4)]
    print(f"GPT-1 {ours.num_parameters() / 1e6:.1f}M parameters, {batch} x {length} tokens, "
          f"{flops * tokens / 1e12:.2f} TFLOP per step")

    extra = {"batch": batch, "seq_len": length, "params": ours.num_parameters(), "dropout": d}
    rows = time_training_steps(impls, ids, dtypes, device, tokens, flops * tokens, ceilings, datasheet, "model",
                               f"gpt1-{'tiny' if args.quick else '117M'} {batch}x{length}", extra)
    finish("model", rows, info, args)
    sheet = f"; data-sheet MFU in the JSON's extra (peak {datasheet} TFLOP/s)" if datasheet else ""
    print(f"'of ceil' = MFU against the measured matrix-product rate in the row's dtype "
          f"({rates_text(info)}){sheet}")


if __name__ == "__main__":
    main()
