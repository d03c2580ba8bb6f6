// Runs the real CUDA LayerNorm kernels (csrc/cuda/layer_norm.cuh) on the host emulator (emulator.h) over a list of
// cases, forward then backward as the op chains them, and compares them with a float64 reference. Build (from the
// repository root):
//   g++ -std=c++20 -O2 -fno-strict-aliasing -DFASTGPT_PTX_EMULATION -Icsrc -Icsrc/cuda -Itests/cuda_emulator
//       tests/cuda_emulator/layer_norm.cpp -o layer_norm
// Usage: layer_norm [case index]. One line per case; exit status 1 if any case fails.
//
// The launches are layer_norm.cu's: the same kernel instantiations (input dtype T, parameter dtype W, vector width
// VEC, block bound), launch_shape and column_sums_launch for the geometry. Only the backward grid is chosen here:
// the op sizes it to one wave of resident blocks, here min(row blocks, 3), so that blocks stride over rows and the
// last stride has rows past the end.
//
// Tolerance. Inputs are exact in T and the kernels work in float32, so an element may be off by the rounding of
// the result to T (u: 2^-24, 2^-11, 2^-8 for fp32, fp16, bf16) on its own size, plus the float32 row sums behind
// the statistics: each a chain of at most kSumDepth additions (a thread's 16 elements, 5 shuffles, up to 32 warps'
// slots), so within kSumDepth 2^-24 of their magnitude (`mag` below: every term in absolute value). Each element
// must satisfy |got - ref| <= kTolerance (u |ref| + kSumDepth 2^-24 mag). A wrong index, a missing barrier or a
// row sum that misses one element makes errors far above that. Outputs start as NaN, with a NaN guard zone
// after them: an element never written fails.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "layer_norm.cuh"

using namespace fastgpt;
using namespace fastgpt::layer_norm;

