// Fused linear + activation (GELU) on CPU. The matrix products are ATen's (BLAS / oneDNN, fp32 accumulation);
// what is ours is the element-wise work around them, done in one pass over each product's output instead of
// eager's chain of element-wise ops:
//   forward : pre = x W^T + b (ATen's addmm: the bias added before the one rounding, as F.linear does)
//             -> out = dropout(act(pre)) in one pass (in place in pre's buffer when pre is not kept)
//   backward: dPre = grad * dropout * act'(pre) with the bias gradient (column sums) in the same pass.
// Rows are converted to float32 in registers (or once into float32 scratch where dropout or the bias gradient needs
// a float row); the activation maths runs on Vectorized<float>.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../linear_gelu.h"
#include "float_rows.h"
#include "philox.h"

namespace fastgpt {
namespace {

template <Activation A>
Vec activation_forward(Vec x) {
  if constexpr (A == Activation::kGelu) {
    return Vec(0.5f) * x * (Vec(1.f) + (x * Vec(kSqrtHalf)).erf());
  } else if constexpr (A == Activation::kGeluTanh) {
    // 0.5 x (1 + tanh(u)) = x sigmoid(2u): one exp and a division, cheaper than tanh, and no cancellation in
    // 1 + tanh(u) for negative x.
    return x / (Vec(1.f) + (Vec(-2.f * kSqrt2OverPi) * (x + Vec(kTanhCoeff) * x * x * x)).exp());
  } else if constexpr (A == Activation::kRelu) {
    return at::vec::clamp_min(x, Vec(0.f));
  } else {
    return x;
  }
}

template <Activation A>
Vec activation_grad(Vec x) {
  if constexpr (A == Activation::kGelu) {
    const Vec cdf = Vec(0.5f) * (Vec(1.f) + (x * Vec(kSqrtHalf)).erf());
    return cdf + x * Vec(kInvSqrt2Pi) * (Vec(-0.5f) * x * x).exp();
  } else if constexpr (A == Activation::kGeluTanh) {
    // With s = sigmoid(2u) (= (1 + tanh(u)) / 2): d/dx [x s] = s + 2 x s (1 - s) u'.
    const Vec s = Vec(1.f) / (Vec(1.f) + (Vec(-2.f * kSqrt2OverPi) * (x + Vec(kTanhCoeff) * x * x * x)).exp());
    return s + x * s * (Vec(1.f) - s) * Vec(2.f * kSqrt2OverPi) * (Vec(1.f) + Vec(3.f * kTanhCoeff) * x * x);
  } else if constexpr (A == Activation::kRelu) {
    return Vec::blendv(Vec(0.f), Vec(1.f), x > Vec(0.f));
  } else {
    return Vec(1.f);
  }
}

// v[j] *= dropout factor of element (row, col0 + j), the factors drawn a chunk at a time.
void apply_dropout(float* v, int64_t n, int64_t row, int64_t col0, uint64_t seed, float p, float scale) {
  constexpr int64_t kChunk = 256;
  float factors[kChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t count = std::min(kChunk, n - j0);
    dropout_factors(seed, col0 + j0, count, 1, static_cast<uint32_t>(row), 0u, 1u, p, scale, factors);
    for (int64_t j = 0; j < count; ++j) v[j0 + j] *= factors[j];
  }
}

// Forward epilogue over the rows of pre = x W^T + b (M, N): out = dropout(act(pre)). out may alias pre (when
// pre is not kept). Without dropout a row is mapped straight from pre to out, converted in registers; dropout
// (a factor per element) goes through a float32 row.
template <typename scalar_t, Activation A>
void forward_epilogue(const scalar_t* pre, scalar_t* out, int64_t rows, int64_t cols, float p, uint64_t seed) {
  const float scale = 1.f / (1.f - p);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));  // rows of about 16K elements
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(p > 0.f ? cols : 0);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* pre_row = pre + row * cols;
      if (p == 0.f) {
        store_results(out + row * cols, cols,
                      [&](int64_t j, auto c) { return activation_forward<A>(load(pre_row + j, c)); });
        continue;
      }
      to_float(pre_row, v.data(), cols);
      float* v_row = v.data();
      for_each_vec(cols, [&](int64_t j, auto c) { store(activation_forward<A>(load(v_row + j, c)), v_row + j, c); });
      apply_dropout(v.data(), cols, row, 0, seed, p, scale);
      from_float(v.data(), out + row * cols, cols);
    }
  });
}

// Backward epilogue: dpre = grad * dropout * act'(pre), and bias_grad = column sums of dpre.
// Parallel over fixed blocks of columns, each walking every row: the column sums need no partial buffers and are
// bit-identical whatever the thread count. They are added in float64 (every float32 term exactly): a float32 sum
// down a column's rows rounds at each of them, several times PyTorch's cascaded sum(0) error on short columns.
// dpre may alias grad or pre (each element is read before it is written).
template <typename scalar_t, Activation A>
void backward_epilogue(const scalar_t* grad, const scalar_t* pre, scalar_t* dpre,
                       float* bias_grad, int64_t rows, int64_t cols, float p, uint64_t seed) {
  constexpr int64_t kCols = 128;
  const float scale = 1.f / (1.f - p);
  const int64_t blocks = (cols + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float g[kCols], x[kCols];
    double total[kCols];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t col0 = block * kCols, n = std::min(kCols, cols - col0);
      std::fill(total, total + n, 0.0);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t offset = row * cols + col0;
        to_float(grad + offset, g, n);
        if (p > 0.f) apply_dropout(g, n, row, col0, seed, p, scale);
        if constexpr (A != Activation::kNone) {
          to_float(pre + offset, x, n);
          for_each_vec(n, [&](int64_t j, auto c) {
            store(load(g + j, c) * activation_grad<A>(load(x + j, c)), g + j, c);
          });
        }
        from_float(g, dpre + offset, n);
        if (bias_grad != nullptr)
          for (int64_t j = 0; j < n; ++j) total[j] += g[j];
      }
      if (bias_grad != nullptr)
        for (int64_t j = 0; j < n; ++j) bias_grad[col0 + j] = static_cast<float>(total[j]);
    }
  });
}

