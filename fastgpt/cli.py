"""The `fastgpt` command: `fastgpt pretrain ...`, `fastgpt sample ...`, `fastgpt finetune ...`,
`fastgpt classify ...`, `fastgpt train-translator ...`, `fastgpt translate ...`, `fastgpt bench ...` (also
`python -m fastgpt ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys


def _pretrain(args: argparse.Namespace) -> int:
    from .train import checkpoint as ckpt_io
    from .train.config import resolve_config
    from .train.pretrain import pretrain

    saved = None
    if args.resume:
        if args.preset:
            raise ValueError("--preset and --resume cannot be combined: a resumed run keeps its own settings")
        ckpt = ckpt_io.find_checkpoint(args.resume)
        meta = ckpt_io.read_meta(ckpt)
        ckpt_io.require_kind(meta, ckpt, ckpt_io.LANGUAGE_MODEL)
        saved = meta["config"]
    config = resolve_config(args, saved)
    pretrain(config, resume=args.resume, log=functools.partial(print, flush=True))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .train.sample import sample

    texts = sample(args.checkpoint, args.prompts or [""], args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, args.device, args.backend)
    for prompt, text in zip(args.prompts or [""], texts):
        print(f"--- {prompt!r}\n{text}", flush=True)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .train.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    finetune(config, log=functools.partial(print, flush=True))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from .train.finetune import classify

    for text, probs in zip(args.texts, classify(args.checkpoint, args.texts, args.device, args.backend)):
        print(f"--- {text!r}\n" + ", ".join(f"{label} {p:.3f}" for label, p in probs.items()), flush=True)
    return 0


def _train_translator(args: argparse.Namespace) -> int:
    from .train import checkpoint as ckpt_io
    from .train.translation import TranslationConfig, make_config, train_translator

    fields = {f.name for f in dataclasses.fields(TranslationConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and k != "preset" and v is not None}
    if args.resume:
        if args.preset:
            raise ValueError("--preset and --resume cannot be combined: a resumed run keeps its own settings")
        ckpt = ckpt_io.find_checkpoint(args.resume)
        meta = ckpt_io.read_meta(ckpt)
        ckpt_io.require_kind(meta, ckpt, ckpt_io.TRANSLATOR)
        config = TranslationConfig(**{**meta["config"], **given})
    else:
        config = make_config(args.preset, **given)
    train_translator(config, resume=args.resume, log=functools.partial(print, flush=True))
    return 0


def _translate(args: argparse.Namespace) -> int:
    from .train.translation import translate

    texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
    for text in translate(args.checkpoint, texts, args.beam_size, args.length_penalty, args.device, args.backend):
        print(text, flush=True)
    return 0


def _add_translator_flags(parser: argparse.ArgumentParser) -> None:
    from .train.config import add_field_flags
    from .train.translation import PRESETS, TranslationConfig

    files = "sentence pairs: .tsv (source TAB target), .csv (source,target) or .jsonl ({\"source\", \"target\"})"
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="settings to start from: tiny (default, for a CPU) or base (the paper's base model)")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help=files + " (default: Spanish -> English Bible verses, from Debian's SWORD packages)")
    parser.add_argument("--val-data", nargs="+", default=None, metavar="FILE", help=files)
    parser.add_argument("--test-data", nargs="+", default=None, metavar="FILE", help=files + " (for BLEU)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a checkpoint, or a run directory's latest one, with that run's settings")
    add_field_flags(parser, TranslationConfig, skip=("preset", "data", "val_data", "test_data"),
                    types={"test_limit": int})


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    from .train.config import add_field_flags
    from .train.finetune import FinetuneConfig

    files = "labelled examples: .jsonl ({\"text\", \"label\"} per line), .csv or .tsv (text and label columns)"
    parser.add_argument("--checkpoint", required=True, help="the pretrained model: a checkpoint or a pretraining run")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help=files + " (default: the Shakespeare genre task)")
    parser.add_argument("--val-data", nargs="+", default=None, metavar="FILE", help=files)
    add_field_flags(parser, FinetuneConfig, skip=("checkpoint", "data", "val_data"), types={"max_length": int},
                    show_defaults=True)


def build_parser() -> argparse.ArgumentParser:
    from .train.config import build_parser as add_pretrain_flags

    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = commands.add_parser("pretrain", help="pretrain GPT-1 on text (default: Shakespeare, tiny preset)")
    add_pretrain_flags(pre)
    pre.set_defaults(run=_pretrain)

    smp = commands.add_parser("sample", help="generate text from a checkpoint")
    smp.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its latest checkpoint)")
    smp.add_argument("--prompt", dest="prompts", action="append", help="a prompt (repeatable; default: empty)")
    smp.add_argument("--max-new-tokens", type=int, default=200)
    smp.add_argument("--temperature", type=float, default=0.8)
    smp.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--device", default="auto")
    smp.add_argument("--backend", default=None)
    smp.set_defaults(run=_sample)

    fin = commands.add_parser("finetune", help="fine-tune a pretrained GPT-1 into a text classifier "
                                               "(default task: the genre of a Shakespeare passage)")
    _add_finetune_flags(fin)
    fin.set_defaults(run=_finetune)

    cls = commands.add_parser("classify", help="label texts with a fine-tuned classifier")
    cls.add_argument("--checkpoint", required=True, help="a fine-tuned checkpoint or `fastgpt finetune` run directory")
    cls.add_argument("--text", dest="texts", action="append", required=True, help="a text to classify (repeatable)")
    cls.add_argument("--device", default="auto")
    cls.add_argument("--backend", default=None)
    cls.set_defaults(run=_classify)

    trn = commands.add_parser("train-translator", help="train the encoder-decoder Transformer on sentence pairs "
                                                        "(default: Spanish -> English Bible verses)")
    _add_translator_flags(trn)
    trn.set_defaults(run=_train_translator)

    trl = commands.add_parser("translate", help="translate text with a trained translator")
    trl.add_argument("--checkpoint", required=True, help="a train-translator checkpoint or run directory")
    trl.add_argument("--text", dest="texts", action="append", help="a text to translate (repeatable; default: "
                                                                    "each non-empty line of standard input)")
    trl.add_argument("--beam-size", type=int, default=4)
    trl.add_argument("--length-penalty", type=float, default=0.6)
    trl.add_argument("--device", default="auto")
    trl.add_argument("--backend", default=None)
    trl.set_defaults(run=_translate)

    # The benchmark suite parses its own flags (fastgpt bench --help lists them).
    bench = commands.add_parser("bench", help="benchmark every op and the model against the alternatives",
                                add_help=False)
    bench.set_defaults(run=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .train.checkpoint import CheckpointError
    from .train.distributed import LaunchError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench.__main__ import main as bench_main
        bench_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except (DataError, CheckpointError, LaunchError, ValueError, OSError) as e:  # OSError: a missing --config file
        print(f"fastgpt {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"fastgpt {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
