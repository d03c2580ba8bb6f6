"""fastgpt.ops.layer_norm / add_layer_norm and fastgpt.nn.LayerNorm against a float64 reference, every backend."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.ops.layer_norm import _kernel_supports, add_layer_norm, layer_norm
from fastgpt.ops.philox import draw_seed, elementwise_dropout_keep
from tests.utils import DEVICE_BACKENDS, DTYPES, assert_close

# (input shape, normalized_shape): odd sizes, one row, not powers of two, the widest row the kernels keep on chip.
SHAPES = [
    ((1151, 768), (768,)),
    ((3, 7, 1000), (1000,)),
    ((1, 4096), (4096,)),
    ((4, 5, 6, 7), (6, 7)),
    ((33, 1), (1,)),
    ((67, 8192), (8192,)),
    ((3, 16384), (16384,)),
    ((2, 65536), (65536,)),
]


def _make(shape, normalized_shape, dtype, device, affine, residual, contiguous=True):
    def leaf(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, device=device) * scale + shift).to(dtype).requires_grad_()

    if contiguous:
        x = leaf(*shape, scale=2.0, shift=0.5)
    else:  # a transposed view: the op must not assume a layout
        x = (torch.randn(*reversed(shape), device=device) * 2 + 0.5).to(dtype).t().requires_grad_()
    r = leaf(*shape) if residual else None
    w = leaf(*normalized_shape, scale=0.5, shift=1.0) if affine in ("both", "weight") else None
    b = leaf(*normalized_shape) if affine in ("both", "bias") else None
    return x, r, w, b


def _run(fn, tensors, grad):
    for t in tensors:
        if t is not None:
            t.grad = None
    out = fn(*tensors)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad.clone() for t in tensors]


def _check(device, backend, dtype, shape, normalized_shape, affine, residual, contiguous=True):
    tensors = list(_make(shape, normalized_shape, dtype, device, affine, residual, contiguous))
    _compare(backend, tensors, torch.randn(shape, device=device).to(dtype), normalized_shape)


def _compare(backend, tensors, grad, normalized_shape):
    """layer_norm (or add_layer_norm, when tensors = [x, r, w, b] has a residual r) on `backend`: output and every
    gradient against float64, within twice PyTorch's own error."""

    def ours(x, r, w, b):
        if r is None:
            return layer_norm(x, normalized_shape, w, b, eps=1e-5)
        return add_layer_norm(x, r, normalized_shape, w, b, eps=1e-5)

    def torch_ln(x, r, w, b):
        return F.layer_norm(x if r is None else x + r, normalized_shape, w, b, eps=1e-5)

    def float64(x, r, w, b):
        return torch_ln(*(None if t is None else t.double() for t in (x, r, w, b)))

    with fastgpt.use_backend(backend):
        out, grads = _run(ours, tensors, grad)
    expected, expected_grads = _run(float64, tensors, grad.double())
    torch_out, torch_grads = _run(torch_ln, tensors, grad)
    assert_close("output", out, expected, torch_out)
    for name, g, eg, tg in zip(("dx", "dresidual", "dweight", "dbias"), grads, expected_grads, torch_grads):
        if g is not None:
            assert_close(name, g, eg, tg)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", SHAPES, ids=str)
def test_layer_norm(device, backend, dtype, shape, normalized_shape):
    _check(device, backend, dtype, shape, normalized_shape, "both", residual=False)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_affine_variants(device, backend, dtype, affine):
    _check(device, backend, dtype, (97, 300), (300,), affine, residual=False)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", [((3, 129, 768), (768,)), ((1, 1000), (1000,))], ids=str)
def test_add_layer_norm(device, backend, dtype, shape, normalized_shape):
    _check(device, backend, dtype, shape, normalized_shape, "both", residual=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [768, 1001, 16400])
@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_constant_rows(device, backend, dtype, cols, residual):
    """Rows that are constant (padding, a repeated embedding), far from 0: their mean must come out exact, since
    xhat = (z - mean) * rstd with rstd = 1 / sqrt(eps) turns the mean's rounding into an error of about 300 ulps of
    the mean, where PyTorch's result is exactly the bias. Every other row is random. 16400 takes the Triton kernels'
    chunked path."""
    rows = 6

    def leaf(scale, shift):
        values = torch.randn(rows, cols, device=device) * scale + shift
        values[1::2] = (torch.rand(rows // 2, 1, device=device) * 200 - 100).expand(-1, cols)
        return values.to(dtype).requires_grad_()
    x, r = leaf(2.0, 0.5), leaf(1.0, 0.0) if residual else None
    w = (torch.randn(cols, device=device) * 0.5 + 1).to(dtype).requires_grad_()
    b = torch.randn(cols, device=device).to(dtype).requires_grad_()
    _compare(backend, [x, r, w, b], torch.randn(rows, cols, device=device).to(dtype), (cols,))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_non_contiguous(device, backend, dtype):
    _check(device, backend, dtype, (50, 384), (384,), "both", residual=False, contiguous=False)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("cols", [8192, 8191, 16400])
def test_wide_rows_at_odd_offsets(device, backend, cols):
    """Wide rows in views that start 2 bytes past a 16-byte boundary, with residual and dropout. The CUDA kernel
    reads rows wider than 4096 only in 16-byte vectors: it must copy such views to aligned memory, and a row length
    that is no multiple of the vector must go to reference. 16400 takes the Triton kernels' chunked paths."""
    rows, dtype = 5, torch.float16

    def view(scale=1.0, shift=0.0):
        storage = (torch.randn(rows * cols + 1, device=device) * scale + shift).to(dtype)
        return storage[1:].view(rows, cols).requires_grad_()
    x, r = view(2.0, 0.5), view()
    w, b = (torch.randn(cols, device=device) * 0.5 + 1).to(dtype).requires_grad_(), view()[0].detach()
    b.requires_grad_()
    tensors, grad = [x, r, w, b], view().detach()
    if device == "cuda" and backend == "csrc":
        assert _kernel_supports(backend, x, w, b, cols) == (cols % 8 == 0)
    _check_add_dropout(device, backend, tensors, grad, 0.25)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_float32_params_with_half_input(device, backend):
    """Under autocast, activations are bf16 while LayerNorm's parameters stay float32: the kernels take both,
    returning a bf16 output and float32 parameter gradients."""
    x = torch.randn(64, 256, device=device).bfloat16().requires_grad_()
    w = (torch.randn(256, device=device) * 0.5 + 1).requires_grad_()
    b = torch.randn(256, device=device).requires_grad_()
    grad = torch.randn(64, 256, device=device).bfloat16()

    def ours(x, w, b):
        return layer_norm(x, (256,), w, b)

    def torch_ln(x, w, b):
        return F.layer_norm(x, (256,), w, b)

    with fastgpt.use_backend(backend):
        out, grads = _run(ours, [x, w, b], grad)
    expected, expected_grads = _run(torch_ln, [t.detach().double().requires_grad_() for t in (x, w, b)],
                                    grad.double())
    torch_out, torch_grads = _run(torch_ln, [x, w, b], grad)
    assert out.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    assert_close("output", out, expected, torch_out)
    for name, g, eg, tg in zip(("dx", "dweight", "dbias"), grads, expected_grads, torch_grads):
        assert_close(name, g, eg, tg)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_add_layer_norm_dropout(device, backend, dtype, dropout_p):
    """LN(dropout(x) + residual) at two rates, against the reference with the kernel's own mask."""
    shape, cols = (3, 41, 160), 160
    x, r, w, b = _make(shape, (cols,), dtype, device, "both", residual=True)
    _check_add_dropout(device, backend, [x, r, w, b], torch.randn(shape, device=device).to(dtype), dropout_p)


def _check_add_dropout(device, backend, tensors, grad, dropout_p):
    """add_layer_norm(x, r, w, b) with dropout against the reference computed with the very mask the kernel drew:
    row's Philox stream (row, 0, 1) at column col, from the seed the op drew from torch's generator."""
    cols = tensors[0].shape[-1]
    torch.manual_seed(2024)
    with fastgpt.use_backend(backend):
        out, grads = _run(lambda *t: add_layer_norm(*t[:2], (cols,), *t[2:], dropout_p=dropout_p), tensors, grad)
    torch.manual_seed(2024)
    keep = elementwise_dropout_keep(draw_seed(), grad.numel() // cols, cols, dropout_p, device).view(grad.shape)

    def torch_ln(x, r, w, b):
        return F.layer_norm(x * keep.to(x.dtype) * (1 / (1 - dropout_p)) + r, (cols,), w, b)

    expected, expected_grads = _run(torch_ln, [t.detach().double().requires_grad_() for t in tensors],
                                    grad.double())
    torch_out, torch_grads = _run(torch_ln, tensors, grad)
    assert_close("output", out, expected, torch_out)
    for name, g, eg, tg in zip(("dx", "dresidual", "dweight", "dbias"), grads, expected_grads, torch_grads):
        assert_close(name, g, eg, tg)


def test_dropout_mask_statistics():
    """The element-wise stream drops a fraction p of the elements, within 5 binomial standard deviations, and
    different seeds give different masks."""
    rows, cols, p = 300, 500, 0.3
    keep = elementwise_dropout_keep(draw_seed(), rows, cols, p)
    n = rows * cols
    assert abs((~keep).sum().item() - p * n) <= 5 * (n * p * (1 - p)) ** 0.5
    assert not torch.equal(keep, elementwise_dropout_keep(draw_seed(), rows, cols, p))


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_dropout_only_in_training(backend):
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    with fastgpt.use_backend(backend):
        evaluated = add_layer_norm(x, r, (32,), dropout_p=0.5, training=False)
    torch.testing.assert_close(evaluated, F.layer_norm(x + r, (32,)))


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_dropout_p_in_any_form(backend):
    """dropout_p as PyTorch takes it: a NumPy scalar or a 0-d tensor draws the float's mask."""
    np = pytest.importorskip("numpy")
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    with fastgpt.use_backend(backend):
        torch.manual_seed(5)
        expected = add_layer_norm(x, r, (32,), dropout_p=0.25)
        for dropout_p in (np.float32(0.25), torch.tensor(0.25)):
            torch.manual_seed(5)
            torch.testing.assert_close(add_layer_norm(x, r, (32,), dropout_p=dropout_p), expected)


# --- fallback: inputs a kernel does not take go to reference, and still give the right answer ----------------

@pytest.mark.parametrize("backend", [b for b in fastgpt.available_backends("cpu") if b != "reference"])
@pytest.mark.parametrize("dtype,cols", [(torch.float64, 64), (torch.float32, 65537)], ids=["float64", "wide-row"])
def test_unsupported_inputs_fall_back_to_reference(backend, dtype, cols):
    x = torch.randn(3, cols, dtype=dtype)
    w = torch.randn(cols, dtype=dtype)
    if backend == "triton" or dtype == torch.float64:
        assert not _kernel_supports(backend, x, w, None, cols)
        assert backends.select(x.device, lambda name: _kernel_supports(name, x, w, None, cols),
                               preference=(backend,)) == "reference"
    with fastgpt.use_backend(backend):
        out = layer_norm(x, (cols,), w)
    torch.testing.assert_close(out, F.layer_norm(x, (cols,), w))


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_normalized_shape_integers_of_any_kind(backend):
    """normalized_shape as torch.nn.LayerNorm and F.layer_norm take it: a NumPy integer, bare or in a tuple, is the
    size it holds (a bare one failed as 'not iterable', one in a tuple as not a positive int)."""
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 4, 8)
    expected = F.layer_norm(x, (4, 8))
    with fastgpt.use_backend(backend):
        torch.testing.assert_close(layer_norm(x, (np.int64(4), np.int32(8))), expected)
        torch.testing.assert_close(layer_norm(x, x.shape[1:]), expected)
        torch.testing.assert_close(layer_norm(x, np.int64(8)), F.layer_norm(x, (8,)))


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_bias_and_no_weight(backend, dtype):
    """A float32 bias without a weight on a half input, which the kernels take: the reference backend's backward
    failed with PyTorch's own 'expected scalar type Half but found Float'."""
    x = torch.randn(6, 16).to(dtype).requires_grad_()
    b = torch.randn(16).requires_grad_()
    grad = torch.randn(6, 16).to(dtype)
    with fastgpt.use_backend(backend):
        out, (dx, db) = _run(lambda x, b: layer_norm(x, 16, None, b), [x, b], grad)
    expected, (ex, eb) = _run(lambda x, b: F.layer_norm(x, (16,), None, b),
                              [t.detach().double().requires_grad_() for t in (x, b)], grad.double())
    assert out.dtype == dtype and dx.dtype == dtype and db.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)
    torch.testing.assert_close(dx.double(), ex, atol=2e-2, rtol=0)
    torch.testing.assert_close(db.double(), eb, atol=2e-2, rtol=0)


def test_mixed_parameter_dtypes_fall_back():
    x = torch.randn(4, 8)
    w, b = torch.randn(8, dtype=torch.float16), torch.randn(8)
    assert not _kernel_supports("csrc", x, w, b, 8)


def test_empty_input():
    for backend in fastgpt.available_backends("cpu"):
        with fastgpt.use_backend(backend):
            assert layer_norm(torch.randn(0, 16), (16,)).shape == (0, 16)


# --- bad input: the same clear error from every backend ----------------------------------------------------------

BAD_INPUTS = [
    (lambda: layer_norm(torch.randn(4, 8), (7,)), ValueError, "does not end with normalized_shape"),
    (lambda: layer_norm(torch.randn(4, 8), (8,), torch.randn(7)), ValueError, "expected weight of shape"),
    (lambda: layer_norm(torch.randn(4, 8), (8,), None, torch.randn(2, 4)), ValueError, "expected bias of shape"),
    (lambda: layer_norm(torch.randint(0, 5, (4, 8)), (8,)), TypeError, "expected input to have a floating"),
    (lambda: layer_norm(torch.randn(4, 8), (8,), torch.randn(8, device="meta")), ValueError, "same device"),
    (lambda: add_layer_norm(torch.randn(4, 8), torch.randn(4, 8).half(), (8,)), TypeError,
     "expected residual to have the same dtype"),
    (lambda: add_layer_norm(torch.randn(4, 8), torch.randn(8), (8,)), ValueError, "expected residual of shape"),
    (lambda: layer_norm(torch.randn(4, 8), (0,)), ValueError, "positive ints"),
    (lambda: layer_norm(torch.randn(4, 8), -8), ValueError, "positive ints"),
    (lambda: layer_norm(torch.randn(4, 8), (True,)), ValueError, "positive ints"),
    # () normalizes nothing: PyTorch refused it while the kernels returned the bias.
    (lambda: layer_norm(torch.randn(4, 8), ()), ValueError, "normalized_shape with at least one dim"),
    (lambda: layer_norm(torch.randn(4, 8), 8.0), TypeError, "expected normalized_shape to be an int or a sequence"),
    (lambda: add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), (8,), dropout_p=1.0), ValueError,
     r"dropout_p in \[0, 1\)"),
    (lambda: layer_norm([1.0, 2.0], (2,)), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(backend, call, error, message):
    with fastgpt.use_backend(backend), pytest.raises(error, match=message):
        call()


# --- the custom ops: schema, fake, autograd registration, and torch.compile without graph breaks -----------------

def _custom_ops():
    ops = [("triton", torch.ops.fastgpt_triton.layer_norm_fwd.default, torch.ops.fastgpt_triton.layer_norm_bwd.default)]
    if backends.CSRC_LOADED:
        ops.append(("csrc", torch.ops.fastgpt.layer_norm_fwd.default, torch.ops.fastgpt.layer_norm_bwd.default))
    return [pytest.param(f, b, id=name) for name, f, b in ops if name in fastgpt.available_backends("cpu")]


@pytest.mark.parametrize("fwd,bwd", _custom_ops())
@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(fwd, bwd, with_residual):
    x = torch.randn(6, 40, requires_grad=True)
    r = torch.randn(6, 40, requires_grad=True) if with_residual else None
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    seed = torch.tensor(1234)
    for dropout_p in (0.0, 0.25):
        torch.library.opcheck(fwd, (x, r, w, b, 1e-5, dropout_p, seed))
        _, mean, rstd = fwd(x.detach(), None if r is None else r.detach(), w.detach(), b.detach(), 1e-5,
                            dropout_p, seed)
        torch.library.opcheck(bwd, (torch.randn(6, 40), x.detach(), None if r is None else r.detach(), w.detach(),
                                    mean, rstd, True, dropout_p, seed))


@pytest.mark.parametrize("fwd,bwd", _custom_ops())
def test_eager_call_matches_the_registered_op(fwd, bwd):
    """Eager code calls each kernel through fastgpt.ops._registration.eager_call, which bypasses torch.library's
    autograd wrapper; torch.compile and opcheck see the registered op. Both must give the same output and the same
    gradients, bit for bit, and without grad the eager call must not record a graph."""
    from fastgpt.ops.layer_norm import _OPS
    backend = "csrc" if fwd.namespace == "fastgpt" else "triton"
    x = torch.randn(7, 33, requires_grad=True)
    r = torch.randn(7, 33, requires_grad=True)
    w, b = torch.rand(33).add(0.5).requires_grad_(), torch.randn(33, requires_grad=True)
    grad = torch.randn(7, 33)
    seed = torch.tensor(99)
    results = []
    for call in (_OPS[backend], fwd):
        out, mean, rstd = call(x, r, w, b, 1e-5, 0.25, seed)
        assert not mean.requires_grad and not rstd.requires_grad
        results.append((out, mean, rstd, *torch.autograd.grad(out, (x, r, w, b), grad)))
    for eager, registered in zip(*results):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)
    with torch.no_grad():
        assert not _OPS[backend](x, r, w, b, 1e-5, 0.0, seed)[0].requires_grad


