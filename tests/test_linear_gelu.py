"""fastgpt.ops.linear_gelu / gelu_ffn / feed_forward and fastgpt.nn.FeedForward against a float64 reference,
every backend: the output and every gradient (input, both weights, both biases)."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.ops.linear_gelu import _kernel_supports, feed_forward, gelu_ffn, linear_gelu
from fastgpt.ops.philox import draw_seed, elementwise_dropout_keep
from tests.utils import DEVICE_BACKENDS, DTYPES, assert_close

# (input shape, out_features): odd sizes, one row, 3-d input.
LINEAR_SHAPES = [((97, 64), 256), ((1, 64), 256), ((3, 5, 40), 100)]


def _leaf(*size, dtype, device, scale=1.0):
    return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_()


def _run(fn, tensors, grad):
    for t in tensors:
        if t is not None:
            t.grad = None
    out = fn(*tensors)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad.clone() for t in tensors]


def _double(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _compare(names, ours, expected, torch_result):
    (out, grads), (e_out, e_grads), (t_out, t_grads) = ours, expected, torch_result
    assert_close("output", out, e_out, t_out)
    for name, g, eg, tg in zip(names, grads, e_grads, t_grads):
        assert (g is None) == (eg is None), name
        if g is not None:
            assert_close(name, g, eg, tg)


def _check_linear_gelu(device, backend, dtype, shape, out_features, bias, approximate, recompute):
    in_features = shape[-1]
    x = _leaf(*shape, dtype=dtype, device=device)
    w = _leaf(out_features, in_features, dtype=dtype, device=device, scale=in_features ** -0.5)
    b = _leaf(out_features, dtype=dtype, device=device) if bias else None
    grad = torch.randn(*shape[:-1], out_features, device=device).to(dtype)

    def ours(x, w, b):
        return linear_gelu(x, w, b, approximate, recompute=recompute)

    def eager(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate=approximate)

    with fastgpt.use_backend(backend):
        result = _run(ours, [x, w, b], grad)
    expected = _run(eager, _double([x, w, b]), grad.double())
    _compare(("dx", "dweight", "dbias"), result, expected, _run(eager, [x, w, b], grad))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_features", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu(device, backend, dtype, shape, out_features, approximate):
    _check_linear_gelu(device, backend, dtype, shape, out_features, True, approximate, recompute=False)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_recompute(device, backend, dtype, bias, approximate):
    """The pre-activation not stored but recomputed in the backward pass (and the bias-free layer)."""
    _check_linear_gelu(device, backend, dtype, (33, 48), 80, bias, approximate, recompute=True)


def _make_ffn(shape, d_ff, dtype, device, bias):
    d_model = shape[-1]
    x = _leaf(*shape, dtype=dtype, device=device)
    w1 = _leaf(d_ff, d_model, dtype=dtype, device=device, scale=d_model ** -0.5)
    b1 = _leaf(d_ff, dtype=dtype, device=device) if bias else None
    w2 = _leaf(d_model, d_ff, dtype=dtype, device=device, scale=d_ff ** -0.5)
    b2 = _leaf(d_model, dtype=dtype, device=device) if bias else None
    return [x, w1, b1, w2, b2]


def _check_ffn(device, backend, dtype, activation, dropout_p, bias, recompute=False, shape=(3, 5, 40), d_ff=100):
    """Expected: the reference backend in float64 with the same seed, so the same Philox mask; PyTorch's own error:
    the reference backend in `dtype`."""
    tensors = _make_ffn(shape, d_ff, dtype, device, bias)
    grad = torch.randn(shape, device=device).to(dtype)

    def ffn(*tensors):
        torch.manual_seed(1234)
        return feed_forward(*tensors, activation=activation, dropout_p=dropout_p, recompute=recompute)

    with fastgpt.use_backend(backend):
        result = _run(ffn, tensors, grad)
    with fastgpt.use_backend("reference"):
        expected = _run(ffn, _double(tensors), grad.double())
        torch_result = _run(ffn, tensors, grad)
    _compare(("dx", "dw1", "db1", "dw2", "db2"), result, expected, torch_result)
    if dropout_p > 0:  # the mask really is applied: the dropped outputs are exactly zero, about p of them
        dropped = (result[0] == 0).float().mean().item()
        assert abs(dropped - dropout_p) < 0.08, dropped


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gelu_ffn(device, backend, dtype, activation, dropout_p):
    _check_ffn(device, backend, dtype, activation, dropout_p, bias=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,bias,recompute", [("relu", True, False), ("gelu_tanh", False, False),
                                                       ("gelu", True, True), ("gelu_tanh", False, True)], ids=str)
def test_feed_forward_variants(device, backend, dtype, activation, bias, recompute):
    _check_ffn(device, backend, dtype, activation, 0.1, bias, recompute, shape=(37, 24), d_ff=72)


def test_gelu_ffn_is_feed_forward_and_eval_has_no_dropout():
    tensors = [t.detach() for t in _make_ffn((7, 16), 32, torch.float32, "cpu", True)]
    for backend in fastgpt.available_backends("cpu"):
        with fastgpt.use_backend(backend):
            torch.manual_seed(5)
            a = gelu_ffn(*tensors, approximate="tanh", dropout_p=0.2)
            torch.manual_seed(5)
            b = feed_forward(*tensors, activation="gelu_tanh", dropout_p=0.2)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            c = gelu_ffn(*tensors, approximate="none", dropout_p=0.2, training=False)
            torch.testing.assert_close(c, gelu_ffn(*tensors, approximate="none"), rtol=0, atol=0)


@pytest.mark.skipif("csrc" not in fastgpt.available_backends("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("rows", [97, 1000])
def test_cpu_bias_gradient_is_the_rounded_column_sum(rows):
    """The CPU kernel adds a bias gradient's column in float64: gelu_ffn's db2 without dropout (the column sums of
    the output gradient) is their float64 sum rounded once, where a float32 sum down the rows was several times
    PyTorch's own error."""
    x, w1, b1, w2, b2 = _make_ffn((rows, 48), 96, torch.float32, "cpu", True)
    grad = torch.randn(rows, 48) * 10
    with fastgpt.use_backend("csrc"):
        gelu_ffn(x, w1, b1, w2, b2).backward(grad)
    torch.testing.assert_close(b2.grad, grad.double().sum(0).float(), rtol=0, atol=0)


