"""Training data: the default corpus and --data sources, normalisation, the BPE tokenizer, cached token files and
the resumable batch sampler."""

from .corpus import DataError, Document, clean_play_markdown, resolve_sources, shakespeare_documents
from .dataset import BatchSampler, PreparedData, default_cache_dir, prepare_data, validation_batches
from .tokenizer import END_OF_TEXT, normalize_text, train_tokenizer

__all__ = [
    "END_OF_TEXT",
    "BatchSampler",
    "DataError",
    "Document",
    "PreparedData",
    "clean_play_markdown",
    "default_cache_dir",
    "normalize_text",
    "prepare_data",
    "resolve_sources",
    "shakespeare_documents",
    "train_tokenizer",
    "validation_batches",
]
