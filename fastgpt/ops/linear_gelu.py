"""The GELU feed-forward block: linear_gelu = gelu(x @ W^T + b) and gelu_ffn = dropout(W2 gelu(W1 x + b1) + b2).

    pre = x W^T + b,  y = act(pre)
    gelu(x)      = x Phi(x) = 1/2 x (1 + erf(x / sqrt 2))                 (approximate="none")
    gelu_tanh(x) = 1/2 x (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3)  (approximate="tanh", GPT-1's)

Backward, given dy: dpre = dy * act'(pre); db = sum over rows of dpre; dx = dpre W; dW = dpre^T x.
In the block, the output dropout's gradient is dz = dout * mask / (1 - p), db2 = sum of dz, dW2 = dz^T h, and the
first layer's dpre = (dz W2) * act'(pre) comes out of one matrix product with a fused epilogue.

The kernels fuse everything element-wise into the matrix products' epilogues (bias, activation, the stored
pre-activation, the output dropout; backward: act', the bias gradient as deterministic column sums). The plain
products that are left (dx = dpre W, dW = dpre^T x) go to torch.matmul: there is nothing left to fuse into them,
and cuBLAS / oneDNN (with split-K for dW's long reduction over tokens) is the fastest plain product there is.
`recompute=True` stores no pre-activation (nor, in the block, the hidden activation): the backward pass
recomputes it from x, trading one matrix product for M x d_ff elements of memory.

Dropout draws the shared Philox stream (fastgpt/ops/philox.py) (row, 0, 1) at column col of the (M, N) output,
M = the flattened leading dims; the seed is an int64 CPU tensor drawn from torch's default generator, so
torch.manual_seed reproduces the mask on every backend.

Backends (see fastgpt.backends):
    reference  F.linear, F.gelu / F.relu, the Philox dropout mask
    triton     kernels/linear_gelu.py, as custom ops fastgpt_triton::linear_gelu_{fwd,bwd,bwd_recompute,dact}
    csrc       csrc/cpu/linear_gelu.cpp, csrc/cuda/linear_gelu.cu, as fastgpt::linear_gelu_{fwd,bwd,...}
               (schemas in csrc/fastgpt.cpp)
Kernels take contiguous (M, K) inputs and (N, K) weights of one dtype (float32, float16, bfloat16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastgpt import backends
from fastgpt.ops._autocast import autocast_disabled, autocast_inputs
from fastgpt.ops._checks import check_dropout_p, check_like, check_tensor
from fastgpt.ops._registration import direct_when_eager, refuse_create_graph, register_kernel_op
from fastgpt.ops.philox import dropout_seed, elementwise_dropout_keep

APPROXIMATIONS = ("none", "tanh")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops. Schemas (both kernel backends):
#   linear_gelu_fwd(input (M, K), weight (N, K), bias (N,)?, activation, store_pre, dropout_p, seed)
#       -> (out (M, N), pre (M, N) or empty)
#   linear_gelu_bwd(grad (M, N), pre?, activation, dropout_p, seed, bias_grad) -> (dpre (M, N), dbias f32 (N,) or empty)
#   linear_gelu_bwd_recompute(grad (M, N), input, weight, bias?, activation, bias_grad) -> (dpre, dbias)
#   linear_gelu_dact(grad (M, N), weight (N, K), pre (M, K), activation, bias_grad) -> (dpre (M, K), dbias (K,))
# activation: "none", "gelu", "gelu_tanh", "relu".

def _fwd_fake(input, weight, bias, activation, store_pre, dropout_p, seed):
    out = input.new_empty(input.shape[0], weight.shape[0])
    return out, (torch.empty_like(out) if store_pre else input.new_empty(0))


def _bwd_fake(grad, pre, activation, dropout_p, seed, bias_grad):
    return torch.empty_like(grad), grad.new_empty(grad.shape[1] if bias_grad else 0, dtype=torch.float32)


def _bwd_recompute_fake(grad, input, weight, bias, activation, bias_grad):
    return torch.empty_like(grad), grad.new_empty(grad.shape[1] if bias_grad else 0, dtype=torch.float32)


def _dact_fake(grad, weight, pre, activation, bias_grad):
    return torch.empty_like(pre), grad.new_empty(pre.shape[1] if bias_grad else 0, dtype=torch.float32)


class _Ops:
    """One backend's four custom ops; `call` is `fwd` as eager code calls it, and once registered (_register),
    `bwd`, `bwd_recompute` and `dact` are theirs (direct_when_eager)."""

    def __init__(self, fwd, bwd, bwd_recompute, dact):
        self.fwd, self.bwd, self.bwd_recompute, self.dact = fwd, bwd, bwd_recompute, dact


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, store_pre, dropout_p, seed = inputs
    _, pre = output
    ctx.save_for_backward(input, weight, bias, pre if store_pre else None, seed)
    ctx.activation, ctx.dropout_p = activation, dropout_p
    ctx.mark_non_differentiable(pre)


def _autograd_for(ops: _Ops):
    def backward(ctx, grad_out, _grad_pre):
        input, weight, bias, pre, seed = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        bias_grad = bias is not None and needs_bias
        grad_out = grad_out.contiguous()
        if pre is not None or ctx.activation == "none":
            dpre, dbias = ops.bwd(grad_out, pre, ctx.activation, ctx.dropout_p, seed, bias_grad)
        else:
            dpre, dbias = ops.bwd_recompute(grad_out, input, weight, bias, ctx.activation, bias_grad)
        return (dpre @ weight if needs_input else None,
                dpre.t() @ input if needs_weight else None,
                dbias.to(bias.dtype) if bias_grad else None,
                None, None, None, None)
    return backward


def _register(ops: _Ops) -> _Ops:
    """The forward and its backward op as every kernel op is registered (register_kernel_op; the backward formula
    needs all four ops), plus the fakes of the two ops only the backward calls."""
    torch.library.register_fake(ops.bwd_recompute)(_bwd_recompute_fake)
    torch.library.register_fake(ops.dact)(_dact_fake)
    ops.call = register_kernel_op(ops.fwd, ops.bwd, _fwd_fake, _bwd_fake, lambda _bwd: _autograd_for(ops),
                                  _setup_context)
    ops.bwd, ops.bwd_recompute, ops.dact = map(direct_when_eager, (ops.bwd, ops.bwd_recompute, ops.dact))
    return ops


@torch.library.custom_op("fastgpt_triton::linear_gelu_fwd", mutates_args=())
def _triton_fwd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                store_pre: bool, dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.linear_gelu import linear_act
    out, pre = linear_act(input, weight, bias, activation, store_pre=store_pre, dropout_p=dropout_p,
                          seed=int(seed.item()) if dropout_p > 0 else 0)
    return out, (pre if pre is not None else input.new_empty(0))


@torch.library.custom_op("fastgpt_triton::linear_gelu_bwd", mutates_args=())
def _triton_bwd(grad: torch.Tensor, pre: torch.Tensor | None, activation: str, dropout_p: float,
                seed: torch.Tensor, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.linear_gelu import act_bwd
    dpre, dbias = act_bwd(grad, pre, activation, bias_grad=bias_grad, dropout_p=dropout_p,
                          seed=int(seed.item()) if dropout_p > 0 else 0)
    return dpre, (dbias if dbias is not None else grad.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("fastgpt_triton::linear_gelu_bwd_recompute", mutates_args=())
def _triton_bwd_recompute(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          activation: str, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.linear_gelu import linear_dact_recompute
    dpre, dbias = linear_dact_recompute(input, weight, bias, grad, activation, bias_grad=bias_grad)
    return dpre, (dbias if dbias is not None else grad.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("fastgpt_triton::linear_gelu_dact", mutates_args=())
def _triton_dact(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, activation: str,
                 bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.linear_gelu import linear_dact
    dpre, dbias = linear_dact(grad, weight, pre, activation, bias_grad=bias_grad)
    return dpre, (dbias if dbias is not None else grad.new_empty(0, dtype=torch.float32))


_OPS = {"triton": _register(_Ops(_triton_fwd, _triton_bwd, _triton_bwd_recompute, _triton_dact))}
if backends.CSRC_LOADED:
    _OPS["csrc"] = _register(_Ops(torch.ops.fastgpt.linear_gelu_fwd.default, torch.ops.fastgpt.linear_gelu_bwd.default,
                                  torch.ops.fastgpt.linear_gelu_bwd_recompute.default,
                                  torch.ops.fastgpt.linear_gelu_dact.default))


def _block(ops: _Ops, x, w1, b1, w2, b2, activation: str, store_pre: bool, dropout_p: float, seed):
    """The block's two products on one backend's ops: (out, the hidden activation h, pre or empty)."""
    h, pre = ops.call(x, w1, b1, activation, store_pre, 0.0, seed)
    out, _ = ops.call(h, w2, b2, "none", False, dropout_p, seed)
    return out, h, pre


class _FeedForward(torch.autograd.Function):
    """The whole block on one backend's ops: its backward fuses act' into the product dz W2 (the `dact` op),
    which per-op autograd of two linear layers cannot express."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, backend: str, activation: str, dropout_p: float, seed, recompute: bool):
        out, h, pre = _block(_OPS[backend], x, w1, b1, w2, b2, activation, not recompute, dropout_p, seed)
        ctx.save_for_backward(x, w1, b1, w2, b2, None if recompute else h, None if recompute else pre, seed)
        ctx.backend, ctx.activation, ctx.dropout_p = backend, activation, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_create_graph(f"fastgpt.ops.gelu_ffn ({ctx.backend})")
        with autocast_disabled(grad_out.device.type):
            return _FeedForward._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, w1, b1, w2, b2, h, pre, seed = ctx.saved_tensors
        ops = _OPS[ctx.backend]
        needs = ctx.needs_input_grad
        if h is None:
            h, pre = ops.call(x, w1, b1, ctx.activation, True, 0.0, seed)
        grad_out = grad_out.contiguous()
        bias2_grad = b2 is not None and needs[4]
        if ctx.dropout_p > 0.0 or bias2_grad:
            # dz = dout * mask / (1 - p) and db2 in one pass.
            dz, db2 = ops.bwd(grad_out, None, "none", ctx.dropout_p, seed, bias2_grad)
        else:
            dz, db2 = grad_out, None
        dw2 = dz.t() @ h if needs[3] else None
        dx = dw1 = db1 = None
        if needs[0] or needs[1] or needs[2]:
            bias1_grad = b1 is not None and needs[2]
            dpre, db1 = ops.dact(dz, w2, pre, ctx.activation, bias1_grad)
            dx = dpre @ w1 if needs[0] else None
            dw1 = dpre.t() @ x if needs[1] else None
            db1 = db1.to(b1.dtype) if bias1_grad else None
        return (dx, dw1, db1, dw2, db2.to(b2.dtype) if bias2_grad else None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# The public ops.

def linear_gelu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none", *, recompute: bool = False) -> torch.Tensor:
    """F.gelu(F.linear(input, weight, bias), approximate=approximate), fused.

    recompute: store no pre-activation for the backward pass; recompute it there (one more matrix product)."""
    input, weight, bias = autocast_inputs(input, weight, bias)
    _check_linear("linear_gelu", input, weight, bias)
    _check_approximate("linear_gelu", approximate)
    activation = "gelu_tanh" if approximate == "tanh" else "gelu"
    backend = backends.select(input.device, lambda name: _kernel_supports(name, input, weight))
    if backend == "reference":
        return F.gelu(F.linear(input, weight, bias), approximate=approximate)
    # (tokens, in_features): a 2-D input as it is (a reshape that changes nothing is still a node in the autograd
    # graph, some us of host time in the backward pass).
    x2d = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    # The pre-activation is stored only for a backward pass to come (not in inference, nor with recompute).
    store_pre = not recompute and _needs_grad(input, weight, bias)
    with autocast_disabled(input.device.type):
        out, _pre = _OPS[backend].call(x2d.contiguous(), weight.contiguous(),
                                      None if bias is None else bias.contiguous(), activation, store_pre, 0.0,
                                      dropout_seed(0.0))
    return out if input.dim() == 2 else out.view(*input.shape[:-1], weight.shape[0])


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, approximate: str = "tanh", dropout_p: float = 0.0,
             training: bool = True, *, recompute: bool = False) -> torch.Tensor:
    """dropout(F.linear(gelu(F.linear(x, w1, b1)), w2, b2)): the position-wise feed-forward block."""
    _check_approximate("gelu_ffn", approximate)
    return _feed_forward("gelu_ffn", x, w1, b1, w2, b2, "gelu_tanh" if approximate == "tanh" else "gelu",
                         dropout_p, training, recompute)


