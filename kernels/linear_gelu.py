"""Triton kernels for the fused linear + activation (GELU) layer and the GELU feed-forward block.

Forward, for X (M, K), W (N, K) laid out like nn.Linear, b (N,):

    pre = X W^T + b                                   (M, N), accumulated in fp32
    Y   = dropout(act(pre))                           act in {gelu, gelu_tanh, relu, none}

    gelu(x)      = x Phi(x) = 1/2 x (1 + erf(x / sqrt 2))
    gelu_tanh(x) = 1/2 x (1 + tanh u),   u = sqrt(2/pi) (x + 0.044715 x^3)

The matrix product ends in an epilogue that adds the bias, optionally stores `pre` for the backward pass, applies
the activation and optionally the output dropout, all on the fp32 accumulator before the single rounding to the
output dtype: one write of Y (and of `pre`) instead of eager's write-read-write chain.

Backward, given dY:

    dPre = dY * act'(pre)       gelu'(x)      = Phi(x) + x phi(x)
                                gelu_tanh'(x) = 1/2 (1 + tanh u) + 1/2 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 0.044715 x^2)
    db   = sum over rows of dPre
    dX   = dPre W,  dW = dPre^T X

`act'(pre)` is fused into whichever matrix product produces or consumes what it needs:
- `linear_dact`: in the feed-forward block dY of the activation is itself a product (dZ W2); its epilogue reads
  the saved `pre` and writes dPre directly (cuBLASLt's DGELU_BGRAD epilogue, done by hand).
- `linear_dact_recompute`: when `pre` was not stored (to save memory) the product X W^T + b is recomputed and its
  epilogue reads dY and writes dPre, so `pre` never touches memory at all.
- `act_bwd`: the element-wise form for a dY that comes from outside (and for the output dropout's mask).
Each one also emits the bias gradient as deterministic partial column sums (fp32, one row per fixed slab of rows,
summed afterwards by `torch.sum`): no floating-point atomics, so results are bit-reproducible run to run.

How the A and B tiles reach shared memory, two paths in one kernel (the constexpr USE_TMA, a config parameter):
- pointers: every thread computes the addresses of its part of the (BLOCK_M, BLOCK_K) and (BLOCK_K, BLOCK_N) tiles
  and copies them with cp.async; rows and columns past M and N wrap around, the K edge is masked to zeros.
- TMA (Hopper, sm_90+): host-made tensor descriptors, and the copy engine moves each tile as one box on one
  thread's request, swizzled the way wgmma reads it, with no address registers, and fills everything past the
  tensor's edges with zeros, so the K edge adds zero products as the masked loads do. A (M, K) is described as it
  is; B = W^T, the transposed view of a row-major nn.Linear weight W (N, K) (`linear_act`,
  `linear_dact_recompute`), is described as W, boxes of (BLOCK_N, BLOCK_K) along W's rows, and the kernel takes the
  tile's transpose, a view of shared memory (B_KMAJOR); a row-major B (K, N) (`linear_dact`'s W) as it is. TMA needs
  16-byte aligned bases and row strides (K and N multiples of 8 in 16-bit) and a unit last stride; products of
  16-bit operands that meet them on a GPU with TMA get descriptors, the rest (fp32, whose products are not
  measured with TMA, odd sizes, Ampere, the CPU interpreter) the pointer path. Where descriptors exist the
  autotuner tries both paths' configs (same tiles and stages: a stage holds the same two tiles either way) and
  keeps the faster, since which wins for a non-persistent kernel with a heavy epilogue is a measurement; the
  policy in kernels/common.py (FASTGPT_TRITON_TMA) pins one path for tests and benchmarks. On sm_90a
  (bench/triton_compile.py) both compile to wgmma in the same shared memory, and the TMA configs hold as many
  registers or fewer (no address tensors); the 128x256 and 256x128 tiles spill in the epilogue (8 to 800 bytes)
  under Triton 3.6 and 3.9 alike.

Dropout uses the project's shared Philox4x32-10 stream (see fastgpt/ops/philox.py): element (row, col) of the
(M, N) output takes word col % 4 of philox(seed, c0=col // 4, c1=row, c2=0, c3=1), u = uint_to_uniform_float(word);
kept iff u >= p, kept values scaled by 1/(1-p). The backward regenerates the same mask from the seed. The seed is
a fresh draw every call: the kernels take it unspecialised (`do_not_specialize`), or Triton would compile a second
variant for the one seed in 16 that is divisible by 16.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (for testing). The interpreter computes bf16 arithmetic and
bf16 `tl.dot` wrongly, so bf16 operands are upcast to fp32 after loading there (`INTERPRET_BF16`; bf16 loads and
bf16 -> fp32 are exact), and every store goes through common.to_dtype, which rounds fp32 -> bf16 to nearest-even
where the interpreter would truncate.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastgpt.kernels.common import (benchmark_candidates, cdiv, copy_path_candidates, elementwise_dropout_uniform,
                                    tma_addressable, tma_descriptor, tma_policy, to_dtype)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The bias gradient is summed per slab of this many rows, whatever tile shape the autotuner picks, so the partial
# buffer has a size known before launch and every one of its rows is written by exactly one program.
SLAB = 64

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")


def _set_tma_block_shapes(nargs: dict) -> None:
    """pre_hook of every config: the descriptors' tiles are the config's (B's descriptor spans B^T (N, K) when
    B_KMAJOR, else B (K, N)). Pointer configs set them too, so a launch's signature is the same at every call."""
    if nargs["A_desc"] is not None:
        block_m, block_n, block_k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["A_desc"].block_shape = [block_m, block_k]
        nargs["B_desc"].block_shape = [block_n, block_k] if nargs["B_KMAJOR"] else [block_k, block_n]


