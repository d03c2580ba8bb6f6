// Scaled dot-product attention on CUDA tensor cores (sm_80+), forward and backward: the `csrc` CUDA backend of
// fastgpt/ops/attention.py. The kernels are in attention_fwd.cuh and attention_bwd.cuh, their building blocks in
// attention_common.cuh; this file checks the inputs, picks the kernel instantiation and launches it.
//
// Supported (anything else is a TORCH_CHECK error; the op layer routes such inputs to another backend):
//   q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, D): CUDA, fp16 or bf16, one dtype, D in {64, 128}, H % Hk == 0,
//   any strides (rows are copied as 16-byte vectors: a layout that does not allow it is copied to a contiguous
//   one first, see rows_aligned; a packed QKV view is read in place); attn_mask None or bool / q's dtype,
//   broadcastable to (B, H, Lq, Lk) (read through expanded strides, never materialised), not together with
//   is_causal; dropout_p in [0, 1); seed an int64 CPU scalar.
// Compile-time variants: dtype x head dim x {no mask, causal, mask tensor} x {dropout, none}, chosen by dispatch(),
// and the kernels' products: wgmma or mma.sync (use_wgmma).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "attention_bwd.cuh"
#include "attention_fwd.cuh"

namespace fastgpt {
namespace {

using attention::MaskMode;
using attention::Params;

// Calls body.template operator()<T, D, kMode, kDropout, kWgmma>() with the runtime choices as template arguments.
template <typename Body>
void dispatch(at::ScalarType dtype, int64_t head_dim, MaskMode mode, bool dropout, bool wgmma, const Body& body) {
  const auto with_wgmma = [&]<typename T, int D, MaskMode kMode, bool kDropout>() {
    if (wgmma)
      body.template operator()<T, D, kMode, kDropout, true>();
    else
      body.template operator()<T, D, kMode, kDropout, false>();
  };
  const auto with_dropout = [&]<typename T, int D, MaskMode kMode>() {
    if (dropout)
      with_wgmma.template operator()<T, D, kMode, true>();
    else
      with_wgmma.template operator()<T, D, kMode, false>();
  };
  const auto with_mode = [&]<typename T, int D>() {
    switch (mode) {
      case MaskMode::kNone: with_dropout.template operator()<T, D, MaskMode::kNone>(); break;
      case MaskMode::kCausal: with_dropout.template operator()<T, D, MaskMode::kCausal>(); break;
      case MaskMode::kTensor: with_dropout.template operator()<T, D, MaskMode::kTensor>(); break;
    }
  };
  const auto with_dim = [&]<typename T>() {
    if (head_dim == 64)
      with_mode.template operator()<T, 64>();
    else
      with_mode.template operator()<T, 128>();
  };
  if (dtype == at::kHalf)
    with_dim.template operator()<__half>();
  else
    with_dim.template operator()<__nv_bfloat16>();
}

// Launches `kernel` on the current stream with `smem` bytes of dynamic shared memory (raising the 48 KB default
// limit when needed) and checks the launch.
template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int smem, const Params& params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, attention::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

attention::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, heads, L, D) operand on q's device, in q's dtype.
void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "attention (CUDA): expected ", name, " of 4 dims (B, heads, L, D), got ", t.dim());
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "attention (CUDA): expected ", name, " on ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention (CUDA): expected ", name, " of q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
}

