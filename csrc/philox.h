// Philox4x32-10, bit-identical to Triton's tl.philox(seed, c0, c1, c2, c3) followed by
// tl.random.uint_to_uniform_float on the first output word, so that the C++/CUDA kernels draw the very same
// dropout masks as the Triton kernels and the PyTorch reference (fastgpt/ops/philox.py) for the same seed.
// Key: k0 = low 32 bits of the seed, k1 = high 32 bits. Each round:
//   (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)),  A = 0xD2511F53, B = 0xCD9E8D57
//   (k0, k1) += (0x9E3779B9, 0xBB67AE85)
// Uniform: x = int32 bits of c0, x = x < 0 ? -x - 1 : x (= ~x), u = x * 4.6566127342e-10 in [0, 1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {

FASTGPT_HOST_DEVICE float philox_uniform(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
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
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace fastgpt