def test_direct_when_eager_bypasses_the_dispatcher_only_where_nothing_watches():
    """direct_when_eager calls a Python custom op's own function in plain eager code, and the op itself wherever the
    dispatcher's work could be seen: a dispatch mode, a torch function mode, the profiler, the JIT tracer, a tensor
    subclass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastgpt.ops._registration import direct_when_eager

    ran = []

    class Op:  # stands for a torch.library.custom_op: callable, with the function it wraps as _init_fn
        def __init__(self):
            self._init_fn = lambda x: ran.append("kernel") or x + 1

        def __call__(self, x):
            ran.append("op")
            return x + 1

    class Watching(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    call = direct_when_eager(Op())
    x = torch.randn(3)
    for context, arg, expected in [(contextlib.nullcontext(), x, "kernel"),
                                   (contextlib.nullcontext(), torch.nn.Parameter(x), "kernel"),
                                   (contextlib.nullcontext(), x.as_subclass(Subclass), "op"), (Watching(), x, "op"),
                                   (torch.device("cpu"), x, "op"), (torch.profiler.profile(), x, "op")]:
        ran.clear()
        with context:
            torch.testing.assert_close(call(arg), x + 1)
        assert ran == [expected], (context, type(arg))
    ran.clear()
    torch.jit.trace(call, x, check_trace=False)  # the tracer records the op, not what its function does
    assert ran == ["op"]
    assert direct_when_eager(torch.ops.aten.add.Tensor) is torch.ops.aten.add.Tensor  # a C++ op: as it is


@pytest.mark.skipif("triton" not in fastgpt.available_backends("cpu"), reason="the triton backend does not run here")
def test_triton_ops_seen_by_a_dispatch_mode():
    """With a dispatch mode active (FlopCounterMode, FakeTensorMode, a logger), the Triton backend's forward and
    backward reach the mode as its custom ops, as they did before eager calls bypassed the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Logging(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    with fastgpt.use_backend("triton"), Logging():
        out = layer_norm(x, 24, w)
        out.backward(torch.randn_like(out))
    assert "fastgpt_triton.layer_norm_fwd.default" in seen and "fastgpt_triton.layer_norm_bwd.default" in seen


@pytest.mark.parametrize("backend", fastgpt.available_backends("cpu"))
def test_torch_compile_fullgraph(backend):
    ln = fastgpt.nn.LayerNorm(48)

    def block(x, residual):
        return ln(add_layer_norm(x, residual, (48,)))

    x = torch.randn(5, 48, requires_grad=True)
    residual = torch.randn(5, 48)
    with fastgpt.use_backend(backend):
        expected = block(x, residual)
        expected.sum().backward()
        grad, x.grad = x.grad.clone(), None
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)(x, residual)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, expected)
    torch.testing.assert_close(x.grad, grad)


# --- fastgpt.nn.LayerNorm is a drop-in for torch.nn.LayerNorm ----------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(normalized_shape=64), dict(normalized_shape=(4, 16), eps=1e-6),
                                    dict(normalized_shape=64, elementwise_affine=False),
                                    dict(normalized_shape=64, bias=False)], ids=str)
def test_nn_layer_norm_drop_in(kwargs):
    theirs = torch.nn.LayerNorm(**kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = fastgpt.nn.LayerNorm(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    x = torch.randn(3, 5, *ours.normalized_shape)
    for backend in fastgpt.available_backends("cpu"):
        with fastgpt.use_backend(backend):
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
