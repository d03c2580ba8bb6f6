// Runs the real CUDA attention kernels (csrc/cuda/attention_fwd.cuh, attention_bwd.cuh) on the host emulator
// (emulator.h) over a list of cases, and compares them with a float64 reference. Build (from the repository root):
//   g++ -std=c++20 -O2 -fno-strict-aliasing -DFASTGPT_PTX_EMULATION -Icsrc -Icsrc/cuda -Itests/cuda_emulator
//       tests/cuda_emulator/attention.cpp -o attention
// Usage: attention fwd|fwd-wgmma|bwd|bwd-wgmma [case index]. "fwd" runs the forward kernel with its mma.sync
// products, "fwd-wgmma" with its sm_90a wgmma products; "bwd" runs the forward kernel first and feeds its out and
// lse to the three backward kernels, as the op does, all with mma.sync, "bwd-wgmma" all with wgmma. One line per
// case, then the shared-memory bank counts of all the launches; exit status 1 if any case fails or any ldmatrix or
// cp.async phase conflicts (takes more than one wavefront).
//
// Tolerance. The reference works in float64 on the same 16-bit inputs, so the kernels' error comes from the
// roundings they add: P (and Pd, dS) rounded to 16 bits before the second product, the 16-bit out that delta is
// computed from, and the 16-bit result, each a relative error of at most u (2^-11 fp16, 2^-8 bf16) on the terms of
// a sum; float32 accumulation and exp2 add far less (~1e-6 relative). So every element is checked against a
// componentwise bound: |got - ref| <= kTolerance * u * mag + kAtol, where mag is the reference's sum with every
// term in absolute value (for out_i: sum_j P_ij Z_ij |V_j|; for dS: P (|dPd| + |delta| + sum_d |dO| mag(out)); and
// so on below). kTolerance = 4 covers the 3 roundings of dQ/dK plus slack; a layout or synchronisation bug makes
// errors of the order of mag itself (a ratio err / (u mag) in the hundreds). The printed ratios are the worst
// err / (u mag) per tensor. Rows without any visible key must be exactly 0 (out, dQ) and have lse = -inf.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_bwd.cuh"
#include "attention_fwd.cuh"
#include "harness.h"

using namespace fastgpt::attention;
using cuda_emu::Dim3;

