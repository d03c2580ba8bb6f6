// Fused linear + activation (GELU) on CUDA. Same ops and maths as csrc/cpu/linear_gelu.cpp.
//
// The matrix products are cuBLASLt's, with its fused epilogues where they compute exactly what we need:
//   forward, gelu_tanh, no dropout : CUBLASLT_EPILOGUE_GELU_AUX_BIAS  out = gelu_tanh(A B + b), aux = A B + b
//   backward through gelu_tanh      : CUBLASLT_EPILOGUE_DGELU_BGRAD   out = (A B) * gelu_tanh'(aux), bgrad = sum(out)
//   forward, no activation/dropout  : CUBLASLT_EPILOGUE_BIAS
// (cuBLASLt's GELU is the tanh form.) Everything else -- the exact erf GELU, relu, the output dropout, and the
// element-wise backward of a gradient that arrives from outside -- is a cuBLASLt product (with the bias in its
// epilogue) followed by one of our kernels (linear_gelu.cuh), which does all the element-wise work in one pass over
// the product's output.
//
// Layout: our tensors are row-major; cuBLASLt is column-major. A row-major (M, N) matrix is the column-major
// (N, M) matrix with leading dimension N, so Y = X W^T (row-major) is computed as Y^T = W X^T (column-major):
// m = N, n = M, k = K, A = W read transposed (ld K), B = X (ld K), D = Y (ld N). The epilogue's bias has length
// m = N (one per output feature), exactly what nn.Linear's bias is.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include "../linear_gelu.h"
#include "linear_gelu.cuh"

namespace fastgpt {
namespace {

using namespace linear_gelu;

#define FASTGPT_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                               \
    const cublasStatus_t status = (expr);                                                            \
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "linear_gelu: ", #expr, " failed with status ",     \
                static_cast<int>(status));                                                           \
  } while (0)

// The CUDA path serves float32, float16 and bfloat16 (the op layer sends float64 to the reference).
#define FASTGPT_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS's recommendation for Hopper

cublasLtHandle_t lt_handle() {
  // One handle per thread and device, created on first use (creating one is expensive, using one is not).
  thread_local std::vector<cublasLtHandle_t> handles;
  const int device = c10::cuda::current_device();
  if (static_cast<int>(handles.size()) <= device) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) FASTGPT_CUBLAS_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "linear_gelu: CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

// What a cuBLASLt product does after A B. Pointers are device pointers in D's dtype (bias_grad too).
struct Epilogue {
  cublasLtEpilogue_t kind = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  void* bias_grad = nullptr;
  void* aux = nullptr;  // GELU_AUX*: pre-activation written; DGELU*: read
  int64_t aux_ld = 0;
};

// Largest power of two (at most 256, cuBLASLt's default assumption) that divides the address.
uint32_t alignment(const void* p) {
  uint32_t bytes = 256;
  while (bytes > 1 && reinterpret_cast<uintptr_t>(p) % bytes != 0) bytes /= 2;
  return bytes;
}

