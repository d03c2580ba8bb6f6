// Fused scaled dot-product attention on the CPU: FlashAttention-2's algorithm in C++.
//
//   S = scale * Q K^T + mask        P = softmax(S) (row-wise)        O = dropout(P) V
//
// Forward, per (b, h, block of BLOCK_M query rows), over key blocks of BLOCK_N keys with the online softmax:
//   m' = max(m, rowmax(S_tile));  l' = exp(m - m') l + rowsum(exp(S_tile - m'));  acc' = exp(m - m') acc + P~ V
// and at the end O = acc / l and lse = m + log(l), kept (float32, one per query row) for the backward pass.
// Backward recomputes P = exp(S - lse) tile by tile, so nothing Lq x Lk ever exists in memory. With
// Z = keep / (1 - p) the dropout scale (0 where dropped) and delta = rowsum(dO * O) (= rowsum(P * dP')):
//   dV = (P * Z)^T dO      dP' = dO V^T      dS = P * (Z * dP' - delta)      dQ = scale dS K      dK = scale dS^T Q
// Deterministic: no two threads write a row, and every sum runs in a fixed order. dK, dV are parallel over
// (b, kv head, key block), each task owning its rows and summing the query heads of its GQA group in order; dQ
// either in the same pass, when a task owns all key blocks of its (b, kv head) (there are enough pairs for the
// threads), or in a second pass parallel over (b, h, query block).
//
// Layout: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), any strides (tiles are gathered through the
// strides into the operand layout of the tile products); grad_out likewise. attn_mask is broadcast to
// (B, H, Lq, Lk) by strides (a key padding mask (B, 1, 1, Lk) is read in place, no copy), bool (true = attend) or
// additive in q's dtype.
// Results are contiguous: out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32, dq/dk/dv like q/k/v.
// A query row with no visible key gets out = 0, lse = -inf and zero gradients.
// Dropout draws u = word j % 4 of philox(seed; c0 = j / 4, c1 = i, c2 = b * H + h, c3 = 0) and keeps P[b, h, i, j]
// iff u >= p, the generator every fastgpt backend shares (csrc/philox.h, fastgpt/ops/philox.py); backward
// regenerates the mask.
//
// Dtypes: float32, float16, bfloat16, all arithmetic in float32 (float64 goes to the reference backend: lse is
// float32 by contract, which would cap a float64 backward at float32 accuracy). The tile products go through a
// register-blocked micro-kernel: float32 FMAs, vectorised by the compiler for the instruction set setup.py builds
// for (FASTGPT_CPU_CAPABILITY: AVX-512, AVX2 or the baseline); for bfloat16 on a CPU with AVX512-BF16, bfloat16
// dot products accumulating in float32 (vdpbf16ps, twice the multiply-adds an instruction), on P and dS rounded
// to bfloat16 as PyTorch's CPU flash attention does (attention_tiles.h, "Operands of the tile products").

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_tiles.h"
#include "float_rows.h"
#include "philox.h"

