"""fastgpt.ops.scaled_dot_product_attention against a float64 reference, every backend.

The Triton kernels run on CPU through the interpreter (tests/conftest.py), so shapes stay small; the matrix
covers every sequence-length case, head dim, mask kind, GQA, dtype, fully masked rows and dropout once.
"""

import pytest
import torch
import torch._inductor.config

import fastgpt
from fastgpt.ops import attention
from fastgpt.ops.attention import scaled_dot_product_attention
from fastgpt.ops.philox import attention_dropout_keep, draw_seed
from tests.utils import DEVICE_BACKENDS, assert_close

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # the list; every kernel backend must take them


def reference_attention(q, k, v, attn_mask=None, is_causal=False, keep=None, dropout_p=0.0, scale=None):
    """softmax(q k^T scale + mask) (dropout) v (scale 1 / sqrt(D) by default), written independently of the op, as
    torch ops compose it in the inputs' dtype: the products in that dtype, the masked softmax in float32 (as
    torch.softmax computes internally; a float16 mask at finfo.min added in float16 would overflow) rounded to it.
    The bar for low precision (PyTorch's own math path on CPU computes everything in float32: tighter). A mask and
    is_causal may come together; a row with every key masked gives 0 and 0 gradients (no NaN on the way)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    e = (s - torch.where(torch.isinf(row_max), 0.0, row_max).detach()).exp()
    denom = e.sum(-1, keepdim=True)
    w = (e / torch.where(denom == 0, 1.0, denom)).to(q.dtype)
    if keep is not None:
        w = w * keep / (1 - dropout_p)
    return w @ v


def _grads(fn, tensors, grad_out):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in tensors]


def _inputs(device, dtype, B, H, Hk, Lq, Lk, D, Dv, transposed=False):
    """Random q, k, v, dO; `transposed` gives (B, L, H, D) storage seen as (B, H, L, D), as a fused QKV does."""
    def make(h, n, d):
        if transposed:
            return torch.randn(B, n, h, d, device=device).transpose(1, 2).to(dtype)
        return torch.randn(B, h, n, d, device=device).to(dtype)
    return make(H, Lq, D), make(Hk, Lk, D), make(Hk, Lk, Dv), make(H, Lq, Dv)


def _mask(kind, device, dtype, B, H, Lq, Lk):
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Lk): each sequence keeps a random-length prefix of >= 1 key
        lengths = torch.randint(1, Lk + 1, (B,), device=device)
        return (torch.arange(Lk, device=device) < lengths[:, None]).view(B, 1, 1, Lk)
    if kind == "bool":
        return torch.rand(B, H, Lq, Lk, device=device) > 0.3
    if kind == "additive":  # broadcast over batch and heads
        return torch.randn(Lq, Lk, device=device).to(dtype)
    raise ValueError(kind)


def _check(device, backend, q, k, v, grad_out, attn_mask=None, is_causal=False, dropout_p=0.0, keep=None,
           kernel=True):
    """Output and gradients of `backend` within 2x PyTorch's own same-dtype error of float64 (tests.utils)."""
    gqa = q.shape[-3] != k.shape[-3]
    if kernel and backend in attention._OPS:  # the kernel must take these inputs, not hand them to reference
        assert attention._kernel_supports(backend, q, k, v, attn_mask)

    def ours(q, k, v):
        return scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa=gqa)

    torch.manual_seed(1234)  # the seed `ours` draws, and so the dropout mask `keep` was made from
    with fastgpt.use_backend(backend):
        got = _grads(ours, (q, k, v), grad_out)
    mask64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    expected = _grads(lambda *a: reference_attention(*a, mask64, is_causal, keep, dropout_p),
                      [t.double() for t in (q, k, v)], grad_out.double())
    same_dtype = _grads(lambda *a: reference_attention(*a, attn_mask, is_causal, keep, dropout_p), (q, k, v),
                        grad_out)
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), got, expected, same_dtype):
        assert_close(name, g, e, t)


