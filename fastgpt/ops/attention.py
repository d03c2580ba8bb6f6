"""Scaled dot-product attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

    out = dropout(softmax(q @ k^T * scale + mask)) @ v

query (..., H, Lq, D), key (..., Hk, Lk, D), value (..., Hk, Lk, Dv), their batch dims broadcast together, the
heads too (H or Hk may be 1), as PyTorch's matrix products broadcast them (2-D inputs (L, D) are one head); with
enable_gqa, H is a multiple of Hk and query head h reads key/value head h // (H // Hk). is_causal is aligned
top-left, as in PyTorch: query i sees keys j <= i, also when Lq != Lk. attn_mask is boolean (True = may attend) or
additive, float32 or the query's dtype, broadcastable to (..., H, Lq, Lk). A query row whose
keys are all masked gives 0, and 0 gradients; no keys at all (Lk = 0) gives zeros. Under autocast the inputs (and
a float mask) take autocast's dtype, as PyTorch casts them.

An additive mask may hide keys with a large finite value, as Hugging Face's masks do with torch.finfo(dtype).min.
A row hidden entirely that way is not a masked row to PyTorch: its scores all round to the same number, and it
averages every value; the kernels give that average too. Its gradients are exact when its output gradient is 0 (a
padding position, whose output the loss ignores); otherwise they are those of PyTorch's fused kernels rather than
its math path (the row's log-sum-exp, near -3.4e38, cannot hold the log(Lk) that makes each probability 1/Lk).

Kernels (flash-style: online softmax, a float32 log-sum-exp lse (B, H, Lq) kept per query row, the backward pass
recomputing the probabilities and regenerating the dropout mask from the seed; nothing Lq x Lk is ever stored):
    reference  _reference below, by the definition (float16/bfloat16 computed in float32)
    triton     kernels/attention.py, as custom ops fastgpt_triton::attention_{fwd,bwd}
    csrc       csrc/cpu/attention.cpp (and csrc/cuda/attention.cu where built) as fastgpt::attention_{fwd,bwd}
               (schemas in csrc/fastgpt.cpp)
The kernels take 4-D (B, H, L, D) views of any strides and a mask expanded to (B, H, Lq, Lk) by strides, so a
key-padding mask (B, 1, 1, Lk) is read in place. Dropout draws one int64 seed from torch's default generator per
call (all backends alike, so torch.manual_seed reproduces a run) and the Philox stream of fastgpt/ops/philox.py at
counters (j // 4, i, b*H + h, 0), word j % 4.
"""

from __future__ import annotations

import functools
import math

import torch

from fastgpt import backends
from fastgpt.ops._autocast import autocast_disabled, autocast_inputs
from fastgpt.ops._checks import check_dropout_p, check_like, check_scale, check_tensor
from fastgpt.ops._registration import register_kernel_op
from fastgpt.ops.philox import attention_dropout_keep, dropout_seed

_OP = "scaled_dot_product_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the schema (fake implementation) and autograd formula are shared by the kernel backends.

def _fwd_fake(q, k, v, attn_mask, is_causal, scale, dropout_p, seed):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, Lq, Dv)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)  # lse (B, H, Lq)