// pre = input weight^T + bias with the bias added inside the product (addmm), rounded once to the dtype as
// F.linear's is.
at::Tensor product(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::mm(input, weight.t());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == input.scalar_type(),
              "linear_gelu: expected bias of shape (", weight.size(0), ") and dtype ", input.scalar_type(), ", got ",
              bias->sizes(), " ", bias->scalar_type());
  return at::addmm(*bias, input, weight.t());
}

// Runs the backward epilogue on (M, N) tensors; returns (dpre, bias_grad float32 (N,) or empty).
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& pre, at::Tensor dpre,
                                            Activation activation, double dropout_p, uint64_t seed, bool bias_grad) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  at::Tensor grad_bias = at::empty({bias_grad ? cols : 0}, grad.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "linear_gelu_bwd", [&] {
    dispatch_activation(activation, [&](auto a) {
      backward_epilogue<scalar_t, decltype(a)::value>(
          grad.const_data_ptr<scalar_t>(), pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr,
          dpre.mutable_data_ptr<scalar_t>(),
          bias_grad ? grad_bias.mutable_data_ptr<float>() : nullptr, rows, cols, static_cast<float>(dropout_p), seed);
    });
  });
  return {dpre, grad_bias};
}

// out = dropout(act(input weight^T + bias)); pre = input weight^T + bias when store_pre, else empty.
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                   bool store_pre, double dropout_p, const at::Tensor& seed) {
  check_matrix(input, "input");
  check_matrix(weight, "weight");
  TORCH_CHECK(weight.size(1) == input.size(1) && weight.scalar_type() == input.scalar_type(),
              "linear_gelu: expected weight of shape (N, ", input.size(1), ") and dtype ", input.scalar_type(),
              ", got ", weight.sizes(), " ", weight.scalar_type());
  const Activation act = parse_activation(activation);
  const int64_t rows = input.size(0), cols = weight.size(0);
  const uint64_t seed_v = dropout_p > 0 ? seed_value(seed) : 0;
  at::Tensor pre = product(input, weight, bias);
  if (act == Activation::kNone && dropout_p == 0.0 && !store_pre) return {pre, at::empty({0}, input.options())};
  at::Tensor out = store_pre ? at::empty_like(pre) : pre;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_gelu_fwd", [&] {
    dispatch_activation(act, [&](auto a) {
      forward_epilogue<scalar_t, decltype(a)::value>(pre.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                                     rows, cols, static_cast<float>(dropout_p), seed_v);
    });
  });
  return {out, store_pre ? pre : at::empty({0}, input.options())};
}

// dpre = grad * dropout * act'(pre); pre may be absent when activation is "none".
std::tuple<at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad, const std::optional<at::Tensor>& pre,
                                                   c10::string_view activation, double dropout_p,
                                                   const at::Tensor& seed, bool bias_grad) {
  const BwdArgs args = checked_bwd_args(grad, pre, activation, dropout_p, seed);
  return backward(grad, args.pre, at::empty_like(grad), args.activation, dropout_p, args.seed, bias_grad);
}

// dpre = grad * act'(input weight^T + bias), the pre-activation recomputed (it was not stored).
std::tuple<at::Tensor, at::Tensor> linear_gelu_bwd_recompute(const at::Tensor& grad, const at::Tensor& input,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view activation, bool bias_grad) {
  check_matrix(grad, "grad");
  check_matrix(input, "input");
  check_matrix(weight, "weight");
  at::Tensor pre = product(input, weight, bias);
  check_same_shape(grad, "grad", pre);
  return backward(grad, pre, pre, parse_activation(activation), 0.0, 0, bias_grad);
}

// dpre = (grad weight) * act'(pre): the backward through act and the following linear layer's input.
std::tuple<at::Tensor, at::Tensor> linear_gelu_dact(const at::Tensor& grad, const at::Tensor& weight,
                                                    const at::Tensor& pre, c10::string_view activation,
                                                    bool bias_grad) {
  check_matrix(grad, "grad");
  check_matrix(weight, "weight");
  check_matrix(pre, "pre");
  at::Tensor grad_act = at::mm(grad, weight);
  check_same_shape(pre, "pre", grad_act);
  return backward(grad_act, pre, grad_act, parse_activation(activation), 0.0, 0, bias_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd);
  m.impl("linear_gelu_bwd_recompute", &linear_gelu_bwd_recompute);
  m.impl("linear_gelu_dact", &linear_gelu_dact);
}

}  // namespace fastgpt