SHAPES = [(1, 1), (17, 17), (97, 97), (128, 128), (113, 203), (203, 113), (256, 128), (1, 97)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq,Lk", SHAPES, ids=str)
def test_sequence_lengths(device, backend, Lq, Lk, is_causal):
    _check(device, backend, *_inputs(device, torch.float32, 1, 1, 1, Lq, Lk, 64, 64), is_causal=is_causal)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("D,Dv", [(d, d) for d in HEAD_DIMS] + [(64, 32), (80, 128)], ids=str)
def test_head_dims(device, backend, D, Dv):
    _check(device, backend, *_inputs(device, torch.float16, 1, 2, 1, 37, 75, D, Dv), is_causal=D % 32 == 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_masks(device, backend, kind, kv_heads):
    B, H, Lq, Lk = 2, 2, 57, 97
    _check(device, backend, *_inputs(device, torch.float32, B, H, kv_heads, Lq, Lk, 32, 32),
           _mask(kind, device, torch.float32, B, H, Lq, Lk))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind,is_causal", [(None, True), ("key_padding", False), ("additive", False)], ids=str)
def test_dtypes_gqa_strided(device, backend, dtype, kind, is_causal):
    B, H, Hk, Lq, Lk = 1, 4, 2, 47, 97
    _check(device, backend, *_inputs(device, dtype, B, H, Hk, Lq, Lk, 64, 64, transposed=True),
           _mask(kind, device, dtype, B, H, Lq, Lk), is_causal)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_mask_with_16bit_inputs(device, backend, dtype):
    """A float32 additive mask with float16/bfloat16 inputs, which PyTorch takes (bool, float32 or the query's
    dtype): its values are added as they are, not rounded to the inputs' dtype (a bias of tens, as ALiBi's, would
    lose tenths in bfloat16). The Triton kernels read it; the C++ ones read the inputs' dtype and hand it on."""
    B, H, Lq, Lk = 2, 2, 37, 61
    q, k, v, grad_out = _inputs(device, dtype, B, H, H, Lq, Lk, 32, 32)
    mask = torch.randn(B, 1, Lq, Lk, device=device) * 30
    _check(device, backend, q, k, v, grad_out, mask, kernel=backend != "csrc")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_large_additive_mask(device, backend):
    """An additive float32 mask of 1e4 and more on the keys the rows attend (a bias, not padding), 100 apart within
    a row: one key takes each row (P = 1), exactly in PyTorch. The backward recomputes P from the saved log-sum-exp
    at scores of 1e4, where a round trip through another log base costs 1e-3 relative (the Triton kernels' dV was
    off by 1.8e-3 here, PyTorch's by 2.4e-7)."""
    q, k, v, grad_out = _inputs(device, torch.float32, 2, 3, 3, 5, 7, 16, 16)
    mask = 1e4 + 100 * torch.rand(2, 3, 5, 7, device=device).argsort(-1).float()
    _check(device, backend, q, k, v, grad_out, mask)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("q_shape,kv_shape", [((2, 3, 17), (2, 1, 29)), ((2, 1, 17), (2, 3, 29)),
                                              ((1, 17), (3, 29))], ids=str)
def test_heads_broadcast(device, backend, q_shape, kv_shape):
    """Without enable_gqa a head dim of 1 broadcasts against the other's, as in PyTorch: one key/value head for
    every query head, one query head against several, a (1, L, D) query against (B, L, D) keys and values; the
    gradients summed over the broadcast."""
    D = 32
    q = torch.randn(*q_shape, D, device=device)
    k, v = (torch.randn(*kv_shape, D, device=device) for _ in range(2))
    grad_out = torch.randn(*torch.broadcast_shapes(q_shape[:-1], kv_shape[:-1]), q_shape[-1], D, device=device)
    attend = torch.nn.functional.scaled_dot_product_attention
    with fastgpt.use_backend(backend):
        got = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)
    expected = _grads(lambda q, k, v: attend(q, k, v, is_causal=True), [t.double() for t in (q, k, v)],
                      grad_out.double())
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_fully_masked_rows(device, backend, kind):
    """A query row that sees no key gives 0 and 0 gradients, never NaN (as PyTorch does)."""
    B, H, Lq, Lk = 2, 2, 40, 50
    q, k, v, grad_out = _inputs(device, torch.float32, B, H, H, Lq, Lk, 32, 32)
    if kind == "key_padding":  # sequence 1 has no key at all
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=device)
        mask[1] = False
        dead = (1,)
    elif kind == "bool":
        mask = _mask("bool", device, torch.float32, B, H, Lq, Lk)
        mask[0, 1, 7] = False
        mask[1, 0, 31:] = False
        dead = (0, 1, 7)
    else:
        mask = torch.randn(B, H, Lq, Lk, device=device)
        mask[0, 1, 7] = float("-inf")
        dead = (0, 1, 7)
    with fastgpt.use_backend(backend):
        out, dq, _, _ = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask), (q, k, v), grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    _check(device, backend, q, k, v, grad_out, mask)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_in_additive_mask_reaches_its_row(device, backend):
    """A NaN in an additive mask makes its query row NaN, as in PyTorch (the kernels' floor for huge negative masks
    must not hide it); the other rows are unaffected."""
    q, k, v, _ = _inputs(device, torch.float32, 1, 2, 2, 9, 11, 32, 32)
    mask = torch.randn(1, 2, 9, 11, device=device)
    mask[0, 1, 4, 6] = float("nan")
    with fastgpt.use_backend(backend):
        out = scaled_dot_product_attention(q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    assert out[0, 1, 4].isnan().all() and expected[0, 1, 4].isnan().all()
    out[0, 1, 4] = expected[0, 1, 4] = 0.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_additive_mask_at_dtype_min(device, backend, dtype):
    """Hugging Face's masks hold torch.finfo(dtype).min, not -inf, where a key is hidden. In float32 and bfloat16 a
    query row hidden entirely that way averages every value (its scores all round to the same number), as PyTorch
    computes: the kernels' scaling of the mask to the log2 domain must not overflow to -inf and make it a fully
    masked row. float16's minimum (-65504) only shifts such a row's scores, and it attends as usual; added in
    float16, it would overflow (the reference backend computes in float32).

    Such a row's gradient is exact when its output gradient is 0, as for the padding positions these masks hide
    (the loss ignores them). Otherwise it is what PyTorch's own fused kernels give, not its math path: the row's
    log-sum-exp, m + log(Lk) with m near -3.4e38, rounds to m, so the backward pass sees probabilities of 1, not
    1/Lk (documented in fastgpt.ops.attention)."""
    B, H, Lq, Lk = 2, 2, 40, 50
    q, k, v, grad_out = _inputs(device, dtype, B, H, H, Lq, Lk, 32, 32)
    mask = torch.zeros(B, 1, Lq, Lk, dtype=dtype, device=device)
    mask[1, ..., 23:] = torch.finfo(dtype).min  # sequence 1 is 23 keys long
    mask[0, 0, 7] = torch.finfo(dtype).min      # query 7 of sequence 0 sees no key: a padding position
    grad_out[0, :, 7] = 0
    with fastgpt.use_backend(backend):
        out = scaled_dot_product_attention(q, k, v, mask)
    if dtype != torch.float16:
        torch.testing.assert_close(out[0, :, 7].float(), v[0].float().mean(-2), atol=2e-2, rtol=0)
    _check(device, backend, q, k, v, grad_out, mask)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("is_causal,kind", [(False, None), (False, "key_padding"), (True, None)], ids=str)
def test_dropout(device, backend, is_causal, kind):
    B, H, Hk, Lq, Lk, p = 2, 2, 1, 64, 64, 0.3
    q, k, v, grad_out = _inputs(device, torch.float32, B, H, Hk, Lq, Lk, 32, 32)
    mask = _mask(kind, device, torch.float32, B, H, Lq, Lk)
    torch.manual_seed(1234)
    keep = attention_dropout_keep(draw_seed(), B, H, Lq, Lk, p, device)
    # With v = identity, out[b, h, i, j] = P_ij keep_ij / (1 - p): the mask the backend really used.
    eye = torch.eye(Lk, device=device).expand(B, Hk, Lk, Lk)
    torch.manual_seed(1234)
    with fastgpt.use_backend(backend):
        probs = scaled_dot_product_attention(q, k, eye, mask, p, is_causal, enable_gqa=True)
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if is_causal:
        visible = visible.tril()
    if mask is not None:
        visible = visible & mask
    assert torch.equal(probs != 0, keep & visible)
    # The kept fraction is 1 - p within 5 binomial standard deviations.
    assert abs(keep.double().mean().item() - (1 - p)) <= 5 * (p * (1 - p) / keep.numel()) ** 0.5
    # Output and gradients equal the reference computed with that very mask.
    _check(device, backend, q, k, v, grad_out, mask, is_causal, p, keep)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=str)
