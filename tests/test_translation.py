"""`fastgpt train-translator` / `fastgpt translate`: corpus BLEU against sacreBLEU, the SWORD reader and the Bible
alignment on synthetic modules, the pair files, batching, the schedule, and training end to end on a small
synthetic language pair (it learns, resumes exactly, and its checkpoint translates)."""

import json
import math
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from fastgpt.cli import main as cli_main
from fastgpt.data import DataError
from fastgpt.data import parallel
from fastgpt.data.parallel import Pair, clean_osis, read_pairs, read_ztext, split_by_chapter
from fastgpt.train.bleu import corpus_bleu, tokenize_13a
from fastgpt.train.checkpoint import CheckpointError
from fastgpt.data.tokenizer import load_tokenizer
from fastgpt.train.translation import (BOS, EOS, PAD, SPECIAL_TOKENS, collate, encode_pairs, make_batches, make_config,
                                       noam_multiplier, train_translator, translate)

# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------


def test_bleu_by_hand():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4: no match among 1 four-gram -> sacreBLEU's exp smoothing 1 / (2 * 1).
    result = corpus_bleu(["a b c d"], ["a b c e"])
    assert result["precisions"] == pytest.approx([75.0, 200 / 3, 50.0, 50.0])
    assert result["score"] == pytest.approx(100 * (0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25)
    # Brevity: 4 hypothesis tokens against 6 reference tokens, every n-gram matching.
    short = corpus_bleu(["a b c d"], ["a b c d e f"])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 4))
    assert short["score"] == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert corpus_bleu(["x y z w"], ["x y z w"])["score"] == pytest.approx(100.0)
    # Counts are summed over the corpus before the precisions: not the mean of sentence scores.
    two = corpus_bleu(["a b c d", "p q r s"], ["a b c e", "p q r s"])
    assert two["precisions"] == pytest.approx([100 * 7 / 8, 100 * 5 / 6, 100 * 3 / 4, 100 * 1 / 2])


def test_bleu_matches_sacrebleu():
    # Scores from sacrebleu 2.6.0, corpus_bleu(hyps, [refs]) with its defaults (13a, exp smoothing).
    assert corpus_bleu(["the cat"], ["the cat sat on the mat"])["score"] == 0.0  # no trigram at all
    assert corpus_bleu([""], ["x"])["score"] == 0.0
    case = corpus_bleu(["&amp; it's 3.14, ok-then <skipped> 5-6"], ["& it's 3.14 , ok - then 5 - 6"])
    assert case["score"] == pytest.approx(38.940039, abs=1e-6)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_tokenize_13a():
    assert tokenize_13a("Hello, world! It costs $3.50, ok?") == \
        ["Hello", ",", "world", "!", "It", "costs", "$", "3.50", ",", "ok", "?"]
    assert tokenize_13a("a-b 1-2 &quot;q&quot;") == ["a-b", "1", "-", "2", '"', "q", '"']


# ---------------------------------------------------------------------------------------------------------------
# SWORD modules and the Bible corpus
# ---------------------------------------------------------------------------------------------------------------


def write_ztext(directory: Path, testament: str, books: list[tuple[str, list[list[str | None]]]],
                heading: str = "") -> None:
    """A zText testament: per book a heading slot and per chapter a heading slot with the <chapter> milestone,
    then its verses (None: an empty slot); one compressed block per book, as Debian's modules have."""
    directory.mkdir(parents=True, exist_ok=True)
    slots: list[tuple[int, bytes]] = [(0, b""), (0, b'<milestone type="x-importer"/>')]  # module, testament
    blocks: list[bytes] = [slots[1][1]]
    for book, chapters in books:
        entries = [f'<div osisID="{book}" sID="b" type="book"/>{heading}'.encode()]
        for number, verses in enumerate(chapters, 1):
            entries.append(f'<chapter n="{number}" osisID="{book}.{number}" sID="{book}.{number}"/>'.encode())
            entries.extend(b"" if v is None else v.encode() for v in verses)
        block = len(blocks)
        for entry in entries:
            slots.append((block, entry))
        blocks.append(b"".join(entries))
    bzv, bzs, bzz = bytearray(), bytearray(), bytearray()
    offsets = {b: 0 for b in range(len(blocks))}
    for block, entry in slots:
        bzv += struct.pack("<IIH", block, offsets[block], len(entry))
        offsets[block] += len(entry)
    for block in blocks:
        packed = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
    for ext, data in (("bzv", bzv), ("bzs", bzs), ("bzz", bzz)):
        (directory / f"{testament}.{ext}").write_bytes(bytes(data))


