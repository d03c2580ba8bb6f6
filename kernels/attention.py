"""Fused scaled dot-product attention in Triton: flash-style forward and backward.

softmax(Q K^T * scale + mask) V for q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv),
query head h reading kv head h // (H // Hk) (grouped-query attention), never holding the
Lq x Lk matrix in memory: each program keeps one tile of scores in registers.

Conventions shared by the kernels:
- Scores live in the log2 domain: s = (q . k) * scale * log2(e) (+ additive mask * log2(e)), so the
  exponentials are exp2. The row statistic saved for the backward pass is the log-sum-exp in that domain,
  lse_i = m_i + log2(l_i) = log2(sum_j exp2(s_ij)), and P_ij = exp2(s_ij - lse_i) there: no conversion to
  the natural log and back, whose two roundings would cost P a relative error of about 1e-7 * |s| (1e-3 with an
  additive mask of 1e4 on the keys a row attends).
- A query row whose keys are all masked has l_i = 0: its output is 0 and its lse is +inf, so the
  recomputed probabilities exp2(s - lse) in the backward pass are 0 and so are its gradients.
- Causal masking is top-left aligned (query i sees keys j <= i, also when Lq != Lk). Key blocks
  entirely above the diagonal are skipped by the loop bounds; only blocks that straddle the
  diagonal or the end of the sequence pay for element-wise masking (a second, masked loop).
- Dropout on the probabilities uses Philox4x32-10: P[b, h, i, j] takes word j % 4 of the call at counters
  (c0, c1, c2, c3) = (j // 4, i, b*H + h, 0), as in fastgpt/ops/philox.py; the backward pass regenerates the mask
  from the seed. The seed is a fresh draw every call: the kernels take it unspecialised (`do_not_specialize`), or
  Triton would compile a second variant for the one seed in 16 that is divisible by 16.
- attn_mask is read tile by tile through its strides (expanded 0 strides allowed); MASK_KIND
  1 = bool (True = attend, stored as uint8), 2 = additive float. A key-padding mask (stride over Lq
  equal to 0) loads one (BLOCK_N,) row per key tile (MASK_ROW).
- Under the Triton interpreter bf16 arithmetic is wrong (upstream issue 11584), so DOT_FP32 upcasts
  every operand to fp32 there; on GPUs fp16/bf16 feed the tensor cores and fp32 uses ieee dots. The results
  are stored through common.to_dtype, which rounds to nearest bf16 where the interpreter would truncate.
- The tiles a loop walks (K and V forward and in dQ, Q and dO in dK/dV) reach shared memory one of two
  ways, the constexpr USE_TMA of the config (_load_rows): pointers (every thread computes its addresses,
  cp.async copies them, masked at the sequence's end) or, on Hopper, TMA: a host-made descriptor of each
  (B, H, L, D) tensor with its own strides (in any order), and the copy engine moves each tile as one box
  (1, 1, rows, D), zero-filled past L. 16-bit tensors with head dims 16 to 128 (TMA_HEAD_DIMS) that TMA can
  address (kernels/common.py) get descriptors, and the autotuner tries both paths' configs (the same tiles and
  stages) and keeps the faster. On sm_90a (bench/triton_compile.py) the TMA configs compile to the same
  wgmma products and shared memory (plus the barriers), in fewer registers in 69 of 87 configs (no
  address tensors) under Triton 3.6; head dim 256 keeps pointers (its dK/dV tiles spill with TMA).
- No warp specialization: on sm_90a, Triton 3.6's and 3.9's `tl.range(..., warp_specialize=True)` over the forward
  loop compiles the 8-warp configs unchanged (the same registers, no setmaxnreg: no producer/consumer split) and
  fails in its NVGPUWarpSpecialization pass on the 4-warp ones (tried 2026-11-25).
"""

import os

import torch
import triton
import triton.language as tl