// Column-major D (m, n) = op(A) (m, k) op(B) (k, n) with the epilogue, on the current stream. Returns false, having
// done nothing, when cuBLASLt has no algorithm for this epilogue (the caller then runs the plain product and our
// kernel).
bool lt_matmul(bool transpose_a, const void* a, int64_t lda, const void* b, int64_t ldb, void* d, int64_t ldd,
               int64_t m, int64_t n, int64_t k, at::ScalarType dtype, const Epilogue& epilogue) {
  const cudaDataType_t type = cuda_dtype(dtype);
  const cublasComputeType_t compute =
      dtype == at::kFloat && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t desc;
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, compute, CUDA_R_32F));
  const cublasOperation_t op_a = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  FASTGPT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue.kind, sizeof(epilogue.kind)));
  if (epilogue.bias != nullptr || epilogue.bias_grad != nullptr) {
    const void* pointer = epilogue.bias != nullptr ? epilogue.bias : epilogue.bias_grad;
    FASTGPT_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pointer, sizeof(pointer)));
  }
  if (epilogue.aux != nullptr) {
    FASTGPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                        &epilogue.aux, sizeof(epilogue.aux)));
    FASTGPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                        &epilogue.aux_ld, sizeof(epilogue.aux_ld)));
  }
  cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
  FASTGPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_a, type, transpose_a ? k : m, transpose_a ? m : k, lda));
  FASTGPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_b, type, k, n, ldb));
  FASTGPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout_d, type, m, n, ldd));

  at::Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  cublasLtMatmulPreference_t preference;
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &kWorkspaceBytes, sizeof(kWorkspaceBytes)));
  // The heuristic assumes 256-byte aligned matrices unless told otherwise (it never sees the pointers): an input
  // that is a view at an odd offset would otherwise get an algorithm whose vector loads fault.
  const uint32_t align_a = alignment(a), align_b = alignment(b), align_d = alignment(d);
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                            &align_a, sizeof(align_a)));
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                            &align_b, sizeof(align_b)));
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                            &align_d, sizeof(align_d)));
  FASTGPT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                            &align_d, sizeof(align_d)));
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  cublasLtHandle_t handle = lt_handle();
  const cublasStatus_t heuristic_status = cublasLtMatmulAlgoGetHeuristic(
      handle, desc, layout_a, layout_b, layout_d, layout_d, preference, 1, &heuristic, &found);
  const bool has_algorithm = heuristic_status == CUBLAS_STATUS_SUCCESS && found > 0;
  if (heuristic_status != CUBLAS_STATUS_NOT_SUPPORTED) FASTGPT_CUBLAS_CHECK(heuristic_status);
  if (has_algorithm) {
    const float one = 1.f, zero = 0.f;
    FASTGPT_CUBLAS_CHECK(cublasLtMatmul(handle, desc, &one, a, layout_a, b, layout_b, &zero, d, layout_d, d,
                                        layout_d, &heuristic.algo, workspace.data_ptr(), kWorkspaceBytes,
                                        c10::cuda::getCurrentCUDAStream()));
  }
  cublasLtMatmulPreferenceDestroy(preference);
  cublasLtMatrixLayoutDestroy(layout_d);
  cublasLtMatrixLayoutDestroy(layout_b);
  cublasLtMatrixLayoutDestroy(layout_a);
  cublasLtMatmulDescDestroy(desc);
  return has_algorithm;
}

// Row-major out (M, N) = input (M, K) weight (N, K)^T, with the epilogue. Returns whether it ran (lt_matmul).
bool linear(const at::Tensor& input, const at::Tensor& weight, at::Tensor& out, const Epilogue& epilogue) {
  const int64_t rows = input.size(0), inner = input.size(1), cols = weight.size(0);
  return lt_matmul(/*transpose_a=*/true, weight.const_data_ptr(), inner, input.const_data_ptr(), inner,
                   out.data_ptr(), cols, cols, rows, inner, input.scalar_type(), epilogue);
}

// Row-major out (M, K) = grad (M, N) weight (N, K), with the epilogue. Returns whether it ran (lt_matmul).
bool linear_input_grad(const at::Tensor& grad, const at::Tensor& weight, at::Tensor& out, const Epilogue& epilogue) {
  const int64_t rows = grad.size(0), inner = grad.size(1), cols = weight.size(1);
  return lt_matmul(/*transpose_a=*/false, weight.const_data_ptr(), cols, grad.const_data_ptr(), inner,
                   out.data_ptr(), cols, cols, rows, inner, grad.scalar_type(), epilogue);
}

// The plain product and the bias epilogue have an algorithm for every shape.
void check_ran(bool ran) { TORCH_CHECK(ran, "linear_gelu: cuBLASLt has no algorithm for this product"); }

// The cuBLASLt epilogues need 16-byte aligned pointers and an aux leading dimension divisible by 8.
bool lt_epilogue_fits(int64_t cols, std::initializer_list<const at::Tensor*> tensors) {
  if (cols % 8 != 0) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  return true;
}

// weight (N, K) of x's dtype and device, where `dim` of weight must have `size` (the product's inner dimension).
void check_weight(const at::Tensor& weight, int64_t dim, int64_t size, const at::Tensor& like) {
  check_matrix(weight, "weight");
  TORCH_CHECK(weight.size(dim) == size && weight.scalar_type() == like.scalar_type() &&
                  weight.device() == like.device(),
              "linear_gelu: expected weight with ", size, dim == 0 ? " rows" : " columns", ", dtype ",
              like.scalar_type(), " and device ", like.device(), ", got ", weight.sizes(), " ", weight.scalar_type(),
              " on ", weight.device());
}

