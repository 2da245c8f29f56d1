// A small CPU emulation of the CUDA execution model, enough to compile and run the
// kernels of csrc/cuda with g++ (tests/test_cuda_emulated.py).
//
// A launch runs its blocks one at a time; the threads of a block are fibers that run
// until they block at __syncthreads() or at a warp collective (__shfl*_sync,
// __ballot_sync, ...), in an order chosen per launch (runtime.cpp). __shared__ is
// `static`: blocks never overlap, so a function-level static is per-block shared
// memory (poisoned before each block). __CUDACC__ and __CUDA_ARCH__ stay undefined: shared headers take their host
// branches. build.py rewrites `kernel<<<cfg>>>(args)` to `::emu::Launch(cfg)(kernel, args)`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// The zero-initialized data of a kernel's object file is its __shared__ variables
// alone: build.py renames that section (.bss) to emu_shared, which the scheduler fills
// with 0xFF bytes before each block, so a read before the block's first write sees garbage.
#define __shared__ static
// __restrict__ is a g++ keyword already.

// ---------------------------------------------------------------- runtime API
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
constexpr int warpSize = 32;

// ---------------------------------------------------------------- the scheduler's side
namespace emu {

enum class Wait { kRunnable, kBarrier, kWarp, kExited };
enum Op { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };

struct Thread {
  uint3 idx;
  int id;  // linear: x fastest, then y, then z; warp = id / 32
  Wait wait;
  int line;  // source line of the barrier or collective it waits at
  Op op;
  unsigned mask;
  int arg, width;
  uint64_t in, out;  // the collective's operand and result, as bits
};

extern Thread* g_thread;  // the running thread
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

void suspend();  // back to the scheduler until released
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// `kernel<<<grid, block, shmem, stream>>>(args...)` after build.py's rewrite.
struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
  template <typename F, typename... Args>
  void operator()(F kernel, Args... args) const {  // parameters are copied, as at a launch
    run_grid(grid, block, [&] { kernel(args...); });
  }
};

inline void syncthreads(int line) {
  g_thread->wait = Wait::kBarrier;
  g_thread->line = line;
  suspend();
}

template <typename T>
T collective(Op op, int line, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "operand must fit 64 bits");
  Thread* t = g_thread;
  t->wait = Wait::kWarp;
  t->line = line;
  t->op = op;
  t->mask = mask;
  t->arg = arg;
  t->width = width;
  t->in = 0;
  std::memcpy(&t->in, &v, sizeof v);
  suspend();
  T r;
  std::memcpy(&r, &t->out, sizeof r);
  return r;
}

}  // namespace emu

#define threadIdx (static_cast<const uint3&>(::emu::g_thread->idx))
#define blockIdx (static_cast<const uint3&>(::emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::emu::g_grid_dim))

// Barriers and warp collectives; `line` (the caller's, by default) tells the scheduler
// which one a thread waits at.
inline void __syncthreads(int line = __builtin_LINE()) { ::emu::syncthreads(line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  ::emu::collective<int>(::emu::kSyncwarp, line, mask, 0, 0, warpSize);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, int line = __builtin_LINE()) {
  return ::emu::collective(::emu::kShfl, line, mask, v, src, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, int line = __builtin_LINE()) {
  return ::emu::collective(::emu::kShflUp, line, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, int line = __builtin_LINE()) {
  return ::emu::collective(::emu::kShflDown, line, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, int line = __builtin_LINE()) {
  return ::emu::collective(::emu::kShflXor, line, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int p, int line = __builtin_LINE()) {
  return static_cast<unsigned>(::emu::collective<int>(::emu::kBallot, line, mask, p != 0, 0, warpSize));
}
inline int __any_sync(unsigned mask, int p, int line = __builtin_LINE()) {
  return ::emu::collective<int>(::emu::kAny, line, mask, p != 0, 0, warpSize);
}
inline int __all_sync(unsigned mask, int p, int line = __builtin_LINE()) {
  return ::emu::collective<int>(::emu::kAll, line, mask, p != 0, 0, warpSize);
}
inline void __threadfence() {}

// ---------------------------------------------------------------- device functions
#define EMU_MIN_MAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }    \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned)
EMU_MIN_MAX(long)
EMU_MIN_MAX(unsigned long)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
EMU_MIN_MAX(float)
EMU_MIN_MAX(double)
#undef EMU_MIN_MAX

// One OS thread runs every fiber, and fibers switch only at barriers and collectives:
// a plain read-modify-write is atomic.
#define EMU_ATOMIC_ADD(T) \
  inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
EMU_ATOMIC_ADD(int)
EMU_ATOMIC_ADD(unsigned)
EMU_ATOMIC_ADD(unsigned long long)
EMU_ATOMIC_ADD(float)
EMU_ATOMIC_ADD(double)
#undef EMU_ATOMIC_ADD

template <typename To, typename From>
inline To emu_bit_cast(From f) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
  To t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}
inline unsigned __float_as_uint(float f) { return emu_bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return emu_bit_cast<int>(f); }
inline float __int_as_float(int i) { return emu_bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return emu_bit_cast<float>(u); }
inline long long __double_as_longlong(double d) { return emu_bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return emu_bit_cast<double>(i); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

// ---------------------------------------------------------------- half types
// 16-bit storage only, no implicit conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__): every conversion goes through a named intrinsic.
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __half2float(__half h) { return static_cast<float>(emu_bit_cast<_Float16>(h.__x)); }
inline __half __float2half_rn(float f) {  // _Float16 conversion rounds to nearest even
  return __half{emu_bit_cast<unsigned short>(static_cast<_Float16>(f))};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