def _matmul_configs() -> list[triton.Config]:
    """Each tile twice, with USE_TMA (first, so a fixed tuning policy takes TMA where it is offered) and without."""
    if _INTERPRET:
        # One small tile: the interpreter's cost is per program and per block operation, not per FLOP.
        tiles = [(64, 64, 32, 4, 4, 1)]
    else:
        # Hopper-friendly: 128x128x64 tiles keep two warpgroups busy on wgmma with 3-4 stages of shared-memory
        # pipelining (128x64 + 64x128 bf16 = 32 KB per stage); the others cover skinny N (768) and large N (16384).
        # ptxas on sm_90a (python -m bench.triton_compile): 128x128 with one warpgroup spills in every epilogue
        # (the 64 accumulators per thread plus GELU's and dropout's temporaries), so it gets two; the 128x256 and
        # 256x128 tiles spill a few hundred bytes in the epilogue only, outside the K loop, and stay for large K to
        # decide. The TMA configs keep the same tiles and stages: a stage holds the same two tiles either way, and
        # the autotuner then compares the two copy engines like for like.
        tiles = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
                 (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)]
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
                           "USE_TMA": use_tma}, num_warps=num_warps, num_stages=num_stages,
                          pre_hook=_set_tma_block_shapes)
            for use_tma in (True, False) for block_m, block_n, block_k, group_m, num_warps, num_stages in tiles]


def _tma_candidates(configs, named_args, **kwargs) -> list[triton.Config]:
    """early_config_prune: the configs of the copy paths the launch's TMA_POLICY allows, then the tuning policy."""
    return copy_path_candidates(configs, kwargs["TMA_POLICY"])


@triton.jit
def _tanh(u):
    # tanh from exp, exact to fp32 rounding and saturating correctly (exp overflow to inf gives 1, underflow -1).
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))


@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    """act(x) for an fp32 block."""
    if ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + _tanh(u))
    elif ACTIVATION == "relu":
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) for an fp32 block (relu'(0) = 0, as torch's threshold_backward)."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        d = cdf + x * pdf
    elif ACTIVATION == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = _tanh(u)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACTIVATION == "relu":
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = x * 0.0 + 1.0
    return d