namespace fastgpt {
namespace {

using namespace attention_tiles;

#define FASTGPT_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t BLOCK_M = 64;  // query rows per tile
constexpr int64_t BLOCK_N = 64;  // keys per tile

// Where the problem lives: sizes, element pointers and strides of every operand.
template <typename scalar_t>
struct Problem {
  int64_t B, H, Hk, Lq, Lk, D, Dv, group;  // group = H / Hk query heads per kv head
  const scalar_t *q, *k, *v;
  int64_t q_s[4], k_s[4], v_s[4];
  const void* mask = nullptr;  // bool or scalar_t, broadcast to (B, H, Lq, Lk) by mask_s
  bool mask_is_bool = false;
  int64_t mask_s[4] = {0, 0, 0, 0};
  bool is_causal;
  double scale;
  float dropout_p;
  uint64_t seed;
};

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                               double dropout_p, const at::Tensor& seed) {
  Problem<scalar_t> pb;
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Lq = q.size(2);
  pb.D = q.size(3);
  pb.Hk = k.size(1);
  pb.Lk = k.size(2);
  pb.Dv = v.size(3);
  pb.group = pb.H / pb.Hk;
  pb.q = q.const_data_ptr<scalar_t>();
  pb.k = k.const_data_ptr<scalar_t>();
  pb.v = v.const_data_ptr<scalar_t>();
  for (int d = 0; d < 4; ++d) {
    pb.q_s[d] = q.stride(d);
    pb.k_s[d] = k.stride(d);
    pb.v_s[d] = v.stride(d);
  }
  if (attn_mask.has_value()) {
    const at::Tensor mask = attn_mask->expand({pb.B, pb.H, pb.Lq, pb.Lk});
    pb.mask = mask.const_data_ptr();
    pb.mask_is_bool = mask.scalar_type() == at::kBool;
    for (int d = 0; d < 4; ++d) pb.mask_s[d] = mask.stride(d);
  }
  pb.is_causal = is_causal;
  pb.scale = scale;
  pb.dropout_p = static_cast<float>(dropout_p);
  pb.seed = dropout_p > 0.0 ? static_cast<uint64_t>(seed.item<int64_t>()) : 0;
  return pb;
}

// Number of keys query block [i0, i0 + BLOCK_M) can see: causal attention stops at the block's last row.
template <typename scalar_t>
int64_t visible_keys(const Problem<scalar_t>& pb, int64_t i0, int64_t rows) {
  return pb.is_causal ? std::min(pb.Lk, i0 + rows) : pb.Lk;
}

// s (rows x cols, rows i0.., keys j0..) = scale * s + mask, -inf where masked out (bool mask, causal).
template <typename scalar_t>
void scale_and_mask(const Problem<scalar_t>& pb, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                    int64_t cols, float* s) {
  const float scale = static_cast<float>(pb.scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows * cols; ++r) s[r] *= scale;
  if (pb.mask != nullptr) {
    const int64_t base = b * pb.mask_s[0] + h * pb.mask_s[1];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = base + (i0 + r) * pb.mask_s[2];
      float* s_row = s + r * cols;
      if (pb.mask_is_bool) {
        const bool* m = static_cast<const bool*>(pb.mask) + row;
        for (int64_t c = 0; c < cols; ++c)
          if (!m[(j0 + c) * pb.mask_s[3]]) s_row[c] = neg_inf;
      } else {
        const scalar_t* m = static_cast<const scalar_t*>(pb.mask) + row;
        for (int64_t c = 0; c < cols; ++c) s_row[c] += static_cast<float>(m[(j0 + c) * pb.mask_s[3]]);
      }
    }
  }
  if (pb.is_causal && j0 + cols - 1 > i0) {  // the tile crosses the diagonal
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = std::max<int64_t>(0, i0 + r + 1 - j0); c < cols; ++c) s[r * cols + c] = neg_inf;
  }
}

// z[r * cols + c] = 1 / (1 - p) if P[b, h, i0 + r, j0 + c] is kept by dropout, else 0.
template <typename scalar_t>
void dropout_scale(const Problem<scalar_t>& pb, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                   int64_t cols, float* z) {
  const float keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(pb.dropout_p)));
  const uint32_t c2 = static_cast<uint32_t>(b * pb.H + h);
  dropout_factors(pb.seed, j0, cols, rows, static_cast<uint32_t>(i0), c2, 0u, pb.dropout_p, keep_scale, z);
}

