// What the memory-bound CUDA kernels (LayerNorm, linear_gelu's epilogues) share: vector loads and stores of a row's
// elements, the element-wise dropout, and the grid of the kernels that sum over rows per column.
//
// Dropout keeps element (row, col) of a row-major (M, N) tensor iff u >= p, u = word col % 4 of
// Philox(seed; col / 4, row, 0, 1) (csrc/philox.h): one call serves four consecutive columns, and the backward pass
// draws the same call again instead of storing a mask.
//
// Column sums (layer_norm_bwd_affine_kernel's dweight and dbias, linear_gelu's bias gradient), without atomics:
// block (x, y) of (kColThreads, kRowWarps) threads covers columns [kColsPerBlock x, kColsPerBlock (x + 1)), kQuad
// consecutive ones a thread (one Philox call for their dropout, one vector load where the row allows it), and rows
// [y rows_per_block, (y + 1) rows_per_block), each warp walking every kRowWarps-th row. The warps' sums are then added
// in a fixed order into row y of a (grid.y, N) float32 buffer of partial sums, summed afterwards: deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#ifdef FASTGPT_PTX_EMULATION
#include "emulator.h"
#endif

#include "philox.h"

namespace fastgpt {

constexpr int kQuad = 4;  // consecutive elements of a row a thread takes together: the words of one Philox call
constexpr int kColThreads = 32, kRowWarps = 8, kColsPerBlock = kColThreads * kQuad;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive elements in one load or store: p must be aligned to VEC elements.
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

// The first n (<= kQuad) of the kQuad elements from p, the rest 0; one load where `vec` (every row a whole number
// of quads, every tensor aligned to one: quad_aligned) says p is aligned and n is kQuad.
template <typename T>
__device__ __forceinline__ void load_quad(const T* p, int n, bool vec, float (&out)[kQuad]) {
  if (vec) return load<kQuad>(p, out);
#pragma unroll
  for (int k = 0; k < kQuad; ++k) out[k] = k < n ? static_cast<float>(p[k]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store_quad(T* p, int n, bool vec, const float (&in)[kQuad]) {
  if (vec) return store<kQuad>(p, in);
#pragma unroll
  for (int k = 0; k < kQuad; ++k)
    if (k < n) p[k] = static_cast<T>(in[k]);
}

// Whether rows of `cols` elements of T at these pointers (null ones ignored) can be read a quad at a time.
template <typename T>
inline bool quad_aligned(int64_t cols, std::initializer_list<const void*> ptrs) {
  bool ok = cols % kQuad == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kQuad) == 0;
  return ok;
}

// The element-wise dropout above.
struct Dropout {
  float p;      // 0: no dropout
  float scale;  // 1 / (1 - p)
  uint64_t seed;
  // Bit k is set iff element col + k of `row` is kept, for the VEC elements from column `col` (a multiple of VEC):
  // one Philox call per four of them (fewer than four share one call, whose words col % 4 onwards they take).
  template <int VEC>
  __device__ __forceinline__ uint32_t keep_bits(int64_t row, int64_t col) const {
    constexpr int kCalls = VEC >= 4 ? VEC / 4 : 1, kPerCall = VEC >= 4 ? 4 : VEC;
    uint32_t bits = 0u;
#pragma unroll
    for (int call = 0; call < kCalls; ++call) {
      uint32_t words[4];
      philox(seed, static_cast<uint32_t>(col >> 2) + call, static_cast<uint32_t>(row), 0u, 1u, words);
#pragma unroll
      for (int k = 0; k < kPerCall; ++k) {
        const uint32_t word = VEC >= 4 ? words[k] : pick_word(words, static_cast<uint32_t>(col + k));
        bits |= static_cast<uint32_t>(word_uniform(word) >= p) << (call * kPerCall + k);
      }
    }
    return bits;
  }
  // v[k] <- v[k] / (1 - p) where bit k of `bits` is set, else 0.
  template <int VEC>
  __device__ __forceinline__ void apply(uint32_t bits, float (&v)[VEC]) const {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (bits >> k) & 1u ? v[k] * scale : 0.f;
  }
  // Dropout of the VEC elements of `row` from column `col` (none when p is 0).
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t row, int64_t col, float (&v)[VEC]) const {
    if (p > 0.f) apply<VEC>(keep_bits<VEC>(row, col), v);
  }
};

// The dropout of rate p (0: none) drawn from `seed`.
inline Dropout make_dropout(double p, uint64_t seed) {
  if (p <= 0.0) return {0.f, 1.f, 0};
  const float p_float = static_cast<float>(p);
  return {p_float, 1.f / (1.f - p_float), seed};
}

struct ColumnSumsLaunch {
  dim3 grid;  // (column blocks, partial rows); blocks of dim3(kColThreads, kRowWarps)
  int64_t rows_per_block;
};

// About 4 blocks per SM in all; every block covers a whole number of kRowWarps-row steps. With no rows, one partial
// row that nothing writes: callers launch nothing then and return zeros.
inline ColumnSumsLaunch column_sums_launch(int64_t rows, int64_t cols, int sms) {
  const int64_t col_blocks = std::max<int64_t>(1, (cols + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, 4 * sms / col_blocks + 1));
  const int64_t rows_per_block = ((rows + row_blocks - 1) / row_blocks + kRowWarps - 1) / kRowWarps * kRowWarps;
  const int64_t partial_rows = rows_per_block > 0 ? (rows + rows_per_block - 1) / rows_per_block : 1;
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(partial_rows)), rows_per_block};
}

// The first column of this thread's quad in a column-sums block.
__device__ __forceinline__ int64_t column_sums_col() {
  return (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * kQuad;
}

// The end of a column-sums block: adds the warps' Q quantities (local[q][k]: this thread's sum over its rows for
// column column_sums_col() + k) in warp order and writes quantity q of the block's columns below `cols` to
// partial[q][blockIdx.y * cols + col]. Every thread of the block calls it; `shared` is the block's.
template <int Q>
__device__ __forceinline__ void write_column_sums(const float (&local)[Q][kQuad],
                                                  float (&shared)[Q][kRowWarps][kQuad][kColThreads],
                                                  float* const (&partial)[Q], int64_t cols) {
  static_assert(Q * kColsPerBlock <= kColThreads * kRowWarps, "a thread per quantity and column");
#pragma unroll
  for (int q = 0; q < Q; ++q)
#pragma unroll
    for (int k = 0; k < kQuad; ++k) shared[q][threadIdx.y][k][threadIdx.x] = local[q][k];  // by lane: no conflicts
  __syncthreads();
  // Thread t adds quantity t / kColsPerBlock of the block's column c = kQuad lane + k, stored at [k][lane].
  const int t = threadIdx.y * kColThreads + threadIdx.x;
  const int q = t / kColsPerBlock, k = t / kColThreads % kQuad, lane = t % kColThreads;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColThreads + lane) * kQuad + k;
  if (q >= Q || col >= cols) return;
  float total = 0.f;
  for (int w = 0; w < kRowWarps; ++w) total += shared[q][w][k][lane];
  float* out = partial[0];  // partial[q] by selects: indexing the array with q would put it in local memory
#pragma unroll
  for (int j = 1; j < Q; ++j) out = j == q ? partial[j] : out;
  out[static_cast<int64_t>(blockIdx.y) * cols + col] = total;
}

}  // namespace fastgpt
