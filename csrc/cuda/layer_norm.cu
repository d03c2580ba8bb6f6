// LayerNorm (optionally fused with dropout and a residual add) on CUDA: the ATen side of the kernels in
// layer_norm.cuh (their layout and maths are described there): input checks, the dtype and vector-width dispatch,
// launches on the current stream, and the TORCH_LIBRARY registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layer_norm.cuh"

namespace fastgpt {
namespace {

using namespace layer_norm;

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows wider than kWideRow run only vectorised (dispatch_vec): a tensor of such rows whose data is not 16-byte
// aligned (a view at an odd offset) is copied to fresh memory, which is.
at::Tensor aligned_for(const at::Tensor& t, int64_t cols) {
  return cols > kWideRow && !aligned(t.const_data_ptr()) ? t.clone() : t;
}

std::optional<at::Tensor> aligned_for(const std::optional<at::Tensor>& t, int64_t cols) {
  if (!t.has_value()) return t;
  return aligned_for(*t, cols);
}

// Runs `body.template operator()<scalar_t, weight_t, VEC>()` with the input dtype (float32, float16, bfloat16; the
// op sends float64 to the reference), the parameters' dtype (the input's, or float32: `param` is weight, or bias
// when there is no weight) and the widest vector that the row length and every pointer's alignment allow. Rows
// wider than kWideRow run only vectorised: one element a load would not fit in 64 registers a thread.
template <typename scalar_t, typename Body>
void dispatch_vec(const at::Tensor& input, bool float_params, std::initializer_list<const void*> ptrs,
                  const Body& body) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool vectorise = input.size(1) % kVec == 0;
  for (const void* p : ptrs) vectorise = vectorise && aligned(p);
  TORCH_CHECK(vectorise || input.size(1) <= kWideRow, "layer_norm: on CUDA, rows wider than ", kWideRow,
              " elements need a length that is a multiple of ", kVec, " and 16-byte aligned tensors; got rows of ",
              input.size(1));
  auto with_vec = [&](auto weight_tag) {
    using weight_t = decltype(weight_tag);
    if (vectorise)
      body.template operator()<scalar_t, weight_t, kVec>();
    else
      body.template operator()<scalar_t, weight_t, 1>();
  };
  if (float_params)
    with_vec(float{});
  else
    with_vec(scalar_t{});
}

template <typename Body>
void dispatch(const at::Tensor& input, const std::optional<at::Tensor>& param, std::initializer_list<const void*> ptrs,
              const Body& body) {
  const bool float_params = param.has_value() && param->scalar_type() == at::kFloat;
  AT_DISPATCH_SWITCH(input.scalar_type(), "layer_norm_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { dispatch_vec<scalar_t>(input, float_params, ptrs, body); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { dispatch_vec<scalar_t>(input, float_params, ptrs, body); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { dispatch_vec<scalar_t>(input, float_params, ptrs, body); }));
}

void check_inputs(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.is_cuda() && input.dim() == 2 && input.is_contiguous(),
              "layer_norm: expected input to be contiguous (M, N) rows on a CUDA device");
  TORCH_CHECK(input.size(1) <= kCache * kMaxThreads, "layer_norm: rows of ", input.size(1),
              " elements exceed the CUDA kernel's ", kCache * kMaxThreads);
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == input.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == input.scalar_type() && residual->device() == input.device(),
                "layer_norm: expected residual contiguous, with input's shape, dtype and device");
  for (const auto* p : {&weight, &bias})
    if (p->has_value())
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == input.size(1) && (*p)->is_contiguous() &&
                      (*p)->device() == input.device() &&
                      ((*p)->scalar_type() == input.scalar_type() || (*p)->scalar_type() == at::kFloat),
                  "layer_norm: expected weight and bias contiguous (N,) in input's dtype or float32");
  if (weight.has_value() && bias.has_value())
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), "layer_norm: expected weight and bias of one dtype");
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

