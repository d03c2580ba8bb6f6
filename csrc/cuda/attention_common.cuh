// Building blocks shared by the CUDA attention kernels (attention_fwd.cuh, attention_bwd.cuh): the launch
// parameters, the swizzled shared memory layout, warp-level matrix products on register fragments, score masking
// and the dropout RNG. The hardware primitives they rest on (cp.async, ldmatrix, mma.sync m16n8k16) are in ptx.cuh.
//
// Fragment layout (PTX ISA, mma.m16n8k16, f16/bf16 inputs, f32 accumulators). A warp multiplies a 16 x 16 A by a
// 16 x 8 B into a 16 x 8 C. Lane l is in quad-row g = l / 4 and column pair t = l % 4:
//   A (16 x 16, row-major)  a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                           a[2] = A[g][2t+8..+9]    a[3] = A[g+8][2t+8..+9]        (two 16-bit values per reg)
//   B (16 x 8, "col")       b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..+9][g]
//   C (16 x 8, f32)         c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]
// A warp tile of 16 x N accumulators is kept as float acc[N / 8][4] (one C fragment per 8 columns), so lane l
// holds rows g and g + 8 and, in n-tile nt, columns nt * 8 + 2t + {0, 1}: element e of acc[nt] sits at row
// g + 8 * (e / 2), column nt * 8 + 2t + e % 2. The C layout of two adjacent n-tiles is exactly the A layout of one
// 16-wide k-step, so P = softmax(S) and dS feed the next product straight from registers (acc_to_a).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

// The hardware primitives (dynamic shared memory, cp.async, ldmatrix, mma) and the 16-bit types. With
// FASTGPT_PTX_EMULATION, a host compiler builds the kernels against the emulator of tests/cuda_emulator instead.
#ifdef FASTGPT_PTX_EMULATION
#include "ptx_emulated.h"
#else
#include "ptx.cuh"
#endif

#include "philox.h"

namespace fastgpt {
namespace attention {

constexpr int kWarps = 4;  // every kernel: 4 warps, each owning 16 rows of the block's tile
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
// The floor of finite additive-mask entries: far below any score, and still finite (-2.9e38) once scaled by
// log2(e). Hugging Face masks hold the dtype's minimum, which times log2(e) overflows to -inf: a row hidden that way
// would become a fully masked one (output 0) where PyTorch averages the values. -inf entries stay -inf.
constexpr float kMaskFloor = -2.0e38f;
constexpr float kLn2 = 0.6931471805599453f;

// Causal and an explicit mask are exclusive in the op (fastgpt/ops/attention.py rejects both at once).
enum class MaskMode { kNone, kCausal, kTensor };

struct Strides {  // element strides of a (B, heads, L, D) tensor whose last dim is contiguous
  int64_t b, h, l;
};

// attn_mask expanded to (B, H, Lq, Lk) by strides (0 strides where it broadcasts): bool (stored as one byte,
// nonzero = may attend) or additive in the inputs' dtype.
struct MaskView {
  const void* ptr;
  int64_t stride_b, stride_h, stride_i, stride_j;
  bool is_bool;
};

// Everything the four kernels read. Pointers a pass does not use are null. lse and delta are contiguous
// (B, H, Lq) float32; the dtype T of the 16-bit tensors is the kernels' template parameter.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* out;       // forward output (the backward pass reads it for delta)
  const void* grad_out;  // dO
  void* out_w;           // forward: where out is written
  float* lse;            // natural-log log-sum-exp of each query row's scaled, masked scores; -inf: no key
  float* delta;          // rowsum(dO * O), written by the preprocess kernel
  void* dq;
  void* dk;
  void* dv;
  Strides q_st, k_st, v_st, out_st, do_st, dq_st, dk_st, dv_st;
  MaskView mask;
  int batch, heads, kv_heads, group;  // group = heads / kv_heads: query head h reads kv head h / group
  int len_q, len_k;
  float scale;         // softmax scale (the op's `scale`)
  float scale_log2;    // scale * log2(e): scores go straight to the exp2 domain
  float dropout_p;     // float32, as the Triton kernel and the reference compare it
  float dropout_scale; // 1 / (1 - dropout_p)
  uint64_t seed;              // Philox key: the int64 seed's bits
};

// ---------------------------------------------------------------------------------------------------------------
// 16-bit element types: packing two floats into one 32-bit register and reading one element.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 only");
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);  // lo lands in the low 16 bits: the lower column index
    bits = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    bits = *reinterpret_cast<const uint32_t*>(&h);
  }
  return bits;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(x);
  else
    return __bfloat162float(x);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory tiles: ROWS x COLS 16-bit elements stored as swizzle atoms of 8 rows x 64 columns (1024 bytes),
