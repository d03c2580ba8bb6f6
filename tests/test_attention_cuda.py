"""The CUDA tensor-core attention kernels (csrc/cuda/attention*.cu[h]) called directly, against float64.

torch.ops.fastgpt.attention_fwd / attention_bwd on a GPU over the attention issue's matrix: lengths (odd, Lq != Lk,
2048+), head dims 64 and 128, causal (top-left aligned), key-padding / full boolean / additive masks, GQA, fp16
and bf16, strided (packed QKV) inputs; dropout against the very mask fastgpt.ops.philox draws for the seed (the
Triton kernel's), fully masked rows, determinism, and the argument checks. Each result must be within 2x of
PyTorch's own same-dtype error (tests/utils.py). On a Hopper GPU every test runs twice, with the kernels' matrix
products as wgmma (FASTGPT_CUDA_WGMMA=auto, the default there) and as mma.sync (off). Skipped, with the
reason, without a GPU or a CUDA build.

On a GPU, also under compute-sanitizer (each should report 0 errors):
    compute-sanitizer --tool memcheck  python -m pytest -q -x tests/test_attention_cuda.py -k "test_masks_gqa_strided and key_padding and float16"
    compute-sanitizer --tool racecheck python -m pytest -q -x tests/test_attention_cuda.py -k "test_lengths_head_dims_causal and 113 and True and bfloat16"
    compute-sanitizer --tool synccheck python -m pytest -q -x tests/test_attention_cuda.py -k "test_dropout and causal and float16"
    compute-sanitizer --tool initcheck python -m pytest -q -x tests/test_attention_cuda.py -k test_empty_sequences
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import backends
from fastgpt.ops.philox import attention_dropout_keep
from tests.test_attention import reference_attention
from tests.utils import assert_close

CUDA_ATTENTION = (torch.cuda.is_available() and backends.CSRC_LOADED
                  and torch._C._dispatch_has_kernel_for_dispatch_key("fastgpt::attention_fwd", "CUDA"))
pytestmark = pytest.mark.skipif(
    not CUDA_ATTENTION, reason="needs a CUDA GPU and fastgpt._C built with its CUDA kernels (csrc/cuda/attention.cu)")

DTYPES = [torch.float16, torch.bfloat16]
# The kernels' products: wgmma on compute capability 9.x unless FASTGPT_CUDA_WGMMA=off; mma.sync elsewhere.
PRODUCTS = ["auto", "off"] if CUDA_ATTENTION and torch.cuda.get_device_capability()[0] == 9 else ["auto"]
MASKS = [None, "key_padding", "bool", "additive"]


@pytest.fixture(autouse=True, params=PRODUCTS, ids=lambda policy: f"FASTGPT_CUDA_WGMMA={policy}")
def products(request, monkeypatch):
    monkeypatch.setenv("FASTGPT_CUDA_WGMMA", request.param)


def _inputs(B, H, Hk, Lq, Lk, D, dtype, packed=False):
    """q, k, v, grad_out on the GPU; packed: (B, L, H, D) storage seen as (B, H, L, D), as a fused QKV gives."""
    def make(h, n):
        x = torch.randn(B, n, h, D, device="cuda").transpose(1, 2) if packed else torch.randn(B, h, n, D, device="cuda")
        return x.to(dtype)
    return make(H, Lq), make(Hk, Lk), make(Hk, Lk), make(H, Lq)


def _mask(kind, B, H, Lq, Lk, dtype):
    if kind == "key_padding":  # (B, 1, 1, Lk): the fast path, broadcast by zero strides
        lengths = torch.randint(1, Lk + 1, (B,), device="cuda")
        return (torch.arange(Lk, device="cuda") < lengths[:, None]).view(B, 1, 1, Lk)
    if kind == "bool":
        return torch.rand(B, H, Lq, Lk, device="cuda") > 0.3
    if kind == "additive":
        return torch.randn(B, 1, Lq, Lk, device="cuda").to(dtype)
    return None


def _run(q, k, v, grad_out, mask, is_causal, scale, dropout_p=0.0, seed=0):
    seed_t = torch.tensor(seed, dtype=torch.int64)
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, is_causal, scale, dropout_p, seed_t)
    dq, dk, dv = torch.ops.fastgpt.attention_bwd(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p,
                                                  seed_t)
    return out, lse, dq, dk, dv


def _check(q, k, v, grad_out, mask, is_causal, scale, dropout_p=0.0, seed=0):
    """Kernel output and gradients vs float64, within 2x PyTorch's own error in q's dtype."""
    out, lse, dq, dk, dv = _run(q, k, v, grad_out, mask, is_causal, scale, dropout_p, seed)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = None
    if dropout_p > 0:
        keep = attention_dropout_keep(seed, B, H, Lq, Lk, dropout_p, device="cuda")
    results = {}
    for name, cast in (("float64", torch.float64), ("torch", q.dtype)):
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(cast)
        if name == "torch" and keep is None and mask is None:  # PyTorch's own kernel sets the bar
            o = F.scaled_dot_product_attention(*leaves, is_causal=is_causal, scale=scale,
                                               enable_gqa=H != k.shape[1])
        else:
            o = reference_attention(*leaves, m, is_causal, keep, dropout_p, scale)
        o.backward(grad_out.to(cast))
        results[name] = (o.detach(), *(x.grad for x in leaves))
    for name, got, expected, own in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), results["float64"],
                                        results["torch"]):
        assert_close(name, got, expected, own)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    return out, lse, (dq, dk, dv)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (17, 17), (97, 97), (128, 128), (113, 203), (203, 113), (256, 128),
                                   (1023, 1024), (2048, 2048), (1, 97), (97, 1)], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lengths_head_dims_causal(dtype, is_causal, D, Lq, Lk):
    q, k, v, do = _inputs(2, 3, 3, Lq, Lk, D, dtype)
    _check(q, k, v, do, None, is_causal, D ** -0.5)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_gqa_strided(dtype, D, kind):
    B, H, Hk, Lq, Lk = 2, 4, 2, 113, 203
    q, k, v, do = _inputs(B, H, Hk, Lq, Lk, D, dtype, packed=True)
    _check(q, k, v, do, _mask(kind, B, H, Lq, Lk, dtype), False, D ** -0.5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_causal_long(dtype, is_causal):
    q, k, v, do = _inputs(1, 8, 2, 1023, 1100, 128, dtype)
    _check(q, k, v, do, None, is_causal, 0.1)


def test_fully_masked_rows_give_zero():
    B, H, Lq, Lk, D = 2, 2, 40, 70, 64
    q, k, v, do = _inputs(B, H, H, Lq, Lk, D, torch.float16)
    mask = torch.rand(B, H, Lq, Lk, device="cuda") > 0.5
    mask[:, :, 3] = False
    mask[1] = False  # batch 1 sees nothing at all
    out, lse, (dq, dk, dv) = _check(q, k, v, do, mask, False, 0.2)
    assert out[:, :, 3].abs().max() == 0 and out[1].abs().max() == 0
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isneginf(lse[1]).all()
    assert dq[:, :, 3].abs().max() == 0 and dq[1].abs().max() == 0
    assert dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    additive = torch.zeros(B, 1, Lq, Lk, device="cuda", dtype=torch.float16)
    additive[:, :, 5] = -math.inf  # an additive mask can hide a whole row too
    out, _, (dq, _, _) = _check(q, k, v, do, additive, False, 0.2)
    assert out[:, :, 5].abs().max() == 0 and dq[:, :, 5].abs().max() == 0


@pytest.mark.parametrize("kind", [None, "key_padding", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_shared_philox_mask(dtype, kind):
    """The kernel drops exactly the elements fastgpt.ops.philox (and so the Triton kernel) drops for the seed."""
    B, H, Hk, Lq, Lk, D, p = 2, 4, 2, 97, 203, 64, 0.3
    q, k, v, do = _inputs(B, H, Hk, Lq, Lk, D, dtype)
    mask = _mask(kind, B, H, Lq, Lk, dtype) if kind != "causal" else None
    seed = (1 << 40) + 12345  # both Philox key words non-zero
    _check(q, k, v, do, mask, kind == "causal", D ** -0.5, p, seed)
    # The fraction of dropped probabilities is p within a binomial bound (on the shared mask the check used).
    kept = attention_dropout_keep(seed, B, H, Lq, Lk, p, device="cuda").float().mean().item()
    n = B * H * Lq * Lk
    assert abs((1 - kept) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_any_layout():
    """Operands whose rows cannot be copied as 16-byte vectors (last dim strided, odd offsets) give the same
    result as contiguous ones: the launcher copies them first."""
    q, k, v, do = _inputs(1, 2, 2, 37, 45, 64, torch.float16)
    expected = _run(q, k, v, do, None, True, 0.125)
    odd = [torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape).copy_(t) for t in (q, k)]
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (v, do)]
    got = _run(*odd, *strided, None, True, 0.125)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_deterministic():
    q, k, v, do = _inputs(2, 4, 2, 300, 333, 64, torch.bfloat16)
    first = _run(q, k, v, do, None, True, 0.125, 0.1, 7)
    second = _run(q, k, v, do, None, True, 0.125, 0.1, 7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_sequences():
    q, k, v, do = _inputs(1, 2, 2, 0, 5, 64, torch.float16)
    out, lse, dq, dk, dv = _run(q, k, v, do, None, False, 0.125)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0) and dk.abs().max() == 0 and dv.abs().max() == 0
    q, k, v, do = _inputs(1, 2, 2, 5, 0, 64, torch.float16)
    out, lse, dq, dk, dv = _run(q, k, v, do, None, False, 0.125)
    assert out.abs().max() == 0 and torch.isneginf(lse).all() and dq.abs().max() == 0 and dk.shape == (1, 2, 0, 64)


@pytest.mark.parametrize("change,message", [
    (lambda t: {**t, "q": t["q"].float(), "k": t["k"].float(), "v": t["v"].float()}, "float16 or bfloat16"),
    (lambda t: {**t, "v": t["v"][..., :32].contiguous()}, "v's head dim"),
    (lambda t: {**t, "q": t["q"][..., :48].contiguous(), "k": t["k"][..., :48].contiguous(),
                "v": t["v"][..., :48].contiguous()}, "head dim 64 or 128"),
    (lambda t: {**t, "k": t["k"][:, :3], "v": t["v"][:, :3]}, "multiple of k's"),
    (lambda t: {**t, "mask": torch.ones(1, 1, 1, 9, dtype=torch.int32, device="cuda")}, "attn_mask of dtype"),
    (lambda t: {**t, "mask": torch.ones(1, 1, 8, 10, dtype=torch.bool, device="cuda")}, "attn_mask broadcastable"),
    (lambda t: {**t, "seed": torch.tensor(0, dtype=torch.int64, device="cuda")}, "seed"),
])
def test_argument_checks(change, message):
    q, k, v, _ = _inputs(1, 4, 4, 8, 9, 64, torch.float16)
    t = change({"q": q, "k": k, "v": v, "mask": None, "seed": torch.tensor(0, dtype=torch.int64)})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.attention_fwd(t["q"], t["k"], t["v"], t["mask"], False, 0.125, 0.0, t["seed"])


def test_wgmma_policy_checked(monkeypatch):
    """A FASTGPT_CUDA_WGMMA other than auto or off is an error naming the variable, on any GPU."""
    monkeypatch.setenv("FASTGPT_CUDA_WGMMA", "on")
    q, k, v, _ = _inputs(1, 2, 2, 8, 9, 64, torch.float16)
    with pytest.raises(RuntimeError, match="FASTGPT_CUDA_WGMMA to be auto or off, got 'on'"):
        torch.ops.fastgpt.attention_fwd(q, k, v, None, False, 0.125, 0.0, torch.tensor(0, dtype=torch.int64))
