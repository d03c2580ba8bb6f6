// The CPU attention's building blocks (csrc/cpu/attention.cpp): vector loops over float32 rows (the exponentials
// and maxima of the online softmax) and the tile products C += A B with their operand layouts, a float32
// register-blocked micro-kernel and, for bfloat16 on CPUs with AVX512-BF16, bfloat16 pair dot products.
// Included by attention.cpp alone: its names live in fastgpt::attention_tiles.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "float_rows.h"

// AVX512-BF16 dot products for bfloat16 inputs: compiled into AVX-512 builds, used where the CPU has them.
#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGPT_BF16_DOT 1
#include <immintrin.h>
#else
#define FASTGPT_BF16_DOT 0
#endif

namespace fastgpt {
namespace attention_tiles {

// ------------------------------------------------------------------------------------------------------------
// Hot loops on float buffers.

// One vector register of floats for the instruction set setup.py builds for: 16 lanes (AVX-512), 8 (AVX2) or 4
// (SSE2, the x86-64 baseline). A vector wider than the registers is not split into registers by GCC but goes
// through the stack: an AVX2 build on 16-lane vectors ran 7 to 8x slower. aligned(4) makes dereferencing an
// unaligned float pointer through it legal.
#if defined(__AVX512F__)
constexpr int64_t LANES = 16;
#elif defined(__AVX2__)
constexpr int64_t LANES = 8;
#else
constexpr int64_t LANES = 4;
#endif
typedef float vecf __attribute__((vector_size(4 * LANES), aligned(4), may_alias));
typedef int32_t veci __attribute__((vector_size(4 * LANES)));

// C[i, n] += sum_k A(i, k) B[k, n] for i < M, n < N, with A(i, k) = a[i * a_rs + k * a_cs] (so A may be a
// transposed view) and B, C row-major. Register block: MR rows of C times NV vectors of columns; B's row
// pieces are loaded once per k and multiplied by MR broadcast elements of A. Every element of C is the same chain
// of multiply-adds over k in order, whatever block or tail it falls in.
template <int64_t MR, int64_t NV>
inline __attribute__((always_inline)) void gemm_acc_block(int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                                                          const float* b, int64_t ldb, float* c, int64_t ldc) {
  vecf acc[MR][NV];
#pragma GCC unroll 8
  for (int64_t r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = *reinterpret_cast<const vecf*>(c + r * ldc + LANES * v);
  for (int64_t k = 0; k < K; ++k) {
    vecf b_row[NV];
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v) b_row[v] = *reinterpret_cast<const vecf*>(b + k * ldb + LANES * v);
#pragma GCC unroll 8
    for (int64_t r = 0; r < MR; ++r) {
      const float a_rk = a[r * a_rs + k * a_cs];
#pragma GCC unroll 4
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += a_rk * b_row[v];
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v) *reinterpret_cast<vecf*>(c + r * ldc + LANES * v) = acc[r][v];
}

template <int64_t MR, int64_t NV>
inline __attribute__((always_inline)) void gemm_acc_rows(int64_t N, int64_t K, const float* a, int64_t a_rs,
                                                         int64_t a_cs, const float* b, int64_t ldb, float* c,
                                                         int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + LANES * NV <= N; n0 += LANES * NV) gemm_acc_block<MR, NV>(K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc);
  for (; n0 + LANES <= N; n0 += LANES) gemm_acc_block<MR, 1>(K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc);
  if (n0 < N) {
    for (int64_t r = 0; r < MR; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float a_rk = a[r * a_rs + k * a_cs];
        for (int64_t n = n0; n < N; ++n) c[r * ldc + n] += a_rk * b[k * ldb + n];
      }
  }
}

// The register block: independent FMA chains enough to cover the FMA latency on two ports, few loads per FMA,
// within the register file. AVX-512: 4 rows x 4 zmm (16 of the 32 registers accumulate; 4 broadcasts and 4 loads
// of B for 16 FMAs), measured faster than 8 rows x 1 zmm. 16 registers (AVX2, SSE2): 4 x 2, 8 accumulators.
#if defined(__AVX512F__)
constexpr int64_t GEMM_MR = 4, GEMM_NV = 4;
#else
constexpr int64_t GEMM_MR = 4, GEMM_NV = 2;
#endif

inline void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + GEMM_MR <= M; i += GEMM_MR)
    gemm_acc_rows<GEMM_MR, GEMM_NV>(N, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
  for (; i < M; ++i) gemm_acc_rows<1, GEMM_NV>(N, K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
}

// exp(x) lane by lane: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for
// e^r (about 1 ulp), 2^n built in the exponent bits. n is rounded to nearest by adding and subtracting 1.5 * 2^23
// (exact for |n| < 2^22), which vectorises where nearbyint would not. x below -87.3 (including -inf) gives exactly
// 0, which masked entries rely on.
inline vecf exp_lanes(vecf x) {
  const vecf lo = vecf{} - 87.3f, hi = vecf{} + 88.7f, round = vecf{} + 12582912.0f;
  const vecf clamped = x < lo ? lo : (x > hi ? hi : x);
  const vecf n = (clamped * 1.44269504088896341f + round) - round;
  vecf r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vecf p = vecf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const veci bits = (__builtin_convertvector(n, veci) + 127) << 23;
  return x < lo ? vecf{} : p * reinterpret_cast<const vecf&>(bits);
}

// v with lane i moved to lane i ^ W.
template <int64_t W, size_t... I>
inline vecf swap_lanes(vecf v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I ^ W)...);
}