// atom (row / 8, col / 64) at atom index (row / 8) * (COLS / 64) + col / 64. Inside an atom each row is 128 bytes,
// eight chunks of 16 bytes, and chunk c of row r is stored at chunk position c ^ (r % 8). This is the canonical
// "128B swizzle" layout of the sm_90 wgmma operands (PTX ISA, "Shared Memory Matrix Layout"; its hardware swizzle
// XORs address bits 4-6 with bits 7-9, so atoms must sit at 1024-byte boundaries, see dynamic_smem), read there
// K-major by the score products and MN-major as the B of the products that take A from registers; for COLS = 64
// it is simply a row-major tile with the chunks of each row permuted. ldmatrix reads one chunk from each of 8
// consecutive rows of an atom: the XOR puts those 8 chunks in 8 different 16-byte bank groups, so neither ldmatrix
// nor the 16-byte cp.async stores conflict.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kAtomRows = 8, kAtomCols = 64, kAtomBytes = 1024;

template <int COLS>
__device__ __forceinline__ int swizzle(int row, int col) {  // col: a multiple of 8
  static_assert(COLS % kAtomCols == 0, "whole atoms across the tile");
  // (row / 8 * (COLS / 64) + col / 64) * 512 + row % 8 * 64, written so that a 64-column tile (one atom per 8 rows)
  // is plainly row * 64: with a signed row the compiler would not fold the division back, and the extra integer
  // work cost the sm_80 forward kernel with dropout a register spill.
  return row * kAtomCols + (row / kAtomRows) * (COLS - kAtomCols) * kAtomRows +
         (col / kAtomCols) * (kAtomRows * kAtomCols) + ((((col % kAtomCols) >> 3) ^ (row & 7)) << 3);
}

// sm_90a wgmma matrix descriptors of operands in such tiles (PTX ISA, "Matrix Descriptor Format"): the start
// address, the leading and stride byte offsets (each >> 4), base offset 0 (atoms at 1024-byte boundaries) and
// swizzle mode 1 (128 bytes) in bits 62-63. One product reads 16 of K.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t start, uint32_t leading_bytes, uint32_t stride_bytes) {
  return uint64_t{(start & 0x3ffffu) >> 4} | uint64_t{leading_bytes >> 4} << 16 | uint64_t{stride_bytes >> 4} << 32 |
         uint64_t{1} << 62;
}
// A K-major operand: its rows (M or N) are the tile's rows, K runs along the columns (Q and K in S = Q K^T). The
// k-step at column k0 starts k0 % 64 elements into the atoms of column block k0 / 64 (the hardware's swizzle of the
// address then finds each chunk, as swizzle() placed it); 8-row groups are one atom row apart (the stride byte
// offset); the leading byte offset is unused by swizzled K-major layouts.
template <int COLS, typename T>
__device__ __forceinline__ uint64_t desc_k_major(const T* tile, int k0) {
  const uint32_t start = smem_addr(tile) + (k0 / kAtomCols) * kAtomBytes + (k0 % kAtomCols) * 2;
  return wgmma_desc(start, 16, (COLS / kAtomCols) * kAtomBytes);
}
// An MN-major operand: K runs along the tile's rows and N along its columns (V in O = P V). The k-step at row k0
// starts at atom row k0 / 8; 64-column blocks are one atom apart (the leading byte offset), 8-row groups one atom
// row apart (the stride byte offset).
template <int COLS, typename T>
__device__ __forceinline__ uint64_t desc_mn_major(const T* tile, int k0) {
  const uint32_t start = smem_addr(tile) + (k0 / kAtomRows) * (COLS / kAtomCols) * kAtomBytes;
  return wgmma_desc(start, kAtomBytes, (COLS / kAtomCols) * kAtomBytes);
}

// Copies rows [row0, row0 + ROWS) of a (len, COLS) matrix (row stride `stride` elements, last dim contiguous,
// rows 16-byte aligned) into a swizzled tile; rows at or past `len` are zero-filled, so that products over them
// give 0 and never NaN. All kThreads threads call it; the caller commits and waits.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int row0, int len) {
  constexpr int kChunksPerRow = COLS / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int chunk = threadIdx.x; chunk < kChunks; chunk += kThreads) {
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
    const bool valid = row0 + row < len;
    const T* from = valid ? src + static_cast<int64_t>(row0 + row) * stride + col : src;  // src: a valid address
    cp_async_16(tile + swizzle<COLS>(row, col), from, valid);
  }
}

