"""LayerNorm (optionally fused with dropout and a residual add) in Triton: one pass forward, fused backward.

Forward, one program per row: the row z = dropout(x) (+ residual) is loaded once into registers (BLOCK_N >= N, a power of
two), mean and the biased variance are reduced in float32, and y = (z - mean) * rstd * w + b is stored in the
input dtype together with mean and rstd (float32, one per row) for the backward pass.

Backward, a persistent grid of G programs, program p taking rows p, p + G, p + 2G, ...: for each row it recomputes
xhat = (z - mean) * rstd, forms g = dy * w and

    dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),

and accumulates dy * xhat and dy in float32 registers; each program then writes its partial column sums, one row
of a (G, N) buffer, and the G rows are summed afterwards. No atomics: the result is deterministic.

Dropout keeps x[row, col] iff the Philox uniform at counters (col, row, 0, 1) is >= p, scaling kept values by
1 / (1 - p); the backward pass draws the same uniforms again instead of reading a stored mask.

Every load is upcast to float32 before any arithmetic, so bf16 is exact under the interpreter too.
"""

import torch
import triton
import triton.language as tl

from fastgpt.kernels.common import elementwise_dropout_uniform, to_dtype


@triton.jit
def _layer_norm_fwd(
    X,  # (M, N) input rows
    R,  # (M, N) residual rows, read only when HAS_RESIDUAL
    W,  # (N,) weight, read only when HAS_WEIGHT
    B,  # (N,) bias, read only when HAS_BIAS
    Y,  # (M, N) output rows
    Mean,  # (M,) float32 row means
    Rstd,  # (M,) float32 row reciprocal standard deviations
    N,  # row length
    eps,
    seed,  # dropout seed (int64), read only when DROPOUT
    dropout_p,  # dropout rate, read only when DROPOUT
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row32 = tl.program_id(0)
    row = row32.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    offsets = row * N + cols
    z = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = elementwise_dropout_uniform(seed, row32, cols) >= dropout_p
        z = tl.where(keep, z / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        z += tl.load(R + offsets, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(z, axis=0) / N
    centred = tl.where(in_row, z - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + offsets, to_dtype(y, Y.dtype.element_ty), mask=in_row)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd(
    DY,  # (M, N) gradient of the output
    X,  # (M, N) input rows (before dropout)
    R,  # (M, N) residual rows, read only when HAS_RESIDUAL
    W,  # (N,) weight, read only when HAS_WEIGHT
    Mean,  # (M,) float32
    Rstd,  # (M,) float32
    DX,  # (M, N) gradient of x: dz, times keep / (1 - p) when DROPOUT
    DZ,  # (M, N) gradient of z = dropout(x) + residual (= dresidual), written only when DROPOUT and HAS_RESIDUAL
    DW_partial,  # (G, N) float32 per-program column sums of dy * xhat, written when COMPUTE_AFFINE
    DB_partial,  # (G, N) float32 per-program column sums of dy, written when COMPUTE_AFFINE
    M,  # number of rows
    N,  # row length
    seed,  # dropout seed (int64), read only when DROPOUT
    dropout_p,  # dropout rate, read only when DROPOUT
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_AFFINE: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(program, M, programs):
        offsets = tl.cast(row, tl.int64) * N + cols
        z = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = elementwise_dropout_uniform(seed, row, cols) >= dropout_p
            z = tl.where(keep, z / (1.0 - dropout_p), 0.0)
        if HAS_RESIDUAL:
            z += tl.load(R + offsets, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(in_row, (z - mean) * rstd, 0.0)
        g = dy * w if HAS_WEIGHT else dy
        mean_g = tl.sum(g, axis=0) / N
        mean_gx = tl.sum(g * xhat, axis=0) / N
        dz = (g - mean_g - xhat * mean_gx) * rstd
        if DROPOUT:
            if HAS_RESIDUAL:
                tl.store(DZ + offsets, to_dtype(dz, DZ.dtype.element_ty), mask=in_row)
            dz = tl.where(keep, dz / (1.0 - dropout_p), 0.0)
        tl.store(DX + offsets, to_dtype(dz, DX.dtype.element_ty), mask=in_row)
        if COMPUTE_AFFINE:
            dw += dy * xhat
            db += dy
    if COMPUTE_AFFINE:
        tl.store(DW_partial + program * N + cols, dw, mask=in_row)
        tl.store(DB_partial + program * N + cols, db, mask=in_row)


def _launch_config(N: int) -> tuple[int, int]:
    """BLOCK_N covering the row, and enough warps that each thread holds at most ~16 float32 of it."""
    block_n = triton.next_power_of_2(N)
    num_warps = min(max(block_n // 512, 1), 16)
    return block_n, num_warps


def layer_norm_forward(input, residual, weight, bias, eps, dropout_p=0.0, seed=None):
    """input, residual: (M, N) contiguous; weight, bias: (N,) or None; seed: int64 CPU scalar tensor when
    dropout_p > 0. Returns (y, mean, rstd)."""
    M, N = input.shape
    y = torch.empty_like(input)
    mean = torch.empty(M, dtype=torch.float32, device=input.device)
    rstd = torch.empty(M, dtype=torch.float32, device=input.device)
    block_n, num_warps = _launch_config(N)
    _layer_norm_fwd[(M,)](
        input, input if residual is None else residual, input if weight is None else weight,
        input if bias is None else bias, y, mean, rstd, N, eps, _seed_value(seed), dropout_p,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


def _backward_programs(M: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; few on CPU (the interpreter runs them one by one)."""
    if device.type == "cuda":
        return min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(M, 4)


def _seed_value(seed) -> int:
    return 0 if seed is None else int(seed.item())


def layer_norm_backward(grad_output, input, residual, weight, mean, rstd, compute_affine_grads, dropout_p=0.0,
                        seed=None):
    """Returns (dx, dresidual, dweight, dbias). dresidual is empty unless there is a residual and dropout (it is dx
    otherwise); dweight and dbias are float32 (N,), or empty when not asked for."""
    M, N = input.shape
    dropout = dropout_p > 0
    dx = torch.empty_like(input)
    dz = torch.empty_like(input) if dropout and residual is not None else input.new_empty(0)
    programs = _backward_programs(M, input.device)
    partial_rows = programs if compute_affine_grads else 0
    dw_partial = torch.empty(partial_rows, N, dtype=torch.float32, device=input.device)
    db_partial = torch.empty(partial_rows, N, dtype=torch.float32, device=input.device)
    block_n, num_warps = _launch_config(N)
    _layer_norm_bwd[(programs,)](
        grad_output, input, input if residual is None else residual, input if weight is None else weight,
        mean, rstd, dx, dz, dw_partial, db_partial, M, N, _seed_value(seed), dropout_p,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, COMPUTE_AFFINE=compute_affine_grads,
        DROPOUT=dropout, BLOCK_N=block_n, num_warps=num_warps)
    if not compute_affine_grads:
        empty = torch.empty(0, dtype=torch.float32, device=input.device)
        return dx, dz, empty, empty.clone()
    return dx, dz, dw_partial.sum(0), db_partial.sum(0)