namespace {

constexpr double kTolerance = 4.0;
constexpr double kAtol = 1e-7;  // fp16 subnormal spacing is 6e-8: the rounding of results near 0
constexpr double kFp32Sum = 1e-6;  // the "u" of fp32 sums of a few hundred terms (2^-24 each)
constexpr uint16_t kNaN16 = 0x7fff;  // NaN in fp16 and bf16: unwritten outputs and guard zones

enum class Mask { kNone, kCausal, kBool, kKeyPad, kAdditive };
const char* mask_name(Mask m) {
  switch (m) {
    case Mask::kNone: return "none";
    case Mask::kCausal: return "causal";
    case Mask::kBool: return "bool";
    case Mask::kKeyPad: return "keypad";
    case Mask::kAdditive: return "additive";
  }
  return "?";
}

struct Case {
  int batch, heads, kv_heads, len_q, len_k;
  Mask mask;
  float dropout;
  bool packed;  // q, k, v, out, dO stored (B, L, H, D) instead of (B, H, L, D)
  uint64_t seed;
};

template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, __half>;
template <typename T>
uint16_t to_bits(float x) {
  return kIsHalf<T> ? cuda_emu::float_to_half_bits(x) : cuda_emu::float_to_bf16_bits(x);
}
template <typename T>
double from_bits(uint16_t b) {
  return kIsHalf<T> ? cuda_emu::half_bits_to_float(b) : cuda_emu::bf16_bits_to_float(b);
}

// A 16-bit tensor of logical shape (B, H, L, D), (B, H, L, D) or (B, L, H, D) in memory, with a NaN guard zone
// after its end.
struct Tensor16 {
  std::vector<uint16_t> data;
  Strides st;
  int64_t size;
  static constexpr int kGuard = 64;
  Tensor16(int B, int H, int L, int D, bool packed) : size(int64_t{B} * H * L * D) {
    st = packed ? Strides{int64_t{L} * H * D, D, int64_t{H} * D} : Strides{int64_t{H} * L * D, int64_t{L} * D, D};
    data.assign(size + kGuard, kNaN16);
  }
  uint16_t& at(int b, int h, int l, int d) { return data[b * st.b + h * st.h + l * st.l + d]; }
  bool guard_intact() const {
    for (int64_t i = size; i < size + kGuard; ++i)
      if (data[i] != kNaN16) return false;
    return true;
  }
};

// Worst err / (u mag) over a tensor, and whether every element is within the bound (NaN fails).
struct Check {
  const char* name;
  double worst = 0;
  bool ok = true;
  void element(double got, double ref, double mag, double u) {
    const double err = std::fabs(got - ref);
    if (!(err <= kTolerance * u * mag + kAtol)) ok = false;  // written so that NaN fails
    if (std::isnan(got)) worst = INFINITY;
    else if (mag > 0) worst = std::max(worst, err / (u * mag));
  }
};

enum class Pass { kForward, kForwardWgmma, kBackward, kBackwardWgmma };

template <typename T, int D, MaskMode kMode, bool kDropout>
bool run_case(int index, const Case& c, Pass pass) {
  const bool backward = pass == Pass::kBackward || pass == Pass::kBackwardWgmma;
  const bool wgmma = pass == Pass::kForwardWgmma || pass == Pass::kBackwardWgmma;
  const int B = c.batch, H = c.heads, Hk = c.kv_heads, Lq = c.len_q, Lk = c.len_k, G = H / Hk;
  const double u = kIsHalf<T> ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double scale = 1.3 / std::sqrt(double{D});
  std::mt19937 rng(1000 + index);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;

  Tensor16 q(B, H, Lq, D, c.packed), k(B, Hk, Lk, D, c.packed), v(B, Hk, Lk, D, c.packed);
  Tensor16 d_out(B, H, Lq, D, c.packed), out(B, H, Lq, D, c.packed);
  Tensor16 dq(B, H, Lq, D, false), dk(B, Hk, Lk, D, false), dv(B, Hk, Lk, D, false);
  for (int b = 0; b < B; ++b)
    for (int d = 0; d < D; ++d) {
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < Lq; ++i) {
          q.at(b, h, i, d) = to_bits<T>(normal(rng));
          d_out.at(b, h, i, d) = to_bits<T>(normal(rng));
        }
      for (int h = 0; h < Hk; ++h)
        for (int j = 0; j < Lk; ++j) {
          k.at(b, h, j, d) = to_bits<T>(normal(rng));
          v.at(b, h, j, d) = to_bits<T>(normal(rng));
        }
    }
  const auto val = [](Tensor16& t, int b, int h, int l, int d) { return from_bits<T>(t.at(b, h, l, d)); };