// A fragment of the 16 x 16 block at (row0, col0) of a row-major tile.
template <int COLS, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x & 31, matrix = lane >> 3;
  // matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]
  ldmatrix_x4(a, tile + swizzle<COLS>(row0 + (lane & 7) + (matrix & 1) * 8, col0 + (matrix >> 1) * 8));
}

// B fragments of two adjacent n-tiles (n0, n0 + 8) for the k-step at k0. kTrans = false: the tile stores B
// transposed, as rows n and columns k (K or V read as [key][dim] when B = K^T or V^T); kTrans = true: the tile
// stores B itself, rows k and columns n (V or K read as [key][dim] when B = V or K). b[i] is n-tile n0 + 8 i.
template <bool kTrans, int COLS, typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[2][2], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x & 31, matrix = lane >> 3;
  uint32_t r[4];
  if constexpr (!kTrans) {
    // matrices = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    ldmatrix_x4(r, tile + swizzle<COLS>(n0 + (lane & 7) + (matrix >> 1) * 8, k0 + (matrix & 1) * 8));
  } else {
    // stored (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), transposed by ldmatrix
    ldmatrix_x4_trans(r, tile + swizzle<COLS>(k0 + (lane & 7) + (matrix & 1) * 8, n0 + (matrix >> 1) * 8));
  }
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// acc (16 x N) += A (16 x K, register fragments) * B (K x N from a tile, see load_b), B's origin at (0, 0).
template <int N, int K, bool kTrans, int COLS, typename T>
__device__ __forceinline__ void gemm_rs(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const T* b_tile) {
  static_assert(N % 16 == 0 && K % 16 == 0, "n-tiles are loaded in pairs, k in steps of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[2][2];
      load_b<kTrans, COLS>(b, b_tile, np * 16, kk * 16);
      mma_16816<T>(acc[2 * np], a[kk], b[0]);
      mma_16816<T>(acc[2 * np + 1], a[kk], b[1]);
    }
  }
}

// acc (16 x N) += A (rows a_row0.. of a tile, 16 x K) * B (K x N from a tile, see load_b).
template <int N, int K, bool kTrans, int COLS, typename T>
__device__ __forceinline__ void gemm_ss(float (&acc)[N / 8][4], const T* a_tile, int a_row0, const T* b_tile) {
  static_assert(N % 16 == 0 && K % 16 == 0, "n-tiles are loaded in pairs, k in steps of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<COLS>(a, a_tile, a_row0, kk * 16);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[2][2];
      load_b<kTrans, COLS>(b, b_tile, np * 16, kk * 16);
      mma_16816<T>(acc[2 * np], a, b[0]);
      mma_16816<T>(acc[2 * np + 1], a, b[1]);
    }
  }
}

// sm_90a (see ptx.cuh for the fence sequence). acc (the warpgroup's 64 x N, this warp's 16 rows) = A B with
// A = the 64 x K a_tile and B^T = the N x K b_tile, both K-major (S = Q K^T: A = Q, B^T = K, both [row][dim]; the
// dK/dV kernel's S^T = K Q^T: A = K, B^T = Q).
template <int N, int K, int COLS, typename T>
__device__ __forceinline__ void wgmma_issue_ss(float (&acc)[N / 8][4], const T* a_tile, const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
    wgmma_ss<T, N>(acc, desc_k_major<COLS>(a_tile, kk * 16), desc_k_major<COLS>(b_tile, kk * 16), kk > 0);
}

template <int N, int K, int COLS, typename T>
__device__ __forceinline__ void wgmma_gemm_ss(float (&acc)[N / 8][4], const T* a_tile, const T* b_tile) {
  fence_operands(acc);
  wgmma_fence();
  wgmma_issue_ss<N, K, COLS>(acc, a_tile, b_tile);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
}

// Two independent such products in one group (the backward's S and dP, or S^T and dP^T): the second chain is
// queued behind the first instead of waiting for it.
template <int N, int K, int COLS, typename T>
__device__ __forceinline__ void wgmma_gemm_ss2(float (&acc0)[N / 8][4], const T* a0_tile, const T* b0_tile,
                                               float (&acc1)[N / 8][4], const T* a1_tile, const T* b1_tile) {
  fence_operands(acc0);
  fence_operands(acc1);
  wgmma_fence();
  wgmma_issue_ss<N, K, COLS>(acc0, a0_tile, b0_tile);
  wgmma_issue_ss<N, K, COLS>(acc1, a1_tile, b1_tile);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc0);
  fence_operands(acc1);
}