namespace {

constexpr double kTolerance = 4.0;
constexpr int kSumDepth = 64;  // the longest float32 addition chain of a row sum (16 + 5 + 32, rounded up)
constexpr int kBackwardBlocks = 3;  // the backward grid's cap (the op's: resident blocks per SM x SMs)
constexpr int kSms = 2;             // for column_sums_launch: a small GPU, so that the column kernel's grid has rows

enum class Params { kNone, kWeight, kWeightBias };

struct Case {
  int64_t rows;
  int cols;
  Params params;
  bool residual;
  float dropout;
  bool misalign;  // tensors at an odd element offset: not 16-byte aligned, so VEC = 1
  uint64_t seed;
};

template <typename T, typename W, int VEC>
bool run_case(int index, const Case& c) {
  const int64_t M = c.rows;
  const int N = c.cols;
  const double u = unit_roundoff<T>(), u_sum = kSumDepth * std::ldexp(1.0, -24);
  const double eps = 1e-5;
  std::mt19937 rng(2000 + index);
  std::normal_distribution<float> normal;

  // Inputs, exact in their dtypes: x with a row offset (the mean must come off), residual, dy, weight around 1.
  // Every fourth row of x and of the residual is constant, far from 0 (z too, without dropout): its mean must be
  // exact, for xhat = 0 to come out exactly rather than as the mean's rounding times rstd = 1 / sqrt(eps).
  Buffer<T> x(M * N, c.misalign), residual(M * N, c.misalign), dy(M * N, c.misalign);
  Buffer<W> weight(N, c.misalign), bias(N, c.misalign);
  for (int64_t r = 0; r < M; ++r) {
    const bool constant = r % 4 == 3;
    const T x_constant(40.f + 10.f * normal(rng)), residual_constant(normal(rng));
    for (int j = 0; j < N; ++j) {
      x[r * N + j] = constant ? x_constant : T(3.f + 2.f * normal(rng));
      residual[r * N + j] = constant ? residual_constant : T(normal(rng));
      dy[r * N + j] = T(normal(rng));
    }
  }
  for (int j = 0; j < N; ++j) {
    weight[j] = W(1.f + 0.5f * normal(rng));
    bias[j] = W(normal(rng));
  }
  const bool has_weight = c.params != Params::kNone, has_bias = c.params == Params::kWeightBias;
  const bool affine_grads = has_weight || has_bias;
  const Dropout dropout = c.dropout > 0 ? Dropout{c.dropout, 1.f / (1.f - c.dropout), c.seed} : Dropout{0.f, 1.f, 0};

  // Reference (float64): z = dropout(x) + residual, its statistics, y, and the backward formulas of
  // fastgpt/ops/layer_norm.py with the magnitudes of each sum.
  std::vector<double> r_y(M * N), m_y(M * N), r_dx(M * N), m_dx(M * N), r_dz(M * N), m_dz(M * N);
  std::vector<double> r_mean(M), r_rstd(M);
  std::vector<char> r_constant(M);
  std::vector<double> r_dw(N, 0), m_dw(N, 0), r_db(N, 0), m_db(N, 0);
  std::vector<double> z(N), keep(N), xhat(N), g(N);
  for (int64_t r = 0; r < M; ++r) {
    double mean = 0, var = 0;
    for (int j = 0; j < N; ++j) {
      keep[j] = dropout.p > 0 ? (reference_uniform(c.seed, j, static_cast<uint32_t>(r), 0, 1) >= dropout.p
                                     ? 1.0 / (1.0 - dropout.p) : 0.0)
                              : 1.0;
      // z is a float32 in the kernel
      z[j] = static_cast<float>(static_cast<float>(x[r * N + j]) * keep[j] +
                                (c.residual ? static_cast<float>(residual[r * N + j]) : 0));
      mean += z[j];
    }
    mean /= N;
    for (int j = 0; j < N; ++j) var += (z[j] - mean) * (z[j] - mean);
    const double rstd = 1 / std::sqrt(var / N + eps);
    r_mean[r] = mean;
    r_rstd[r] = rstd;
    // mean and rstd carry float32 sums' errors relative to |z - mean| + |mean|, times rstd; a constant row's mean
    // is exact, so there the |mean| term goes.
    const bool constant = var == 0;
    r_constant[r] = constant;
    const double mean_error = constant ? 0 : std::fabs(mean) * rstd;
    double mean_g = 0, mean_gx = 0, mean_abs_g = 0, mean_abs_gx = 0;
    for (int j = 0; j < N; ++j) {
      xhat[j] = (z[j] - mean) * rstd;
      const double w = has_weight ? static_cast<float>(weight[j]) : 1.0, b = has_bias ? static_cast<float>(bias[j]) : 0;
      r_y[r * N + j] = xhat[j] * w + b;
      m_y[r * N + j] = (std::fabs(xhat[j]) + mean_error + 1) * std::fabs(w) + std::fabs(b);
      const double d = static_cast<float>(dy[r * N + j]);
      g[j] = d * w;
      mean_g += g[j] / N;
      mean_gx += g[j] * xhat[j] / N;
      mean_abs_g += std::fabs(g[j]) / N;
      mean_abs_gx += std::fabs(g[j] * xhat[j]) / N;
      r_dw[j] += d * xhat[j];
      m_dw[j] += std::fabs(d) * (std::fabs(xhat[j]) + mean_error + 1);
      r_db[j] += d;
      m_db[j] += std::fabs(d);
    }
    for (int j = 0; j < N; ++j) {
      const double dz = rstd * (g[j] - mean_g - xhat[j] * mean_gx);
      const double mag =
          rstd * (std::fabs(g[j]) + mean_abs_g + (std::fabs(xhat[j]) + mean_error + 1) * (mean_abs_gx + mean_abs_g));
      r_dz[r * N + j] = dz;
      m_dz[r * N + j] = mag;
      r_dx[r * N + j] = dz * keep[j];
      m_dx[r * N + j] = mag * keep[j];
    }
  }

  // Forward, as layer_norm_fwd_cuda launches it.
  Buffer<T> y(M * N, c.misalign);
  Buffer<float> mean(M, false), rstd(M, false);
  const T* residual_ptr = c.residual ? residual.get() : nullptr;
  const W* weight_ptr = has_weight ? weight.get() : nullptr;
  const W* bias_ptr = has_bias ? bias.get() : nullptr;
  const Launch shape = launch_shape(M, N);
  const bool wide = N > kWideRow;
  // The block must fit the instantiation's __launch_bounds__ (which the emulator ignores): a GPU refuses the launch.
  const unsigned launch_bound = VEC > 1 && wide ? kMaxThreads : kBlockThreads;
  const bool fits = shape.block.x * shape.block.y <= launch_bound;
  bool ran = cuda_emu::launch(dim3(static_cast<unsigned>(shape.row_blocks)), shape.block, 0, [&] {
    if (VEC > 1 && wide)
      layer_norm_fwd_kernel<T, W, VEC, kMaxThreads>(x.get(), residual_ptr, weight_ptr, bias_ptr, y.get(), mean.get(),
                                                     rstd.get(), M, N, inv_cols(N), static_cast<float>(eps), dropout);
    else
      layer_norm_fwd_kernel<T, W, VEC, kBlockThreads>(x.get(), residual_ptr, weight_ptr, bias_ptr, y.get(),
                                                       mean.get(), rstd.get(), M, N, inv_cols(N),
                                                       static_cast<float>(eps), dropout);
  });

  // Backward, as layer_norm_bwd_cuda launches it, from the forward's own mean and rstd.
  Buffer<T> dx(M * N, c.misalign), dz(M * N, c.misalign);
  T* dz_ptr = c.residual && dropout.p > 0 ? dz.get() : nullptr;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(shape.row_blocks, kBackwardBlocks));
  const bool row_affine = affine_grads && !wide;
  std::vector<float> dw_partial, db_partial;
  int64_t partial_rows = 0;
  if (row_affine) {
    partial_rows = int64_t{blocks} * shape.block.y;
    dw_partial.assign(partial_rows * N, NAN);
    db_partial.assign(partial_rows * N, NAN);
  }
  ran = ran && cuda_emu::launch(dim3(blocks), shape.block, 0, [&] {
    float* dw_ptr = row_affine ? dw_partial.data() : nullptr;
    float* db_ptr = row_affine ? db_partial.data() : nullptr;
    if (VEC > 1 && wide)
      layer_norm_bwd_kernel<T, W, VEC, kMaxThreads>(dy.get(), x.get(), residual_ptr, weight_ptr, mean.get(),
                                                     rstd.get(), dx.get(), dz_ptr, nullptr, nullptr, M, N,
                                                     inv_cols(N), dropout);
    else
      layer_norm_bwd_kernel<T, W, VEC, kBlockThreads>(dy.get(), x.get(), residual_ptr, weight_ptr, mean.get(),
                                                       rstd.get(), dx.get(), dz_ptr, dw_ptr, db_ptr, M, N,
                                                       inv_cols(N), dropout);
  });
  if (affine_grads && wide) {
    const ColumnSumsLaunch affine = column_sums_launch(M, N, kSms);
    partial_rows = affine.grid.y;
    dw_partial.assign(partial_rows * N, NAN);
    db_partial.assign(partial_rows * N, NAN);
    ran = ran && cuda_emu::launch(affine.grid, dim3(kColThreads, kRowWarps), 0, [&] {
      layer_norm_bwd_affine_kernel<T>(dy.get(), x.get(), residual_ptr, mean.get(), rstd.get(), dw_partial.data(),
                                      db_partial.data(), M, N, affine.rows_per_block, dropout);
    });
  }