def test_reference_dropout_is_the_philox_mask():
    """The reference backend drops exactly the elements dropout_keep names for the seed drawn after manual_seed."""
    tensors = [t.detach() for t in _make_ffn((2, 9, 16), 32, torch.float64, "cpu", True)]
    with fastgpt.use_backend("reference"):
        out = feed_forward(*tensors, dropout_p=0.0)
        torch.manual_seed(7)
        dropped = feed_forward(*tensors, dropout_p=0.4)
    torch.manual_seed(7)
    keep = elementwise_dropout_keep(draw_seed(), 18, 16, 0.4).view(2, 9, 16)
    torch.testing.assert_close(dropped, torch.where(keep, out / 0.6, 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_same_mask_on_every_backend(device, backend):
    tensors = [t.detach() for t in _make_ffn((50, 32), 64, torch.float32, device, True)]
    masks = []
    for name in ("reference", backend):
        with fastgpt.use_backend(name):
            torch.manual_seed(99)
            masks.append(feed_forward(*tensors, dropout_p=0.5) == 0)
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if p.values[1] != "reference"])
def test_inference_stores_no_pre_activation(device, backend):
    """Without a gradient to compute, the kernels write no pre-activation (it is only the backward's), and the
    output is the one a training call gives, bit for bit: linear_gelu, and gelu_ffn's two products."""
    from torch.utils._python_dispatch import TorchDispatchMode

    store_pre = []

    class Recording(TorchDispatchMode):  # the ops' arguments (a mode sees the custom ops themselves)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().endswith("::linear_gelu_fwd"):
                store_pre.append(args[4])
            return func(*args, **(kwargs or {}))

    x, w1, b1, w2, b2 = _make_ffn((7, 32), 48, torch.float32, device, True)
    with fastgpt.use_backend(backend):
        trained = linear_gelu(x, w1, b1), gelu_ffn(x, w1, b1, w2, b2)
        with torch.no_grad(), Recording():
            inferred = linear_gelu(x, w1, b1), gelu_ffn(x, w1, b1, w2, b2)
    assert store_pre == [False, False, False]
    for t, i in zip(trained, inferred):
        torch.testing.assert_close(i, t.detach(), rtol=0, atol=0)


# --- the matrix product's two ways to shared memory: TMA descriptors (Hopper) and pointers ------------------------

# (epilogue, activation, bias, dropout_p): every epilogue of kernels/linear_gelu._matmul_fused, with both layouts of
# B: "act" and "dact_recomputed" multiply by W^T (the TMA descriptor spans W (N, K) and the kernel transposes the
# tile), "dact_saved" by W itself, read as a row-major (K, N). For the dact epilogues `bias` also asks for the bias
# gradient.
PRODUCT_CASES = [("act", "gelu", True, 0.0), ("act", "gelu_tanh", True, 0.3), ("act", "relu", False, 0.0),
                 ("dact_saved", "gelu_tanh", True, 0.0), ("dact_recomputed", "gelu", True, 0.0),
                 ("dact_recomputed", "gelu_tanh", False, 0.0)]
# M, K, N: no multiple of the tiles (64 x 64 x 32 interpreting), the row strides TMA allows (multiples of 16 bytes).
PRODUCT_SHAPE = (97, 72, 136)
_ACT = {"none": lambda t: t, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}


def _nan_padded(t):
    """`t` as a view into a larger buffer whose rows and columns past its edges are NaN: a kernel that reads past
    an edge (instead of masking or zero-filling) puts NaN into the result. Row strides stay multiples of 16 bytes."""
    buffer = torch.full([size + 8 for size in t.shape], float("nan"), dtype=t.dtype, device=t.device)
    inside = tuple(slice(0, size) for size in t.shape)
    buffer[inside] = t
    return buffer[inside]


def _product(kernels, epilogue, activation, x, w, b, other, dropout_p, seed):
    """The launcher of `epilogue` -> (its output, its second output: pre, the bias gradient or None)."""
    if epilogue == "act":
        return kernels.linear_act(x, w, b, activation, store_pre=True, dropout_p=dropout_p, seed=seed)
    if epilogue == "dact_saved":
        return kernels.linear_dact(x, w, other, activation, bias_grad=b is not None)
    return kernels.linear_dact_recompute(x, w, b, other, activation, bias_grad=b is not None)


def _eager_product(epilogue, activation, x, w, b, other, dropout_p, seed):
    """The same in eager PyTorch, in the inputs' dtype (the bias gradient as the fp32 sum of dPre's rows)."""
    act = _ACT[activation]
    if epilogue == "act":
        pre = F.linear(x, w, b)
        keep = elementwise_dropout_keep(seed, *pre.shape, dropout_p, device=x.device)
        return torch.where(keep, act(pre) / (1 - dropout_p), 0.0).to(x.dtype), pre
    if epilogue == "dact_saved":  # x: gradient of the next layer's output, w: its weight, other: our pre
        pre, grad = other, x @ w
    else:  # other: gradient of act's output
        pre, grad = F.linear(x, w, b), other
    pre = pre.detach().requires_grad_()
    (dpre,) = torch.autograd.grad(act(pre), pre, grad)
    return dpre, None if b is None else dpre.float().sum(0)


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue,activation,bias,dropout_p", PRODUCT_CASES, ids=str)
def test_matmul_copy_paths(copy_path, path, dtype, epilogue, activation, bias, dropout_p):
    """Each epilogue through the TMA path and the pointer path against float64, on operands whose edges are
    surrounded by NaN (zero-filled or masked, never read) and sizes no tile divides."""
    kernels = pytest.importorskip("fastgpt.kernels.linear_gelu")
    copy_path(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    M, K, N = PRODUCT_SHAPE
    x = torch.randn(M, N if epilogue == "dact_saved" else K, device=device)
    w = torch.randn(N, K, device=device) * K ** -0.5
    b = torch.randn(N, device=device) if bias else None
    other = torch.randn(M, K if epilogue == "dact_saved" else N, device=device)
    seed = 1234
    low = [None if t is None else t.to(dtype) for t in (x, w, b, other)]
    out, second = _product(kernels, epilogue, activation, *(None if t is None else _nan_padded(t) for t in low),
                           dropout_p, seed)
    assert kernels._matmul_fused.best_config.kwargs["USE_TMA"] == (path == "tma")
    expected = _eager_product(epilogue, activation, *(None if t is None else t.double() for t in low), dropout_p, seed)
    torch_result = _eager_product(epilogue, activation, *low, dropout_p, seed)
    assert_close("output", out, expected[0], torch_result[0])
    assert (second is None) == (expected[1] is None)
    if second is not None:
        assert_close("pre" if epilogue == "act" else "dbias", second, expected[1], torch_result[1])


def test_tma_operands(monkeypatch):
    """Which products get TMA descriptors: 16-bit operands with unit last strides, 16-byte aligned bases and row
    strides, on a GPU with TMA (or the CPU interpreter when forced); B as W^T is described by W, a row-major B as
    itself."""
    kernels = pytest.importorskip("fastgpt.kernels.linear_gelu")
    common = pytest.importorskip("fastgpt.kernels.common")
    x, w = torch.randn(8, 64, dtype=torch.float16), torch.randn(24, 64, dtype=torch.float16)
    monkeypatch.setattr(common, "TMA", "auto")
    assert kernels._tma_operands(x, w.t())[0] == ("auto" if common.tma_device(x.device) else "off")
    monkeypatch.setattr(common, "TMA", "only")
    policy, a_desc, b_desc, b_kmajor = kernels._tma_operands(x, w.t())
    assert policy == "only" and b_kmajor and list(a_desc.shape) == [8, 64] and list(b_desc.shape) == [24, 64]
    policy, a_desc, b_desc, b_kmajor = kernels._tma_operands(w, x.t().contiguous())
    assert policy == "only" and not b_kmajor and list(b_desc.shape) == [64, 8]
    refused = [(x.float(), w.float().t()),  # fp32: the pointer path
               (x[:, :60].contiguous(), w[:, :60].contiguous().t()),  # K = 60: rows of 120 bytes
               (x[:, 1:57], w[:, 1:57].t()),  # bases 2 bytes past 16-byte alignment
               (x.t().contiguous().t(), w.t()),  # A column-major
               (x[:0], w.t())]  # empty
    for a, b in refused:
        assert kernels._tma_operands(a, b) == ("off", None, None, False)
    monkeypatch.setattr(common, "TMA", "off")
    assert kernels._tma_operands(x, w.t())[0] == "off"
    monkeypatch.setattr(common, "TMA", "of")
    with pytest.raises(ValueError, match="FASTGPT_TRITON_TMA"):
        kernels._tma_operands(x, w.t())


# --- fastgpt.nn.FeedForward --------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_nn_feed_forward(activation, bias):
    """Parameters laid out as two nn.Linear (loads their state dict), and the same function as the eager block."""
    lin1, lin2 = torch.nn.Linear(24, 56, bias=bias), torch.nn.Linear(56, 24, bias=bias)
    ffn = fastgpt.nn.FeedForward(24, 56, activation=activation, dropout=0.25, bias=bias)
    assert list(ffn.state_dict()) == [f"linear1.{k}" for k in lin1.state_dict()] + \
        [f"linear2.{k}" for k in lin2.state_dict()]
    ffn.load_state_dict({**{f"linear1.{k}": v for k, v in lin1.state_dict().items()},
                         **{f"linear2.{k}": v for k, v in lin2.state_dict().items()}})
    act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}[activation]
    x = torch.randn(3, 7, 24)
    ffn.eval()
    for backend in fastgpt.available_backends("cpu"):
        with fastgpt.use_backend(backend):
            torch.testing.assert_close(ffn(x), lin2(act(lin1(x))), rtol=1e-5, atol=1e-5)
    ffn.train()
    assert (ffn(x) == 0).float().mean().item() > 0.1
    assert "activation='" + activation in repr(ffn)


def test_nn_feed_forward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="expected activation to be one of"):
        fastgpt.nn.FeedForward(8, 16, activation="swish")


# --- fallback: inputs a kernel does not take go to reference ---------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in fastgpt.available_backends("cpu") if b != "reference"])
def test_float64_falls_back_to_reference(backend):
    x, w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert not _kernel_supports(backend, x, w)
    assert backends.select(x.device, lambda name: _kernel_supports(name, x, w), preference=(backend,)) == "reference"
    with fastgpt.use_backend(backend):
        torch.testing.assert_close(linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty_input(device, backend):
    """No rows, or no output features: empty results, and zero gradients where there is something to differentiate."""
    w, b = torch.randn(16, 8, device=device), torch.randn(16, device=device)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w0, b0 = (torch.randn(0, 8, device=device, requires_grad=True), torch.randn(0, device=device, requires_grad=True))
    with fastgpt.use_backend(backend):
        assert linear_gelu(torch.randn(0, 8, device=device), w, b).shape == (0, 16)
        assert gelu_ffn(torch.randn(2, 0, 8, device=device), w, b, w.t().contiguous(), None).shape == (2, 0, 8)
        out = linear_gelu(x, w0, b0, approximate="tanh")
        assert out.shape == (4, 0)
        out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w0.grad.shape == (0, 8) and b0.grad.shape == (0,)
    if backend == "csrc":  # the op layer sends empty products to reference; the kernels take them too
        seed = torch.zeros((), dtype=torch.int64)
        out, pre = torch.ops.fastgpt.linear_gelu_fwd(x.detach(), w0.detach(), b0.detach(), "gelu_tanh", True, 0.0, seed)
        assert out.shape == pre.shape == (4, 0)
        dpre, dbias = torch.ops.fastgpt.linear_gelu_bwd(out, pre, "gelu_tanh", 0.0, seed, True)
        assert dpre.shape == (4, 0) and dbias.shape == (0,)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_no_input_features(device, backend):
    """d_model 0: the hidden layer is act(b1), as F.linear computes."""
    w1, b1 = torch.randn(16, 0, device=device), torch.randn(16, device=device)
    w2, b2 = torch.randn(5, 16, device=device), torch.randn(5, device=device)
    x = torch.randn(3, 0, device=device)
    with fastgpt.use_backend(backend):
        out = gelu_ffn(x, w1, b1, w2, b2)
    torch.testing.assert_close(out, F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bias_at_an_odd_offset(device, backend):
    """A bias viewed 2 bytes past an aligned address: cuBLASLt's bias epilogue reads it in 16-byte vectors, so the
    CUDA kernel must copy it rather than hand it over."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = _leaf(64, 64, dtype=dtype, device=device)
    w = _leaf(40, 64, dtype=dtype, device=device, scale=0.125)
    b = torch.randn(41, device=device).to(dtype)[1:].requires_grad_()  # a view 1 element into its storage
    grad = torch.randn(64, 40, device=device).to(dtype)

    def eager(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    with fastgpt.use_backend(backend):
        result = _run(lambda x, w, b: linear_gelu(x, w, b, approximate="tanh"), [x, w, b], grad)
    _compare(("dx", "dweight", "dbias"), result, _run(eager, _double([x, w, b]), grad.double()), _run(eager, [x, w, b], grad))


# --- bad input: the same clear error from every backend ----------------------------------------------------------

_W, _B = torch.randn(16, 8), torch.randn(16)
BAD_INPUTS = [
    (lambda: linear_gelu(torch.randn(4, 7), _W, _B), ValueError, r"expected weight of shape \(out_features, 7\)"),
    (lambda: linear_gelu(torch.randn(4, 8), _W, torch.randn(15)), ValueError, r"expected bias of shape \(16,\)"),
    (lambda: linear_gelu(torch.randn(4, 8), _W, _B, approximate="erf"), ValueError, "expected approximate"),
    (lambda: linear_gelu(torch.randn(4, 8), _W.half(), _B), TypeError, "expected weight to have the same dtype"),
    (lambda: linear_gelu(torch.randint(0, 3, (4, 8)), _W, _B), TypeError, "expected input to have a floating"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, torch.randn(8, 15), None), ValueError,
     r"expected w2 of shape \(d_model, 16\)"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, _W.t(), torch.randn(16)), ValueError, r"expected b2 of shape \(8,\)"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, _W.t(), None, approximate="relu"), ValueError,
     "expected approximate"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, _W.t(), None, dropout_p=1.0), ValueError,
     r"expected dropout_p in \[0, 1\)"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, _W.t(), None, dropout_p=-0.1), ValueError,
     r"expected dropout_p in \[0, 1\)"),
    (lambda: feed_forward(torch.randn(4, 8), _W, _B, _W.t(), None, activation="swish"), ValueError,
     "expected activation to be one of gelu, gelu_tanh, relu"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, [[1.0]], None), TypeError, "expected w2 to be a torch.Tensor"),
    (lambda: gelu_ffn(torch.randn(4, 8), _W, _B, _W.t(), None, dropout_p=torch.tensor(True)), ValueError,
     r"expected dropout_p in \[0, 1\)"),
]


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(backend, call, error, message):
    with fastgpt.use_backend(backend), pytest.raises(error, match=message):
        call()


# --- the custom ops: schema, fake, autograd registration, and torch.compile without graph breaks -----------------

def _custom_ops():
    namespaces = [("triton", torch.ops.fastgpt_triton)]
    if backends.CSRC_LOADED:
        namespaces.append(("csrc", torch.ops.fastgpt))
    return [pytest.param(ns, id=name) for name, ns in namespaces if name in fastgpt.available_backends("cpu")]


@pytest.mark.parametrize("ns", _custom_ops())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_opcheck(ns, activation):
    x = torch.randn(10, 24, requires_grad=True)
    w = (torch.randn(40, 24) / 5).requires_grad_()
    b = torch.randn(40, requires_grad=True)
    seed = torch.tensor(123456789, dtype=torch.int64)
    torch.library.opcheck(ns.linear_gelu_fwd.default, (x, w, b, activation, True, 0.0, seed))
    torch.library.opcheck(ns.linear_gelu_fwd.default, (x, w, None, activation, False, 0.0, seed))
    torch.library.opcheck(ns.linear_gelu_fwd.default, (x, w, b, "none", False, 0.25, seed))
    _, pre = ns.linear_gelu_fwd.default(x.detach(), w.detach(), b.detach(), activation, True, 0.0, seed)
    grad = torch.randn(10, 40)
    torch.library.opcheck(ns.linear_gelu_bwd.default, (grad, pre, activation, 0.0, seed, True))
    torch.library.opcheck(ns.linear_gelu_bwd.default, (grad, None, "none", 0.25, seed, True))
    torch.library.opcheck(ns.linear_gelu_bwd_recompute.default, (grad, x.detach(), w.detach(), b.detach(),
                                                                 activation, True))
    torch.library.opcheck(ns.linear_gelu_dact.default, (torch.randn(10, 24), w.detach().t().contiguous(), pre,
                                                        activation, False))


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_torch_compile_fullgraph(backend):
    ffn = fastgpt.nn.FeedForward(16, 40, activation="gelu_tanh", dropout=0.0 if backend == "reference" else 0.2)
    w, b = (torch.randn(24, 16) / 4).requires_grad_(), torch.randn(24, requires_grad=True)
    # The reference backend's dropout reads the seed with .item() (a graph break): compiled only without dropout.
    p = 0.0 if backend == "reference" else 0.3

    def block(x):
        h = ffn(x)
        h = gelu_ffn(h, ffn.linear1.weight, ffn.linear1.bias, ffn.linear2.weight, ffn.linear2.bias, dropout_p=p)
        return linear_gelu(h, w, b)

    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [x, w, b, *ffn.parameters()]
    with fastgpt.use_backend(backend):
        torch.manual_seed(0)
        expected = block(x)
        expected.sum().backward()
        grads = [t.grad.clone() for t in params]
        for t in params:
            t.grad = None
        torch._dynamo.reset()
        torch.manual_seed(0)
        compiled = torch.compile(block, fullgraph=True)(x)
        compiled.sum().backward()
    if p == 0.0:
        torch.testing.assert_close(compiled, expected)
        for t, g in zip(params, grads):
            torch.testing.assert_close(t.grad, g)
    else:  # torch.compile draws its own random numbers, so only the shape of the result and the mask rate match
        assert compiled.shape == expected.shape and all(t.grad is not None for t in params)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_behaves_like_f_linear(device, backend):
    """Under bf16 autocast the kernels take float32 parameters and activations as F.linear would: cast to bf16,
    output in bf16, float32 gradients for the float32 leaves; errors within 2x PyTorch's own autocast error."""
    tensors = _make_ffn((7, 48), 96, torch.float32, device, True)
    grad = torch.randn(7, 48, device=device)

    def run(backend_name, inputs):
        for t in inputs:
            t.grad = None
        with fastgpt.use_backend(backend_name), torch.autocast(device, dtype=torch.bfloat16):
            out = feed_forward(*inputs, activation="gelu_tanh")
        out.backward(grad.to(out.dtype))
        return out.detach(), [t.grad.clone() for t in inputs]

    out, grads = run(backend, tensors)
    torch_out, torch_grads = run("reference", tensors)
    expected, expected_grads = run("reference", [t.detach().double().requires_grad_() for t in tensors])
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    assert_close("output", out, expected, torch_out)
    for name, g, eg, tg in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, expected_grads, torch_grads):
        assert_close(name, g, eg, tg)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autocast_takes_mixed_dtypes(device, backend):
    """Under autocast a bf16 activation meets float32 parameters (the output of one autocast product feeding the
    next): accepted as F.linear accepts it, the same bf16 result as F.linear -> F.gelu (-> F.linear)."""
    x = torch.randn(7, 48, device=device).to(torch.bfloat16)
    w1, b1 = torch.randn(96, 48, device=device) * 48 ** -0.5, torch.randn(96, device=device)
    w2, b2 = torch.randn(48, 96, device=device) * 96 ** -0.5, torch.randn(48, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with fastgpt.use_backend(backend):
            hidden = linear_gelu(x, w1, b1, approximate="tanh")
            out = gelu_ffn(x, w1, b1, w2, b2)
        expected_hidden = F.gelu(F.linear(x, w1, b1), approximate="tanh")
        expected_out = F.linear(expected_hidden, w2, b2)
    assert hidden.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(hidden, expected_hidden, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected_out, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_dim_input_is_named(device, backend):
    with fastgpt.use_backend(backend), pytest.raises(ValueError, match="input with at least 1 dim"):
        linear_gelu(torch.tensor(1.0, device=device), torch.randn(4, 1, device=device))