  // Masks. bool: (B, H, Lq, Lk), rows i % 5 == 3 fully masked, else 70% visible. keypad: (B, 1, 1, Lk), batch 0
  // sees every key, batch 1 the first half, batch 2 none. additive: (B, 1, Lq, Lk) in T: N(0, 1) entries, 10%
  // -inf and 10% at the dtype's minimum (finfo.min, as Hugging Face masks hold), row 5 all -inf and, in bf16, row 9
  // all finfo.min: PyTorch, in float32, averages V there (the scores vanish next to -3.4e38), and so must the
  // kernel, although -3.4e38 * log2(e) overflows. (In fp16 finfo.min is -65504, which float32 scores do not absorb;
  // such a row would only measure how float32 rounds scores near 94500 in two different domains.)
  std::vector<uint8_t> mask_bool;
  std::vector<uint16_t> mask_add;
  MaskView mv{};
  const float finfo_min = kIsHalf<T> ? -65504.f : -3.3895313892515355e38f;
  if (c.mask == Mask::kBool) {
    mask_bool.resize(size_t(B) * H * Lq * Lk);
    for (size_t x = 0; x < mask_bool.size(); ++x) mask_bool[x] = (x / Lk) % Lq % 5 != 3 && uniform(rng) < 0.7f;
    mv = {mask_bool.data(), int64_t{H} * Lq * Lk, int64_t{Lq} * Lk, Lk, 1, true};
  } else if (c.mask == Mask::kKeyPad) {
    mask_bool.resize(size_t(B) * Lk);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < Lk; ++j) mask_bool[size_t(b) * Lk + j] = j < (b == 0 ? Lk : b == 1 ? (Lk + 1) / 2 : 0);
    mv = {mask_bool.data(), Lk, 0, 0, 1, true};
  } else if (c.mask == Mask::kAdditive) {
    mask_add.resize(size_t(B) * Lq * Lk);
    for (size_t x = 0; x < mask_add.size(); ++x) {
      const int i = (x / Lk) % Lq;
      const float r = uniform(rng);
      const float a = i == 5                    ? -INFINITY
                      : i == 9 && !kIsHalf<T> ? finfo_min
                      : r < 0.1f              ? -INFINITY
                      : r < 0.2f              ? finfo_min
                                              : normal(rng);
      mask_add[x] = to_bits<T>(a);
    }
    mv = {mask_add.data(), int64_t{Lq} * Lk, 0, Lk, 1, false};
    // The bf16 row 9 is a padding position, whose output gradient is 0: the case fastgpt.ops.attention documents
    // as exact. (With a nonzero one, its lse near -2.9e38 cannot hold log2(Lk), and the backward sees P = 1 per
    // key, as PyTorch's fused kernels do.)
    if (!kIsHalf<T>)
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
          for (int d = 0; d < D; ++d) d_out.at(b, h, 9, d) = to_bits<T>(0.f);
  }
  // The reference's scores: float64, but with an additive mask the sum is rounded to float32 as PyTorch does.
  const auto score = [&](int b, int h, int i, int j, double dot) {
    switch (c.mask) {
      case Mask::kNone: return dot * scale;
      case Mask::kCausal: return j <= i ? dot * scale : -INFINITY;
      case Mask::kBool: return mask_bool[((size_t(b) * H + h) * Lq + i) * Lk + j] ? dot * scale : -INFINITY;
      case Mask::kKeyPad: return mask_bool[size_t(b) * Lk + j] ? dot * scale : -INFINITY;
      case Mask::kAdditive: {
        const double a = from_bits<T>(mask_add[(size_t(b) * Lq + i) * Lk + j]);
        return a == -INFINITY ? -INFINITY : double(float(dot * scale + a));
      }
    }
    return 0.0;
  };

  // Reference: forward, then backward with delta from the reference out.
  const size_t nq = size_t(B) * H * Lq * D, nk = size_t(B) * Hk * Lk * D;
  std::vector<double> r_out(nq), m_out(nq), r_lse(size_t(B) * H * Lq), r_dq(nq), m_dq(nq);
  std::vector<double> r_dk(nk), m_dk(nk), r_dv(nk), m_dv(nk);
  std::vector<char> lse_checked(size_t(B) * H * Lq, 1);
  const auto qi = [&](int b, int h, int i) { return ((size_t(b) * H + h) * Lq + i) * D; };
  const auto kj = [&](int b, int h, int j) { return ((size_t(b) * Hk + h) * Lk + j) * D; };
  std::vector<double> S(Lk), P(Lk), Z(Lk), dPd(Lk);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      for (int i = 0; i < Lq; ++i) {
        double s_max = -INFINITY;
        for (int j = 0; j < Lk; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += val(q, b, h, i, d) * val(k, b, hk, j, d);
          S[j] = score(b, h, i, j, dot);
          s_max = std::max(s_max, S[j]);
        }
        double l = 0;
        for (int j = 0; j < Lk; ++j) l += P[j] = s_max == -INFINITY ? 0 : std::exp(S[j] - s_max);
        const size_t row = (size_t(b) * H + h) * Lq + i;
        r_lse[row] = l > 0 ? s_max + std::log(l) : -INFINITY;
        // The kernel floors finite mask entries (kMaskFloor), so the lse of a row that only such entries reach is
        // its own convention; out and the gradients there are still compared.
        if (c.mask == Mask::kAdditive && i == 9 && !kIsHalf<T>) lse_checked[row] = 0;
        for (int j = 0; j < Lk; ++j) {
          if (l > 0) P[j] /= l;
          Z[j] = !kDropout ? 1.0
                 : reference_uniform(c.seed, j, i, b * H + h, 0) >= c.dropout ? 1.0 / (1.0 - double{c.dropout})
                                                                               : 0.0;
        }
        double delta = 0, delta_mag = 0;
        for (int d = 0; d < D; ++d) {
          double o = 0, mag = 0;
          for (int j = 0; j < Lk; ++j) {
            o += P[j] * Z[j] * val(v, b, hk, j, d);
            mag += P[j] * Z[j] * std::fabs(val(v, b, hk, j, d));
          }
          r_out[qi(b, h, i) + d] = o;
          m_out[qi(b, h, i) + d] = mag;
          delta += o * val(d_out, b, h, i, d);
          delta_mag += mag * std::fabs(val(d_out, b, h, i, d));
        }
        for (int j = 0; j < Lk; ++j) {
          double dp = 0, dp_mag = 0;
          for (int d = 0; d < D; ++d) {
            dp += val(d_out, b, h, i, d) * val(v, b, hk, j, d);
            r_dv[kj(b, hk, j) + d] += P[j] * Z[j] * val(d_out, b, h, i, d);
            m_dv[kj(b, hk, j) + d] += P[j] * Z[j] * std::fabs(val(d_out, b, h, i, d));
          }
          dPd[j] = dp * Z[j];
          dp_mag = std::fabs(dPd[j]);
          const double ds = P[j] * (dPd[j] - delta), ds_mag = P[j] * (dp_mag + std::fabs(delta) + delta_mag);
          for (int d = 0; d < D; ++d) {
            r_dq[qi(b, h, i) + d] += scale * ds * val(k, b, hk, j, d);
            m_dq[qi(b, h, i) + d] += scale * ds_mag * std::fabs(val(k, b, hk, j, d));
            r_dk[kj(b, hk, j) + d] += scale * ds * val(q, b, h, i, d);
            m_dk[kj(b, hk, j) + d] += scale * ds_mag * std::fabs(val(q, b, h, i, d));
          }
        }
      }
    }

  // Kernel parameters, as csrc/cuda/attention.cu fills them.
  std::vector<float> lse(size_t(B) * H * Lq + 16, NAN), delta(size_t(B) * H * Lq + 16, NAN);
  Params p{};
  p.q = q.data.data(), p.k = k.data.data(), p.v = v.data.data(), p.out = out.data.data();
  p.grad_out = d_out.data.data(), p.out_w = out.data.data();
  p.lse = lse.data(), p.delta = delta.data();
  p.dq = dq.data.data(), p.dk = dk.data.data(), p.dv = dv.data.data();
  p.q_st = q.st, p.k_st = k.st, p.v_st = v.st, p.out_st = out.st, p.do_st = d_out.st;
  p.dq_st = dq.st, p.dk_st = dk.st, p.dv_st = dv.st;
  p.mask = mv;
  p.batch = B, p.heads = H, p.kv_heads = Hk, p.group = G, p.len_q = Lq, p.len_k = Lk;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.dropout_p = c.dropout;
  p.dropout_scale = float(1.0 / (1.0 - c.dropout));
  p.seed = c.seed;
  cuda_emu::set_global_ranges({{q.data.data(), size_t(q.size) * 2}, {k.data.data(), size_t(k.size) * 2},
                               {v.data.data(), size_t(v.size) * 2}, {d_out.data.data(), size_t(d_out.size) * 2},
                               {out.data.data(), size_t(out.size) * 2}});
  cuda_emu::reset_errors();
  const auto cdiv = [](int64_t a, int64_t b) { return unsigned((a + b - 1) / b); };
  bool ran = cuda_emu::launch({cdiv(Lq, FwdTile<D>::kBlockM), unsigned(H), unsigned(B)}, FwdTile<D>::kSmemBytes, [&] {
    if (wgmma)
      attention_fwd_kernel<T, D, kMode, kDropout, true>(p);
    else
      attention_fwd_kernel<T, D, kMode, kDropout, false>(p);
  });

  Report report;
  const auto check16 = [&](const char* name, Tensor16& t, const std::vector<double>& ref,
                           const std::vector<double>& mag, int heads, int len) {
    Check ch{name};
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < len; ++i)
          for (int d = 0; d < D; ++d) {
            const size_t x = ((size_t(b) * heads + h) * len + i) * D + d;
            ch.element(val(t, b, h, i, d), ref[x], mag[x], u);
          }
    if (!t.guard_intact()) ch.ok = false, ch.worst = INFINITY;
    report.add(ch);
  };

  if (!backward) {
    check16("out", out, r_out, m_out, H, Lq);
    Check ch{"lse"};  // fp32 against float64: an absolute and relative 1e-5 (scores of a few units)
    for (size_t x = 0; x < r_lse.size(); ++x) {
      if (!lse_checked[x]) continue;
      const bool same = std::isinf(r_lse[x]) ? lse[x] == r_lse[x]
                                             : std::fabs(lse[x] - r_lse[x]) <= 1e-5 * (1 + std::fabs(r_lse[x]));
      if (!same) ch.ok = false;
      if (std::isfinite(r_lse[x])) ch.worst = std::max(ch.worst, std::fabs(lse[x] - r_lse[x]) / u);
      else if (!same) ch.worst = INFINITY;
    }
    if (lse[size_t(B) * H * Lq] == lse[size_t(B) * H * Lq]) ch.ok = false;  // guard still NaN
    report.add(ch);
  } else {
    ran = ran && cuda_emu::launch({cdiv(int64_t{B} * H * Lq, kDeltaRowsPerBlock), 1, 1}, 0,
                                  [&] { attention_bwd_preprocess_kernel<T, D>(p); });
    ran = ran && cuda_emu::launch({cdiv(Lq, BwdDqTile<D>::kBlockM), unsigned(H), unsigned(B)},
                                  BwdDqTile<D>::kSmemBytes, [&] {
                                    if (wgmma)
                                      attention_bwd_dq_kernel<T, D, kMode, kDropout, true>(p);
                                    else
                                      attention_bwd_dq_kernel<T, D, kMode, kDropout, false>(p);
                                  });
    ran = ran && cuda_emu::launch({cdiv(Lk, BwdDkvTile<D>::kBlockN), unsigned(Hk), unsigned(B)},
                                  BwdDkvTile<D>::kSmemBytes, [&] {
                                    if (wgmma)
                                      attention_bwd_dkdv_kernel<T, D, kMode, kDropout, true>(p);
                                    else
                                      attention_bwd_dkdv_kernel<T, D, kMode, kDropout, false>(p);
                                  });
    // delta: the fp32 rowsum(dO * out) of the kernel's own out against float64; exact products, D fp32 additions.
    Check ch{"delta"};
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < Lq; ++i) {
          double ref = 0, mag = 0;
          for (int d = 0; d < D; ++d) {
            ref += val(out, b, h, i, d) * val(d_out, b, h, i, d);
            mag += std::fabs(val(out, b, h, i, d) * val(d_out, b, h, i, d));
          }
          ch.element(delta[(size_t(b) * H + h) * Lq + i], ref, mag, kFp32Sum);
        }
    report.add(ch);
    check16("dq", dq, r_dq, m_dq, H, Lq);
    check16("dk", dk, r_dk, m_dk, Hk, Lk);
    check16("dv", dv, r_dv, m_dv, Hk, Lk);
  }
  const int emu_errors = cuda_emu::errors();
  const bool ok = report.ok && ran && emu_errors == 0;
  const char* verdict = ok ? "ok" : "FAIL";
  std::printf("%-5s case %2d %s %s D%-3d %-8s drop %.2f B%d H%d Hk%d Lq%d Lk%d%s |%s | emu errors %d\n",
              verdict, index, backward ? (wgmma ? "bwd-wgmma" : "bwd") : wgmma ? "fwd-wgmma" : "fwd",
              kIsHalf<T> ? "fp16" : "bf16", D, mask_name(c.mask), c.dropout, B, H, Hk, Lq, Lk,
              c.packed ? " packed" : "", report.text.c_str(), emu_errors);
  std::fflush(stdout);
  return ok;
}