def test_read_ztext_keys_verses_by_their_chapter_heading(tmp_path):
    write_ztext(tmp_path, "ot", [("Gen", [["<w>In</w> the beginning", None, "third"], ["second chapter"]]),
                                 ("Exod", [["exodus one"]])], heading="<title>Genesis</title>")
    write_ztext(tmp_path, "nt", [("Matt", [["matthew one", "two"]])])
    verses = read_ztext(tmp_path)
    assert verses == {("Gen", 1, 1): "<w>In</w> the beginning", ("Gen", 1, 3): "third",
                      ("Gen", 2, 1): "second chapter", ("Exod", 1, 1): "exodus one", ("Matt", 1, 1): "matthew one",
                      ("Matt", 1, 2): "two"}
    assert list(verses)[:3] == [("Gen", 1, 1), ("Gen", 1, 3), ("Gen", 2, 1)]  # canonical order


def test_read_ztext_rejects_what_is_not_a_module(tmp_path):
    with pytest.raises(DataError, match="no verses found"):
        read_ztext(tmp_path)
    for ext, size in (("bzs", 12), ("bzv", 7), ("bzz", 0)):
        (tmp_path / f"nt.{ext}").write_bytes(b"\0" * size)
    with pytest.raises(DataError, match="not whole entries"):
        read_ztext(tmp_path)
    (tmp_path / "nt.bzv").write_bytes(struct.pack("<IIH", 5, 0, 3))
    with pytest.raises(DataError, match="names block 5, but nt.bzs has 1"):
        read_ztext(tmp_path)
    (tmp_path / "nt.bzv").write_bytes(struct.pack("<IIH", 0, 0, 3))
    with pytest.raises(DataError, match="block 0 of nt.bzz is corrupt"):
        read_ztext(tmp_path)


def test_clean_osis():
    xml = ('<div type="x-milestone" sID="pv1"/><title canonical="true" type="psalm">A Psalm by David.</title> '
           '<w lemma="strong:H1">God</w><note placement="foot"><reference>1:1 </reference>Elohim.</note>'
           '<w lemma="strong:H2">created</w> <transChange type="added">the</transChange> earth<note>x</note>.'
           '<l eID="a"/><l sID="b"/>Selah &amp; “amen”<title type="main">Editor heading</title>  <chapter '
           'eID="Ps.3"/><div type="glossary"/> Glossary text that belongs to no verse')
    assert clean_osis(xml) == "A Psalm by David. God created the earth. Selah & “amen”"


def test_bible_pairs_join_two_versifications(tmp_path, monkeypatch):
    # The target Bible has a book the source lacks, an extra verse, and a run-on verse the length filter drops.
    write_ztext(tmp_path / "src", "ot", [("Gen", [["uno dos", "tres", "cuatro cinco seis", ""]])])
    write_ztext(tmp_path / "tgt", "ot", [("Gen", [["one two", "three", "four", "x", "extra"]]),
                                         ("Tob", [["tobit"]])])
    modules = {parallel.BIBLE_SOURCE[1]: tmp_path / "src", parallel.BIBLE_TARGET[1]: tmp_path / "tgt"}
    monkeypatch.setattr(parallel, "bible_module", lambda package, module, cache_dir=None: modules[module])
    pairs = parallel.bible_pairs()
    # Gen.1.3: 3 words against 1, ratio (3 + 1) / (1 + 1) = 2 is kept; Gen.1.4 is empty in the source.
    assert pairs == [Pair("uno dos", "one two", "Gen.1.1"), Pair("tres", "three", "Gen.1.2"),
                     Pair("cuatro cinco seis", "four", "Gen.1.3")]
    write_ztext(tmp_path / "src", "ot", [("Gen", [["uno dos", "tres", "a b c d e f g h", ""]])])
    assert [p.reference for p in parallel.bible_pairs()] == ["Gen.1.1", "Gen.1.2"]


