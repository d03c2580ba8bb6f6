// dropout_factors (csrc/philox.h), whose Philox calls run side by side in vector lanes, against philox() a call at a
// time, bit for bit: blocks of every start n0 % 4, widths from a lane's worth to several units, partial last units,
// blocks of several rows, and the narrow rows that take a call at a time. Built by tests/test_philox.py for each
// instruction set the CPU has (PhiloxLanes is AVX-512, AVX2 or plain arrays); exit status 0 when all match.
#include <cstdio>
#include <cstring>
#include <vector>

#include "philox.h"

using namespace fastgpt;

int main() {
  const uint32_t c1 = 5, c2 = 7, c3 = 9;
  const float p = 0.3f, scale = 2.f;
  long blocks = 0;
  for (int64_t n0 = 0; n0 < 140; n0 += n0 < 20 ? 1 : 13)
    for (int64_t count = 1; count <= 800; count += count < 70 ? 1 : 37)
      for (int64_t rows : {1, 2, 3, 7, 64}) {
        const uint64_t seed = 0x123456789ABCDEFull + static_cast<uint64_t>(n0) * 0x9E3779B97F4A7C15ull;
        // A guard element past the block catches writes beyond it.
        std::vector<float> got(rows * count + 1, -1.f), expected(rows * count + 1, -1.f);
        dropout_factors(seed, n0, count, rows, c1, c2, c3, p, scale, got.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < count; ++k) {
            const int64_t n = n0 + k;
            uint32_t words[4];
            philox(seed, static_cast<uint32_t>(n >> 2), c1 + static_cast<uint32_t>(r), c2, c3, words);
            expected[r * count + k] = word_uniform(words[n & 3]) >= p ? scale : 0.f;
          }
        if (std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)) != 0) {
          std::printf("mismatch: n0 %ld, count %ld, rows %ld\n", static_cast<long>(n0), static_cast<long>(count),
                      static_cast<long>(rows));
          return 1;
        }
        ++blocks;
      }
  std::printf("%ld blocks bit-identical (%d lanes x %d units)\n", blocks, PhiloxLanes::kWidth, PhiloxLanes::kUnroll);
  return 0;
}