// ------------------------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename Tiles>
void attention_fwd_kernel(const Problem<scalar_t>& pb, scalar_t* out, float* lse) {
  const int64_t D = pb.D, Dv = pb.Dv;
  const int64_t q_blocks = (pb.Lq + BLOCK_M - 1) / BLOCK_M;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, pb.B * pb.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    auto q_buf = operand_buffer<Tiles>(D, BLOCK_M), kt_buf = operand_buffer<Tiles>(D, BLOCK_N);
    auto v_buf = operand_buffer<Tiles>(BLOCK_N, Dv), p_buf = operand_buffer<Tiles>(BLOCK_N, BLOCK_M);
    std::vector<float> s_tile(BLOCK_M * BLOCK_N), z_tile(BLOCK_M * BLOCK_N), acc(BLOCK_M * Dv);
    std::vector<float> row_max(BLOCK_M);
    vecf row_sum[BLOCK_M];  // lane by lane, reduced at the end
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks, bh = task / q_blocks, b = bh / pb.H, h = bh % pb.H;
      const int64_t hk = h / pb.group;
      const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, pb.Lq - i0);
      const auto q_a = Tiles::load_a(pb.q + b * pb.q_s[0] + h * pb.q_s[1] + i0 * pb.q_s[2], rows, D, pb.q_s[2],
                                     pb.q_s[3], q_buf.data());
      std::fill(acc.begin(), acc.end(), float(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum, row_sum + BLOCK_M, vecf{});
      const int64_t keys = visible_keys(pb, i0, rows);
      for (int64_t j0 = 0; j0 < keys; j0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, keys - j0);
        const scalar_t* k_rows = pb.k + b * pb.k_s[0] + hk * pb.k_s[1] + j0 * pb.k_s[2];
        const scalar_t* v_rows = pb.v + b * pb.v_s[0] + hk * pb.v_s[1] + j0 * pb.v_s[2];
        const auto* kt = Tiles::load_b(k_rows, D, cols, pb.k_s[3], pb.k_s[2], kt_buf.data());  // K^T (D x cols)
        const auto* v_b = Tiles::load_b(v_rows, cols, Dv, pb.v_s[2], pb.v_s[3], v_buf.data());
        float* s = s_tile.data();
        std::fill(s, s + rows * cols, float(0));
        Tiles::gemm(rows, cols, D, q_a, kt, s, cols);  // S = Q K^T
        scale_and_mask(pb, b, h, i0, rows, j0, cols, s);
        if (pb.dropout_p > 0.0f) dropout_scale(pb, b, h, i0, rows, j0, cols, z_tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* s_row = s + r * cols;
          const float tile_max = max_of(s_row, cols);
          const float new_max = std::max(row_max[r], tile_max);
          // No visible key yet: keep the exponent finite, every term below is exp(-inf) = 0.
          const float shift = new_max == neg_inf ? float(0) : new_max;
          const float rescale = std::exp(row_max[r] - shift);
          row_sum[r] = row_sum[r] * rescale + exp_shifted(s_row, cols, shift);
          row_max[r] = new_max;
          if (rescale != float(1))
            for (int64_t n = 0; n < Dv; ++n) acc[r * Dv + n] *= rescale;
          if (pb.dropout_p > 0.0f)
            for (int64_t c = 0; c < cols; ++c) s_row[c] *= z_tile[r * cols + c];
        }
        Tiles::gemm(rows, Dv, cols, Tiles::rows_a(s, rows, cols, p_buf.data()), v_b, acc.data(), Dv);  // acc += P~ V
      }
      scalar_t* out_rows = out + (bh * pb.Lq + i0) * Dv;
      float* lse_rows = lse + bh * pb.Lq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const float sum = lane_sum(row_sum[r]);
        const float inv = sum > float(0) ? float(1) / sum : float(0);
        for (int64_t n = 0; n < Dv; ++n) out_rows[r * Dv + n] = static_cast<scalar_t>(acc[r * Dv + n] * inv);
        lse_rows[r] = sum > float(0) ? static_cast<float>(row_max[r] + std::log(sum))
                                     : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Backward.

