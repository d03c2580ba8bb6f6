"""`fastgpt finetune`: a pretrained GPT-1 fine-tuned into a text classifier, as in the GPT-1 paper (section 3.2).

The input is the passage's tokens followed by a new extract token, whose embedding row is added to the pretrained
(tied) token embedding and learned; a linear classifier reads the last block's hidden state at that token. The
loss is the classification cross-entropy plus `lm_weight` (0.5) times the language-modelling loss on the passage
(the paper's auxiliary objective). Defaults are the paper's: AdamW lr 6.25e-5, batch 32, 3 epochs, linear warm-up
over 0.2% of the updates then linear decay to 0, classifier dropout 0.1, weight decay 0.01 on matrices.

A batch is right-padded to its longest example. Padding sits after each row's extract token, and attention is
causal, so it never reaches the state the classifier reads; the language-modelling loss ignores it.

The result is a checkpoint (safetensors, written atomically) holding the classifier, its labels and the tokenizer
with the extract token; `fastgpt classify --checkpoint ...` applies it to new text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classification import ClassificationData, classification_task
from ..data.tokenizer import encode_texts
from . import checkpoint as ckpt_io
from .config import check_range
from .distributed import resolve_device
from .pretrain import autocast, autocast_dtype, backend_context
from .sample import load_model
from .schedule import make_optimizer, make_scheduler

EXTRACT = "<|extract|>"


@dataclasses.dataclass
class FinetuneConfig:
    checkpoint: str  # the pretrained model: a checkpoint, or a pretraining run's directory
    data: list[str] | None = None  # None: the Shakespeare genre task
    val_data: list[str] | None = None
    val_fraction: float = 0.1  # of --data, when there is no --val-data
    max_length: int | None = None  # tokens per example with the extract token (None: the model's context)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 6.25e-5
    warmup_fraction: float = 0.002
    weight_decay: float = 0.01
    lm_weight: float = 0.5
    clf_dropout: float = 0.1
    grad_clip: float = 1.0  # 0: none
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    backend: str | None = None
    out_dir: str | None = None  # None: runs/finetune-<time>
    log_interval: int = 50

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 (a token and the extract token), got {self.max_length}")
        check_range(self, "lr", 0, open_low=True)
        check_range(self, "warmup_fraction", 0, 1, open_high=True)
        check_range(self, "weight_decay", 0)
        check_range(self, "lm_weight", 0)
        check_range(self, "clf_dropout", 0, 1, open_high=True)
        check_range(self, "grad_clip", 0, note=" (0: no clipping)")
        check_range(self, "seed", 0)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")


def classifier_from_pretrained(lm, num_labels: int, extract_id: int, clf_dropout: float):
    """A GPT1 with one more token (the extract token, a fresh N(0, 0.02) row) and a classifier of `num_labels`
    outputs, holding `lm`'s weights everywhere else."""
    from ..models import GPT1, GPT1Config

    base = dataclasses.asdict(lm.config)
    if extract_id != base["vocab_size"]:
        raise ValueError(f"the extract token got id {extract_id}, expected {base['vocab_size']} (the first id after "
                         f"the pretrained vocabulary): the tokenizer does not match the model")
    model = GPT1(GPT1Config(**{**base, "vocab_size": base["vocab_size"] + 1, "num_labels": num_labels,
                               "extract_token_id": extract_id, "clf_pdrop": clf_dropout}))
    weights = model.state_dict()
    for name, tensor in lm.state_dict().items():
        if name == "tokens_embed.weight":
            weights[name][: tensor.shape[0]] = tensor  # (V + 1, C): the pretrained rows, then the extract row
        else:
            weights[name] = tensor
    model.load_state_dict(weights)
    return model


def encode(tokenizer, texts: list[str], max_length: int, extract_id: int) -> list[list[int]]:
    """Each text's first max_length - 1 tokens, then the extract token."""
    return [ids[: max_length - 1] + [extract_id] for ids in encode_texts(tokenizer, texts)]


def collate(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), extract_index (B,), lm_labels (B, T)) for right-padded rows; lm_labels are the tokens
    the language model should predict (-100: none, for the extract token and the padding)."""
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    lm_labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        lm_labels[i, : len(row) - 1] = input_ids[i, : len(row) - 1]
    extract_index = torch.tensor([len(row) - 1 for row in rows])
    return input_ids.to(device), extract_index.to(device), lm_labels.to(device)


@torch.no_grad()
def predict(model, rows: list[list[int]], batch_size: int, device: torch.device, amp_dtype) -> torch.Tensor:
    """Class log-probabilities (N, K), fp32, on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        input_ids, extract_index, _ = collate(rows[start : start + batch_size], device)
        with autocast(device, amp_dtype):
            logits = model.classify(input_ids, extract_index=extract_index).logits
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluation(log_probs: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Loss, accuracy, the majority-class baseline, per-class recall and the confusion matrix (rows: truth)."""
    predicted = log_probs.argmax(dim=-1)
    k = len(names)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    counts = confusion.sum(dim=1)
    return {
        "loss": F.nll_loss(log_probs, labels).item(),
        "accuracy": (predicted == labels).float().mean().item(),
        "majority_baseline": (counts.max() / counts.sum()).item(),
        "recall": {name: (confusion[i, i] / counts[i]).item() if counts[i] else None for i, name in enumerate(names)},
        "confusion": confusion.tolist(),
    }


def finetune(config: FinetuneConfig, log=print) -> dict:
    config.validate()
    device = resolve_device(config.device, 0, 1)
    with backend_context(config.backend, device):
        return _finetune(config, device, log)


def _finetune(c: FinetuneConfig, device: torch.device, log) -> dict:
    base_ckpt = ckpt_io.find_checkpoint(c.checkpoint)
    lm, tokenizer, _ = load_model(str(base_ckpt), torch.device("cpu"))
    context = lm.config.n_positions
    max_length = c.max_length or context
    if max_length > context:
        raise ValueError(f"--max-length {max_length} is longer than the model's context ({context} tokens)")
    task: ClassificationData = classification_task(c.data, c.val_data, c.val_fraction, c.seed)
    tokenizer.add_special_tokens([EXTRACT])
    extract_id = tokenizer.token_to_id(EXTRACT)

    torch.manual_seed(c.seed)
    model = classifier_from_pretrained(lm, len(task.labels), extract_id, c.clf_dropout).to(device)
    model.train()
    amp_dtype = autocast_dtype(c, device)
    train_rows = encode(tokenizer, [e.text for e in task.train], max_length, extract_id)
    val_rows = encode(tokenizer, [e.text for e in task.val], max_length, extract_id)
    train_labels = torch.tensor(task.label_ids(task.train))
    val_labels = torch.tensor(task.label_ids(task.val))

    steps_per_epoch = math.ceil(len(train_rows) / c.batch_size)
    total = c.epochs * steps_per_epoch
    warmup = math.ceil(c.warmup_fraction * total)
    optimizer = make_optimizer(model, c.lr, c.weight_decay, (0.9, 0.999), 1e-8, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, warmup, total, 0.0, decay="linear")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    out_dir = Path(c.out_dir or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_io.claim_run_dir(out_dir, resumable=False)
    log(f"fastgpt finetune: {task.description}")
    log(f"labels {task.labels}; {len(train_rows):,} train / {len(val_rows):,} val examples of at most {max_length} "
        f"tokens; from {base_ckpt} ({model.num_parameters() / 1e6:.2f}M parameters with the classifier); "
        f"{c.epochs} epochs x {steps_per_epoch} updates of {c.batch_size}; precision "
        f"{str(amp_dtype).removeprefix('torch.')} on {device}; run dir {out_dir}")
    log("settings: " + json.dumps(dataclasses.asdict(c)))

    generator = torch.Generator().manual_seed(c.seed)
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(c.epochs):
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        for first in range(0, len(order), c.batch_size):
            batch = order[first : first + c.batch_size]
            input_ids, extract_index, lm_labels = collate([train_rows[i] for i in batch], device)
            with autocast(device, amp_dtype):
                loss = model.classify(input_ids, train_labels[batch].to(device), extract_index,
                                      lm_labels if c.lm_weight > 0 else None, c.lm_weight).loss
            scaler.scale(loss).backward()
            if c.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % c.log_interval == 0 or step == total:
                log(f"epoch {epoch + 1} step {step:>5}/{total} | loss {loss.item():.4f} | "
                    f"lr {scheduler.get_last_lr()[0]:.3e} | {time.perf_counter() - start:.0f} s")
        result = evaluation(predict(model, val_rows, 2 * c.batch_size, device, amp_dtype), val_labels, task.labels)
        history.append({"epoch": epoch + 1, "step": step, **result})
        log(f"epoch {epoch + 1}: val accuracy {result['accuracy']:.4f} (majority class {result['majority_baseline']:.4f})"
            f", val loss {result['loss']:.4f}")

    final = history[-1]
    meta = {"kind": ckpt_io.CLASSIFIER, "labels": task.labels, "model_config": dataclasses.asdict(model.config),
            "max_length": max_length, "base_checkpoint": str(base_ckpt), "task": task.description,
            "config": dataclasses.asdict(c), "val": {k: final[k] for k in ("accuracy", "majority_baseline", "loss")}}
    path = ckpt_io.save_checkpoint(out_dir / "checkpoints", step, model.state_dict(), {"step": step}, meta, keep=1,
                                   files={"tokenizer.json": tokenizer.to_str()})
    summary = {"run_dir": str(out_dir), "checkpoint": str(path), "labels": task.labels,
               "train_seconds": round(time.perf_counter() - start, 1), "history": history}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(name) for name in task.labels)
    log("confusion (rows: true label, columns: predicted)\n" + "\n".join(
        f"  {name:>{width}}  " + " ".join(f"{n:>6}" for n in row) + f"   recall {final['recall'][name]:.3f}"
        for name, row in zip(task.labels, final["confusion"])))
    log(f"done: {step} updates in {summary['train_seconds']:.0f} s | val accuracy {final['accuracy']:.4f} vs "
        f"majority class {final['majority_baseline']:.4f} | {path}")
    return summary


def load_classifier(path: str, device: torch.device):
    """(classifier in eval mode, tokenizer, checkpoint meta) from a fine-tuned checkpoint or run directory."""
    from ..models import GPT1, GPT1Config

    return ckpt_io.load_trained(path, ckpt_io.CLASSIFIER, lambda meta, _: GPT1(GPT1Config(**meta["model_config"])),
                                device)


def classify(checkpoint: str, texts: list[str], device: str = "auto", backend: str | None = None) -> list[dict]:
    """For each text, {label: probability}, most probable first."""
    dev = resolve_device(device, 0, 1)
    with backend_context(backend, dev):
        model, tokenizer, meta = load_classifier(checkpoint, dev)
        rows = encode(tokenizer, texts, meta["max_length"], model.config.extract_token_id)
        amp_dtype = autocast_dtype(FinetuneConfig(checkpoint=checkpoint), dev)
        probs = predict(model, rows, 64, dev, amp_dtype).exp()
    return [dict(sorted(zip(meta["labels"], row.tolist()), key=lambda kv: -kv[1])) for row in probs]
