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
// Two deterministic passes: dK, dV parallel over (b, kv head, key block), each task owning its rows and summing
// the query heads of its GQA group in order; dQ parallel over (b, h, query block). No two threads write a row.
//
// Layout: q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), any strides (tiles are gathered through the
// strides into float buffers); grad_out likewise. attn_mask is broadcast to (B, H, Lq, Lk) by strides (a key
// padding mask (B, 1, 1, Lk) is read in place, no copy), bool (true = attend) or additive in q's dtype.
// Results are contiguous: out (B, H, Lq, Dv) in q's dtype, lse (B, H, Lq) float32, dq/dk/dv like q/k/v.
// A query row with no visible key gets out = 0, lse = -inf and zero gradients.
// Dropout draws u = philox(seed; c0 = j, c1 = i, c2 = b * H + h, c3 = 0) and keeps P[b, h, i, j] iff u >= p, the
// generator every fastgpt backend shares (csrc/philox.h, fastgpt/ops/philox.py); backward regenerates the mask.
//
// Dtypes: float32, float16, bfloat16, all arithmetic in float32 (float64 goes to the reference backend: lse is
// float32 by contract, which would cap a float64 backward at float32 accuracy). The tile products go through one
// register-blocked micro-kernel whose inner loop the compiler vectorises for the instruction set setup.py builds
// for (FASTGPT_CPU_CAPABILITY: AVX-512, AVX2 or the baseline).

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
#include <vector>

#include "philox.h"

namespace fastgpt {
namespace {

#define FASTGPT_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t BLOCK_M = 64;  // query rows per tile
constexpr int64_t BLOCK_N = 64;  // keys per tile

// ------------------------------------------------------------------------------------------------------------
// Hot loops on float buffers.

// Sixteen floats as one value: GCC/Clang lower arithmetic on it to whatever vector width the target has
// (one zmm, two ymm or four xmm). aligned(4) makes dereferencing an unaligned float pointer through it legal.
typedef float vec16f __attribute__((vector_size(64), aligned(4), may_alias));

// C[i, n] += sum_k A(i, k) B[k, n] for i < M, n < N, with A(i, k) = a[i * a_rs + k * a_cs] (so A may be a
// transposed view) and B, C row-major. Register block: MR rows of C times 16 columns; B's row piece is loaded
// once per k and multiplied by MR broadcast elements of A.
template <int64_t MR>
inline __attribute__((always_inline)) void gemm_acc_rows(int64_t N, int64_t K, const float* a, int64_t a_rs,
                                                         int64_t a_cs, const float* b, int64_t ldb, float* c,
                                                         int64_t ldc) {
  constexpr int64_t NR = 16;
  int64_t n0 = 0;
  for (; n0 + NR <= N; n0 += NR) {
    vec16f acc[MR];
    for (int64_t r = 0; r < MR; ++r) acc[r] = *reinterpret_cast<const vec16f*>(c + r * ldc + n0);
    for (int64_t k = 0; k < K; ++k) {
      const vec16f b_row = *reinterpret_cast<const vec16f*>(b + k * ldb + n0);
      for (int64_t r = 0; r < MR; ++r) acc[r] += a[r * a_rs + k * a_cs] * b_row;
    }
    for (int64_t r = 0; r < MR; ++r) *reinterpret_cast<vec16f*>(c + r * ldc + n0) = acc[r];
  }
  if (n0 < N) {
    for (int64_t r = 0; r < MR; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float a_rk = a[r * a_rs + k * a_cs];
        for (int64_t n = n0; n < N; ++n) c[r * ldc + n] += a_rk * b[k * ldb + n];
      }
  }
}

// Rows of C per register block: enough independent FMA chains to cover the FMA latency on two ports (8), within
// the register file. AVX-512: one zmm per row, 8 rows. AVX2 or narrower: a vec16f is two or more registers, 4 rows.
#if defined(__AVX512F__)
constexpr int64_t GEMM_MR = 8;
#else
constexpr int64_t GEMM_MR = 4;
#endif

void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + GEMM_MR <= M; i += GEMM_MR)
    gemm_acc_rows<GEMM_MR>(N, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
  for (; i < M; ++i) gemm_acc_rows<1>(N, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
}

typedef int32_t vec16i __attribute__((vector_size(64)));

// exp(x) on sixteen lanes: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for
// e^r (about 1 ulp), 2^n built in the exponent bits. n is rounded to nearest by adding and subtracting 1.5 * 2^23
// (exact for |n| < 2^22), which vectorises where nearbyint would not. x below -87.3 (including -inf) gives exactly
// 0, which masked entries rely on.
inline vec16f exp16(vec16f x) {
  const vec16f lo = vec16f{} - 87.3f, hi = vec16f{} + 88.7f, round = vec16f{} + 12582912.0f;
  const vec16f clamped = x < lo ? lo : (x > hi ? hi : x);
  const vec16f n = (clamped * 1.44269504088896341f + round) - round;
  vec16f r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec16f p = vec16f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vec16i bits = (__builtin_convertvector(n, vec16i) + 127) << 23;
  return x < lo ? vec16f{} : p * reinterpret_cast<const vec16f&>(bits);
}

inline float lane_sum(vec16f v) {
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += v[i];
  return total;
}

// x[n] = exp(x[n] - shift) for n < N; returns the sum. The tail goes through a padded vector (exp(-inf) = 0).
float exp_shifted_sum(float* x, int64_t N, float shift) {
  vec16f sum{};
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    vec16f& chunk = *reinterpret_cast<vec16f*>(x + n);
    chunk = exp16(chunk - shift);
    sum += chunk;
  }
  if (n < N) {
    vec16f tail = vec16f{} - std::numeric_limits<float>::infinity();
    std::memcpy(&tail, x + n, (N - n) * sizeof(float));
    tail = exp16(tail - shift);
    std::memcpy(x + n, &tail, (N - n) * sizeof(float));
    sum += tail;
  }
  return lane_sum(sum);
}

// max(x[0], ..., x[N - 1]) (-inf for N = 0).
float max_of(const float* x, int64_t N) {
  vec16f best = vec16f{} - std::numeric_limits<float>::infinity();
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    const vec16f chunk = *reinterpret_cast<const vec16f*>(x + n);
    best = chunk > best ? chunk : best;
  }
  float result = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < 16; ++i) result = std::max(result, best[i]);
  for (; n < N; ++n) result = std::max(result, x[n]);
  return result;
}

