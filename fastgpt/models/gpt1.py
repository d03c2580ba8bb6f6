"""GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training") on fastgpt's ops.

A decoder-only Transformer: token + learned position embeddings, n_layer post-LN blocks, no final LayerNorm, and an
output head tied to the token embedding. Each block, for the residual stream x (B, T, C):

    a = c_proj(causal_attention(c_attn(x)))                 fastgpt.ops.scaled_dot_product_attention
    n = LayerNorm(x + dropout(a))                           fastgpt.ops.add_layer_norm (dropout fused)
    m = c_proj(gelu_tanh(c_fc(n)))                          fastgpt.ops.gelu_ffn
    x = LayerNorm(n + dropout(m))                           fastgpt.ops.add_layer_norm (dropout fused)

The API (stable: fastgpt.train builds on it):

    config = GPT1Config(vocab_size=..., n_positions=..., n_embd=..., n_layer=..., n_head=..., n_inner=...,
                        resid_pdrop=..., embd_pdrop=..., attn_pdrop=...)   # defaults: GPT-1 as published
    model = GPT1(config)
    out = model(input_ids, labels=None)        # GPT1Output(logits (B, T, V), loss: next-token cross-entropy)
    out = model(input_ids, cache=cache)        # incremental: positions continue from cache.length
    ids = model.generate(input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None)
    clf = model.classify(input_ids, labels=None, extract_index=None, lm_labels=None, lm_weight=0.5)
    model.num_parameters()                     # 116,534,784 for the defaults (the tied embedding counted once)
    from_hf(hf_model) -> GPT1,  to_hf(model) -> transformers.OpenAIGPTLMHeadModel

State dict keys are Hugging Face's without the "transformer." prefix: tokens_embed.weight,
positions_embed.weight, h.{i}.attn.c_attn.{weight,bias}, h.{i}.attn.c_proj.*, h.{i}.ln_1.*, h.{i}.mlp.c_fc.*,
h.{i}.mlp.c_proj.*, h.{i}.ln_2.*; the tied head has no key of its own (lm_head.weight exists only when
tie_word_embeddings=False); classifier.{weight,bias} when num_labels > 0. Linear weights are torch's (out, in);
Hugging Face's Conv1D stores (in, out), which from_hf/to_hf transpose.

labels follow Hugging Face's convention: the model shifts them (logits at t predict labels at t + 1), and -100 is
ignored. Token ids are checked against the vocabulary in eager mode (one device sync; set
`model.check_token_ids = False` to skip it); under torch.compile only shapes are checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastgpt.nn.layer_norm import LayerNorm
from fastgpt.nn.transformer import add_norm
from fastgpt.ops.attention import scaled_dot_product_attention
from fastgpt.ops.linear_gelu import gelu_ffn

_INTEGER_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for a cross-entropy or for sampling: half precision upcast to float32, float32 and float64 as they are
    (a float64 model's near-equal logits stay apart)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@dataclass
class GPT1Config:
    vocab_size: int = 40478          # 40,000 BPE merges + base characters + specials
    n_positions: int = 512           # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = 3072       # feed-forward width; None means 4 * n_embd
    gelu_approximate: str = "tanh"   # GPT-1's GELU is the tanh form; "none" is the exact (erf) one
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # weights ~ N(0, 0.02), biases 0
    tie_word_embeddings: bool = True
    num_labels: int = 0              # > 0 adds the fine-tuning classifier on the extract token
    clf_pdrop: float = 0.1
    extract_token_id: int | None = None

    def __post_init__(self):
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT1Config: expected {name} to be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT1Config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"GPT1Config: expected gelu_approximate 'none' or 'tanh', got {self.gelu_approximate!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "clf_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPT1Config: expected {name} in [0, 1), got {value}")
        if self.num_labels < 0:
            raise ValueError(f"GPT1Config: expected num_labels >= 0, got {self.num_labels}")
        if self.extract_token_id is not None and not 0 <= self.extract_token_id < self.vocab_size:
            raise ValueError(f"GPT1Config: extract_token_id {self.extract_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")


class GPT1Output(NamedTuple):
    logits: torch.Tensor                 # (B, T, vocab_size)
    loss: torch.Tensor | None = None     # mean next-token cross-entropy, when labels were given


class GPT1ClassifierOutput(NamedTuple):
    logits: torch.Tensor                 # (B, num_labels)
    loss: torch.Tensor | None = None     # classification loss (+ lm_weight * LM loss when lm_labels were given)


class KVCache:
    """Keys and values of the positions seen so far, per layer: (B, H, capacity, D) buffers filled up to `length`.

    Buffers are allocated at the first write, in the dtype the keys arrive in (bf16 under autocast)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def check(self, batch: int, length: int) -> None:
        """Raises ValueError unless `length` more positions of a batch of `batch` rows fit."""
        if self.length + length > self.capacity:
            raise ValueError(f"KVCache: {self.length} cached + {length} new positions exceed its capacity "
                             f"{self.capacity}")
        if self.keys and next(iter(self.keys.values())).shape[0] != batch:
            raise ValueError(f"KVCache: holds a batch of {next(iter(self.keys.values())).shape[0]} rows, got "
                             f"input_ids with {batch}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, H, T, D) at positions [length, length + T); returns all keys and values so far."""
        if layer not in self.keys:
            batch, heads, _, head_dim = k.shape
            self.keys[layer] = k.new_empty(batch, heads, self.capacity, head_dim)
            self.values[layer] = v.new_empty(batch, heads, self.capacity, head_dim)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.c_attn(x).view(batch, length, 3, self.n_head, width // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, H, past + T, D)
            if past > 0:
                # New query i sits at position past + i and sees keys j <= past + i (causal, bottom-right).
                causal = False
                if length > 1:
                    mask = torch.arange(past + length, device=x.device)[None, :] <= \
                        torch.arange(past, past + length, device=x.device)[:, None]
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, T, C)
        return self.c_proj(y)  # resid_dropout is applied by the block, fused into add_layer_norm


class MLP(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.approximate = config.gelu_approximate
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # resid_dropout is applied by the block, fused into add_layer_norm
        return gelu_ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias, self.approximate)


class Block(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.attn = Attention(config)
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        n = add_norm(self.attn(x, cache, layer), x, self.ln_1, self.attn.resid_dropout)
        return add_norm(self.mlp(n), n, self.ln_2, self.mlp.resid_dropout)


class GPT1(nn.Module):
    check_token_ids = True  # eager-mode range check of token ids (one device sync per call)

    def __init__(self, config: GPT1Config | None = None):
        super().__init__()
        self.config = config = config or GPT1Config()
        self.tokens_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.num_labels > 0:
            self.clf_dropout = nn.Dropout(config.clf_pdrop)
            self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, after check_state_dict when strict: one error naming every problem."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters, each tensor once (the tied head shares the token embedding)."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.positions_embed.weight.numel() if exclude_position_embeddings else 0)

    # -----------------------------------------------------------------------------------------------------------

    def _check_ids(self, name: str, ids, past: int = 0) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INTEGER_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"GPT1: expected {name} to be an int64 or int32 tensor, got {got}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"GPT1: expected {name} of shape (batch, length) with length >= 1, got "
                             f"{tuple(ids.shape)}"
                             + (" (use .unsqueeze(0) for one sequence)" if ids.dim() == 1 else ""))
        if past + ids.shape[1] > self.config.n_positions:
            raise ValueError(f"GPT1: sequence of {past + ids.shape[1]} tokens"
                             f"{f' ({past} cached + {ids.shape[1]} new)' if past else ''} is longer than the "
                             f"context, n_positions = {self.config.n_positions}")
        weight = self.tokens_embed.weight
        if ids.device != weight.device:
            raise ValueError(f"GPT1: expected {name} on the model's device ({weight.device}), got {ids.device}")
        if self.check_token_ids and ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"GPT1: {name} holds token ids outside the vocabulary [0, {self.config.vocab_size}): "
                                 f"min {low}, max {high}")

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last block's output (B, T, C)."""
        self._check_ids("input_ids", input_ids, 0 if cache is None else cache.length)
        if cache is not None:
            cache.check(input_ids.shape[0], input_ids.shape[1])
        return self._hidden_states(input_ids, cache)

    def _hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        past = 0 if cache is None else cache.length
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.tokens_embed(input_ids) + self.positions_embed(positions))  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.tokens_embed.weight)
        return self.lm_head(hidden)

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
                 name: str = "labels") -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"GPT1: expected {name} of shape {tuple(input_ids.shape)} (that of input_ids), got {got}")
        shifted = _upcast(logits[:, :-1])  # logits at t predict the label at t + 1
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> GPT1Output:
        logits = self._logits(self.hidden_states(input_ids, cache))  # (B, T, V)
        return GPT1Output(logits, None if labels is None else self._lm_loss(logits, labels, input_ids))

    def classify(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 extract_index: torch.Tensor | None = None, lm_labels: torch.Tensor | None = None,
                 lm_weight: float = 0.5) -> GPT1ClassifierOutput:
        """Fine-tuning head: a linear classifier on the hidden state of the extract token.

        extract_index (B,): where each row's extract token sits; by default the last occurrence of
        config.extract_token_id, else the last position. With lm_labels the loss adds lm_weight times the
        language-modelling loss (the paper's auxiliary objective, weight 0.5)."""
        if self.config.num_labels == 0:
            raise ValueError("GPT1.classify: the model has no classifier; build it with GPT1Config(num_labels=N)")
        if lm_labels is not None and labels is None:
            raise ValueError("GPT1.classify: lm_labels (the auxiliary loss) needs labels; for the language-modelling "
                             "loss alone call the model: model(input_ids, labels=...)")
        hidden = self.hidden_states(input_ids)
        batch, length = input_ids.shape
        if extract_index is None:
            extract_index = self._extract_positions(input_ids)
        elif not isinstance(extract_index, torch.Tensor) or extract_index.shape != (batch,):
            raise ValueError(f"GPT1.classify: expected extract_index of shape ({batch},), got "
                             f"{getattr(extract_index, 'shape', type(extract_index).__name__)}")
        elif extract_index.numel() and not torch.compiler.is_compiling():
            # A negative or too-large position would index from the end or fail inside the gather.
            low, high = torch.stack(torch.aminmax(extract_index)).tolist()  # one device sync
            if low < 0 or high >= length:
                raise ValueError(f"GPT1.classify: expected extract_index in [0, {length}) (positions of "
                                 f"input_ids), got values from {low} to {high}")
        pooled = hidden[torch.arange(batch, device=hidden.device), extract_index]  # (B, C)
        logits = self.classifier(self.clf_dropout(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(_upcast(logits), labels)
            if lm_labels is not None:
                loss = loss + lm_weight * self._lm_loss(self._logits(hidden), lm_labels, input_ids, "lm_labels")
        return GPT1ClassifierOutput(logits, loss)

    def _extract_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if self.config.extract_token_id is None:
            return torch.full((batch,), length - 1, device=input_ids.device)
        is_extract = input_ids == self.config.extract_token_id
        if not torch.compiler.is_compiling() and not bool(is_extract.any(dim=1).all()):
            raise ValueError(f"GPT1.classify: a row of input_ids has no extract token "
                             f"({self.config.extract_token_id}); pass extract_index")
        positions = torch.arange(length, device=input_ids.device)
        return torch.where(is_extract, positions, -1).amax(dim=1)  # the last occurrence

    # -----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continues each row of input_ids (B, T) by up to max_new_tokens tokens; returns (B, T + new).

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose probability
        reaches p. With eos_token_id, rows that produced it continue with it, and generation stops once all have.
        Keys and values are cached; once the context is full, each step re-reads the last n_positions tokens
        (the window slides, so cached positions would be stale). Runs in the module's current mode: call .eval()
        for generation without dropout."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() != 2:
            self._check_ids("input_ids", input_ids)  # the shape error, before the window is sliced
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT1.generate: expected max_new_tokens >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
            raise ValueError(f"GPT1.generate: expected temperature to be a finite number >= 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"GPT1.generate: expected top_k to be an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"GPT1.generate: expected top_p in (0, 1], got {top_p!r}")
        if eos_token_id is not None and not (isinstance(eos_token_id, int)
                                             and 0 <= eos_token_id < self.config.vocab_size):
            raise ValueError(f"GPT1.generate: expected eos_token_id to be an int in [0, {self.config.vocab_size}) "
                             f"(the vocabulary), got {eos_token_id!r}")
        context = self.config.n_positions
        tokens = input_ids
        window = tokens[:, -context:]
        cache = KVCache(min(context, window.shape[1] + max_new_tokens)) if use_cache else None
        logits = self._logits(self.hidden_states(window, cache)[:, -1])  # (B, V)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in range(max_new_tokens):
            next_token = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            # The prompt was checked; the sampled ids are below the vocabulary size by construction and the
            # window stays within the context, so the steps skip the check and its device sync.
            if cache is not None and cache.length < cache.capacity:
                hidden = self._hidden_states(next_token[:, None], cache)
            else:
                cache = None
                hidden = self._hidden_states(tokens[:, -context:], None)
            logits = self._logits(hidden[:, -1])
        return tokens


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, V)."""
    logits = _upcast(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0 before the division: a tiny temperature sends the others to -inf, not to nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the likeliest one always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: checks with clear messages, and conversion to and from Hugging Face transformers.

def check_state_dict(model: GPT1, state_dict: dict) -> None:
    """Raises ValueError naming every missing key, unexpected key and shape mismatch of `state_dict` for `model`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): "
                        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"wrong shapes ({len(shapes)}): {'; '.join(shapes[:8])}")
    hint = ""
    if any(k.startswith("transformer.") for k in unexpected):
        hint = " (a Hugging Face checkpoint: load it with fastgpt.models.gpt1.from_hf)"
    c = model.config
    raise ValueError(f"GPT1: the checkpoint does not fit the config (n_layer={c.n_layer}, n_embd={c.n_embd}, "
                     f"vocab_size={c.vocab_size}, n_positions={c.n_positions}, n_inner={c.n_inner}){hint}: "
                     + "; ".join(problems))


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def from_hf(hf_model) -> GPT1:
    """A GPT1 with the weights of a transformers OpenAIGPTLMHeadModel (or OpenAIGPTModel), on its device and dtype."""
    hf = hf_model.config
    if hf.afn != "gelu":
        raise ValueError(f"from_hf: GPT1 supports afn='gelu' (the tanh GELU), got afn={hf.afn!r}")
    config = GPT1Config(vocab_size=hf.vocab_size, n_positions=hf.n_positions, n_embd=hf.n_embd, n_layer=hf.n_layer,
                        n_head=hf.n_head, n_inner=4 * hf.n_embd, gelu_approximate="tanh",
                        resid_pdrop=hf.resid_pdrop, embd_pdrop=hf.embd_pdrop, attn_pdrop=hf.attn_pdrop,
                        layer_norm_epsilon=hf.layer_norm_epsilon, initializer_range=hf.initializer_range,
                        tie_word_embeddings=hf.tie_word_embeddings)
    hf_state = hf_model.state_dict()
    if not config.tie_word_embeddings and "lm_head.weight" not in hf_state:
        raise ValueError("from_hf: the model's config unties the output head (tie_word_embeddings=False) but it "
                         "has no head (an OpenAIGPTModel): pass the OpenAIGPTLMHeadModel")
    state = {}
    for key, value in hf_state.items():
        key = key.removeprefix("transformer.")
        if (key == "lm_head.weight" and config.tie_word_embeddings) or key.endswith(".attn.bias"):
            continue  # the tied head (the token embedding); the causal-mask buffer
        state[key] = value.t() if key.endswith(_CONV1D) else value
    weight = next(hf_model.parameters())
    model = GPT1(config).to(device=weight.device, dtype=weight.dtype)
    model.load_state_dict(state)
    return model.train(hf_model.training)


def to_hf(model: GPT1):
    """A transformers OpenAIGPTLMHeadModel with `model`'s weights (transformers is imported here, not at import)."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    c = model.config
    if c.gelu_approximate != "tanh" or c.n_inner != 4 * c.n_embd or c.num_labels:
        raise ValueError("to_hf: OpenAIGPTLMHeadModel has the tanh GELU, n_inner = 4 * n_embd and no classifier; "
                         f"this model has {asdict(c)}")
    hf_config = OpenAIGPTConfig(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                                n_layer=c.n_layer, n_head=c.n_head, afn="gelu", resid_pdrop=c.resid_pdrop,
                                embd_pdrop=c.embd_pdrop, attn_pdrop=c.attn_pdrop,
                                layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=c.initializer_range,
                                tie_word_embeddings=c.tie_word_embeddings)
    weight = model.tokens_embed.weight
    hf_model = OpenAIGPTLMHeadModel(hf_config).to(device=weight.device, dtype=weight.dtype)
    state = {f"transformer.{k}": (v.t() if k.endswith(_CONV1D) else v) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    state["lm_head.weight"] = (model.tokens_embed.weight if c.tie_word_embeddings else model.lm_head.weight).detach()
    hf_model.load_state_dict(state, strict=True)
    return hf_model.train(model.training)