  Report report;
  const auto check = [&](const char* name, auto& buffer, const std::vector<double>& ref,
                         const std::vector<double>& mag, double u_out) {
    BoundCheck ch{name};
    for (size_t i = 0; i < ref.size(); ++i)
      ch.element(static_cast<float>(buffer[i]), ref[i], kTolerance * (u_out * std::fabs(ref[i]) + u_sum * mag[i]));
    if (!buffer.guard_intact()) ch.ok = false, ch.worst = INFINITY;
    report.add(ch);
  };
  check("y", y, r_y, m_y, u);
  {
    BoundCheck ch_mean{"mean"}, ch_rstd{"rstd"};
    for (int64_t r = 0; r < M; ++r) {
      const double mean_error = r_constant[r] ? 0 : std::fabs(r_mean[r]);
      ch_mean.element(mean[r], r_mean[r], kTolerance * u_sum * (mean_error + 1 / r_rstd[r]));
      ch_rstd.element(rstd[r], r_rstd[r], kTolerance * u_sum * r_rstd[r] * (1 + mean_error * r_rstd[r]));
    }
    report.add(ch_mean);
    report.add(ch_rstd);
  }
  check("dx", dx, r_dx, m_dx, u);
  if (dz_ptr != nullptr) check("dz", dz, r_dz, m_dz, u);
  if (affine_grads) {
    // Each thread adds the rows it visits (at most M) in float32; the partial rows are summed here in double (the
    // op does it on the device, in float32).
    BoundCheck ch_dw{"dweight"}, ch_db{"dbias"};
    const double u_rows = (kSumDepth + M) * std::ldexp(1.0, -24);
    for (int j = 0; j < N; ++j) {
      double dw = 0, db = 0;
      for (int64_t p = 0; p < partial_rows; ++p) {
        dw += dw_partial[p * N + j];
        db += db_partial[p * N + j];
      }
      ch_dw.element(dw, r_dw[j], kTolerance * u_rows * m_dw[j]);
      ch_db.element(db, r_db[j], kTolerance * u_rows * m_db[j]);
    }
    report.add(ch_dw);
    report.add(ch_db);
  }
  const int emu_errors = cuda_emu::errors();
  if (!fits) report.text += " block over its launch bound (FAIL)";
  const bool ok = report.ok && ran && fits && emu_errors == 0;
  std::printf("%-4s case %2d %s params %s VEC %d %s M%-4ld N%-5d block %ux%u%s%s drop %.2f |%s | emu errors %d\n",
              ok ? "ok" : "FAIL", index, dtype_name<T>(), std::is_same_v<W, float> ? "fp32" : dtype_name<W>(), VEC,
              wide ? "wide  " : "narrow", static_cast<long>(M), N, shape.block.x, shape.block.y,
              c.residual ? " residual" : "", c.params == Params::kNone ? " no-affine" : "", c.dropout,
              report.text.c_str(), emu_errors);
  std::fflush(stdout);
  cuda_emu::reset_errors();
  return ok;
}

using Row = CaseRow<Case>;
using Runner = decltype(Row::run);

// VEC as layer_norm.cu's dispatch_vec picks it: 16 bytes when the row length and every pointer allow, else 1.
template <typename T, typename W, int VEC>
constexpr Runner R = &run_case<T, W, VEC>;
using H = Half;
using BF = BFloat16;
constexpr Params kNone = Params::kNone, kW = Params::kWeight, kWB = Params::kWeightBias;

const Row kCases[] = {
    {R<float, float, 4>, {37, 768, kWB, true, 0.f, false, 0}},                  // GPT-1's width, 4 rows a block
    {R<H, float, 8>, {37, 768, kWB, true, 0.2f, false, 11}},                    // fp32 parameters, dropout
    {R<BF, BF, 8>, {19, 1000, kWB, false, 0.f, false, 0}},                      // 63 threads' worth: 64 a row
    {R<H, H, 1>, {23, 100, kNone, true, 0.1f, false, 12}},                      // N % 8 != 0: scalar, no affine
    {R<float, float, 1>, {5, 1, kWB, false, 0.f, false, 0}},                    // one column
    {R<BF, float, 1>, {9, 33, kW, true, 0.3f, false, 13}},                      // odd width, weight only
    {R<float, float, 1>, {7, 2048, kWB, true, 0.f, true, 0}},                   // misaligned: scalar, 4 warps a row
    {R<float, float, 4>, {300, 64, kWB, false, 0.1f, false, 14}},               // 8 rows a block, many strides
    {R<H, H, 8>, {5, 4104, kWB, true, 0.1f, false, 15}},                        // just wider than kWideRow
    {R<BF, float, 8>, {3, 16384, kWB, false, 0.f, false, 0}},                   // the widest row, 1024 threads
    {R<float, float, 4>, {4, 8192, kW, true, 0.f, false, 0}},                   // wide, weight only
    {R<float, float, 4>, {70, 4352, kWB, false, 0.f, false, 0}},                // wide, several column-kernel rows
};

}  // namespace

int main(int argc, char** argv) { return run_cases("layer_norm", kCases, argc, argv); }