using Runner = bool (*)(int, const Case&, Pass);
struct Row {
  Runner run;
  Case c;
};

template <typename T, int D, MaskMode kMode, bool kDropout>
constexpr Runner R = &run_case<T, D, kMode, kDropout>;
using F = __half;
using BF = __nv_bfloat16;
constexpr MaskMode kNone = MaskMode::kNone, kCausal = MaskMode::kCausal, kTensor = MaskMode::kTensor;

// Each distinct (T, D, mode, dropout) is one instantiation of the four kernels: the list reuses a few.
const Row kCases[] = {
    {R<F, 64, kNone, false>, {2, 4, 2, 100, 203, Mask::kNone, 0.f, false, 0}},              // GQA, odd lengths
    {R<F, 64, kNone, false>, {1, 1, 1, 1, 1, Mask::kNone, 0.f, false, 0}},                  // Lq = Lk = 1
    {R<BF, 128, kNone, false>, {1, 2, 2, 64, 128, Mask::kNone, 0.f, true, 0}},              // multiples of 64, packed
    {R<F, 64, kCausal, false>, {1, 2, 1, 50, 130, Mask::kCausal, 0.f, false, 0}},           // causal, Lq < Lk
    {R<BF, 128, kCausal, false>, {1, 4, 2, 130, 70, Mask::kCausal, 0.f, true, 0}},          // causal, Lq > Lk
    {R<F, 128, kTensor, false>, {2, 2, 1, 45, 70, Mask::kBool, 0.f, false, 0}},             // fully masked rows
    {R<F, 128, kTensor, false>, {1, 2, 2, 40, 90, Mask::kAdditive, 0.f, false, 0}},         // fp16 finfo.min
    {R<BF, 64, kTensor, false>, {3, 2, 2, 64, 100, Mask::kKeyPad, 0.f, false, 0}},          // key padding
    {R<BF, 64, kTensor, false>, {1, 2, 1, 80, 64, Mask::kAdditive, 0.f, true, 0}},          // bf16 finfo.min
    {R<F, 64, kCausal, true>, {1, 2, 1, 150, 130, Mask::kCausal, 0.25f, false, 0x123456789abcdefull}},
    {R<BF, 128, kNone, true>, {1, 2, 2, 70, 100, Mask::kNone, 0.2f, true, 42}},             // dropout, packed
    {R<BF, 64, kTensor, true>, {1, 2, 1, 66, 66, Mask::kBool, 0.3f, false, 7}},             // dropout + mask
};

}  // namespace

