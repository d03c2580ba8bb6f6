"""The whole training step (forward + backward) of the encoder-decoder Transformer: fastgpt's Seq2SeqTransformer
with each backend against the same model on torch.nn.Transformer (eager and torch.compile), whose state_dict it
shares.

    python -m bench.bench_seq2seq            # the paper's base model, 6+6 x 512 (CUDA: bf16 autocast, CPU: float32)
    python -m bench.bench_seq2seq --quick    # `fastgpt train-translator`'s tiny preset, 3+3 x 256

A batch is `--batch` sentence pairs of `--src-len` source and `--tgt-len` target tokens (no padding), labels
smoothed by 0.1 as in training. FLOPs per step: 6 x (source tokens x encoder parameters + target tokens x
(decoder parameters + the output projection)) for the matrix products with weights, plus 3 x the attention
products, 4 d per query-key pair (QK^T and PV) for encoder self-attention (S^2 pairs per layer and row), causal
decoder self-attention (T^2 / 2) and cross-attention (T S). Embedding lookups count nothing.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch._functorch.config as functorch_config
from torch import nn

import fastgpt
from fastgpt.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

from .bench_model import run_settings, time_training_steps
from .common import fastgpt_backends, finish, positive_int, rates_text, standard_parser


def torch_twin(ours: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """The same model with torch.nn.Transformer in place of fastgpt.nn.Transformer (the same weights)."""
    c = ours.config
    plain = copy.deepcopy(ours)
    plain.transformer = nn.Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                       c.dim_feedforward, c.dropout, c.activation, layer_norm_eps=c.layer_norm_eps,
                                       batch_first=True, norm_first=c.norm_first,
                                       device=ours.positions.device)
    plain.transformer.load_state_dict(ours.transformer.state_dict())
    return plain


def step_flops(model: Seq2SeqTransformer, batch: int, src_len: int, tgt_len: int) -> float:
    """Matrix-product FLOPs of one training step (forward 2, backward 4 per multiply-add)."""
    c = model.config
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    encoder, decoder = count(model.transformer.encoder), count(model.transformer.decoder)
    # The cross-attention's key and value projections (2 d^2 per decoder layer) act on the source tokens.
    memory_kv = c.num_decoder_layers * 2 * c.d_model ** 2
    weights = 6.0 * batch * (src_len * (encoder + memory_kv)
                             + tgt_len * (decoder - memory_kv + c.tgt_vocab_size * c.d_model))
    pairs = c.num_encoder_layers * src_len ** 2 + c.num_decoder_layers * (tgt_len ** 2 / 2 + tgt_len * src_len)
    return weights + 3.0 * 4.0 * c.d_model * batch * pairs


def main(argv=None) -> None:
    parser = standard_parser(__doc__)
    parser.add_argument("--batch", type=positive_int, default=None, help="sentence pairs per step (default 64 on CUDA, "
                                                                "16 on CPU)")
    parser.add_argument("--src-len", type=positive_int, default=64)
    parser.add_argument("--tgt-len", type=positive_int, default=64)
    parser.add_argument("--vocab", type=positive_int, default=None, help="shared vocabulary (default 37,000 as in the "
                                                                "paper; 8,000 with --quick)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    functorch_config.donated_buffer = False
    vocab = args.vocab or (8000 if args.quick else 37000)
    common = dict(share_embeddings=True, label_smoothing=0.1)
    if args.quick:
        config = Seq2SeqConfig(vocab, vocab, d_model=256, nhead=4, num_encoder_layers=3, num_decoder_layers=3,
                               dim_feedforward=1024, **common)
    else:
        config = Seq2SeqConfig.base(vocab, vocab, share_embeddings=True)
    batch = args.batch or (64 if cuda else 16)
    dtypes, compile_modes, info, ceilings, datasheet = run_settings(args, device)

    torch.manual_seed(0)
    ours = Seq2SeqTransformer(config).to(device)
    plain = torch_twin(ours)

    def loss(model, batch_ids):
        src, tgt, labels = batch_ids
        return model(src, tgt, labels).loss

    impls = {f"fastgpt-{name}": (ours, loss, lambda name=name: fastgpt.use_backend(name))
             for name in fastgpt_backends(device, args.include_interpreter, with_reference=True)}
    impls["torch-eager"] = (plain, loss, contextlib.nullcontext)
    for mode in compile_modes:
        impls[f"torch-compile-{mode}"] = (torch.compile(plain, mode=None if mode == "default" else mode), loss,
                                          contextlib.nullcontext)

    def random_batch():
        ids = lambda length: torch.randint(3, vocab, (batch, length), device=device)  # noqa: E731 (no pad/bos/eos)
        return ids(args.src_len), ids(args.tgt_len), ids(args.tgt_len)

    batches = [random_batch() for _ in range(4)]
    tokens = batch * (args.src_len + args.tgt_len)
    flops = step_flops(ours, batch, args.src_len, args.tgt_len)
    params = sum(p.numel() for p in ours.parameters())
    print(f"Transformer {config.num_encoder_layers}+{config.num_decoder_layers} x {config.d_model}, "
          f"{params / 1e6:.1f}M parameters, {batch} pairs of {args.src_len} + {args.tgt_len} tokens, "
          f"{flops / 1e12:.3f} TFLOP per step")
    shape = f"{'tiny' if args.quick else 'base'} {batch}x({args.src_len}+{args.tgt_len})"
    extra = {"batch": batch, "src_len": args.src_len, "tgt_len": args.tgt_len, "params": params, "vocab": vocab,
             "dropout": config.dropout}
    rows = time_training_steps(impls, batches, dtypes, device, tokens, flops, ceilings, datasheet, "seq2seq", shape,
                               extra)
    finish("seq2seq", rows, info, args)
    print(f"tokens/s counts source and target tokens; 'of ceil' = model FLOP rate over the measured matrix-product "
          f"rate in the row's dtype ({rates_text(info)})")


if __name__ == "__main__":
    main()