// acc (64 x N) += A B with A in registers (this warp's 16 rows, K / 16 fragments) and B = the K x N b_tile, MN-major
// (O += P V: B = V, [key][dim]; dQ += dS K; dV += Pd^T dO and dK += dS^T Q: B = dO or Q, [query][dim]).
template <int N, int K, int COLS, typename T>
__device__ __forceinline__ void wgmma_gemm_rs(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                              const T* b_tile) {
  fence_operands(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) wgmma_rs<T, N>(acc, a[kk], desc_mn_major<COLS>(b_tile, kk * 16));
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc);
}

// A fragments (16 x N as the k extent of the next product) from 16 x N accumulators, rounded to T.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[N / 16][4], const float (&acc)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);          // row g,     k 2t (n-tile 2kk)
    a[kk][1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);          // row g + 8, k 2t
    a[kk][2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);  // row g,     k 2t + 8 (n-tile 2kk + 1)
    a[kk][3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);  // row g + 8, k 2t + 8
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
}

// Position of element e of n-tile nt of a warp's accumulator tile whose top-left is (row0, col0).
__device__ __forceinline__ int frag_row(int row0, int e) { return row0 + ((threadIdx.x & 31) >> 2) + (e >> 1) * 8; }
__device__ __forceinline__ int frag_col(int col0, int nt, int e) {
  return col0 + nt * 8 + (threadIdx.x & 3) * 2 + (e & 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Scores: s <- s * scale * log2(e) (+ additive mask * log2(e)), and -inf where key j is hidden from query i: past
// either sequence's end, above the causal diagonal (j > i), or masked out by a boolean mask. kTransposed: the
// fragment's rows are keys and its columns queries (the dK/dV kernel computes S^T). `check` = false promises that
// the warp's tile is inside both sequences and below the diagonal (and there is no mask tensor): a plain scale.
// ---------------------------------------------------------------------------------------------------------------
template <MaskMode kMode, bool kTransposed, typename T, int NT>
__device__ __forceinline__ void scale_and_mask(float (&s)[NT][4], const Params& p, int b, int h, int row0, int col0,
                                               bool check) {
  if (!check && kMode != MaskMode::kTensor) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale_log2;
    return;
  }
  const MaskView& m = p.mask;
  const char* mask_bh = nullptr;
  if constexpr (kMode == MaskMode::kTensor) {
    const int64_t elem = m.is_bool ? 1 : static_cast<int64_t>(sizeof(T));
    mask_bh = static_cast<const char*>(m.ptr) + (b * m.stride_b + h * m.stride_h) * elem;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = frag_row(row0, e), c = frag_col(col0, nt, e);
      const int i = kTransposed ? c : r, j = kTransposed ? r : c;
      bool visible = i < p.len_q && j < p.len_k;
      if constexpr (kMode == MaskMode::kCausal) visible = visible && j <= i;
      float v = s[nt][e] * p.scale_log2;
      if constexpr (kMode == MaskMode::kTensor) {
        // Each element is its own (cached) load; a key-padding mask (stride_i = 0) makes the rows of a tile
        // read the same Lk bytes, which stay in L1.
        if (visible) {
          const int64_t off = i * m.stride_i + j * m.stride_j;
          if (m.is_bool) {
            visible = reinterpret_cast<const uint8_t*>(mask_bh)[off] != 0;
          } else {
            const float a = to_float(reinterpret_cast<const T*>(mask_bh)[off]);
            v = a == -INFINITY ? -INFINITY : v + fmaxf(a, kMaskFloor) * kLog2e;
          }
        }
      }
      s[nt][e] = visible ? v : -INFINITY;
    }
  }
}

