// Runs the real element-wise CUDA kernels of linear_gelu (csrc/cuda/linear_gelu.cuh: the activation and output
// dropout after a cuBLASLt product, and the backward through them with the bias gradient) on the host emulator
// (emulator.h) over a list of cases, and compares them with a float64 reference. Build (from the repository root):
//   g++ -std=c++20 -O2 -fno-strict-aliasing -DFASTGPT_PTX_EMULATION -Icsrc -Icsrc/cuda -Itests/cuda_emulator
//       tests/cuda_emulator/linear_gelu.cpp -o linear_gelu
// Usage: linear_gelu [case index]. One line per case; exit status 1 if any case fails.
//
// The launches are linear_gelu.cu's: forward_blocks and column_sums_launch for the geometry (the forward grid may be
// capped here so that the grid-stride loop runs), and its aliasing: the forward writes out over pre when pre is not
// kept, the backward writes dpre over grad (after the dgrad product) or over pre (when pre was recomputed).
//
// Tolerance: |got - ref| <= kTolerance (u |ref| + 2^-20 mag), u the rounding of the result to T (2^-24, 2^-11, 2^-8
// for fp32, fp16, bf16) and mag the size of the float32 terms (|x| + 1 for an activation, times |grad| and the
// dropout scale), whose erff / tanhf / expf are within a few ulp. The bias gradient, a float32 sum over rows, adds
// rows 2^-24 on the sum of |dpre|. A wrong index or activation formula makes errors of the order of mag itself.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "linear_gelu.cuh"

using namespace fastgpt;
using namespace fastgpt::linear_gelu;

namespace {

constexpr double kTolerance = 4.0;
constexpr double kMathSlack = 1.0 / (1 << 20);  // float32 erff, tanhf, expf and the products around them
constexpr int kSms = 2;                          // for column_sums_launch: a small GPU, so the grid has rows

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::kNone: return "none";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
    case Activation::kRelu: return "relu";
  }
  return "?";
}

// The activations and their derivatives in float64, from their definitions (fastgpt/ops/linear_gelu.py).
double act_ref(Activation a, double x) {
  switch (a) {
    case Activation::kNone: return x;
    case Activation::kGelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh: return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::kRelu: return x > 0 ? x : 0;
  }
  return NAN;
}
double act_grad_ref(Activation a, double x) {
  switch (a) {
    case Activation::kNone: return 1;
    case Activation::kGelu:
      return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
    case Activation::kGeluTanh: {
      const double t = std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x));
      return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * std::sqrt(2 / M_PI) * (1 + 3 * 0.044715 * x * x);
    }
    case Activation::kRelu: return x > 0 ? 1 : 0;
  }
  return NAN;
}

// The three ways the op lays out the backward's output.
enum class Dpre { kFresh, kOverGrad, kOverPre };

struct Case {
  int64_t rows, cols;
  float dropout;
  bool out_over_pre;  // forward: out written over pre (pre not kept)
  Dpre dpre;
  bool bias_grad;
  int grid_cap;  // forward grid at most this many blocks (0: the op's forward_blocks)
  uint64_t seed;
};

