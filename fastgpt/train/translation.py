"""`fastgpt train-translator`: the encoder-decoder Transformer trained on sentence pairs, as in "Attention Is All You
Need" (section 5); `fastgpt translate`: a trained model applied to new text.

Recipe (the paper's, at a size a preset picks):
  - one byte-level BPE over both languages, shared source/target/output embeddings;
  - batches of sentence pairs of similar length, about `batch_tokens` source + target tokens each (padding counted);
  - Adam (0.9, 0.98, 1e-9), lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5);
  - label smoothing 0.1, dropout 0.1;
  - beam search of 4 with length penalty 0.6 at test time, scored with corpus BLEU (sacreBLEU's default, 13a).
Sequences: source = BPE(source) EOS; decoder input = BOS BPE(target); labels = BPE(target) EOS.

The default data is the Spanish -> English Bible corpus of `fastgpt.data.parallel` (whole chapters held out).
Checkpoints (safetensors, written atomically) hold the model, the tokenizer and the settings; a killed run resumes
from its latest one with --resume (the model, optimizer, schedule, RNG and the position in the data).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from ..data.parallel import Pair, ParallelData, parallel_task
from ..data.tokenizer import encode_texts, train_tokenizer
from . import checkpoint as ckpt_io
from .bleu import corpus_bleu
from .config import check_range
from .distributed import resolve_device
from .pretrain import autocast, autocast_dtype, backend_context, rng_state, set_rng_state

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: Seq2SeqConfig's pad_id, bos_id, eos_id
PAD, BOS, EOS = range(3)


@dataclasses.dataclass
class TranslationConfig:
    preset: str = "tiny"
    # data
    data: list[str] | None = None  # None: the Spanish -> English Bible corpus
    val_data: list[str] | None = None
    test_data: list[str] | None = None
    cache_dir: str | None = None  # None: $FASTGPT_CACHE or ~/.cache/fastgpt
    vocab_size: int = 8000
    max_tokens: int = 128  # training pairs with a longer side (in BPE tokens, EOS included) are left out
    # model
    d_model: int = 256
    nhead: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dim_feedforward: int = 1024
    dropout: float = 0.1
    label_smoothing: float = 0.1
    # optimisation
    batch_tokens: int = 6000
    max_steps: int = 1000
    warmup_steps: int = 400
    lr_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-9
    grad_clip: float = 1.0  # 0: none (the paper clips nothing)
    seed: int = 1337
    # evaluation
    eval_interval: int = 250
    beam_size: int = 4
    length_penalty: float = 0.6
    test_limit: int | None = None  # BLEU on the first N test pairs only (None: all)
    # hardware and bookkeeping
    device: str = "auto"
    precision: str = "auto"
    backend: str | None = None
    out_dir: str | None = None  # None: runs/translator-<time>
    log_interval: int = 50
    checkpoint_interval: int = 500

    def validate(self) -> None:
        for name in ("vocab_size", "max_tokens", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers",
                     "dim_feedforward", "batch_tokens", "max_steps", "eval_interval", "beam_size", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.d_model % self.nhead or self.d_model % 2:
            raise ValueError(f"--d-model ({self.d_model}) must be even and a multiple of --nhead ({self.nhead})")
        if self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2 (a token and EOS), got {self.max_tokens}")
        if self.batch_tokens < 2 * self.max_tokens:
            raise ValueError(f"--batch-tokens ({self.batch_tokens}) must hold one pair of the longest kind: at "
                             f"least 2 x --max-tokens ({2 * self.max_tokens})")
        check_range(self, "dropout", 0, 1, open_high=True)
        check_range(self, "label_smoothing", 0, 1, open_high=True)
        check_range(self, "warmup_steps", 1)
        check_range(self, "lr_scale", 0, open_low=True)
        check_range(self, "beta1", 0, 1, open_high=True)
        check_range(self, "beta2", 0, 1, open_high=True)
        check_range(self, "adam_eps", 0, open_low=True)
        check_range(self, "grad_clip", 0, note=" (0: no clipping)")
        check_range(self, "seed", 0)
        check_range(self, "length_penalty", 0, float("inf"), open_high=True, note=" (0: no length normalisation)")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"--test-limit must be >= 1, got {self.test_limit}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


# The settings a resumed run may change (see config.RESUMABLE): the others fix the data (the pairs, their split and
# batches), the model, or the optimizer settings that the checkpoint's optimizer state restores.
RESUMABLE = ("max_steps", "warmup_steps", "grad_clip", "eval_interval", "beam_size", "length_penalty", "test_limit",
             "device", "backend", "cache_dir", "log_interval", "checkpoint_interval")

PRESETS: dict[str, dict] = {
    # 3+3 layers x 256, 4 heads, FFN 1024 (7.6M parameters): the CPU default, 19 minutes of training on 2 cores
    # (2.6 epochs of the Bible corpus, test BLEU 10.5: bench/results/cpu-amd-epyc-2-cores/translation.json).
    "tiny": {},
    # The paper's base model and schedule (52M parameters with a 16k vocabulary; 63.1M with the paper's shared 37k,
    # which the paper reports as 65M), batches of 25k tokens: for a GPU.
    "base": dict(vocab_size=16000, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, batch_tokens=25000, max_steps=20000, warmup_steps=4000, eval_interval=1000,
                 checkpoint_interval=2000, log_interval=100),
}


def make_config(preset: str | None = None, **overrides) -> TranslationConfig:
    """The preset's settings, then the overrides that are not None."""
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    config = TranslationConfig(**values)
    config.validate()
    return config