// op over the lanes of v, as a tree: lane-wise ops of v with its halves, quarters, ... swapped (a chain of one
// scalar op per lane would cost more than the row's exponentials).
template <typename Op>
inline float lane_reduce(vecf v, Op op) {
  constexpr auto lanes = std::make_index_sequence<LANES>{};
  if constexpr (LANES >= 16) v = op(v, swap_lanes<8>(v, lanes));
  if constexpr (LANES >= 8) v = op(v, swap_lanes<4>(v, lanes));
  v = op(v, swap_lanes<2>(v, lanes));
  v = op(v, swap_lanes<1>(v, lanes));
  return v[0];
}

inline float lane_sum(vecf v) {
  return lane_reduce(v, [](vecf a, vecf b) { return a + b; });
}

// x[n] = exp(x[n] - shift) for n < N; returns their sum, lane by lane (x[n] in lane n % LANES), for the caller to
// carry across tiles and reduce once. The tail goes through a padded vector (exp(-inf) = 0).
inline vecf exp_shifted(float* x, int64_t N, float shift) {
  vecf sum{};
  int64_t n = 0;
  for (; n + LANES <= N; n += LANES) {
    vecf& chunk = *reinterpret_cast<vecf*>(x + n);
    chunk = exp_lanes(chunk - shift);
    sum += chunk;
  }
  if (n < N) {
    vecf tail = vecf{} - std::numeric_limits<float>::infinity();
    std::memcpy(&tail, x + n, (N - n) * sizeof(float));
    tail = exp_lanes(tail - shift);
    std::memcpy(x + n, &tail, (N - n) * sizeof(float));
    sum += tail;
  }
  return sum;
}

// max(x[0], ..., x[N - 1]) (-inf for N = 0).
inline float max_of(const float* x, int64_t N) {
  vecf best = vecf{} - std::numeric_limits<float>::infinity();
  int64_t n = 0;
  for (; n + LANES <= N; n += LANES) {
    const vecf chunk = *reinterpret_cast<const vecf*>(x + n);
    best = chunk > best ? chunk : best;
  }
  float result = lane_reduce(best, [](vecf a, vecf b) { return a > b ? a : b; });
  for (; n < N; ++n) result = std::max(result, x[n]);
  return result;
}

