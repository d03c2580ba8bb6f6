"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017) on fastgpt's modules.

    src (B, S) -> embed * sqrt(d_model) + sinusoids -> dropout -> fastgpt.nn.Transformer encoder -> memory
    tgt (B, T) -> embed * sqrt(d_model) + sinusoids -> dropout -> decoder (causal self-attention, cross-attention
               on memory) -> output projection (tied to the target embedding by default) -> logits (B, T, V)

    PE[pos, 2i] = sin(pos / 10000^(2i / d_model)),   PE[pos, 2i + 1] = cos(pos / 10000^(2i / d_model))

API:
    config = Seq2SeqConfig.base(src_vocab_size, tgt_vocab_size)   # 6+6 layers, 512 wide, 8 heads, FFN 2048, dropout 0.1
    model = Seq2SeqTransformer(config)
    out = model(src, tgt_in, labels=tgt_out)      # Seq2SeqOutput(logits (B, T, V), loss)
    ids = model.greedy_decode(src, max_len=None)  # (B, <= max_len): generated tokens (no BOS), EOS then padding
    ids = model.beam_search(src, beam_size=4, length_penalty=0.6, max_len=None)

Sequences are right-padded with config.pad_id. Sources get a key-padding mask; targets need none (with right
padding, causal attention never lets a real position see a pad). Decoding caches each decoder layer's
self-attention keys and values, and computes the cross-attention keys and values of the memory once.
Beam search ranks hypotheses by log-probability / lp(length), lp(n) = ((5 + n) / 6) ** length_penalty (Wu et al.
2016), the length counting generated tokens up to and including EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastgpt.nn.transformer import Transformer, add_norm
from fastgpt.ops.attention import scaled_dot_product_attention

_INTEGER_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    max_len: int = 1024              # longest source or target sequence (rows of the sinusoid table)
    share_embeddings: bool = False   # one embedding for source and target (needs one vocabulary)
    tie_output: bool = True          # the output projection is the target embedding
    label_smoothing: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @classmethod
    def base(cls, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> "Seq2SeqConfig":
        """The paper's base model: 6+6 layers, d_model 512, 8 heads, FFN 2048, dropout 0.1, label smoothing 0.1."""
        return replace(cls(src_vocab_size, tgt_vocab_size, label_smoothing=0.1), **overrides)

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "nhead", "num_encoder_layers",
                     "num_decoder_layers", "dim_feedforward", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Seq2SeqConfig: expected {name} to be a positive int, got {value!r}")
        if self.d_model % self.nhead or self.d_model % 2:
            raise ValueError(f"Seq2SeqConfig: d_model ({self.d_model}) must be even and a multiple of nhead "
                             f"({self.nhead})")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"Seq2SeqConfig: share_embeddings needs one vocabulary, got src_vocab_size "
                             f"{self.src_vocab_size} and tgt_vocab_size {self.tgt_vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"Seq2SeqConfig: {name} {value} is outside the vocabularies")


class Seq2SeqOutput(NamedTuple):
    logits: torch.Tensor               # (B, T, tgt_vocab_size)
    loss: torch.Tensor | None = None   # mean cross-entropy over non-pad labels (label-smoothed per config)


def sinusoids(length: int, width: int) -> torch.Tensor:
    """The sinusoidal position encodings (length, width)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float64) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.float()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, E) -> (B, H, T, E / H)."""
    # The head width spelled out: view's -1 is ambiguous for an empty batch.
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)