// ------------------------------------------------------------------------------------------------------------
// Tiles: gathered through strides into float buffers, row-major and compact.

// dst[r * cols + c] = src[r * rs + c * cs]
template <typename scalar_t>
void load_tile(const scalar_t* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * rs + c * cs]);
}

// dst[c * rows + r] = src[r * rs + c * cs]: the tile transposed, so products with it run along contiguous rows.
template <typename scalar_t>
void load_tile_transposed(const scalar_t* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = static_cast<float>(src[r * rs + c * cs]);
}

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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float u = philox_uniform(pb.seed, static_cast<uint32_t>(j0 + c), static_cast<uint32_t>(i0 + r), c2, 0);
      z[r * cols + c] = u >= pb.dropout_p ? keep_scale : float(0);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
void attention_fwd_kernel(const Problem<scalar_t>& pb, scalar_t* out, float* lse) {
  const int64_t D = pb.D, Dv = pb.Dv;
  const int64_t q_blocks = (pb.Lq + BLOCK_M - 1) / BLOCK_M;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, pb.B * pb.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(BLOCK_M * D), kt_tile(D * BLOCK_N), v_tile(BLOCK_N * Dv);
    std::vector<float> s_tile(BLOCK_M * BLOCK_N), z_tile(BLOCK_M * BLOCK_N), acc(BLOCK_M * Dv);
    std::vector<float> row_max(BLOCK_M), row_sum(BLOCK_M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks, bh = task / q_blocks, b = bh / pb.H, h = bh % pb.H;
      const int64_t hk = h / pb.group;
      const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, pb.Lq - i0);
      load_tile(pb.q + b * pb.q_s[0] + h * pb.q_s[1] + i0 * pb.q_s[2], rows, D, pb.q_s[2], pb.q_s[3],
                q_tile.data());
      std::fill(acc.begin(), acc.end(), float(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), float(0));
      const int64_t keys = visible_keys(pb, i0, rows);
      for (int64_t j0 = 0; j0 < keys; j0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, keys - j0);
        load_tile_transposed(pb.k + b * pb.k_s[0] + hk * pb.k_s[1] + j0 * pb.k_s[2], cols, D, pb.k_s[2],
                             pb.k_s[3], kt_tile.data());
        load_tile(pb.v + b * pb.v_s[0] + hk * pb.v_s[1] + j0 * pb.v_s[2], cols, Dv, pb.v_s[2], pb.v_s[3],
                  v_tile.data());
        float* s = s_tile.data();
        std::fill(s, s + rows * cols, float(0));
        gemm_acc(rows, cols, D, q_tile.data(), D, 1, kt_tile.data(), cols, s, cols);  // S = Q K^T
        scale_and_mask(pb, b, h, i0, rows, j0, cols, s);
        if (pb.dropout_p > 0.0f) dropout_scale(pb, b, h, i0, rows, j0, cols, z_tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* s_row = s + r * cols;
          const float tile_max = max_of(s_row, cols);
          const float new_max = std::max(row_max[r], tile_max);
          // No visible key yet: keep the exponent finite, every term below is exp(-inf) = 0.
          const float shift = new_max == neg_inf ? float(0) : new_max;
          const float rescale = std::exp(row_max[r] - shift);
          row_sum[r] = row_sum[r] * rescale + exp_shifted_sum(s_row, cols, shift);
          row_max[r] = new_max;
          if (rescale != float(1))
            for (int64_t n = 0; n < Dv; ++n) acc[r * Dv + n] *= rescale;
          if (pb.dropout_p > 0.0f)
            for (int64_t c = 0; c < cols; ++c) s_row[c] *= z_tile[r * cols + c];
        }
        gemm_acc(rows, Dv, cols, s, cols, 1, v_tile.data(), Dv, acc.data(), Dv);  // acc += P~ V
      }
      scalar_t* out_rows = out + (bh * pb.Lq + i0) * Dv;
      float* lse_rows = lse + bh * pb.Lq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = row_sum[r] > float(0) ? float(1) / row_sum[r] : float(0);
        for (int64_t n = 0; n < Dv; ++n) out_rows[r * Dv + n] = static_cast<scalar_t>(acc[r * Dv + n] * inv);
        lse_rows[r] = row_sum[r] > float(0) ? static_cast<float>(row_max[r] + std::log(row_sum[r]))
                                             : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Backward.