from fastgpt.kernels.common import (benchmark_candidates, cdiv, copy_path_candidates, next_power_of_2, stream_uniforms,
                                    tma_addressable, tma_descriptor, tma_policy, to_dtype)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # q/k and v head dims the kernels handle
# The tile classes (_tile_class) that offer TMA configs, and the head dims whose tiles may come by TMA: the powers of
# two those classes hold, so that a box spans a head dim exactly. No TMA for fp32, whose products are not measured
# with it (as in kernels/linear_gelu.py), nor for head dim 256, whose dK/dV tiles spill with it
# (bench/triton_compile.py: 56 and 208 bytes, none without).
_TMA_TILE_CLASSES = ("d64", "d128")
TMA_HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The floor of finite additive-mask entries: far below any score, and still finite (-2.9e38) once scaled by log2(e).
MASK_FLOOR = tl.constexpr(-2.0e38)
LOG2E = 1.4426950408889634

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask) -> bool:
    """Whether these (B, H, L, D) inputs can run on the Triton kernels; otherwise use `reference`."""
    on_device = query.is_cuda or (INTERPRET and query.device.type == "cpu")
    return (on_device and query.dtype in DTYPES
            and key.dtype == query.dtype and value.dtype == query.dtype
            and query.shape[-1] in HEAD_DIMS and value.shape[-1] in HEAD_DIMS
            and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point))


# ----------------------------------------------------------------------------------------------
# Autotuning. Each pass has a list of (BLOCK_M, BLOCK_N, num_warps, num_stages) per tile class,
# and the autotuner tries only the list of the launch's class. The lists come from what ptxas
# made of each candidate on sm_90a with Triton 3.6 and 3.9 (`python -m bench.triton_compile`):
# every entry fits shared memory, and keeps the fp32 accumulators and score tiles of its class in
# registers (a few hundred spilled bytes at most, with dropout). The limit is the fp32 values
# a thread holds across the loop: the accumulators (BLOCK_M x Dv forward, BLOCK_N x (D + Dv) for
# dK/dV, BLOCK_M x D for dQ) plus one or two (BLOCK_M, BLOCK_N) score tiles. From about 160 per
# thread upwards ptxas spills, so 128-wide tiles with 128-wide heads need 8 warps, and head dim
# 256 takes only narrow tiles. fp32 inputs use IEEE products on the FMA units, whose operands sit
# in registers too, so only small tiles fit. Interpreting: one small config, to keep CPU tests fast.
# ----------------------------------------------------------------------------------------------

_FWD_TILES = {
    "d64": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3),
            (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2)],
    "d128": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3),
             (64, 64, 8, 2), (64, 32, 4, 2)],
    "d256": [(64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    "fp32": [(32, 32, 4, 2), (32, 32, 4, 3), (64, 32, 8, 2)],
}
_DKDV_TILES = {
    "d64": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
            (64, 64, 8, 3), (32, 64, 4, 2)],
    "d128": [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3),
             (32, 64, 8, 2), (32, 64, 4, 2)],
    "d256": [(32, 32, 4, 2), (32, 64, 8, 2)],
    "fp32": [(32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)],
}
_DQ_TILES = {
    "d64": [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
            (64, 64, 8, 3), (64, 32, 4, 2)],
    "d128": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3),
             (64, 32, 8, 2), (64, 32, 4, 2)],
    "d256": [(64, 32, 8, 2), (128, 32, 8, 3), (32, 32, 4, 2)],
    "fp32": [(32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
}
_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "MASK_ROW", "DROPOUT", "TMA_POLICY", "seq_bucket"]
# The tile each descriptor argument's box holds: (rows, columns) as constexpr names; the leading (batch, head) dims
# of the box are 1.
_DESCRIPTOR_TILES = {"Q_desc": ("BLOCK_M", "BLOCK_D"), "K_desc": ("BLOCK_N", "BLOCK_D"),
                     "V_desc": ("BLOCK_N", "BLOCK_DV"), "DO_desc": ("BLOCK_M", "BLOCK_DV")}


def _set_tma_block_shapes(nargs: dict) -> None:
    """pre_hook of every config: the descriptors' boxes are the config's tiles. Pointer configs set them too, so a
    launch's signature is the same at every call."""
    for name, (rows, cols) in _DESCRIPTOR_TILES.items():
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, 1, nargs[rows], nargs[cols]]


def _tile_class(named_args, kwargs) -> str:
    if named_args["Q"].dtype == torch.float32:
        return "fp32"
    head_dim = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])  # constexprs arrive as keyword arguments
    return "d64" if head_dim <= 64 else "d128" if head_dim <= 128 else "d256"


def _autotune(tiles, interpret_tile):
    """triton.autotune arguments: every class's configs, pruned to the launch's class and copy paths (TMA_POLICY),
    and to one config when the tuning policy in kernels/common.py fixes it. The 16-bit classes offer each tile
    twice, with USE_TMA (first, so a fixed tuning policy takes TMA where it is offered) and without: the same tiles
    and stages either way, so the autotuner compares the two copy paths like for like."""
    def configs(block_m, block_n, num_warps, num_stages, tma=(True, False)):
        return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": use_tma}, num_warps=num_warps,
                              num_stages=num_stages, pre_hook=_set_tma_block_shapes) for use_tma in tma]

    if INTERPRET:
        by_class = {"any": configs(*interpret_tile, 4, 1)}
    else:
        by_class = {name: [c for tile in class_tiles
                           for c in configs(*tile, tma=(True, False) if name in _TMA_TILE_CLASSES else (False,))]
                    for name, class_tiles in tiles.items()}

    def prune(configs, named_args, **kwargs):
        candidates = by_class["any" if INTERPRET else _tile_class(named_args, kwargs)]
        return copy_path_candidates(candidates, kwargs["TMA_POLICY"])

    return dict(configs=[c for class_configs in by_class.values() for c in class_configs], key=_TUNE_KEY,
                prune_configs_by={"early_config_prune": prune}, do_bench=benchmark_candidates)


