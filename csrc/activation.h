// The activations of fastgpt.ops.linear_gelu and gelu_ffn, scalar and in float32, for the host
// (csrc/cpu/linear_gelu.cpp) and the device (csrc/cuda/linear_gelu.cuh). Without ATen, so that the CUDA kernels also
// build against the emulator of tests/cuda_emulator. The maths is in fastgpt/ops/linear_gelu.py:
//   gelu(x)      = x Phi(x) = 1/2 x (1 + erf(x / sqrt 2)),          gelu'(x) = Phi(x) + x phi(x)
//   gelu_tanh(x) = 1/2 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3),
//   gelu_tanh'(x) = 1/2 (1 + tanh u) + 1/2 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "philox.h"  // FASTGPT_HOST_DEVICE

namespace fastgpt {

enum class Activation { kNone, kGelu, kGeluTanh, kRelu };

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

}  // namespace fastgpt
