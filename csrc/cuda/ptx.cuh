// The hardware primitives of the attention kernels: the block's dynamic shared memory, cp.async, ldmatrix and the
// mma.sync m16n8k16 tensor-core product (sm_80+), and on sm_90a the warpgroup product wgmma with its fences, as
// inline PTX. attention_common.cuh includes this header, or, built with FASTGPT_PTX_EMULATION by a host compiler,
// tests/cuda_emulator/ptx_emulated.h, which defines the same functions (and the CUDA built-ins the kernels use) on
// a CPU emulation of one thread block; whatever is added here needs its emulated twin there. The register layouts
// of the mma fragments are described at the top of attention_common.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastgpt {
namespace attention {

// The block's dynamic shared memory (its size is the launch's dynamic shared memory argument), 1024-byte aligned:
// the 128-byte swizzle that wgmma applies to its operands' addresses repeats every 1024 bytes, and the tiles'
// swizzle atoms (attention_common.cuh) must line up with it.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(1024) unsigned char smem[];
  return smem;
}

// ---------------------------------------------------------------------------------------------------------------
// Inline PTX.
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1. src_size 0 reads nothing and fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8 x 8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8, and receives in r[i] row
// l / 4, columns 2 (l % 4) + {0, 1} of matrix i (of its transpose with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16 x 8, f32) += a (16 x 16) * b (16 x 8) on the tensor cores.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// sm_90a: wgmma, the asynchronous product of a warpgroup (4 consecutive warps, here the whole block). Warp w of the
// warpgroup holds rows 16 w .. 16 w + 15 of the 64-row A (when A comes from registers) and of the accumulators,
// in exactly the per-warp fragment layouts of mma.m16n8k16 above (PTX ISA, "Register Fragments" of
// wgmma.m64nNk16): float acc[N / 8][4] is lane-for-lane the same tile either way. B, and A when not in registers,
// are read from shared memory through matrix descriptors (attention_common.cuh). The sequence is
//   fence_operands(acc); wgmma_fence(); wgmma_*(...) ...; wgmma_commit(); wgmma_wait<0>(); fence_operands(acc);
// wgmma_fence orders the registers' earlier ordinary accesses before the products read them; the products land in
// acc only at the wait; fence_operands pins acc to those points so that the compiler moves no access of it across.
// Shared memory written through the generic proxy (cp.async, ordinary stores) must be followed, in each writing
// thread, by fence_proxy_async before the barrier after which the products read it.
// kHasWgmma: whether this compilation pass targets sm_90a (the only target with wgmma); elsewhere the kernels keep
// to mma.sync and these functions are never called.
// ---------------------------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kHasWgmma = true;
#else
constexpr bool kHasWgmma = false;
#endif

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of the warpgroup's committed product groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void wgmma_commit() { __trap(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  __trap();
}
#endif

template <int NT>
__device__ __forceinline__ void fence_operands(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[nt][e])::"memory");
}

// The accumulator operands of an m64nNk16 product, acc[N / 8][4] in order, and their place holders in the PTX.
#define FASTGPT_ACC4(i) "+f"(acc[i][0]), "+f"(acc[i][1]), "+f"(acc[i][2]), "+f"(acc[i][3])
#define FASTGPT_ACC_N32 FASTGPT_ACC4(0), FASTGPT_ACC4(1), FASTGPT_ACC4(2), FASTGPT_ACC4(3)
#define FASTGPT_ACC_N64 FASTGPT_ACC_N32, FASTGPT_ACC4(4), FASTGPT_ACC4(5), FASTGPT_ACC4(6), FASTGPT_ACC4(7)
#define FASTGPT_ACC_N128                                                                                        \
  FASTGPT_ACC_N64, FASTGPT_ACC4(8), FASTGPT_ACC4(9), FASTGPT_ACC4(10), FASTGPT_ACC4(11), FASTGPT_ACC4(12),       \
      FASTGPT_ACC4(13), FASTGPT_ACC4(14), FASTGPT_ACC4(15)