// ------------------------------------------------------------------------------------------------------------
// Operands of the tile products.
//
// Every product is C (M x N, float32, row-major, ldc) += A (M x K) B (K x N), on operands laid out for the
// micro-kernel of the precision it runs in. A Tiles policy says how:
//   T, KP     the element of a packed operand, and how many consecutive k one group of KP elements holds;
//   A         a view {p, rs, cs}: the group of A[m][k] starts at p + (m * rs + (k / KP) * cs) * KP;
//             B is packed: the group of B[k][n] starts at b + ((k / KP) * N + n) * KP;
//             a K that is not a multiple of KP is padded with zeros, in A and in B;
//   load_a    A = an input tile (q, grad_out), gathered through its strides: A[m][k] = src[m * ms + k * ks];
//   load_b    B = an input tile: B[k][n] = src[k * ks + n * ns] (k^T and v^T are the same call, strides swapped);
//   rows_b    B = the rows a tile load_a took holds (A's M x K seen as K' x N);
//   rows_a, cols_a   A = X or A = X^T for a float32 tile X (rows x cols, row-major) the kernel computed;
//   gemm      the product.
// FloatTiles: float32, KP = 1, the micro-kernel above; a computed tile is used in place, through strides.
// Bf16Tiles (bfloat16 inputs on a CPU with AVX512-BF16): KP = 2, bfloat16 pairs (k, k + 1), the layout of
// vdpbf16ps, which multiplies both pairs of a 32-bit lane and adds the two products into a float32 lane: twice the
// multiply-adds of a float32 FMA per instruction. P and dS are rounded to bfloat16 for their products, as
// PyTorch's CPU flash attention and FlashAttention on GPUs do; every product accumulates in float32.

template <typename T>
struct ATile {
  const T* p;
  int64_t rs, cs;
};

// A buffer for an operand with K along k and `other` along m or n, whole groups of KP.
template <typename Tiles>
std::vector<typename Tiles::T> operand_buffer(int64_t K, int64_t other) {
  return std::vector<typename Tiles::T>((K + Tiles::KP - 1) / Tiles::KP * Tiles::KP * other);
}

// dst[r * cols + c] = src[r * rs + c * cs]; contiguous rows are converted a vector at a time (float_rows.h).
template <typename scalar_t>
void load_tile(const scalar_t* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if (cs == 1)
      to_float(src + r * rs, dst + r * cols, cols);
    else
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * rs + c * cs]);
  }
}

struct FloatTiles {
  using T = float;
  using A = ATile<float>;
  static constexpr int64_t KP = 1;

  template <typename scalar_t>
  static A load_a(const scalar_t* src, int64_t M, int64_t K, int64_t ms, int64_t ks, float* buf) {
    load_tile(src, M, K, ms, ks, buf);
    return {buf, K, 1};
  }
  template <typename scalar_t>
  static const float* load_b(const scalar_t* src, int64_t K, int64_t N, int64_t ks, int64_t ns, float* buf) {
    load_tile(src, K, N, ks, ns, buf);
    return buf;
  }
  template <typename scalar_t>  // a row-major float32 A is already a packed B
  static const float* rows_b(const A& a, const scalar_t*, int64_t, int64_t, int64_t, int64_t, float*) {
    return a.p;
  }
  static A rows_a(const float* x, int64_t, int64_t cols, float*) { return {x, cols, 1}; }
  static A cols_a(const float* x, int64_t, int64_t cols, float*) { return {x, 1, cols}; }
  static void gemm(int64_t M, int64_t N, int64_t K, const A& a, const float* b, float* c, int64_t ldc) {
    gemm_acc(M, N, K, a.p, a.rs, a.cs, b, N, c, ldc);
  }
};

#if FASTGPT_BF16_DOT
#define FASTGPT_TARGET_BF16 __attribute__((target("avx512bf16")))