def test_split_by_chapter_holds_out_whole_chapters():
    pairs = [Pair(f"s{c}.{v}", f"t{c}.{v}", f"Book{c // 50}.{c % 50 + 1}.{v}") for c in range(200)
             for v in range(1, 4 + c % 3)]
    train, val, test = split_by_chapter(pairs)
    chapters = [{p.reference.rsplit(".", 1)[0] for p in split} for split in (train, val, test)]
    assert len(chapters[1]) == len(chapters[2]) == 5  # 200 chapters, one of each 40 to val and one to test
    assert not (chapters[0] & chapters[1]) and not (chapters[0] & chapters[2]) and not (chapters[1] & chapters[2])
    assert sorted(train + val + test, key=pairs.index) == pairs


def test_bible_module_fetched_with_apt_into_the_cache(tmp_path, monkeypatch):
    # Stand-ins for apt-get (writes the .deb) and dpkg-deb (unpacks a prepared module tree).
    payload = tmp_path / "payload"
    write_ztext(parallel._module_dir(payload, "testMod"), "nt", [("Matt", [["one"]])])
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "apt-get").write_text('#!/bin/sh\n[ "$2" = sword-text-test ] || { echo "E: no $2" >&2; exit 100; }\n'
                                   'touch "$2_1.0_all.deb"\n')
    (tools / "dpkg-deb").write_text(f'#!/bin/sh\ncp -r "{payload}" "$3"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    found = parallel.bible_module("sword-text-test", "testMod", tmp_path / "cache")
    assert found == parallel._module_dir(tmp_path / "cache" / "debian" / "sword-text-test", "testMod")
    assert read_ztext(found) == {("Matt", 1, 1): "one"}
    assert not list((tmp_path / "cache" / "debian").glob(".tmp-*"))  # the download's scratch directory is gone
    (tools / "apt-get").write_text("#!/bin/sh\nexit 1\n")
    assert parallel.bible_module("sword-text-test", "testMod", tmp_path / "cache") == found  # from the cache now
    with pytest.raises(DataError, match="apt-get download sword-text-other` failed: E: no sword-text-other"):
        (tools / "apt-get").write_text('#!/bin/sh\necho "E: no $2" >&2; exit 100\n')
        parallel.bible_module("sword-text-other", "otherMod", tmp_path / "cache")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get and dpkg-deb were not found"):
        parallel.bible_module("sword-text-other", "otherMod", tmp_path / "cache")


@pytest.mark.skipif(not any(parallel._module_dir(root, parallel.BIBLE_SOURCE[1]).is_dir()
                            for root in (Path("/"), parallel.default_cache_dir() / "debian" / parallel.BIBLE_SOURCE[0])),
                    reason="the Debian Bible modules are neither installed nor in the cache (fetched on first use "
                           "by `fastgpt train-translator`)")
def test_the_bible_corpus_when_present():
    data = parallel.bible_corpus()
    assert 29_000 < len(data.train) < 30_500 and 500 < len(data.val) < 1000 and 500 < len(data.test) < 1000
    first = data.train[0]
    assert first == Pair("EN el principio crió Dios los cielos y la tierra.",
                         "In the beginning, God created the heavens and the earth.", "Gen.1.1")
    assert not any("<" in p.source + p.target or "Glossary" in p.target for p in data.train + data.val + data.test)


# ---------------------------------------------------------------------------------------------------------------
# Pair files
# ---------------------------------------------------------------------------------------------------------------


def test_read_pairs_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("source\ttarget\nhola\thello\n\nadiós, amigo\tgoodbye, friend\n")
    (tmp_path / "a.csv").write_text('hola,hello\n"adiós, amigo","goodbye, friend"\n')
    (tmp_path / "a.jsonl").write_text('{"source": "hola", "target": "hello"}\n'
                                      '{"source": "adiós, amigo", "target": "goodbye, friend"}\n')
    for name in ("a.tsv", "a.csv", "a.jsonl"):
        pairs = read_pairs(tmp_path / name)
        assert [(p.source, p.target) for p in pairs] == [("hola", "hello"), ("adiós, amigo", "goodbye, friend")]


def test_read_pairs_keep_the_text_as_written(tmp_path):
    # A raw U+2028 is valid in a JSON string and a TSV field, not the end of a line; a byte-order mark is no text.
    (tmp_path / "u.jsonl").write_text('\ufeff{"source": "a\u2028b", "target": "c"}\n', encoding="utf-8")
    (tmp_path / "u.tsv").write_text('\ufeffa\u2028b\tc\n"q\t"r\n', encoding="utf-8")
    assert [(p.source, p.target) for p in read_pairs(tmp_path / "u.jsonl")] == [("a\u2028b", "c")]
    assert [(p.source, p.target) for p in read_pairs(tmp_path / "u.tsv")] == [("a\u2028b", "c"), ('"q', '"r')]


@pytest.mark.parametrize("name, text, message", [
    ("b.tsv", "one\ttwo\tthree\n", "expected 2 columns"),
    ("b.tsv", "\n\n", "holds no sentence pairs"),
    ("b.tsv", "hola\t  \n", "empty source or target"),
    ("b.jsonl", '{"source": "x"}\n', "with \"source\" and \"target\""),
    ("b.jsonl", "{oops\n", "not JSON"),
    ("b.jsonl", '{"source": "x", "target": 3}\n', "must be strings"),
    ("b.txt", "x\n", "expected .tsv, .csv or .jsonl"),
])
def test_read_pairs_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_pairs(tmp_path / name)
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(tmp_path / "missing.tsv")


def test_parallel_task_holds_out_from_data(tmp_path):
    (tmp_path / "p.tsv").write_text("".join(f"s{i}\tt{i}\n" for i in range(200)))
    task = parallel.parallel_task([str(tmp_path / "p.tsv")], None, None, seed=3)
    assert (len(task.train), len(task.val), len(task.test)) == (190, 5, 5)
    assert len({p.source for p in task.train + task.val + task.test}) == 200
    (tmp_path / "v.tsv").write_text("a\tb\n")
    task = parallel.parallel_task([str(tmp_path / "p.tsv")], [str(tmp_path / "v.tsv")], None)
    assert (len(task.train), len(task.val), len(task.test)) == (195, 1, 5)
    (tmp_path / "tiny.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match="too few"):
        parallel.parallel_task([str(tmp_path / "tiny.tsv")], None, None)
    with pytest.raises(DataError, match="need --data"):
        parallel.parallel_task(None, [str(tmp_path / "v.tsv")], None)


# ---------------------------------------------------------------------------------------------------------------
# Batching and the schedule
# ---------------------------------------------------------------------------------------------------------------


def test_make_batches_cover_every_pair_within_the_budget():
    rng = random.Random(0)
    # A translation's length follows its source's, roughly.
    lengths = [(n, max(2, round(n * rng.uniform(0.7, 1.4)))) for n in (rng.randint(2, 60) for _ in range(1000))]
    batches = make_batches(lengths, 800, seed=5)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    for batch in batches:
        padded = len(batch) * (max(lengths[i][0] for i in batch) + max(lengths[i][1] for i in batch))
        assert padded <= 800
    assert batches == make_batches(lengths, 800, seed=5) != make_batches(lengths, 800, seed=6)
    # Similar lengths go together: a fraction of the padding of batches of the same sizes in random order.
    def padding(batches):
        return sum(len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b))
                   - sum(sum(lengths[i]) for i in b) for b in batches)

    order = list(range(1000))
    rng.shuffle(order)
    sizes = [len(b) for b in batches]
    shuffled = [order[sum(sizes[:k]):sum(sizes[:k + 1])] for k in range(len(sizes))]
    assert padding(batches) < 0.25 * padding(shuffled)


