// LayerNorm (optionally fused with dropout and a residual add) on CPU: forward and backward over contiguous (M, N)
// rows. The maths is in fastgpt/ops/layer_norm.py. Rows are split across threads. Rows are read where they are
// (float16 / bfloat16 converted in registers at each pass), except a row with dropout or a residual to add, which is
// formed once in a float32 scratch row (with_z_row). Every pass over a row runs on Vectorized<float> (AVX-512 /
// AVX2, as setup.py built for).
// Dropout keeps x[row, col] iff u >= p, u = word col % 4 of Philox(seed; col / 4, row, 0, 1), the stream every
// backend draws (csrc/philox.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "float_rows.h"
#include "philox.h"

namespace fastgpt {
namespace {

float reduce(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

struct Dropout {
  float p = 0.f;
  uint64_t seed = 0;
  // factors[j] = 1 / (1 - p) if column j of `row` is kept, else 0, for the n columns of the row: the backward
  // pass draws them once and applies them to z and to dx.
  void factors(int64_t row, int64_t n, float* out) const {
    dropout_factors(seed, 0, n, 1, static_cast<uint32_t>(row), 0u, 1u, p, 1.f / (1.f - p), out);
  }
};

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  if (p <= 0.0) return {};
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
              "layer_norm: dropout needs seed, an int64 scalar tensor");
  return {static_cast<float>(p), static_cast<uint64_t>(seed->item<int64_t>())};
}

// f(z) for z the row dropout(x) (+ residual), summed in float32 and never rounded to the input dtype. With neither
// dropout nor a residual, z is x's row itself, read where it is (float16 / bfloat16 converted in registers at each
// pass: a float32 copy of a wide row would push the row, the copy and the parameters out of L1; bf16 8192x4096
// forward 6.5 -> 4.8 ms); else it is formed in z_scratch. Under dropout the row's factors (Dropout::factors) are
// left in keep_scratch.
template <typename scalar_t, typename F>
void with_z_row(const scalar_t* x, const scalar_t* residual, int64_t row, int64_t n, const Dropout& dropout,
                float* z_scratch, float* keep_scratch, F&& f) {
  if (dropout.p == 0.f && residual == nullptr) return f(x);
  const float* keep = nullptr;
  if (dropout.p > 0.f) {
    dropout.factors(row, n, keep_scratch);
    keep = keep_scratch;
  }
  for_each_vec(n, [&](int64_t j, auto c) {  // z = x * keep + residual, one pass
    Vec z = load(x + j, c);
    if (keep != nullptr) z = z * load(keep + j, c);
    if (residual != nullptr) z = z + load(residual + j, c);
    store(z, z_scratch + j, c);
  });
  f(static_cast<const float*>(z_scratch));
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), "layer_norm: expected ", name, " of shape ", input.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == input.scalar_type(), "layer_norm: expected ", name,
              " contiguous with dtype ", input.scalar_type());
}

// weight or bias as a float32 (N,) row; `absent` fills it when the parameter is None (1 for the weight, 0 for the
// bias), so that every row takes one code path.
at::Tensor as_float_row(const std::optional<at::Tensor>& param, const char* name, int64_t n, float absent,
                        const at::Tensor& input) {
  if (!param.has_value()) return at::full({n}, absent, input.options().dtype(at::kFloat));
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
  const at::Tensor w = as_float_row(weight, "weight", cols, 1.f, input);
  const at::Tensor b = as_float_row(bias, "bias", cols, 0.f, input);
  const Dropout dropout = make_dropout(dropout_p, seed);
  at::Tensor output = at::empty_like(input);
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "layer_norm_fwd", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    float* mean_p = mean.mutable_data_ptr<float>();
    float* rstd_p = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
      std::vector<float> z_scratch(cols), keep_scratch(dropout.p > 0.f ? cols : 0);
      auto normalize = [&](int64_t row, const auto* z) {
        // The mean as z[0] + mean(z - z[0]): exact for a constant row (whose xhat must then be exactly 0, not the
        // rounding of sum(z) / cols times rstd = 1 / sqrt(eps)), and no less accurate for any other.
        const float pivot = static_cast<float>(z[0]);
        Vec acc(0.f);
        for_each_vec(cols, [&](int64_t j, auto c) { acc += zero_tail(load(z + j, c) - Vec(pivot), c); });
        const float mu = pivot + reduce(acc) / cols;
        // Two passes (mean, then squares about it) for the variance: no cancellation when |mean| >> std.
        acc = Vec(0.f);
        for_each_vec(cols, [&](int64_t j, auto c) {
          const Vec centred = zero_tail(load(z + j, c) - Vec(mu), c);  // tail lanes stay 0
          acc = at::vec::fmadd(centred, centred, acc);
        });
        const float inv_std = 1.f / std::sqrt(reduce(acc) / cols + static_cast<float>(eps));
        store_results(y + row * cols, cols, [&](int64_t j, auto c) {
          const Vec xhat = (load(z + j, c) - Vec(mu)) * Vec(inv_std);
          return at::vec::fmadd(xhat, load(wp + j, c), load(bp + j, c));
        });
        mean_p[row] = mu;
        rstd_p[row] = inv_std;
      };
      for (int64_t row = begin; row < end; ++row)
        with_z_row(x + row * cols, r ? r + row * cols : nullptr, row, cols, dropout, z_scratch.data(),
                   keep_scratch.data(), [&](const auto* z) { normalize(row, z); });
    });
  });
  return {output, mean, rstd};
}

// With xhat = (z - mean) rstd and g = dy * weight:
//   dz = rstd (g - mean(g) - xhat mean(g xhat)),  dx = dropout(dz),  dweight = sum_rows dy xhat,  dbias = sum_rows dy.
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
  const at::Tensor w = as_float_row(weight, "weight", cols, 1.f, input);
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
    const float* wp = w.const_data_ptr<float>();
    const float* mean_p = mean.const_data_ptr<float>();
    const float* rstd_p = rstd.const_data_ptr<float>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* dz = grad_residual.numel() > 0 ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
    float* dw_partial = partial.mutable_data_ptr<float>();
    float* db_partial = dw_partial + partial.size(1) * cols;
    auto run_rows = [&](int64_t begin, int64_t end, float* dw, float* db) {
      std::vector<float> z_scratch(cols), keep_scratch(dropout.p > 0.f ? cols : 0);
      // z as with_z_row gives it; d: the row of dy, read where it is.
      auto backward_row = [&](int64_t row, const auto* z, const scalar_t* d) {
        const Vec mu(mean_p[row]), inv_std(rstd_p[row]);
        // Tail lanes: z, dy and weight load as 0, so g = 0 there and the sums take nothing from them.
        Vec sum_g(0.f), sum_gx(0.f);
        for_each_vec(cols, [&](int64_t j, auto c) {
          const Vec xhat = (load(z + j, c) - mu) * inv_std, dv = load(d + j, c), g = dv * load(wp + j, c);
          sum_g += g;
          sum_gx = at::vec::fmadd(g, xhat, sum_gx);
          if (dw != nullptr) {
            store(at::vec::fmadd(dv, xhat, load(dw + j, c)), dw + j, c);
            store(load(db + j, c) + dv, db + j, c);
          }
        });
        const Vec mean_g(reduce(sum_g) / cols), mean_gx(reduce(sum_gx) / cols);
        auto dz_lanes = [&](int64_t j, auto c) {
          const Vec xhat = (load(z + j, c) - mu) * inv_std;
          return (load(d + j, c) * load(wp + j, c) - mean_g - xhat * mean_gx) * inv_std;
        };
        if (dropout.p == 0.f) {  // dx = dz (and dresidual is dx)
          store_results(dx + row * cols, cols, dz_lanes);
          return;
        }
        // dx = dropout(dz) = dz * keep (with_z_row's factors for this row); dresidual = dz when there is a residual.
        // dz is formed again for each output: a few operations on rows in L1, no float32 row written and read.
        if (dz != nullptr) store_results(dz + row * cols, cols, dz_lanes);
        const float* keep = keep_scratch.data();
        store_results(dx + row * cols, cols, [&](int64_t j, auto c) { return dz_lanes(j, c) * load(keep + j, c); });
      };
      for (int64_t row = begin; row < end; ++row)
        with_z_row(x + row * cols, r ? r + row * cols : nullptr, row, cols, dropout, z_scratch.data(),
                   keep_scratch.data(), [&](const auto* z) { backward_row(row, z, dy + row * cols); });
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
