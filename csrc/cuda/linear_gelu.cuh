// The element-wise CUDA kernels of linear_gelu (the matrix products are cuBLASLt's, in linear_gelu.cu): the
// activation and output dropout after a product, and the backward through them with the bias gradient. Without
// ATen, so that tests/cuda_emulator/linear_gelu.cpp runs them on the CPU (FASTGPT_PTX_EMULATION).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef FASTGPT_PTX_EMULATION
#include "emulator.h"
#endif

#include "activation.h"
#include "column_sums.cuh"

namespace fastgpt {
namespace linear_gelu {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

// out = dropout(act(pre)) over (M, N), pre = x W^T + b; out may alias pre (when pre is not kept).
template <typename scalar_t, Activation A>
__global__ void forward_epilogue_kernel(const scalar_t* pre, scalar_t* out, int64_t rows, int64_t cols, float p,
                                        float scale, uint64_t seed) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols, col = i - row * cols;
    float y = activation_forward<A>(static_cast<float>(pre[i]));
    if (p > 0.f) y *= dropout_factor(seed, row, col, p, scale);
    out[i] = static_cast<scalar_t>(y);
  }
}

// dpre = grad * dropout * act'(pre) over (M, N), and the partial column sums of dpre (the bias gradient) over the
// grid of column_sums.cuh, unless partial is null. dpre may alias grad or pre.
template <typename scalar_t, Activation A>
__global__ void backward_epilogue_kernel(const scalar_t* grad, const scalar_t* pre, scalar_t* dpre, float* partial,
                                         int64_t rows, int64_t cols, int64_t rows_per_block, float p, float scale,
                                         uint64_t seed) {
  __shared__ float sums[kRowWarps][kColsPerBlock];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kColsPerBlock) + threadIdx.x;
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  float sum = 0.f;
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowWarps) {
      const int64_t i = row * cols + col;
      float g = static_cast<float>(grad[i]);
      if (p > 0.f) g *= dropout_factor(seed, row, col, p, scale);
      if constexpr (A != Activation::kNone) {
        g *= activation_grad<A>(static_cast<float>(pre[i]));
      }
      dpre[i] = static_cast<scalar_t>(g);
      sum += g;
    }
  }
  if (partial == nullptr) return;
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
    for (int w = 0; w < kRowWarps; ++w) total += sums[w][threadIdx.x];
    partial[blockIdx.y * cols + col] = total;
  }
}

}  // namespace linear_gelu
}  // namespace fastgpt
