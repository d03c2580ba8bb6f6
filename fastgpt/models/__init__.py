"""Models on fastgpt's ops: GPT-1 and the encoder-decoder Transformer of "Attention Is All You Need"."""

from fastgpt.models.gpt1 import GPT1, GPT1ClassifierOutput, GPT1Config, GPT1Output, KVCache
from fastgpt.models.seq2seq import Seq2SeqConfig, Seq2SeqOutput, Seq2SeqTransformer

__all__ = ["GPT1", "GPT1ClassifierOutput", "GPT1Config", "GPT1Output", "KVCache", "Seq2SeqConfig", "Seq2SeqOutput",
           "Seq2SeqTransformer"]