#define FASTGPT_REGS_N32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FASTGPT_REGS_N64                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTGPT_REGS_N128                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "    \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// One wgmma with f32 accumulators. scale-d is a predicate: false overwrites acc (D = A B) instead of accumulating.
// `scale` names the operand holding it, `rest` the operands after the accumulators.
#define FASTGPT_WGMMA(shape, type, regs, scale, rest)                                                            \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" scale ", 0;\n"                                                            \
  "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " " regs rest ";\n}\n"
// A and B from descriptors (imm-trans-a = imm-trans-b = 0: both K-major).
#define FASTGPT_WGMMA_SS_N32(type) FASTGPT_WGMMA("m64n32k16", type, FASTGPT_REGS_N32, "18", ", %16, %17, p, 1, 1, 0, 0")
#define FASTGPT_WGMMA_SS_N64(type) FASTGPT_WGMMA("m64n64k16", type, FASTGPT_REGS_N64, "34", ", %32, %33, p, 1, 1, 0, 0")
// A from registers, B from a descriptor, MN-major (imm-trans-b = 1).
#define FASTGPT_WGMMA_RS_N64(type)                                                                               \
  FASTGPT_WGMMA("m64n64k16", type, FASTGPT_REGS_N64, "37", ", {%32, %33, %34, %35}, %36, p, 1, 1, 1")
#define FASTGPT_WGMMA_RS_N128(type)                                                                              \
  FASTGPT_WGMMA("m64n128k16", type, FASTGPT_REGS_N128, "69", ", {%64, %65, %66, %67}, %68, p, 1, 1, 1")

// acc (64 x N per warpgroup) = A B (+ acc if accumulate): A (64 x 16) and B (16 x N) both K-major in shared memory,
// given by their descriptors. N = 32 or 64: the score tiles' keys (or, transposed, queries).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&acc)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 32 || N == 64, "score tiles of 32 or 64 columns");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 32 && kHalf)
    asm volatile(FASTGPT_WGMMA_SS_N32("f16") : FASTGPT_ACC_N32 : "l"(desc_a), "l"(desc_b), "r"(int{accumulate}));
  else if constexpr (N == 32)
    asm volatile(FASTGPT_WGMMA_SS_N32("bf16") : FASTGPT_ACC_N32 : "l"(desc_a), "l"(desc_b), "r"(int{accumulate}));
  else if constexpr (kHalf)
    asm volatile(FASTGPT_WGMMA_SS_N64("f16") : FASTGPT_ACC_N64 : "l"(desc_a), "l"(desc_b), "r"(int{accumulate}));
  else
    asm volatile(FASTGPT_WGMMA_SS_N64("bf16") : FASTGPT_ACC_N64 : "l"(desc_a), "l"(desc_b), "r"(int{accumulate}));
#else
  __trap();
#endif
}

// acc (64 x N per warpgroup) += A B: A (64 x 16) in registers (a: this warp's 16 rows, the mma.m16n8k16 A fragment),
// B (16 x N) MN-major in shared memory (the tile holds B's rows, N contiguous). N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&acc)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "head dims 64 and 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64 && kHalf)
    asm volatile(FASTGPT_WGMMA_RS_N64("f16")
                 : FASTGPT_ACC_N64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  else if constexpr (N == 64)
    asm volatile(FASTGPT_WGMMA_RS_N64("bf16")
                 : FASTGPT_ACC_N64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  else if constexpr (kHalf)
    asm volatile(FASTGPT_WGMMA_RS_N128("f16")
                 : FASTGPT_ACC_N128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  else
    asm volatile(FASTGPT_WGMMA_RS_N128("bf16")
                 : FASTGPT_ACC_N128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();
#endif
}

#undef FASTGPT_WGMMA_RS_N128
#undef FASTGPT_WGMMA_RS_N64
#undef FASTGPT_WGMMA_SS_N64
#undef FASTGPT_WGMMA_SS_N32
#undef FASTGPT_WGMMA
#undef FASTGPT_REGS_N128
#undef FASTGPT_REGS_N64
#undef FASTGPT_REGS_N32
#undef FASTGPT_ACC_N128
#undef FASTGPT_ACC_N64
#undef FASTGPT_ACC_N32
#undef FASTGPT_ACC4

}  // namespace attention
}  // namespace fastgpt
