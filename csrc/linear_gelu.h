// Shared by csrc/cpu/linear_gelu.cpp and csrc/cuda/linear_gelu.cu: the activation names of the linear_gelu_* ops,
// the scalar activation maths (float32), and the checks on the ops' arguments. The maths is in
// fastgpt/ops/linear_gelu.py:
//   gelu(x)      = x Phi(x) = 1/2 x (1 + erf(x / sqrt 2)),          gelu'(x) = Phi(x) + x phi(x)
//   gelu_tanh(x) = 1/2 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3),
//   gelu_tanh'(x) = 1/2 (1 + tanh u) + 1/2 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string_view>

#include "philox.h"

namespace fastgpt {

enum class Activation { kNone, kGelu, kGeluTanh, kRelu };

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "linear_gelu: expected activation to be one of none, gelu, gelu_tanh, relu; got ", name);
}

// Calls f(std::integral_constant<Activation, A>{}) so that kernels specialise on the activation at compile time.
template <typename F>
void dispatch_activation(Activation activation, F&& f) {
  switch (activation) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt 2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCoeff = 0.044715f;

template <Activation A>
FASTGPT_HOST_DEVICE float activation_forward(float x) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * x * (1.f + erff(x * kSqrtHalf));
  } else if constexpr (A == Activation::kGeluTanh) {
    return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + kTanhCoeff * x * x * x)));
  } else if constexpr (A == Activation::kRelu) {
    return x > 0.f ? x : 0.f;
  } else {
    return x;
  }
}

// act'(x); relu'(0) = 0 as torch's threshold_backward.
template <Activation A>
FASTGPT_HOST_DEVICE float activation_grad(float x) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * (1.f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (x + kTanhCoeff * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhCoeff * x * x);
  } else if constexpr (A == Activation::kRelu) {
    return x > 0.f ? 1.f : 0.f;
  } else {
    return 1.f;
  }
}

// Output dropout, element (row, col) of a row-major (M, N) activation: counters (col, row, 0, 1). Returns the
// factor the element is multiplied by: 0 (dropped) or 1 / (1 - p) (kept).
FASTGPT_HOST_DEVICE float dropout_factor(uint64_t seed, int64_t row, int64_t col, float p, float scale) {
  return philox_uniform(seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row), 0u, 1u) >= p ? scale : 0.f;
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "linear_gelu: expected ", name, " to be a contiguous matrix, got ",
              t.sizes(), " with strides ", t.strides());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "linear_gelu: expected ", name,
              " of shape ", like.sizes(), " and dtype ", like.scalar_type(), ", got ", t.sizes(), " ",
              t.scalar_type());
}

inline uint64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "linear_gelu: expected seed to be an int64 CPU tensor of shape ()");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// linear_gelu_bwd's arguments, checked: grad (M, N), and pre (M, N) unless the activation is "none" (the output
// dropout of the block's second layer). Returns the activation, pre contiguous or undefined, and the dropout seed.
struct BwdArgs {
  Activation activation;
  at::Tensor pre;
  uint64_t seed;
};

inline BwdArgs checked_bwd_args(const at::Tensor& grad, const std::optional<at::Tensor>& pre,
                                std::string_view activation, double dropout_p, const at::Tensor& seed) {
  check_matrix(grad, "grad");
  const Activation act = parse_activation(activation);
  TORCH_CHECK(pre.has_value() || act == Activation::kNone, "linear_gelu: expected pre for activation ", activation);
  if (pre.has_value()) check_same_shape(*pre, "pre", grad);
  return {act, pre.has_value() ? pre->contiguous() : at::Tensor(), dropout_p > 0 ? seed_value(seed) : 0};
}

}  // namespace fastgpt