// For one (query tile, key tile) pair: recomputes P into p and, with dropout, the scale Z into z; computes
// dP' = dO V^T into dp and turns it into dS = P * (Z * dP' - delta). Returns P * Z: p itself without dropout,
// else pz, where it is written.
template <typename scalar_t, typename Tiles, typename T>
const float* backward_tile(const Problem<scalar_t>& pb, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                           int64_t cols, const ATile<T>& q_a, const ATile<T>& do_a, const float* lse_rows,
                           const float* delta_rows, const T* kt, const T* vt, float* p, float* z, float* dp,
                           float* pz) {
  std::fill(p, p + rows * cols, float(0));
  Tiles::gemm(rows, cols, pb.D, q_a, kt, p, cols);
  scale_and_mask(pb, b, h, i0, rows, j0, cols, p);
  for (int64_t r = 0; r < rows; ++r) {
    // lse = -inf: the row sees no key, its probabilities are all 0.
    const float lse = lse_rows[r];
    float* p_row = p + r * cols;
    if (lse == -std::numeric_limits<float>::infinity())
      std::fill(p_row, p_row + cols, float(0));
    else
      exp_shifted(p_row, cols, lse);
  }
  const bool dropout = pb.dropout_p > 0.0f;
  if (dropout) dropout_scale(pb, b, h, i0, rows, j0, cols, z);
  std::fill(dp, dp + rows * cols, float(0));
  Tiles::gemm(rows, cols, pb.Dv, do_a, vt, dp, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float delta = delta_rows[r];
    const float* p_row = p + r * cols;
    float* ds_row = dp + r * cols;
    if (dropout) {
      const float* z_row = z + r * cols;
      float* pz_row = pz + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        pz_row[c] = p_row[c] * z_row[c];
        ds_row[c] = p_row[c] * (z_row[c] * ds_row[c] - delta);
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) ds_row[c] = p_row[c] * (ds_row[c] - delta);
    }
  }
  return dropout ? pz : p;
}

