// Rows of float32, float16 or bfloat16 to float32 and back, for the CPU kernels that compute in float32.
// ATen's at::vec::convert loops element by element for some of these pairs (float16 -> float is then a software
// conversion per element); both directions here go through Vectorized<scalar_t> instead.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastgpt {

// dst[0, n) = float(src[0, n)): float16 and bfloat16 a Vectorized<scalar_t> at a time.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {  // double
    at::vec::convert(src, dst, n);
  } else {
    using Vec = at::vec::Vectorized<float>;
    using VecS = at::vec::Vectorized<scalar_t>;  // twice Vec's lanes
    int64_t j = 0;
    for (; j + VecS::size() <= n; j += VecS::size()) {
      auto [low, high] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + j));
      low.store(dst + j);
      high.store(dst + j + Vec::size());
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst[0, n) = scalar_t(src[0, n)), rounded to nearest even; float16 and bfloat16 a Vectorized<scalar_t> at a time.
template <typename scalar_t>
inline void from_float(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert(src, dst, n);
  } else {
    using Vec = at::vec::Vectorized<float>;
    using VecS = at::vec::Vectorized<scalar_t>;
    int64_t j = 0;
    for (; j + VecS::size() <= n; j += VecS::size())
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + j), Vec::loadu(src + j + Vec::size())).store(dst + j);
    for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

}  // namespace fastgpt