def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.args = (is_causal, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _autograd_for(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
        is_causal, scale, dropout_p = ctx.args
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None
    return backward


def _register(fwd_op, bwd_op):
    return register_kernel_op(fwd_op, bwd_op, _fwd_fake, _bwd_fake, _autograd_for, _setup_context)


@torch.library.custom_op("fastgpt_triton::attention_fwd", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool, scale: float, dropout_p: float,
                seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.attention import attention_forward
    return attention_forward(q, k, v, attn_mask, is_causal, scale, dropout_p, int(seed.item()))


@torch.library.custom_op("fastgpt_triton::attention_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float, dropout_p: float,
                seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.attention import attention_backward
    return attention_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, dropout_p,
                              int(seed.item()))


_OPS = {"triton": _register(_triton_fwd, _triton_bwd)}
# The csrc backend's devices: its CPU kernel always, a CUDA kernel when the extension was built with one.
_CSRC_DEVICES = set()
if backends.CSRC_LOADED:
    _OPS["csrc"] = _register(torch.ops.fastgpt.attention_fwd.default, torch.ops.fastgpt.attention_bwd.default)
    _CSRC_DEVICES = {device for device in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastgpt::attention_fwd", device.upper())}


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[tuple[int, ...], int, int]:
    """Raises on bad input; returns the batch dims query, key and value broadcast to, and the query's and the
    key/value's heads once broadcast."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(_OP, name, t)
        if name != "query":
            check_like(_OP, name, t, "query", query)
        if t.dim() < 2:
            raise ValueError(f"{_OP}: expected {name} with at least 2 dims (..., length, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{_OP}: expected query, key and value with the same number of dims, got "
                         f"{query.dim()}, {key.dim()} and {value.dim()}")
    # torch.broadcast_shapes costs several us a call (most of the checks' time): equal batch dims skip it.
    batch_shape = tuple(query.shape[:-3])
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        try:
            batch_shape = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
        except RuntimeError:
            raise ValueError(f"{_OP}: expected query, key and value with broadcastable batch dims, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}") from None
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{_OP}: expected key's head dim to equal query's ({query.shape[-1]}), "
                         f"got {key.shape[-1]}")
    if key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(f"{_OP}: expected key and value with the same heads and length, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if enable_gqa:
        # No heads at all (0 and 0) is an empty result, as without enable_gqa and in PyTorch; 0 key heads for
        # query heads is not.
        if (heads % kv_heads) if kv_heads else heads:
            raise ValueError(f"{_OP}: with enable_gqa, query's heads ({heads}) must be a multiple of key's "
                             f"({kv_heads})")
    elif heads != kv_heads:
        # Heads broadcast like a batch dim: one of them may be 1. A single key/value head shared by every query
        # head is grouped-query attention with one group (the kernels read it in place and sum its gradients
        # themselves); a single query head (a (1, L, D) query against (B, L, D) keys) is broadcast.
        if 1 not in (heads, kv_heads):
            raise ValueError(f"{_OP}: expected query and key with the same number of heads ({heads} vs "
                             f"{kv_heads}), or one of them 1; pass enable_gqa=True for grouped-query attention")
        heads = max(heads, kv_heads)
    check_dropout_p(_OP, dropout_p)
    check_scale(_OP, scale)
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"{_OP}: pass either attn_mask or is_causal=True, not both")
        check_tensor(_OP, "attn_mask", attn_mask, floating=False)
        check_like(_OP, "attn_mask", attn_mask, "query", query, dtype=False)
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"{_OP}: expected attn_mask to be bool, float32 or of query's dtype ({query.dtype}), "
                            f"got {attn_mask.dtype}")
        target = (*batch_shape, heads, query.shape[-2], key.shape[-2])
        # Broadcastable to target, not beyond it: each of the mask's trailing dims is 1 or target's.
        if attn_mask.dim() > len(target) or any(m != 1 and m != t for m, t in zip(attn_mask.shape[::-1],
                                                                                  target[::-1])):
            raise ValueError(f"{_OP}: expected attn_mask broadcastable to {target} (..., H, Lq, Lk), "
                             f"got {tuple(attn_mask.shape)}")
    return batch_shape, heads, kv_heads


def _reference(query, key, value, attn_mask, dropout_keep, dropout_p, is_causal, scale):
    """Attention by its definition, float16/bfloat16 computed in float32 (a Hugging Face mask at float16's minimum
    added in float16 would overflow to -inf): fully masked rows, and no keys at all, give 0 (not NaN)."""
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=-3)
        value = value.repeat_interleave(heads // kv_heads, dim=-3)
    lq, lk = query.shape[-2], key.shape[-2]
    compute = torch.promote_types(query.dtype, torch.float32)  # float64 stays float64
    scores = (query.to(compute) @ key.to(compute).transpose(-2, -1)) * scale  # (..., H, Lq, Lk)
    # The op takes a mask or is_causal; the kernels (and their tests, through this function) also take both.
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.to(compute)
    if is_causal:
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=query.device).triu(1), float("-inf"))
    # Softmax with rows whose keys are all masked giving 0, and 0 gradients: subtracting their -inf maximum would
    # make NaN (and NaN gradients reach q and k through an additive mask), so they subtract 0 instead.
    row_max = scores.amax(dim=-1, keepdim=True).detach() if lk else scores.new_zeros(*scores.shape[:-1], 1)
    exp = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    denom = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(denom == 0, 1.0, denom)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return (probs @ value.to(compute)).to(query.dtype)


def _kernel_supports(backend, query, key, value, attn_mask) -> bool:
    if backend not in _OPS or query.dtype not in _KERNEL_DTYPES or query.numel() == 0 or key.shape[-2] == 0:
        return False
    if attn_mask is not None and attn_mask.requires_grad:  # the kernels give no gradient for the mask
        return False
    if backend == "csrc" and attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        return False  # the C++ kernels read an additive mask in the inputs' dtype (a float32 one with 16-bit inputs)
    if backend == "triton":
        from fastgpt.kernels.attention import HEAD_DIMS
        return query.shape[-1] in HEAD_DIMS and value.shape[-1] in HEAD_DIMS
    if query.device.type not in _CSRC_DEVICES:
        return False
    if query.device.type == "cuda":
        # csrc/cuda/attention.cu: tensor cores (sm_80+), half precision, head dims 64 and 128 with Dv = D, and a
        # grid of (batch, heads) blocks within CUDA's 65535 limit on grid dims y and z.
        return (query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] in (64, 128)
                and value.shape[-1] == query.shape[-1] and _gpu(query.device.index)[1] >= 8
                and math.prod(query.shape[:-3]) <= 65535 and query.shape[-3] <= 65535)
    return True


_GPUS: dict[int, tuple[str, int]] = {}


@torch.compiler.assume_constant_result
def _gpu(device_index: int) -> tuple[str, int]:
    """GPU `device_index`'s name and major compute capability, asked of torch once (a few us a call). A constant to
    torch.compile."""
    if device_index not in _GPUS:
        _GPUS[device_index] = (torch.cuda.get_device_name(device_index),
                               torch.cuda.get_device_capability(device_index)[0])
    return _GPUS[device_index]


def faster_kernel(rows: list[dict], dtype: str, head_dim: int, causal: bool, seq_len: int) -> str | None:
    """The rule that picks between the two kernel backends on a GPU, from that GPU's recorded attention benchmark
    (`rows`): among the recorded points with this dtype, head dim and causal flag where both fastgpt-csrc and
    fastgpt-triton ran, take the one nearest in log2(sequence length), and return the backend whose forward+backward
    median was lower there. None when nothing comparable is recorded."""
    points: dict[int, dict[str, float]] = {}
    for row in rows:
        extra = row.get("extra", {})
        if (row.get("pass_") == "fwd+bwd" and row.get("impl") in ("fastgpt-csrc", "fastgpt-triton")
                and row.get("dtype") == dtype and extra.get("head_dim") == head_dim
                and extra.get("causal") == causal and extra.get("seq_len")):
            points.setdefault(extra["seq_len"], {})[row["impl"]] = row["median_ms"]
    paired = {length: times for length, times in points.items() if len(times) == 2}
    if not paired:
        return None
    nearest = min(paired, key=lambda length: abs(math.log2(length) - math.log2(max(seq_len, 1))))
    return min(paired[nearest], key=paired[nearest].get).removeprefix("fastgpt-")


@torch.compiler.assume_constant_result
def _cuda_preference(device_index: int, dtype: str, head_dim: int, causal: bool, seq_len: int) -> tuple[str, ...]:
    """The backend order on GPU `device_index` for this shape: the measured faster kernel first (faster_kernel), else
    the default order. A constant to torch.compile."""
    return _preference_on_gpu(_gpu(device_index)[0], dtype, head_dim, causal, seq_len)


# Cached: the recorded rows are read from a file and scanned once per GPU and shape, not on every call.
@functools.lru_cache(maxsize=4096)
def _preference_on_gpu(device_name: str, dtype: str, head_dim: int, causal: bool, seq_len: int) -> tuple[str, ...]:
    first = faster_kernel(_recorded_rows(device_name), dtype, head_dim, causal, seq_len)
    default = backends.DEFAULT_PREFERENCE["cuda"]
    return default if first is None else (first, *(b for b in default if b != first))


@functools.cache
def _recorded_rows(device_name: str) -> list[dict]:
    return backends.recorded_rows("attention", device_name)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on fastgpt's kernels (same arguments, same result)."""
    if all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (query, key, value)):  # (L, D): one head
        return scaled_dot_product_attention(query[None], key[None], value[None], attn_mask, dropout_p, is_causal,
                                            scale, enable_gqa)[0]
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    batch_shape, heads, kv_heads = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    query, key, value = (t if t.shape[:-2] == (*batch_shape, h) else t.expand(*batch_shape, h, *t.shape[-2:])
                         for t, h in ((query, heads), (key, kv_heads), (value, kv_heads)))
    head_dim = query.shape[-1]
    scale = (1.0 / math.sqrt(head_dim) if head_dim else 1.0) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    # One seed per call whichever backend runs, so that torch.manual_seed gives every backend the same mask.
    seed = dropout_seed(dropout_p)
    preference = None
    if query.device.type == "cuda":
        # A CUDA tensor's device always names its index.
        preference = _cuda_preference(query.device.index, str(query.dtype).removeprefix("torch."), head_dim,
                                      bool(is_causal), key.shape[-2])
    backend = backends.select(query.device, lambda name: _kernel_supports(name, query, key, value, attn_mask),
                              preference)
    with autocast_disabled(query.device.type):
        if backend != "reference":
            return _kernel_attention(_OPS[backend], query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
        dropout_keep = None
        if dropout_p > 0.0:
            batch = math.prod(batch_shape)
            dropout_keep = attention_dropout_keep(seed, batch, query.shape[-3], query.shape[-2], key.shape[-2],
                                                  dropout_p, query.device).view(*query.shape[:-1], key.shape[-2])
        return _reference(query, key, value, attn_mask, dropout_keep, dropout_p, is_causal, scale)


def _kernel_attention(fwd_op, query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    """Runs a kernel backend on the (B, H, L, D) views of the inputs (batch dims flattened, strides kept)."""
    *batch_shape, heads, lq, _ = query.shape
    lk = key.shape[-2]
    batch = math.prod(batch_shape)
    q, k, v = (t if t.dim() == 4 else t.reshape(batch, *t.shape[-3:]) for t in (query, key, value))
    mask = None
    if attn_mask is not None:  # a broadcast view: size-1 dims become zero strides, nothing is copied
        mask = attn_mask.expand(*batch_shape, heads, lq, lk).reshape(batch, heads, lq, lk)
    out, _lse = fwd_op(q, k, v, mask, bool(is_causal), scale, dropout_p, seed)
    # (B, H, Lq, Dv) back to the batch dims: only where they were flattened (a view is a node in the autograd graph).
    return out if query.dim() == 4 else out.view(*batch_shape, heads, lq, value.shape[-1])