def test_batch_dims(device, backend, batch_shape):
    """(H, L, D) and (b1, b2, H, L, D) inputs; a mask that broadcasts over some batch dims only."""
    H, Lq, Lk, D = 2, 19, 23, 32
    q, k, v, grad_out = (torch.randn(*batch_shape, H, n, D, device=device) for n in (Lq, Lk, Lk, Lq))
    mask = torch.rand(*batch_shape[:1], *([1] * len(batch_shape[1:])), 1, Lq, Lk, device=device) > 0.2
    _check(device, backend, q, k, v, grad_out, mask)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("q_batch,kv_batch", [((2, 3), (1, 3)), ((1,), (2,))], ids=str)
def test_batch_dims_broadcast(device, backend, q_batch, kv_batch):
    """Batch dims broadcast between query and key/value, as in PyTorch; gradients summed over the broadcast."""
    H, Lq, Lk, D = 2, 19, 23, 32
    batch = torch.broadcast_shapes(q_batch, kv_batch)
    q, k, v = (torch.randn(*b, H, n, D, device=device) for b, n in ((q_batch, Lq), (kv_batch, Lk), (kv_batch, Lk)))
    _check(device, backend, q, k, v, torch.randn(*batch, H, Lq, D, device=device), is_causal=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_two_dim_inputs(device, backend):
    """(L, D) query, key and value: one head, as PyTorch takes them."""
    q, k, v, grad_out = (torch.randn(n, d, device=device) for n, d in ((17, 32), (29, 32), (29, 16), (17, 16)))
    with fastgpt.use_backend(backend):
        got = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)
    expected = _grads(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                      [t.double() for t in (q, k, v)], grad_out.double())
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_casts_like_torch(device, backend):
    """Under bf16 autocast, float32 query, key, value and float mask are cast to bf16 as PyTorch's SDPA casts them,
    whichever backend runs (and mixed float32/bf16 inputs are accepted): a bf16 output within 2x PyTorch's own
    autocast error of float64, and float32 gradients for the float32 leaves."""
    q, k, v, grad_out = _inputs(device, torch.float32, 2, 2, 2, 17, 33, 32, 32)
    mask = torch.randn(17, 33, device=device)

    def run(fn, q, k, v, mask):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(leaves[0].to(torch.bfloat16), *leaves[1:], attn_mask=mask)
        out.backward(grad_out.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    with fastgpt.use_backend(backend):
        got = run(scaled_dot_product_attention, q, k, v, mask)
    torch_result = run(torch.nn.functional.scaled_dot_product_attention, q, k, v, mask)
    expected = _grads(lambda q, k, v: reference_attention(q, k, v, mask.double()), [t.double() for t in (q, k, v)],
                      grad_out.double())
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), got, expected, torch_result):
        assert_close(name, g, e, t)


