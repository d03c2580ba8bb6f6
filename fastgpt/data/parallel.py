"""Parallel text for translation: sentence pairs from local files, or the default Spanish -> English Bible corpus.

The default corpus pairs, verse by verse, two public-domain Bibles shipped by Debian as SWORD modules:
`sword-text-sparv` (Reina-Valera 1909, Spanish) and `sword-text-web` (World English Bible, English), about 31,000
verses. When the packages are not installed, `apt-get download` fetches them (no root needed) and `dpkg-deb -x`
unpacks them into the cache; on a machine without apt, pass --data with your own pairs.

A SWORD zText module is three files per testament (ot, nt), all little-endian:
    .bzv  one 10-byte entry per verse slot: (block u32, offset u32, size u16) -> bytes [offset, offset + size) of
          the block after decompression; size 0: an empty slot
    .bzs  one 12-byte entry per block: (offset u32, compressed size u32, uncompressed size u32) in .bzz
    .bzz  zlib-compressed blocks (one per book here) of OSIS XML
Slots follow the module's versification: module and testament headings, then per book a book heading and per
chapter a chapter heading followed by its verses. The two Bibles use different versifications (KJV and NRSVA, the
latter with the deuterocanonical books), so a slot number means different verses in each. Every chapter heading
holds the OSIS `<chapter osisID="Gen.1" sID=...>` milestone, which names the book and chapter; verse v of that
chapter is the v-th slot after it, up to the next book's heading (`<div type="book" sID=...>`). Keys (book, chapter, verse) are built that way and the two Bibles joined on them.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from .corpus import DataError
from .dataset import default_cache_dir
from .tokenizer import normalize_text

# Bump when the extraction or the cleaning below changes.
BIBLE_FORMAT_VERSION = 1

# (Debian package, SWORD module, language) for the default corpus, source first.
BIBLE_SOURCE = ("sword-text-sparv", "spaRV1909eb", "es")
BIBLE_TARGET = ("sword-text-web", "engWEB2015eb", "en")


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str
    target: str
    reference: str = ""  # where it comes from: "Gen.1.1", or "file.tsv:12"


@dataclasses.dataclass
class ParallelData:
    train: list[Pair]
    val: list[Pair]    # to follow the loss during training
    test: list[Pair]   # BLEU at the end
    description: str


# ---------------------------------------------------------------------------------------------------------------
# SWORD zText modules
# ---------------------------------------------------------------------------------------------------------------

_CHAPTER = re.compile(r'<chapter\b[^>]*\bosisID="([^".]+)\.(\d+)"[^>]*\bsID=')
_BOOK = re.compile(r'<div\b(?=[^>]*\btype="book")[^>]*\bsID=')  # a book's opening milestone (its heading slot)
# A chapter's last verse ends with its closing milestone; what follows belongs to no verse (the World English
# Bible's glossary follows Revelation 22:21 in the same slot).
_CHAPTER_END = re.compile(r"<chapter\b[^>]*\beID=")
_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
# Section headings are the editors', not the text; a psalm's superscription is canonical="true" and part of verse 1
# (the Spanish Bible has it as plain text there).
_TITLE = re.compile(r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.DOTALL)
_MILESTONE = re.compile(r"<[^<>]*/>")  # self-closing: line, paragraph and quote boundaries
_TAG = re.compile(r"</?[^<>]*>")       # word and span markup (<w lemma=...>, <transChange>, ...): text kept
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)\]”’»])")


def clean_osis(xml: str) -> str:
    """One verse of OSIS XML -> plain text: footnotes and editors' headings dropped, markup removed, whitespace
    collapsed. Footnotes and boundary milestones sit between words without spaces, so they become a space."""
    text = _NOTE.sub(" ", _CHAPTER_END.split(xml, maxsplit=1)[0])
    text = _TITLE.sub(" ", text)
    text = _MILESTONE.sub(" ", text)
    text = html.unescape(_TAG.sub("", text))
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))
    return normalize_text(text)


def read_ztext(module_dir: Path) -> dict[tuple[str, int, int], str]:
    """{(book, chapter, verse): raw OSIS XML} for every non-empty verse of a zText module."""
    verses = {}
    for testament in ("ot", "nt"):
        paths = [module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")]
        if not all(p.is_file() for p in paths):
            continue  # a module may hold one testament only
        bzs, bzv, bzz = (p.read_bytes() for p in paths)
        if len(bzs) % 12 or len(bzv) % 10:
            raise DataError(f"{module_dir}: {testament}.bzs/.bzv sizes are not whole entries: not a zText module")
        blocks = list(struct.iter_unpack("<III", bzs))
        text_of_block: dict[int, bytes] = {}
        chapter, heading_slot = None, 0
        for slot, (block, offset, size) in enumerate(struct.iter_unpack("<IIH", bzv)):
            if size == 0:
                continue
            if block not in text_of_block:
                if block >= len(blocks):
                    raise DataError(f"{module_dir}: verse slot {slot} of {testament}.bzv names block {block}, but "
                                    f"{testament}.bzs has {len(blocks)}")
                start, length, _ = blocks[block]
                try:
                    text_of_block[block] = zlib.decompress(bzz[start:start + length])
                except zlib.error as e:
                    raise DataError(f"{module_dir}: block {block} of {testament}.bzz is corrupt ({e})") from None
            xml = text_of_block[block][offset:offset + size].decode("utf-8")
            heading = _CHAPTER.search(xml)
            if heading:
                chapter, heading_slot = (heading.group(1), int(heading.group(2))), slot
            elif _BOOK.search(xml):
                chapter = None  # the next book's heading: no verse of the last chapter
            elif chapter is not None:
                verses[(*chapter, slot - heading_slot)] = xml
    if not verses:
        raise DataError(f"{module_dir}: no verses found (expected ot.bzs/.bzv/.bzz or nt.bzs/.bzv/.bzz)")
    return verses


def _module_dir(root: Path, module: str) -> Path:
    return root / "usr" / "share" / "sword" / "modules" / "texts" / "ztext" / module


def bible_module(package: str, module: str, cache_dir: Path | None = None) -> Path:
    """The module's directory: installed system-wide, already unpacked in the cache, or fetched with apt now."""
    installed = _module_dir(Path("/"), module)
    if installed.is_dir():
        return installed
    root = Path(cache_dir or default_cache_dir()) / "debian" / package
    if _module_dir(root, module).is_dir():
        return _module_dir(root, module)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise DataError(f"the default translation corpus needs the Debian package {package} (apt-get and dpkg-deb "
                        f"were not found): pass --data with your own sentence pairs instead")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{package}-", dir=root.parent))
    try:
        fetched = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True)
        debs = list(work.glob(f"{package}_*.deb"))
        if fetched.returncode or not debs:
            raise DataError(f"`apt-get download {package}` failed: {fetched.stderr.strip()[-500:]} (pass --data with "
                            f"your own sentence pairs instead)")
        unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], capture_output=True,
                                  text=True)
        if unpacked.returncode or not _module_dir(work / "root", module).is_dir():
            raise DataError(f"the Debian package {debs[0].name} holds no SWORD module {module} "
                            f"{unpacked.stderr.strip()[-300:]}")
        shutil.rmtree(root, ignore_errors=True)  # whatever an older, different download left there
        os.replace(work / "root", root)  # complete or absent: a killed download leaves only the .tmp directory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _module_dir(root, module)


