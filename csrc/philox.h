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

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {

// The four output words at counters (c0, c1, c2, c3).
FASTGPT_HOST_DEVICE void philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t (&words)[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t b_c2 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t a_c0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(b_c2 >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(a_c0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b_c2);
    c3 = static_cast<uint32_t>(a_c0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

FASTGPT_HOST_DEVICE float word_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// words[k & 3] by selects: a register array indexed by a runtime value would go to local memory on a GPU.
FASTGPT_HOST_DEVICE uint32_t pick_word(const uint32_t (&words)[4], uint32_t k) {
  const uint32_t low = k & 1u ? words[1] : words[0], high = k & 1u ? words[3] : words[2];
  return k & 2u ? high : low;
}

// factors[k] = scale (1 / (1 - p)) if element n0 + k of the stream (c1, c2, c3) is kept by dropout of rate p (its
// uniform >= p), else 0, for k < count: the multipliers of the dropped tensor, one call per group of four. For the
// CPU kernels (it indexes the words with a runtime value).
inline void dropout_factors(uint64_t seed, int64_t n0, int64_t count, uint32_t c1, uint32_t c2, uint32_t c3, float p,
                            float scale, float* factors) {
  for (int64_t k = 0; k < count;) {
    const int64_t n = n0 + k;
    uint32_t words[4];
    philox(seed, static_cast<uint32_t>(n >> 2), c1, c2, c3, words);
    for (int64_t w = n & 3; w < 4 && k < count; ++w, ++k) factors[k] = word_uniform(words[w]) >= p ? scale : 0.f;
  }
}

}  // namespace fastgpt
