// Shared by csrc/cpu/linear_gelu.cpp and csrc/cuda/linear_gelu.cu: the activation names of the linear_gelu_* ops
// and the checks on the ops' arguments. The activations themselves are in activation.h.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

#include "activation.h"

namespace fastgpt {

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "linear_gelu: expected activation to be one of none, gelu, gelu_tanh, relu; got ", name);
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
