"""LayerNorm, and the residual-add LayerNorm that follows every sub-layer of a post-LN block.

    z = dropout(x) + residual             (add_layer_norm; layer_norm has z = x)
    y = (z - mean(z)) * rstd * weight + bias,   rstd = 1 / sqrt(var(z) + eps)

mean and the biased var are taken over the trailing `normalized_shape` dimensions, always in float32. The
backward pass, per row, with xhat = (z - mean) * rstd and g = dy * weight (N = numel(normalized_shape)):

    dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dresidual = dz,  dx = dz * keep / (1 - p)
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy

Kernels keep the row statistics (mean, rstd: float32, one per row) for the backward pass and recompute z from
x and residual rather than storing it: the same traffic (one more read instead of one more write) and less memory.
The dropout mask is not stored either: element (row, col) of the (M, N) view is kept iff its uniform in the
Philox stream (row, 0, 1) is >= p (fastgpt/ops/philox.py), which the backward pass draws again from the seed.

Backends (see fastgpt.backends):
    reference  torch.nn.functional.layer_norm
    triton     kernels/layer_norm.py, as custom ops fastgpt_triton::layer_norm_{fwd,bwd}
    csrc       csrc/cpu/layer_norm.cpp, csrc/cuda/layer_norm.cu, as fastgpt::layer_norm_{fwd,bwd}
               (schemas in csrc/fastgpt.cpp)
Kernels take contiguous (M, N) rows; weight and bias (N,) in the input's dtype or float32.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from fastgpt import backends
from fastgpt.ops._checks import check_dropout_p, check_like, check_tensor
from fastgpt.ops._registration import register_kernel_op
from fastgpt.ops.philox import draw_seed, elementwise_dropout_keep

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row each kernel keeps on chip (one pass over the row); wider rows go to reference.
MAX_N = {"triton": 65536, "csrc": {"cpu": None, "cuda": 16384}}
# The CUDA kernel reads rows wider than this (kWideRow in csrc/cuda/layer_norm.cuh) only in 16-byte vectors, so
# their length must be a multiple of the vector; other lengths go to reference.
CUDA_VECTOR_ONLY_N = 4096


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: the schema (fake implementation) and autograd formula are shared by both kernel backends.

def _fwd_fake(input, residual, weight, bias, eps, dropout_p, seed):
    rows = input.shape[0]
    stats = input.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _bwd_fake(grad_output, input, residual, weight, mean, rstd, compute_affine_grads, dropout_p, seed):
    cols = input.shape[1] if compute_affine_grads else 0
    affine = input.new_empty(cols, dtype=torch.float32)
    grad_residual = torch.empty_like(input) if residual is not None and dropout_p > 0 else input.new_empty(0)
    return torch.empty_like(input), grad_residual, affine, torch.empty_like(affine)


def _setup_context(ctx, inputs, output):
    input, residual, weight, bias, _eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, residual, weight, mean, rstd, seed)
    ctx.has_residual = residual is not None
    ctx.dropout_p = dropout_p
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _autograd_for(bwd_op):
    def backward(ctx, grad_output, _grad_mean, _grad_rstd):
        input, residual, weight, mean, rstd, seed = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        compute_affine_grads = weight_dtype is not None or bias_dtype is not None
        grad_input, grad_residual, grad_weight, grad_bias = bwd_op(
            grad_output.contiguous(), input, residual, weight, mean, rstd, compute_affine_grads, ctx.dropout_p, seed)
        if ctx.has_residual and ctx.dropout_p == 0:
            grad_residual = grad_input  # dz itself: the kernels return it once
        return (grad_input,
                grad_residual if ctx.has_residual else None,
                None if weight_dtype is None else grad_weight.to(weight_dtype),
                None if bias_dtype is None else grad_bias.to(bias_dtype),
                None, None, None)
    return backward


def _register(fwd_op, bwd_op):
    return register_kernel_op(fwd_op, bwd_op, _fwd_fake, _bwd_fake, _autograd_for, _setup_context)


@torch.library.custom_op("fastgpt_triton::layer_norm_fwd", mutates_args=())
def _triton_fwd(input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float, dropout_p: float,
                seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.layer_norm import layer_norm_forward
    return layer_norm_forward(input, residual, weight, bias, eps, dropout_p, seed)


@torch.library.custom_op("fastgpt_triton::layer_norm_bwd", mutates_args=())
def _triton_bwd(grad_output: torch.Tensor, input: torch.Tensor, residual: torch.Tensor | None,
                weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, compute_affine_grads: bool,
                dropout_p: float, seed: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastgpt.kernels.layer_norm import layer_norm_backward
    return layer_norm_backward(grad_output, input, residual, weight, mean, rstd, compute_affine_grads, dropout_p,
                               seed)


_OPS = {"triton": _register(_triton_fwd, _triton_bwd)}
if backends.CSRC_LOADED:
    _OPS["csrc"] = _register(torch.ops.fastgpt.layer_norm_fwd.default, torch.ops.fastgpt.layer_norm_bwd.default)


# ---------------------------------------------------------------------------------------------------------------
# The public ops.

def layer_norm(input: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.layer_norm, on fastgpt's kernels."""
    if isinstance(input, torch.Tensor) and input.is_nested:
        # Ragged rows have no (rows, cols) view for the kernels: PyTorch's nested kernels run them (torch.nn's
        # TransformerEncoder hands its final norm a nested batch in inference).
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _layer_norm("layer_norm", input, None, normalized_shape, weight, bias, eps, 0.0, 0.0)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: int | Sequence[int],
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                   dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """layer_norm(dropout(x) + residual, ...) in one pass, the epilogue of a post-LN sub-layer (x is the sub-layer's
    output, residual its input): the sum is formed in float32 and never written to memory, and the dropout mask is
    drawn in the kernel (only when `training`, as F.dropout)."""
    return _layer_norm("add_layer_norm", x, residual, normalized_shape, weight, bias, eps,
                       dropout_p if training else 0.0, dropout_p)


