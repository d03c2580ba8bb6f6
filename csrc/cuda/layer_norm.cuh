// LayerNorm (optionally fused with dropout and a residual add) on CUDA: forward and backward over contiguous (M, N)
// rows. The maths is in fastgpt/ops/layer_norm.py. The dropout on x is elementwise.cuh's, drawn again in the
// backward pass.
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
//
// This header holds the kernels and their launch geometry, and nothing of ATen: layer_norm.cu launches them, and
// tests/cuda_emulator/layer_norm.cpp runs them on the CPU (FASTGPT_PTX_EMULATION, against tests/cuda_emulator).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef FASTGPT_PTX_EMULATION
#include "emulator.h"
#endif

#include "elementwise.cuh"

namespace fastgpt {
namespace layer_norm {

constexpr int kCache = 16;       // floats of the row each thread keeps in registers
constexpr int kMaxThreads = 1024;  // so the widest row is kCache * kMaxThreads = 16384 (MAX_N in the op)
constexpr int kBlockThreads = 256;
constexpr int kWideRow = kCache * kBlockThreads;  // rows up to this width take one block of <= kBlockThreads threads

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
    }
  }
  // The mean as z[0] + mean(z - z[0]): exact for a constant row, whose xhat must then be exactly 0 rather than the
  // rounding of sum(z) / cols times rstd = 1 / sqrt(eps). z[0] is thread 0's first element; a sum hands it to
  // every thread of the row (exactly: the other terms are 0) with the reduction already there.
  const float pivot = row_sum(threadIdx.x == 0 && valid ? z[0][0] : 0.f, shared);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < cols) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) local += z[i][k] - pivot;
    }
  }
  const float mean = pivot + row_sum(local, shared) * inv_cols;
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
    uint32_t kept = 0u;  // bit i * VEC + k: element k of vector i survived dropout
    static_assert(kItems * VEC <= 32, "a bit of `kept` per cached element");
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (i * blockDim.x + threadIdx.x) * VEC;
      if (valid && col < cols) {
        float d[VEC];
        load<VEC>(x_row + col, xhat[i]);
        if (dropout.p > 0.f) {
          const uint32_t bits = dropout.keep_bits<VEC>(row, col);
          kept |= bits << (i * VEC);
          dropout.apply<VEC>(bits, xhat[i]);
        }
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
        if (dropout.p > 0.f) dropout.apply<VEC>(kept >> (i * VEC), out);
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

// dweight and dbias partial sums for rows wider than kWideRow, over the grid of elementwise.cuh: row y of the
// (gridDim.y, N) buffers holds block row y's sums. z and xhat are formed exactly as in layer_norm_bwd_kernel. Wide
// rows are vectorised (layer_norm.cu), so a thread's quad is whole and aligned.
template <typename T>
__global__ void __launch_bounds__(kColThreads * kRowWarps)
    layer_norm_bwd_affine_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
                                 const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                 float* __restrict__ dw_partial, float* __restrict__ db_partial, int64_t rows,
                                 int cols, int64_t rows_per_block, Dropout dropout) {
  __shared__ float shared[2][kRowWarps][kQuad][kColThreads];
  const int64_t col = column_sums_col();
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  float sums[2][kQuad] = {};  // dweight, dbias
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowWarps) {
      const int64_t i = row * cols + col;
      float z[kQuad], d[kQuad];
      load<kQuad>(x + i, z);
      dropout.apply<kQuad>(row, col, z);
      if (residual != nullptr) {
        float r[kQuad];
        load<kQuad>(residual + i, r);
#pragma unroll
        for (int k = 0; k < kQuad; ++k) z[k] += r[k];
      }
      load<kQuad>(dy + i, d);
      const float mean = mean_in[row], rstd = rstd_in[row];
#pragma unroll
      for (int k = 0; k < kQuad; ++k) {
        sums[0][k] += d[k] * ((z[k] - mean) * rstd);
        sums[1][k] += d[k];
      }
    }
  }
  write_column_sums<2>(sums, shared, {dw_partial, db_partial}, cols);
}

struct Launch {
  dim3 block;
  int64_t row_blocks;
};

// Threads per row: enough that each holds at most kCache floats, a multiple of a warp; rows per block fill
// kBlockThreads.
inline Launch launch_shape(int64_t rows, int cols) {
  const int per_row = std::min(kMaxThreads, std::max(32, ((cols + kCache - 1) / kCache + 31) / 32 * 32));
  const int rows_per_block = std::max(1, kBlockThreads / per_row);
  return {dim3(per_row, rows_per_block), (rows + rows_per_block - 1) / rows_per_block};
}

// 1 / N, rounded once: the kernels take means as products with it, since an IEEE division's slow-path call
// would cost them registers and a stack frame.
inline float inv_cols(int cols) { return 1.f / static_cast<float>(cols); }

}  // namespace layer_norm
}  // namespace fastgpt
