// What the CPU kernels (csrc/cpu/<family>.cpp) share.
#pragma once

// The intrinsics, without GCC's false alarms from inside <immintrin.h>: its AVX-512
// functions start from an undefined vector (`__m512 __Y = __Y;`), which -Wall reports as
// uninitialized at every call inlined into our kernels (GCC 12: 352 warnings a build).
// Only the header's own code is exempt; ours keeps the warnings. Before anything else
// (ATen includes the header too): every CPU source includes this file first.
#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#if defined(AEFAST_EMULATE_AVX512)  // a test build: see avx512_emulation.h
#include "avx512_emulation.h"
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "aefast/hd.h"

// Inlined into the caller, whose SIMD clone then vectorizes it.
#define AEFAST_INLINE inline __attribute__((always_inline))

// Run-time CPU dispatch for the hot loops: the compiler emits an AVX-512, an
// AVX2+FMA and a baseline copy of each function marked AEFAST_SIMD_CLONES and the
// loader picks one for the CPU at hand, so a build runs on any x86-64 (never
// -march=native) yet uses the widest vectors there.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AEFAST_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AEFAST_SIMD_CLONES
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>

namespace aefast {
namespace cpu {

// Fresh outputs. A large new tensor is fresh pages from the OS, and faulting them in
// 4 KB at a time costs more than filling them: a 50 MB fill ran 28 ms in 4 KB pages
// and 7 ms in 2 MB ones on the 2-thread dev machine. So large outputs ask for
// transparent huge pages (what torch's own THP_MEM_ALLOC_ENABLE=1 does for every
// allocation), before anything touches them. Only a hint: where THP is off, or the
// memory was already in use, nothing changes.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t data = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (data + out.nbytes()) & ~(kHugePage - 1);
  if (out.nbytes() >= 4 * kHugePage && end > begin)
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // failure is harmless
#endif
  return out;
}

inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.options()); }

// Outputs from this size on are written around the caches (streamed), no read for
// ownership of their lines first: corrupt and reparameterize (noise.cpp's write_block;
// not noisy_linear's windows, which its matmul reads at once). Measured on the AMD EPYC
// (32 MiB L3), corrupt and reparameterize, the contenders alternating: a 64 MiB output
// streamed took 0.65-0.85x the time, a 16 MiB one 1.05-1.1x (it would have stayed in L3
// for its reader). The selections' mostly zero outputs stream from a smaller size
// (topk.cpp's kStreamedSelectionBytes).
constexpr int64_t kStreamedOutputBytes = int64_t(32) << 20;

// After a thread's streamed (non-temporal) stores: ordered before anything it does next.
inline void fence_streams() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
// The hand-written AVX2 paths' instruction set: AVX2 with FMA, F16C and POPCNT (which
// GCC enables with AVX2 anyway; named for the intrinsic), which every AVX2 CPU has
// (simd_level() checks all four). Their calls into code of the default target (SSE)
// get a vzeroupper first only because setup.py builds with -fno-ipa-ra: without it, SSE
// code after 256-bit code ran at a state-switch penalty (on the AMD EPYC a trivial call
// from an AVX2 loop took 115 ns, with it 4.5 ns; one such call per row had cost
// topk_forward 4-10%).
#define AEFAST_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
// The hand-written AVX-512 paths' (simd_level() checks both); in the emulated build
// (avx512_emulation.h) AVX2 code like the rest.
#if defined(AEFAST_EMULATE_AVX512)
#define AEFAST_AVX512 AEFAST_AVX2
#else
#define AEFAST_AVX512 __attribute__((target("avx512f,avx512bw")))
#endif

// out[0, n) = from[0, n), written around the caches: both on 32-byte boundaries, n a
// multiple of 8, AVX2 (simd_level() >= Simd::kAvx2). The caller fences.
AEFAST_AVX2 inline void stream_floats(const float* from, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(out + i, _mm256_load_ps(from + i));
}

