// A host (CPU) emulation of the part of the CUDA execution model that fastgpt's CUDA kernels use, so that the
// unmodified kernels (csrc/cuda/attention_*.cuh, layer_norm.cuh, linear_gelu.cuh) compile with g++ and run one
// thread block at a time.
//
// What it models:
//   * a block of up to 1024 threads (a whole number of warps; 128 unless the launch says otherwise) as cooperative
//     user-level threads (ucontext), each with its own stack; threadIdx (x fastest, then y, z: warps are runs of 32
//     consecutive threads in that order), blockDim, blockIdx and gridDim; __syncthreads (all threads of the block)
//     and the implicit warp barrier of the .sync.aligned collectives (all 32 lanes of a warp, which must be
//     executing the same collective);
//   * a skewed schedule: between two __syncthreads one warp at a time runs as far as it can, ascending in even
//     blocks and descending in odd ones, so that a warp overwriting shared data another has yet to read shows;
//   * static __shared__ arrays as function-local statics: one block runs at a time, so they are the block's;
//   * dynamic shared memory, filled with 0xff bytes (a NaN in fp16 and bf16) before each block, so that reading
//     something never written shows up in the results;
//   * cp.async with the latest landing the PTX memory model allows: the 16 bytes are copied only when the issuing
//     thread's cp.async.wait_group retires its group. Until then the bytes are marked pending;
//   * ldmatrix (.x4, with and without .trans), mma.sync m16n8k16 (f16/bf16 inputs, f32 accumulators) and
//     shfl.sync.bfly, with the register layouts of the PTX ISA tables;
//   * sm_90a wgmma m64nNk16 (f16/bf16, f32 accumulators; A from shared memory or registers, B from shared memory,
//     K-major or MN-major, 128-byte swizzle) with wgmma.fence, commit_group and wait_group: warp w of a warpgroup
//     computes its 16 rows when it waits for the group, reading shared memory then (as late as allowed) through
//     the matrix descriptors as the PTX ISA's canonical layouts define them, and writing the accumulators then;
//     fence.proxy.async;
//   * fp16 and bf16 with round-to-nearest-even conversions.
// What it checks, reporting each violation through EMU_ERROR (counted in cuda_emu::errors()):
//   * shared-memory races between warps: a location written by one warp and read or written by another within
//     one barrier interval ("epoch", the code between two __syncthreads) is a race, and so is a cp.async whose
//     target another warp read in the epoch of the issue or later, up to its landing; reads of pending cp.async
//     bytes; shared-memory accesses out of the allocation, misaligned ldmatrix rows and cp.async addresses;
//     cp.async sources outside the registered global buffers; threads exiting with copies in flight;
//   * wgmma: a product issued without a wgmma.fence since the warp's last wait, descriptors or shapes that differ
//     between the lanes or the warps of a warpgroup, swizzle modes other than 128 bytes or a nonzero base offset,
//     a group waited for after a __syncthreads, products left in flight at exit, and shared memory read by wgmma
//     (the async proxy) that a cp.async landed (the generic proxy) with no fence.proxy.async by the copying
//     thread since;
//   * deadlocks and divergence at barriers (a warp collective not reached by all 32 lanes, lanes of one warp in
//     different collectives, a __syncthreads not reached by all threads).
// What it counts (bank_stats(), for the harness to judge): the shared-memory wavefronts of every ldmatrix and
// cp.async against the phases they are served in, under the bank model of "Shared-memory banks" below; more
// wavefronts than phases are bank conflicts.
// What it cannot see: timing and occupancy; bank conflicts other than those of ldmatrix and cp.async (wgmma's own
// shared-memory reads included); whether the compiler keeps accumulator accesses out of a wgmma's flight (the
// fence_operands of the kernels); the real (weaker) ordering of memory operations, other than through the cp.async
// landing rule above; races through plain C++ loads and stores to shared memory (only cp.async and ldmatrix accesses
// are tracked: the dK/dV kernel's lse / delta rows and the static __shared__ arrays are not; nor are the statics filled
// with NaN before each block); the approximation of rsqrtf; out-of-bounds plain global loads (the harness detects stray
// global stores with guard zones); the accumulation order and rounding of the hardware mma (emulated here as a float32
// sum in k order, exact products) and the approximations of the hardware exp2 / log2; anything between blocks (blocks
// run one after the other).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

// ---------------------------------------------------------------------------------------------------------------
// CUDA keywords and built-ins, as the kernels spell them.
// ---------------------------------------------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(bytes) alignas(bytes)
#define __shared__ static

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