# ----------------------------------------------------------------------------------------------
# Shared tile helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, offs_rows, n_rows, offs_cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    # Zero-filled load of a (rows, cols) tile; bounds are checked only where they can be crossed.
    if CHECK_ROWS:
        if N_COLS != BLOCK_COLS:
            x = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_cols[None, :] < N_COLS), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
    else:
        if N_COLS != BLOCK_COLS:
            x = tl.load(ptrs, mask=offs_cols[None, :] < N_COLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_rows(desc, off_b, off_h, row0, ptrs, offs_rows, n_rows, offs_cols, N_COLS: tl.constexpr,
               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_ROWS, BLOCK_COLS) tile of rows offs_rows = row0 + arange(BLOCK_ROWS) of head (off_b, off_h) of a
    (B, H, L, D) tensor, zero past its end. With USE_TMA the copy engine moves it as one box of the tensor's
    descriptor (the box is the tile: _set_tma_block_shapes), with no address registers, and fills rows past L with
    zeros; otherwise the tile's addresses `ptrs` are loaded, masked where CHECK_ROWS says the end can be crossed."""
    if USE_TMA:
        x = desc.load([off_b.to(tl.int32), off_h.to(tl.int32), row0, 0]).reshape(BLOCK_ROWS, BLOCK_COLS)
    else:
        x = _load_tile(ptrs, offs_rows, n_rows, offs_cols, N_COLS, BLOCK_COLS, CHECK_ROWS)
    return x


@triton.jit
def _load_row_pair(a_desc, b_desc, a_base, b_base, stride_an, stride_ad, stride_bn, stride_bd, off_b, off_h, row0,
                   n_rows, DIM_A: tl.constexpr, DIM_B: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """The tiles of rows row0 .. row0 + BLOCK_ROWS - 1 of two (B, H, L, *) tensors a loop walks together (K and V,
    or Q and dO), of head (off_b, off_h): (BLOCK_ROWS, BLOCK_A) and (BLOCK_ROWS, BLOCK_B), zero past L (_load_rows).
    a_base / b_base point at the head's row 0."""
    offs_rows = row0 + tl.arange(0, BLOCK_ROWS)
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = tl.arange(0, BLOCK_B)
    a = _load_rows(a_desc, off_b, off_h, row0, a_base + offs_rows[:, None] * stride_an + offs_a[None, :] * stride_ad,
                   offs_rows, n_rows, offs_a, DIM_A, BLOCK_ROWS, BLOCK_A, CHECK_ROWS, USE_TMA)
    b = _load_rows(b_desc, off_b, off_h, row0, b_base + offs_rows[:, None] * stride_bn + offs_b[None, :] * stride_bd,
                   offs_rows, n_rows, offs_b, DIM_B, BLOCK_ROWS, BLOCK_B, CHECK_ROWS, USE_TMA)
    return a, b


@triton.jit
def _block_and_head(seq_len, BLOCK: tl.constexpr):
    """(sequence block, flattened batch-head index) of this program. The grid is 1-D, cdiv(seq_len, BLOCK) * B * H
    programs with the blocks of one head consecutive (the order of a (blocks, B * H) grid: they share that head's
    keys and values in L2), because grid dims y and z stop at 65535 on CUDA and B * H may not. Unsigned division:
    the signed one took an extra register that Triton 3.6 spilled (fp32 preprocess, bench/triton_compile.py)."""
    pid = tl.program_id(0).to(tl.uint32)
    blocks = tl.cdiv(seq_len, BLOCK).to(tl.uint32)
    return (pid % blocks).to(tl.int32), (pid // blocks).to(tl.int32)


@triton.jit
def _scores(qk, offs_m, offs_n, Lq, Lk, mask_base, stride_mm, stride_mn, qk_scale,
            MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, CHECK_CAUSAL: tl.constexpr,
            CHECK_KEYS: tl.constexpr):
    """Log2-domain scores s = qk * scale * log2(e) + mask * log2(e), -inf where masked.

    offs_m / offs_n are the query / key indices broadcast to the tile's layout ((M, 1) and (1, N),
    or transposed for the key-major backward kernel), so one helper serves every pass.
    """
    s = qk * qk_scale
    if MASK_KIND != 0:
        if MASK_ROW:
            mask = tl.load(mask_base + offs_n * stride_mn, mask=offs_n < Lk, other=0)
        else:
            mask = tl.load(mask_base + offs_m * stride_mm + offs_n * stride_mn,
                           mask=(offs_m < Lq) & (offs_n < Lk), other=0)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:
            # Finite entries are floored at MASK_FLOOR so that the log2 scaling stays finite: Hugging Face masks
            # hold torch.finfo(dtype).min, which times log2(e) overflows, and a row hidden that way would turn
            # into a fully masked one (output 0) where PyTorch averages the values. -inf entries stay -inf; a NaN
            # stays NaN (max would floor it: the row must come out NaN, as PyTorch's does).
            mask = mask.to(tl.float32)
            floored = tl.maximum(mask, MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL)
            s = tl.where(mask == float("-inf"), float("-inf"), s + floored * 1.4426950408889634)
    if CHECK_CAUSAL:
        s = tl.where(offs_n <= offs_m, s, float("-inf"))
    if CHECK_KEYS:
        s = tl.where(offs_n < Lk, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, offs_m, n0, off_bh, dropout_p, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) dropout mask of queries offs_m and keys n0 .. n0 + BLOCK_N - 1 (n0 a multiple of 4): the
    keys form the Philox stream (i, b*H + h, 0) of query i, four keys to a call (int32 counters, so tl.philox runs
    its 32-bit variant)."""
    return stream_uniforms(seed, offs_m[:, None], off_bh, 0, n0, BLOCK_N) >= dropout_p


# ----------------------------------------------------------------------------------------------
# Forward
#
# For a block of BLOCK_M queries, walk the key blocks keeping per row the running maximum m_i of
# the log2 scores, the running sum l_i = sum_j exp2(s_ij - m_i) and acc_i = sum_j exp2(s_ij - m_i)
# keep_ij v_j. A new block with maximum m' rescales both by alpha = exp2(m_i - m'). At the end
# out_i = acc_i / (l_i (1 - p)) and lse_i = (m_i + log2 l_i) ln 2. Dropout zeroes kept-out terms of
# acc only: l_i normalises the undropped probabilities, as dropout(softmax(S)) V requires.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, off_b, off_hk, mask_base, offs_m, lo, hi,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                    MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, CHECK_CAUSAL: tl.constexpr, CHECK_KEYS: tl.constexpr,
                    USE_TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_row_pair(k_desc, v_desc, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, off_b,
                              off_hk, start_n, Lk, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, CHECK_KEYS,
                              USE_TMA)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s = _scores(qk, offs_m[:, None], offs_n[None, :], Lq, Lk, mask_base, stride_mm, stride_mn,
                    qk_scale, MASK_KIND, MASK_ROW, CHECK_CAUSAL, CHECK_KEYS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key so far masked keep m = -inf; subtract 0 there instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, offs_m, start_n, off_bh, dropout_p, BLOCK_N), p, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_autotune(_FWD_TILES, (64, 32)))
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(Q,  # (B, H, Lq, D) queries
              K,  # (B, Hk, Lk, D) keys
              V,  # (B, Hk, Lk, Dv) values
              K_desc, V_desc,  # TMA descriptors of K and V (box (1, 1, BLOCK_N, D)); None without TMA
              Mask,  # (B, H, Lq, Lk) bool-as-uint8 or additive mask, any strides (unused if MASK_KIND == 0)
              Out,  # (B, H, Lq, Dv) output, q.dtype
              Lse,  # (B, H, Lq) fp32 log2-domain log-sum-exp, contiguous
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om, stride_od,
              H, GROUP, Lq, Lk,  # query heads, query heads per kv head, sequence lengths
              sm_scale, dropout_p, seed,  # softmax scale, dropout rate, Philox seed
              seq_bucket,  # autotuning key only: next power of two of max(Lq, Lk)
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
              DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
              TMA_POLICY: tl.constexpr,  # autotuning key only: the copy paths the configs may take
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    start_m, off_bh = _block_and_head(Lq, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, Lq, offs_d, HEAD_DIM, BLOCK_D, True)
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Key blocks [0, full_hi) need no element-wise causal or bounds mask; [full_hi, hi) do.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        full_hi = tl.minimum(start_m * BLOCK_M, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full_hi = Lk // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, off_b, off_hk, mask_base,
                                    offs_m, 0, full_hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                                    Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW,
                                    DROPOUT, DOT_FP32, DOT_PRECISION, False, False, USE_TMA)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, K_desc, V_desc, off_b, off_hk, mask_base,
                                    offs_m, full_hi, hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                                    Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW,
                                    DROPOUT, DOT_FP32, DOT_PRECISION, IS_CAUSAL, True, USE_TMA)

    empty_row = l_i == 0.0
    inv_l = 1.0 / tl.where(empty_row, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, to_dtype(out, Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------
# Backward
#
# With P_ij = exp(S_ij - lse_i) recomputed from the saved lse, Z_ij = keep_ij / (1 - p) the dropout
# factor and O = (P * Z) V:
#   dV_j = sum_i P_ij Z_ij dO_i
#   dP_ij = Z_ij (dO_i . V_j)
#   dS_ij = P_ij (dP_ij - delta_i),  delta_i = sum_j P_ij dP_ij = dO_i . O_i  (preprocess kernel)
#   dQ_i = scale sum_j dS_ij K_j,    dK_j = scale sum_i dS_ij Q_i
# dK/dV: one program per (key block, kv head) walks the query blocks of every query head of its
# group, so grouped heads are reduced in registers (no atomics). dQ: one program per query block,
# walking the key blocks like the forward pass. Neither holds more than one score tile.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(Out,  # (B, H, Lq, Dv) forward output
                         DO,  # (B, H, Lq, Dv) output gradient
                         Delta,  # (B, H, Lq) fp32 rowsum(dO * O), contiguous
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Lq,
                         HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m, off_bh = _block_and_head(Lq, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                   + offs_dv[None, :] * stride_od, offs_m, Lq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_dv[None, :] * stride_dod, offs_m, Lq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_desc, do_desc, off_b, off_h, mask_base, lse_base,
                         delta_base, offs_n, n0, lo, hi,
                         stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                         Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         MASK_KIND: tl.constexpr,
                         MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, CHECK_CAUSAL: tl.constexpr, CHECK_QUERIES: tl.constexpr,
                         USE_TMA: tl.constexpr):
    # Key-major tiles (BLOCK_N, BLOCK_M): the transposed scores, so dK and dV come out of plain dots.
    # Query rows past Lq load q = dO = 0 and lse = +inf, hence P = 0: they add nothing.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do = _load_row_pair(q_desc, do_desc, q_base, do_base, stride_qm, stride_qd, stride_dom, stride_dod, off_b,
                               off_h, start_m, Lq, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, CHECK_QUERIES,
                               USE_TMA)
        if CHECK_QUERIES:
            lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        s_t = _scores(qk_t, offs_m[None, :], offs_n[:, None], Lq, Lk, mask_base, stride_mm, stride_mn,
                      qk_scale, MASK_KIND, MASK_ROW, CHECK_CAUSAL, False)
        p_t = tl.math.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep_t = tl.trans(_dropout_keep(seed, offs_m, n0, off_bh, dropout_p, BLOCK_N))
            rescale = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep_t, p_t * rescale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * rescale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(**_autotune(_DKDV_TILES, (32, 64)))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(Q,  # (B, H, Lq, D) queries
                   K,  # (B, Hk, Lk, D) keys
                   V,  # (B, Hk, Lk, Dv) values
                   Q_desc, DO_desc,  # TMA descriptors of Q and DO (box (1, 1, BLOCK_M, D)); None without TMA
                   Mask,  # (B, H, Lq, Lk) mask as in the forward pass
                   DO,  # (B, H, Lq, Dv) output gradient
                   Lse,  # (B, H, Lq) fp32 forward log2-domain log-sum-exp, contiguous
                   Delta,  # (B, H, Lq) fp32 rowsum(dO * O), contiguous
                   DK,  # (B, Hk, Lk, D) key gradient, k.dtype
                   DV,  # (B, Hk, Lk, Dv) value gradient, v.dtype
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, GROUP, Lq, Lk,
                   sm_scale, dropout_p, seed,
                   seq_bucket,  # autotuning key only
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   TMA_POLICY: tl.constexpr,  # autotuning key only
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    start_n, off_bhk = _block_and_head(Lk, BLOCK_N)
    Hk = H // GROUP
    off_b = (off_bhk // Hk).to(tl.int64)
    off_hk = (off_bhk % Hk).to(tl.int64)
    n0 = start_n * BLOCK_N  # this program's first key
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, offs_n, Lk, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn
                   + offs_dv[None, :] * stride_vd, offs_n, Lk, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query blocks [lo, mid) straddle the diagonal (causal only), [mid, full_hi) need no mask,
    # [max(mid, full_hi), Lq) is the partial last block.
    if IS_CAUSAL:
        lo = start_n * BLOCK_N // BLOCK_M * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(start_n * BLOCK_N + BLOCK_N - lo, BLOCK_M) * BLOCK_M, Lq)
    else:
        lo = 0
        mid = 0
    full_hi = Lq // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        off_bh = (off_b * H + off_h).to(tl.int32)
        lse_base = Lse + off_bh.to(tl.int64) * Lq
        delta_base = Delta + off_bh.to(tl.int64) * Lq
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, DO_desc, off_b, off_h, mask_base,
                                      lse_base, delta_base, offs_n,
                                      n0, lo, mid, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm,
                                      stride_mn, Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND,
                                      MASK_ROW, DROPOUT, DOT_FP32, DOT_PRECISION, IS_CAUSAL, True, USE_TMA)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, DO_desc, off_b, off_h, mask_base,
                                      lse_base, delta_base, offs_n,
                                      n0, mid, full_hi, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm,
                                      stride_mn, Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND,
                                      MASK_ROW, DROPOUT, DOT_FP32, DOT_PRECISION, False, False, USE_TMA)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Q_desc, DO_desc, off_b, off_h, mask_base,
                                      lse_base, delta_base, offs_n,
                                      n0, tl.maximum(mid, full_hi), Lq, stride_qm, stride_qd, stride_dom,
                                      stride_dod, stride_mm, stride_mn, Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND,
                                      MASK_ROW, DROPOUT, DOT_FP32, DOT_PRECISION, False, True, USE_TMA)

    dk = dk * sm_scale
    kv_rows = offs_n[:, None] < Lk
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, to_dtype(dk, DK.dtype.element_ty),
             mask=kv_rows & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, to_dtype(dv, DV.dtype.element_ty),
             mask=kv_rows & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, off_b, off_hk, mask_base, offs_m,
                       lo, hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                       Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                       MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, CHECK_CAUSAL: tl.constexpr, CHECK_KEYS: tl.constexpr,
                       USE_TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_row_pair(k_desc, v_desc, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, off_b,
                              off_hk, start_n, Lk, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, CHECK_KEYS,
                              USE_TMA)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s = _scores(qk, offs_m[:, None], offs_n[None, :], Lq, Lk, mask_base, stride_mm, stride_mn,
                    qk_scale, MASK_KIND, MASK_ROW, CHECK_CAUSAL, CHECK_KEYS)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, start_n, off_bh, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(**_autotune(_DQ_TILES, (64, 32)))
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(Q,  # (B, H, Lq, D) queries
                 K,  # (B, Hk, Lk, D) keys
                 V,  # (B, Hk, Lk, Dv) values
                 K_desc, V_desc,  # TMA descriptors of K and V (box (1, 1, BLOCK_N, D)); None without TMA
                 Mask,  # (B, H, Lq, Lk) mask as in the forward pass
                 DO,  # (B, H, Lq, Dv) output gradient
                 Lse,  # (B, H, Lq) fp32 forward log2-domain log-sum-exp, contiguous
                 Delta,  # (B, H, Lq) fp32 rowsum(dO * O), contiguous
                 DQ,  # (B, H, Lq, D) query gradient, q.dtype
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUP, Lq, Lk,
                 sm_scale, dropout_p, seed,
                 seq_bucket,  # autotuning key only
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 TMA_POLICY: tl.constexpr,  # autotuning key only
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    start_m, off_bh = _block_and_head(Lq, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, offs_m, Lq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_dv[None, :] * stride_dod, offs_m, Lq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        full_hi = tl.minimum(start_m * BLOCK_M, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full_hi = Lk // BLOCK_N * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, K_desc, V_desc, off_b, off_hk, mask_base, offs_m,
                            0, full_hi,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                            Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW,
                            DROPOUT, DOT_FP32, DOT_PRECISION, False, False, USE_TMA)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, K_desc, V_desc, off_b, off_hk, mask_base, offs_m,
                            full_hi, hi,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                            Lq, Lk, qk_scale, dropout_p, seed, off_bh,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW,
                            DROPOUT, DOT_FP32, DOT_PRECISION, IS_CAUSAL, True, USE_TMA)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, to_dtype(dq, DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


# The autotuned kernels: their `cache` holds the config chosen per autotuning key.
AUTOTUNED = (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _mask_args(attn_mask, fallback, B, H, Lq, Lk):
    """(tensor, 4 strides, MASK_KIND, MASK_ROW) for the kernels; bool masks are read as uint8."""
    if attn_mask is None:
        return fallback, (0, 0, 0, 0), MASK_NONE, False
    mask = attn_mask.expand(B, H, Lq, Lk)
    kind = MASK_ADDITIVE
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.uint8), MASK_BOOL
    return mask, mask.stride(), kind, mask.stride(2) == 0 or Lq == 1


def _descriptors(*tensors):
    """(TMA_POLICY, a TMA descriptor of each (B, H, L, D) tensor or None each) for a launch whose loop reads
    `tensors` tile by tile: descriptors where the device has the copy engine (kernels/common.py's policy) and every
    tensor is tma_addressable with a head dim in TMA_HEAD_DIMS."""
    policy = tma_policy(tensors[0].device)
    if policy == "off" or not all(tma_addressable(t) and t.shape[-1] in TMA_HEAD_DIMS for t in tensors):
        return "off", [None] * len(tensors)
    return policy, [tma_descriptor(t) for t in tensors]


def _common_meta(q, v, is_causal, mask_kind, mask_row, dropout_p, Lq, Lk):
    D, Dv = q.shape[-1], v.shape[-1]
    return dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=next_power_of_2(D), BLOCK_DV=next_power_of_2(Dv),
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, MASK_ROW=bool(mask_row), DROPOUT=dropout_p > 0.0,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        seq_bucket=next_power_of_2(max(Lq, Lk, 1)))


def attention_forward(q, k, v, attn_mask, is_causal: bool, scale: float, dropout_p: float, seed: int):
    """Fused attention forward. Returns out (B, H, Lq, Dv) in q.dtype and lse (B, H, Lq) fp32."""
    B, H, Lq, _ = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    mask, mask_strides, mask_kind, mask_row = _mask_args(attn_mask, q, B, H, Lq, Lk)
    meta = _common_meta(q, v, is_causal, mask_kind, mask_row, dropout_p, Lq, Lk)
    policy, (k_desc, v_desc) = _descriptors(k, v)
    grid = lambda META: (cdiv(Lq, META["BLOCK_M"]) * B * H,)  # noqa: E731 (_block_and_head)
    _attn_fwd[grid](q, k, v, k_desc, v_desc, mask, out, lse,
                    *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
                    H, H // Hk, Lq, Lk, float(scale), float(dropout_p), int(seed), TMA_POLICY=policy, **meta)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal: bool, scale: float,
                       dropout_p: float, seed: int):
    """Fused attention backward from the forward's out and lse. Returns (dq, dk, dv)."""
    B, H, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if Lq == 0 or Lk == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    mask, mask_strides, mask_kind, mask_row = _mask_args(attn_mask, q, B, H, Lq, Lk)
    meta = _common_meta(q, v, is_causal, mask_kind, mask_row, dropout_p, Lq, Lk)
    block_dv = meta["BLOCK_DV"]
    pre_block_m = 32 if INTERPRET else 128
    _attn_bwd_preprocess[(cdiv(Lq, pre_block_m) * B * H,)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq,
        HEAD_DIM_V=Dv, BLOCK_DV=block_dv, BLOCK_M=pre_block_m)
    args = (H, H // Hk, Lq, Lk, float(scale), float(dropout_p), int(seed))
    policy, (q_desc, do_desc) = _descriptors(q, grad_out)
    _attn_bwd_dkdv[lambda META: (cdiv(Lk, META["BLOCK_N"]) * B * Hk,)](
        q, k, v, q_desc, do_desc, mask, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
        *args, TMA_POLICY=policy, **meta)
    policy, (k_desc, v_desc) = _descriptors(k, v)
    _attn_bwd_dq[lambda META: (cdiv(Lq, META["BLOCK_M"]) * B * H,)](
        q, k, v, k_desc, v_desc, mask, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *dq.stride(),
        *args, TMA_POLICY=policy, **meta)
    return dq, dk, dv
