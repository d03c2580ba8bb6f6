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
#include "elementwise.cuh"

namespace fastgpt {
namespace linear_gelu {

constexpr int kThreads = 256;

// The forward's grid: a thread per quad of a row (rows of `cols` elements hold ceil(cols / kQuad) quads), in at most
// 65535 * 8 blocks that stride over the rest.
inline int forward_blocks(int64_t rows, int64_t cols) {
  const int64_t quads = rows * ((cols + kQuad - 1) / kQuad);
  return static_cast<int>(std::min<int64_t>((quads + kThreads - 1) / kThreads, 65535LL * 8));
}

// out = dropout(act(pre)) over (M, N), pre = x W^T + b, a quad of a row per thread; out may alias pre (when pre is
// not kept). vec: quad_aligned for pre and out.
template <typename scalar_t, Activation A>
__global__ void forward_epilogue_kernel(const scalar_t* pre, scalar_t* out, int64_t rows, int64_t cols, bool vec,
                                        Dropout dropout) {
  const int64_t quads_per_row = (cols + kQuad - 1) / kQuad, quads = rows * quads_per_row;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = q / quads_per_row, col = (q - row * quads_per_row) * kQuad, i = row * cols + col;
    const int n = cols - col < kQuad ? static_cast<int>(cols - col) : kQuad;
    float y[kQuad];
    load_quad(pre + i, n, vec, y);
#pragma unroll
    for (int k = 0; k < kQuad; ++k) y[k] = activation_forward<A>(y[k]);
    dropout.apply<kQuad>(row, col, y);
    store_quad(out + i, n, vec, y);
  }
}

// dpre = grad * dropout * act'(pre) over (M, N), and the partial column sums of dpre (the bias gradient) over the
// grid of elementwise.cuh, unless partial is null. dpre may alias grad or pre. vec: quad_aligned for all three.
template <typename scalar_t, Activation A>
__global__ void backward_epilogue_kernel(const scalar_t* grad, const scalar_t* pre, scalar_t* dpre, float* partial,
                                         int64_t rows, int64_t cols, int64_t rows_per_block, bool vec,
                                         Dropout dropout) {
  __shared__ float shared[1][kRowWarps][kQuad][kColThreads];
  const int64_t col = column_sums_col();
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  float sums[1][kQuad] = {};
  if (col < cols) {
    const int n = cols - col < kQuad ? static_cast<int>(cols - col) : kQuad;
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowWarps) {
      const int64_t i = row * cols + col;
      float g[kQuad];  // the columns past n load as 0 and stay 0
      load_quad(grad + i, n, vec, g);
      dropout.apply<kQuad>(row, col, g);
      if constexpr (A != Activation::kNone) {
        float x[kQuad];
        load_quad(pre + i, n, vec, x);
#pragma unroll
        for (int k = 0; k < kQuad; ++k) g[k] *= activation_grad<A>(x[k]);
      }
      store_quad(dpre + i, n, vec, g);
#pragma unroll
      for (int k = 0; k < kQuad; ++k) sums[0][k] += g[k];
    }
  }
  if (partial != nullptr) write_column_sums<1>(sums, shared, {partial}, cols);
}

}  // namespace linear_gelu
}  // namespace fastgpt