// The lanes `in` of 16 at p (the rest zero, not read), and v's lanes `in` into p: a
// masked instruction only where some lane is out. On AMD's Zen 5 masked loads and
// stores of memory beyond the caches ran slower than plain ones even with every lane
// in (a streamed read 1.6-2.1x the time, a streamed write 1.4x; alike in L1).
// loaded(): a plain load's value as an opaque register, so that GCC cannot fold a
// masked move or operation on it back into a masked load (it did so for corrupt's
// masking: 1.6-2.6x the AVX2 path's time at 4096 x 4096, one thread).
AEFAST_AVX512 inline __m512 loaded(__m512 v) {
#if !defined(AEFAST_EMULATE_AVX512)
  asm("" : "+v"(v));
#endif
  return v;
}
AEFAST_AVX512 inline __m512 load16_in(const float* p, __mmask16 in) {
  return in == 0xFFFF ? loaded(_mm512_loadu_ps(p)) : _mm512_maskz_loadu_ps(in, p);
}
AEFAST_AVX512 inline __m512i load16_in(const int32_t* p, __mmask16 in) {
  return in == 0xFFFF ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(in, p);
}
AEFAST_AVX512 inline __m512i load16_in(const uint32_t* p, __mmask16 in) {
  return load16_in(reinterpret_cast<const int32_t*>(p), in);
}
AEFAST_AVX512 inline void store16_in(float* p, __mmask16 in, __m512 v) {
  if (in == 0xFFFF) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, in, v);
  }
}

// 16 (AVX-512) or 8 (AVX2) elements from p as float32: exact for float16 and bfloat16
// (a bfloat16 is a float32's high half).
template <typename E>
AEFAST_AVX512 inline __m512 load16_as_float(const E* p) {
  if constexpr (std::is_same_v<E, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<E, at::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

template <typename E>
AEFAST_AVX2 inline __m256 load8_as_float(const E* p) {
  if constexpr (std::is_same_v<E, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<E, at::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}
#endif

// The hand-written vector paths (intrinsics, next to a portable loop): the widest the
// CPU has, or narrower where the environment variable AEFAST_SIMD says so ("avx2",
// "none"), so that tests run every path on any machine. Read once, at the first call.
// (The AEFAST_SIMD_CLONES copies are the loader's choice, by the CPU alone.)
enum class Simd { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

inline Simd simd_level() {
  static const Simd level = [] {
    Simd cpu = Simd::kNone;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("popcnt"))
      cpu = Simd::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) cpu = Simd::kAvx512;
#if defined(AEFAST_EMULATE_AVX512)
    if (cpu == Simd::kAvx2) cpu = Simd::kAvx512;
#endif
#endif
    const char* asked = std::getenv("AEFAST_SIMD");
    Simd cap = Simd::kAvx512;
    if (asked != nullptr && std::strcmp(asked, "avx2") == 0) cap = Simd::kAvx2;
    if (asked != nullptr && std::strcmp(asked, "none") == 0) cap = Simd::kNone;
    return cpu < cap ? cpu : cap;
  }();
  return level;
}

// The dtype of the per-unit statistics a forward returns: acc_t of the data.
inline at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Column sums over fixed chunks of rows, the chunks then added in order in double:
// the result does not depend on the number of threads.
template <typename A, typename ChunkFn>
std::vector<double> column_sums(int64_t B, int64_t H, const ChunkFn& add_chunk) {
  const int64_t chunk = std::max<int64_t>(64, (B + 63) / 64);
  const int64_t n_chunks = (B + chunk - 1) / chunk;
  std::vector<A> partial(static_cast<size_t>(n_chunks * H), A(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk;
      add_chunk(r0, std::min(B, r0 + chunk) - r0, partial.data() + c * H);
    }
  });
  std::vector<double> sums(static_cast<size_t>(H), 0.0);
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t j = 0; j < H; ++j) sums[j] += static_cast<double>(partial[c * H + j]);
  return sums;
}

// Rows [0, B) split among threads; fn(first_row, n_rows).
template <typename Fn>
void for_rows(int64_t B, int64_t H, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));
  at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) { fn(r0, r1 - r0); });
}

}  // namespace cpu
}  // namespace aefast