def noam_multiplier(step: int, d_model: int, warmup: int) -> float:
    """The paper's learning rate for update `step` (0-based here, 1-based in the formula)."""
    n = step + 1
    return d_model ** -0.5 * min(n ** -0.5, n * warmup ** -1.5)


def model_config(c: TranslationConfig, vocab_size: int):
    from ..models.seq2seq import Seq2SeqConfig

    return Seq2SeqConfig(vocab_size, vocab_size, d_model=c.d_model, nhead=c.nhead,
                         num_encoder_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
                         dim_feedforward=c.dim_feedforward, dropout=c.dropout,
                         share_embeddings=True, tie_output=True, label_smoothing=c.label_smoothing,
                         pad_id=PAD, bos_id=BOS, eos_id=EOS)


# ---------------------------------------------------------------------------------------------------------------
# Data: token ids and length-bucketed batches
# ---------------------------------------------------------------------------------------------------------------


def encode_pairs(tokenizer, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    """(source ids + EOS, target ids + EOS) per pair."""
    sources = encode_texts(tokenizer, [p.source for p in pairs])
    targets = encode_texts(tokenizer, [p.target for p in pairs])
    return [(s + [EOS], t + [EOS]) for s, t in zip(sources, targets)]


def make_batches(lengths: list[tuple[int, int]], batch_tokens: int, seed: int) -> list[list[int]]:
    """Indices of pairs grouped into batches of similar length: shuffled, sorted by (source + target) length in
    steps of 4 tokens (a stable sort keeps the shuffle within a step), then cut so that each batch's padded size,
    rows x (longest source + longest target), stays within batch_tokens; the batch order is shuffled."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: (lengths[i][0] + lengths[i][1]) // 4)
    batches, current, longest_src, longest_tgt = [], [], 0, 0
    for i in order:
        src, tgt = max(longest_src, lengths[i][0]), max(longest_tgt, lengths[i][1])
        if current and (len(current) + 1) * (src + tgt) > batch_tokens:
            batches.append(current)
            current, src, tgt = [], lengths[i][0], lengths[i][1]
        current.append(i)
        longest_src, longest_tgt = src, tgt
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(rows: list[tuple[list[int], list[int]]], device: torch.device):
    """(src (B, S), decoder input (B, T), labels (B, T)), right-padded with PAD."""
    src = torch.full((len(rows), max(len(s) for s, _ in rows)), PAD, dtype=torch.long)
    tgt = torch.full((len(rows), max(len(t) for _, t in rows)), PAD, dtype=torch.long)
    labels = tgt.clone()
    for i, (s, t) in enumerate(rows):
        src[i, :len(s)] = torch.tensor(s)
        tgt[i, 0], tgt[i, 1:len(t)] = BOS, torch.tensor(t[:-1])
        labels[i, :len(t)] = torch.tensor(t)
    return src.to(device), tgt.to(device), labels.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, rows, batch_tokens: int, device, amp_dtype) -> float:
    """Mean label-smoothed cross-entropy per target token over rows (teacher forcing)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in make_batches([(len(s), len(t)) for s, t in rows], batch_tokens, seed=0):
        src, tgt, labels = collate([rows[i] for i in batch], device)
        with autocast(device, amp_dtype):
            loss = model(src, tgt, labels).loss
        tokens = int((labels != PAD).sum())
        total, count = total + loss.item() * tokens, count + tokens
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def translate_ids(model, sources: list[list[int]], beam_size: int, length_penalty: float, device, amp_dtype,
                  batch_size: int = 64) -> list[list[int]]:
    """Output token ids (EOS and padding removed) per source, decoded in batches of similar length."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    limit = model.config.max_len
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        src = torch.full((len(batch), max(len(sources[i]) for i in batch)), PAD, dtype=torch.long)
        for row, i in enumerate(batch):
            src[row, :len(sources[i])] = torch.tensor(sources[i])
        # Room for a translation somewhat longer than its source, within the position table: each row's own, so
        # that a sentence translates the same in any batch.
        max_len = torch.tensor([min(limit, int(1.5 * len(sources[i])) + 10) for i in batch])
        with autocast(device, amp_dtype):
            if beam_size == 1:
                ids = model.greedy_decode(src.to(device), max_len=max_len)
            else:
                ids = model.beam_search(src.to(device), beam_size, length_penalty, max_len=max_len)
        for row, i in enumerate(batch):
            tokens = ids[row].tolist()
            out[i] = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
    model.train(was_training)
    return out


def bleu_on(model, tokenizer, pairs: list[Pair], c: TranslationConfig, device, amp_dtype) -> tuple[dict, list[str]]:
    """Corpus BLEU of the model's translations of pairs (sources longer than the position table are cut)."""
    limit = model.config.max_len
    sources = [ids[:limit - 1] + [EOS] if len(ids) >= limit else ids + [EOS]
               for ids in encode_texts(tokenizer, [p.source for p in pairs])]
    outputs = translate_ids(model, sources, c.beam_size, c.length_penalty, device, amp_dtype)
    hypotheses = tokenizer.decode_batch(outputs)
    return corpus_bleu(hypotheses, [p.target for p in pairs]), hypotheses


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_translator(config: TranslationConfig, resume: str | None = None, log=print) -> dict:
    config.validate()
    device = resolve_device(config.device, 0, 1)
    with backend_context(config.backend, device):
        return _train(config, resume, device, log)


def _train(c: TranslationConfig, resume: str | None, device: torch.device, log) -> dict:
    from ..models.seq2seq import Seq2SeqTransformer

    ckpt, meta, state = None, None, None
    if resume:
        ckpt = ckpt_io.find_checkpoint(resume)
        meta, weights, state = ckpt_io.load_checkpoint(ckpt)
        ckpt_io.require_kind(meta, ckpt, ckpt_io.TRANSLATOR)
    out_dir, c = ckpt_io.open_run(c, "translator", ckpt, meta, RESUMABLE)

    task: ParallelData = parallel_task(c.data, c.val_data, c.test_data, Path(c.cache_dir) if c.cache_dir else None,
                                       c.seed)
    if resume:
        tokenizer = ckpt_io.checkpoint_tokenizer(ckpt)
    else:
        started = time.perf_counter()
        tokenizer = train_tokenizer((text for p in task.train for text in (p.source, p.target)), c.vocab_size,
                                    SPECIAL_TOKENS)
        log(f"tokenizer: byte-level BPE of {tokenizer.get_vocab_size():,} over both languages "
            f"({time.perf_counter() - started:.1f} s)")

    def fits(row):
        return len(row[0]) <= c.max_tokens and len(row[1]) <= c.max_tokens

    encoded = encode_pairs(tokenizer, task.train)
    rows = [r for r in encoded if fits(r)]
    val_rows = [r for r in encode_pairs(tokenizer, task.val) if fits(r)]
    test_pairs = task.test[:c.test_limit] if c.test_limit else task.test
    if not rows or not val_rows:
        raise ValueError(f"no {'training' if not rows else 'validation'} pair fits --max-tokens {c.max_tokens}")

    torch.manual_seed(c.seed)
    model = Seq2SeqTransformer(model_config(c, tokenizer.get_vocab_size()))
    if state is not None:
        ckpt_io.check_model_config(meta["model_config"], dataclasses.asdict(model.config), ckpt)
        model.load_state_dict(weights)
    model.to(device).train()
    amp_dtype = autocast_dtype(c, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr_scale, betas=(c.beta1, c.beta2), eps=c.adam_eps,
                                 fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: noam_multiplier(step, c.d_model, c.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, epoch, position, history = 0, 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        step, epoch, position, history = state["step"], state["epoch"], state["position"], state["history"]

    n_params = sum(p.numel() for p in model.parameters())
    log(f"fastgpt train-translator: {task.description}")
    log(f"{len(rows):,} training pairs ({len(encoded) - len(rows):,} longer than {c.max_tokens} tokens left out), "
        f"{len(val_rows):,} validation (as long at most), {len(test_pairs):,} test (any length); model "
        f"{c.num_encoder_layers}+"
        f"{c.num_decoder_layers} layers x {c.d_model} ({n_params / 1e6:.1f}M parameters); {c.max_steps} updates of "
        f"about {c.batch_tokens} tokens; precision {str(amp_dtype).removeprefix('torch.')} on {device}; run dir "
        f"{out_dir}" + (f"; resumed at update {step}" if state else ""))
    log("settings: " + json.dumps(dataclasses.asdict(c)))

    def save():
        trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(device), "step": step, "epoch": epoch,
                         "position": position, "history": history}
        meta = {"kind": ckpt_io.TRANSLATOR, "config": dataclasses.asdict(c),
                "model_config": dataclasses.asdict(model.config), "task": task.description}
        return ckpt_io.save_checkpoint(out_dir / "checkpoints", step, model.state_dict(), trainer_state, meta,
                                       keep=2, files={"tokenizer.json": tokenizer.to_str()})

    lengths = [(len(s), len(t)) for s, t in rows]
    batches = make_batches(lengths, c.batch_tokens, c.seed + epoch)
    start, tokens_seen, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    while step < c.max_steps:
        if position == len(batches):
            epoch, position = epoch + 1, 0
            batches = make_batches(lengths, c.batch_tokens, c.seed + epoch)
        batch = [rows[i] for i in batches[position]]
        src, tgt, labels = collate(batch, device)
        position += 1
        with autocast(device, amp_dtype):
            loss = model(src, tgt, labels).loss
        scaler.scale(loss).backward()
        if c.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # Counted on the host and summed on the device: no synchronisation but at the log lines.
        tokens_seen += sum(len(s) + len(t) for s, t in batch)
        window_loss, window_steps = window_loss + loss.detach(), window_steps + 1
        if step % c.log_interval == 0 or step == c.max_steps:
            elapsed = time.perf_counter() - start
            log(f"step {step:>6}/{c.max_steps} | epoch {epoch + position / len(batches):.2f} | loss "
                f"{window_loss.item() / window_steps:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                f"{tokens_seen / elapsed:,.0f} tok/s | {elapsed:.0f} s")
            window_loss, window_steps = 0.0, 0
        if step % c.eval_interval == 0 or step == c.max_steps:
            val = validation_loss(model, val_rows, c.batch_tokens, device, amp_dtype)
            history.append({"step": step, "val_loss": val})
            log(f"step {step:>6}: val loss {val:.4f} (label-smoothed, per target token)")
        if step % c.checkpoint_interval == 0 and step < c.max_steps:
            save()

    started = time.perf_counter()
    bleu, hypotheses = bleu_on(model, tokenizer, test_pairs, c, device, amp_dtype)
    decode_seconds = time.perf_counter() - started
    path = save()
    summary = {"run_dir": str(out_dir), "checkpoint": str(path), "steps": step, "epochs": epoch + position / len(batches),
               "train_seconds": round(time.perf_counter() - start - decode_seconds, 1), "parameters": n_params,
               "test_pairs": len(test_pairs), "bleu": bleu, "decode_seconds": round(decode_seconds, 1),
               "beam_size": c.beam_size, "history": history,
               "examples": [{"source": p.source, "reference": p.target, "translation": h}
                            for p, h in list(zip(test_pairs, hypotheses))[:5]]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    for example in summary["examples"][:3]:
        log(f"  source      {example['source']}\n  reference   {example['reference']}\n"
            f"  translation {example['translation']}")
    log(f"done: {step} updates | test BLEU {bleu['score']:.2f} on {len(test_pairs):,} pairs (beam {c.beam_size}, "
        f"sacreBLEU 13a; precisions {' / '.join(f'{p:.1f}' for p in bleu['precisions'])}, brevity penalty "
        f"{bleu['brevity_penalty']:.3f}) | {path}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Applying a trained model
# ---------------------------------------------------------------------------------------------------------------


def load_translator(path: str, device: torch.device):
    """(model in eval mode, tokenizer, checkpoint meta) from a checkpoint or a train-translator run directory."""
    from ..models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

    return ckpt_io.load_trained(path, ckpt_io.TRANSLATOR,
                                lambda meta, _: Seq2SeqTransformer(Seq2SeqConfig(**meta["model_config"])), device)


def translate(checkpoint: str, texts: list[str], beam_size: int = 4, length_penalty: float = 0.6,
              device: str = "auto", backend: str | None = None) -> list[str]:
    if beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1, got {beam_size}")
    if not 0 <= length_penalty < float("inf"):
        raise ValueError(f"--length-penalty must be in [0, inf) (0: no length normalisation), got {length_penalty}")
    dev = resolve_device(device, 0, 1)
    with backend_context(backend, dev):
        model, tokenizer, meta = load_translator(checkpoint, dev)
        limit = model.config.max_len
        sources = [ids + [EOS] for ids in encode_texts(tokenizer, texts)]
        too_long = [i for i, s in enumerate(sources) if len(s) >= limit]
        if too_long:
            raise ValueError(f"text {too_long[0] + 1} is {len(sources[too_long[0]])} tokens long; this model reads at "
                             f"most {limit - 1}")
        amp_dtype = autocast_dtype(TranslationConfig(), dev)
        outputs = translate_ids(model, sources, beam_size, length_penalty, dev, amp_dtype)
    return tokenizer.decode_batch(outputs)