// For one (query tile, key tile) pair: recomputes P into p, the dropout scale into z (when dropout is on), and
// dP' = dO V^T into dp; then turns dp into dS = P * (Z * dP' - delta) and, when pz is given, writes P * Z there.
template <typename scalar_t>
void backward_tile(const Problem<scalar_t>& pb, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                   int64_t cols, const float* q_tile, const float* do_tile, const float* lse_rows,
                   const float* delta_rows, const float* kt_tile, const float* vt_tile, float* p, float* z,
                   float* dp, float* pz) {
  std::fill(p, p + rows * cols, float(0));
  gemm_acc(rows, cols, pb.D, q_tile, pb.D, 1, kt_tile, cols, p, cols);
  scale_and_mask(pb, b, h, i0, rows, j0, cols, p);
  for (int64_t r = 0; r < rows; ++r) {
    // lse = -inf: the row sees no key, its probabilities are all 0.
    const float lse = lse_rows[r];
    float* p_row = p + r * cols;
    if (lse == -std::numeric_limits<float>::infinity())
      std::fill(p_row, p_row + cols, float(0));
    else
      exp_shifted_sum(p_row, cols, lse);
  }
  const bool dropout = pb.dropout_p > 0.0f;
  if (dropout) dropout_scale(pb, b, h, i0, rows, j0, cols, z);
  std::fill(dp, dp + rows * cols, float(0));
  gemm_acc(rows, cols, pb.Dv, do_tile, pb.Dv, 1, vt_tile, cols, dp, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t e = r * cols + c;
      const float zs = dropout ? z[e] : float(1);
      if (pz != nullptr) pz[e] = p[e] * zs;
      dp[e] = p[e] * (zs * dp[e] - delta_rows[r]);
    }
}

template <typename scalar_t>
void attention_bwd_kernel(const Problem<scalar_t>& pb, const scalar_t* grad_out, const int64_t* go_s,
                          const scalar_t* out, const float* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int64_t D = pb.D, Dv = pb.Dv, Lq = pb.Lq, Lk = pb.Lk;
  const float scale = static_cast<float>(pb.scale);

  // delta[b, h, i] = rowsum(dO * O), with out contiguous (B, H, Lq, Dv). Summed by gemm_acc, which sums dP' too
  // (in order, with the same fused multiply-adds), so a row with one visible key (P = 1, O = V exactly) gets
  // dS = P (dP' - delta) = 0 exactly, as the maths says.
  std::vector<float> delta(pb.B * pb.H * Lq);
  at::parallel_for(0, pb.B * pb.H * Lq, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> go_row(Dv), o_row(Dv);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Lq, bh = row / Lq, b = bh / pb.H, h = bh % pb.H;
      load_tile(grad_out + b * go_s[0] + h * go_s[1] + i * go_s[2], 1, Dv, 0, go_s[3], go_row.data());
      load_tile(out + row * Dv, 1, Dv, 0, 1, o_row.data());
      delta[row] = 0.0f;
      gemm_acc(1, 1, Dv, go_row.data(), Dv, 1, o_row.data(), 1, &delta[row], 1);
    }
  });

  auto load_q_do = [&](int64_t b, int64_t h, int64_t i0, int64_t rows, float* q_tile, float* do_tile) {
    load_tile(pb.q + b * pb.q_s[0] + h * pb.q_s[1] + i0 * pb.q_s[2], rows, D, pb.q_s[2], pb.q_s[3], q_tile);
    load_tile(grad_out + b * go_s[0] + h * go_s[1] + i0 * go_s[2], rows, Dv, go_s[2], go_s[3], do_tile);
  };
  const int64_t q_blocks = (Lq + BLOCK_M - 1) / BLOCK_M;
  const int64_t k_blocks = (Lk + BLOCK_N - 1) / BLOCK_N;

  // dK, dV: one task per (b, kv head, key block); the group's query heads and all query blocks summed in order.
  at::parallel_for(0, pb.B * pb.Hk * k_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(BLOCK_M * D), do_tile(BLOCK_M * Dv), kt_tile(D * BLOCK_N), vt_tile(Dv * BLOCK_N);
    std::vector<float> p(BLOCK_M * BLOCK_N), z(BLOCK_M * BLOCK_N), ds(BLOCK_M * BLOCK_N), pz(BLOCK_M * BLOCK_N);
    std::vector<float> dk_acc(BLOCK_N * D), dv_acc(BLOCK_N * Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = task % k_blocks, bhk = task / k_blocks, b = bhk / pb.Hk, hk = bhk % pb.Hk;
      const int64_t j0 = kb * BLOCK_N, cols = std::min(BLOCK_N, Lk - j0);
      load_tile_transposed(pb.k + b * pb.k_s[0] + hk * pb.k_s[1] + j0 * pb.k_s[2], cols, D, pb.k_s[2], pb.k_s[3],
                           kt_tile.data());
      load_tile_transposed(pb.v + b * pb.v_s[0] + hk * pb.v_s[1] + j0 * pb.v_s[2], cols, Dv, pb.v_s[2],
                           pb.v_s[3], vt_tile.data());
      std::fill(dk_acc.begin(), dk_acc.end(), float(0));
      std::fill(dv_acc.begin(), dv_acc.end(), float(0));
      // Causal: query i sees key j iff j <= i, so query blocks before the one holding row j0 contribute nothing.
      const int64_t first_qb = pb.is_causal ? j0 / BLOCK_M : 0;
      for (int64_t h = hk * pb.group; h < (hk + 1) * pb.group; ++h) {
        for (int64_t qb = first_qb; qb < q_blocks; ++qb) {
          const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, Lq - i0);
          const int64_t row0 = (b * pb.H + h) * Lq + i0;
          load_q_do(b, h, i0, rows, q_tile.data(), do_tile.data());
          backward_tile(pb, b, h, i0, rows, j0, cols, q_tile.data(), do_tile.data(), lse + row0, delta.data() + row0,
                        kt_tile.data(), vt_tile.data(), p.data(), z.data(), ds.data(), pz.data());
          gemm_acc(cols, Dv, rows, pz.data(), 1, cols, do_tile.data(), Dv, dv_acc.data(), Dv);  // dV += (PZ)^T dO
          gemm_acc(cols, D, rows, ds.data(), 1, cols, q_tile.data(), D, dk_acc.data(), D);      // dK += dS^T Q
        }
      }
      scalar_t* dk_rows = dk + (bhk * Lk + j0) * D;
      scalar_t* dv_rows = dv + (bhk * Lk + j0) * Dv;
      for (int64_t e = 0; e < cols * D; ++e) dk_rows[e] = static_cast<scalar_t>(dk_acc[e] * scale);
      for (int64_t e = 0; e < cols * Dv; ++e) dv_rows[e] = static_cast<scalar_t>(dv_acc[e]);
    }
  });

  // dQ: one task per (b, h, query block).
  at::parallel_for(0, pb.B * pb.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(BLOCK_M * D), do_tile(BLOCK_M * Dv), kt_tile(D * BLOCK_N), k_tile(BLOCK_N * D);
    std::vector<float> vt_tile(Dv * BLOCK_N), p(BLOCK_M * BLOCK_N), z(BLOCK_M * BLOCK_N), ds(BLOCK_M * BLOCK_N);
    std::vector<float> dq_acc(BLOCK_M * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks, bh = task / q_blocks, b = bh / pb.H, h = bh % pb.H;
      const int64_t hk = h / pb.group;
      const int64_t i0 = qb * BLOCK_M, rows = std::min(BLOCK_M, Lq - i0);
      const int64_t row0 = bh * Lq + i0;
      load_q_do(b, h, i0, rows, q_tile.data(), do_tile.data());
      std::fill(dq_acc.begin(), dq_acc.end(), float(0));
      const int64_t keys = visible_keys(pb, i0, rows);
      for (int64_t j0 = 0; j0 < keys; j0 += BLOCK_N) {
        const int64_t cols = std::min(BLOCK_N, keys - j0);
        const scalar_t* k_rows = pb.k + b * pb.k_s[0] + hk * pb.k_s[1] + j0 * pb.k_s[2];
        load_tile_transposed(k_rows, cols, D, pb.k_s[2], pb.k_s[3], kt_tile.data());
        load_tile(k_rows, cols, D, pb.k_s[2], pb.k_s[3], k_tile.data());
        load_tile_transposed(pb.v + b * pb.v_s[0] + hk * pb.v_s[1] + j0 * pb.v_s[2], cols, Dv, pb.v_s[2],
                             pb.v_s[3], vt_tile.data());
        backward_tile(pb, b, h, i0, rows, j0, cols, q_tile.data(), do_tile.data(), lse + row0, delta.data() + row0,
                      kt_tile.data(), vt_tile.data(), p.data(), z.data(), ds.data(), static_cast<float*>(nullptr));
        gemm_acc(rows, D, cols, ds.data(), cols, 1, k_tile.data(), D, dq_acc.data(), D);  // dQ += dS K
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
    attention_fwd_kernel<scalar_t>(pb, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
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
    attention_bwd_kernel<scalar_t>(pb, grad_out.const_data_ptr<scalar_t>(), go_s, out_c.const_data_ptr<scalar_t>(),
                                   lse_c.const_data_ptr<float>(), dq.mutable_data_ptr<scalar_t>(),
                                   dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastgpt
