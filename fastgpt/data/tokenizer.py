"""Text normalisation and the byte-level BPE tokenizer (trained with the `tokenizers` library).

Byte-level BPE (GPT-2's scheme) starts from the 256 byte values, so any UTF-8 text encodes without an unknown token
and `decode(encode(text)) == text` exactly. GPT-1 used 40,000 merges over a character-level base; here the
vocabulary size (bytes + merges + the special token) is a setting, 8,192 by default for small corpora.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Separates documents in the token stream; the model learns that text after it starts afresh.
END_OF_TEXT = "<|endoftext|>"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """No byte-order mark (U+FEFF, which editors on Windows put at the start of a UTF-8 file); Unicode NFC; CRLF/CR
    -> LF; no control characters but tab and newline; no trailing spaces on a line; at most one blank line in a
    row; no leading or trailing blank space in the document."""
    text = unicodedata.normalize("NFC", text.removeprefix("\ufeff"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (END_OF_TEXT,)) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries: the special tokens (ids 0, 1, ... in order), 256 bytes, and
    merges for the rest."""
    if vocab_size < 257 + len(special_tokens):
        raise ValueError(f"vocab_size must be at least {257 + len(special_tokens)} (256 bytes + "
                         f"{len(special_tokens)} special tokens + 1 merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def eot_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(END_OF_TEXT)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, in which a special token's spelling (`</s>`, `<|endoftext|>`) is text like any other:
    only the code that frames a sequence places special ids. (The tokenizer matches them in text by default;
    encode_special_tokens, not saved with it, turns that off.)"""
    tokenizer.encode_special_tokens = True
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids. An empty prompt starts a new document: the end-of-text token that separates documents
    in training (the model needs at least one token to continue)."""
    return encode_texts(tokenizer, [prompt])[0] or [eot_id(tokenizer)]
