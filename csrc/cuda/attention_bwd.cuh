// Flash-attention backward on tensor cores (sm_80+), deterministic: no atomics, every gradient element is summed
// by one thread in a fixed order. Three kernels:
//   1. preprocess: delta_i = sum_d dO[i, d] * O[i, d]                                            (B, H, Lq) fp32
//   2. dQ, one block per query block (like the forward):           dQ_i = scale * sum_j dS_ij K_j
//   3. dK/dV, one block per key block of a kv head, looping over the query heads of its group and their
//      query blocks:                                               dV_j = sum_i Pd_ij dO_i
//                                                                  dK_j = scale * sum_i dS_ij Q_i
// with P recomputed from the saved lse (P_ij = exp2(s_ij - lse_i * log2 e), s in the log2 domain as in the
// forward), Z the dropout mask regenerated from the seed, Pd = P * Z / (1 - p), dP = dO V^T and
//   dS_ij = P_ij * (dP_ij * Z_ij / (1 - p) - delta_i)
// (delta = rowsum(dO * O) = rowsum(P * dPd) holds with dropout too, since O = Pd V). A row that saw no key in the
// forward has lse = -inf (or +inf); its lse is read as +inf, so its P, and every gradient through it, is 0.
// The dQ kernel recomputes S and dP (3 products per tile instead of the 2 that a fused kernel with atomic dQ
// adds would share): the price of determinism without a dQ buffer per key block.
//
// The dK/dV kernel computes the transposed tile S^T = K Q^T (rows keys, columns queries), so P^T and dS^T come
// out of the mma accumulators already in the A layout that dV += P^T dO and dK += dS^T Q consume: nothing passes
// through shared memory. K and V stay in shared memory for the block's life; Q, dO, lse and delta stream through
// a double buffer.
//
// As in the forward kernel (attention_fwd.cuh), kWgmma on sm_90a runs every product as a warpgroup's wgmma chain:
// the products with both operands in shared memory (S, dP and their transposes) read them there, those with A in
// registers (dS, Pd^T, dS^T) read B from shared memory MN-major; the register tiles are the same either way.
#pragma once

#include "attention_common.cuh"