@triton.jit
def _bias_partial_store(BiasPartial, d, mask, pid_m, offs_n, M, N,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLAB: tl.constexpr):
    """Column sums of the (BLOCK_M, BLOCK_N) fp32 block `d` over each SLAB rows -> BiasPartial[slab, col]."""
    d = tl.where(mask, d, 0.0)
    slabs = tl.sum(tl.reshape(d, (BLOCK_M // SLAB, SLAB, BLOCK_N)), axis=1)
    slab_rows = pid_m * (BLOCK_M // SLAB) + tl.arange(0, BLOCK_M // SLAB)
    slab_mask = (slab_rows[:, None] < tl.cdiv(M, SLAB)) & (offs_n[None, :] < N)
    tl.store(BiasPartial + slab_rows[:, None] * N + offs_n[None, :], slabs, mask=slab_mask)


@triton.autotune(configs=_matmul_configs(),
                 key=["M", "N", "K", "EPILOGUE", "ACTIVATION", "HAS_BIAS", "STORE_AUX", "DROPOUT", "BIAS_GRAD",
                      "TMA_POLICY", "B_KMAJOR"],
                 prune_configs_by={"early_config_prune": _tma_candidates}, do_bench=benchmark_candidates)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed"])
def _matmul_fused(
    A, B,  # A (M, K) and B (K, N) with any strides (the pointer path)
    A_desc, B_desc,  # TMA descriptors of A (M, K) and of B^T (N, K) (B_KMAJOR) or B (K, N); None without TMA
    C,  # (M, N) the epilogue's output
    Bias,  # (N,) added to the product (EPILOGUE "act" and "dact_recomputed", when HAS_BIAS)
    Aux,  # (M, N) "act": pre-activation written (STORE_AUX); "dact_saved": pre read; "dact_recomputed": dY read
    BiasPartial,  # (cdiv(M, SLAB), N) fp32 column sums of C per SLAB rows (BIAS_GRAD)
    seed, p, scale,  # dropout: Philox seed, drop probability, 1 / (1 - p)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
    EPILOGUE: tl.constexpr,  # "act": C = dropout(act(AB + b)); "dact_saved": C = AB * act'(Aux);
    #                          "dact_recomputed": C = Aux * act'(AB + b)
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, DROPOUT: tl.constexpr,
    BIAS_GRAD: tl.constexpr, INTERPRET_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, SLAB: tl.constexpr,
    TMA_POLICY: tl.constexpr,  # "off" (no descriptors), "auto" or "only": the configs the autotuner may try
    B_KMAJOR: tl.constexpr,  # B_desc spans B^T (N, K), row-major: B is the transposed view of an nn.Linear weight
    USE_TMA: tl.constexpr,  # config: A and B tiles through the descriptors (TMA) instead of pointers (cp.async)
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-blocks of C share each column-block of B while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # The copy engine reads whole (BLOCK_M, BLOCK_K) and (BLOCK_N, BLOCK_K) boxes into swizzled shared memory
        # and fills whatever lies past the tensor's edge (rows >= M, columns >= N, k >= K) with zeros: the zero
        # products add nothing, as the masked loads' zeros do, and the epilogue masks the extra rows and columns.
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = A_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_KMAJOR:
                b = B_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T  # a transposed view of the shared-memory tile
            else:
                b = B_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            if INTERPRET_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # Rows and columns past the edge wrap around (modulo) instead of being masked in the K loop; the epilogue
        # masks them out of every store.
        offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
        offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = B + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if INTERPRET_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    # Epilogue, in fp32 on the accumulator.
    rows = offs_m.to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    aux_ptrs = Aux + rows[:, None] * stride_xm + offs_n[None, :] * stride_xn
    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if EPILOGUE == "act":
        if HAS_BIAS:
            acc = acc + bias[None, :]
        if STORE_AUX:
            tl.store(aux_ptrs, to_dtype(acc, Aux.dtype.element_ty), mask=mask)
        out = _act(acc, ACTIVATION)
        if DROPOUT:
            keep = elementwise_dropout_uniform(seed, offs_m[:, None], pid_n * BLOCK_N, BLOCK_N) >= p
            out = tl.where(keep, out * scale, 0.0)
    else:
        if EPILOGUE == "dact_saved":
            pre = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
            grad = acc
        else:
            pre = acc
            if HAS_BIAS:
                pre = pre + bias[None, :]
            grad = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = grad * _act_grad(pre, ACTIVATION)
        if BIAS_GRAD:
            _bias_partial_store(BiasPartial, out, mask, pid_m, offs_n, M, N, BLOCK_M, BLOCK_N, SLAB)
    c_ptrs = C + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, to_dtype(out, C.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _act_bwd(
    dY,  # (M, N) gradient of the layer's output, any strides
    Pre,  # (M, N) pre-activation, any strides (read unless ACTIVATION == "none")
    dPre,  # (M, N) contiguous output: dY * dropout_mask * scale * act'(Pre)
    BiasPartial,  # (cdiv(M, ROWS_PER_PROGRAM), N) fp32 column sums of dPre per program (BIAS_GRAD)
    seed, p, scale,  # dropout that was applied to act(Pre) in the forward pass
    M, N, rows_per_program,
    stride_gm, stride_gn, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    for row0 in range(row_start, row_end, BLOCK_M):
        offs_m = row0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
        d = tl.load(dY + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        d = d.to(tl.float32)
        if DROPOUT:
            keep = elementwise_dropout_uniform(seed, offs_m[:, None], pid_n * BLOCK_N, BLOCK_N) >= p
            d = tl.where(keep, d * scale, 0.0)
        if ACTIVATION != "none":
            pre = tl.load(Pre + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
            d = d * _act_grad(pre.to(tl.float32), ACTIVATION)
        tl.store(dPre + rows[:, None] * N + offs_n[None, :], to_dtype(d, dPre.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            col_sum += tl.sum(tl.where(mask, d, 0.0), axis=0)
    if BIAS_GRAD:
        tl.store(BiasPartial + pid_m * N + offs_n, col_sum, mask=offs_n < N)


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    # fp32 products are IEEE fp32 unless the user allowed TF32 for torch's own matmuls, so both agree.
    precision = "tf32" if (dtype == torch.float32 and device.type == "cuda"
                           and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return {"INTERPRET_BF16": _INTERPRET and dtype == torch.bfloat16, "DOT_PRECISION": precision}


def _tma_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[str, object, object, bool]:
    """(TMA_POLICY, A's descriptor, B's descriptor, B_KMAJOR) for a (M, K) @ b (K, N) under the TMA policy.

    B = W^T, the transposed view of a row-major nn.Linear weight W (N, K), is described as W itself, so the copy
    engine reads rows of W along K and the kernel transposes the tile in shared memory; a row-major B (K, N) is
    described as it is. The block shapes are placeholders until the config's pre_hook sets them."""
    policy = tma_policy(a.device)
    b_kmajor = b.stride(1) != 1
    b_rows = b.t() if b_kmajor else b
    if policy == "off" or not (tma_addressable(a) and tma_addressable(b_rows)):
        return "off", None, None, False
    return policy, tma_descriptor(a), tma_descriptor(b_rows), b_kmajor


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, epilogue: str, activation: str,
            bias: torch.Tensor | None = None, aux: torch.Tensor | None = None, store_aux: bool = False,
            dropout_p: float = 0.0, seed: int = 0, bias_grad: bool = False) -> torch.Tensor | None:
    """out = epilogue(a @ b) for a (M, K), b (K, N) (any strides). Returns the fp32 bias gradient when asked."""
    M, K = a.shape
    N = b.shape[1]
    partial = torch.empty((cdiv(M, SLAB), N), device=a.device, dtype=torch.float32) if bias_grad else None
    aux_arg = aux if aux is not None else out
    policy, a_desc, b_desc, b_kmajor = _tma_operands(a, b)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_fused[grid](
        a, b, a_desc, b_desc, out, bias if bias is not None else out, aux_arg,
        partial if partial is not None else out,
        seed, dropout_p, 1.0 / (1.0 - dropout_p),
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        aux_arg.stride(0), aux_arg.stride(1),
        EPILOGUE=epilogue, ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_AUX=store_aux,
        DROPOUT=dropout_p > 0.0, BIAS_GRAD=bias_grad, SLAB=SLAB, TMA_POLICY=policy, B_KMAJOR=b_kmajor,
        **_dot_flags(a.dtype, a.device),
    )
    return partial.sum(0) if partial is not None else None


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, *,
               store_pre: bool, dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = dropout(act(x W^T + b)) for x (M, K), weight (N, K), bias (N,) -> (y (M, N), pre (M, N) or None)."""
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if store_pre else None
    _matmul(x, weight.t(), y, epilogue="act", activation=activation, bias=bias, aux=pre, store_aux=store_pre,
            dropout_p=dropout_p, seed=seed)
    return y, pre


def linear_dact(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, activation: str, *,
                bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dPre = (grad W) * act'(pre) for grad (M, N), weight (N, K), pre (M, K) -> (dPre (M, K), db (K,) fp32 or None).

    The backward of act(pre) followed by a linear layer with weight W: grad is that layer's output gradient."""
    dpre = torch.empty((grad.shape[0], weight.shape[1]), device=grad.device, dtype=grad.dtype)
    dbias = _matmul(grad, weight, dpre, epilogue="dact_saved", activation=activation, aux=pre, bias_grad=bias_grad)
    return dpre, dbias


def linear_dact_recompute(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
                          activation: str, *, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dPre = grad * act'(x W^T + b), recomputing the pre-activation -> (dPre (M, N), db (N,) fp32 or None)."""
    dpre = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    dbias = _matmul(x, weight.t(), dpre, epilogue="dact_recomputed", activation=activation, bias=bias, aux=grad,
                    bias_grad=bias_grad)
    return dpre, dbias


def act_bwd(grad: torch.Tensor, pre: torch.Tensor | None, activation: str, *, bias_grad: bool,
            dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dPre = grad * mask/(1-p) * act'(pre) for grad (M, N) -> (dPre (M, N), db (N,) fp32 or None).

    `pre` may be None when activation is "none" (the output dropout and bias of the block's second layer)."""
    M, N = grad.shape
    dpre = torch.empty((M, N), device=grad.device, dtype=grad.dtype)
    block_m, block_n = (64, 64) if _INTERPRET else (32, 128)
    # Enough row-programs to fill the GPU (about 4 per SM in total) while keeping the partial buffer small.
    n_col_blocks = cdiv(N, block_n)
    row_programs = max(1, min(cdiv(M, block_m), cdiv(4 * _sm_count(grad.device), n_col_blocks)))
    rows_per_program = cdiv(cdiv(M, row_programs), block_m) * block_m
    row_programs = cdiv(M, rows_per_program)
    partial = torch.empty((row_programs, N), device=grad.device, dtype=torch.float32) if bias_grad else None
    pre_arg = pre if pre is not None else grad
    _act_bwd[(n_col_blocks, row_programs)](
        grad, pre_arg, dpre, partial if partial is not None else dpre,
        seed, dropout_p, 1.0 / (1.0 - dropout_p),
        M, N, rows_per_program,
        grad.stride(0), grad.stride(1), pre_arg.stride(0), pre_arg.stride(1),
        ACTIVATION=activation, DROPOUT=dropout_p > 0.0, BIAS_GRAD=bias_grad, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )
    return dpre, partial.sum(0) if partial is not None else None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