// t itself when the kernels can copy its rows as 16-byte vectors (last dim contiguous, the other strides multiples
// of 8 elements, 16-byte aligned data: a contiguous tensor, or the (B, L, H, D) storage of a packed QKV projection
// seen as (B, H, L, D)); otherwise a contiguous copy (fresh allocations are aligned).
at::Tensor rows_aligned(const at::Tensor& t) {
  const bool aligned = t.numel() == 0 || (t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                                          t.stride(2) % 8 == 0 &&
                                          reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0);
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

struct Shape {
  int64_t batch, heads, kv_heads, len_q, len_k, head_dim;
};

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& attn_mask, bool is_causal, double dropout_p,
                   const at::Tensor& seed) {
  TORCH_CHECK(q.is_cuda(), "attention (CUDA): expected q on a CUDA device, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention (CUDA): expected q of dtype float16 or bfloat16, got ", q.scalar_type());
  check_operand("q", q, q);
  check_operand("k", k, q);
  check_operand("v", v, q);
  const Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128, "attention (CUDA): expected q's head dim 64 or 128, got ",
              s.head_dim);
  TORCH_CHECK(k.size(0) == s.batch && k.size(3) == s.head_dim, "attention (CUDA): expected k of shape (",
              s.batch, ", Hk, Lk, ", s.head_dim, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == s.batch && v.size(1) == s.kv_heads && v.size(2) == s.len_k,
              "attention (CUDA): expected v of shape (", s.batch, ", ", s.kv_heads, ", ", s.len_k, ", Dv), got ",
              v.sizes());
  TORCH_CHECK(v.size(3) == s.head_dim, "attention (CUDA): expected v's head dim to equal q's (", s.head_dim,
              "), got ", v.size(3));
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "attention (CUDA): expected q's heads (", s.heads,
              ") to be a multiple of k's (", s.kv_heads, ")");
  TORCH_CHECK(s.len_q < (1LL << 31) && s.len_k < (1LL << 31) && s.heads <= 65535 && s.batch <= 65535,
              "attention (CUDA): expected Lq, Lk < 2^31 and B, H <= 65535, got ", q.sizes(), " and ", k.sizes());
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(!is_causal, "attention (CUDA): expected either attn_mask or is_causal, not both");
    TORCH_CHECK(m.device() == q.device(), "attention (CUDA): expected attn_mask on ", q.device(), ", got ",
                m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "attention (CUDA): expected attn_mask of dtype bool or q's dtype ", q.scalar_type(), ", got ",
                m.scalar_type());
    // Checked here, dim by dim from the last, so that a wrong shape is an error naming attn_mask rather than
    // expand()'s in make_params.
    const int64_t target[4] = {s.batch, s.heads, s.len_q, s.len_k};
    bool broadcastable = m.dim() <= 4;
    for (int64_t d = 1; broadcastable && d <= m.dim(); ++d)
      broadcastable = m.size(-d) == 1 || m.size(-d) == target[4 - d];
    TORCH_CHECK(broadcastable, "attention (CUDA): expected attn_mask broadcastable to (B, H, Lq, Lk) = (", s.batch,
                ", ", s.heads, ", ", s.len_q, ", ", s.len_k, "), got ", m.sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (CUDA): expected dropout_p in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "attention (CUDA): expected seed to be an int64 CPU scalar tensor, got ", seed.scalar_type(), " on ",
              seed.device(), " with ", seed.numel(), " elements");
  return s;
}

// The parameters common to both passes; the caller fills in the output pointers.
Params make_params(const Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& attn_mask, double scale, double dropout_p,
                   const at::Tensor& seed) {
  Params p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  if (attn_mask.has_value()) {
    // Broadcast by strides: expand() gives 0 strides over the dims the mask lacks, without copying.
    const at::Tensor m = attn_mask->expand({s.batch, s.heads, s.len_q, s.len_k});
    p.mask = {m.const_data_ptr(), m.stride(0), m.stride(1), m.stride(2), m.stride(3), m.scalar_type() == at::kBool};
  }
  p.batch = static_cast<int>(s.batch);
  p.heads = static_cast<int>(s.heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.group = static_cast<int>(s.heads / s.kv_heads);
  p.len_q = static_cast<int>(s.len_q);
  p.len_k = static_cast<int>(s.len_k);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed.item<int64_t>());
  return p;
}

// Whether the kernels run their products as wgmma: on a GPU of compute capability 9.x (Hopper), unless the
// environment variable FASTGPT_CUDA_WGMMA is "off" (mma.sync there too: the benchmark compares the two). Read at each
// call, as the Triton backend reads FASTGPT_TRITON_TMA. A build without sm_90a code runs mma.sync either way (see
// kHasWgmma in ptx.cuh).
bool use_wgmma(const at::Device& device) {
  const char* env = std::getenv("FASTGPT_CUDA_WGMMA");
  const std::string_view policy = env == nullptr ? "auto" : env;
  TORCH_CHECK(policy == "auto" || policy == "off",
              "attention (CUDA): expected the environment variable FASTGPT_CUDA_WGMMA to be auto or off, got '",
              policy, "'");
  if (policy == "off") return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  return major == 9;
}