namespace fastgpt {
namespace attention {

template <int D>
struct BwdDqTile {
  static constexpr int kBlockM = 16 * kWarps;       // query rows, 16 per warp
  static constexpr int kBlockN = D <= 64 ? 64 : 32;  // keys per step: D = 128 keeps 2 x 16 x D accumulators
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(kBlockN % 16 == 0, "keys in k-steps of 16");
  // Q and dO tiles + double-buffered K and V tiles.
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * D * 2;
};

template <int D>
struct BwdDkvTile {
  static constexpr int kBlockN = 16 * kWarps;       // key rows, 16 per warp
  static constexpr int kBlockM = D <= 64 ? 64 : 32;  // queries per step
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(kBlockM % 16 == 0, "queries in k-steps of 16");
  // K and V tiles + double-buffered Q and dO tiles, then double-buffered lse and delta (fp32).
  static constexpr int kSmemBytes = (2 * kBlockN + 4 * kBlockM) * D * 2 + 4 * kBlockM * 4;
};

// lse (natural log) -> the log2-domain row offset of P = exp2(s - offset). A row with no visible key (lse = -inf,
// or +inf as the Triton kernel stores it) gets +inf: exp2(s - inf) = 0 for every s, -inf included.
__device__ __forceinline__ float lse_to_log2(float lse) { return isfinite(lse) ? lse * kLog2e : INFINITY; }

// delta = rowsum(dO * O) in fp32; kDeltaLanesPerRow threads per row, each summing 8-element (16-byte) chunks.
constexpr int kDeltaLanesPerRow = 8;
constexpr int kDeltaRowsPerBlock = kThreads / kDeltaLanesPerRow;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_preprocess_kernel(const Params p) {
  constexpr int kLanesPerRow = kDeltaLanesPerRow, kRowsPerBlock = kDeltaRowsPerBlock;
  static_assert(D % (8 * kLanesPerRow) == 0, "whole 16-byte chunks per lane");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.len_q;
  float sum = 0.f;
  if (row < rows) {
    const int64_t i = row % p.len_q, bh = row / p.len_q, h = bh % p.heads, b = bh / p.heads;
    const T* o = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.l;
    const T* d = static_cast<const T*>(p.grad_out) + b * p.do_st.b + h * p.do_st.h + i * p.do_st.l;
#pragma unroll
    for (int col = (threadIdx.x % kLanesPerRow) * 8; col < D; col += 8 * kLanesPerRow) {
      const uint4 o_pack = *reinterpret_cast<const uint4*>(o + col);
      const uint4 d_pack = *reinterpret_cast<const uint4*>(d + col);
      const T* o_vals = reinterpret_cast<const T*>(&o_pack);
      const T* d_vals = reinterpret_cast<const T*>(&d_pack);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float(o_vals[e]) * to_float(d_vals[e]);
    }
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (row < rows && threadIdx.x % kLanesPerRow == 0) p.delta[row] = sum;
}

template <typename T, int D, MaskMode kMode, bool kDropout, bool kWgmma>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const Params p) {
  static_assert(kThreads == 128 && BwdDqTile<D>::kBlockM == 64, "wgmma: the block is one warpgroup of 64 rows");
  constexpr bool kUseWgmma = kWgmma && kHasWgmma;  // mma.sync where this pass does not target sm_90a
  using Tile = BwdDqTile<D>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  unsigned char* smem = dynamic_smem();
  T* q_tile = reinterpret_cast<T*>(smem);  // kBlockM x D
  T* do_tile = q_tile + kBlockM * D;       // kBlockM x D
  T* k_tiles = do_tile + kBlockM * D;      // 2 x kBlockN x D
  T* v_tiles = k_tiles + 2 * kBlockN * D;  // 2 x kBlockN x D

  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // heaviest blocks first, as in the forward
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const int warp = threadIdx.x / 32, row0 = m0 + warp * 16;
  const uint32_t bh = static_cast<uint32_t>(b * p.heads + h);

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
  const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_st.b + h * p.do_st.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;

  const int n_end = kMode == MaskMode::kCausal ? min(p.len_k, m0 + kBlockM) : p.len_k;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  // This lane's two rows (g, g + 8): log2-domain lse and delta; rows past Lq get P = 0.
  float lse2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = frag_row(row0, 2 * half);
    const bool valid = row < p.len_q;
    lse2[half] = valid ? lse_to_log2(p.lse[static_cast<int64_t>(bh) * p.len_q + row]) : INFINITY;
    delta[half] = valid ? p.delta[static_cast<int64_t>(bh) * p.len_q + row] : 0.f;
  }

  float dq[D / 8][4];
  zero(dq);
  uint32_t q_frag[D / 16][4], do_frag[D / 16][4];

  load_tile<kBlockM, D>(q_tile, q, p.q_st.l, m0, p.len_q);
  load_tile<kBlockM, D>(do_tile, dout, p.do_st.l, m0, p.len_q);
  if (n_blocks > 0) {
    load_tile<kBlockN, D>(k_tiles, k, p.k_st.l, 0, p.len_k);
    load_tile<kBlockN, D>(v_tiles, v, p.v_st.l, 0, p.len_k);
  }
  cp_async_commit();

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * kBlockN, buf = nb & 1;
    T* k_tile = k_tiles + buf * kBlockN * D;
    T* v_tile = v_tiles + buf * kBlockN * D;
    if (nb + 1 < n_blocks) {
      load_tile<kBlockN, D>(k_tiles + (buf ^ 1) * kBlockN * D, k, p.k_st.l, n0 + kBlockN, p.len_k);
      load_tile<kBlockN, D>(v_tiles + (buf ^ 1) * kBlockN * D, v, p.v_st.l, n0 + kBlockN, p.len_k);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (kUseWgmma) fence_proxy_async();  // the copies' bytes, visible to the wgmma that read them next
    __syncthreads();
    if (!kUseWgmma && nb == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        load_a<D>(q_frag[kk], q_tile, warp * 16, kk * 16);
        load_a<D>(do_frag[kk], do_tile, warp * 16, kk * 16);
      }
    }

