// What the kernel harnesses (attention.cpp, layer_norm.cpp, linear_gelu.cpp) share: 16-bit storage types as the
// device's, the per-tensor check of errors against a bound, and the line printed per case.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "emulator.h"
#include "philox.h"

// 16-bit storage types converting as the device's c10::Half and c10::BFloat16 do (round to nearest even).
struct Half {
  uint16_t bits;
  Half() = default;
  Half(float f) : bits(cuda_emu::float_to_half_bits(f)) {}
  operator float() const { return cuda_emu::half_bits_to_float(bits); }
};
struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  BFloat16(float f) : bits(cuda_emu::float_to_bf16_bits(f)) {}
  operator float() const { return cuda_emu::bf16_bits_to_float(bits); }
};

template <typename T>
const char* dtype_name() {
  return std::is_same_v<T, float> ? "fp32" : std::is_same_v<T, Half> ? "fp16" : "bf16";
}

// The dropout uniform of element n of the Philox stream (c1, c2, c3), as fastgpt/ops/philox.py defines it (word
// n % 4 of the call at c0 = n / 4), written out here rather than taken from the kernels' grouped draws.
inline float reference_uniform(uint64_t seed, uint32_t n, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t words[4];
  fastgpt::philox(seed, n / 4, c1, c2, c3, words);
  return fastgpt::word_uniform(words[n % 4]);
}

// The relative error of rounding a result to T.
template <typename T>
double unit_roundoff() {
  return std::is_same_v<T, float> ? std::ldexp(1.0, -24) : std::is_same_v<T, Half> ? std::ldexp(1.0, -11)
                                                                                  : std::ldexp(1.0, -8);
}

// A buffer of n elements starting NaN, followed by a NaN guard zone: an element never written, or one written past
// the end, shows. With `misalign`, the elements start one in, so that a case can hand the kernel a pointer that is
// not 16-byte aligned.
template <typename T>
struct Buffer {
  static constexpr int kGuard = 16;
  std::vector<T> data;
  int offset;
  int64_t n;
  Buffer(int64_t n, bool misalign) : data(n + kGuard + 8, T(NAN)), offset(misalign ? 1 : 0), n(n) {}
  T* get() { return data.data() + offset; }
  T& operator[](int64_t i) { return get()[i]; }
  bool guard_intact() {
    for (int64_t i = n; i < n + kGuard; ++i)
      if (!std::isnan(static_cast<float>(get()[i]))) return false;
    return true;
  }
};

// Worst err / bound over a tensor, and whether every element is within its bound (NaN fails).
struct BoundCheck {
  const char* name;
  double worst = 0;
  bool ok = true;
  void element(double got, double ref, double bound) {
    const double err = std::fabs(got - ref);
    if (!(err <= bound)) ok = false;  // written so that NaN fails
    worst = std::isnan(got) ? INFINITY : std::max(worst, bound > 0 ? err / bound : err > 0 ? INFINITY : 0.0);
  }
};

// The line a harness prints per case: each checked tensor's worst error ratio, and whether all were within bounds.
struct Report {
  bool ok = true;
  std::string text;
  // check: anything with a name, the worst ratio of its elements' errors to their bound, and whether all were in it.
  template <typename Check>
  void add(const Check& check) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.2f%s", check.name, check.worst, check.ok ? "" : "(FAIL)");
    text += buf;
    ok = ok && check.ok;
  }
};

// One case of a harness and the instantiation that runs it (returns whether it passed, having printed its line).
template <typename Case>
struct CaseRow {
  bool (*run)(int index, const Case& c);
  Case c;
};

// A harness's main: runs every row of `cases` (only the one at index argv[1] when given), then prints a summary;
// returns the exit status, 1 if any case failed.
template <typename Row, size_t kCount>
int run_cases(const char* op, const Row (&cases)[kCount], int argc, char** argv) {
  const int only = argc > 1 ? std::atoi(argv[1]) : -1;
  int failed = 0, count = 0;
  for (int i = 0; i < static_cast<int>(kCount); ++i) {
    if (only >= 0 && i != only) continue;
    ++count;
    failed += !cases[i].run(i, cases[i].c);
  }
  std::printf("%s: %d of %d cases failed\n", op, failed, count);
  return failed != 0;
}
