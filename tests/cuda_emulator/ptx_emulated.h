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
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 only");
  cuda_emu::mma_m16n8k16(c, a, b, std::is_same_v<T, __half>);
}

}  // namespace attention
}  // namespace fastgpt