MaskMode mask_mode(const std::optional<at::Tensor>& attn_mask, bool is_causal) {
  return attn_mask.has_value() ? MaskMode::kTensor : is_causal ? MaskMode::kCausal : MaskMode::kNone;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                      double scale, double dropout_p, const at::Tensor& seed) {
  const Shape s = check_inputs(q, k, v, attn_mask, is_causal, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.batch, s.heads, s.len_q, s.head_dim}, q.options());  // (B, H, Lq, D)
  at::Tensor lse = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));  // (B, H, Lq)
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q_rows = rows_aligned(q), k_rows = rows_aligned(k), v_rows = rows_aligned(v);
  Params p = make_params(s, q_rows, k_rows, v_rows, attn_mask, scale, dropout_p, seed);
  p.out_w = out.mutable_data_ptr();
  p.out_st = strides_of(out);
  p.lse = lse.mutable_data_ptr<float>();
  dispatch(q.scalar_type(), s.head_dim, mask_mode(attn_mask, is_causal), dropout_p > 0.0, use_wgmma(q.device()),
           [&]<typename T, int D, MaskMode kMode, bool kDropout, bool kWgmma>() {
             using Tile = attention::FwdTile<D>;
             launch(attention::attention_fwd_kernel<T, D, kMode, kDropout, kWgmma>,
                    dim3(ceil_div(s.len_q, Tile::kBlockM), s.heads, s.batch), Tile::kSmemBytes, p);
           });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale, double dropout_p, const at::Tensor& seed) {
  const Shape s = check_inputs(q, k, v, attn_mask, is_causal, dropout_p, seed);
  check_operand("grad_out", grad_out, q);
  check_operand("out", out, q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "attention (CUDA): expected grad_out and out of q's shape ", q.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads, s.len_q}),
              "attention (CUDA): expected lse contiguous float32 of shape (", s.batch, ", ", s.heads, ", ", s.len_q,
              ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty({s.batch, s.heads, s.len_q, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.batch, s.kv_heads, s.len_k, s.head_dim}, q.options());
  at::Tensor dv = at::empty({s.batch, s.kv_heads, s.len_k, s.head_dim}, q.options());
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};  // no query: no gradient. Lk = 0: dQ = 0 (below)
  at::Tensor delta = at::empty({s.batch, s.heads, s.len_q}, q.options().dtype(at::kFloat));  // rowsum(dO * O)
  const at::Tensor q_rows = rows_aligned(q), k_rows = rows_aligned(k), v_rows = rows_aligned(v);
  const at::Tensor out_rows = rows_aligned(out), grad_out_rows = rows_aligned(grad_out);
  Params p = make_params(s, q_rows, k_rows, v_rows, attn_mask, scale, dropout_p, seed);
  p.out = out_rows.const_data_ptr();
  p.out_st = strides_of(out_rows);
  p.grad_out = grad_out_rows.const_data_ptr();
  p.do_st = strides_of(grad_out_rows);
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only in the backward kernels
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.dq_st = strides_of(dq);
  p.dk_st = strides_of(dk);
  p.dv_st = strides_of(dv);
  dispatch(q.scalar_type(), s.head_dim, mask_mode(attn_mask, is_causal), dropout_p > 0.0, use_wgmma(q.device()),
           [&]<typename T, int D, MaskMode kMode, bool kDropout, bool kWgmma>() {
             // delta = rowsum(dO * O); its instantiation depends on (T, D) only.
             launch(attention::attention_bwd_preprocess_kernel<T, D>,
                    dim3(ceil_div(s.batch * s.heads * s.len_q, attention::kDeltaRowsPerBlock)), 0, p);
             using DqTile = attention::BwdDqTile<D>;
             launch(attention::attention_bwd_dq_kernel<T, D, kMode, kDropout, kWgmma>,
                    dim3(ceil_div(s.len_q, DqTile::kBlockM), s.heads, s.batch), DqTile::kSmemBytes, p);
             using DkvTile = attention::BwdDkvTile<D>;
             launch(attention::attention_bwd_dkdv_kernel<T, D, kMode, kDropout, kWgmma>,
                    dim3(ceil_div(s.len_k, DkvTile::kBlockN), s.kv_heads, s.batch), DkvTile::kSmemBytes, p);
           });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastgpt
