"""Checkpoints: atomic, verifiable, the last N kept.

A checkpoint is a directory `<run>/checkpoints/step_<NNNNNNN>/` holding
  model.safetensors  the weights (fp32), loadable without fastgpt (`safetensors.torch.load_file`)
  trainer.pt         optimizer, lr scheduler, gradient scaler, every rank's RNG states, the data sampler position
  checkpoint.json    step, the run's settings, the model config, and the sha256 of the two files above
  tokenizer.json     (and any other file the caller passes) what it takes to use the weights
It is written into a hidden temporary directory and renamed into place only when complete (the rename is atomic on
POSIX filesystems), so a process killed mid-write leaves at most a `.tmp-*` directory, which loaders ignore and the
next save deletes; the previous checkpoint stays intact. A step saved again (a run resumed and stopped at the same
step) is exchanged with the old one in one atomic renameat2 (Linux). Older checkpoints beyond `keep` are removed
after the rename, never later steps. Weights that are no longer finite (a diverged run) are not saved: pruning
would replace the good checkpoints with them. A run directory holds one run: claim_run_dir refuses another run's,
and a resumed run continues in its checkpoint's run directory (run_dir_of).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import absolute_paths

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, or from another configuration."""


class DivergedError(CheckpointError):
    """Weights that are no longer finite: a diverged run, whose checkpoints so far stay as they are."""


def nonfinite_weights(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `weights` that hold a NaN or an infinity."""
    return [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def diverged(step: int, why: str, names: list[str]) -> DivergedError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return DivergedError(f"training diverged by step {step} ({why}): the weights are no longer finite ({shown}); "
                         f"stopped without saving them, the run's checkpoints so far are kept. Start again with a "
                         f"lower learning rate or a longer warm-up")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict, meta: dict, keep: int,
                    files: dict[str, str] | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically, with `files` ({name: text}, e.g. the tokenizer's JSON) beside
    the weights; keep the newest `keep` up to this step. Returns its directory. Raises DivergedError, writing and
    pruning nothing, when a weight is not finite."""
    bad = nonfinite_weights(weights)
    if bad:
        raise diverged(step, "at a checkpoint", bad)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from the user's group
        unique, aliases = _split_aliases(weights)
        save_file(unique, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        hashes = {name: _sha256(tmp / name) for name in ("model.safetensors", "trainer.pt")}
        with open(tmp / "checkpoint.json", "w") as f:
            json.dump({**meta, "step": step, "aliases": aliases, "sha256": hashes}, f, indent=2)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name in (*hashes, *(files or {}), "checkpoint.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # the same step saved again: the old one ends up in tmp, deleted below
            _exchange(tmp, final)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Later steps (a run resumed from an earlier checkpoint) are not this run's to delete.
    earlier = [p for p in list_checkpoints(root) if _step(p) < step]
    for old in earlier[:max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _exchange(a: Path, b: Path) -> None:
    """Swap directories a and b in one atomic renameat2(RENAME_EXCHANGE) (Linux 3.15+, glibc 2.28+). Elsewhere b is
    deleted first and a renamed into place: a kill between the two loses b."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    shutil.rmtree(b)
    os.rename(a, b)


def _step(ckpt: Path) -> int:
    return int(_STEP_DIR.match(ckpt.name).group(1))


# What a run writes into its directory besides checkpoints/ (pretrain all of them, finetune and train-translator
# summary.json): another run's, or the user's own files, are not a fresh run's to overwrite or append to.
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "loss_curve.png", "tensorboard")


def claim_run_dir(out_dir: Path, resume_from: Path | None = None, resumable: bool = True) -> None:
    """Refuse a fresh run into `out_dir` when it holds any of a run's files (it would overwrite the settings and the
    summary there, append to the metrics, prune the checkpoints, and a later step there would pass for this run's
    latest; the error suggests --resume for commands that have it, `resumable`) and, resuming from a checkpoint in
    `out_dir`, one older than the latest there (another trajectory, which the new one would shadow)."""
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    existing = list_checkpoints(root)
    if resume_from is None:
        found = [name for name in RUN_FILES if (out_dir / name).exists()] + (["checkpoints"] if existing else [])
        if found:
            resume = f", or continue that run with --resume {out_dir}" if existing and resumable else ""
            raise CheckpointError(f"--out-dir {out_dir} already holds a run ({', '.join(found)}): write this one to "
                                  f"another --out-dir{resume}")
        return
    if existing and Path(resume_from).resolve() != existing[-1].resolve():
        raise CheckpointError(f"resuming from {Path(resume_from).name} while {root} holds later checkpoints "
                              f"(latest {existing[-1].name}): resume from the latest, or move the later ones away")


def run_dir_of(ckpt: Path) -> Path:
    """The run directory of checkpoint <run>/checkpoints/step_N (absolute): a resumed run continues there, wherever
    the run has moved since and whatever the working directory."""
    ckpt = Path(os.path.abspath(ckpt))
    if ckpt.parent.name != "checkpoints":
        raise CheckpointError(f"--resume {ckpt}: not in a run's checkpoints/ directory, so there is no run to "
                              f"continue (copy it to RUN/checkpoints/{ckpt.name} and resume RUN)")
    return ckpt.parent.parent


def check_resume(meta: dict, current: dict, resumable: Collection[str], ckpt: Path, run_dir: Path) -> None:
    """Refuse to resume checkpoint `ckpt` (its checkpoint.json: `meta`) with settings `current` that it cannot
    honour, naming the flags, rather than ignore them and record them as the run's. A resumed run keeps the data
    and its order, the model, and the optimizer settings its saved state restores; only the settings in `resumable`
    may change. Paths compare as absolute (see config.absolute_paths). The run goes on in `run_dir`: another
    --out-dir is refused, and so is a --max-steps the checkpoint has already reached."""
    saved, current = absolute_paths(meta["config"]), absolute_paths(current)
    out_dir = current.get("out_dir")
    if out_dir is not None and out_dir != saved.get("out_dir") and Path(out_dir) != run_dir:
        raise CheckpointError(f"--out-dir {out_dir}: a resumed run continues in its checkpoint's run directory "
                              f"{run_dir}")
    changed = [f"--{k.replace('_', '-')} (the run's {saved.get(k)!r}, given {v!r})" for k, v in current.items()
               if k not in resumable and k != "out_dir" and v != saved.get(k)]
    if changed:
        raise CheckpointError(f"--resume {ckpt}: a resumed run keeps the data, the model and the optimizer settings "
                              f"it was saved with; start a new run to change {', '.join(changed)}")
    if current["max_steps"] <= meta["step"]:
        raise CheckpointError(f"--max-steps {current['max_steps']}: {ckpt} is at step {meta['step']} already; "
                              f"pass a larger --max-steps to train on")


def open_run(config, run_name: str, resume_from: Path | None, resume_meta: dict | None,
             resumable: Collection[str]):
    """(run directory, settings as the run saves them) for a run with settings `config` (a dataclass with out_dir),
    fresh or resumed from checkpoint `resume_from` (its checkpoint.json: `resume_meta`). A resumed run continues in
    its checkpoint's run directory and may change only the `resumable` settings (check_resume); a fresh one goes to
    --out-dir, by default runs/<run_name>-<time>. Either way the directory is claimed (claim_run_dir) and the paths
    in the settings made absolute, so that --resume finds the run's data and directory from anywhere."""
    if resume_from is not None:
        out_dir = run_dir_of(resume_from)
        check_resume(resume_meta, dataclasses.asdict(config), resumable, resume_from, out_dir)
    else:
        out_dir = Path(os.path.abspath(config.out_dir or f"runs/{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    claim_run_dir(out_dir, resume_from)
    return out_dir, dataclasses.replace(config, **{**absolute_paths(dataclasses.asdict(config)),
                                                   "out_dir": str(out_dir)})


def _split_aliases(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (the tied token embedding and output head): store each
    storage once and record the other names as aliases of the first."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "checkpoint.json").is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, a run's `checkpoints/` directory, or a run directory -> the checkpoint to load."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    raise CheckpointError(f"no checkpoint under {str(path)!r} (expected step_*/checkpoint.json or checkpoints/step_*)")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint {ckpt}: checkpoint.json unreadable ({e})") from None


def load_checkpoint(ckpt: Path, with_trainer_state: bool = True) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(meta, weights, trainer_state) after checking each file against the sha256 recorded at save time."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    names = ["model.safetensors"] + (["trainer.pt"] if with_trainer_state else [])
    for name in names:
        expected = meta.get("sha256", {}).get(name)
        if not (ckpt / name).is_file():
            raise CheckpointError(f"corrupted checkpoint {ckpt}: {name} is missing")
        if expected is None or _sha256(ckpt / name) != expected:
            raise CheckpointError(f"corrupted checkpoint {ckpt}: {name} does not match the sha256 recorded when it was saved")
    weights = load_file(str(ckpt / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        weights[alias] = weights[target]
    trainer_state = torch.load(ckpt / "trainer.pt", weights_only=False) if with_trainer_state else None
    return meta, weights, trainer_state


# What a checkpoint holds, as its checkpoint.json says; pretraining checkpoints predate the field and say nothing.
LANGUAGE_MODEL = "gpt1-lm"
CLASSIFIER = "gpt1-classifier"
TRANSLATOR = "seq2seq-translator"
_MADE_BY = {LANGUAGE_MODEL: "fastgpt pretrain", CLASSIFIER: "fastgpt finetune", TRANSLATOR: "fastgpt train-translator"}


def require_kind(meta: dict, ckpt: Path, kind: str) -> None:
    found = meta.get("kind", LANGUAGE_MODEL)
    if found != kind:
        raise CheckpointError(f"{ckpt} holds a {found} (made by `{_MADE_BY.get(found, found)}`); this needs a {kind}, "
                              f"as `{_MADE_BY[kind]}` writes")


def checkpoint_tokenizer(ckpt: Path):
    """The tokenizer saved with a checkpoint."""
    from ..data.tokenizer import load_tokenizer

    if not (Path(ckpt) / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer.json")
    return load_tokenizer(Path(ckpt) / "tokenizer.json")


def load_trained(path: str | os.PathLike, kind: str, build, device: torch.device):
    """(model in eval mode on `device`, tokenizer, checkpoint meta) from a checkpoint of `kind`, a run's
    checkpoints directory or a run directory; `build(meta, ckpt)` makes the empty model the weights go into."""
    ckpt = find_checkpoint(path)
    meta, weights, _ = load_checkpoint(ckpt, with_trainer_state=False)
    require_kind(meta, ckpt, kind)
    model = build(meta, ckpt)
    model.load_state_dict(weights)
    return model.to(device).eval(), checkpoint_tokenizer(ckpt), meta


def check_model_config(saved: dict, current: dict, ckpt: Path) -> None:
    """A clear error when a checkpoint's model does not match the one this run builds."""
    diffs = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {ckpt} was saved from another model configuration ({detail})")