int main(int argc, char** argv) {
  const std::string kernel = argc > 1 ? argv[1] : "";
  const Pass pass = kernel == "fwd"         ? Pass::kForward
                    : kernel == "fwd-wgmma" ? Pass::kForwardWgmma
                    : kernel == "bwd"       ? Pass::kBackward
                                            : Pass::kBackwardWgmma;
  if (kernel != "fwd" && kernel != "fwd-wgmma" && kernel != "bwd" && kernel != "bwd-wgmma") {
    std::fprintf(stderr, "usage: %s fwd|fwd-wgmma|bwd|bwd-wgmma [case index]\n", argv[0]);
    return 2;
  }
  const int only = argc > 2 ? std::atoi(argv[2]) : -1;
  int failed = 0, n = 0;
  for (int i = 0; i < int(std::size(kCases)); ++i) {
    if (only >= 0 && i != only) continue;
    ++n;
    failed += !kCases[i].run(i, kCases[i].c, pass);
  }
  std::printf("%s: %d of %d cases failed\n", kernel.c_str(), failed, n);
  // Every tile access of the kernels is an ldmatrix or a cp.async: with the swizzle of attention_common.cuh, each
  // phase of either takes exactly one wavefront (see emulator.h, "Shared-memory banks").
  const cuda_emu::BankStats& banks = cuda_emu::bank_stats();
  const bool conflicts = banks.ldmatrix.wavefronts != banks.ldmatrix.phases ||
                         banks.cp_async.wavefronts != banks.cp_async.phases;
  std::printf("%s: shared-memory banks: ldmatrix %ld phases %ld wavefronts (worst %d per phase), cp.async %ld phases "
              "%ld wavefronts (worst %d per phase)%s\n",
              kernel.c_str(), banks.ldmatrix.phases, banks.ldmatrix.wavefronts, banks.ldmatrix.worst,
              banks.cp_async.phases, banks.cp_async.wavefronts, banks.cp_async.worst,
              conflicts ? ": BANK CONFLICTS" : "");
  return failed != 0 || conflicts;
}
