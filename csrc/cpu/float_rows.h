// Rows of float32, float16 or bfloat16 worked on as float32 Vectorized<float>, for the CPU kernels that compute in
// float32: walking a row a Vec at a time, and converting rows to float32 and back. ATen's at::vec::convert loops
// element by element for some of these pairs (float16 -> float is then a software conversion per element); both
// directions here go through Vectorized<scalar_t> instead.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastgpt {

using Vec = at::vec::Vectorized<float>;

// f(j, count) over [0, n) a Vec at a time. In the main loop count is the constant Full (Vec::size()), so that the
// loads, stores and masks below compile to plain vector instructions; only the tail gets a runtime count.
using Full = std::integral_constant<int64_t, Vec::size()>;
template <typename F>
inline void for_each_vec(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) f(j, Full{});
  if (j < n) f(j, n - j);
}

inline Vec load(const float* p, Full) { return Vec::loadu(p); }
inline Vec load(const float* p, int64_t count) { return Vec::loadu(p, count); }  // lanes past count read as 0
// The same from a row of another dtype, converted to float32 in registers (float16 and bfloat16 a Vec at a time).
template <typename scalar_t, std::enable_if_t<!std::is_same_v<scalar_t, float>, int> = 0>
inline Vec load(const scalar_t* p, int64_t count) {
  float lanes[Vec::size()] = {};
  for (int64_t k = 0; k < count; ++k) lanes[k] = static_cast<float>(p[k]);
  return Vec::loadu(lanes);
}
template <typename scalar_t, std::enable_if_t<!std::is_same_v<scalar_t, float>, int> = 0>
inline Vec load(const scalar_t* p, Full) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  } else {
    return load(p, Vec::size());
  }
}
inline void store(const Vec& v, float* p, Full) { v.store(p); }
inline void store(const Vec& v, float* p, int64_t count) { v.store(p, count); }
inline Vec zero_tail(const Vec& v, Full) { return v; }
inline Vec zero_tail(const Vec& v, int64_t count) { return Vec::set(Vec(0.f), v, count); }

// dst[0, n) = float(src[0, n)): float16 and bfloat16 a Vectorized<scalar_t> at a time.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {  // double
    at::vec::convert(src, dst, n);
  } else {
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

// out[0, n) = f(j, c) rounded to scalar_t (nearest even), where f(j, c) gives the Vec of results for the lanes from
// j (c of them, as in for_each_vec). float16 / bfloat16 rows are converted two Vecs at a time, straight from
// registers: the results never go through a float32 buffer.
template <typename scalar_t, typename F>
inline void store_results(scalar_t* out, int64_t n, F&& f) {
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for_each_vec(n, [&](int64_t k, auto c) { store(f(k, c), out + k, c); });
    return;
  } else if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    for (; j + 2 * V <= n; j += 2 * V)
      at::vec::convert_from_float<scalar_t>(f(j, Full{}), f(j + V, Full{})).store(out + j);
  }
  for (; j < n; j += V) {  // the tail (every lane for other dtypes), through a Vec-sized buffer
    const int64_t c = std::min(V, n - j);
    float lanes[V];
    f(j, c).store(lanes, c);
    for (int64_t k = 0; k < c; ++k) out[j + k] = static_cast<scalar_t>(lanes[k]);
  }
}

// dst[0, n) = scalar_t(src[0, n)), rounded to nearest even.
template <typename scalar_t>
inline void from_float(const float* src, scalar_t* dst, int64_t n) {
  store_results(dst, n, [&](int64_t j, auto c) { return load(src + j, c); });
}

}  // namespace fastgpt
