"""fastgpt.nn's MultiheadAttention and Transformer modules against torch.nn's, and fastgpt.nn.convert.

Each check builds the torch.nn module, loads its state_dict into the fastgpt module (strict: same keys and shapes),
and compares outputs, input gradients and every parameter gradient against the torch.nn module run in float64,
with the bound of tests/utils.assert_close (2x torch.nn's own error in the same dtype, plus a tiny floor).
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import fastgpt
import fastgpt.nn as fnn
from tests.utils import DEVICE_BACKENDS, assert_close

B, L, S, E, H = 3, 5, 7, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = [torch.float64, torch.float32]


def _grad_leaves(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _run(module, run, inputs, out_grads=None):
    """Outputs, and gradients of the inputs and parameters for a fixed random weighting of the outputs."""
    module.zero_grad(set_to_none=True)
    for t in _grad_leaves(inputs):
        t.grad = None
    outputs = [o for o in run(module, *inputs) if o is not None]
    if out_grads is None:
        out_grads = [torch.randn_like(o, dtype=torch.float64) for o in outputs]
    loss = sum((o.double() * g).sum() for o, g in zip(outputs, out_grads))
    loss.backward()
    grads = {f"d{n}": p.grad for n, p in module.named_parameters()}
    grads.update({f"dinput{i}": t.grad for i, t in enumerate(_grad_leaves(inputs))})
    return [o.detach() for o in outputs], grads, out_grads


def _cast(inputs, dtype):
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype).requires_grad_(t.requires_grad)
        out.append(t)
    return out


def check_parity(torch_cls, fastgpt_cls, kwargs, run, inputs, dtype, device, backend, train=False):
    """inputs: float64 tensors (floating ones that require grad are differentiated) and masks."""
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("the kernels take float32 and narrower: float64 runs on reference, checked there")
    torch.manual_seed(1)
    reference = torch_cls(**kwargs).to(device=device, dtype=torch.float64).train(train)
    peer = copy.deepcopy(reference).to(dtype)
    ours = fastgpt_cls(**kwargs).to(device=device, dtype=dtype).train(train)
    ours.load_state_dict(peer.state_dict())  # strict: the same keys and shapes
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]

    expected, expected_grads, out_grads = _run(reference, run, _cast(inputs, torch.float64))
    torch_out, torch_grads, _ = _run(peer, run, _cast(inputs, dtype), out_grads)
    with fastgpt.use_backend(backend):
        got, grads, _ = _run(ours, run, _cast(inputs, dtype), out_grads)
    assert len(got) == len(expected)
    for i, (g, e, t) in enumerate(zip(got, expected, torch_out)):
        assert_close(f"output {i}", g, e, t)
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        if expected_grads[name] is None:
            assert g is None, name
        else:
            assert_close(name, g, expected_grads[name], torch_grads[name])


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def _padding(batch, length):
    """A key-padding mask (True = padding) with rows of different lengths, none fully padded."""
    lengths = torch.tensor([length, max(1, length - 2), max(1, length // 2)])[:batch]
    return torch.arange(length)[None, :] >= lengths[:, None]


def _causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def _random_bool(*shape):
    mask = torch.rand(*shape) < 0.4
    mask[..., 0] = False  # every query keeps at least one key
    return mask


# ---------------------------------------------------------------------------------------------------------------
# MultiheadAttention

MHA_CASES = {
    # name: (constructor kwargs beyond (E, H), cross-attention, mask maker, forward kwargs)
    "self": (dict(), False, lambda: {}, {}),
    "self-kpm": (dict(), False, lambda: {"key_padding_mask": _padding(B, L)}, {}),
    "self-causal-bool": (dict(), False, lambda: {"attn_mask": _causal_bool(L)}, {}),
    "self-causal-hint": (dict(), False, lambda: {"attn_mask": _causal_bool(L)}, {"is_causal": True}),
    "self-both-bool": (dict(), False, lambda: {"attn_mask": _causal_bool(L), "key_padding_mask": _padding(B, L)},
                       {}),
    "self-float-masks": (dict(), False, lambda: {
        "attn_mask": torch.randn(L, L, dtype=torch.float64),
        "key_padding_mask": _padding(B, L).double() * -1e9}, {}),
    "self-mixed-masks": (dict(), False, lambda: {
        "attn_mask": torch.randn(L, L, dtype=torch.float64), "key_padding_mask": _padding(B, L)}, {}),
    "self-3d-mask": (dict(), False, lambda: {"attn_mask": _random_bool(B * H, L, L)}, {}),
    "cross-kdim-vdim": (dict(kdim=12, vdim=10), True, lambda: {"key_padding_mask": _padding(B, S),
                                                               "attn_mask": _random_bool(L, S)}, {}),
    "cross-bias-kv-zero-attn": (dict(add_bias_kv=True, add_zero_attn=True), True,
                                lambda: {"key_padding_mask": _padding(B, S)}, {}),
    "cross-no-bias": (dict(bias=False), True, lambda: {"attn_mask": _random_bool(L, S)}, {}),
}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)],
                         ids=["fused", "weights-avg", "weights-per-head"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention(device, backend, dtype, case, need_weights, average, batch_first):
    if backend != "reference" and need_weights:
        pytest.skip("the weights path runs no fastgpt kernel")
    extra, cross, masks, fwd = MHA_CASES[case]
    if "3d" in case and not batch_first:
        pytest.skip("one layout is enough for the per-head mask")
    kwargs = dict(embed_dim=E, num_heads=H, dropout=0.0, batch_first=batch_first, **extra)
    kdim, vdim = extra.get("kdim", E), extra.get("vdim", E)

    def layout(b, n, e):
        return _x(b, n, e) if batch_first else _x(n, b, e)

    query = layout(B, L, E)
    mask_kwargs = masks()
    if cross:
        inputs = [query, layout(B, S, kdim), layout(B, S, vdim)]
    else:
        inputs = [query]

    def run(module, q, *kv):
        k, v = kv if kv else (q, q)
        return module(q, k, v, need_weights=need_weights, average_attn_weights=average,
                      **{name: (m.to(q.dtype) if m.is_floating_point() else m) for name, m in mask_kwargs.items()},
                      **fwd)

    for train in (False, True):
        check_parity(torch.nn.MultiheadAttention, fnn.MultiheadAttention, kwargs, run, inputs, dtype, device,
                     backend, train=train)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_unbatched(device, backend, need_weights):
    kwargs = dict(embed_dim=E, num_heads=H)
    padding = _padding(1, S)[0]

    def run(module, q, kv):
        return module(q, kv, kv, key_padding_mask=padding.to(q.device), need_weights=need_weights)

    check_parity(torch.nn.MultiheadAttention, fnn.MultiheadAttention, kwargs, run, [_x(L, E), _x(S, E)],
                 torch.float32, device, backend)


def test_multihead_attention_dropout_is_applied_only_in_training():
    pytest.importorskip("fastgpt.ops.philox", reason="attention dropout needs fastgpt.ops.philox (attn-triton)")
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(B, L, E)
    mha.eval()
    first = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(first, mha(x, x, x, need_weights=False)[0])
    mha.train()
    assert not torch.allclose(first, mha(x, x, x, need_weights=False)[0])


def test_multihead_attention_bad_input():
    mha = fnn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    with pytest.raises(ValueError, match="key_padding_mask of shape \\(3, 5\\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="query's last dim to be 16"):
        mha(torch.randn(B, L, E + 1), x, x)
    with pytest.raises(TypeError, match="key_padding_mask to be bool or floating"):
        mha(x, x, x, key_padding_mask=torch.zeros(B, L, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# Transformer layers and containers

LAYER_CASES = {
    "post-relu": dict(),
    "post-gelu": dict(activation="gelu"),
    "pre-gelu-tanh": dict(activation=torch.nn.GELU(approximate="tanh"), norm_first=True),
    "post-callable-nobias": dict(activation=F.silu, bias=False, layer_norm_eps=1e-6),
}


def _src_masks(kind, n, batch):
    if kind == "none":
        return {}
    if kind == "padding":
        return {"src_key_padding_mask": _padding(batch, n)}
    return {"src_mask": torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64),
            "src_key_padding_mask": _padding(batch, n), "is_causal": True}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("masks", ["none", "padding", "causal+padding"])
def test_encoder_layer(device, backend, dtype, case, masks):
    kwargs = dict(d_model=E, nhead=H, dim_feedforward=24, dropout=0.0, batch_first=True, **LAYER_CASES[case])
    mask_kwargs = _src_masks(masks, L, B)

    def run(module, src):
        return (module(src, **{k: (v.to(src.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                   else v) for k, v in mask_kwargs.items()}),)

    for train in (False, True):
        check_parity(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, kwargs, run, [_x(B, L, E)],
                     dtype, device, backend, train=train)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_decoder_layer(device, backend, dtype, case):
    kwargs = dict(d_model=E, nhead=H, dim_feedforward=24, dropout=0.0, batch_first=False, **LAYER_CASES[case])
    tgt_mask = _causal_bool(L)
    tgt_padding, memory_padding = _padding(B, L), _padding(B, S)

    def run(module, tgt, memory):
        return (module(tgt, memory, tgt_mask=tgt_mask.to(tgt.device), tgt_key_padding_mask=tgt_padding.to(tgt.device),
                       memory_key_padding_mask=memory_padding.to(tgt.device), tgt_is_causal=True),)

    for train in (False, True):
        check_parity(torch.nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer, kwargs, run,
                     [_x(L, B, E), _x(S, B, E)], dtype, device, backend, train=train)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer(device, backend, dtype, norm_first):
    kwargs = dict(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24, dropout=0.0,
                  activation="gelu", batch_first=True, norm_first=norm_first)
    src_padding, tgt_padding = _padding(B, S), _padding(B, L)

    def run(module, src, tgt):
        tgt_mask = module.generate_square_subsequent_mask(L, device=src.device, dtype=src.dtype)
        return (module(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_padding.to(src.device),
                       tgt_key_padding_mask=tgt_padding.to(src.device),
                       memory_key_padding_mask=src_padding.to(src.device)),)

    for train in (False, True):
        check_parity(torch.nn.Transformer, fnn.Transformer, kwargs, run, [_x(B, S, E), _x(B, L, E)], dtype,
                     device, backend, train=train)


def test_transformer_builds_fastgpt_modules_with_torch_weights():
    torch.manual_seed(3)
    theirs = torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                                  dim_feedforward=24)
    torch.manual_seed(3)
    ours = fnn.Transformer(d_model=E, nhead=H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24)
    assert type(ours.encoder) is fnn.TransformerEncoder and type(ours.decoder) is fnn.TransformerDecoder
    assert type(ours.encoder.layers[0]) is fnn.TransformerEncoderLayer
    assert type(ours.decoder.layers[0].multihead_attn) is fnn.MultiheadAttention
    assert type(ours.decoder.norm) is fnn.LayerNorm
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name  # the same draws from the same seed


def test_encoder_detects_causal_mask():
    torch.manual_seed(0)
    encoder = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True), 2,
                                     enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    mask = fnn.Transformer.generate_square_subsequent_mask(L)
    assert torch.allclose(encoder(x, mask=mask), encoder(x, mask=mask, is_causal=False), atol=1e-6)
    assert torch.allclose(encoder(x, mask=mask), encoder(x, mask=mask, is_causal=True), atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_encoder_over_fastgpt_layers_in_inference(device, backend):
    """torch.nn.TransformerEncoder around fastgpt layers (the one-import swap): in inference with a key-padding mask
    it hands them a nested batch (its fast path, taken for any subclass of its layer), which they run padded; the
    padded positions come back as torch's zeros."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(E, H, 24, dropout=0.1, batch_first=True).to(device)
    ours = fnn.TransformerEncoderLayer(E, H, 24, dropout=0.1, batch_first=True).to(device)
    ours.load_state_dict(theirs.state_dict())
    encoders = {name: torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
                for name, layer in (("theirs", theirs), ("ours", ours))}
    expected_encoder = copy.deepcopy(encoders["theirs"]).double()
    x = torch.randn(B, L, E, device=device)
    padding = _padding(B, L).to(device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype-nested-tensor notice
        assert encoders["ours"].use_nested_tensor
        with fastgpt.use_backend(backend):
            actual = encoders["ours"](x, src_key_padding_mask=padding)
        expected = expected_encoder(x.double(), src_key_padding_mask=padding)
        torch_result = encoders["theirs"](x, src_key_padding_mask=padding)
    assert_close("output", actual, expected, torch_result)
    assert not actual[padding].any()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_encoder_over_a_nested_batch(device, backend):
    """A nested batch handed to the encoder (torch.nn's runs it in inference) goes through every layer and the final
    LayerNorm as in PyTorch; the LayerNorm takes both nested layouts."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True), 2,
                                  norm=fnn.LayerNorm(E), enable_nested_tensor=False)
    ours.load_state_dict(theirs.state_dict())
    rows = [torch.randn(n, E, device=device) for n in (L, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype-nested-tensor notice
        nested = torch.nested.nested_tensor(rows)
    with torch.no_grad(), fastgpt.use_backend(backend):
        got, expected = ours.to(device).eval()(nested), theirs.to(device).eval()(nested)
        for g, e in zip(got.unbind(), expected.unbind(), strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        jagged = torch.nested.nested_tensor(rows, layout=torch.jagged)
        for g, e in zip(ours.norm(jagged).unbind(), theirs.norm(jagged).unbind(), strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


class _Adapter(torch.nn.Module):
    """A LoRA-style wrapper: the wrapped Linear's weight and bias, and a forward of its own."""

    def __init__(self, linear):
        super().__init__()
        self.base, self.weight, self.bias = linear, linear.weight, linear.bias
        self.down = torch.nn.Linear(linear.in_features, 2, bias=False, dtype=linear.weight.dtype)

    def forward(self, x):
        return self.base(x) + 0.5 * torch.tanh(self.down(x)).sum(-1, keepdim=True)


class _Sigmoid(torch.nn.GELU):
    def forward(self, x):
        return torch.sigmoid(x)


def _layer_pair(norm_first, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True, norm_first=norm_first,
                                              **kwargs)
    ours = fnn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True, norm_first=norm_first, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_layer_runs_wrapped_and_hooked_submodules(device, backend, norm_first):
    """Sub-modules that are not plain (a wrapper on linear1, a subclass of nn.GELU, hooks on linear2 and the norms,
    pruning) run their own forward as in PyTorch: the same outputs, every hook fired, and a pruned layer trains."""
    x = torch.randn(B, L, E, device=device)
    with fastgpt.use_backend(backend):
        theirs, ours = _layer_pair(norm_first, activation=_Sigmoid())
        calls = {"theirs": [], "ours": []}
        for name, layer in (("theirs", theirs), ("ours", ours)):
            layer.to(device).linear1 = _Adapter(layer.linear1)
            torch.manual_seed(1)
            layer.linear1.down.reset_parameters()
            for sub in ("linear2", "norm1", "norm2", "dropout"):
                getattr(layer, sub).register_forward_hook(lambda m, i, o, n=name, s=sub: calls[n].append(s))
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert sorted(calls["ours"]) == sorted(calls["theirs"]) and calls["ours"]

        # Hooks alone, on modules the fused ops would otherwise replace: the second linear, the dropouts.
        theirs, ours = _layer_pair(norm_first)
        calls = {"theirs": [], "ours": []}
        for name, layer in (("theirs", theirs), ("ours", ours)):
            for sub in ("linear2", "dropout", "dropout1", "dropout2"):
                getattr(layer.to(device), sub).register_forward_hook(
                    lambda m, i, o, n=name, s=sub: calls[n].append(s))
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert sorted(calls["ours"]) == sorted(calls["theirs"]) == ["dropout", "dropout1", "dropout2", "linear2"]

        theirs, ours = _layer_pair(norm_first)
        for layer in (theirs, ours):
            prune.l1_unstructured(layer.to(device).linear1, "weight", 0.5)
        for step in range(2):
            for layer in (theirs, ours):
                layer.zero_grad()
                layer(x).square().sum().backward()
            torch.testing.assert_close(ours.linear1.weight_orig.grad, theirs.linear1.weight_orig.grad,
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("kind", ["Encoder", "Decoder"])
def test_layer_runs_replaced_dropouts(device, backend, kind):
    """Dropout modules replaced by nn.Identity (a common way to strip dropout), the feed-forward's inner one
    included, in training mode: the replacements run, with PyTorch's outputs and gradients. (The attention's own
    dropout is a float, 0 here.)"""
    torch.manual_seed(0)
    cls = f"Transformer{kind}Layer"
    theirs = getattr(torch.nn, cls)(E, H, 24, dropout=0.0, batch_first=True).to(device)
    ours = getattr(fnn, cls)(E, H, 24, dropout=0.0, batch_first=True).to(device)
    ours.load_state_dict(theirs.state_dict())
    for layer in (theirs, ours):
        for name, module in list(layer.named_children()):
            if isinstance(module, torch.nn.Dropout):
                setattr(layer, name, torch.nn.Identity())
    args = (torch.randn(B, L, E, device=device),) + ((torch.randn(B, S, E, device=device),) if kind == "Decoder"
                                                     else ())
    with fastgpt.use_backend(backend):
        out = ours(*args)
    expected = theirs(*args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs.get_parameter(name).grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_monte_carlo_dropout_follows_the_dropout_module(device, backend):
    """model.eval() with the dropout modules put back in training mode (Monte Carlo dropout): every dropout
    applies, in the feed-forward too, so two passes differ; with them in eval the passes are equal."""
    torch.manual_seed(0)
    layer = fnn.TransformerDecoderLayer(E, H, 24, dropout=0.5, batch_first=True).to(device).eval()
    x, memory = torch.randn(B, L, E, device=device), torch.randn(B, S, E, device=device)
    with fastgpt.use_backend(backend), torch.no_grad():
        assert torch.equal(layer(x, memory), layer(x, memory))
        layer.dropout.train()  # the feed-forward's inner dropout only
        assert not torch.equal(layer(x, memory), layer(x, memory))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_memory(device, backend):
    """A decoder layer over an empty memory (S = 0): cross-attention gives zeros, as PyTorch's does."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerDecoderLayer(E, H, 24, dropout=0.0, batch_first=True).to(device).eval()
    ours = fnn.TransformerDecoderLayer(E, H, 24, dropout=0.0, batch_first=True).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    x, memory = torch.randn(B, L, E, device=device), torch.randn(B, 0, E, device=device)
    with fastgpt.use_backend(backend):
        torch.testing.assert_close(ours(x, memory), theirs(x, memory), atol=1e-5, rtol=1e-5)


def test_integer_mask_is_named():
    encoder = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, H, 24, batch_first=True), 1,
                                     enable_nested_tensor=False)
    with pytest.raises(TypeError, match="mask to be a bool or floating-point mask"):
        encoder(torch.randn(B, L, E), mask=torch.zeros(L, L, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# convert

class _UserAttention(torch.nn.MultiheadAttention):
    pass


class _UserModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, E)
        self.encoder = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True), 2,
            norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
        self.attn = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.norm = torch.nn.LayerNorm(E)

    def forward(self, x, padding):
        h = self.encoder(self.embed(x), src_key_padding_mask=padding)
        return self.norm(h + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0])


def test_convert_swaps_in_place_and_keeps_everything():
    torch.manual_seed(0)
    model = _UserModel().double().train()
    x, padding = torch.randn(B, L, 6, dtype=torch.float64), _padding(B, L)
    expected = model(x, padding)
    params = {n: p for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report here
        assert fastgpt.nn.convert(model) is model
    assert type(model.encoder) is fnn.TransformerEncoder
    assert type(model.encoder.layers[1]) is fnn.TransformerEncoderLayer
    assert type(model.encoder.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(model.encoder.norm) is fnn.LayerNorm and type(model.norm) is fnn.LayerNorm
    assert type(model.attn) is fnn.MultiheadAttention and type(model.embed) is torch.nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())  # the very same tensors
    assert model.training and all(m.training for m in model.modules())
    assert next(model.parameters()).dtype == torch.float64
    assert_close("converted", model(x, padding).detach(), expected.detach(), expected.detach())


def test_convert_keeps_and_reports_subclasses():
    model = torch.nn.Sequential(_UserAttention(E, H), torch.nn.LayerNorm(E)).eval()
    with pytest.warns(UserWarning, match=r"0 \(.*_UserAttention\)"):
        fastgpt.nn.convert(model)
    assert type(model[0]) is _UserAttention and type(model[1]) is fnn.LayerNorm
    assert not model[1].training
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        fastgpt.nn.convert("model")