// bias (N,) in input's dtype and device, contiguous and 16-byte aligned (cuBLASLt's bias epilogues read it with
// vector loads: a view at an odd offset gets an aligned copy), or undefined when absent.
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input, int64_t cols) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cols && bias->scalar_type() == input.scalar_type() &&
                  bias->device() == input.device(),
              "linear_gelu: expected bias of shape (", cols, "), dtype ", input.scalar_type(), " and device ",
              input.device(), ", got ", bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  const at::Tensor contiguous = bias->contiguous();
  return reinterpret_cast<uintptr_t>(contiguous.const_data_ptr()) % 16 == 0 ? contiguous : contiguous.clone();
}

Epilogue bias_epilogue(const at::Tensor& bias) {
  Epilogue epilogue;
  if (bias.defined()) {
    epilogue.kind = CUBLASLT_EPILOGUE_BIAS;
    epilogue.bias = bias.const_data_ptr();
  }
  return epilogue;
}

void forward_epilogue(const at::Tensor& pre, at::Tensor& out, Activation activation, double dropout_p,
                      uint64_t seed) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  if (rows * cols == 0) return;
  FASTGPT_DISPATCH_FLOAT_HALF_BF16(pre.scalar_type(), "linear_gelu_fwd", [&] {
    const bool vec = quad_aligned<scalar_t>(cols, {pre.const_data_ptr(), out.const_data_ptr()});
    dispatch_activation(activation, [&](auto a) {
      forward_epilogue_kernel<scalar_t, decltype(a)::value>
          <<<forward_blocks(rows, cols), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              pre.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols, vec,
              make_dropout(dropout_p, seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Returns (dpre, bias_grad float32 (N,) or empty).
std::tuple<at::Tensor, at::Tensor> backward_epilogue(const at::Tensor& grad, const at::Tensor& pre, at::Tensor dpre,
                                                     Activation activation, double dropout_p, uint64_t seed,
                                                     bool bias_grad) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const ColumnSumsLaunch launch = column_sums_launch(rows, cols, sms);
  at::Tensor partial =
      at::empty({bias_grad ? static_cast<int64_t>(launch.grid.y) : 0, cols}, grad.options().dtype(at::kFloat));
  if (rows * cols > 0) {
    FASTGPT_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "linear_gelu_bwd", [&] {
      const bool vec = quad_aligned<scalar_t>(
          cols, {grad.const_data_ptr(), pre.defined() ? pre.const_data_ptr() : nullptr, dpre.const_data_ptr()});
      dispatch_activation(activation, [&](auto a) {
        backward_epilogue_kernel<scalar_t, decltype(a)::value>
            <<<launch.grid, dim3(kColThreads, kRowWarps), 0, c10::cuda::getCurrentCUDAStream()>>>(
                grad.const_data_ptr<scalar_t>(), pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr,
                dpre.mutable_data_ptr<scalar_t>(), bias_grad ? partial.mutable_data_ptr<float>() : nullptr, rows,
                cols, launch.rows_per_block, vec, make_dropout(dropout_p, seed));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (!bias_grad) return {dpre, at::empty({0}, grad.options().dtype(at::kFloat))};
  return {dpre, rows > 0 ? partial.sum(0) : at::zeros({cols}, grad.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                   bool store_pre, double dropout_p, const at::Tensor& seed) {
  check_matrix(input, "input");
  check_weight(weight, 1, input.size(1), input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation act = parse_activation(activation);
  const int64_t rows = input.size(0), cols = weight.size(0);
  const at::Tensor bias_t = checked_bias(bias, input, cols);
  at::Tensor out = at::empty({rows, cols}, input.options());
  at::Tensor pre = store_pre ? at::empty_like(out) : at::empty({0}, input.options());
  const bool lt_fused = dropout_p == 0.0 && (act == Activation::kGeluTanh || act == Activation::kNone) &&
                        lt_epilogue_fits(cols, {&input, &weight, &bias_t, &out, &pre});
  if (rows == 0 || cols == 0) return {out, pre};
  TORCH_CHECK(input.size(1) > 0, "linear_gelu: expected input with at least one column, got ", input.sizes());
  bool fused_ran = false;
  if (lt_fused) {
    Epilogue epilogue;
    epilogue.bias = bias_t.defined() ? bias_t.const_data_ptr() : nullptr;
    if (act == Activation::kGeluTanh) {
      if (store_pre) {
        epilogue.kind = bias_t.defined() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        epilogue.aux = pre.data_ptr();
        epilogue.aux_ld = cols;
      } else {
        epilogue.kind = bias_t.defined() ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
    } else {
      epilogue.kind = bias_t.defined() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    }
    fused_ran = linear(input, weight, out, epilogue);
  }
  if (fused_ran) {
    if (store_pre && act == Activation::kNone) pre.copy_(out);  // with no activation, pre is the output
    return {out, pre};
  }
  // x W^T + b (the bias in cuBLASLt's epilogue, before the one rounding) into pre's buffer, or straight into out
  // when pre is not kept; then one fused pass for the activation and the dropout.
  at::Tensor product = store_pre ? pre : out;
  check_ran(linear(input, weight, product, bias_epilogue(bias_t)));
  forward_epilogue(product, out, act, dropout_p, dropout_p > 0 ? seed_value(seed) : 0);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad, const std::optional<at::Tensor>& pre,
                                                   c10::string_view activation, double dropout_p,
                                                   const at::Tensor& seed, bool bias_grad) {
  const BwdArgs args = checked_bwd_args(grad, pre, activation, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(grad.device());
  return backward_epilogue(grad, args.pre, at::empty_like(grad), args.activation, dropout_p, args.seed, bias_grad);
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_bwd_recompute(const at::Tensor& grad, const at::Tensor& input,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view activation, bool bias_grad) {
  check_matrix(grad, "grad");
  check_matrix(input, "input");
  check_weight(weight, 1, input.size(1), input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor pre = at::empty({input.size(0), weight.size(0)}, input.options());
  check_same_shape(grad, "grad", pre);
  const at::Tensor bias_t = checked_bias(bias, input, weight.size(0));
  TORCH_CHECK(input.size(1) > 0 || pre.numel() == 0, "linear_gelu: expected input with at least one column, got ",
              input.sizes());
  if (pre.numel() > 0) check_ran(linear(input, weight, pre, bias_epilogue(bias_t)));
  return backward_epilogue(grad, pre, pre, parse_activation(activation), 0.0, 0, bias_grad);
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_dact(const at::Tensor& grad, const at::Tensor& weight,
                                                    const at::Tensor& pre, c10::string_view activation,
                                                    bool bias_grad) {
  check_matrix(grad, "grad");
  check_weight(weight, 0, grad.size(1), grad);
  check_matrix(pre, "pre");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Activation act = parse_activation(activation);
  const int64_t rows = grad.size(0), cols = weight.size(1);
  at::Tensor dpre = at::empty({rows, cols}, grad.options());
  check_same_shape(pre, "pre", dpre);
  if (rows == 0 || cols == 0 || grad.size(1) == 0)  // nothing to multiply: the gradient is 0
    return {dpre.zero_(), at::zeros({bias_grad ? cols : 0}, grad.options().dtype(at::kFloat))};
  if (act == Activation::kGeluTanh && lt_epilogue_fits(cols, {&grad, &weight, &pre, &dpre})) {
    // cuBLASLt writes the bias gradient in the output dtype; it sums in float32 internally.
    at::Tensor grad_bias = at::empty({bias_grad ? cols : 0}, grad.options());
    Epilogue epilogue;
    epilogue.kind = bias_grad ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    epilogue.aux = const_cast<void*>(pre.const_data_ptr());
    epilogue.aux_ld = cols;
    epilogue.bias_grad = bias_grad ? grad_bias.data_ptr() : nullptr;
    if (linear_input_grad(grad, weight, dpre, epilogue)) return {dpre, grad_bias.to(at::kFloat)};
  }
  check_ran(linear_input_grad(grad, weight, dpre, Epilogue{}));
  return backward_epilogue(dpre, pre, dpre, act, 0.0, 0, bias_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd);
  m.impl("linear_gelu_bwd_recompute", &linear_gelu_bwd_recompute);
  m.impl("linear_gelu_dact", &linear_gelu_dact);
}

}  // namespace fastgpt
