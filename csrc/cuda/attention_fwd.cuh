// Flash-attention forward on tensor cores (sm_80+): out = dropout(softmax(q k^T * scale + mask)) v and the
// log-sum-exp of each query row, without the Lq x Lk matrix.
//
// Grid (ceil(Lq / kBlockM), H, B), kThreads threads. The block owns queries [m0, m0 + kBlockM) of head h, warp w
// the 16 rows m0 + 16 w ... Key/value blocks of kBlockN rows stream through a double buffer in shared memory:
// cp.async fetches block n + 1 while block n is computed. The two products per block run on the tensor cores in
// one of two ways, with the same register tiles (ptx.cuh):
//   mma.sync (sm_80+): each warp multiplies its 16 rows; Q stays in registers (A fragments) for the whole loop, K
//     and V are read from shared memory by ldmatrix;
//   wgmma (kWgmma on sm_90a): the 4 warps are one warpgroup and each product is a chain of asynchronous 64-row
//     wgmma, which read Q, K and V from shared memory themselves (P still comes from registers).
// Per key block, with s = q.k * scale * log2(e) (+ mask * log2(e)) in registers:
//   m_new = max(m, rowmax(s))      alpha = exp2(m - m_new)      p = exp2(s - m_new)
//   l = l * alpha + rowsum(p)      o = o * alpha + dropout(p) v
// and at the end out = o / l * 1 / (1 - p_drop), lse = (m + log2 l) * ln 2. A row that has seen no key keeps
// m = -inf; exponentials then use 0 in place of m so that no -inf - -inf appears, and the row ends with l = 0:
// out = 0, lse = -inf. Causal: key blocks entirely above the diagonal (n0 > m0 + kBlockM - 1) are never loaded.
#pragma once

#include "attention_common.cuh"

namespace fastgpt {
namespace attention {

template <int D>
struct FwdTile {
  static constexpr int kBlockM = 16 * kWarps;  // one 16-row mma tile per warp
  static constexpr int kBlockN = 64;
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(kBlockN % 16 == 0, "keys in k-steps of 16");
  // Q tile + double-buffered K and V tiles, 16-bit elements.
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * D * 2;
};

template <typename T, int D, MaskMode kMode, bool kDropout, bool kWgmma>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  static_assert(kThreads == 128 && FwdTile<D>::kBlockM == 64, "wgmma: the block is one warpgroup of 64 rows");
  constexpr bool kUseWgmma = kWgmma && kHasWgmma;  // mma.sync where this pass does not target sm_90a
  using Tile = FwdTile<D>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  unsigned char* smem = dynamic_smem();
  T* q_tile = reinterpret_cast<T*>(smem);  // kBlockM x D
  T* k_tiles = q_tile + kBlockM * D;       // 2 x kBlockN x D
  T* v_tiles = k_tiles + 2 * kBlockN * D;  // 2 x kBlockN x D

  // Heaviest (causal: last) query blocks first, so the short ones fill the tail of the launch.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const int warp = threadIdx.x / 32, row0 = m0 + warp * 16;  // this warp's first query row
  const uint32_t bh = static_cast<uint32_t>(b * p.heads + h);

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;

  const int n_end = kMode == MaskMode::kCausal ? min(p.len_k, m0 + kBlockM) : p.len_k;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  float o[D / 8][4];
  zero(o);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // rows g and g + 8 of the warp
  uint32_t q_frag[D / 16][4];

  load_tile<kBlockM, D>(q_tile, q, p.q_st.l, m0, p.len_q);
  if (n_blocks > 0) {
    load_tile<kBlockN, D>(k_tiles, k, p.k_st.l, 0, p.len_k);
    load_tile<kBlockN, D>(v_tiles, v, p.v_st.l, 0, p.len_k);
  }
  cp_async_commit();

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * kBlockN, buf = nb & 1;
    T* k_tile = k_tiles + buf * kBlockN * D;
    T* v_tile = v_tiles + buf * kBlockN * D;
    if (nb + 1 < n_blocks) {  // the other buffer was released by the previous iteration's closing barrier
      load_tile<kBlockN, D>(k_tiles + (buf ^ 1) * kBlockN * D, k, p.k_st.l, n0 + kBlockN, p.len_k);
      load_tile<kBlockN, D>(v_tiles + (buf ^ 1) * kBlockN * D, v, p.v_st.l, n0 + kBlockN, p.len_k);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the block just issued has landed
    } else {
      cp_async_wait<0>();
    }
    if constexpr (kUseWgmma) fence_proxy_async();  // the copies' bytes, visible to the wgmma that read them next
    __syncthreads();
    if (!kUseWgmma && nb == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<D>(q_frag[kk], q_tile, warp * 16, kk * 16);
    }

    float s[kBlockN / 8][4];  // this warp's 16 x kBlockN scores
    if constexpr (kUseWgmma) {
      wgmma_gemm_ss<kBlockN, D, D>(s, q_tile, k_tile);  // S = Q K^T
    } else {
      zero(s);
      gemm_rs<kBlockN, D, false, D, T>(s, q_frag, k_tile);  // S = Q K^T: B = K^T, stored as K [key][dim]
    }
    const bool check = n0 + kBlockN > p.len_k || (kMode == MaskMode::kCausal && n0 + kBlockN - 1 > row0);
    scale_and_mask<kMode, false, T>(s, p, b, h, row0, n0, check);

#pragma unroll
    for (int half = 0; half < 2; ++half) {  // row g (elements 0, 1) and row g + 8 (elements 2, 3)
      float m_new = m_run[half];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) m_new = fmaxf(m_new, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      m_new = quad_max(m_new);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[half] - m_use);  // 0 while the row has seen no key
      m_run[half] = m_new;
      float row_sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use);
          row_sum += s[nt][e];
        }
      l_run[half] = l_run[half] * alpha + row_sum;  // this lane's columns only; summed over the quad at the end
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][2 * half] *= alpha;
        o[nt][2 * half + 1] *= alpha;
      }
    }
    // l holds the undropped probabilities; dropped ones are zeroed before P V, the 1 / (1 - p) comes at the end.
    if constexpr (kDropout) apply_dropout(s, dropout_bits<false, kBlockN / 8>(p, bh, row0, n0), 1.f);

    uint32_t p_frag[kBlockN / 16][4];
    acc_to_a<T, kBlockN>(p_frag, s);
    if constexpr (kUseWgmma)
      wgmma_gemm_rs<D, kBlockN, D>(o, p_frag, v_tile);  // O += P V
    else
      gemm_rs<D, kBlockN, true, D, T>(o, p_frag, v_tile);  // O += P V: B = V, stored as V [key][dim]
    __syncthreads();  // all warps are done with this buffer before it is refilled
  }
  if (n_blocks == 0) cp_async_wait<0>();

  float out_scale[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(l_run[half]);
    out_scale[half] = l > 0.f ? (kDropout ? p.dropout_scale : 1.f) / l : 0.f;
    const int row = frag_row(row0, 2 * half);
    if ((threadIdx.x & 3) == 0 && row < p.len_q)
      p.lse[(static_cast<int64_t>(bh)) * p.len_q + row] = l > 0.f ? (m_run[half] + log2f(l)) * kLn2 : -INFINITY;
  }
  T* out = static_cast<T*>(p.out_w) + b * p.out_st.b + h * p.out_st.h;
  store_rows<T>(out, p.out_st.l, row0, p.len_q, o, out_scale);
}

}  // namespace attention
}  // namespace fastgpt
