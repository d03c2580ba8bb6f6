// LayerNorm (optionally fused with dropout and a residual add) on CUDA: forward and backward over contiguous (M, N)
// rows. The maths is in fastgpt/ops/layer_norm.py. Dropout keeps x[row, col] iff
// philox_uniform(seed; col, row, 0, 1) >= p (csrc/philox.h), drawn again in the backward pass.
//
// Layout: a block holds ROWS rows of THREADS_PER_ROW threads each (blockDim = (THREADS_PER_ROW, ROWS)). Thread t of
// a row owns the vectors t, t + THREADS_PER_ROW, ... of VEC elements (16-byte loads when the row length allows), at
// most kCache floats, which stay in registers between the statistics and the output: the row is read once.
// Reductions: warp shuffles, then one shared-memory slot per warp when a row spans several warps.
// Backward: the grid (one wave of resident blocks) strides over rows; each thread keeps its columns' partial sums of
// dy * xhat and dy in registers across the rows it visits, and writes them once, as one row of a
// (gridDim.x * ROWS, N) float32 buffer that is summed afterwards: deterministic, no atomics. Rows wider than
// kWideRow need up to kMaxThreads threads, which leaves 64 registers a thread: too few for those sums besides the
// row, so there a column kernel (layer_norm_bwd_affine_kernel) forms them instead, from one more read of the rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "philox.h"

namespace fastgpt {
namespace {

constexpr int kCache = 16;       // floats of the row each thread keeps in registers
constexpr int kMaxThreads = 1024;  // so the widest row is kCache * kMaxThreads = 16384 (MAX_N in the op)
constexpr int kBlockThreads = 256;
constexpr int kWideRow = kCache * kBlockThreads;  // rows up to this width take one block of <= kBlockThreads threads

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<float>(pack.v[k]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

struct Dropout {
  float p;      // 0: no dropout
  float scale;  // 1 / (1 - p)
  uint64_t seed;
  // Applies dropout to the VEC elements of `row` starting at column `col`.
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t row, int col, float (&v)[VEC]) const {
    if (p <= 0.f) return;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      v[k] = philox_uniform(seed, static_cast<uint32_t>(col + k), static_cast<uint32_t>(row), 0u, 1u) >= p
                 ? v[k] * scale
                 : 0.f;
  }
};

// Sum over the threads of one row (threadIdx.x), for every row of the block at once. `shared` holds one float per
// warp of the block; all threads of the block must call this.
__device__ __forceinline__ float row_sum(float value, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return value;
  const int warp = threadIdx.x / 32, first = threadIdx.y * warps_per_row;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[first + warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += shared[first + w];
  return total;
}

// MAX_THREADS: the block size it is launched with at most (kBlockThreads, or kMaxThreads for rows wider than
// kWideRow, which leaves 64 registers a thread).
template <typename T, typename W, int VEC, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS, 1)
    layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const W* __restrict__ weight, const W* __restrict__ bias, T* __restrict__ y,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                                      int cols, float inv_cols, float eps, Dropout dropout) {
  constexpr int kItems = kCache / VEC;
  __shared__ float shared[kMaxThreads / 32];  // one per warp
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t base = valid ? row * cols : 0;
  const T* x_row = x + base;
  const T* residual_row = residual != nullptr ? residual + base : nullptr;
  float z[kItems][VEC];
  float local = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < cols) {
      load<VEC>(x_row + col, z[i]);
      dropout.apply<VEC>(row, col, z[i]);
      if (residual_row != nullptr) {
        float r[VEC];
        load<VEC>(residual_row + col, r);
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[i][k] += r[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) local += z[i][k];
    }
  }
  const float mean = row_sum(local, shared) * inv_cols;
  local = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < cols) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[i][k] -= mean;
        local += z[i][k] * z[i][k];
      }
    }
  }
  const float rstd = rsqrtf(row_sum(local, shared) * inv_cols + eps);
  if (!valid) return;
  T* y_row = y + base;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < cols) {
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out[k] = z[i][k] * rstd;
        if (weight != nullptr) out[k] *= static_cast<float>(weight[col + k]);
        if (bias != nullptr) out[k] += static_cast<float>(bias[col + k]);
      }
      store<VEC>(y_row + col, out);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// MAX_THREADS as in layer_norm_fwd_kernel; above kBlockThreads it does not form dweight and dbias (dw_partial must
// be null).
template <typename T, typename W, int VEC, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS) layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                      const T* __restrict__ residual, const W* __restrict__ weight,
                                      const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                      T* __restrict__ dx, T* __restrict__ dz, float* __restrict__ dw_partial,
                                      float* __restrict__ db_partial, int64_t rows, int cols, float inv_cols,
                                      Dropout dropout) {
  constexpr int kItems = kCache / VEC;
  // Narrow rows keep g = dy * weight and the dweight, dbias partial sums in registers; wide rows (64 registers a
  // thread) read dy again for g and leave dweight, dbias to layer_norm_bwd_affine_kernel.
  constexpr bool kAffine = MAX_THREADS <= kBlockThreads;
  constexpr int kKept = kAffine ? kItems : 1;
  __shared__ float shared[kMaxThreads / 32];  // one per warp
  float dw[kKept][VEC] = {}, db[kKept][VEC] = {};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Every thread of the block runs the same number of iterations, so that row_sum's barriers line up.
  const int64_t iterations = (rows + stride - 1) / stride;
  for (int64_t it = 0; it < iterations; ++it) {
    const int64_t row = first_row + it * stride;
    const bool valid = row < rows;
    const int64_t base = valid ? row * cols : 0;
    const T* x_row = x + base;
    const T* dy_row = dy + base;
    const float mean = valid ? mean_in[row] : 0.f, rstd = valid ? rstd_in[row] : 0.f;
    float xhat[kItems][VEC], g[kKept][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * blockDim.x + threadIdx.x) * VEC;
      if (valid && col < cols) {
        float d[VEC];
        load<VEC>(x_row + col, xhat[i]);
        dropout.apply<VEC>(row, col, xhat[i]);
        if (residual != nullptr) {
          float r[VEC];
          load<VEC>(residual + base + col, r);
#pragma unroll
          for (int k = 0; k < VEC; ++k) xhat[i][k] += r[k];
        }
        load<VEC>(dy_row + col, d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xhat[i][k] = (xhat[i][k] - mean) * rstd;
          const float gk = weight != nullptr ? d[k] * static_cast<float>(weight[col + k]) : d[k];
          sum_g += gk;
          sum_gx += gk * xhat[i][k];
          if constexpr (kAffine) {
            g[i][k] = gk;
            dw[i][k] += d[k] * xhat[i][k];
            db[i][k] += d[k];
          }
        }
      }
    }
    const float mean_g = row_sum(sum_g, shared) * inv_cols;
    const float mean_gx = row_sum(sum_gx, shared) * inv_cols;
    if (!valid) continue;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * blockDim.x + threadIdx.x) * VEC;
      if (col < cols) {
        float out[VEC];
        if constexpr (kAffine) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = g[i][k];
        } else {
          load<VEC>(dy_row + col, out);
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            if (weight != nullptr) out[k] *= static_cast<float>(weight[col + k]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (out[k] - mean_g - xhat[i][k] * mean_gx) * rstd;
        if (dz != nullptr) store<VEC>(dz + base + col, out);  // dresidual, kept apart only under dropout
        dropout.apply<VEC>(row, col, out);
        store<VEC>(dx + base + col, out);
      }
    }
  }
  if constexpr (kAffine) {
    if (dw_partial == nullptr) return;
    const int64_t partial_row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * blockDim.x + threadIdx.x) * VEC;
      if (col < cols) {
        store<VEC>(dw_partial + partial_row * cols + col, dw[i]);
        store<VEC>(db_partial + partial_row * cols + col, db[i]);
      }
    }
  }
}