// Dropout: the shared Philox4x32-10 of csrc/philox.h (bit-identical to Triton's tl.philox + uint_to_uniform_float
// and to fastgpt/ops/philox.py). P[b, h, i, j] is kept iff u >= p, u = word j % 4 of philox(seed; j / 4, i,
// b * H + h, 0). One call serves four consecutive keys, which the mma fragment spreads over two lanes (queries as
// rows: keys 2t and 2t + 1 of each n-tile are lane t's, t = lane % 4) or over four (keys as rows: key row0 + lane / 4
// is lane's): each lane makes one call per n-tile, for a different row or element than its partners, and the lanes
// trade the words by shuffles, instead of each lane making a call per element (four times the integer work, which
// would bound the kernel).
//
// The dropout mask of a score-shaped fragment (16 x 8 NT, top-left (row0, col0), both multiples of 8): bit 4 nt + e
// is set iff element e of n-tile nt is kept. kTransposed: rows are keys, columns queries. All 32 lanes of the warp
// must call it. A rolled loop, one n-tile at a time: unrolled by 2, ptxas (sm_90a) gave the forward kernel with
// D = 64 167 registers instead of 137. The count moves with small source changes (the bf16 variant with a mask
// tensor takes 166 rolled too); 137 and 167 both leave 3 blocks of 4 warps an SM.
template <bool kTransposed, int NT>
__device__ __forceinline__ uint32_t dropout_bits(const Params& p, uint32_t bh, int row0, int col0) {
  static_assert(NT * 4 <= 32, "one bit per element of the lane's fragment");
  const uint32_t lane = threadIdx.x & 31;
  uint32_t bits = 0u;
#pragma unroll 1
  for (int nt = 0; nt < NT; ++nt) {
    uint32_t words[4], word_of[4];  // word_of[e]: the word element e of the fragment takes
    if constexpr (!kTransposed) {
      // Elements (i, j), (i, j + 1), (i + 8, j), (i + 8, j + 1), j = col0 + 8 nt + 2t: words 2 (t & 1) and
      // 2 (t & 1) + 1 of the calls of rows i and i + 8 at key group j / 4, shared by lanes t and t ^ 1. The even
      // lane calls for row i, the odd one for row i + 8, and each hands the other the two words it needs.
      const bool odd = lane & 1u;
      const int key_group = frag_col(col0, nt, 0) >> 2, query = frag_row(row0, odd ? 2 : 0);
      philox(p.seed, static_cast<uint32_t>(key_group), static_cast<uint32_t>(query), bh, 0u, words);
      const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? words[0] : words[2], 1);
      const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? words[1] : words[3], 1);
      word_of[0] = odd ? got0 : words[0];
      word_of[1] = odd ? got1 : words[1];
      word_of[2] = odd ? words[2] : got0;
      word_of[3] = odd ? words[3] : got1;
    } else {
      // Element e is (key row0 + lane / 4 + 8 (e >> 1), query col0 + 8 nt + 2t + (e & 1)) and takes word
      // m = (lane / 4) % 4 of its call; the four lanes m = 0..3 (lane ^ 4, ^ 8, ^ 12) need the same four calls.
      // Lane m makes element m's call; a 4 x 4 transpose over the lanes then gives each word m of all four:
      // got[d] = word m of element (m ^ d)'s call, from lane m ^ d.
      const uint32_t m = (lane >> 2) & 3u;
      const int key_group = frag_row(row0, m) >> 2, query = frag_col(col0, nt, m);
      philox(p.seed, static_cast<uint32_t>(key_group), static_cast<uint32_t>(query), bh, 0u, words);
      uint32_t got[4];
      got[0] = pick_word(words, m);
#pragma unroll
      for (int d = 1; d < 4; ++d) got[d] = __shfl_xor_sync(0xffffffffu, pick_word(words, m ^ d), 4 * d);
#pragma unroll
      for (int e = 0; e < 4; ++e) word_of[e] = pick_word(got, e ^ m);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
      bits |= static_cast<uint32_t>(word_uniform(word_of[e]) >= p.dropout_p) << (4 * nt + e);
  }
  return bits;
}

// x <- x * kept where the bit is set, 0 where it is not (a dropped element).
template <int NT>
__device__ __forceinline__ void apply_dropout(float (&x)[NT][4], uint32_t bits, float kept) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[nt][e] *= (bits >> (4 * nt + e)) & 1u ? kept : 0.f;
}

// Sum and max over the 4 lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Writes a warp's 16 x N accumulators times `scale` as rows row0.. of a (len, N) matrix with row stride `stride`
// (columns 2t, 2t + 1 of each n-tile as one 32-bit store); rows at or past len are skipped.
template <typename T, int NT>
__device__ __forceinline__ void store_rows(T* dst, int64_t stride, int row0, int len, const float (&acc)[NT][4],
                                           const float (&scale)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = frag_row(row0, 2 * half);
    if (row >= len) continue;
    T* out = dst + static_cast<int64_t>(row) * stride;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      *reinterpret_cast<uint32_t*>(out + frag_col(0, nt, 0)) =
          pack2<T>(acc[nt][2 * half] * scale[half], acc[nt][2 * half + 1] * scale[half]);
  }
}

}  // namespace attention
}  // namespace fastgpt