# Where the two versifications disagree, one verse holds more than its namesake (Spanish Job 39:30 holds the English
# 39:27-30 and 40:1-5; the English Romans 14:23 carries the doxology): word-count ratios beyond this drop the pair.
MAX_LENGTH_RATIO = 2.5


def bible_pairs(cache_dir: Path | None = None) -> list[Pair]:
    """Verse pairs (Spanish, English) in canonical order, from the verses both Bibles have and neither leaves
    empty, whose lengths in words are within MAX_LENGTH_RATIO of each other."""
    source = read_ztext(bible_module(*BIBLE_SOURCE[:2], cache_dir))
    target = read_ztext(bible_module(*BIBLE_TARGET[:2], cache_dir))
    pairs = []
    for key, xml in source.items():  # dicts keep the module's (canonical) order
        if key in target:
            src, tgt = clean_osis(xml), clean_osis(target[key])
            ratio = (len(src.split()) + 1) / (len(tgt.split()) + 1)
            if src and tgt and 1 / MAX_LENGTH_RATIO <= ratio <= MAX_LENGTH_RATIO:
                pairs.append(Pair(src, tgt, "{}.{}.{}".format(*key)))
    return pairs


def split_by_chapter(pairs: list[Pair], period: int = 40) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, val, test): whole chapters held out, chapter i going to val when i % period == period // 4 and to
    test when i % period == 3 * period // 4 (about 2.5% each). Neighbouring verses repeat names and phrases, so a
    random verse split would leak them between train and test; a chapter split leaks far less."""
    splits: tuple[list[Pair], list[Pair], list[Pair]] = ([], [], [])
    chapters: dict[str, int] = {}
    for pair in pairs:
        index = chapters.setdefault(pair.reference.rsplit(".", 1)[0], len(chapters)) % period
        splits[1 if index == period // 4 else 2 if index == 3 * period // 4 else 0].append(pair)
    return splits


def bible_corpus(cache_dir: Path | None = None) -> ParallelData:
    train, val, test = split_by_chapter(bible_pairs(cache_dir))
    return ParallelData(train, val, test, "Spanish -> English: the Reina-Valera 1909 and World English Bibles "
                                          "(Debian sword-text-sparv, sword-text-web), verse-aligned; every 40th "
                                          "chapter held out for validation and another for test")


# ---------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Sentence pairs from a .tsv (source TAB target per line), .csv (source,target rows) or .jsonl ({"source":
    ..., "target": ...} per line). A header row "source, target" in a .tsv or .csv is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    rows: list[tuple[int, object]] = []
    if suffix == ".jsonl":
        # Lines end at "\n" only: str.splitlines() also splits at U+2028 and the like, which a JSON string may hold
        # raw. (A "\r" left at a line's end is JSON whitespace.)
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
                if not isinstance(record, dict) or not {"source", "target"} <= set(record):
                    raise DataError(f"{path}:{number}: expected an object with \"source\" and \"target\"")
                rows.append((number, (record["source"], record["target"])))
    elif suffix in (".tsv", ".csv"):
        # A file object's lines, not str.splitlines(), which would also split a sentence at U+2028 and the like.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
        for number, row in enumerate(reader, 1):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{number}: expected 2 columns (source, target), got {len(row)}")
            if number == 1 and [cell.strip().lower() for cell in row] == ["source", "target"]:
                continue
            rows.append((number, tuple(row)))
    else:
        raise DataError(f"--data file {path}: expected .tsv, .csv or .jsonl, got {suffix or 'no suffix'!r}")
    pairs = []
    for number, (source, target) in rows:
        if not isinstance(source, str) or not isinstance(target, str):
            raise DataError(f"{path}:{number}: source and target must be strings")
        source, target = normalize_text(source), normalize_text(target)
        if not source or not target:
            raise DataError(f"{path}:{number}: empty source or target")
        pairs.append(Pair(source, target, f"{path.name}:{number}"))
    if not pairs:
        raise DataError(f"--data file {path} holds no sentence pairs")
    return pairs


def parallel_task(data: list[str] | None, val_data: list[str] | None, test_data: list[str] | None,
                  cache_dir: Path | None = None, seed: int = 0) -> ParallelData:
    """The default Bible corpus, or pairs from files: --val-data and --test-data when given, else 2.5% of --data
    each (a seeded shuffle decides which)."""
    if not data:
        if val_data or test_data:
            raise DataError("--val-data and --test-data need --data (the default corpus has its own split)")
        return bible_corpus(cache_dir)
    train = [pair for path in data for pair in read_pairs(path)]
    held = {name: [pair for path in paths for pair in read_pairs(path)] if paths else None
            for name, paths in (("val", val_data), ("test", test_data))}
    missing = [name for name, pairs in held.items() if pairs is None]
    if missing:
        random.Random(seed).shuffle(train)
        size = max(1, len(train) // 40)
        if len(train) <= size * len(missing):
            raise DataError(f"--data holds {len(train)} pairs: too few to hold out {' and '.join(missing)} pairs "
                            f"(pass --val-data / --test-data)")
        for name in missing:
            held[name], train = train[:size], train[size:]
    return ParallelData(train, held["val"], held["test"], f"{len(train):,} pairs from {', '.join(data)}")