// C[m, n0 + 16 v + l] += sum over pairs kk < K2 of A's pair (m, kk) . B's pair (kk, n0 + 16 v + l), for MR rows
// and NV vectors of 16 columns; lanes past `last` in the last vector are neither read nor written. Every lane
// runs the same vdpbf16ps sequence whatever MR, NV or its position, so equal inputs give equal sums bit for bit.
template <int64_t MR, int64_t NV>
FASTGPT_TARGET_BF16 inline void dot_block(int64_t K2, const at::BFloat16* a, int64_t a_rs, int64_t a_cs,
                                          const at::BFloat16* b, int64_t ldb, float* c, int64_t ldc,
                                          __mmask16 last) {
  // Fully unrolled, so that the MR x NV accumulators live in registers: 16 of the 32 zmm at MR = 4, NV = 4, which
  // measured faster than 8 x 2 (fewer loads per vdpbf16ps: 4 broadcasts and 4 vectors of B for 16 of them) and
  // level with 6 x 4.
  __m512 acc[MR][NV];
  const char* a_row[MR];  // pair (r, kk) at a_row[r] + kk * a_step
  const int64_t a_step = 4 * a_cs, b_step = 4 * ldb;
#pragma GCC unroll 8
  for (int64_t r = 0; r < MR; ++r) {
    a_row[r] = reinterpret_cast<const char*>(a + 2 * r * a_rs);
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v)
      acc[r][v] = _mm512_maskz_loadu_ps(v + 1 < NV ? __mmask16(0xFFFF) : last, c + r * ldc + 16 * v);
  }
  const char* b_pairs = reinterpret_cast<const char*>(b);
  for (int64_t kk = 0, a_off = 0; kk < K2; ++kk, a_off += a_step, b_pairs += b_step) {
    __m512i b_vec[NV];
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v)
      b_vec[v] = _mm512_maskz_loadu_epi32(v + 1 < NV ? __mmask16(0xFFFF) : last, b_pairs + 64 * v);
#pragma GCC unroll 8
    for (int64_t r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a_row[r] + a_off, sizeof(pair));
      const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_pair, (__m512bh)b_vec[v]);
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v + 1 < NV ? __mmask16(0xFFFF) : last, acc[r][v]);
}

template <int64_t MR>
FASTGPT_TARGET_BF16 inline void dot_rows(int64_t N, int64_t K2, const at::BFloat16* a, int64_t a_rs, int64_t a_cs,
                                         const at::BFloat16* b, float* c, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 64 <= N; n0 += 64) dot_block<MR, 4>(K2, a, a_rs, a_cs, b + 2 * n0, N, c + n0, ldc, 0xFFFF);
  const int64_t left = N - n0;
  const __mmask16 last = __mmask16((1u << ((left - 1) % 16 + 1)) - 1);
  if (left > 48)
    dot_block<MR, 4>(K2, a, a_rs, a_cs, b + 2 * n0, N, c + n0, ldc, last);
  else if (left > 32)
    dot_block<MR, 3>(K2, a, a_rs, a_cs, b + 2 * n0, N, c + n0, ldc, last);
  else if (left > 16)
    dot_block<MR, 2>(K2, a, a_rs, a_cs, b + 2 * n0, N, c + n0, ldc, last);
  else if (left > 0)
    dot_block<MR, 1>(K2, a, a_rs, a_cs, b + 2 * n0, N, c + n0, ldc, last);
}

// 32 bfloat16 (nearest even) of the floats x[0, count), zeros past count.
FASTGPT_TARGET_BF16 inline __m512i bf16_of(const float* x, int64_t count) {
  const __mmask16 lo = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(count, 0)) - 1);
  const __mmask16 hi = count >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(count - 16, 0)) - 1);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + 16), _mm512_maskz_loadu_ps(lo, x));
}

// Sixteen bfloat16 (nearest even) of the floats x[l] (lanes in mask, else 0), each in the low half of its 32-bit lane.
FASTGPT_TARGET_BF16 inline __m512i bf16_lanes(const float* x, __mmask16 mask) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x)));
}

// Pairs (even, odd) of bfloat16 held in the low halves of 32-bit lanes: the even one stays low (k), the odd one
// goes high (k + 1).
FASTGPT_TARGET_BF16 inline __m512i pairs_of(__m512i even, __m512i odd) {
  return _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));
}

struct Bf16Tiles {
  using T = at::BFloat16;
  using A = ATile<at::BFloat16>;
  static constexpr int64_t KP = 2;

  static A load_a(const at::BFloat16* src, int64_t M, int64_t K, int64_t ms, int64_t ks, at::BFloat16* buf) {
    const int64_t K2 = (K + 1) / 2;
    for (int64_t m = 0; m < M; ++m) {
      at::BFloat16* row = buf + 2 * m * K2;
      if (ks == 1)
        std::memcpy(row, src + m * ms, K * sizeof(at::BFloat16));
      else
        for (int64_t k = 0; k < K; ++k) row[k] = src[m * ms + k * ks];
      if (K % 2) row[K] = at::BFloat16(0.0f);
    }
    return {buf, K2, 1};
  }
  static const at::BFloat16* load_b(const at::BFloat16* src, int64_t K, int64_t N, int64_t ks, int64_t ns,
                                    at::BFloat16* buf) {
    if (ns == 1)
      pack_rows(src, K, N, ks, buf);
    else if (ks == 1)
      pack_columns(src, K, N, ns, buf);
    else
      for (int64_t k = 0; k < (K + 1) / 2 * 2; ++k)
        for (int64_t n = 0; n < N; ++n)
          buf[2 * ((k / 2) * N + n) + k % 2] = k < K ? src[k * ks + n * ns] : at::BFloat16(0.0f);
    return buf;
  }
  // B[k][n] = src[k * ks + n]: rows 2 kk and 2 kk + 1 interleaved into the pairs of group kk, 16 columns at a time.
  FASTGPT_TARGET_BF16 static void pack_rows(const at::BFloat16* src, int64_t K, int64_t N, int64_t ks,
                                            at::BFloat16* buf) {
    for (int64_t k = 0; k < K; k += 2)
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = N - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
        const __m512i even = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + k * ks + n));
        const __m512i odd = k + 1 < K ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + (k + 1) * ks + n))
                                      : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(buf + 2 * ((k / 2) * N + n), mask, pairs_of(even, odd));
      }
  }
  // B[k][n] = src[k + n * ns]: source row n holds the pairs of column n, contiguous; 16 x 16 blocks of pairs are
  // transposed in registers (32-bit unpacks, then 64-bit, then two rounds of 128-bit lane shuffles).
  FASTGPT_TARGET_BF16 static void pack_columns(const at::BFloat16* src, int64_t K, int64_t N, int64_t ns,
                                               at::BFloat16* buf) {
    const int64_t K2 = (K + 1) / 2;
    for (int64_t n0 = 0; n0 < N; n0 += 16)
      for (int64_t kk0 = 0; kk0 < K2; kk0 += 16) {
        // r[n] = pairs kk0.. of source row n0 + n; a K past the tensor's end is read as zeros (the odd K's pad).
        const int64_t elems = std::min<int64_t>(32, K - 2 * kk0);
        const __mmask32 k_mask = elems == 32 ? ~__mmask32(0) : (__mmask32(1) << elems) - 1;
        __m512i r[16], t[16];
#pragma GCC unroll 16
        for (int64_t n = 0; n < 16; ++n)
          r[n] = n0 + n < N ? _mm512_maskz_loadu_epi16(k_mask, src + (n0 + n) * ns + 2 * kk0) : _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int64_t g = 0; g < 16; g += 4) {  // lane l of t[g + c]: pair 4 l + c of rows g .. g + 3
          const __m512i a = _mm512_unpacklo_epi32(r[g], r[g + 1]), b = _mm512_unpackhi_epi32(r[g], r[g + 1]);
          const __m512i c = _mm512_unpacklo_epi32(r[g + 2], r[g + 3]), d = _mm512_unpackhi_epi32(r[g + 2], r[g + 3]);
          t[g] = _mm512_unpacklo_epi64(a, c);
          t[g + 1] = _mm512_unpackhi_epi64(a, c);
          t[g + 2] = _mm512_unpacklo_epi64(b, d);
          t[g + 3] = _mm512_unpackhi_epi64(b, d);
        }
        const __mmask16 n_mask = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
#pragma GCC unroll 4
        for (int64_t c = 0; c < 4; ++c) {
          const __m512i x0 = _mm512_shuffle_i32x4(t[c], t[4 + c], 0x44);
          const __m512i x1 = _mm512_shuffle_i32x4(t[c], t[4 + c], 0xEE);
          const __m512i y0 = _mm512_shuffle_i32x4(t[8 + c], t[12 + c], 0x44);
          const __m512i y1 = _mm512_shuffle_i32x4(t[8 + c], t[12 + c], 0xEE);
          const __m512i pairs[4] = {_mm512_shuffle_i32x4(x0, y0, 0x88), _mm512_shuffle_i32x4(x0, y0, 0xDD),
                                    _mm512_shuffle_i32x4(x1, y1, 0x88), _mm512_shuffle_i32x4(x1, y1, 0xDD)};
#pragma GCC unroll 4
          for (int64_t l = 0; l < 4; ++l) {  // pairs[l]: pair kk0 + 4 l + c of rows n0 .. n0 + 15
            const int64_t kk = kk0 + 4 * l + c;
            if (kk < K2) _mm512_mask_storeu_epi32(buf + 2 * (kk * N + n0), n_mask, pairs[l]);
          }
        }
      }
  }
  static const at::BFloat16* rows_b(const A&, const at::BFloat16* src, int64_t K, int64_t N, int64_t ks,
                                    int64_t ns, at::BFloat16* buf) {
    return load_b(src, K, N, ks, ns, buf);
  }
  // A = X: each row rounded to bfloat16, 32 at a time, padded to whole pairs.
  FASTGPT_TARGET_BF16 static A rows_a(const float* x, int64_t rows, int64_t cols, at::BFloat16* buf) {
    const int64_t K2 = (cols + 1) / 2;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < 2 * K2; c += 32) {
        const int64_t n = std::min<int64_t>(32, 2 * K2 - c);
        _mm512_mask_storeu_epi16(buf + 2 * r * K2 + c, n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1,
                                 bf16_of(x + r * cols + c, cols - c));
      }
    return {buf, K2, 1};
  }
  // A = X^T: rows 2 i2 and 2 i2 + 1 of X interleaved into the pairs of group i2 (the layout of a packed B of X).
  FASTGPT_TARGET_BF16 static A cols_a(const float* x, int64_t rows, int64_t cols, at::BFloat16* buf) {
    for (int64_t i = 0; i < rows; i += 2)
      for (int64_t c = 0; c < cols; c += 16) {
        const int64_t n = std::min<int64_t>(16, cols - c);
        const __mmask16 mask = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
        const __m512i even = bf16_lanes(x + i * cols + c, mask);
        const __m512i odd = i + 1 < rows ? bf16_lanes(x + (i + 1) * cols + c, mask) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(buf + 2 * ((i / 2) * cols + c), mask, pairs_of(even, odd));
      }
    return {buf, 1, cols};
  }
  FASTGPT_TARGET_BF16 static void gemm(int64_t M, int64_t N, int64_t K, const A& a, const at::BFloat16* b, float* c,
                                       int64_t ldc) {
    const int64_t K2 = (K + 1) / 2;
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) dot_rows<4>(N, K2, a.p + 2 * i * a.rs, a.rs, a.cs, b, c + i * ldc, ldc);
    for (; i < M; ++i) dot_rows<1>(N, K2, a.p + 2 * i * a.rs, a.rs, a.cs, b, c + i * ldc, ldc);
  }
};

inline bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif  // FASTGPT_BF16_DOT

// f(Tiles{}) with the Tiles that scalar_t's products run on here.
template <typename scalar_t, typename F>
void with_tiles(F&& f) {
#if FASTGPT_BF16_DOT
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu_has_bf16_dot()) return f(Bf16Tiles{});
  }
#endif
  f(FloatTiles{});
}

}  // namespace attention_tiles
}  // namespace fastgpt