def test_meta_tensors_give_shapes():
    """On meta tensors (deferred initialisation, shape inference) the op gives the result's shape, autocast or not."""
    q, kv = torch.empty(2, 3, 5, 32, device="meta"), torch.empty(2, 3, 7, 32, device="meta")
    assert scaled_dot_product_attention(q, kv, kv).shape == (2, 3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scaled_dot_product_attention(q, kv, kv, is_causal=True).shape == (2, 3, 5, 32)


def test_triton_grids_keep_within_cuda_limits(monkeypatch):
    """CUDA grids stop at 65535 programs in dims y and z (launching more fails): every Triton kernel takes its
    (sequence block, batch-head) pairs on dim x, so that a batch of many short sequences (here B * H = 80,001 in
    groups of 3 query heads) launches on a GPU too: one program per pair (the correctness tests check the kernels'
    decoding of the program index)."""
    from fastgpt.kernels import attention as kernels
    B, H, Hk, L, D = 26667, 3, 1, 5, 16
    q = torch.randn(1, 1, L, D, dtype=torch.float16).expand(B, H, L, D)
    kv = torch.randn(1, 1, L, D, dtype=torch.float16).expand(B, Hk, L, D)
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.name, grid, meta))

    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        monkeypatch.setattr(kernels, name, Recorder(name))
    out, lse = kernels.attention_forward(q, kv, kv, None, True, D ** -0.5, 0.0, 0)
    kernels.attention_backward(q, q, kv, kv, out, lse, None, True, D ** -0.5, 0.0, 0)
    assert [name for name, _, _ in launches] == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv",
                                                 "_attn_bwd_dq"]
    tiles = {"BLOCK_M": 4, "BLOCK_N": 2}  # blocks shorter than L: several per head
    for name, grid, meta in launches:
        dims = grid({**meta, **tiles}) if callable(grid) else grid
        block, length, heads = ((tiles["BLOCK_N"], L, B * Hk) if name == "_attn_bwd_dkdv" else
                                (meta.get("BLOCK_M", tiles["BLOCK_M"]), L, B * H))
        assert len(dims) == 1 and dims[0] == -(-length // block) * heads < 2 ** 31, (name, dims)


# --- the Triton kernels' two ways to shared memory: TMA descriptors (Hopper) and pointers ---------------------------

def _nan_padded(t, transposed):
    """`t` (B, H, L, D) as a view into a larger buffer holding NaN in 8 more rows per head after L, stored (B, L, H, D)
    when `transposed` (a fused QKV's layout, whose strides are not ordered by size). A kernel that reads past L
    instead of zero-filling or masking puts NaN into the result."""
    B, H, L, D = t.shape
    if transposed:
        buffer = torch.full((B, L + 8, H, D), float("nan"), dtype=t.dtype, device=t.device)
        view = buffer[:, :L].transpose(1, 2)
    else:
        buffer = torch.full((B, H, L + 8, D), float("nan"), dtype=t.dtype, device=t.device)
        view = buffer[:, :, :L]
    view.copy_(t)
    return view


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_causal,kind,dropout_p,transposed", [(True, None, 0.0, True),
                                                                 (False, "key_padding", 0.25, False)], ids=str)
def test_triton_copy_paths(copy_path, path, dtype, is_causal, kind, dropout_p, transposed):
    """The Triton launchers' forward and backward through the TMA path and the pointer path against float64, on
    grouped heads, lengths no tile divides, and every (B, H, L, D) input followed by NaN rows past L (never read: TMA
    stops at the descriptor's L, the pointer path at its masks)."""
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    copy_path(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, Hk, Lq, Lk, D = 2, 4, 2, 45, 77, 32
    q, k, v, grad_out = _inputs(device, dtype, B, H, Hk, Lq, Lk, D, D)
    mask = _mask(kind, device, dtype, B, H, Lq, Lk)
    seed = 4321
    keep = attention_dropout_keep(torch.tensor(seed), B, H, Lq, Lk, dropout_p, device) if dropout_p else None
    padded = [_nan_padded(t, transposed) for t in (q, k, v, grad_out)]
    out, lse = kernels.attention_forward(*padded[:3], mask, is_causal, D ** -0.5, dropout_p, seed)
    grads = kernels.attention_backward(padded[3], *padded[:3], out, lse, mask, is_causal, D ** -0.5, dropout_p, seed)
    for kernel in (kernels._attn_fwd, kernels._attn_bwd_dkdv, kernels._attn_bwd_dq):
        assert kernel.best_config.kwargs["USE_TMA"] == (path == "tma")
    expected = _grads(lambda *a: reference_attention(*a, mask, is_causal, keep, dropout_p),
                      [t.double() for t in (q, k, v)], grad_out.double())
    same_dtype = _grads(lambda *a: reference_attention(*a, mask, is_causal, keep, dropout_p), (q, k, v), grad_out)
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), (out, *grads), expected, same_dtype):
        assert_close(name, g, e, t)


def test_tma_descriptors(monkeypatch):
    """Which launches get TMA descriptors: 16-bit (B, H, L, D) tensors with head dims 16 to 128 (powers of two),
    unit last strides and 16-byte aligned bases and strides (in any order; a size-1 dim's stride is free), on a GPU
    with TMA (or the CPU interpreter when forced); the descriptors span each tensor as it is."""
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    common = pytest.importorskip("fastgpt.kernels.common")
    x = torch.randn(2, 40, 3, 64, dtype=torch.float16).transpose(1, 2)  # (B, H, L, D) in (B, L, H, D) storage
    monkeypatch.setattr(common, "TMA", "auto")
    assert kernels._descriptors(x)[0] == ("auto" if common.tma_device(x.device) else "off")
    monkeypatch.setattr(common, "TMA", "only")
    policy, (desc,) = kernels._descriptors(x)
    assert policy == "only" and list(desc.shape) == [2, 3, 40, 64] and list(desc.strides) == list(x.stride())
    one = torch.randn(1, 3, 40, 64, dtype=torch.bfloat16)[:, :, :, :].as_strided((1, 3, 40, 64), (7, 2560, 64, 1))
    policy, (desc,) = kernels._descriptors(one)
    assert policy == "only" and desc.strides[1:] == [2560, 64, 1] and desc.strides[0] % 8 == 0
    refused = [x.float(),  # fp32: the pointer path
               torch.randn(2, 3, 40, 80, dtype=torch.float16),  # head dim 80: the box would pass the row's end
               torch.randn(2, 3, 40, 256, dtype=torch.float16),  # head dim 256: its tile class has no TMA configs
               torch.randn(2, 3, 40, 68, dtype=torch.float16)[..., :64],  # rows of 136 bytes
               torch.randn(2, 3, 40, 65, dtype=torch.float16)[..., 1:],  # base 2 bytes past 16-byte alignment
               x[:, :, :0],  # empty
               torch.randn(1, 1, 40, 64, dtype=torch.float16).expand(2, 3, 40, 64)]  # broadcast heads (stride 0)
    for t in refused:
        assert kernels._descriptors(x, t) == ("off", [None, None])
    monkeypatch.setattr(common, "TMA", "off")
    assert kernels._descriptors(x)[0] == "off"
    monkeypatch.setattr(common, "TMA", "of")
    with pytest.raises(ValueError, match="FASTGPT_TRITON_TMA"):
        kernels._descriptors(x)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_unsupported_head_dim_falls_back(device, backend):
    """Head dims outside the kernels' list go to reference, with the same result."""
    q, k, v, grad_out = _inputs(device, torch.float32, 1, 2, 2, 9, 11, 24, 40)
    if backend == "triton":
        assert not attention._kernel_supports(backend, q, k, v, None)
    with fastgpt.use_backend("reference"):
        expected = _grads(scaled_dot_product_attention, (q, k, v), grad_out)
    with fastgpt.use_backend(backend):
        got = _grads(scaled_dot_product_attention, (q, k, v), grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_sequences(device, backend):
    """No queries: an empty result. No keys: zeros (PyTorch's result), and zero gradients for the query. Head dim 0:
    every score 0, so each query averages the values."""
    q, k, v, _ = _inputs(device, torch.float32, 1, 2, 2, 0, 5, 32, 32)
    with fastgpt.use_backend(backend):
        assert scaled_dot_product_attention(q, k, v).shape == (1, 2, 0, 32)
        q, k, v, grad_out = _inputs(device, torch.float32, 1, 2, 2, 3, 0, 32, 16)
        out, dq, dk, dv = _grads(scaled_dot_product_attention, (q, k, v), grad_out)
        assert torch.equal(out, torch.zeros(1, 2, 3, 16, device=device)) and torch.equal(dq, torch.zeros_like(q))
        assert dk.shape == k.shape and dv.shape == v.shape
        q, k, v, _ = _inputs(device, torch.float32, 1, 2, 2, 3, 5, 0, 4)
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v), v.mean(-2, keepdim=True).expand(1, 2, 3, 4))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_no_heads_with_enable_gqa(device, backend):
    """0 query heads over 0 key heads is an empty result with enable_gqa too, as without it and in PyTorch (it was
    refused as 'query's heads (0) must be a multiple of key's (0)'); 0 key heads for some query heads is refused."""
    q, k, v, _ = _inputs(device, torch.float32, 2, 0, 0, 3, 5, 16, 16)
    with fastgpt.use_backend(backend):
        assert scaled_dot_product_attention(q, k, v, enable_gqa=True).shape == (2, 0, 3, 16)
        q, _, _, _ = _inputs(device, torch.float32, 2, 2, 0, 3, 5, 16, 16)
        with pytest.raises(ValueError, match="multiple of key's"):
            scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_numbers_in_any_form(device, backend):
    """dropout_p and scale as PyTorch takes them: a NumPy scalar or a 0-d tensor is the number it holds."""
    np = pytest.importorskip("numpy")
    q, k, v, _ = _inputs(device, torch.float32, 1, 2, 2, 5, 7, 32, 32)
    with fastgpt.use_backend(backend):
        expected = scaled_dot_product_attention(q, k, v, scale=0.5)
        for scale in (np.float32(0.5), torch.tensor(0.5)):
            torch.testing.assert_close(scaled_dot_product_attention(q, k, v, scale=scale), expected)
        torch.manual_seed(3)
        expected = scaled_dot_product_attention(q, k, v, dropout_p=0.25)
        for dropout_p in (np.float32(0.25), torch.tensor(0.25)):
            torch.manual_seed(3)
            torch.testing.assert_close(scaled_dot_product_attention(q, k, v, dropout_p=dropout_p), expected)
        with pytest.raises(ValueError, match=r"expected dropout_p in \[0, 1\), got True"):
            scaled_dot_product_attention(q, k, v, dropout_p=True)
        with pytest.raises(ValueError, match="expected scale to be a finite number or None, got 'a'"):
            scaled_dot_product_attention(q, k, v, scale="a")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("call,error", [
    (lambda q, k, v: scaled_dot_product_attention(q, k[..., :16], v), "head dim"),
    (lambda q, k, v: scaled_dot_product_attention(q[:, :1].expand(1, 3, 5, 32), k, v), "enable_gqa"),
    (lambda q, k, v: scaled_dot_product_attention(q, k, v, torch.ones(3, 7, dtype=torch.bool)), "attn_mask"),
    (lambda q, k, v: scaled_dot_product_attention(q, k, v, torch.ones(5, 7, dtype=torch.int32)), "attn_mask"),
    (lambda q, k, v: scaled_dot_product_attention(q, k, v, torch.ones(5, 7, dtype=torch.float64)), "attn_mask"),
    (lambda q, k, v: scaled_dot_product_attention(q, k, v, dropout_p=1.0), "dropout_p"),
    (lambda q, k, v: scaled_dot_product_attention(q, k.double(), v), "dtype"),
], ids=["head_dim", "heads", "mask_shape", "mask_dtype", "mask_float64", "dropout_p", "mixed_dtypes"])
def test_bad_input(device, backend, call, error):
    q, k, v, _ = _inputs(device, torch.float32, 1, 2, 2, 5, 7, 32, 32)
    with fastgpt.use_backend(backend), pytest.raises((ValueError, TypeError), match=error):
        call(q, k, v)


# ---------------------------------------------------------------------------------------------------------------
# The kernels' custom ops: torch.library.opcheck and torch.compile(fullgraph=True).

def _kernel_backends():
    return [p for p in DEVICE_BACKENDS if p.values[1] in attention._OPS]


@pytest.mark.parametrize("device,backend", _kernel_backends())
def test_opcheck(device, backend):
    q, k, v, grad_out = _inputs(device, torch.float32, 2, 2, 1, 17, 33, 32, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = _mask("key_padding", device, torch.float32, 2, 2, 17, 33).expand(2, 2, 17, 33)  # as the op passes it
    seed = torch.tensor(77, dtype=torch.int64)
    fwd = {"triton": attention._triton_fwd, "csrc": getattr(torch.ops.fastgpt, "attention_fwd", None)}[backend]
    torch.library.opcheck(fwd, (q, k, v, mask, False, 0.2, 0.25, seed))
    out, lse = fwd(q, k, v, None, True, 0.2, 0.0, seed)
    bwd = {"triton": attention._triton_bwd, "csrc": getattr(torch.ops.fastgpt, "attention_bwd", None)}[backend]
    torch.library.opcheck(bwd, (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, None, True, 0.2,
                                0.0, seed))


@pytest.mark.parametrize("device,backend", _kernel_backends())
def test_torch_compile_fullgraph(device, backend):
    q, k, v, grad_out = _inputs(device, torch.float32, 1, 4, 2, 33, 33, 32, 32)
    mask = _mask("key_padding", device, torch.float32, 1, 4, 33, 33)

    def fn(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1, enable_gqa=True)

    torch.manual_seed(5)
    # fallback_random: compiled code draws the dropout seed from torch's generator exactly as eager does.
    with fastgpt.use_backend(backend), torch._inductor.config.patch(fallback_random=True):
        eager = _grads(fn, (q, k, v), grad_out)
        torch.manual_seed(5)
        compiled = _grads(torch.compile(fn, fullgraph=True), (q, k, v), grad_out)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_faster_kernel_rule_reads_recorded_results():
    """On a GPU the op puts first whichever kernel backend the recorded benchmark found faster at the nearest shape
    (same dtype, head dim, causal flag; nearest log2 length); with nothing comparable recorded, no preference."""
    def row(impl, length, ms, head_dim=64, causal=True, dtype="bfloat16", pass_="fwd+bwd"):
        return {"impl": impl, "pass_": pass_, "dtype": dtype, "median_ms": ms,
                "extra": {"seq_len": length, "head_dim": head_dim, "causal": causal}}

    rows = [row("fastgpt-csrc", 512, 1.0), row("fastgpt-triton", 512, 2.0),
            row("fastgpt-csrc", 8192, 9.0), row("fastgpt-triton", 8192, 5.0),
            row("fastgpt-triton", 2048, 0.1),  # no csrc time at 2048: not a comparable point
            row("torch-sdpa-flash", 512, 0.5), row("fastgpt-csrc", 512, 0.1, pass_="fwd"),
            row("fastgpt-csrc", 512, 0.1, head_dim=128), row("fastgpt-triton", 512, 0.2, head_dim=128)]
    assert attention.faster_kernel(rows, "bfloat16", 64, True, 300) == "csrc"
    assert attention.faster_kernel(rows, "bfloat16", 64, True, 1024) == "csrc"
    assert attention.faster_kernel(rows, "bfloat16", 64, True, 4096) == "triton"
    assert attention.faster_kernel(rows, "bfloat16", 128, True, 4096) == "csrc"
    assert attention.faster_kernel(rows, "bfloat16", 64, False, 512) is None
    assert attention.faster_kernel(rows, "float16", 64, True, 512) is None
    assert attention.faster_kernel([], "bfloat16", 64, True, 512) is None


def test_gpu_preference_reads_the_recorded_results_once(monkeypatch):
    """The backend order on a GPU comes from its recorded benchmark, read and scanned once per GPU and shape: the
    file is not read again on every call."""
    reads = []

    def recorded_rows(op, device_name):
        reads.append((op, device_name))
        return [{"impl": impl, "pass_": "fwd+bwd", "dtype": "bfloat16", "median_ms": ms,
                 "extra": {"seq_len": 512, "head_dim": 64, "causal": True}}
                for impl, ms in (("fastgpt-csrc", 2.0), ("fastgpt-triton", 1.0))]

    monkeypatch.setattr(attention.backends, "recorded_rows", recorded_rows)
    caches = (attention._recorded_rows, attention._preference_on_gpu)
    for cache in caches:
        cache.cache_clear()
    try:
        for _ in range(3):
            assert attention._preference_on_gpu("Test GPU", "bfloat16", 64, True, 500)[0] == "triton"
            assert attention._preference_on_gpu("Test GPU", "bfloat16", 128, True, 500) == \
                tuple(attention.backends.DEFAULT_PREFERENCE["cuda"])
    finally:
        for cache in caches:  # the test's rows must not stay in them
            cache.cache_clear()
    assert reads == [("attention", "Test GPU")]