Dropout checked_dropout(double p, const std::optional<at::Tensor>& seed) {
  if (p <= 0.0) return make_dropout(p, 0);
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->is_cpu(),
              "layer_norm: dropout needs seed, an int64 CPU scalar tensor");
  return make_dropout(p, static_cast<uint64_t>(seed->item<int64_t>()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& input_arg,
                                                                  const std::optional<at::Tensor>& residual_arg,
                                                                  const std::optional<at::Tensor>& weight_arg,
                                                                  const std::optional<at::Tensor>& bias_arg,
                                                                  double eps, double dropout_p,
                                                                  const std::optional<at::Tensor>& seed) {
  check_inputs(input_arg, residual_arg, weight_arg, bias_arg);
  const int64_t width = input_arg.size(1);
  const at::Tensor input = aligned_for(input_arg, width);
  const auto residual = aligned_for(residual_arg, width);
  const auto weight = aligned_for(weight_arg, width);
  const auto bias = aligned_for(bias_arg, width);
  const Dropout dropout = checked_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = input.size(0);
  const int cols = static_cast<int>(input.size(1));
  at::Tensor output = at::empty_like(input);
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  if (rows == 0) return {output, mean, rstd};
  const Launch shape = launch_shape(rows, cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(input, weight.has_value() ? weight : bias,
           {input.const_data_ptr(), residual ? residual->const_data_ptr() : nullptr,
            weight ? weight->const_data_ptr() : nullptr, bias ? bias->const_data_ptr() : nullptr,
            output.const_data_ptr()},
           [&]<typename T, typename W, int VEC>() {
             auto kernel = layer_norm_fwd_kernel<T, W, VEC, kBlockThreads>;
             if constexpr (VEC > 1)  // wide rows are vectorised (dispatch)
               if (cols > kWideRow) kernel = layer_norm_fwd_kernel<T, W, VEC, kMaxThreads>;
             kernel<<<shape.row_blocks, shape.block, 0, stream>>>(
                 input.const_data_ptr<T>(), ptr_or_null<T>(residual), ptr_or_null<W>(weight), ptr_or_null<W>(bias),
                 output.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
                 cols, inv_cols(cols), static_cast<float>(eps), dropout);
             C10_CUDA_KERNEL_LAUNCH_CHECK();
           });
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_output_arg,
                                                                  const at::Tensor& input_arg,
                                                                  const std::optional<at::Tensor>& residual_arg,
                                                                  const std::optional<at::Tensor>& weight_arg,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  bool compute_affine_grads, double dropout_p,
                                                                  const std::optional<at::Tensor>& seed) {
  check_inputs(input_arg, residual_arg, weight_arg, std::nullopt);
  const Dropout dropout = checked_dropout(dropout_p, seed);
  TORCH_CHECK(grad_output_arg.sizes() == input_arg.sizes() && grad_output_arg.is_contiguous() &&
                  grad_output_arg.scalar_type() == input_arg.scalar_type(),
              "layer_norm: expected grad_output contiguous with input's shape and dtype");
  const int64_t width = input_arg.size(1);
  const at::Tensor grad_output = aligned_for(grad_output_arg, width);
  const at::Tensor input = aligned_for(input_arg, width);
  const auto residual = aligned_for(residual_arg, width);
  const auto weight = aligned_for(weight_arg, width);
  TORCH_CHECK(mean.numel() == input.size(0) && rstd.numel() == input.size(0) && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "layer_norm: expected mean and rstd float32 of shape (M,)");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = input.size(0);
  const int cols = static_cast<int>(input.size(1));
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_residual = dropout.p > 0.f && residual.has_value() ? at::empty_like(input) : input.new_empty({0});
  const Launch shape = launch_shape(rows, cols);
  const bool wide = cols > kWideRow;
  // dweight and dbias: (2, partial rows, N) float32 partial sums, filled by the row kernel (narrow rows) or the
  // column kernel (wide rows), summed below.
  at::Tensor partial = at::empty({2, 0, cols}, input.options().dtype(at::kFloat));
  if (rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, input.get_device()));
    dispatch(input, weight,
             {grad_output.const_data_ptr(), input.const_data_ptr(), residual ? residual->const_data_ptr() : nullptr,
              weight ? weight->const_data_ptr() : nullptr, grad_input.const_data_ptr(),
              grad_residual.numel() > 0 ? grad_residual.const_data_ptr() : nullptr},
             [&]<typename T, typename W, int VEC>() {
               auto launch_rows = [&](auto kernel, bool affine) {
                 // One wave of resident blocks, each striding over rows: as few partial rows as keep every SM busy.
                 int blocks_per_sm = 0;
                 C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                     &blocks_per_sm, kernel, static_cast<int>(shape.block.x * shape.block.y), 0));
                 const int64_t blocks =
                     std::max<int64_t>(1, std::min<int64_t>(shape.row_blocks, int64_t{blocks_per_sm} * sms));
                 if (affine)
                   partial = at::empty({2, blocks * shape.block.y, cols}, input.options().dtype(at::kFloat));
                 kernel<<<blocks, shape.block, 0, stream>>>(
                     grad_output.const_data_ptr<T>(), input.const_data_ptr<T>(), ptr_or_null<T>(residual),
                     ptr_or_null<W>(weight), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                     grad_input.mutable_data_ptr<T>(),
                     grad_residual.numel() > 0 ? grad_residual.mutable_data_ptr<T>() : nullptr,
                     affine ? partial[0].mutable_data_ptr<float>() : nullptr,
                     affine ? partial[1].mutable_data_ptr<float>() : nullptr, rows, cols, inv_cols(cols), dropout);
                 C10_CUDA_KERNEL_LAUNCH_CHECK();
               };
               if constexpr (VEC == 1) {  // wide rows are vectorised (dispatch)
                 launch_rows(layer_norm_bwd_kernel<T, W, VEC, kBlockThreads>, compute_affine_grads);
               } else {
                 if (!wide) {
                   launch_rows(layer_norm_bwd_kernel<T, W, VEC, kBlockThreads>, compute_affine_grads);
                   return;
                 }
                 launch_rows(layer_norm_bwd_kernel<T, W, VEC, kMaxThreads>, false);
                 if (!compute_affine_grads) return;
                 const ColumnSumsLaunch affine = column_sums_launch(rows, cols, sms);
                 partial = at::empty({2, affine.grid.y, cols}, input.options().dtype(at::kFloat));
                 layer_norm_bwd_affine_kernel<T><<<affine.grid, dim3(kColThreads, kRowWarps), 0, stream>>>(
                     grad_output.const_data_ptr<T>(), input.const_data_ptr<T>(), ptr_or_null<T>(residual),
                     mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), partial[0].mutable_data_ptr<float>(),
                     partial[1].mutable_data_ptr<float>(), rows, cols, affine.rows_per_block, dropout);
                 C10_CUDA_KERNEL_LAUNCH_CHECK();
               }
             });
  }
  if (!compute_affine_grads) {
    at::Tensor empty = at::empty({0}, input.options().dtype(at::kFloat));
    return {grad_input, grad_residual, empty, empty.clone()};
  }
  if (rows == 0)
    return {grad_input, grad_residual, at::zeros({cols}, partial.options()), at::zeros({cols}, partial.options())};
  return {grad_input, grad_residual, partial[0].sum(0), partial[1].sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fastgpt