template <typename T, Activation A>
bool run_case(int index, const Case& c) {
  const int64_t M = c.rows, N = c.cols, n = M * N;
  const double u = unit_roundoff<T>();
  const float p = c.dropout, scale = 1.f / (1.f - p);
  std::mt19937 rng(3000 + index);
  std::normal_distribution<float> normal;

  // pre = x W^T + b as the product left it, spread over GELU's curved part and beyond; grad from the next layer.
  Buffer<T> pre(n, false), grad(n, false);
  for (int64_t i = 0; i < n; ++i) {
    pre[i] = T(2.5f * normal(rng));
    grad[i] = T(normal(rng));
  }
  const std::vector<T> pre_in = pre.data, grad_in = grad.data;
  std::vector<double> keep(n);
  for (int64_t i = 0; i < n; ++i)
    keep[i] = p > 0 ? (reference_uniform(c.seed, static_cast<uint32_t>(i % N), static_cast<uint32_t>(i / N), 0, 1) >= p
                           ? 1.0 / (1.0 - p) : 0.0)
                    : 1.0;

  // Forward: out = dropout(act(pre)), into its own buffer or over pre.
  Buffer<T> out_buffer(n, false);
  Buffer<T>& out = c.out_over_pre ? pre : out_buffer;
  const Dropout dropout{p, scale, c.seed};
  const int op_blocks = forward_blocks(M, N);
  const unsigned fwd_blocks = static_cast<unsigned>(c.grid_cap > 0 ? std::min(op_blocks, c.grid_cap) : op_blocks);
  bool ran = cuda_emu::launch(dim3(fwd_blocks), dim3(kThreads), 0, [&] {
    forward_epilogue_kernel<T, A>(pre.get(), out.get(), M, N, quad_aligned<T>(N, {pre.get(), out.get()}), dropout);
  });

  Buffer<T> out_got = out;

  // Backward from the original pre and grad: dpre = grad dropout act'(pre), with the bias gradient's partial rows.
  pre.data = pre_in;
  Buffer<T> dpre_buffer(n, false);
  Buffer<T>& dpre = c.dpre == Dpre::kOverGrad ? grad : c.dpre == Dpre::kOverPre ? pre : dpre_buffer;
  const ColumnSumsLaunch launch = column_sums_launch(M, N, kSms);
  std::vector<float> partial(c.bias_grad ? launch.grid.y * N : 0, NAN);
  ran = ran && cuda_emu::launch(launch.grid, dim3(kColThreads, kRowWarps), 0, [&] {
    T* pre_ptr = A == Activation::kNone ? nullptr : pre.get();
    backward_epilogue_kernel<T, A>(grad.get(), pre_ptr, dpre.get(), c.bias_grad ? partial.data() : nullptr, M, N,
                                   launch.rows_per_block, quad_aligned<T>(N, {grad.get(), pre_ptr, dpre.get()}),
                                   dropout);
  });

  Report report;
  BoundCheck ch_out{"out"}, ch_dpre{"dpre"}, ch_bias{"dbias"};
  std::vector<double> bias_ref(N, 0), bias_mag(N, 0);
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<float>(pre_in[i]), g = static_cast<float>(grad_in[i]);
    const double y = act_ref(A, x) * keep[i];
    ch_out.element(static_cast<float>(out_got[i]), y, kTolerance * (u * std::fabs(y) + kMathSlack * (std::fabs(x) + 1) *
                                                                                      keep[i]));
    const double d = g * keep[i] * act_grad_ref(A, x);
    const double mag = std::fabs(g) * keep[i] * (std::fabs(x) + 1);
    ch_dpre.element(static_cast<float>(dpre[i]), d, kTolerance * (u * std::fabs(d) + kMathSlack * mag));
    bias_ref[i % N] += d;
    bias_mag[i % N] += kMathSlack * mag + M * std::ldexp(1.0, -24) * std::fabs(d);
  }
  if (!out_got.guard_intact()) ch_out.ok = false;
  if (!dpre.guard_intact()) ch_dpre.ok = false;
  report.add(ch_out);
  report.add(ch_dpre);
  if (c.bias_grad) {
    for (int64_t j = 0; j < N; ++j) {
      double sum = 0;
      for (unsigned r = 0; r < launch.grid.y; ++r) sum += partial[r * N + j];
      ch_bias.element(sum, bias_ref[j], kTolerance * bias_mag[j]);
    }
    report.add(ch_bias);
  }
  const int emu_errors = cuda_emu::errors();
  const bool ok = report.ok && ran && emu_errors == 0;
  static const char* kDpre[] = {"fresh", "over-grad", "over-pre"};
  std::printf("%-4s case %2d %s %-9s M%-4ld N%-4ld drop %.2f out%s dpre %-9s%s grid %u%s |%s | emu errors %d\n",
              ok ? "ok" : "FAIL", index, dtype_name<T>(), activation_name(A), static_cast<long>(M),
              static_cast<long>(N), p, c.out_over_pre ? " over-pre" : "", kDpre[static_cast<int>(c.dpre)],
              c.bias_grad ? " bias-grad" : "", fwd_blocks, c.grid_cap > 0 ? " (capped)" : "", report.text.c_str(),
              emu_errors);
  std::fflush(stdout);
  cuda_emu::reset_errors();
  return ok;
}

using Row = CaseRow<Case>;
using Runner = decltype(Row::run);

template <typename T, Activation A>
constexpr Runner R = &run_case<T, A>;
using H = Half;
using BF = BFloat16;
constexpr Activation kNone = Activation::kNone, kGelu = Activation::kGelu, kTanh = Activation::kGeluTanh,
                     kRelu = Activation::kRelu;

const Row kCases[] = {
    {R<float, kGelu>, {37, 300, 0.f, false, Dpre::kFresh, true, 0, 0}},          // exact GELU, fp32
    {R<H, kTanh>, {33, 97, 0.1f, true, Dpre::kOverGrad, true, 0, 21}},           // dropout, in place
    {R<BF, kGelu>, {70, 64, 0.f, true, Dpre::kOverPre, true, 0, 0}},             // recompute path: dpre over pre
    {R<BF, kRelu>, {9, 130, 0.2f, false, Dpre::kFresh, false, 3, 22}},           // relu, no bias, capped grid
    {R<float, kNone>, {129, 33, 0.3f, false, Dpre::kFresh, true, 2, 23}},        // output dropout only, no pre
    {R<H, kGelu>, {1, 1, 0.f, false, Dpre::kOverGrad, true, 0, 0}},              // one element
    {R<float, kTanh>, {600, 8, 0.f, false, Dpre::kFresh, true, 0, 0}},           // many rows: several partial rows
    {R<H, kRelu>, {5, 1000, 0.5f, true, Dpre::kOverPre, true, 0, 24}},           // many column blocks
};

}  // namespace

int main(int argc, char** argv) { return run_cases("linear_gelu", kCases, argc, argv); }
