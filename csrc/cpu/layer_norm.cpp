// LayerNorm (optionally fused with dropout and a residual add) on CPU: forward and backward over contiguous (M, N)
// rows. The maths is in fastgpt/ops/layer_norm.py. Rows are split across threads; each row is converted once into
// a float32 scratch row, and the reductions run on Vectorized<float>. Dropout keeps x[row, col] iff
// philox_uniform(seed; col, row, 0, 1) >= p, the stream every backend draws (csrc/philox.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "philox.h"

namespace fastgpt {
namespace {

using Vec = at::vec::Vectorized<float>;

float sum(const float* values, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc += Vec::loadu(values + j);
  float lanes[Vec::size()];
  acc.store(lanes);
  float total = 0.f;
  for (int k = 0; k < Vec::size(); ++k) total += lanes[k];
  for (; j < n; ++j) total += values[j];
  return total;
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float lanes[Vec::size()];
  acc.store(lanes);
  float total = 0.f;
  for (int k = 0; k < Vec::size(); ++k) total += lanes[k];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

struct Dropout {
  float p = 0.f;
  uint64_t seed = 0;
  bool keeps(int64_t row, int64_t col) const {
    return philox_uniform(seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row), 0u, 1u) >= p;
  }
};

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  if (p <= 0.0) return {};
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
              "layer_norm: dropout needs seed, an int64 scalar tensor");
  return {static_cast<float>(p), static_cast<uint64_t>(seed->item<int64_t>())};
}

// z = dropout(float(x)) (+ float(residual)): formed in float32, never rounded to the input dtype.
template <typename scalar_t>
void load_row(const scalar_t* x, const scalar_t* residual, int64_t row, int64_t n, const Dropout& dropout,
              float* z) {
  for (int64_t j = 0; j < n; ++j) z[j] = static_cast<float>(x[j]);
  if (dropout.p > 0.f)
    for (int64_t j = 0; j < n; ++j) z[j] = dropout.keeps(row, j) ? z[j] / (1.f - dropout.p) : 0.f;
  if (residual != nullptr)
    for (int64_t j = 0; j < n; ++j) z[j] += static_cast<float>(residual[j]);
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), "layer_norm: expected ", name, " of shape ", input.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == input.scalar_type(), "layer_norm: expected ", name,
              " contiguous with dtype ", input.scalar_type());
}

// weight and bias as float32 (N,) rows, or empty when absent.
at::Tensor as_float_row(const std::optional<at::Tensor>& param, const char* name, int64_t n) {
  if (!param.has_value()) return at::Tensor();
  TORCH_CHECK(param->dim() == 1 && param->size(0) == n, "layer_norm: expected ", name, " of shape (", n,
              "), got ", param->sizes());
  return param->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& input,
                                                             const std::optional<at::Tensor>& residual,
                                                             const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias, double eps,
                                                             double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), "layer_norm: expected input to be contiguous (M, N) rows");
  if (residual.has_value()) check_rows(*residual, "residual", input);
  const int64_t rows = input.size(0), cols = input.size(1);
  const at::Tensor w = as_float_row(weight, "weight", cols), b = as_float_row(bias, "bias", cols);
  const Dropout dropout = make_dropout(dropout_p, seed);
  at::Tensor output = at::empty_like(input);
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "layer_norm_fwd", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    float* mean_p = mean.mutable_data_ptr<float>();
    float* rstd_p = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
      std::vector<float> z(cols);
      for (int64_t row = begin; row < end; ++row) {
        load_row(x + row * cols, r ? r + row * cols : nullptr, row, cols, dropout, z.data());
        const float mu = sum(z.data(), cols) / cols;
        for (int64_t j = 0; j < cols; ++j) z[j] -= mu;
        const float inv_std = 1.f / std::sqrt(dot(z.data(), z.data(), cols) / cols + static_cast<float>(eps));
        scalar_t* y_row = y + row * cols;
        for (int64_t j = 0; j < cols; ++j) {
          float v = z[j] * inv_std;
          if (wp) v *= wp[j];
          if (bp) v += bp[j];
          y_row[j] = static_cast<scalar_t>(v);
        }
        mean_p[row] = mu;
        rstd_p[row] = inv_std;
      }
    });
  });
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_output,
                                                             const at::Tensor& input,
                                                             const std::optional<at::Tensor>& residual,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             bool compute_affine_grads, double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), "layer_norm: expected input to be contiguous (M, N) rows");
  check_rows(grad_output, "grad_output", input);
  if (residual.has_value()) check_rows(*residual, "residual", input);
  const int64_t rows = input.size(0), cols = input.size(1);
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "layer_norm: expected mean and rstd to be float32 of shape (", rows, ")");
  const at::Tensor w = as_float_row(weight, "weight", cols);
  const Dropout dropout = make_dropout(dropout_p, seed);
  at::Tensor grad_input = at::empty_like(input);
  // dresidual = dz differs from dinput only under dropout.
  at::Tensor grad_residual = dropout.p > 0.f && residual.has_value() ? at::empty_like(input) : input.new_empty({0});
  // Deterministic column sums: a fixed split of the rows into chunks, one partial row per chunk, summed after.
  const int64_t chunks = compute_affine_grads ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows))
                                              : 1;
  at::Tensor partial = at::zeros({2, compute_affine_grads ? chunks : 0, cols}, input.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "layer_norm_bwd", [&] {
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
    const float* mean_p = mean.const_data_ptr<float>();
    const float* rstd_p = rstd.const_data_ptr<float>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* dz = grad_residual.numel() > 0 ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    float* dw_partial = partial.mutable_data_ptr<float>();
    float* db_partial = dw_partial + partial.size(1) * cols;
    auto run_rows = [&](int64_t begin, int64_t end, float* dw, float* db) {
      std::vector<float> xhat(cols), g(cols);
      for (int64_t row = begin; row < end; ++row) {
        load_row(x + row * cols, r ? r + row * cols : nullptr, row, cols, dropout, xhat.data());
        const float mu = mean_p[row], inv_std = rstd_p[row];
        const scalar_t* dy_row = dy + row * cols;
        for (int64_t j = 0; j < cols; ++j) {
          xhat[j] = (xhat[j] - mu) * inv_std;
          const float d = static_cast<float>(dy_row[j]);
          g[j] = wp ? d * wp[j] : d;
          if (dw != nullptr) {
            dw[j] += d * xhat[j];
            db[j] += d;
          }
        }
        const float mean_g = sum(g.data(), cols) / cols;
        const float mean_gx = dot(g.data(), xhat.data(), cols) / cols;
        scalar_t* dx_row = dx + row * cols;
        for (int64_t j = 0; j < cols; ++j) {
          float d = (g[j] - mean_g - xhat[j] * mean_gx) * inv_std;
          if (dz != nullptr) dz[row * cols + j] = static_cast<scalar_t>(d);
          if (dropout.p > 0.f) d = dropout.keeps(row, j) ? d / (1.f - dropout.p) : 0.f;
          dx_row[j] = static_cast<scalar_t>(d);
        }
      }
    };
    if (compute_affine_grads) {
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          run_rows(c * rows / chunks, (c + 1) * rows / chunks, dw_partial + c * cols, db_partial + c * cols);
      });
    } else {
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols),
                       [&](int64_t begin, int64_t end) { run_rows(begin, end, nullptr, nullptr); });
    }
  });
  if (!compute_affine_grads) {
    at::Tensor empty = at::empty({0}, input.options().dtype(at::kFloat));
    return {grad_input, grad_residual, empty, empty.clone()};
  }
  return {grad_input, grad_residual, partial[0].sum(0), partial[1].sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace fastgpt