using std::isfinite;
using std::max;
using std::min;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// 16-bit floating-point types: just the bits, converted with round-to-nearest-even.
struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;  // x: the low 16 bits of the register
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace cuda_emu {

inline float half_bits_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_half_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // IEEE binary16, round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float x) {
  if (std::isnan(x)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 bits dropped (overflow gives inf)
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace cuda_emu

inline float __half2float(__half h) { return cuda_emu::half_bits_to_float(h.x); }
inline float __bfloat162float(__nv_bfloat16 h) { return cuda_emu::bf16_bits_to_float(h.x); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {{cuda_emu::float_to_half_bits(lo)}, {cuda_emu::float_to_half_bits(hi)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{cuda_emu::float_to_bf16_bits(lo)}, {cuda_emu::float_to_bf16_bits(hi)}};
}

namespace cuda_emu {

constexpr int kDefaultBlockThreads = 128;  // the attention kernels' block size (kThreads)
constexpr int kMaxBlockThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;

}  // namespace cuda_emu

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

namespace cuda_emu {

using Dim3 = dim3;

// ---------------------------------------------------------------------------------------------------------------
// Emulator state: one block runs at a time.
// ---------------------------------------------------------------------------------------------------------------
enum class ThreadState { kRunnable, kAtWarpBarrier, kAtBlockBarrier, kDone };

struct Thread {
  static constexpr size_t kStackBytes = 1 << 18;
  ucontext_t context;
  ThreadState state = ThreadState::kRunnable;
  std::unique_ptr<char[]> stack;  // left uninitialised: only the pages a thread touches are ever mapped
};

// A cp.async in flight: 16 bytes from src to shared-memory offset dst (zeros when !valid), issued in `epoch`.
struct Copy {
  size_t dst;
  const void* src;
  bool valid;
  long epoch;
};

struct AsyncCopies {
  std::vector<Copy> uncommitted;          // issued since the last commit_group
  std::deque<std::vector<Copy>> groups;   // committed groups, oldest first
};

// Per 2-byte word of shared memory: who wrote and read it in which epoch, and whether a copy is in flight to it.
struct Shadow {
  long write_epoch = -1;
  int write_warp = -1;
  long read_epoch = -1;
  unsigned read_warps = 0;  // bit w: warp w read the word in read_epoch (32 warps at most)
  bool pending = false;
  bool unfenced = false;  // landed by a cp.async whose thread has not run fence.proxy.async since
};

// One wgmma.mma_async of a warp: m64nNk16, this warp's 16 rows of D (+)= A B, computed when its group is waited for.
struct Wgmma {
  float* acc[kWarpSize];     // each lane's accumulators, acc[N / 8][4] flattened
  uint32_t a[kWarpSize][4];  // A from registers: each lane's fragment (when a_in_regs)
  uint64_t desc_a, desc_b;   // shared-memory matrix descriptors (desc_a unused when a_in_regs)
  int n;
  bool is_f16, a_in_regs, trans_b, accumulate;
  long epoch;                // of the issue
};

struct WgmmaState {
  bool fenced = false;                    // a wgmma.fence since the warp's last wait_group
  std::vector<Wgmma> uncommitted;
  std::deque<std::vector<Wgmma>> groups;  // committed, oldest first
  // Kept by a warpgroup's first warp: the warpgroup's issues in barrier interval log_epoch, in order, which the
  // issues of its other warps must match; `logged` counts how many of them this warp has issued.
  long log_epoch = -1;
  std::vector<Wgmma> log;
  size_t logged = 0;
};

struct GlobalRange {
  const void* ptr;
  size_t bytes;
};

// Shared-memory bank accounting of one kind of access (see "Shared-memory banks" below): the phases the warp
// instructions were served in, the wavefronts those took (equal when nothing conflicts), and the most wavefronts
// one phase took.
struct BankCounts {
  long phases = 0, wavefronts = 0;
  int worst = 0;
};
struct BankStats {
  BankCounts ldmatrix, cp_async;
};

// The destinations of one warp-wide cp.async: each issuing lane's 16-byte chunk (shared offset / 16).
struct CpAsyncIssue {
  uint32_t chunk[kWarpSize];
  uint32_t lanes = 0;  // bit l: lane l issued it
};

struct State {
  Thread threads[kMaxBlockThreads];
  int block_threads = kDefaultBlockThreads;  // threads of the running launch's blocks
  ucontext_t scheduler;
  std::function<void()> kernel;
  int current = 0;  // the running thread, -1 in the scheduler
  Dim3 block_idx{0, 0, 0}, grid_dim{}, block_dim{kDefaultBlockThreads};
  long epoch = 0;   // number of __syncthreads completed in this block
  int errors = 0;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  AsyncCopies copies[kMaxBlockThreads];
  std::vector<GlobalRange> global_ranges;  // where cp.async may read
  // Warp collectives exchange operands through these, one slot per lane.
  int op[kMaxWarps][kWarpSize];
  const void* ptr[kMaxWarps][kWarpSize];
  uint32_t a[kMaxWarps][kWarpSize][4], b[kMaxWarps][kWarpSize][2];
  uint32_t bits[kMaxWarps][kWarpSize];
  Wgmma wgmma_slot[kMaxWarps][kWarpSize];  // a lane's own operands, in acc[0] and a[0]
  WgmmaState wgmma[kMaxWarps];
  std::vector<size_t> unfenced[kMaxBlockThreads];  // per thread: words its landed copies made unfenced
  BankStats banks;  // over every launch of the process
  // cp.async issues of each warp since its lanes last stopped together, by the issuing lane's count of them.
  std::vector<CpAsyncIssue> cp_issues[kMaxWarps];
  int cp_issued[kMaxBlockThreads] = {};
};

inline State& state() {
  static State s;
  return s;
}

inline int errors() { return state().errors; }
inline const BankStats& bank_stats() { return state().banks; }
inline void reset_errors() { state().errors = 0; }
// The global buffers that cp.async may read from (the harness registers its input tensors).
inline void set_global_ranges(std::vector<GlobalRange> ranges) { state().global_ranges = std::move(ranges); }

#define EMU_ERROR(...)                                                                                          \
  do {                                                                                                          \
    auto& emu_s = ::cuda_emu::state();                                                                          \
    if (emu_s.errors++ < 10) {                                                                                  \
      std::fprintf(stderr, "EMU ERROR block (%u, %u, %u) thread %d epoch %ld: ", emu_s.block_idx.x,            \
                   emu_s.block_idx.y, emu_s.block_idx.z, emu_s.current, emu_s.epoch);                           \
      std::fprintf(stderr, __VA_ARGS__);                                                                        \
      std::fprintf(stderr, "\n");                                                                               \
    }                                                                                                           \
  } while (0)

inline int lane() { return state().current % kWarpSize; }
inline int warp() { return state().current / kWarpSize; }

// Suspends the running thread in `s` and returns to the scheduler; resumes when the barrier is released.
inline void suspend(ThreadState s) {
  State& st = state();
  Thread& t = st.threads[st.current];
  t.state = s;
  swapcontext(&t.context, &st.scheduler);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared memory accounting.
// ---------------------------------------------------------------------------------------------------------------
inline size_t smem_offset(const void* p, size_t bytes) {
  State& st = state();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < st.smem.data() || c + bytes > st.smem.data() + st.smem_bytes) {
    EMU_ERROR("shared memory access out of bounds: offset %ld, %zu bytes, allocation %zu bytes",
              static_cast<long>(c - st.smem.data()), bytes, st.smem_bytes);
    return 0;
  }
  return static_cast<size_t>(c - st.smem.data());
}

inline void note_read(size_t off) {
  State& st = state();
  Shadow& s = st.shadow[off / 2];
  const int w = warp();
  if (s.pending) EMU_ERROR("read of shared byte %zu while a cp.async to it is in flight", off);
  if (s.write_epoch == st.epoch && s.write_warp != w)
    EMU_ERROR("race: shared byte %zu written by warp %d and read by warp %d without a barrier", off, s.write_warp, w);
  if (s.read_epoch != st.epoch) {
    s.read_epoch = st.epoch;
    s.read_warps = 0;
  }
  s.read_warps |= 1u << w;
}

// A write by the running warp that may take effect anywhere from epoch `since` to now (a cp.async's lifetime).
inline void note_write(size_t off, long since) {
  State& st = state();
  Shadow& s = st.shadow[off / 2];
  const int w = warp();
  if (s.read_epoch >= since && (s.read_warps & ~(1u << w)))
    EMU_ERROR("race: shared byte %zu read by warps 0x%x (epoch %ld) and written by warp %d (issued in epoch %ld)",
              off, s.read_warps, s.read_epoch, w, since);
  if (s.write_epoch >= since && s.write_warp != w)
    EMU_ERROR("race: shared byte %zu written by warps %d and %d without a barrier", off, s.write_warp, w);
  s.write_epoch = st.epoch;
  s.write_warp = w;
}

inline uint16_t smem_load16(const void* p) {
  const size_t off = smem_offset(p, 2);
  note_read(off);
  uint16_t v;
  std::memcpy(&v, state().smem.data() + off, 2);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory banks. The model (CUDA C++ Programming Guide, "Shared Memory" of the compute capabilities >= 5.x;
// PTX ISA, "ldmatrix"; Nsight Compute's l1tex shared "wavefronts" and their "ideal"): shared memory is 32 banks of
// 4 bytes, successive words in successive banks, and one wavefront serves one 128-byte row of them. A warp access
// of 16 bytes per thread is served in four phases of 8 threads (lanes 0-7, 8-15, 16-23, 24-31). ldmatrix .x4 reads
// four 8 x 16-byte matrices, matrix i from the row addresses of lanes 8i..8i+7, one phase per matrix. A phase's
// 16-byte chunks fall in bank groups (offset / 16) % 8 of 4 banks each, and it takes as many wavefronts as the
// group with the most distinct chunks (a chunk read by several lanes counts once: a broadcast); 1 is ideal, 8 the
// worst. Offsets are from the start of dynamic shared memory, taken to be 128-byte aligned as on the device.
// ---------------------------------------------------------------------------------------------------------------
inline void count_phase(BankCounts& counts, const uint32_t* chunks, int n) {
  int distinct[8] = {};
  for (int i = 0; i < n; ++i)
    if (std::find(chunks, chunks + i, chunks[i]) == chunks + i) ++distinct[chunks[i] % 8];
  const int wavefronts = *std::max_element(distinct, distinct + 8);
  ++counts.phases;
  counts.wavefronts += wavefronts;
  counts.worst = std::max(counts.worst, wavefronts);
}

inline uint32_t smem_chunk(const void* p) {
  return static_cast<uint32_t>((static_cast<const unsigned char*>(p) - state().smem.data()) / 16);
}

// cp.async is issued per thread, and the emulator runs a warp's lanes one after the other: a lane's k-th issue
// since the warp's lanes last stopped together (at a warp collective, a __syncthreads or the end) is taken to be
// the same warp instruction as every other lane's k-th, since the lanes run the same loop. A lane that issues
// fewer (a thread predicated off, past the end of a loop) is inactive in the instructions it misses: a phase counts
// the lanes of its quarter that issued, and a quarter without any makes no phase. Evaluated when the warp's lanes
// stop together, when no lane can still join an instruction. (A lane skipping an issue in the middle of a run would
// pair its later issues with the wrong ones; the attention kernels' load_tile issues as many on every lane,
// zero-filling what is out of range.)
inline void count_cp_async_phases(int w) {
  State& st = state();
  if (st.cp_issues[w].empty()) return;
  for (const CpAsyncIssue& issue : st.cp_issues[w])
    for (int quarter = 0; quarter < 4; ++quarter) {
      uint32_t chunks[8];
      int n = 0;
      for (int l = 8 * quarter; l < 8 * quarter + 8; ++l)
        if (issue.lanes >> l & 1u) chunks[n++] = issue.chunk[l];
      if (n) count_phase(st.banks.cp_async, chunks, n);
    }
  st.cp_issues[w].clear();
  std::fill_n(st.cp_issued + w * kWarpSize, kWarpSize, 0);
}

// ---------------------------------------------------------------------------------------------------------------
// cp.async: issue, commit_group, wait_group.
// ---------------------------------------------------------------------------------------------------------------
inline bool in_global_ranges(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const GlobalRange& r : state().global_ranges) {
    const char* base = static_cast<const char*>(r.ptr);
    if (c >= base && c + bytes <= base + r.bytes) return true;
  }
  return false;
}

inline void cp_async_issue(void* dst, const void* src, bool valid) {
  State& st = state();
  const size_t off = smem_offset(dst, 16);
  if (off % 16) EMU_ERROR("cp.async destination not 16-byte aligned (offset %zu)", off);
  // With src-size 0 nothing is read, so only a real source must be aligned and inside a tensor.
  if (valid && reinterpret_cast<uintptr_t>(src) % 16) EMU_ERROR("cp.async source %p not 16-byte aligned", src);
  if (valid && !in_global_ranges(src, 16)) EMU_ERROR("cp.async source %p outside the input tensors", src);
  for (size_t i = 0; i < 16; i += 2) {
    note_write(off + i, st.epoch);
    st.shadow[(off + i) / 2].pending = true;
  }
  st.copies[st.current].uncommitted.push_back({off, src, valid, st.epoch});
  // A zero-filling copy (!valid) writes its 16 bytes too: it counts.
  std::vector<CpAsyncIssue>& issues = st.cp_issues[warp()];
  const size_t k = static_cast<size_t>(st.cp_issued[st.current]++);
  if (k == issues.size()) issues.emplace_back();
  issues[k].chunk[lane()] = static_cast<uint32_t>(off / 16);
  issues[k].lanes |= 1u << lane();
}

inline void cp_async_commit_group() {
  AsyncCopies& c = state().copies[state().current];
  c.groups.push_back(std::move(c.uncommitted));
  c.uncommitted.clear();
}

// wait_group n: all but the newest n committed groups have landed. The bytes land here, as late as allowed; the
// write is checked against every read by another warp since the copy was issued.
inline void cp_async_wait_group(int n) {
  State& st = state();
  AsyncCopies& c = st.copies[st.current];
  while (static_cast<int>(c.groups.size()) > n) {
    for (const Copy& copy : c.groups.front()) {
      for (size_t i = 0; i < 16; i += 2) {
        st.shadow[(copy.dst + i) / 2].pending = false;
        note_write(copy.dst + i, copy.epoch);
      }
      if (copy.valid)
        std::memcpy(st.smem.data() + copy.dst, copy.src, 16);
      else
        std::memset(st.smem.data() + copy.dst, 0, 16);
      for (size_t i = 0; i < 16; i += 2) {
        st.shadow[(copy.dst + i) / 2].unfenced = true;
        st.unfenced[st.current].push_back((copy.dst + i) / 2);
      }
    }
    c.groups.pop_front();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Warp collectives. Each lane deposits its operands, waits for the whole warp, computes its own result from all
// lanes' operands, and waits again before the slots can be reused.
// ---------------------------------------------------------------------------------------------------------------
enum Op { kOpLdmatrix = 1, kOpLdmatrixTrans, kOpMmaF16, kOpMmaBf16, kOpShfl, kOpWgmmaFence, kOpWgmma, kOpWgmmaCommit,
          kOpWgmmaWait };

inline void warp_barrier(int op) {
  State& st = state();
  const int w = warp(), l = lane();
  st.op[w][l] = op;
  suspend(ThreadState::kAtWarpBarrier);
  for (int i = 0; i < kWarpSize; ++i)
    if (st.op[w][i] != op) {
      EMU_ERROR("lanes %d and %d of warp %d are in different warp collectives (%d, %d)", l, i, w, op, st.op[w][i]);
      break;
    }
}
inline void warp_release() { suspend(ThreadState::kAtWarpBarrier); }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l supplies the address of row l % 8 of matrix l / 8 (16
// contiguous bytes). Without .trans, lane l receives in r[i] row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of
// matrix i (low half = lower column). With .trans it receives the same positions of the transposed matrix: rows
// 2 (l % 4) and 2 (l % 4) + 1 of column l / 4.
inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  State& st = state();
  const int w = warp(), l = lane();
  if (smem_offset(p, 16) % 16) EMU_ERROR("ldmatrix row address not 16-byte aligned");
  st.ptr[w][l] = p;
  warp_barrier(trans ? kOpLdmatrixTrans : kOpLdmatrix);
  if (l == 0)  // once per warp instruction: phase i is matrix i's 8 rows
    for (int i = 0; i < 4; ++i) {
      uint32_t chunks[8];
      for (int j = 0; j < 8; ++j) chunks[j] = smem_chunk(st.ptr[w][8 * i + j]);
      count_phase(st.banks.ldmatrix, chunks, 8);
    }
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(st.ptr[w][8 * i + g]);
      lo = smem_load16(row + 2 * t);
      hi = smem_load16(row + 2 * t + 1);
    } else {
      lo = smem_load16(static_cast<const uint16_t*>(st.ptr[w][8 * i + 2 * t]) + g);
      hi = smem_load16(static_cast<const uint16_t*>(st.ptr[w][8 * i + 2 * t + 1]) + g);
    }
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  warp_release();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: C (16 x 8) += A (16 x 16) B (16 x 8), per the PTX ISA tables
// (g = lane / 4, t = lane % 4; each 32-bit register holds two 16-bit elements, the lower index in the low half):
//   A: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C: c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
// Each product is exact in float; they are summed in k order onto c in float (the hardware's internal order and
// precision differ slightly).
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool is_f16) {
  State& st = state();
  const int w = warp(), l = lane();
  for (int i = 0; i < 4; ++i) st.a[w][l][i] = a[i];
  for (int i = 0; i < 2; ++i) st.b[w][l][i] = b[i];
  warp_barrier(is_f16 ? kOpMmaF16 : kOpMmaBf16);
  const auto element = [&](uint32_t reg, int k) {
    const uint16_t bits = k % 2 ? reg >> 16 : reg & 0xffffu;
    return is_f16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
  };
  // The lane and register holding A[row][k] and B[k][n], inverting the tables above.
  const auto A = [&](int row, int k) {
    return element(st.a[w][(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k);
  };
  const auto B = [&](int k, int n) { return element(st.b[w][n * 4 + (k % 8) / 2][k / 8], k); };
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    c[e] = acc;
  }
  warp_release();
}

// shfl.sync.bfly: lane l receives x (any 32-bit type) from lane l ^ lane_mask (full mask only, as the kernels use
// it).
template <typename T>
inline T shfl_xor(unsigned member_mask, T x, int lane_mask) {
  static_assert(sizeof(T) == sizeof(uint32_t), "shfl moves 32-bit words");
  State& st = state();
  const int w = warp(), l = lane();
  if (member_mask != 0xffffffffu) EMU_ERROR("__shfl_xor_sync with a partial member mask is not emulated");
  st.bits[w][l] = std::bit_cast<uint32_t>(x);
  warp_barrier(kOpShfl);
  const uint32_t y = st.bits[w][(l ^ lane_mask) % kWarpSize];
  warp_release();
  return std::bit_cast<T>(y);
}

// ---------------------------------------------------------------------------------------------------------------
// sm_90a: fence.proxy.async and wgmma.
// ---------------------------------------------------------------------------------------------------------------
// fence.proxy.async.shared::cta: the running thread's earlier generic-proxy writes (its landed cp.async copies)
// become visible to the async proxy (wgmma's operand reads), once a barrier orders them too.
inline void fence_proxy_async() {
  State& st = state();
  for (size_t word : st.unfenced[st.current]) st.shadow[word].unfenced = false;
  st.unfenced[st.current].clear();
}

inline void wgmma_fence() {
  warp_barrier(kOpWgmmaFence);
  if (lane() == 0) state().wgmma[warp()].fenced = true;
  warp_release();
}

// The 16-bit element at `offset` bytes of the operand a descriptor describes, as the hardware reads it: the
// descriptor's start address plus the canonical layout's offset, then the 128-byte swizzle of the address (bits
// 4-6 XOR bits 7-9; dynamic shared memory starts at a 1024-byte boundary on the device).
inline uint16_t wgmma_load16(uint64_t desc, size_t offset) {
  State& st = state();
  const size_t start = (desc & 0x3fffu) << 4;
  size_t addr = start + offset;
  addr ^= ((addr >> 7) & 7u) << 4;
  if (addr + 2 > st.smem_bytes) {
    EMU_ERROR("wgmma reads shared offset %zu, past the allocation of %zu bytes", addr, st.smem_bytes);
    return 0;
  }
  const Shadow& sh = st.shadow[addr / 2];
  if (sh.unfenced)
    EMU_ERROR("wgmma reads shared byte %zu, landed by a cp.async whose thread ran no fence.proxy.async since", addr);
  note_read(addr);
  uint16_t v;
  std::memcpy(&v, st.smem.data() + addr, 2);
  return v;
}

// Canonical layouts of 16-bit operands with the 128-byte swizzle (PTX ISA, "Shared Memory Matrix Layout", in CuTe
// notation over (row or column, k) with T = 8 elements per 16 bytes):
//   K-major  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))      element (mn, k) at (mn % 8) * 128 + (mn / 8) * SBO + 2 k
//   MN-major ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) element (k, mn) at (mn % 64) * 2 + (mn / 64) * LBO
//                                                            + (k % 8) * 128 + (k / 8) * SBO
// (byte offsets from the start address; LBO and SBO are the leading and stride byte offsets of the descriptor).
inline size_t k_major_offset(uint64_t desc, int mn, int k) {
  const size_t stride = ((desc >> 32) & 0x3fffu) << 4;
  return (mn % 8) * 128 + (mn / 8) * stride + 2 * k;
}
inline size_t mn_major_offset(uint64_t desc, int k, int mn) {
  const size_t leading = ((desc >> 16) & 0x3fffu) << 4, stride = ((desc >> 32) & 0x3fffu) << 4;
  return (mn % 64) * 2 + (mn / 64) * leading + (k % 8) * 128 + (k / 8) * stride;
}

inline void check_descriptor(uint64_t desc) {
  if ((desc >> 62) != 1u) EMU_ERROR("wgmma descriptor with swizzle mode %u: only 1 (128 bytes) is emulated",
                                    static_cast<unsigned>(desc >> 62));
  if (((desc >> 49) & 7u) != 0u) EMU_ERROR("wgmma descriptor with a nonzero base offset: not emulated");
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: every lane passes its accumulators (kept by address until
// the wait), its A fragment when A is in registers, and the descriptors, which must agree across the warp and, in
// issue order, across the warps of the warpgroup.
inline void wgmma_issue(float* acc, int n, bool is_f16, const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                        bool trans_b, bool accumulate) {
  State& st = state();
  const int w = warp(), l = lane();
  Wgmma& slot = st.wgmma_slot[w][l];
  slot.acc[0] = acc;
  for (int i = 0; i < 4; ++i) slot.a[0][i] = a ? a[i] : 0u;
  slot.desc_a = a ? 0 : desc_a;
  slot.desc_b = desc_b;
  slot.n = n;
  slot.is_f16 = is_f16, slot.a_in_regs = a != nullptr, slot.trans_b = trans_b, slot.accumulate = accumulate;
  warp_barrier(kOpWgmma);
  if (l == 0) {
    WgmmaState& ws = st.wgmma[w];
    if (!ws.fenced) EMU_ERROR("wgmma.mma_async of warp %d without a wgmma.fence since its last wait", w);
    Wgmma op = slot;
    op.epoch = st.epoch;
    const auto same_shape = [](const Wgmma& x, const Wgmma& y) {
      return x.desc_a == y.desc_a && x.desc_b == y.desc_b && x.n == y.n && x.is_f16 == y.is_f16 &&
             x.a_in_regs == y.a_in_regs && x.trans_b == y.trans_b && x.accumulate == y.accumulate;
    };
    for (int i = 0; i < kWarpSize; ++i) {
      const Wgmma& other = st.wgmma_slot[w][i];
      if (!same_shape(other, slot)) EMU_ERROR("lanes 0 and %d of warp %d issue different wgmma", i, w);
      op.acc[i] = other.acc[0];
      for (int r = 0; r < 4; ++r) op.a[i][r] = other.a[0][r];
    }
    if (!op.a_in_regs) check_descriptor(op.desc_a);
    check_descriptor(op.desc_b);
    WgmmaState& group = st.wgmma[w - w % 4];  // the warpgroup's log lives with its first warp
    if (group.log_epoch != st.epoch) {
      group.log_epoch = st.epoch;
      group.log.clear();
      for (int v = w - w % 4; v < w - w % 4 + 4; ++v) st.wgmma[v].logged = 0;
    }
    if (ws.logged == group.log.size())
      group.log.push_back(op);
    else if (!same_shape(group.log[ws.logged], op))
      EMU_ERROR("warp %d's wgmma differs from the one its warpgroup issued in that place", w);
    ++ws.logged;
    ws.uncommitted.push_back(op);
  }
  warp_release();
}

inline void wgmma_commit() {
  warp_barrier(kOpWgmmaCommit);
  if (lane() == 0) {
    WgmmaState& ws = state().wgmma[warp()];
    ws.groups.push_back(std::move(ws.uncommitted));
    ws.uncommitted.clear();
  }
  warp_release();
}

// This warp's 16 rows of one product: D[16w' + r][c] (+)= sum_k A[16w' + r][k] B[k][c], w' = the warp's index in
// its warpgroup; products exact in float, summed in k order onto the accumulator (as mma_m16n8k16).
inline void wgmma_execute(const Wgmma& op) {
  State& st = state();
  const int w = warp(), rows0 = 16 * (w % 4);
  if (op.epoch != st.epoch) EMU_ERROR("a wgmma group of warp %d waited for after a __syncthreads: not emulated", w);
  const auto to_float = [&](uint16_t bits) { return op.is_f16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits); };
  float A[16][16];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) {
      if (op.a_in_regs) {  // the mma.m16n8k16 A layout, per warp
        const uint32_t reg = op.a[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)];
        A[r][k] = to_float(k % 2 ? reg >> 16 : reg & 0xffffu);
      } else {
        A[r][k] = to_float(wgmma_load16(op.desc_a, k_major_offset(op.desc_a, rows0 + r, k)));
      }
    }
  std::vector<float> B(16 * size_t(op.n));  // B[k][c]
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < op.n; ++c)
      B[k * op.n + c] = to_float(wgmma_load16(
          op.desc_b, op.trans_b ? mn_major_offset(op.desc_b, k, c) : k_major_offset(op.desc_b, c, k)));
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < op.n / 2; ++i) {  // element i of the lane's acc[N / 8][4]: n-tile i / 4, element i % 4
      const int r = g + 8 * ((i >> 1) & 1), c = 8 * (i >> 2) + 2 * t + (i & 1);
      float sum = op.accumulate ? op.acc[l][i] : 0.f;
      for (int k = 0; k < 16; ++k) sum += A[r][k] * B[k * op.n + c];
      op.acc[l][i] = sum;
    }
  }
}

// wgmma.wait_group n: all but the newest n committed groups are done; their results land now.
inline void wgmma_wait(int n) {
  warp_barrier(kOpWgmmaWait);
  if (lane() == 0) {
    WgmmaState& ws = state().wgmma[warp()];
    if (!ws.uncommitted.empty()) EMU_ERROR("wgmma.wait_group with products of warp %d not committed", warp());
    while (static_cast<int>(ws.groups.size()) > n) {
      for (const Wgmma& op : ws.groups.front()) wgmma_execute(op);
      ws.groups.pop_front();
    }
    ws.fenced = false;
  }
  warp_release();
}

// ---------------------------------------------------------------------------------------------------------------
// Running a grid: blocks one after the other; within a block, warps one at a time (see launch).
// ---------------------------------------------------------------------------------------------------------------
inline void thread_entry() {
  State& st = state();
  st.kernel();
  st.threads[st.current].state = ThreadState::kDone;
  swapcontext(&st.threads[st.current].context, &st.scheduler);
}

// Releases warp w's lanes if all 32 wait at a warp collective.
inline bool release_warp(int w) {
  State& st = state();
  for (int l = 0; l < kWarpSize; ++l)
    if (st.threads[w * kWarpSize + l].state != ThreadState::kAtWarpBarrier) return false;
  for (int l = 0; l < kWarpSize; ++l) st.threads[w * kWarpSize + l].state = ThreadState::kRunnable;
  return true;
}

// Runs warp w as far as it goes: its lanes in turn, through every warp collective, until each is done or waits at
// a __syncthreads.
inline void run_warp(int w) {
  State& st = state();
  for (;;) {
    bool ran = false;
    for (int i = w * kWarpSize; i < (w + 1) * kWarpSize; ++i)
      if (st.threads[i].state == ThreadState::kRunnable) {
        st.current = i;
        swapcontext(&st.scheduler, &st.threads[i].context);
        ran = true;
      }
    if (ran) continue;
    count_cp_async_phases(w);  // every lane waits at a barrier or is done
    if (!release_warp(w)) break;
  }
  st.current = -1;
}

// Releases the __syncthreads that every thread of the block waits at; false if they do not all (a deadlock: the
// live threads wait on something that will never complete).
inline bool release_block_barrier() {
  State& st = state();
  for (int i = 0; i < st.block_threads; ++i)
    if (st.threads[i].state != ThreadState::kAtBlockBarrier) return false;
  for (int i = 0; i < st.block_threads; ++i) st.threads[i].state = ThreadState::kRunnable;
  ++st.epoch;
  return true;
}

// Runs `kernel` (a call of the __global__ function with its parameters) on every block of `grid`, blocks of
// `block` threads, with `smem_bytes` of dynamic shared memory. Returns false after a deadlock or a block shape the
// emulator cannot run (the grid is abandoned).
inline bool launch(Dim3 grid, Dim3 block, size_t smem_bytes, std::function<void()> kernel) {
  State& st = state();
  const long threads = long{block.x} * block.y * block.z;
  if (threads < 1 || threads > kMaxBlockThreads || threads % kWarpSize != 0) {
    EMU_ERROR("block of %u x %u x %u threads: the emulator runs 32 to %d threads, whole warps", block.x, block.y,
              block.z, kMaxBlockThreads);
    return false;
  }
  st.block_threads = static_cast<int>(threads);
  st.block_dim = block;
  st.kernel = std::move(kernel);
  st.grid_dim = grid;
  st.smem_bytes = smem_bytes;
  st.smem.assign(smem_bytes + 16, 0);
  for (int i = 0; i < st.block_threads; ++i)
    if (!st.threads[i].stack) st.threads[i].stack.reset(new char[Thread::kStackBytes]);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        st.block_idx = {x, y, z};
        st.epoch = 0;
        std::memset(st.smem.data(), 0xff, smem_bytes);  // NaN in fp16 and bf16
        st.shadow.assign(smem_bytes / 2 + 8, Shadow{});
        for (int w = 0; w < st.block_threads / kWarpSize; ++w) st.wgmma[w] = WgmmaState{};
        for (int i = 0; i < st.block_threads; ++i) {
          Thread& t = st.threads[i];
          st.copies[i] = AsyncCopies{};
          st.unfenced[i].clear();
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = t.stack.get();
          t.context.uc_stack.ss_size = Thread::kStackBytes;
          t.context.uc_link = nullptr;
          makecontext(&t.context, thread_entry, 0);
          t.state = ThreadState::kRunnable;
        }
        // Between two __syncthreads, one warp at a time runs as far as it can, in ascending warp order in even
        // blocks and descending in odd ones: the most skewed schedules the hardware allows, so that a warp that
        // overwrites shared data another warp has yet to read (a missing barrier) changes the results.
        const int warps = st.block_threads / kWarpSize;
        const bool descending = (x + y + z) % 2 == 1;
        for (;;) {
          for (int k = 0; k < warps; ++k) run_warp(descending ? warps - 1 - k : k);
          int done = 0;
          for (int i = 0; i < st.block_threads; ++i) done += st.threads[i].state == ThreadState::kDone;
          if (done == st.block_threads) break;
          if (!release_block_barrier()) {
            EMU_ERROR("deadlock or divergent barrier: %d threads done, the others wait on barriers never reached",
                      done);
            return false;
          }
        }
        for (int i = 0; i < st.block_threads; ++i)
          if (!st.copies[i].uncommitted.empty() || !st.copies[i].groups.empty()) {
            st.current = i;
            EMU_ERROR("thread exits with cp.async copies not waited for");
          }
        for (int w = 0; w < st.block_threads / kWarpSize; ++w)
          if (!st.wgmma[w].uncommitted.empty() || !st.wgmma[w].groups.empty()) {
            st.current = w * kWarpSize;
            EMU_ERROR("warp exits with wgmma products not waited for");
          }
      }
  return true;
}

// The attention kernels' launches: blocks of 128 threads.
inline bool launch(Dim3 grid, size_t smem_bytes, std::function<void()> kernel) {
  return launch(grid, Dim3(kDefaultBlockThreads), smem_bytes, std::move(kernel));
}

inline Dim3 thread_idx() {
  const State& st = state();
  const unsigned i = static_cast<unsigned>(st.current), bx = st.block_dim.x, by = st.block_dim.y;
  return {i % bx, i / bx % by, i / (bx * by)};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::state().block_idx)
#define blockDim (::cuda_emu::state().block_dim)
#define gridDim (::cuda_emu::state().grid_dim)

inline void __syncthreads() { cuda_emu::suspend(cuda_emu::ThreadState::kAtBlockBarrier); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask) { return cuda_emu::shfl_xor(mask, x, lane_mask); }
inline uint32_t __shfl_xor_sync(unsigned mask, uint32_t x, int lane_mask) {
  return cuda_emu::shfl_xor(mask, x, lane_mask);
}
