"""Fused attention kernels against a float64 reference (Triton kernels through the interpreter on CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from fastgpt.ops.philox import attention_dropout_keep
from kernels.attention import HEAD_DIMS, attention_backward, attention_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, keep=None, dropout_p=0.0):
    """softmax(q k^T * scale + mask) (dropout) v in the inputs' dtype; fully masked rows give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if is_causal:
        above = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max).detach()
    e = (s - row_max).exp()
    denom = e.sum(-1, keepdim=True)
    w = e / torch.where(denom == 0, 1.0, denom)
    if keep is not None:
        w = w * keep / (1 - dropout_p)
    return w @ v


def _forward_backward(fn, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, dropout_p, seed):
        out, lse = attention_forward(q, k, v, attn_mask, is_causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (attn_mask, is_causal, scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(grad_out, q, k, v, out, lse, *ctx.args), None, None, None, None, None)


def _triton(attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, seed=0):
    def fn(q, k, v):
        s = q.shape[-1] ** -0.5 if scale is None else scale
        return _TritonAttention.apply(q, k, v, attn_mask, is_causal, s, dropout_p, seed)
    return fn


def _inputs(B, H, Hk, Lq, Lk, D, Dv, dtype, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, L, H, D) storage seen as (B, H, L, D): the layout of a fused QKV projection
        make = lambda h, n, d: torch.randn(B, n, h, d, generator=g).transpose(1, 2)  # noqa: E731
    else:
        make = lambda h, n, d: torch.randn(B, h, n, d, generator=g)  # noqa: E731
    q, k, v, do = make(H, Lq, D), make(Hk, Lk, D), make(Hk, Lk, Dv), make(H, Lq, Dv)
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, do)]


def _make_mask(kind, B, H, Lq, Lk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Lk): every batch keeps a prefix of random length >= 1
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        mask = torch.arange(Lk)[None, :] < lengths[:, None]
        return mask.view(B, 1, 1, Lk).to(DEVICE)
    if kind == "bool":
        return (torch.rand(B, H, Lq, Lk, generator=g) > 0.3).to(DEVICE)
    if kind == "additive":
        return torch.randn(B, 1, Lq, Lk, generator=g).to(device=DEVICE, dtype=dtype)
    raise ValueError(kind)


FLOORS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _check(case, dtype, attn_mask=None, is_causal=False, keep=None, dropout_p=0.0, seed=0, shapes=None):
    """Kernel output and gradients within 2x PyTorch's own same-dtype error of float64 (+ a tiny floor)."""
    q, k, v, do = case
    mask64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    ref = _forward_backward(lambda *a: reference_attention(*a, mask64, is_causal, keep=keep, dropout_p=dropout_p),
                            q.double(), k.double(), v.double(), do.double())
    torch_lowp = _forward_backward(lambda *a: reference_attention(*a, attn_mask, is_causal, keep=keep,
                                                                  dropout_p=dropout_p), q, k, v, do)
    got = _forward_backward(_triton(attn_mask, is_causal, dropout_p=dropout_p, seed=seed), q, k, v, do)
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, torch_lowp):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + FLOORS[dtype], f"{name}: error {err:.3g} vs PyTorch {torch_err:.3g}"


SHAPES = [(1, 1), (17, 17), (97, 97), (128, 128), (113, 203), (203, 113), (256, 128), (1, 97)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Lq, Lk", SHAPES)
def test_sequence_lengths(Lq, Lk, is_causal):
    case = _inputs(1, 2, 2, Lq, Lk, 64, 64, torch.float32, seed=Lq * 1000 + Lk)
    _check(case, torch.float32, is_causal=is_causal)


@pytest.mark.parametrize("D, Dv", [(d, d) for d in HEAD_DIMS] + [(64, 32), (80, 128)])
def test_head_dims(D, Dv):
    case = _inputs(1, 2, 1, 37, 75, D, Dv, torch.float16, seed=D)
    _check(case, torch.float16, is_causal=D % 32 == 0)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_masks(kind, is_causal):
    B, H, Hk, Lq, Lk = 2, 2, 1, 113, 97
    case = _inputs(B, H, Hk, Lq, Lk, 32, 32, torch.float32, seed=3)
    _check(case, torch.float32, _make_mask(kind, B, H, Lq, Lk, torch.float32), is_causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind, is_causal", [(None, True), ("key_padding", False), ("additive", True)])
def test_dtypes_gqa_strided(dtype, kind, is_causal):
    B, H, Hk, Lq, Lk = 2, 4, 2, 65, 130
    case = _inputs(B, H, Hk, Lq, Lk, 64, 64, dtype, seed=4, transposed=True)
    _check(case, dtype, _make_mask(kind, B, H, Lq, Lk, dtype), is_causal)


@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_fully_masked_rows(kind):
    B, H, Lq, Lk = 2, 2, 40, 50
    q, k, v, do = _inputs(B, H, H, Lq, Lk, 32, 32, torch.float32, seed=5)
    mask = _make_mask("bool" if kind == "key_padding" else kind, B, H, Lq, Lk, torch.float32)
    if kind == "key_padding":  # batch 1 has no key at all
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=DEVICE)
        mask[1] = False
        dead = (1, slice(None), slice(None))
    elif kind == "bool":
        mask[0, 1, 7] = False
        mask[1, 0, 31:] = False
        dead = (slice(0, 1), 1, 7)
    else:
        mask = mask.expand(B, H, Lq, Lk).clone()
        mask[0, 1, 7] = float("-inf")
        dead = (0, 1, 7)
    out, dq, _, _ = _forward_backward(_triton(mask), q, k, v, do)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    _check((q, k, v, do), torch.float32, mask)


@pytest.mark.parametrize("is_causal, kind", [(False, None), (True, "key_padding")])
def test_dropout(is_causal, kind):
    B, H, Hk, Lq, Lk, p, seed = 2, 2, 1, 64, 64, 0.3, 1234
    q, k, v, do = _inputs(B, H, Hk, Lq, Lk, 32, 32, torch.float32, seed=6)
    mask = _make_mask(kind, B, H, Lq, Lk, torch.float32)
    # v = identity: out[b, h, i, j] = P_ij keep_ij / (1 - p), which exposes the kernel's own mask.
    eye = torch.eye(Lk, device=DEVICE).expand(B, Hk, Lk, Lk)
    out, _ = attention_forward(q, k, eye, mask, is_causal, 32 ** -0.5, p, seed)
    keep = attention_dropout_keep(seed, B, H, Lq, Lk, p, device=DEVICE)
    visible = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=DEVICE)
    if is_causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril()
    if mask is not None:
        visible = visible & mask
    assert torch.equal(out != 0, keep & visible)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5
    # Output and all gradients equal the reference drawn with the very same mask.
    _check((q, k, v, do), torch.float32, mask, is_causal, keep=keep, dropout_p=p, seed=seed)
