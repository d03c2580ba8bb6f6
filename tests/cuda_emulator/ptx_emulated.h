// The emulated twins of csrc/cuda/ptx.cuh, included by csrc/cuda/attention_common.cuh in place of it when
// FASTGPT_PTX_EMULATION is defined (a host build with -Itests/cuda_emulator). See emulator.h for what the
// emulation models and checks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "emulator.h"

namespace fastgpt {
namespace attention {

inline unsigned char* dynamic_smem() { return cuda_emu::state().smem.data(); }

inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(cuda_emu::smem_offset(p, 1)); }

inline void cp_async_16(void* dst, const void* src, bool valid) { cuda_emu::cp_async_issue(dst, src, valid); }
inline void cp_async_commit() { cuda_emu::cp_async_commit_group(); }
template <int N>
inline void cp_async_wait() {
  cuda_emu::cp_async_wait_group(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { cuda_emu::ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { cuda_emu::ldmatrix(r, p, true); }

template <typename T>
constexpr bool kIsF16 = std::is_same_v<T, __half>;

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 only");
  cuda_emu::mma_m16n8k16(c, a, b, std::is_same_v<T, __half>);
}

// sm_90a: the emulator runs the wgmma path of the kernels.
constexpr bool kHasWgmma = true;
inline void fence_proxy_async() { cuda_emu::fence_proxy_async(); }
inline void wgmma_fence() { cuda_emu::wgmma_fence(); }
inline void wgmma_commit() { cuda_emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
  cuda_emu::wgmma_wait(N);
}
// The results land at the wait, through the addresses the products were given: nothing for the compiler to pin.
template <int NT>
inline void fence_operands(float (&)[NT][4]) {}

template <typename T, int N>
inline void wgmma_ss(float (&acc)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  cuda_emu::wgmma_issue(&acc[0][0], N, kIsF16<T>, nullptr, desc_a, desc_b, false, accumulate);
}
template <typename T, int N>
inline void wgmma_rs(float (&acc)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  cuda_emu::wgmma_issue(&acc[0][0], N, kIsF16<T>, a, 0, desc_b, true, true);
}

}  // namespace attention
}  // namespace fastgpt