class _DecoderCache:
    """Per decoder layer: self-attention keys/values (B, H, capacity, D) filled up to `length` (allocated at the
    first write, in the dtype the keys arrive in: bf16 under autocast), and the cross-attention keys/values of the
    memory (B, H, S, D), computed once."""

    def __init__(self, capacity, cross_kv, memory_mask):
        self.capacity = capacity
        self.self_kv = [None] * len(cross_kv)
        self.cross_kv = cross_kv
        self.memory_mask = memory_mask  # (B, 1, 1, S) True = may attend
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, H, 1, D) at position `length`; returns the keys and values up to it."""
        if self.self_kv[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.self_kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.self_kv[layer]
        keys[:, :, self.length:self.length + 1] = k
        values[:, :, self.length:self.length + 1] = v
        return keys[:, :, :self.length + 1], values[:, :, :self.length + 1]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues hypothesis rows[i] (of the same sentence, so the memory is unchanged)."""
        self.self_kv = [None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
                        for kv in self.self_kv]


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.tgt_embed = self.src_embed if c.share_embeddings else \
            nn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.register_buffer("positions", sinusoids(c.max_len, c.d_model), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                       c.dim_feedforward, c.dropout, c.activation, layer_norm_eps=c.layer_norm_eps,
                                       batch_first=True, norm_first=c.norm_first)
        if not c.tie_output:
            self.output = nn.Linear(c.d_model, c.tgt_vocab_size)
        # Embeddings ~ N(0, d^-1/2): scaled by sqrt(d) they enter at unit variance, and the tied output
        # projection starts with logits of unit scale.
        for embedding in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(embedding.weight, std=c.d_model ** -0.5)
            with torch.no_grad():
                embedding.weight[c.pad_id].zero_()

    # -----------------------------------------------------------------------------------------------------------

    def _check_ids(self, name: str, ids, vocab_size: int, offset: int = 0) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INTEGER_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"Seq2SeqTransformer: expected {name} to be an int64 or int32 tensor, got {got}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"Seq2SeqTransformer: expected {name} of shape (batch, length), length >= 1, got "
                             f"{tuple(ids.shape)}")
        if offset + ids.shape[1] > self.config.max_len:
            raise ValueError(f"Seq2SeqTransformer: {name} reaches position {offset + ids.shape[1]}, beyond "
                             f"max_len = {self.config.max_len}")
        if ids.device != self.positions.device:
            raise ValueError(f"Seq2SeqTransformer: expected {name} on the model's device "
                             f"({self.positions.device}), got {ids.device}")
        if ids.numel() and not torch.compiler.is_compiling():  # aminmax refuses an empty batch
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync
            if low < 0 or high >= vocab_size:
                raise ValueError(f"Seq2SeqTransformer: {name} holds token ids outside the vocabulary "
                                 f"[0, {vocab_size}): min {low}, max {high}")

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = embedding(ids) * math.sqrt(self.config.d_model) + self.positions[offset:offset + ids.shape[1]]
        return self.dropout(x)  # (B, T, d_model)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.tgt_embed.weight) if self.config.tie_output else self.output(hidden)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory (B, S, d_model), source padding mask (B, S), True = padding)."""
        self._check_ids("src", src, self.config.src_vocab_size)
        padding = src == self.config.pad_id
        memory = self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=padding)
        return memory, padding

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_padding: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for the target prefix tgt (B, T), all positions at once (no cache)."""
        self._check_ids("tgt", tgt, self.config.tgt_vocab_size)
        if src_padding.shape != memory.shape[:2]:
            raise ValueError(f"Seq2SeqTransformer: expected src_padding of shape {tuple(memory.shape[:2])} "
                             f"(memory's batch and length), got {tuple(src_padding.shape)}")
        # The causal mask and the is_causal hint, as torch.nn's modules expect them; the hint lets the fused
        # attention skip the mask.
        causal = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool, device=tgt.device).triu(1)
        hidden = self.transformer.decoder(self._embed(self.tgt_embed, tgt), memory, tgt_mask=causal,
                                          tgt_is_causal=True, memory_key_padding_mask=src_padding)
        return self._logits(hidden)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, labels: torch.Tensor | None = None) -> Seq2SeqOutput:
        """tgt: the decoder input (BOS y1 ... y_{n-1}); labels: what each position should predict (y1 ... EOS),
        pad_id where ignored. Both (B, T)."""
        memory, src_padding = self.encode(src)
        if tgt.shape[:1] != src.shape[:1]:
            raise ValueError(f"Seq2SeqTransformer: src and tgt batch sizes differ: {src.shape[0]} and "
                             f"{tgt.shape[0]}")
        logits = self.decode(tgt, memory, src_padding)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != tgt.shape:
                raise ValueError(f"Seq2SeqTransformer: expected labels of shape {tuple(tgt.shape)} (that of tgt), "
                                 f"got {getattr(labels, 'shape', type(labels).__name__)}")
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision upcast
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=self.config.pad_id, label_smoothing=self.config.label_smoothing)
        return Seq2SeqOutput(logits, loss)

    # -----------------------------------------------------------------------------------------------------------
    # Incremental decoding

    def _start_cache(self, memory: torch.Tensor, src_padding: torch.Tensor, capacity: int) -> _DecoderCache:
        width = self.config.d_model
        cross_kv = []
        for layer in self.transformer.decoder.layers:
            attn = layer.multihead_attn
            bias = None if attn.in_proj_bias is None else attn.in_proj_bias[width:]
            k, v = F.linear(memory, attn.in_proj_weight[width:], bias).chunk(2, dim=-1)
            cross_kv.append((_heads(k, attn.num_heads), _heads(v, attn.num_heads)))  # (B, H, S, D)
        return _DecoderCache(capacity, cross_kv, ~src_padding[:, None, None, :])

    def _attend(self, attn, x, k, v, mask):
        """attn's output for queries x (B, T, E) against projected keys/values k, v (B, H, L, D)."""
        width = self.config.d_model
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[:width]
        q = _heads(F.linear(x, attn.in_proj_weight[:width], bias), attn.num_heads)
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(y.transpose(1, 2).reshape(x.shape))

    def _decode_step(self, tokens: torch.Tensor, cache: _DecoderCache) -> torch.Tensor:
        """Logits (B, V) of the next token after tokens (B, 1) at position cache.length; advances the cache.

        Unchecked: the decoders feed it BOS and their own picks, ids below the vocabulary size by construction, and
        stop within max_len, so a range check would only add a device sync per step."""
        position = cache.length
        x = self._embed(self.tgt_embed, tokens, position)  # (B, 1, E)
        width = self.config.d_model
        for i, layer in enumerate(self.transformer.decoder.layers):
            cross_k, cross_v = cache.cross_kv[i]

            def self_block(h, layer=layer, i=i):
                attn = layer.self_attn
                bias = None if attn.in_proj_bias is None else attn.in_proj_bias[width:]
                k, v = F.linear(h, attn.in_proj_weight[width:], bias).chunk(2, dim=-1)
                keys, values = cache.write(i, _heads(k, attn.num_heads), _heads(v, attn.num_heads))
                # One query at the newest position sees every cached key: no mask.
                return layer.dropout1(self._attend(attn, h, keys, values, None))

            def cross_block(h, layer=layer, cross_k=cross_k, cross_v=cross_v):
                return layer.dropout2(self._attend(layer.multihead_attn, h, cross_k, cross_v, cache.memory_mask))

            if layer.norm_first:
                x = x + self_block(layer.norm1(x))
                x = x + cross_block(layer.norm2(x))
                x = x + layer._ff_block(layer.norm3(x))
            else:
                x = add_norm(self_block(x), x, layer.norm1)
                x = add_norm(cross_block(x), x, layer.norm2)
                x = add_norm(layer._ff_block(x), x, layer.norm3)
        norm = self.transformer.decoder.norm
        if norm is not None:
            x = norm(x)
        cache.length += 1
        return self._logits(x[:, -1])

    def _never_emitted(self, device: torch.device) -> torch.Tensor:
        """Ids a decoder may not produce: padding and BOS (EOS ends a row, then padding follows). Made once per
        decoding call, on the device: an index list would be copied there at every step."""
        c = self.config
        return torch.tensor(sorted({c.pad_id, c.bos_id} - {c.eos_id}), dtype=torch.long, device=device)

    def _limits(self, src: torch.Tensor, max_len: int | torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Each row's limit on generated tokens (B,), and the most steps any row needs. BOS takes position 0 and the
        last token is never fed back, so a limit is at most config.max_len. max_len: one int for every row, a (B,)
        integer tensor, or None: each row's own source length + 50, so that a row decodes the same alone as in a
        padded batch (a limit taken from the batch's width cut it at another length)."""
        limit, rows = self.config.max_len, src.shape[0]
        if max_len is None:
            limits = ((src != self.config.pad_id).sum(dim=1) + 50).clamp(max=limit)
        elif isinstance(max_len, torch.Tensor):
            if max_len.shape != (rows,) or max_len.is_floating_point() or max_len.dtype == torch.bool:
                raise ValueError(f"Seq2SeqTransformer: expected max_len to be an int or an integer tensor of shape "
                                 f"({rows},) (one limit per row), got {max_len.dtype} of shape {tuple(max_len.shape)}")
            limits = max_len.to(src.device, torch.long)
            if rows:
                low, high = torch.stack(torch.aminmax(limits)).tolist()  # one device sync
                if not 1 <= low <= high <= limit:
                    raise ValueError(f"Seq2SeqTransformer: expected max_len's limits in [1, {limit}] "
                                     f"(config.max_len), got {low} to {high}")
                return limits, high
        # An int, not a bool or float: range(max_len) would fail with a message naming neither.
        elif isinstance(max_len, int) and not isinstance(max_len, bool) and 1 <= max_len <= limit:
            # One limit for all: the step count is known without reading the tensor back (no device sync).
            return torch.full((rows,), max_len, dtype=torch.long, device=src.device), max_len if rows else 0
        else:
            raise ValueError(f"Seq2SeqTransformer: expected max_len to be an int in [1, {limit}] (config.max_len), "
                             f"got {max_len!r}")
        return limits, int(limits.max()) if rows else 0

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """The likeliest next token at each step: (B, <= max_len) tokens, EOS then pad_id once a row is done (or has
        reached its limit, see _limits)."""
        c = self.config
        limits, steps = self._limits(src, max_len)
        memory, src_padding = self.encode(src)
        tokens = torch.full((src.shape[0], 1), c.bos_id, dtype=torch.long, device=src.device)
        cache = self._start_cache(memory, src_padding, steps) if use_cache else None
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        never = self._never_emitted(src.device)
        for step in range(steps):
            if cache is not None:
                logits = self._decode_step(tokens[:, -1:], cache)
            else:
                logits = self.decode(tokens, memory, src_padding)[:, -1]
            logits.index_fill_(1, never, float("-inf"))
            next_token = torch.where(finished, c.pad_id, logits.argmax(dim=-1))
            finished |= (next_token == c.eos_id) | (limits <= step + 1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if bool(finished.all()):
                break
        return tokens[:, 1:]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam_size: int = 4, length_penalty: float = 0.6,
                    max_len: int | None = None) -> torch.Tensor:
        """The best of beam_size hypotheses per row by log-probability / lp(length): (B, <= max_len) tokens (each
        row within its limit, see _limits)."""
        if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
            raise ValueError(f"Seq2SeqTransformer.beam_search: expected beam_size to be an int >= 1, got {beam_size!r}")
        if not 0 <= length_penalty < math.inf:
            raise ValueError(f"Seq2SeqTransformer.beam_search: expected length_penalty in [0, inf), got "
                             f"{length_penalty}")
        c = self.config
        limits, steps = self._limits(src, max_len)
        memory, src_padding = self.encode(src)
        batch, beams, device = src.shape[0], beam_size, src.device
        memory = memory.repeat_interleave(beams, dim=0)  # (B * K, S, E): hypothesis rows, sentence-major
        limits = limits.repeat_interleave(beams)  # (B * K,): a sentence's, whichever of its hypotheses a row holds
        cache = self._start_cache(memory, src_padding.repeat_interleave(beams, dim=0), steps)
        tokens = torch.full((batch * beams, 1), c.bos_id, dtype=torch.long, device=device)
        # Scores in float32, or float64 for a float64 model: rounding a float64 model's log-probabilities to float32
        # ties near-equal hypotheses, and the beam then keeps whichever topk happens to pick.
        dtype = torch.promote_types(memory.dtype, torch.float32)
        scores = torch.full((batch, beams), float("-inf"), dtype=dtype, device=device)
        scores[:, 0] = 0.0  # one live hypothesis to start with: the beams would all be the same
        scores = scores.view(-1)
        lengths = torch.zeros(batch * beams, dtype=torch.long, device=device)
        finished = torch.zeros(batch * beams, dtype=torch.bool, device=device)
        never = self._never_emitted(device)
        # A finished hypothesis continues only with padding, at no cost.
        done_row = torch.full((c.tgt_vocab_size,), float("-inf"), dtype=dtype, device=device)
        done_row[c.pad_id] = 0.0

        def penalty(n):
            return ((5.0 + n.to(dtype)) / 6.0) ** length_penalty

        for step in range(steps):
            log_probs = F.log_softmax(self._decode_step(tokens[:, -1:], cache).to(dtype), dim=-1)  # (B*K, V)
            log_probs.index_fill_(1, never, float("-inf"))  # scores stay the model's log-probabilities
            vocab = log_probs.shape[-1]
            log_probs = torch.where(finished[:, None], done_row, log_probs)
            candidates = scores[:, None] + log_probs  # (B*K, V)
            new_lengths = lengths + (~finished).long()
            ranked = (candidates / penalty(new_lengths)[:, None]).view(batch, beams * vocab)
            best = ranked.topk(beams, dim=1).indices  # (B, K)
            rows = (torch.arange(batch, device=device)[:, None] * beams + best // vocab).view(-1)
            next_token = (best % vocab).view(-1)
            scores = candidates.view(batch, beams * vocab).gather(1, best).view(-1)
            tokens = torch.cat([tokens[rows], next_token[:, None]], dim=1)
            lengths = new_lengths[rows]
            # A hypothesis at its sentence's limit is done: it keeps its score and length from here on.
            finished = finished[rows] | (next_token == c.eos_id) | (limits <= step + 1)
            cache.reorder(rows)
            if bool(finished.all()):
                break
        final = (scores / penalty(lengths)).view(batch, beams)
        chosen = torch.arange(batch, device=device) * beams + final.argmax(dim=1)
        return tokens[chosen, 1:]