def test_collate_shifts_the_target():
    src, tgt, labels = collate([([5, 6, EOS], [7, 8, 9, EOS]), ([5, EOS], [7, EOS])], torch.device("cpu"))
    assert src.tolist() == [[5, 6, EOS], [5, EOS, PAD]]
    assert tgt.tolist() == [[BOS, 7, 8, 9], [BOS, 7, PAD, PAD]]
    assert labels.tolist() == [[7, 8, 9, EOS], [7, EOS, PAD, PAD]]


def test_noam_schedule():
    d, warmup = 512, 4000
    assert noam_multiplier(0, d, warmup) == pytest.approx(d ** -0.5 * warmup ** -1.5)
    peak = noam_multiplier(warmup - 1, d, warmup)
    assert peak == pytest.approx(d ** -0.5 * warmup ** -0.5)
    assert noam_multiplier(warmup // 2, d, warmup) < peak and noam_multiplier(4 * warmup - 1, d, warmup) == \
        pytest.approx(peak / 2)


def test_config_errors():
    with pytest.raises(ValueError, match="--preset must be one of"):
        make_config("huge")
    with pytest.raises(ValueError, match="multiple of --nhead"):
        make_config(d_model=100, nhead=3)
    with pytest.raises(ValueError, match="--batch-tokens"):
        make_config(batch_tokens=100, max_tokens=128)
    with pytest.raises(ValueError, match="--dropout"):
        make_config(dropout=1.0)
    with pytest.raises(ValueError, match=r"--grad-clip must be >= 0 \(0: no clipping\), got -1"):
        make_config(grad_clip=-1.0)
    with pytest.raises(ValueError, match=r"--beta2 must be in \[0, 1\)"):
        make_config(beta2=1.0)
    with pytest.raises(ValueError, match="--adam-eps must be > 0"):
        make_config(adam_eps=0.0)
    for penalty in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"--length-penalty must be in \[0, inf\)"):
            make_config(length_penalty=penalty)
    assert make_config("base").d_model == 512 and make_config("base", d_model=256).d_model == 256