    float s[kBlockN / 8][4], dp[kBlockN / 8][4];  // 16 x kBlockN each
    if constexpr (kUseWgmma) {
      wgmma_gemm_ss2<kBlockN, D, D>(s, q_tile, k_tile, dp, do_tile, v_tile);  // S = Q K^T, dP = dO V^T
    } else {
      zero(s);
      zero(dp);
      gemm_rs<kBlockN, D, false, D, T>(s, q_frag, k_tile);    // S = Q K^T
      gemm_rs<kBlockN, D, false, D, T>(dp, do_frag, v_tile);  // dP = dO V^T
    }
    const bool check = n0 + kBlockN > p.len_k || (kMode == MaskMode::kCausal && n0 + kBlockN - 1 > row0);
    scale_and_mask<kMode, false, T>(s, p, b, h, row0, n0, check);
    if constexpr (kDropout)
      apply_dropout(dp, dropout_bits<false, kBlockN / 8>(p, bh, row0, n0), p.dropout_scale);  // dP * Z / (1 - p)
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        s[nt][e] = exp2f(s[nt][e] - lse2[half]) * (dp[nt][e] - delta[half]);  // dS (without the scale)
      }
    uint32_t ds_frag[kBlockN / 16][4];
    acc_to_a<T, kBlockN>(ds_frag, s);
    if constexpr (kUseWgmma)
      wgmma_gemm_rs<D, kBlockN, D>(dq, ds_frag, k_tile);  // dQ += dS K
    else
      gemm_rs<D, kBlockN, true, D, T>(dq, ds_frag, k_tile);  // dQ += dS K: B = K, stored as K [key][dim]
    __syncthreads();
  }
  if (n_blocks == 0) cp_async_wait<0>();

  const float dq_scale[2] = {p.scale, p.scale};
  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_st.b + h * p.dq_st.h;
  store_rows<T>(dq_out, p.dq_st.l, row0, p.len_q, dq, dq_scale);
}

template <typename T, int D, MaskMode kMode, bool kDropout, bool kWgmma>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const Params p) {
  static_assert(kThreads == 128 && BwdDkvTile<D>::kBlockN == 64, "wgmma: the block is one warpgroup of 64 rows");
  constexpr bool kUseWgmma = kWgmma && kHasWgmma;  // mma.sync where this pass does not target sm_90a
  using Tile = BwdDkvTile<D>;
  constexpr int kBlockN = Tile::kBlockN, kBlockM = Tile::kBlockM;
  unsigned char* smem = dynamic_smem();
  T* k_tile = reinterpret_cast<T*>(smem);    // kBlockN x D
  T* v_tile = k_tile + kBlockN * D;          // kBlockN x D
  T* q_tiles = v_tile + kBlockN * D;         // 2 x kBlockM x D
  T* do_tiles = q_tiles + 2 * kBlockM * D;   // 2 x kBlockM x D
  float* lse2_rows = reinterpret_cast<float*>(do_tiles + 2 * kBlockM * D);  // 2 x kBlockM
  float* delta_rows = lse2_rows + 2 * kBlockM;                                // 2 x kBlockM

  const int n0 = blockIdx.x * kBlockN;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, key0 = n0 + warp * 16;  // this warp's first key row

  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;

  // Iterations t = (query head h = hk * group + t / m_count, query block m_first + t % m_count). Causal: queries
  // before n0 see none of this block's keys, so the blocks start at the one holding query n0.
  const int m_first = kMode == MaskMode::kCausal ? n0 / kBlockM : 0;
  const int m_count = max(0, (p.len_q + kBlockM - 1) / kBlockM - m_first);
  const int iterations = p.group * m_count;

  // Issues the copies of iteration t's Q and dO tiles and fills its lse / delta rows (plain stores: visible after
  // the barrier that precedes their use).
  const auto load_iteration = [&](int t, int buf) {
    const int h = hk * p.group + t / m_count, m0 = (m_first + t % m_count) * kBlockM;
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.do_st.b + h * p.do_st.h;
    load_tile<kBlockM, D>(q_tiles + buf * kBlockM * D, q, p.q_st.l, m0, p.len_q);
    load_tile<kBlockM, D>(do_tiles + buf * kBlockM * D, dout, p.do_st.l, m0, p.len_q);
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      const int row = m0 + r;
      const int64_t at = (static_cast<int64_t>(b) * p.heads + h) * p.len_q + row;
      lse2_rows[buf * kBlockM + r] = row < p.len_q ? lse_to_log2(p.lse[at]) : INFINITY;  // P = 0 past Lq
      delta_rows[buf * kBlockM + r] = row < p.len_q ? p.delta[at] : 0.f;
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  load_tile<kBlockN, D>(k_tile, k, p.k_st.l, n0, p.len_k);
  load_tile<kBlockN, D>(v_tile, v, p.v_st.l, n0, p.len_k);
  if (iterations > 0) load_iteration(0, 0);
  cp_async_commit();

  for (int t = 0; t < iterations; ++t) {
    const int buf = t & 1;
    const int h = hk * p.group + t / m_count, m0 = (m_first + t % m_count) * kBlockM;
    const uint32_t bh = static_cast<uint32_t>(b * p.heads + h);
    const T* q_tile = q_tiles + buf * kBlockM * D;
    const T* do_tile = do_tiles + buf * kBlockM * D;
    if (t + 1 < iterations) {  // the other buffer was released by the previous iteration's closing barrier
      load_iteration(t + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (kUseWgmma) fence_proxy_async();  // the copies' bytes, visible to the wgmma that read them next
    __syncthreads();

    float s[kBlockM / 8][4], dp[kBlockM / 8][4];  // 16 keys x kBlockM queries each: S^T and dP^T
    if constexpr (kUseWgmma) {
      wgmma_gemm_ss2<kBlockM, D, D>(s, k_tile, q_tile, dp, v_tile, do_tile);  // S^T = K Q^T, dP^T = V dO^T
    } else {
      zero(s);
      zero(dp);
      gemm_ss<kBlockM, D, false, D, T>(s, k_tile, warp * 16, q_tile);    // S^T = K Q^T: B = Q^T, stored as Q
      gemm_ss<kBlockM, D, false, D, T>(dp, v_tile, warp * 16, do_tile);  // dP^T = V dO^T: B = dO^T, stored as dO
    }
    const bool check = key0 + 16 > p.len_k || m0 + kBlockM > p.len_q ||
                       (kMode == MaskMode::kCausal && key0 + 15 > m0);
    scale_and_mask<kMode, true, T>(s, p, b, h, key0, m0, check);

    // Column c of the fragment is query m0 + c: its lse and delta come from shared memory.
    const float* lse2 = lse2_rows + buf * kBlockM;
    const float* delta = delta_rows + buf * kBlockM;
    float pd[kBlockM / 8][4];  // dropped and rescaled P^T, for dV
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = frag_col(0, nt, e);
        s[nt][e] = exp2f(s[nt][e] - lse2[c]);  // P^T
        pd[nt][e] = s[nt][e];
      }
    if constexpr (kDropout) {
      const uint32_t bits = dropout_bits<true, kBlockM / 8>(p, bh, key0, m0);
      apply_dropout(pd, bits, p.dropout_scale);  // P * Z / (1 - p)
      apply_dropout(dp, bits, p.dropout_scale);  // dP * Z / (1 - p)
    }
    uint32_t a_frag[kBlockM / 16][4];
    acc_to_a<T, kBlockM>(a_frag, pd);
    if constexpr (kUseWgmma)
      wgmma_gemm_rs<D, kBlockM, D>(dv, a_frag, do_tile);  // dV += Pd^T dO
    else
      gemm_rs<D, kBlockM, true, D, T>(dv, a_frag, do_tile);  // dV += Pd^T dO: B = dO, stored as dO [query][dim]
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - delta[frag_col(0, nt, e)];  // dS^T (without scale)
    acc_to_a<T, kBlockM>(a_frag, s);
    if constexpr (kUseWgmma)
      wgmma_gemm_rs<D, kBlockM, D>(dk, a_frag, q_tile);  // dK += dS^T Q
    else
      gemm_rs<D, kBlockM, true, D, T>(dk, a_frag, q_tile);  // dK += dS^T Q: B = Q, stored as Q [query][dim]
    __syncthreads();
  }
  if (iterations == 0) cp_async_wait<0>();

  const float dk_scale[2] = {p.scale, p.scale}, dv_scale[2] = {1.f, 1.f};
  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h;
  store_rows<T>(dk_out, p.dk_st.l, key0, p.len_k, dk, dk_scale);
  store_rows<T>(dv_out, p.dv_st.l, key0, p.len_k, dv, dv_scale);
}

}  // namespace attention
}  // namespace fastgpt
