"""The `fastgpt` command: `fastgpt pretrain ...`, `fastgpt sample ...`, `fastgpt bench ...` (also
`python -m fastgpt ...`)."""

from __future__ import annotations

import argparse
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
        saved = ckpt_io.read_meta(ckpt_io.find_checkpoint(args.resume))["config"]
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
    smp.add_argument("--top-k", type=int, default=40)
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--device", default="auto")
    smp.add_argument("--backend", default=None)
    smp.set_defaults(run=_sample)

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
    except (DataError, CheckpointError, LaunchError, ValueError) as e:
        print(f"fastgpt {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"fastgpt {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