# ---------------------------------------------------------------------------------------------------------------
# Training end to end: a small synthetic language pair
# ---------------------------------------------------------------------------------------------------------------

WORDS = {"uno": "one", "dos": "two", "tres": "three", "rojo": "red", "verde": "green", "casa": "house",
         "perro": "dog", "gato": "cat", "come": "eats", "ve": "sees", "grande": "big", "el": "the"}


def write_task(path: Path, n: int, seed: int) -> None:
    """Word-for-word pairs whose target is reversed: learning it needs attention across the whole source."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(list(WORDS)) for _ in range(rng.randint(3, 7))]
        lines.append(" ".join(words) + "\t" + " ".join(WORDS[w] for w in reversed(words)) + "\n")
    path.write_text("".join(lines))


def small_config(tmp_path, **overrides):
    values = dict(data=[str(tmp_path / "train.tsv")], val_data=[str(tmp_path / "val.tsv")],
                  test_data=[str(tmp_path / "test.tsv")], vocab_size=300, max_tokens=24, d_model=64, nhead=4,
                  num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128, dropout=0.0, batch_tokens=1200,
                  max_steps=240, warmup_steps=40, lr_scale=0.2, label_smoothing=0.0, eval_interval=120, log_interval=120,
                  checkpoint_interval=120, out_dir=str(tmp_path / "run"), device="cpu")
    values.update(overrides)
    return make_config(**values)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    write_task(path / "train.tsv", 1500, 0)
    write_task(path / "val.tsv", 50, 1)
    write_task(path / "test.tsv", 40, 2)
    return path


@pytest.fixture(scope="module")
def trained(task_dir):
    return train_translator(small_config(task_dir), log=lambda *_: None)


def test_training_learns_the_task(trained):
    tokenizer = load_tokenizer(Path(trained["checkpoint"]) / "tokenizer.json")
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD, BOS, EOS]  # the model's pad/bos/eos ids
    # Bars between a model that learned the words but not the reversal and one that learned the task. Order-blind
    # (right words, any order): 0.83 nats per target token, test BLEU 14 (unreversed) to 22 (shuffled). Trained, over
    # seeds 1-4 and 1337 on csrc and reference: 0.11-0.26 nats, BLEU 52-85. (The ratio of the last to the first
    # evaluation, at steps 240 and 120, was noise: 0.14-0.62, and PyTorch alone scored 0.35 at the default seed.)
    assert trained["history"][-1]["val_loss"] < 0.4
    assert trained["bleu"]["score"] > 40, trained["examples"]


def test_special_token_spellings_in_text_are_text(trained):
    # "<pad>" or "</s>" written in a sentence must not become the padding or end-of-sequence id the model frames
    # sequences with (a fresh tokenizer from the file, as translate loads it).
    tokenizer = load_tokenizer(Path(trained["checkpoint"]) / "tokenizer.json")
    [(source, target)] = encode_pairs(tokenizer, [Pair("uno </s> dos", "one <pad> <s> two", "x")])
    assert source[-1] == target[-1] == EOS and not {PAD, BOS, EOS} & set(source[:-1] + target[:-1])
    assert tokenizer.decode(source) == "uno </s> dos" and tokenizer.decode(target) == "one <pad> <s> two"
    assert len(translate(trained["run_dir"], ["uno </s> dos"], device="cpu")) == 1


def test_pairs_too_long_for_max_tokens(task_dir, tmp_path):
    with pytest.raises(ValueError, match="no training pair fits --max-tokens 3"):
        train_translator(small_config(task_dir, out_dir=str(tmp_path / "run"), max_tokens=3), log=lambda *_: None)


def test_resume_continues_exactly(task_dir, trained, tmp_path):
    config = small_config(task_dir, out_dir=str(tmp_path / "resumed"), max_steps=120)
    train_translator(config, log=lambda *_: None)
    resumed = train_translator(small_config(task_dir, out_dir=str(tmp_path / "resumed")),
                               resume=str(tmp_path / "resumed"), log=lambda *_: None)
    assert resumed["history"][-1] == trained["history"][-1]
    assert resumed["bleu"] == trained["bleu"]


def test_a_fresh_run_leaves_an_existing_runs_files_alone(task_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("the user's\n")
    with pytest.raises(CheckpointError, match=rf"--out-dir {run} already holds a run \(summary.json\)"):
        train_translator(small_config(task_dir, out_dir=str(run)), log=lambda *_: None)
    assert (run / "summary.json").read_text() == "the user's\n" and not (run / "checkpoints").exists()


def test_resume_refuses_what_it_cannot_honour(trained, tmp_path, capsys):
    """As pretrain's: flags that change the data order (--batch-tokens crashed with an IndexError), the model or
    the restored optimizer settings are refused, not ignored and recorded; so are another --out-dir and a
    --max-steps the run has reached."""
    run = Path(trained["run_dir"])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    resume = ["train-translator", "--resume", str(run), "--max-steps", "300"]
    for extra, message in [
        (["--batch-tokens", "600"], "start a new run to change --batch-tokens (the run's 1200, given 600)"),
        (["--vocab-size", "999", "--lr-scale", "2"], "--vocab-size (the run's 300, given 999), --lr-scale"),
        (["--out-dir", str(tmp_path / "x")], "a resumed run continues in its checkpoint's run directory"),
        (["--max-steps", "240"], "--max-steps 240: "),
    ]:
        assert cli_main(resume + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_translate_command(trained, capsys, task_dir):
    sources, references = zip(*(line.split("\t") for line in (task_dir / "test.tsv").read_text().splitlines()[:3]))
    assert cli_main(["translate", "--checkpoint", trained["run_dir"], "--device", "cpu"]
                    + [arg for s in sources for arg in ("--text", s)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == translate(trained["run_dir"], list(sources), device="cpu")
    assert corpus_bleu(printed, list(references))["score"] > 40, (printed, references)


def test_translate_refuses_other_checkpoints(trained, tmp_path, capsys):
    meta_path = Path(trained["checkpoint"]) / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    with pytest.raises(CheckpointError, match="holds a seq2seq-translator"):
        from fastgpt.train.sample import load_model
        load_model(trained["checkpoint"], torch.device("cpu"))
    assert meta["kind"] == "seq2seq-translator"
    assert cli_main(["translate", "--checkpoint", str(tmp_path / "nothing"), "--text", "uno"]) == 2
    assert "does not exist" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(trained["checkpoint"], damaged)
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        translate(str(damaged), ["uno"], device="cpu")
    with pytest.raises(ValueError, match="--beam-size must be >= 1"):
        translate(trained["run_dir"], ["uno"], beam_size=0, device="cpu")
    with pytest.raises(ValueError, match=r"--length-penalty must be in \[0, inf\)"):
        translate(trained["run_dir"], ["uno"], length_penalty=float("nan"), device="cpu")