// dweight and dbias partial sums for rows wider than kWideRow: block (x, y) covers columns [32 x, 32 x + 32) and
// rows [y rows_per_block, (y + 1) rows_per_block); each of its 8 warps walks every 8th row, then the warps' sums are
// added in a fixed order into row y of the (gridDim.y, N) partial buffers: deterministic, no atomics. z and xhat
// are formed exactly as in layer_norm_bwd_kernel.
constexpr int kColsPerBlock = 32, kRowWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kColsPerBlock * kRowWarps)
    layer_norm_bwd_affine_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
                                 const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                 float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows,
                                 int cols, int64_t rows_per_block, Dropout dropout) {
  __shared__ float sums[2][kRowWarps][kColsPerBlock];
  const int col = blockIdx.x * kColsPerBlock + threadIdx.x;
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  float dw = 0.f, db = 0.f;
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowWarps) {
      const int64_t i = row * cols + col;
      float z[1] = {static_cast<float>(x[i])};
      dropout.apply<1>(row, col, z);
      if (residual != nullptr) z[0] += static_cast<float>(residual[i]);
      const float d = static_cast<float>(dy[i]);
      dw += d * ((z[0] - mean_in[row]) * rstd_in[row]);
      db += d;
    }
  }
  sums[0][threadIdx.y][threadIdx.x] = dw;
  sums[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float dw_total = 0.f, db_total = 0.f;
    for (int w = 0; w < kRowWarps; ++w) {
      dw_total += sums[0][w][threadIdx.x];
      db_total += sums[1][w][threadIdx.x];
    }
    dw_partial[static_cast<int64_t>(blockIdx.y) * cols + col] = dw_total;
    db_partial[static_cast<int64_t>(blockIdx.y) * cols + col] = db_total;
  }
}

struct Launch {
  dim3 block;
  int64_t row_blocks;
};

// Threads per row: enough that each holds at most kCache floats, a multiple of a warp; rows per block fill
// kBlockThreads.
Launch launch_shape(int64_t rows, int cols) {
  const int per_row = std::min(kMaxThreads, std::max(32, ((cols + kCache - 1) / kCache + 31) / 32 * 32));
  const int rows_per_block = std::max(1, kBlockThreads / per_row);
  return {dim3(per_row, rows_per_block), (rows + rows_per_block - 1) / rows_per_block};
}

// 1 / N, rounded once: the kernels take means as products with it, since an IEEE division's slow-path call
// would cost them registers and a stack frame.
float inv_cols(int cols) { return 1.f / static_cast<float>(cols); }

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

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  if (p <= 0.0) return {0.f, 1.f, 0};
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->is_cpu(),
              "layer_norm: dropout needs seed, an int64 CPU scalar tensor");
  const float p_float = static_cast<float>(p);
  return {p_float, 1.f / (1.f - p_float), static_cast<uint64_t>(seed->item<int64_t>())};
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
  const Dropout dropout = make_dropout(dropout_p, seed);
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
  const Dropout dropout = make_dropout(dropout_p, seed);
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
                 // About 4 column kernel blocks per SM; every block covers a whole number of 8-row steps.
                 const int64_t col_blocks = (cols + kColsPerBlock - 1) / kColsPerBlock;
                 const int64_t row_blocks =
                     std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, 4 * sms / col_blocks + 1));
                 const int64_t rows_per_block =
                     ((rows + row_blocks - 1) / row_blocks + kRowWarps - 1) / kRowWarps * kRowWarps;
                 const int64_t used_row_blocks = (rows + rows_per_block - 1) / rows_per_block;
                 partial = at::empty({2, used_row_blocks, cols}, input.options().dtype(at::kFloat));
                 layer_norm_bwd_affine_kernel<T><<<dim3(col_blocks, used_row_blocks), dim3(kColsPerBlock, kRowWarps), 0,
                                                   stream>>>(
                     grad_output.const_data_ptr<T>(), input.const_data_ptr<T>(), ptr_or_null<T>(residual),
                     mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), partial[0].mutable_data_ptr<float>(),
                     partial[1].mutable_data_ptr<float>(), rows, cols, rows_per_block, dropout);
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
