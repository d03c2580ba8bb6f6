// Philox4x32-10, bit-identical to Triton's tl.philox(seed, c0, c1, c2, c3) with each output word turned into a
// uniform by tl.random.uint_to_uniform_float, so that the C++/CUDA kernels draw the very same dropout masks as the
// Triton kernels and the PyTorch reference (fastgpt/ops/philox.py) for the same seed.
// Key: k0 = low 32 bits of the seed, k1 = high 32 bits. Each round:
//   (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)),  A = 0xD2511F53, B = 0xCD9E8D57
//   (k0, k1) += (0x9E3779B9, 0xBB67AE85)
// Uniform of a word: x = its int32 bits, x = x < 0 ? -x - 1 : x (= ~x), u = x * 4.6566127342e-10 in [0, 1).
// Streams: four consecutive elements share a call, element n taking word n % 4 of the call at c0 = n / 4 (the
// layouts are in fastgpt/ops/philox.py).
#pragma once

#include <algorithm>
#include <cstdint>

#if !defined(__CUDACC__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyStep0 = 0x9E3779B9u, kPhiloxKeyStep1 = 0xBB67AE85u;
constexpr float kWordToUniform = 4.6566127342e-10f;  // 2^-31 (Triton's constant): a non-negative int32 to [0, 1)

// One round on the counters (c0, c1, c2, c3) with the round's key (k0, k1).
FASTGPT_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                      uint32_t k1) {
  const uint64_t b_c2 = static_cast<uint64_t>(kPhiloxMulB) * c2;
  const uint64_t a_c0 = static_cast<uint64_t>(kPhiloxMulA) * c0;
  c0 = static_cast<uint32_t>(b_c2 >> 32) ^ c1 ^ k0;
  c2 = static_cast<uint32_t>(a_c0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(b_c2);
  c3 = static_cast<uint32_t>(a_c0);
}

// The four output words at counters (c0, c1, c2, c3).
FASTGPT_HOST_DEVICE void philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t (&words)[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyStep0;
    k1 += kPhiloxKeyStep1;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

FASTGPT_HOST_DEVICE float word_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kWordToUniform;
}

// words[k & 3] by selects: a register array indexed by a runtime value would go to local memory on a GPU.
FASTGPT_HOST_DEVICE uint32_t pick_word(const uint32_t (&words)[4], uint32_t k) {
  const uint32_t low = k & 1u ? words[1] : words[0], high = k & 1u ? words[3] : words[2];
  return k & 2u ? high : low;
}

#if !defined(__CUDACC__)
// GCC 12's AVX-512 intrinsics pass an undefined operand (`__m512i __Y = __Y`) that -Wall reports at every use
// (GCC bug 105593, a false positive): a thousand lines of build log.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// PhiloxLanes: kWidth Philox calls side by side, one to each 32-bit lane of a vector register, for the CPU kernels.
// A round's two 32 x 32 -> 64-bit products take vpmuludq, which multiplies the even lanes only: the odd lanes are
// shifted down to be multiplied, and the halves blended back into place. One group's rounds are a chain of
// dependent multiplies (about 10 cycles a round): kUnroll independent groups are drawn together to hide it.
// Without AVX2 the lanes are plain arrays, and each step a loop the compiler vectorises as it can.
#if defined(__AVX512F__)
struct PhiloxLanes {
  static constexpr int kWidth = 16, kUnroll = 4;  // 16 of the 32 zmm registers hold the state
  using V = __m512i;
  static V splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V consecutive(uint32_t x) {  // x, x + 1, ..., x + 15
    return _mm512_add_epi32(splat(x), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static void mul_hi_lo(V x, V m, V& hi, V& lo) {
    const V even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  // scale where word_uniform(w) >= p, else 0.
  static V factor(V w, float p, float scale) {
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_xor_si512(w, _mm512_srai_epi32(w, 31))),
                                   _mm512_set1_ps(kWordToUniform));
    return _mm512_castps_si512(
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, _mm512_set1_ps(p), _CMP_GE_OQ), _mm512_set1_ps(scale)));
  }
  // out[4 i + k] = factor of word k of lane i: a 4 x 16 transpose, within 128-bit quarters (unpack), then of the
  // quarters (shuffle_i32x4).
  static void store_factors(const V (&w)[4], float p, float scale, float* out) {
    const V f0 = factor(w[0], p, scale), f1 = factor(w[1], p, scale), f2 = factor(w[2], p, scale),
            f3 = factor(w[3], p, scale);
    const V t0 = _mm512_unpacklo_epi32(f0, f1), t1 = _mm512_unpackhi_epi32(f0, f1),
            t2 = _mm512_unpacklo_epi32(f2, f3), t3 = _mm512_unpackhi_epi32(f2, f3);
    // quarter q of call_k holds lane 4 q + k's four words
    const V call0 = _mm512_unpacklo_epi64(t0, t2), call1 = _mm512_unpackhi_epi64(t0, t2),
            call2 = _mm512_unpacklo_epi64(t1, t3), call3 = _mm512_unpackhi_epi64(t1, t3);
    const V low01 = _mm512_shuffle_i32x4(call0, call1, 0x44), low23 = _mm512_shuffle_i32x4(call2, call3, 0x44),
            high01 = _mm512_shuffle_i32x4(call0, call1, 0xEE), high23 = _mm512_shuffle_i32x4(call2, call3, 0xEE);
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(low01, low23, 0x88));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(low01, low23, 0xDD));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(high01, high23, 0x88));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(high01, high23, 0xDD));
  }
};
#elif defined(__AVX2__)
struct PhiloxLanes {
  static constexpr int kWidth = 8, kUnroll = 2;  // of 16 ymm registers: more groups would spill
  using V = __m256i;
  static V splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V consecutive(uint32_t x) { return _mm256_add_epi32(splat(x), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static void mul_hi_lo(V x, V m, V& hi, V& lo) {
    const V even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static V factor(V w, float p, float scale) {
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31))),
                                   _mm256_set1_ps(kWordToUniform));
    return _mm256_castps_si256(_mm256_and_ps(_mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GE_OQ), _mm256_set1_ps(scale)));
  }
  static void store_factors(const V (&w)[4], float p, float scale, float* out) {
    const V f0 = factor(w[0], p, scale), f1 = factor(w[1], p, scale), f2 = factor(w[2], p, scale),
            f3 = factor(w[3], p, scale);
    const V t0 = _mm256_unpacklo_epi32(f0, f1), t1 = _mm256_unpackhi_epi32(f0, f1),
            t2 = _mm256_unpacklo_epi32(f2, f3), t3 = _mm256_unpackhi_epi32(f2, f3);
    // half h of call_k holds lane 4 h + k's four words
    const V call0 = _mm256_unpacklo_epi64(t0, t2), call1 = _mm256_unpackhi_epi64(t0, t2),
            call2 = _mm256_unpacklo_epi64(t1, t3), call3 = _mm256_unpackhi_epi64(t1, t3);
    auto* o = reinterpret_cast<__m256i*>(out);
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(call0, call1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(call2, call3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(call0, call1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(call2, call3, 0x31));
  }
};
#else
struct PhiloxLanes {
  static constexpr int kWidth = 16, kUnroll = 2;  // GCC 12, SSE2: 5.2 ns a call (8 x 2: 7.4, 8 x 4: 5.6, 32 x 1: 8.0)
  struct V {
    uint32_t x[kWidth];
  };
  static V splat(uint32_t x) {
    V v;
    for (int i = 0; i < kWidth; ++i) v.x[i] = x;
    return v;
  }
  static V consecutive(uint32_t x) {
    V v;
    for (int i = 0; i < kWidth; ++i) v.x[i] = x + static_cast<uint32_t>(i);
    return v;
  }
  static void mul_hi_lo(V x, V m, V& hi, V& lo) {
    for (int i = 0; i < kWidth; ++i) {
      const uint64_t product = static_cast<uint64_t>(x.x[i]) * m.x[i];
      hi.x[i] = static_cast<uint32_t>(product >> 32);
      lo.x[i] = static_cast<uint32_t>(product);
    }
  }
  static V xor3(V a, V b, V c) {
    for (int i = 0; i < kWidth; ++i) a.x[i] ^= b.x[i] ^ c.x[i];
    return a;
  }
  static void store_factors(const V (&w)[4], float p, float scale, float* out) {
    for (int i = 0; i < kWidth; ++i)
      for (int k = 0; k < 4; ++k) out[4 * i + k] = word_uniform(w[k].x[i]) >= p ? scale : 0.f;
  }
};
#endif

// factors[r * count + k] = scale (1 / (1 - p)) if element n0 + k of the stream (c1 + r, c2, c3) is kept by dropout
// of rate p (its uniform >= p), else 0, for r < rows and k < count: the multipliers of a dropped (rows, count) block.
// For the CPU kernels. A row's calls (counters n0 / 4 .. (n0 + count - 1) / 4) are drawn kWidth at a time, kUnroll
// such units (of one row or of several) together. With AVX-512: 0.90 ns a call (a 768-wide row, one core of an
// AMD EPYC, GCC 12), 2.5x the compiler's own vectorisation of the same loop and 8x a call at a time. Rows of fewer
// than a quarter of a unit's calls take a call at a time: the lanes past the row would cost more than they save.
inline void dropout_factors(uint64_t seed, int64_t n0, int64_t count, int64_t rows, uint32_t c1, uint32_t c2,
                            uint32_t c3, float p, float scale, float* factors) {
  using L = PhiloxLanes;
  if (count <= 0 || rows <= 0) return;
  const int64_t first = n0 >> 2, last = (n0 + count - 1) >> 2;
  if (4 * (last - first + 1) < L::kWidth) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < count;) {
        const int64_t n = n0 + k;
        uint32_t words[4];
        philox(seed, static_cast<uint32_t>(n >> 2), c1 + static_cast<uint32_t>(r), c2, c3, words);
        for (int64_t w = n & 3; w < 4 && k < count; ++w, ++k)
          factors[r * count + k] = word_uniform(words[w]) >= p ? scale : 0.f;
      }
    }
    return;
  }
  const L::V a = L::splat(kPhiloxMulA), b = L::splat(kPhiloxMulB);
  int64_t row = 0, call = first;  // the next unit's row and first call
  while (row < rows) {
    L::V x[L::kUnroll][4];  // the units' counters (c0, c1, c2, c3), then their output words
    int64_t unit_row[L::kUnroll], unit_call[L::kUnroll];
    for (int u = 0; u < L::kUnroll; ++u) {  // units past the block's end (row == rows) are drawn and ignored
      unit_row[u] = row;
      unit_call[u] = call;
      x[u][0] = L::consecutive(static_cast<uint32_t>(call));
      x[u][1] = L::splat(c1 + static_cast<uint32_t>(row));
      x[u][2] = L::splat(c2);
      x[u][3] = L::splat(c3);
      if (row < rows && (call += L::kWidth) > last) call = first, ++row;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {  // philox_round on every lane
      const L::V key0 = L::splat(k0), key1 = L::splat(k1);
      for (int u = 0; u < L::kUnroll; ++u) {
        L::V b_hi, b_lo, a_hi, a_lo;
        L::mul_hi_lo(x[u][2], b, b_hi, b_lo);
        L::mul_hi_lo(x[u][0], a, a_hi, a_lo);
        x[u][0] = L::xor3(b_hi, x[u][1], key0);
        x[u][2] = L::xor3(a_hi, x[u][3], key1);
        x[u][1] = b_lo;
        x[u][3] = a_lo;
      }
      k0 += kPhiloxKeyStep0;
      k1 += kPhiloxKeyStep1;
    }
    for (int u = 0; u < L::kUnroll && unit_row[u] < rows; ++u) {
      // The unit's elements 4 call .. 4 (call + kWidth) - 1, clipped to the block's n0 .. n0 + count - 1.
      const int64_t begin = std::max(4 * unit_call[u], n0), end = std::min(4 * (unit_call[u] + L::kWidth), n0 + count);
      float* out = factors + unit_row[u] * count + (begin - n0);
      if (end - begin == 4 * L::kWidth) {
        L::store_factors(x[u], p, scale, out);
      } else {
        float unit[4 * L::kWidth];
        L::store_factors(x[u], p, scale, unit);
        std::copy(unit + (begin - 4 * unit_call[u]), unit + (end - 4 * unit_call[u]), out);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif  // !defined(__CUDACC__)

}  // namespace fastgpt