def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, activation: str = "gelu", dropout_p: float = 0.0,
                 training: bool = True, *, recompute: bool = False) -> torch.Tensor:
    """gelu_ffn with the activation named: "gelu" (exact), "gelu_tanh" or "relu" (the original Transformer's)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"feed_forward: expected activation to be one of {', '.join(ACTIVATIONS)}, "
                         f"got {activation!r}")
    return _feed_forward("feed_forward", x, w1, b1, w2, b2, activation, dropout_p, training, recompute)


def _check_linear(op, input, weight, bias, input_name="input", weight_name="weight", bias_name="bias"):
    check_tensor(op, input_name, input)
    check_tensor(op, weight_name, weight)
    check_like(op, weight_name, weight, input_name, input)
    if input.dim() < 1:
        raise ValueError(f"{op}: expected {input_name} with at least 1 dim (..., in_features), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{op}: expected {weight_name} of shape (out_features, {input.shape[-1]}) to match "
                         f"{input_name}'s last dim, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, bias_name, bias)
        check_like(op, bias_name, bias, input_name, input)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: expected {bias_name} of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of `tensors` (None among them is skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_approximate(op, approximate):
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{op}: expected approximate to be 'none' or 'tanh', got {approximate!r}")


def _kernel_supports(backend: str, input: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels take float32/16-bit products with something in them: no rows, no inner or no output features
    (an empty result, or bias and zeros) go to reference."""
    return input.dtype in _KERNEL_DTYPES and input.numel() > 0 and weight.numel() > 0


def _feed_forward(op, x, w1, b1, w2, b2, activation, dropout_p, training, recompute):
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    _check_linear(op, x, w1, b1, "x", "w1", "b1")
    check_tensor(op, "w2", w2)
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{op}: expected w2 of shape (d_model, {w1.shape[0]}), got {tuple(w2.shape)}")
    _check_linear(op, x.new_empty(0, w1.shape[0]), w2, b2, "the hidden activation", "w2", "b2")
    p = check_dropout_p(op, dropout_p)
    p = p if training else 0.0
    seed = dropout_seed(p)
    backend = backends.select(x.device, lambda name: _kernel_supports(name, x, w1) and w2.numel() > 0)
    # (tokens, d_model), -1 not inferred (it cannot be for width 0); a 2-D x as it is, as in linear_gelu.
    x2d = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if backend == "reference":
        act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}[activation]
        out = F.linear(act(F.linear(x2d, w1, b1)), w2, b2)
        if p > 0.0:
            keep = elementwise_dropout_keep(seed, out.shape[0], out.shape[1], p, out.device)
            out = torch.where(keep, out * (1.0 / (1.0 - p)), 0.0)
    else:
        x2d, w1, b1, w2, b2 = (None if t is None else t.contiguous() for t in (x2d, w1, b1, w2, b2))
        with autocast_disabled(x.device.type):
            if _needs_grad(x, w1, b1, w2, b2):
                out = _FeedForward.apply(x2d, w1, b1, w2, b2, backend, activation, p, seed, recompute)
            else:  # inference: no autograd.Function, and no pre-activation stored
                out, _, _ = _block(_OPS[backend], x2d, w1, b1, w2, b2, activation, False, p, seed)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], w2.shape[0])