def _check(op, input, residual, normalized_shape, weight, bias, dropout_p) -> tuple[int, ...]:
    check_tensor(op, "input" if residual is None else "x", input)
    check_dropout_p(op, dropout_p)
    # Sizes as torch.nn.LayerNorm and F.layer_norm take them: any integer (a NumPy one included; a bare int
    # (np.int64) failed as 'not iterable', one inside a tuple as not an int), never a bool. A plain int or a tuple
    # of them (every module's case) skips the ABC checks, a few us a call.
    if type(normalized_shape) is int:
        normalized_shape = (normalized_shape,)
    if not (type(normalized_shape) is tuple and all(type(s) is int for s in normalized_shape)):
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        try:
            normalized_shape = tuple(normalized_shape)
        except TypeError:
            raise TypeError(f"{op}: expected normalized_shape to be an int or a sequence of ints, "
                            f"got {type(normalized_shape).__name__}") from None
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in normalized_shape):
            raise ValueError(f"{op}: expected normalized_shape to be positive ints, got {normalized_shape}")
        normalized_shape = tuple(int(s) for s in normalized_shape)
    if not all(s > 0 for s in normalized_shape):
        raise ValueError(f"{op}: expected normalized_shape to be positive ints, got {normalized_shape}")
    # () normalizes nothing: PyTorch (the reference backend) refuses it, and the kernels, taking each element for a
    # row of one, returned the bias.
    if not normalized_shape:
        raise ValueError(f"{op}: expected normalized_shape with at least one dim, got ()")
    if len(normalized_shape) > input.dim() or tuple(input.shape[input.dim() - len(normalized_shape):]) \
            != normalized_shape:
        raise ValueError(f"{op}: input of shape {tuple(input.shape)} does not end with "
                         f"normalized_shape {normalized_shape}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_like(op, "residual", residual, "x", input)
        if residual.shape != input.shape:
            raise ValueError(f"{op}: expected residual of shape {tuple(input.shape)} (the shape of x), "
                             f"got {tuple(residual.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_tensor(op, name, param)
        check_like(op, name, param, "input", input, dtype=False)
        if tuple(param.shape) != normalized_shape:
            raise ValueError(f"{op}: expected {name} of shape {normalized_shape} (normalized_shape), "
                             f"got {tuple(param.shape)}")
    return normalized_shape


def _kernel_supports(backend, input, weight, bias, cols) -> bool:
    if input.dtype not in _KERNEL_DTYPES or input.numel() == 0:
        return False
    param_dtypes = {p.dtype for p in (weight, bias) if p is not None}
    if len(param_dtypes) > 1 or not param_dtypes <= {input.dtype, torch.float32}:
        return False
    if (backend == "csrc" and input.device.type == "cuda" and cols > CUDA_VECTOR_ONLY_N
            and cols % (16 // input.element_size()) != 0):
        return False
    limit = MAX_N[backend]
    if isinstance(limit, dict):
        limit = limit[input.device.type]
    return limit is None or cols <= limit


def _layer_norm(op, input, residual, normalized_shape, weight, bias, eps, dropout_p, requested_dropout_p):
    normalized_shape = _check(op, input, residual, normalized_shape, weight, bias, requested_dropout_p)
    dropout_p = float(dropout_p)
    cols = math.prod(normalized_shape)
    rows = input.numel() // cols
    seed = draw_seed() if dropout_p > 0 else None
    backend = backends.select(input.device, lambda name: _kernel_supports(name, input, weight, bias, cols))
    if backend == "reference":
        if seed is not None:
            keep = elementwise_dropout_keep(seed, rows, cols, dropout_p, input.device).view(input.shape)
            input = input * keep.to(input.dtype) * (1.0 / (1.0 - dropout_p))
        z = input if residual is None else input + residual
        if weight is None and bias is not None and bias.dtype != z.dtype:
            # PyTorch's CPU backward of a float16/bfloat16 input with a float32 bias and no weight fails ('expected
            # scalar type Half but found Float'), where the kernels take these parameters; a weight of ones (the
            # same result) takes PyTorch's mixed-dtype path, which works.
            weight = torch.ones_like(bias)
        return F.layer_norm(z, normalized_shape, weight, bias, eps)
    output, _mean, _rstd = _OPS[backend](
        _as_shape(input, (rows, cols)), None if residual is None else _as_shape(residual, (rows, cols)),
        None if weight is None else _as_shape(weight, (cols,)), None if bias is None else _as_shape(bias, (cols,)),
        float(eps), float(dropout_p), seed)
    return output if output.shape == input.shape else output.view(input.shape)


def _as_shape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` as a contiguous tensor of `shape`: itself when it is one already. A reshape that changes nothing still
    adds a view node to the autograd graph, about 5 us of host time per node in a backward pass (CPU, torch 2.13),
    as much as a small LayerNorm's kernel."""
    if t.shape == shape and t.is_contiguous():
        return t
    return t.reshape(shape).contiguous()