template <typename scalar_t, typename Tiles>
void attention_bwd_kernel(const Problem<scalar_t>& pb, const scalar_t* grad_out, const int64_t* go_s,
                          const scalar_t* out, const float* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int64_t D = pb.D, Dv = pb.Dv, Lq = pb.Lq, Lk = pb.Lk, group = pb.group;
  const float scale = static_cast<float>(pb.scale);

  // delta[b, h, i] = rowsum(dO * O), with out contiguous (B, H, Lq, Dv). Summed by the product that sums dP'
  // (each lane of it runs the same multiply-adds in the same order), so a row with one visible key (P = 1, O = V
  // exactly) gets dS = P (dP' - delta) = 0 exactly, as the maths says.
  std::vector<float> delta(pb.B * pb.H * Lq);
  at::parallel_for(0, pb.B * pb.H * Lq, 64, [&](int64_t begin, int64_t end) {
    auto go_buf = operand_buffer<Tiles>(Dv, 1), o_buf = operand_buffer<Tiles>(Dv, 1);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Lq, bh = row / Lq, b = bh / pb.H, h = bh % pb.H;
      const auto go_a = Tiles::load_a(grad_out + b * go_s[0] + h * go_s[1] + i * go_s[2], 1, Dv, 0, go_s[3],
                                      go_buf.data());
      const auto* o_b = Tiles::load_b(out + row * Dv, Dv, 1, 1, 0, o_buf.data());
      delta[row] = 0.0f;
      Tiles::gemm(1, 1, Dv, go_a, o_b, &delta[row], 1);
    }
  });

  const int64_t q_blocks = (Lq + BLOCK_M - 1) / BLOCK_M;
  const int64_t k_blocks = (Lk + BLOCK_N - 1) / BLOCK_N;
  auto q_rows = [&](int64_t b, int64_t h, int64_t i) { return pb.q + b * pb.q_s[0] + h * pb.q_s[1] + i * pb.q_s[2]; };
  auto do_rows = [&](int64_t b, int64_t h, int64_t i) { return grad_out + b * go_s[0] + h * go_s[1] + i * go_s[2]; };
  auto k_rows = [&](int64_t b, int64_t h, int64_t j) { return pb.k + b * pb.k_s[0] + h * pb.k_s[1] + j * pb.k_s[2]; };
  auto v_rows = [&](int64_t b, int64_t h, int64_t j) { return pb.v + b * pb.v_s[0] + h * pb.v_s[1] + j * pb.v_s[2]; };

  // dK and dV: a task owns key blocks of one (b, kv head) and sums into them the group's query heads and all query
  // blocks, in order. When there are (b, kv head) pairs enough to keep every thread busy (4 a thread), a task owns
  // all key blocks of its pair and also sums dQ += dS K for the group's rows, in order of key block, into a float32
  // buffer: five products per tile pair instead of seven. Otherwise a second pass computes dQ (below).
  const bool fused_dq = pb.B * pb.Hk >= 4 * at::get_num_threads();
  const int64_t blocks_per_task = fused_dq ? k_blocks : 1;
  at::parallel_for(0, pb.B * pb.Hk * k_blocks / blocks_per_task, 1, [&](int64_t begin, int64_t end) {
    auto q_buf = operand_buffer<Tiles>(D, BLOCK_M), q_b_buf = operand_buffer<Tiles>(BLOCK_M, D);
    auto do_buf = operand_buffer<Tiles>(Dv, BLOCK_M), do_b_buf = operand_buffer<Tiles>(BLOCK_M, Dv);
    auto kt_buf = operand_buffer<Tiles>(D, BLOCK_N), vt_buf = operand_buffer<Tiles>(Dv, BLOCK_N);
    auto pzt_buf = operand_buffer<Tiles>(BLOCK_M, BLOCK_N), dst_buf = operand_buffer<Tiles>(BLOCK_M, BLOCK_N);
    auto k_buf = operand_buffer<Tiles>(BLOCK_N, D), ds_buf = operand_buffer<Tiles>(BLOCK_N, BLOCK_M);
    std::vector<float> p(BLOCK_M * BLOCK_N), z(BLOCK_M * BLOCK_N), ds(BLOCK_M * BLOCK_N), pz(BLOCK_M * BLOCK_N);
    std::vector<float> dk_acc(BLOCK_N * D), dv_acc(BLOCK_N * Dv), dq_acc(fused_dq ? group * Lq * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task * blocks_per_task / k_blocks, b = bhk / pb.Hk, hk = bhk % pb.Hk;
      const int64_t kb_begin = task * blocks_per_task % k_blocks;
      std::fill(dq_acc.begin(), dq_acc.end(), float(0));
      for (int64_t kb = kb_begin; kb < kb_begin + blocks_per_task; ++kb) {
        const int64_t j0 = kb * BLOCK_N, cols = std::min(BLOCK_N, Lk - j0);
        const auto* kt = Tiles::load_b(k_rows(b, hk, j0), D, cols, pb.k_s[3], pb.k_s[2], kt_buf.data());
        const auto* vt = Tiles::load_b(v_rows(b, hk, j0), Dv, cols, pb.v_s[3], pb.v_s[2], vt_buf.data());
        const auto* k_b = fused_dq ? Tiles::load_b(k_rows(b, hk, j0), cols, D, pb.k_s[2], pb.k_s[3], k_buf.data())
                                   : nullptr;
        std::fill(dk_acc.begin(), dk_acc.end(), float(0));
        std::fill(dv_acc.begin(), dv_acc.end(), float(0));
        // Causal: query i sees key j iff j <= i, so query blocks before the one holding row j0 contribute nothing.
        const int64_t first_qb = pb.is_causal ? j0 / BLOCK_M : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t qb = first_qb; qb < q_blocks; ++qb) {
            const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, Lq - i0);
            const int64_t row0 = (b * pb.H + h) * Lq + i0;
            const auto q_a = Tiles::load_a(q_rows(b, h, i0), rows, D, pb.q_s[2], pb.q_s[3], q_buf.data());
            const auto do_a = Tiles::load_a(do_rows(b, h, i0), rows, Dv, go_s[2], go_s[3], do_buf.data());
            const float* pz_tile = backward_tile<scalar_t, Tiles>(pb, b, h, i0, rows, j0, cols, q_a, do_a, lse + row0,
                                                                  delta.data() + row0, kt, vt, p.data(), z.data(),
                                                                  ds.data(), pz.data());
            const auto* do_b = Tiles::rows_b(do_a, do_rows(b, h, i0), rows, Dv, go_s[2], go_s[3], do_b_buf.data());
            const auto* q_b = Tiles::rows_b(q_a, q_rows(b, h, i0), rows, D, pb.q_s[2], pb.q_s[3], q_b_buf.data());
            Tiles::gemm(cols, Dv, rows, Tiles::cols_a(pz_tile, rows, cols, pzt_buf.data()), do_b, dv_acc.data(),
                        Dv);  // dV += (PZ)^T dO
            Tiles::gemm(cols, D, rows, Tiles::cols_a(ds.data(), rows, cols, dst_buf.data()), q_b, dk_acc.data(),
                        D);  // dK += dS^T Q
            if (fused_dq)
              Tiles::gemm(rows, D, cols, Tiles::rows_a(ds.data(), rows, cols, ds_buf.data()), k_b,
                          dq_acc.data() + ((h - hk * group) * Lq + i0) * D, D);  // dQ += dS K
          }
        }
        scalar_t* dk_rows = dk + (bhk * Lk + j0) * D;
        scalar_t* dv_rows = dv + (bhk * Lk + j0) * Dv;
        for (int64_t e = 0; e < cols * D; ++e) dk_rows[e] = static_cast<scalar_t>(dk_acc[e] * scale);
        for (int64_t e = 0; e < cols * Dv; ++e) dv_rows[e] = static_cast<scalar_t>(dv_acc[e]);
      }
      if (fused_dq) {
        scalar_t* dq_rows = dq + (b * pb.H + hk * group) * Lq * D;  // the group's heads are consecutive
        for (int64_t e = 0; e < group * Lq * D; ++e) dq_rows[e] = static_cast<scalar_t>(dq_acc[e] * scale);
      }
    }
  });
  if (fused_dq) return;

  // dQ: one task per (b, h, query block), key blocks in order.
  at::parallel_for(0, pb.B * pb.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    auto q_buf = operand_buffer<Tiles>(D, BLOCK_M), do_buf = operand_buffer<Tiles>(Dv, BLOCK_M);
    auto kt_buf = operand_buffer<Tiles>(D, BLOCK_N), k_buf = operand_buffer<Tiles>(BLOCK_N, D);
    auto vt_buf = operand_buffer<Tiles>(Dv, BLOCK_N), ds_buf = operand_buffer<Tiles>(BLOCK_N, BLOCK_M);
    std::vector<float> p(BLOCK_M * BLOCK_N), z(BLOCK_M * BLOCK_N), ds(BLOCK_M * BLOCK_N), pz(BLOCK_M * BLOCK_N);
    std::vector<float> dq_acc(BLOCK_M * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks, bh = task / q_blocks, b = bh / pb.H, h = bh % pb.H;
      const int64_t hk = h / group;
      const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, Lq - i0);
      const int64_t row0 = bh * Lq + i0;
      const auto q_a = Tiles::load_a(q_rows(b, h, i0), rows, D, pb.q_s[2], pb.q_s[3], q_buf.data());
      const auto do_a = Tiles::load_a(do_rows(b, h, i0), rows, Dv, go_s[2], go_s[3], do_buf.data());
      std::fill(dq_acc.begin(), dq_acc.end(), float(0));
      const int64_t keys = visible_keys(pb, i0, rows);
      for (int64_t j0 = 0; j0 < keys; j0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, keys - j0);
        const auto* kt = Tiles::load_b(k_rows(b, hk, j0), D, cols, pb.k_s[3], pb.k_s[2], kt_buf.data());
        const auto* k_b = Tiles::load_b(k_rows(b, hk, j0), cols, D, pb.k_s[2], pb.k_s[3], k_buf.data());
        const auto* vt = Tiles::load_b(v_rows(b, hk, j0), Dv, cols, pb.v_s[3], pb.v_s[2], vt_buf.data());
        backward_tile<scalar_t, Tiles>(pb, b, h, i0, rows, j0, cols, q_a, do_a, lse + row0, delta.data() + row0, kt,
                                       vt, p.data(), z.data(), ds.data(), pz.data());
        Tiles::gemm(rows, D, cols, Tiles::rows_a(ds.data(), rows, cols, ds_buf.data()), k_b, dq_acc.data(),
                    D);  // dQ += dS K
      }
      scalar_t* dq_rows = dq + row0 * D;
      for (int64_t e = 0; e < rows * D; ++e) dq_rows[e] = static_cast<scalar_t>(dq_acc[e] * scale);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Entry points.

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_mask, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(q.dim() == 4, op, ": expected q of shape (B, H, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": expected k of shape (B, Hk, Lk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": expected v of shape (B, Hk, Lk, Dv), got ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": expected q, k, v on the CPU");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": expected k and v of q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": expected k and v with q's batch size ",
              q.size(0), ", got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": expected k with q's head dim ", q.size(3), ", got ", k.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": expected v with k's heads and length ",
              k.sizes().slice(1, 2), ", got ", v.sizes().slice(1, 2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": expected q's heads ", q.size(1),
              " to be a multiple of k's heads ", k.size(1));
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.device().is_cpu(), op, ": expected attn_mask on the CPU");
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(), op,
                ": expected attn_mask of dtype bool or q's dtype ", q.scalar_type(), ", got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 4, op, ": expected attn_mask broadcastable to (B, H, Lq, Lk) with 4 dims, got ",
                mask.sizes());
    const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(mask.size(d) == full[d] || mask.size(d) == 1, op, ": attn_mask of shape ", mask.sizes(),
                  " does not broadcast to (B, H, Lq, Lk) = ", at::IntArrayRef(full, 4));
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": expected dropout_p in [0, 1), got ", dropout_p);
  TORCH_CHECK(dropout_p == 0.0 || (seed.device().is_cpu() && seed.numel() == 1 && seed.scalar_type() == at::kLong),
              op, ": expected seed to be an int64 CPU scalar tensor when dropout_p > 0");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                     double scale, double dropout_p, const at::Tensor& seed) {
  check_inputs("attention_fwd", q, k, v, attn_mask, dropout_p, seed);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  FASTGPT_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "attention_fwd", [&] {
    const auto pb = make_problem<scalar_t>(q, k, v, attn_mask, is_causal, scale, dropout_p, seed);
    with_tiles<scalar_t>([&](auto tiles) {
      attention_fwd_kernel<scalar_t, decltype(tiles)>(pb, out.mutable_data_ptr<scalar_t>(),
                                                      lse.mutable_data_ptr<float>());
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
    double dropout_p, const at::Tensor& seed) {
  check_inputs("attention_bwd", q, k, v, attn_mask, dropout_p, seed);
  const std::array<int64_t, 4> out_sizes = {q.size(0), q.size(1), q.size(2), v.size(3)};
  const at::IntArrayRef out_shape(out_sizes);
  TORCH_CHECK(grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device().is_cpu(),
              "attention_bwd: expected grad_out of shape ", out_shape, " and dtype ", q.scalar_type(),
              " on the CPU, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == out_shape && out.scalar_type() == q.scalar_type(),
              "attention_bwd: expected out of shape ", out_shape, " and dtype ", q.scalar_type(), ", got ",
              out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(lse.sizes() == out_shape.slice(0, 3) && lse.scalar_type() == at::kFloat,
              "attention_bwd: expected lse of shape ", out_shape.slice(0, 3), " and dtype float32, got ", lse.sizes(),
              " ", lse.scalar_type());
  const at::Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  FASTGPT_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "attention_bwd", [&] {
    const auto pb = make_problem<scalar_t>(q, k, v, attn_mask, is_causal, scale, dropout_p, seed);
    const int64_t go_s[4] = {grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3)};
    with_tiles<scalar_t>([&](auto tiles) {
      attention_bwd_kernel<scalar_t, decltype(tiles)>(pb, grad_out.const_data_ptr<scalar_t>(), go_s,
                                                      out_c.const_data_ptr<scalar_t>(), lse_c.const_data_ptr<float>(),
                                                      dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                                      dv.mutable_data_ptr<scalar_t>());
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastgpt
