"""LayerNorm (optionally fused with dropout and a residual add) in Triton: one pass forward, fused backward.

Forward, one program per row: the row z = dropout(x) (+ residual) is loaded once into registers (BLOCK_N >= N, a power of
two), mean and the biased variance are reduced in float32, and y = (z - mean) * rstd * w + b is stored in the
input dtype together with mean and rstd (float32, one per row) for the backward pass. The mean is taken as
z[0] + mean(z - z[0]): exact for a constant row, whose xhat must be exactly 0 rather than the rounding of sum(z) / N
times rstd = 1 / sqrt(eps), and no less accurate for any other row.

Backward, a persistent grid of G programs, program p taking rows p, p + G, p + 2G, ...: for each row it recomputes
xhat = (z - mean) * rstd, forms g = dy * w and

    dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),

and accumulates dy * xhat and dy in float32 registers; each program then writes its partial column sums, one row
of a (G, N) buffer, and the G rows are summed afterwards. No atomics: the result is deterministic.

Wide rows (WIDE): past WIDE_FORWARD (forward) and WIDE_BACKWARD (backward) elements a whole row no longer fits a
program's registers (ptxas spills, bench/triton_compile.py), so a program walks the row in BLOCK_N chunks instead,
twice: the forward gathers the statistics, merging each chunk's (count, mean, sum of squared deviations) of
z - z[0] into the row's as Chan, Golub and LeVeque do (one stable pass), then normalises; the backward gathers
mean(g) and mean(g * xhat), then writes dz. The row is read twice (the second time mostly from L2). The backward's
dweight and dbias then come from a column kernel, each program summing dy * xhat and dy over a slab of rows for a
block of columns: wide rows leave no registers to keep the whole row's sums.

Dropout keeps x[row, col] iff its uniform in the Philox stream (row, 0, 1) is >= p (word col % 4 of the call at
col // 4: fastgpt/ops/philox.py), scaling kept values by 1 / (1 - p); the backward pass draws the same uniforms
again instead of reading a stored mask. The seed is a fresh draw every call: the kernels take it unspecialised
(`do_not_specialize`), or Triton would compile a second variant for the one seed in 16 that is divisible by 16.

Every load is upcast to float32 before any arithmetic, so bf16 is exact under the interpreter too.
"""

import torch
import triton
import triton.language as tl

from fastgpt.kernels.common import cdiv, elementwise_dropout_uniform, next_power_of_2, to_dtype

# Widest rows (elements) each pass keeps whole in registers; wider rows are walked in chunks of CHUNK. From
# bench/triton_compile.py on sm_90a: the forward keeps 16384 (16 warps, 32 floats a thread) without spilling, the
# backward, holding z, dy, w, xhat and g at once, only 8192.
WIDE_FORWARD = 16384
WIDE_BACKWARD = 8192
CHUNK = 4096


@triton.jit
def _load_z(X, R, offsets, row, col0, mask, seed, dropout_p, HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """(z, keep) for the elements `offsets` of row(s) `row` (a scalar, or an (R, 1) column), columns col0 ..
    col0 + BLOCK_N - 1: z = dropout(x) (+ residual) in float32, 0 outside `mask`; keep is the dropout mask (all of
    `mask` without dropout)."""
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    keep = mask
    if DROPOUT:
        keep = elementwise_dropout_uniform(seed, row, col0, BLOCK_N) >= dropout_p
        z = tl.where(keep, z / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        z += tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
    return z, keep


@triton.jit
def _chunk_xhat_g(DY, X, R, W, base, row, col0, in_row, mean, rstd, seed, dropout_p, HAS_RESIDUAL: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """(xhat, g = dy * w, keep) at columns col0 .. col0 + BLOCK_N - 1 of the row starting at `base`, from its saved
    mean and rstd."""
    cols = col0 + tl.arange(0, BLOCK_N)
    z, keep = _load_z(X, R, base + cols, row, col0, in_row, seed, dropout_p, HAS_RESIDUAL, DROPOUT, BLOCK_N)
    xhat = tl.where(in_row, (z - mean) * rstd, 0.0)
    g = tl.load(DY + base + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        g *= tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    return xhat, g, keep


@triton.jit(do_not_specialize=["seed"])
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
    WIDE: tl.constexpr,  # walk the row in BLOCK_N chunks (BLOCK_N < N) instead of holding it (BLOCK_N >= N)
    BLOCK_N: tl.constexpr,
):
    row32 = tl.program_id(0)
    row = row32.to(tl.int64)
    if WIDE:
        count = tl.zeros([1], dtype=tl.float32)
        pivot = tl.zeros([1], dtype=tl.float32)  # z[0], set by the first chunk
        shifted_mean = tl.zeros([1], dtype=tl.float32)  # of z - pivot so far
        m2 = tl.zeros([1], dtype=tl.float32)  # sum of squared deviations from the mean so far
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < N
            z, _ = _load_z(X, R, row * N + cols, row32, start, in_row, seed, dropout_p, HAS_RESIDUAL, DROPOUT,
                           BLOCK_N)
            pivot = tl.where(start == 0, tl.sum(tl.where(cols == 0, z, 0.0), axis=0), pivot)
            z = tl.where(in_row, z - pivot, 0.0)
            chunk_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(z, axis=0) / chunk_count
            deviation = tl.where(in_row, z - chunk_mean, 0.0)
            delta = chunk_mean - shifted_mean
            total = count + chunk_count
            shifted_mean += delta * (chunk_count / total)
            m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * (count * chunk_count / total)
            count = total
        mean = pivot + shifted_mean
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_row = cols < N
            z, _ = _load_z(X, R, row * N + cols, row32, start, in_row, seed, dropout_p, HAS_RESIDUAL, DROPOUT,
                           BLOCK_N)
            y = (z - mean) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(Y + row * N + cols, to_dtype(y, Y.dtype.element_ty), mask=in_row)
        tl.store(Mean + row + tl.arange(0, 1), mean)
        tl.store(Rstd + row + tl.arange(0, 1), rstd)
    else:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < N
        offsets = row * N + cols
        z, _ = _load_z(X, R, offsets, row32, 0, in_row, seed, dropout_p, HAS_RESIDUAL, DROPOUT, BLOCK_N)
        pivot = tl.sum(tl.where(cols == 0, z, 0.0), axis=0)  # z[0]
        mean = pivot + tl.sum(tl.where(in_row, z - pivot, 0.0), axis=0) / N
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


@triton.jit(do_not_specialize=["seed"])
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
    COMPUTE_AFFINE: tl.constexpr,  # narrow rows only: wide rows leave the sums to _layer_norm_bwd_affine
    DROPOUT: tl.constexpr,
    WIDE: tl.constexpr,  # walk each row in BLOCK_N chunks, twice (BLOCK_N < N)
    BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    if WIDE:
        for row in range(program, M, programs):
            base = tl.cast(row, tl.int64) * N
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                in_row = cols < N
                xhat, g, _ = _chunk_xhat_g(DY, X, R, W, base, row, start, in_row, mean, rstd, seed, dropout_p,
                                           HAS_RESIDUAL, HAS_WEIGHT, DROPOUT, BLOCK_N)
                sum_g += g
                sum_gx += g * xhat
            mean_g = tl.sum(sum_g, axis=0) / N
            mean_gx = tl.sum(sum_gx, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                in_row = cols < N
                xhat, g, keep = _chunk_xhat_g(DY, X, R, W, base, row, start, in_row, mean, rstd, seed, dropout_p,
                                              HAS_RESIDUAL, HAS_WEIGHT, DROPOUT, BLOCK_N)
                dz = (g - mean_g - xhat * mean_gx) * rstd
                if DROPOUT:
                    if HAS_RESIDUAL:
                        tl.store(DZ + base + cols, to_dtype(dz, DZ.dtype.element_ty), mask=in_row)
                    dz = tl.where(keep, dz / (1.0 - dropout_p), 0.0)
                tl.store(DX + base + cols, to_dtype(dz, DX.dtype.element_ty), mask=in_row)
    else:
        cols = tl.arange(0, BLOCK_N)
        in_row = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(program, M, programs):
            offsets = tl.cast(row, tl.int64) * N + cols
            z, keep = _load_z(X, R, offsets, row, 0, in_row, seed, dropout_p, HAS_RESIDUAL, DROPOUT, BLOCK_N)
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


@triton.jit(do_not_specialize=["seed"])
def _layer_norm_bwd_affine(
    DY,  # (M, N) gradient of the output
    X,  # (M, N) input rows (before dropout)
    R,  # (M, N) residual rows, read only when HAS_RESIDUAL
    Mean,  # (M,) float32
    Rstd,  # (M,) float32
    DW_partial,  # (G, N) float32: program (c, g) writes the sums of dy * xhat over its rows, columns of block c
    DB_partial,  # (G, N) float32: the same for dy
    M, N, rows_per_program,
    seed, dropout_p,
    HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_end = tl.minimum((pid_m + 1) * rows_per_program, M)
    for row0 in range(pid_m * rows_per_program, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        in_rows = rows < row_end
        mask = in_rows[:, None] & in_cols[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        z, _ = _load_z(X, R, offsets, rows[:, None], pid_n * BLOCK_N, mask, seed, dropout_p, HAS_RESIDUAL, DROPOUT,
                       BLOCK_N)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=in_rows, other=0.0)
        rstd = tl.load(Rstd + rows, mask=in_rows, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_partial + pid_m * N + cols, dw, mask=in_cols)
    tl.store(DB_partial + pid_m * N + cols, db, mask=in_cols)


def _launch_config(N: int, widest: int) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, WIDE): a block covering the row, with enough warps that each thread holds at most ~16
    float32 of it, or for rows wider than `widest` chunks of CHUNK walked in turn."""
    block_n = max(next_power_of_2(N), 4)  # the dropout draws serve four columns each
    wide = block_n > widest
    if wide:
        block_n = CHUNK
    num_warps = min(max(block_n // 512, 1), 16)
    return block_n, num_warps, wide


def layer_norm_forward(input, residual, weight, bias, eps, dropout_p=0.0, seed=None):
    """input, residual: (M, N) contiguous; weight, bias: (N,) or None; seed: int64 CPU scalar tensor when
    dropout_p > 0. Returns (y, mean, rstd)."""
    M, N = input.shape
    y = torch.empty_like(input)
    mean = torch.empty(M, dtype=torch.float32, device=input.device)
    rstd = torch.empty(M, dtype=torch.float32, device=input.device)
    block_n, num_warps, wide = _launch_config(N, WIDE_FORWARD)
    _layer_norm_fwd[(M,)](
        input, input if residual is None else residual, input if weight is None else weight,
        input if bias is None else bias, y, mean, rstd, N, eps, _seed_value(seed), dropout_p,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0, WIDE=wide, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


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
    # Enough programs to fill the GPU a few times over; few on CPU (the interpreter runs them one by one).
    programs = min(M, 4 * _sm_count(input.device))
    block_n, num_warps, wide = _launch_config(N, WIDE_BACKWARD)
    row_sums = compute_affine_grads and not wide
    dw_partial = torch.empty(programs if row_sums else 0, N, dtype=torch.float32, device=input.device)
    db_partial = torch.empty_like(dw_partial)
    if M > 0:
        _layer_norm_bwd[(programs,)](
            grad_output, input, input if residual is None else residual, input if weight is None else weight,
            mean, rstd, dx, dz, dw_partial, db_partial, M, N, _seed_value(seed), dropout_p,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, COMPUTE_AFFINE=row_sums,
            DROPOUT=dropout, WIDE=wide, BLOCK_N=block_n, num_warps=num_warps)
    if compute_affine_grads and wide:
        # Column blocks of 256 by slabs of rows, about 4 programs per SM in all (one slab per program on CPU); 8
        # warps: 16 elements of each (16, 256) tile a thread, whose Philox draws fit registers with Triton 3.6 too.
        block_cols, block_rows = 256, 16
        col_blocks = cdiv(N, block_cols)
        slabs = max(1, min(cdiv(M, 4 * block_rows), cdiv(4 * _sm_count(input.device), col_blocks)))
        rows_per_program = cdiv(cdiv(M, slabs), block_rows) * block_rows
        slabs = cdiv(M, rows_per_program) if M > 0 else 0
        dw_partial = torch.zeros(max(slabs, 1), N, dtype=torch.float32, device=input.device)
        db_partial = torch.zeros_like(dw_partial)
        if slabs > 0:
            _layer_norm_bwd_affine[(col_blocks, slabs)](
                grad_output, input, input if residual is None else residual, mean, rstd, dw_partial, db_partial,
                M, N, rows_per_program, _seed_value(seed), dropout_p,
                HAS_RESIDUAL=residual is not None, DROPOUT=dropout, BLOCK_M=block_rows, BLOCK_N=block_cols,
                num_warps=8)
    if not compute_affine_grads:
        empty = torch.empty(0, dtype=torch.float32, device=input.device)
        return dx, dz, empty, empty.clone()
    return dx, dz, dw_partial.sum(0), db_partial.sum(0)
