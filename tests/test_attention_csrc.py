"""The csrc CPU attention kernels (csrc/cpu/attention.cpp) called directly, against a float64 reference.

What the op-level matrix in test_attention.py cannot see from above: the kernel's own layout contract (any
strides, masks broadcast by zero strides), causal masking together with a mask, the very dropout mask the kernel
drew (recovered exactly from its output), deterministic gradients, and the C++ argument checks.
"""

import contextlib
import math

import pytest
import torch

import fastgpt
from fastgpt.ops.philox import attention_dropout_keep
from tests.test_attention import reference_attention
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not fastgpt.backends.CSRC_LOADED,
                                reason="the C++ extension fastgpt._C is not built")


def _ops():
    return torch.ops.fastgpt.attention_fwd, torch.ops.fastgpt.attention_bwd


def _inputs(B, H, Hk, Lq, Lk, D, Dv, dtype, packed=False):
    """q, k, v, grad_out; packed: (B, L, H, D) storage seen as (B, H, L, D), as a fused QKV projection gives."""
    def make(h, n, d):
        x = torch.randn(B, n, h, d).transpose(1, 2) if packed else torch.randn(B, h, n, d)
        return x.to(dtype)
    return make(H, Lq, D), make(Hk, Lk, D), make(Hk, Lk, Dv), make(H, Lq, Dv)


def _mask(kind, B, H, Lq, Lk, dtype):
    if kind == "key_padding":  # (B, 1, 1, Lk) expanded: zero strides, read in place
        lengths = torch.randint(1, Lk + 1, (B,))
        return (torch.arange(Lk) < lengths[:, None]).view(B, 1, 1, Lk).expand(B, H, Lq, Lk)
    if kind == "bool":
        return torch.rand(B, H, Lq, Lk) > 0.3
    if kind == "additive":
        return torch.randn(B, 1, Lq, Lk).to(dtype).expand(B, H, Lq, Lk)
    return None


def _check(q, k, v, grad_out, mask, is_causal, scale, dropout_p=0.0, seed=0):
    """Kernel output and gradients vs float64, within 2x PyTorch's own error in q's dtype (tests/utils)."""
    fwd, bwd = _ops()
    seed_t = torch.tensor(seed, dtype=torch.int64)
    out, lse = fwd(q, k, v, mask, is_causal, scale, dropout_p, seed_t)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed_t)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = attention_dropout_keep(seed, B, H, Lq, Lk, dropout_p) if dropout_p > 0 else None
    results = {}
    for name, cast in (("float64", torch.float64), ("torch", q.dtype)):
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(cast)
        o = reference_attention(*leaves, m, is_causal, keep, dropout_p, scale)
        o.backward(grad_out.to(cast))
        results[name] = (o.detach(), *(x.grad for x in leaves))
    for name, got, expected, own in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), results["float64"],
                                        results["torch"]):
        assert_close(name, got, expected, own)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    return out, lse, (dq, dk, dv)


@contextlib.contextmanager
def _dq_pass(name):
    """The backward computes dQ inside the dK/dV pass when there are at least 4 (b, kv head) pairs a thread, else in
    a pass of its own: for B * Hk = 4, 1 thread picks the first ("fused"), 8 the second ("separate")."""
    threads = torch.get_num_threads()
    torch.set_num_threads({"fused": 1, "separate": 8}[name])
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["fused", "separate"])
def dq_pass(request):
    with _dq_pass(request.param):
        yield request.param


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", [None, "key_padding", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_causal_dtypes_gqa_strided(dtype, kind, is_causal, dq_pass):
    B, H, Hk, Lq, Lk, D = 2, 4, 2, 113, 203, 64
    q, k, v, do = _inputs(B, H, Hk, Lq, Lk, D, D, dtype, packed=True)
    _check(q, k, v, do, _mask(kind, B, H, Lq, Lk, dtype), is_causal, D ** -0.5)


@pytest.mark.parametrize("Lq, Lk", [(1, 1), (17, 17), (97, 97), (128, 128), (256, 128), (1, 97), (97, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lengths_odd_head_dims(dtype, Lq, Lk):
    """Odd lengths and odd head dims: bfloat16's products take pairs along k, so every odd extent is padded."""
    q, k, v, do = _inputs(1, 2, 1, Lq, Lk, 33, 47, dtype)
    _check(q, k, v, do, None, Lq != 128, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_strides(dtype):
    """No dimension of stride 1: every operand is gathered element by element."""
    B, H, Lq, Lk, D = 2, 2, 45, 70, 24
    q, k, v, do = (torch.randn(B, H, n, 2 * D).to(dtype)[..., ::2] for n in (Lq, Lk, Lk, Lq))
    _check(q, k, v, do, _mask("key_padding", B, H, Lq, Lk, dtype), True, D ** -0.5)


@pytest.mark.parametrize("D", [16, 32, 80, 96, 128, 256])
def test_head_dims(D):
    q, k, v, do = _inputs(1, 2, 2, 70, 90, D, D, torch.bfloat16)
    _check(q, k, v, do, _mask("key_padding", 1, 2, 70, 90, torch.bfloat16), D % 64 == 0, D ** -0.5)


def test_long_sequence():
    q, k, v, do = _inputs(1, 1, 1, 1023, 1024, 64, 64, torch.float32)
    _check(q, k, v, do, None, True, 0.125)


def test_fully_masked_rows_give_zero():
    B, H, Lq, Lk = 2, 2, 40, 50
    q, k, v, do = _inputs(B, H, H, Lq, Lk, 32, 32, torch.float32)
    mask = torch.rand(B, H, Lq, Lk) > 0.5
    mask[:, :, 3] = False
    mask[1] = False  # batch 1 sees nothing at all
    out, lse, grads = _check(q, k, v, do, mask, False, 0.2)
    assert out[:, :, 3].abs().max() == 0 and out[1].abs().max() == 0
    assert torch.isneginf(lse[:, :, 3]).all() and torch.isneginf(lse[1]).all()
    assert grads[0][:, :, 3].abs().max() == 0 and grads[1][1].abs().max() == 0 and grads[2][1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_mask(dtype):
    B, H, Hk, Lq, Lk = 2, 4, 2, 97, 113
    q, k, v, do = _inputs(B, H, Hk, Lq, Lk, 64, 64, dtype)
    _check(q, k, v, do, _mask("key_padding", B, H, Lq, Lk, dtype), True, 0.125, dropout_p=0.3, seed=2**40 + 7)


def test_dropout_mask_bits_and_rate():
    """With q = 0 every probability is 1/Lk and v = I makes out[i, j] = keep[i, j] / ((1 - p) Lk): the kernel's
    own mask, recovered exactly, equals the Philox reference and drops a fraction p within a binomial bound."""
    B, H, Lq, Lk, p, seed = 2, 3, 64, 96, 0.25, 123456789
    q = torch.zeros(B, H, Lq, 16)
    k = torch.randn(B, H, Lk, 16)
    v = torch.eye(Lk).expand(B, H, Lk, Lk)
    out, _ = _ops()[0](q, k, v, None, False, 1.0, p, torch.tensor(seed))
    kept = out * ((1 - p) * Lk)
    assert torch.allclose(kept, kept.round(), atol=1e-4)
    keep = kept.round().bool()
    assert torch.equal(keep, attention_dropout_keep(seed, B, H, Lq, Lk, p))
    n = keep.numel()
    dropped = n - keep.sum().item()
    assert abs(dropped - p * n) <= 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dq_in_the_dk_dv_pass_equals_its_own_pass(dtype):
    """Both ways of computing dQ sum the same products in the same order: bit for bit the same gradients."""
    q, k, v, do = _inputs(2, 6, 2, 150, 130, 40, 40, dtype)
    fwd, bwd = _ops()
    seed = torch.tensor(9)
    out, lse = fwd(q, k, v, None, True, 0.2, 0.1, seed)
    with _dq_pass("fused"):
        fused = bwd(do, q, k, v, out, lse, None, True, 0.2, 0.1, seed)
    with _dq_pass("separate"):
        separate = bwd(do, q, k, v, out, lse, None, True, 0.2, 0.1, seed)
    for a, b in zip(fused, separate):
        assert torch.equal(a, b)


def test_gradients_are_deterministic():
    q, k, v, do = _inputs(2, 6, 2, 150, 130, 32, 32, torch.float32)
    fwd, bwd = _ops()
    seed = torch.tensor(5)
    out, lse = fwd(q, k, v, None, True, 0.2, 0.1, seed)
    first = bwd(do, q, k, v, out, lse, None, True, 0.2, 0.1, seed)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, bwd(do, q, k, v, out, lse, None, True, 0.2, 0.1, seed)))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(k=a["k"][:, :, :, :8]), "head dim"),
    (lambda a: a.update(q=a["q"][:, :3]), "multiple of k's heads"),
    (lambda a: a.update(v=a["v"].half()), "k and v of q's dtype"),
    (lambda a: a.update(mask=torch.ones(2, 4, 5, 7, dtype=torch.bool)), "attn_mask of shape"),
    (lambda a: a.update(mask=torch.ones(2, 4, 9, 11, dtype=torch.int32)), "attn_mask of dtype"),
    (lambda a: a.update(p=1.0), "dropout_p in [0, 1)"),
    (lambda a: a.update(q=a["q"][0]), "expected q of shape"),
])
def test_cpp_checks_name_the_argument(change, message):
    args = dict(q=torch.randn(2, 4, 9, 16), k=torch.randn(2, 2, 11, 16), v=torch.randn(2, 2, 11, 16), mask=None,
                p=0.0)
    change(args)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _ops()[0](args["q"], args["k"], args["v"], args["mask"], False, 0.25, args["p"], torch.tensor(0))


# --- through fastgpt.ops: the custom ops' schema, fake, autograd, torch.compile, and agreement with reference --

def test_opcheck():
    fwd, bwd = _ops()
    q, k, v, do = _inputs(2, 4, 2, 19, 23, 16, 8, torch.float32)
    mask = _mask("key_padding", 2, 4, 19, 23, torch.float32)
    seed = torch.tensor(11)
    torch.library.opcheck(fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, False, 0.25, 0.2,
                                seed))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), mask, False, 0.25, 0.2, seed)
    torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), out, lse, mask, False, 0.25, 0.2, seed))


def _sdpa(backend, *args, **kwargs):
    with fastgpt.use_backend(backend):
        return fastgpt.ops.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_op_matches_reference_backend(dropout_p):
    """Batch dims (2, 3), GQA, a key-padding mask broadcast from (2, 1, 1, 1, Lk): csrc and reference agree,
    dropout included (the same seed drawn from torch's generator gives the same mask)."""
    Lq, Lk = 33, 41
    leaves = [torch.randn(2, 3, h, n, 16, requires_grad=True) for h, n in ((4, Lq), (2, Lk), (2, Lk))]
    mask = torch.arange(Lk) < torch.tensor([[5], [Lk]]).view(2, 1, 1, 1, 1)
    results = []
    for backend in ("csrc", "reference"):
        torch.manual_seed(7)
        out = _sdpa(backend, *leaves, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(x.grad for x in leaves)))
        for x in leaves:
            x.grad = None
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    q, k, v, _ = _inputs(1, 2, 2, 24, 24, 16, 16, torch.float32)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    expected = _sdpa("reference", *leaves, is_causal=True)
    with fastgpt.use_backend("csrc"):
        compiled = torch.compile(lambda *a: fastgpt.ops.scaled_dot_product_attention(*a, is_causal=True),
                                 fullgraph=True)(*leaves)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, expected)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_unsupported_inputs_fall_back_to_reference():
    """float64, and an additive mask that wants its own gradient, are not the kernel's: reference answers."""
    q, k, v, _ = _inputs(1, 2, 2, 9, 11, 16, 16, torch.float64)
    torch.testing.assert_close(_sdpa("csrc", q, k, v), _sdpa("reference", q, k, v))
    q, k, v = (x.float() for x in (q, k, v))
    mask = torch.randn(1, 2, 9, 11, requires_grad=True)
    _sdpa("csrc", q, k, v, attn_mask=mask).sum().backward()
    assert mask.grad is not None
