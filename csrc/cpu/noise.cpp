// CPU kernels of the noise-injection family: corrupt and reparameterize. Every
// random number is Philox4x32-10 of (seed, logical element index) (philox.h), so a
// result does not depend on the thread count or on how the work is split, and the
// backward regenerates the noise from the seed instead of saving it.
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "../noise_args.h"
#include "aefast/philox.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include "noise_avx2.h"
#include "noise_avx512.h"
#endif

namespace aefast {
namespace cpu {
namespace {

namespace nz = aefast::noise;

uint64_t read_seed(const at::Tensor& seed, const at::Tensor& like) {
  noise_args::check_seed(seed, like);
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// ---- draws: blocks of 64 Philox counters, 256 elements ----

constexpr int64_t kBlockCounters = 64;
constexpr int64_t kBlockElements = kBlockCounters * nz::kDrawsPerCounter;

// The four words of kBlockCounters consecutive counters, one array per word. The
// block starts at a multiple of 64, so the counters' high words are all equal.
struct BlockWords {
  alignas(64) uint32_t w[4][kBlockCounters];
};

AEFAST_SIMD_CLONES void philox_block_portable(uint64_t seed, uint64_t first_counter, BlockWords& out) {
  for (int64_t c = 0; c < kBlockCounters; ++c) {
    const nz::Bits4 r = nz::philox(seed, first_counter + static_cast<uint64_t>(c));
    out.w[0][c] = r.a;
    out.w[1][c] = r.b;
    out.w[2][c] = r.c;
    out.w[3][c] = r.d;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Philox for 8 counters per instruction with AVX2 (noise_avx2.h). GCC's own
// vectorization of nz::philox widens every lane to 64 bits and runs ~3x slower. Same
// words, bit for bit (tested against the reference).
AEFAST_AVX2 void philox_block_avx2(uint64_t seed, uint64_t first_counter, BlockWords& out) {
  const noise_avx2::PhiloxKeys keys = noise_avx2::philox_keys(seed);
  for (int64_t c = 0; c < kBlockCounters; c += 8) {
    __m256i w[1][4];
    noise_avx2::philox8<1>(keys, first_counter + static_cast<uint64_t>(c), w);
    for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[j] + c), w[0][j]);
  }
}

// The same with AVX-512 (noise_avx512.h): 16 counters per instruction and fewer
// instructions per round. Philox is most of a uniform draw's cost.
AEFAST_AVX512 void philox_block_avx512(uint64_t seed, uint64_t first_counter, BlockWords& out) {
  const noise_avx512::PhiloxKeys keys = noise_avx512::philox_keys(seed);
  for (int64_t c = 0; c < kBlockCounters; c += 16) {
    __m512i w[1][4];  // (interleaving the block's four groups measured the same)
    noise_avx512::philox16<1>(keys, first_counter + static_cast<uint64_t>(c), w);
    for (int j = 0; j < 4; ++j) _mm512_store_si512(out.w[j] + c, w[0][j]);
  }
}

#endif

void philox_block(uint64_t seed, uint64_t first_counter, BlockWords& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() >= Simd::kAvx512) return philox_block_avx512(seed, first_counter, out);
  if (simd_level() >= Simd::kAvx2) return philox_block_avx2(seed, first_counter, out);
#endif
  philox_block_portable(seed, first_counter, out);
}

// Words to draws, in element order (element 4 c + j: word j of counter c).
template <bool kNormal>
AEFAST_INLINE void words_to_draws(const BlockWords& words, float* draws) {
  for (int64_t c = 0; c < kBlockCounters; ++c) {
    float* d = draws + nz::kDrawsPerCounter * c;
    if (kNormal) {
      nz::normal_pair(words.w[0][c], words.w[1][c], d, d + 1);
      nz::normal_pair(words.w[2][c], words.w[3][c], d + 2, d + 3);
    } else {
      for (int j = 0; j < nz::kDrawsPerCounter; ++j) d[j] = nz::uniform(words.w[j][c]);
    }
  }
}
AEFAST_SIMD_CLONES void uniforms_of(const BlockWords& words, float* draws) { words_to_draws<false>(words, draws); }
AEFAST_SIMD_CLONES void normals_of(const BlockWords& words, float* draws) { words_to_draws<true>(words, draws); }

// fn(block, first element, elements, draws) for the part of each block that lies in
// elements [begin, end), blocks b0..b1 (those overlapping the range) in turn. Block b
// always holds elements [256 b, 256 b + 256): results do not depend on how the
// work is split.
template <typename Fn>
AEFAST_INLINE void blocks_in(int64_t begin, int64_t end, int64_t b0, int64_t b1, uint64_t seed, bool normal,
                             const Fn& fn) {
  alignas(64) float draws[kBlockElements];
  BlockWords words;
  for (int64_t b = b0; b < b1; ++b) {
    philox_block(seed, static_cast<uint64_t>(b * kBlockCounters), words);
    normal ? normals_of(words, draws) : uniforms_of(words, draws);
    const int64_t e0 = std::max(begin, b * kBlockElements), e1 = std::min(end, (b + 1) * kBlockElements);
    fn(b, e0, e1 - e0, draws + (e0 - b * kBlockElements));
  }
}

// fn(b0, b1) on ranges of the blocks that elements [begin, end) meet, split among
// threads; each thread fences its streamed stores before it returns.
template <typename Fn>
void parallel_blocks(int64_t begin, int64_t end, const Fn& fn) {
  if (end <= begin) return;
  at::parallel_for(begin / kBlockElements, (end - 1) / kBlockElements + 1, 64, [&](int64_t b0, int64_t b1) {
    fn(b0, b1);
    fence_streams();
  });
}

// Elements [begin, end), their blocks split among threads (parallel_blocks).
template <typename Fn>
void for_each_block(int64_t begin, int64_t end, uint64_t seed, bool normal, const Fn& fn) {
  parallel_blocks(begin, end, [&](int64_t b0, int64_t b1) { blocks_in(begin, end, b0, b1, seed, normal, fn); });
}
template <typename Fn>
void for_each_block(int64_t n, uint64_t seed, bool normal, const Fn& fn) {
  for_each_block(0, n, seed, normal, fn);
}

// The n results that compute(to) writes, into out. With `stream`, float32 in whole
// 64-byte lines goes through a block-sized buffer in L1 and is streamed to out: a fresh
// output is then not read for ownership before it is written (a third of corrupt's
// memory traffic). The thread fences before it returns (for_each_block, corrupt_rows).
template <typename T, typename Compute>
AEFAST_INLINE void write_block(T* out, int64_t n, bool stream, const Compute& compute) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream && simd_level() >= Simd::kAvx2 && reinterpret_cast<uintptr_t>(out) % 64 == 0 && n % 16 == 0) {
      alignas(64) float staged[kBlockElements];
      compute(staged);
      stream_floats(staged, out, n);
      return;
    }
  }
#endif
  compute(out);
}

// ---- per-span loops over elements and their draws ----

template <int kKind, typename T, typename A>
AEFAST_INLINE void corrupt_span(const T* x, T* out, int64_t n, const float* draws, float level, A scale,
                                A low, A high) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(nz::corrupt_element<kKind, A>(static_cast<A>(x[i]), draws[i], level, scale, low, high));
}

template <typename T, typename A>
AEFAST_INLINE void corrupt_span_any(int kind, const T* x, T* out, int64_t n, const float* draws, float level,
                                    A scale, A low, A high) {
  switch (kind) {
    case nz::kGaussian: return corrupt_span<nz::kGaussian>(x, out, n, draws, level, scale, low, high);
    case nz::kMasking: return corrupt_span<nz::kMasking>(x, out, n, draws, level, scale, low, high);
    case nz::kSaltPepper: return corrupt_span<nz::kSaltPepper>(x, out, n, draws, level, scale, low, high);
    default: return corrupt_span<nz::kDropout>(x, out, n, draws, level, scale, low, high);
  }
}

// z = mu + eps * std; terms[i] = 1 + logvar - mu^2 - std^2 (summed by the caller).
template <typename T, typename A>
AEFAST_INLINE void reparameterize_span(const T* mu, const T* logvar, T* z, A* terms, int64_t n,
                                       const float* eps) {
  for (int64_t i = 0; i < n; ++i) {
    const A m = static_cast<A>(mu[i]), lv = static_cast<A>(logvar[i]);
    const A sd = nz::std_from_logvar(lv);
    z[i] = static_cast<T>(m + static_cast<A>(eps[i]) * sd);
    terms[i] = A(1) + lv - m * m - sd * sd;
  }
}

template <typename T, typename A>
AEFAST_INLINE void reparameterize_grad_span(const T* gz, const T* mu, const T* logvar, T* gmu, T* glv, int64_t n,
                                            const float* eps, A gkl_over_b) {
  for (int64_t i = 0; i < n; ++i) {
    const A g = static_cast<A>(gz[i]), lv = static_cast<A>(logvar[i]);
    const A sd = nz::std_from_logvar(lv);
    gmu[i] = static_cast<T>(g + gkl_over_b * static_cast<A>(mu[i]));
    glv[i] = static_cast<T>(A(0.5) * (g * static_cast<A>(eps[i]) * sd + gkl_over_b * (sd * sd - A(1))));
  }
}

// A block's terms summed in double in a fixed order: 16 running sums, then added in
// turn. One running sum is a chain of dependent adds, the slowest part of the forward.
template <typename A>
AEFAST_INLINE double block_sum(const A* terms, int64_t n) {
  double partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t j = 0; j < 16; ++j) partial[j] += static_cast<double>(terms[i + j]);
  for (; i < n; ++i) partial[i % 16] += static_cast<double>(terms[i]);
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// float32: the same loops compiled per instruction set (common.h).
AEFAST_SIMD_CLONES void corrupt_span_any(int kind, const float* x, float* out, int64_t n, const float* draws,
                                         float level, float scale, float low, float high) {
  corrupt_span_any<float, float>(kind, x, out, n, draws, level, scale, low, high);
}
AEFAST_SIMD_CLONES void reparameterize_span(const float* mu, const float* logvar, float* z, float* terms, int64_t n,
                                            const float* eps) {
  reparameterize_span<float, float>(mu, logvar, z, terms, n, eps);
}
AEFAST_SIMD_CLONES void reparameterize_grad_span(const float* gz, const float* mu, const float* logvar, float* gmu,
                                                 float* glv, int64_t n, const float* eps, float gkl_over_b) {
  reparameterize_grad_span<float, float>(gz, mu, logvar, gmu, glv, n, eps, gkl_over_b);
}
AEFAST_SIMD_CLONES double block_sum(const float* terms, int64_t n) { return block_sum<float>(terms, n); }

#if defined(__x86_64__) && defined(__GNUC__)
// float32 reparameterize with AVX-512: each 64 elements' normals made in registers
// (noise_avx512.h) and used at once, never stored. The loops above, vectorized by the
// compiler, store words, draws and terms between passes: at 1024 x 4096 their forward
// took 3.55 ms (normals_of 40% of it), this 2.74. Its KL sums each block's terms in float
// (below): the same seed gives a kl a few ulps apart on machines without AVX2 (where the
// loops above sum in double).

// What the corrupt kernels with draws in registers need (float32): elements [begin,
// end) of x into out, and with grad (else null) the same draws mask grad in place.
struct RegisterCorrupt {
  const float* x;
  float* out;
  float* grad;
  int64_t begin, end;
  float level, scale, low, high;
  bool stream;
};

// The lanes of elements [at, at + 16) in [begin, end).
inline __mmask16 lanes_in(int64_t at, int64_t begin, int64_t end) {
  const int64_t low = std::clamp<int64_t>(begin - at, 0, 16), high = std::clamp<int64_t>(end - at, 0, 16);
  return static_cast<__mmask16>(((1u << high) - 1u) & ~((1u << low) - 1u));
}

// v into to[0, 16): streamed when asked and all lanes are in (whole 64-byte lines).
AEFAST_AVX512 inline void store16(float* to, __mmask16 in, __m512 v, bool stream) {
  if (stream && in == 0xFFFF) {
    _mm512_stream_ps(to, v);
  } else {
    store16_in(to, in, v);
  }
}

// How many groups of counters go through Philox's rounds side by side
// (noise_avx512::philox16, noise_avx2::philox8), per kernel. Two: gaussian corrupt at
// 1024 x 4096 (2 threads, Xeon) 2.10 -> 1.91 ms with AVX-512, 3.66 -> 3.21 with AVX2, and
// at 4096 x 4096 8.7 -> 7.8 and 14.3 -> 13.6. reparameterize's forward gained as much at
// 1024 x 4096 (2.76 -> 2.58, 4.53 -> 3.96) but lost where its output is streamed (4096 x
// 4096: 16.9 -> 21.4 ms, with AVX2 26.5 -> 28.3; why, not found), and its backward gained
// nothing: reparameterize takes two only for an output in the caches. Four (spills) was
// no better anywhere measured.
constexpr int kNormalGroups = 2;

// step(at, in, draws) for each 16 elements [at, at + 16) of blocks [b0, b1) that meet
// elements [begin, end), with their normals or uniforms (in: the lanes in the range);
// step.block_done(b, sums) after each block, sums the lane-wise sum of what step
// returned for it (kept in a register, not in the step).
template <bool kNormal, int kGroups, typename Step>
AEFAST_AVX512 inline void for_each_draw16(uint64_t seed, int64_t begin, int64_t end, int64_t b0, int64_t b1,
                                          Step& step) {
  const noise_avx512::PhiloxKeys keys = noise_avx512::philox_keys(seed);
  for (int64_t b = b0; b < b1; ++b) {
    __m512 sums = _mm512_setzero_ps();
    // (A group wholly outside [begin, end) gets no lanes.)
    for (int64_t c = 0; c < kBlockCounters && b * kBlockElements + 4 * c < end; c += 16 * kGroups) {
      if (b * kBlockElements + 4 * (c + 16 * kGroups) <= begin) continue;
      __m512 eps[kGroups][4];
      noise_avx512::draws64<kNormal, kGroups>(keys, static_cast<uint64_t>(b * kBlockCounters + c), eps);
      for (int v = 0; v < 4 * kGroups; ++v) {
        const int64_t at = b * kBlockElements + 4 * c + 16 * v;
        sums = _mm512_add_ps(sums, step(at, lanes_in(at, begin, end), eps[v / 4][v % 4]));
      }
    }
    step.block_done(b, sums);
  }
}

// The forward: z, and each block's sum of terms: 16 running sums (lane j: the block's
// elements j, j + 16, ...), in float within the block (16 terms each; in double they
// cost a tenth of the forward), added in double.
struct ReparameterizeStep {
  const float *mu, *logvar;
  float* z;
  bool stream;
  double* block_sums;

  AEFAST_AVX512 __m512 operator()(int64_t at, __mmask16 in, __m512 eps) {
    const __m512 m = load16_in(mu + at, in), lv = load16_in(logvar + at, in);
    const __m512 sd = noise_avx512::exp_poly(_mm512_mul_ps(_mm512_set1_ps(0.5f), lv));
    store16(z + at, in, _mm512_fmadd_ps(eps, sd, m), stream);
    // 1 + logvar - mu^2 - std^2; 0 in the lanes past n (1 + 0 - 0 - 1).
    return _mm512_fnmadd_ps(sd, sd, _mm512_fnmadd_ps(m, m, _mm512_add_ps(_mm512_set1_ps(1.0f), lv)));
  }
  AEFAST_AVX512 void block_done(int64_t b, __m512 sums) {
    alignas(64) float partial[16];
    _mm512_store_ps(partial, sums);
    double sum = 0.0;
    for (float p : partial) sum += static_cast<double>(p);
    block_sums[b] = sum;
  }
};

// The backward: the gradients of mu and logvar.
struct ReparameterizeGradStep {
  const float *gz, *mu, *logvar;
  float *gmu, *glv;
  bool stream;
  float gkl_over_b;

  AEFAST_AVX512 __m512 operator()(int64_t at, __mmask16 in, __m512 eps) {
    const __m512 g = load16_in(gz + at, in), m = load16_in(mu + at, in);
    const __m512 lv = load16_in(logvar + at, in), gkl = _mm512_set1_ps(gkl_over_b);
    const __m512 half = _mm512_set1_ps(0.5f), sd = noise_avx512::exp_poly(_mm512_mul_ps(half, lv));
    store16(gmu + at, in, _mm512_fmadd_ps(gkl, m, g), stream);
    const __m512 prior = _mm512_mul_ps(gkl, _mm512_fmsub_ps(sd, sd, _mm512_set1_ps(1.0f)));
    store16(glv + at, in, _mm512_mul_ps(half, _mm512_fmadd_ps(_mm512_mul_ps(g, eps), sd, prior)), stream);
    return _mm512_setzero_ps();  // nothing to sum
  }
  AEFAST_AVX512 void block_done(int64_t, __m512) {}
};

// Corruption of elements [begin, end) by noise::corrupt_element's formulas, its draw a
// normal for gaussian noise, else a uniform: x and out (and grad) point at element begin
// (the lanes of a vector before it are masked off, never read). The uniform kinds were
// the loops over stored draws until 2026-12-07: on an AVX2-only AMD EPYC (2 threads),
// alternating, masking at 1024 x 4096 2.84-2.91 -> 2.06-2.12 ms, dropout 2.6-2.7 ->
// 2.1, salt and pepper 2.53 -> 2.20, masking at 4096 x 4096 9.7 -> 8.0.
template <int kKind>
struct CorruptStep {
  const RegisterCorrupt& a;

  AEFAST_AVX512 __m512 corrupted(__m512 v, __m512 draw, float low, float high) const {
    if (kKind == nz::kGaussian) return _mm512_fmadd_ps(_mm512_set1_ps(a.level), draw, v);
    const __mmask16 hit = _mm512_cmp_ps_mask(draw, _mm512_set1_ps(a.level), _CMP_LT_OQ);
    if (kKind == nz::kMasking) return _mm512_maskz_mov_ps(static_cast<__mmask16>(~hit), v);
    if (kKind == nz::kDropout) return _mm512_maskz_mul_ps(static_cast<__mmask16>(~hit), v, _mm512_set1_ps(a.scale));
    const __mmask16 low_hit = _mm512_cmp_ps_mask(draw, _mm512_set1_ps(0.5f * a.level), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(hit, v, _mm512_mask_blend_ps(low_hit, _mm512_set1_ps(high), _mm512_set1_ps(low)));
  }
  AEFAST_AVX512 __m512 operator()(int64_t at, __mmask16 in, __m512 draw) {
    const int64_t i = at - a.begin;
    store16(a.out + i, in, corrupted(load16_in(a.x + i, in), draw, a.low, a.high), a.stream);
    if (kKind != nz::kGaussian && a.grad != nullptr)  // masked in place: low = high = 0
      store16_in(a.grad + i, in, corrupted(load16_in(a.grad + i, in), draw, 0.0f, 0.0f));
    return _mm512_setzero_ps();
  }
  AEFAST_AVX512 void block_done(int64_t, __m512) {}
};

template <int kKind>
AEFAST_AVX512 void corrupt_avx512(uint64_t seed, RegisterCorrupt a, int64_t b0, int64_t b1) {
  a.stream = a.stream && (reinterpret_cast<uintptr_t>(a.out) - 4 * static_cast<uintptr_t>(a.begin)) % 64 == 0;
  CorruptStep<kKind> step{a};
  for_each_draw16<kKind == nz::kGaussian, kNormalGroups>(seed, a.begin, a.end, b0, b1, step);
}

AEFAST_AVX512 void reparameterize_blocks_avx512(uint64_t seed, const float* mu, const float* logvar, float* z,
                                                int64_t n, int64_t b0, int64_t b1, bool stream, double* block_sums) {
  ReparameterizeStep step{mu, logvar, z, stream && reinterpret_cast<uintptr_t>(z) % 64 == 0, block_sums};
  if (step.stream)  // one group where the output is streamed (kNormalGroups)
    for_each_draw16<true, 1>(seed, 0, n, b0, b1, step);
  else
    for_each_draw16<true, kNormalGroups>(seed, 0, n, b0, b1, step);
}

AEFAST_AVX512 void reparameterize_grad_blocks_avx512(uint64_t seed, const float* gz, const float* mu,
                                                     const float* logvar, float* gmu, float* glv, int64_t n,
                                                     int64_t b0, int64_t b1, bool stream, float gkl_over_b) {
  stream = stream && reinterpret_cast<uintptr_t>(gmu) % 64 == 0 && reinterpret_cast<uintptr_t>(glv) % 64 == 0;
  ReparameterizeGradStep step{gz, mu, logvar, gmu, glv, stream, gkl_over_b};
  for_each_draw16<true, 1>(seed, 0, n, b0, b1, step);
}

// The same with AVX2 and FMA, for CPUs without AVX-512: the steps above on 8 lanes
// (noise_avx2.h), two running sums standing for the 16 lanes of the AVX-512 one (lane
// j of the first: the block's elements j, j + 16, ...; of the second: j + 8, j + 24,
// ...), added in the same order: z, kl and the gradients are the AVX-512 path's bit for
// bit. The forward at 1024 x 4096 on one thread of an Intel Xeon, built for AVX2 and FMA
// alone (as the loops' SIMD clones are on such a CPU): 12.7-13.9 ms through the loops
// above, 8.9 ms this way.

// The lanes of elements [at, at + 8) in [begin, end): all ones.
AEFAST_AVX2 inline __m256i lanes_in8(int64_t at, int64_t begin, int64_t end) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int low = static_cast<int>(std::clamp<int64_t>(begin - at, 0, 8));
  const int high = static_cast<int>(std::clamp<int64_t>(end - at, 0, 8));
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(low), lane),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(high), lane));
}

AEFAST_AVX2 inline __m256 load8(const float* from, bool whole, __m256i in) {
  return whole ? _mm256_loadu_ps(from) : _mm256_maskload_ps(from, in);
}

// v into to[0, 8): streamed when asked and all lanes are in (to is 32-byte aligned then).
AEFAST_AVX2 inline void store8(float* to, bool whole, __m256i in, __m256 v, bool stream) {
  if (whole && stream) {
    _mm256_stream_ps(to, v);
  } else if (whole) {
    _mm256_storeu_ps(to, v);
  } else {
    _mm256_maskstore_ps(to, in, v);
  }
}

// step(at, whole, in, draws) for each 8 elements [at, at + 8) of blocks [b0, b1) that
// meet elements [begin, end), with their normals or uniforms (whole: all 8 in the range;
// else in: the lanes in it); step.block_done(b, sums) after each block.
template <bool kNormal, int kGroups, typename Step>
AEFAST_AVX2 inline void for_each_draw8(uint64_t seed, int64_t begin, int64_t end, int64_t b0, int64_t b1,
                                       Step& step) {
  const noise_avx2::PhiloxKeys keys = noise_avx2::philox_keys(seed);
  for (int64_t b = b0; b < b1; ++b) {
    __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < kBlockCounters && b * kBlockElements + 4 * c < end; c += 8 * kGroups) {
      if (b * kBlockElements + 4 * (c + 8 * kGroups) <= begin) continue;
      __m256 eps[kGroups][4];
      noise_avx2::draws32<kNormal, kGroups>(keys, static_cast<uint64_t>(b * kBlockCounters + c), eps);
      for (int v = 0; v < 4 * kGroups; ++v) {
        const int64_t at = b * kBlockElements + 4 * c + 8 * v;
        const bool whole = at >= begin && at + 8 <= end;
        sums[v & 1] = _mm256_add_ps(sums[v & 1],
                                    step(at, whole, whole ? __m256i{} : lanes_in8(at, begin, end), eps[v / 4][v % 4]));
      }
    }
    step.block_done(b, sums);
  }
}

struct ReparameterizeStep8 {
  const float *mu, *logvar;
  float* z;
  bool stream;
  double* block_sums;

  AEFAST_AVX2 __m256 operator()(int64_t at, bool whole, __m256i in, __m256 eps) {
    const __m256 m = load8(mu + at, whole, in), lv = load8(logvar + at, whole, in);
    const __m256 sd = noise_avx2::exp_poly(_mm256_mul_ps(_mm256_set1_ps(0.5f), lv));
    store8(z + at, whole, in, _mm256_fmadd_ps(eps, sd, m), stream);
    return _mm256_fnmadd_ps(sd, sd, _mm256_fnmadd_ps(m, m, _mm256_add_ps(_mm256_set1_ps(1.0f), lv)));
  }
  AEFAST_AVX2 void block_done(int64_t b, const __m256 sums[2]) {
    alignas(32) float partial[16];
    _mm256_store_ps(partial, sums[0]);
    _mm256_store_ps(partial + 8, sums[1]);
    double sum = 0.0;
    for (float p : partial) sum += static_cast<double>(p);
    block_sums[b] = sum;
  }
};

struct ReparameterizeGradStep8 {
  const float *gz, *mu, *logvar;
  float *gmu, *glv;
  bool stream;
  float gkl_over_b;

  AEFAST_AVX2 __m256 operator()(int64_t at, bool whole, __m256i in, __m256 eps) {
    const __m256 g = load8(gz + at, whole, in), m = load8(mu + at, whole, in), lv = load8(logvar + at, whole, in);
    const __m256 gkl = _mm256_set1_ps(gkl_over_b);
    const __m256 half = _mm256_set1_ps(0.5f), sd = noise_avx2::exp_poly(_mm256_mul_ps(half, lv));
    store8(gmu + at, whole, in, _mm256_fmadd_ps(gkl, m, g), stream);
    const __m256 prior = _mm256_mul_ps(gkl, _mm256_fmsub_ps(sd, sd, _mm256_set1_ps(1.0f)));
    store8(glv + at, whole, in, _mm256_mul_ps(half, _mm256_fmadd_ps(_mm256_mul_ps(g, eps), sd, prior)), stream);
    return _mm256_setzero_ps();
  }
  AEFAST_AVX2 void block_done(int64_t, const __m256*) {}
};

template <int kKind>
struct CorruptStep8 {
  const RegisterCorrupt& a;

  AEFAST_AVX2 __m256 corrupted(__m256 v, __m256 draw, float low, float high) const {
    if (kKind == nz::kGaussian) return _mm256_fmadd_ps(_mm256_set1_ps(a.level), draw, v);
    const __m256 hit = _mm256_cmp_ps(draw, _mm256_set1_ps(a.level), _CMP_LT_OQ);
    if (kKind == nz::kMasking) return _mm256_andnot_ps(hit, v);
    if (kKind == nz::kDropout) return _mm256_andnot_ps(hit, _mm256_mul_ps(v, _mm256_set1_ps(a.scale)));
    const __m256 low_hit = _mm256_cmp_ps(draw, _mm256_set1_ps(0.5f * a.level), _CMP_LT_OQ);
    return _mm256_blendv_ps(v, _mm256_blendv_ps(_mm256_set1_ps(high), _mm256_set1_ps(low), low_hit), hit);
  }
  AEFAST_AVX2 __m256 operator()(int64_t at, bool whole, __m256i in, __m256 draw) {
    const int64_t i = at - a.begin;
    store8(a.out + i, whole, in, corrupted(load8(a.x + i, whole, in), draw, a.low, a.high), a.stream);
    if (kKind != nz::kGaussian && a.grad != nullptr)  // masked in place: low = high = 0
      store8(a.grad + i, whole, in, corrupted(load8(a.grad + i, whole, in), draw, 0.0f, 0.0f), false);
    return _mm256_setzero_ps();
  }
  AEFAST_AVX2 void block_done(int64_t, const __m256*) {}
};

template <int kKind>
AEFAST_AVX2 void corrupt_avx2(uint64_t seed, RegisterCorrupt a, int64_t b0, int64_t b1) {
  a.stream = a.stream && (reinterpret_cast<uintptr_t>(a.out) - 4 * static_cast<uintptr_t>(a.begin)) % 32 == 0;
  CorruptStep8<kKind> step{a};
  for_each_draw8<kKind == nz::kGaussian, kNormalGroups>(seed, a.begin, a.end, b0, b1, step);
}

AEFAST_AVX2 void reparameterize_blocks_avx2(uint64_t seed, const float* mu, const float* logvar, float* z, int64_t n,
                                            int64_t b0, int64_t b1, bool stream, double* block_sums) {
  ReparameterizeStep8 step{mu, logvar, z, stream && reinterpret_cast<uintptr_t>(z) % 32 == 0, block_sums};
  if (step.stream)  // one group where the output is streamed (kNormalGroups)
    for_each_draw8<true, 1>(seed, 0, n, b0, b1, step);
  else
    for_each_draw8<true, kNormalGroups>(seed, 0, n, b0, b1, step);
}

AEFAST_AVX2 void reparameterize_grad_blocks_avx2(uint64_t seed, const float* gz, const float* mu, const float* logvar,
                                                 float* gmu, float* glv, int64_t n, int64_t b0, int64_t b1,
                                                 bool stream, float gkl_over_b) {
  stream = stream && reinterpret_cast<uintptr_t>(gmu) % 32 == 0 && reinterpret_cast<uintptr_t>(glv) % 32 == 0;
  ReparameterizeGradStep8 step{gz, mu, logvar, gmu, glv, stream, gkl_over_b};
  for_each_draw8<true, 1>(seed, 0, n, b0, b1, step);
}

// corrupt of blocks [b0, b1) of a's range, draws in registers (simd: AVX-512 or AVX2).
void corrupt_in_registers(Simd simd, int kind, uint64_t seed, const RegisterCorrupt& a, int64_t b0, int64_t b1) {
  const bool wide = simd == Simd::kAvx512;
  switch (kind) {
    case nz::kGaussian: return (wide ? corrupt_avx512<nz::kGaussian> : corrupt_avx2<nz::kGaussian>)(seed, a, b0, b1);
    case nz::kMasking: return (wide ? corrupt_avx512<nz::kMasking> : corrupt_avx2<nz::kMasking>)(seed, a, b0, b1);
    case nz::kSaltPepper:
      return (wide ? corrupt_avx512<nz::kSaltPepper> : corrupt_avx2<nz::kSaltPepper>)(seed, a, b0, b1);
    default: return (wide ? corrupt_avx512<nz::kDropout> : corrupt_avx2<nz::kDropout>)(seed, a, b0, b1);
  }
}
#endif

// ---- operators ----

// Which of the kernels above with draws in registers t's dtype takes (float32 only):
// kNone for the loops over stored draws.
Simd register_draws_simd(const at::Tensor& t) {
#if defined(__x86_64__) && defined(__GNUC__)
  return t.scalar_type() == at::kFloat ? simd_level() : Simd::kNone;
#else
  return Simd::kNone;
#endif
}

// corrupt of a window x (R, C) of a row-major matrix with row_length columns, at
// (row_offset, col_offset): element (i, j) takes the draw of its index in the
// whole matrix, (row_offset + i) * row_length + col_offset + j. The CPU noisy_linear
// corrupts its input a cache-sized window at a time, just before the matmul of it:
// a window is never streamed (a 32 MiB one was, at 4096 x 4096, and the matmul then read
// it back from memory); `corrupt`, whose output has no reader yet, streams a large one.
// With grad (a window of x's shape and dtype, rows of unit stride), the same draws also
// mask grad in place as corrupt's gradient masks it (zero where hit, survivors scaled for
// dropout): the CPU noisy_linear's backward draws once for both its gradients. Not for
// gaussian noise, whose gradient is the identity.
at::Tensor corrupt_rows(const at::Tensor& x, int64_t row_offset, int64_t col_offset, int64_t row_length,
                        c10::string_view kind, double level, const at::Tensor& seed, double low, double high,
                        bool may_stream, const at::Tensor& grad = at::Tensor()) {
  const int k = noise_args::parse_kind(kind);
  noise_args::check_level(k, level);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a 2-D window, got ", x.dim(), "-D");
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(row_offset >= 0 && col_offset >= 0 && col_offset + C <= row_length,
                    "the window (", R, ", ", C, ") at (", row_offset, ", ", col_offset,
                    ") must lie in rows of row_length ", row_length);
  const bool with_grad = grad.defined();
  if (with_grad) {
    TORCH_CHECK_VALUE(k != nz::kGaussian, "grad: the gradient of gaussian noise is the identity, no mask");
    TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.stride(1) == 1,
                      "grad must be a window of x's shape ", x.sizes(), " and dtype ", x.scalar_type(),
                      " with rows of unit stride, got ", grad.sizes(), " ", grad.scalar_type(), " of strides ",
                      grad.strides());
  }
  const uint64_t s = read_seed(seed, x);
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor out = empty_output({R, C}, x.options());
  if (out.numel() == 0) return out;
  const Simd in_registers = register_draws_simd(xs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "corrupt_window", [&] {
    using A = acc_t<scalar_t>;
    const A scale = static_cast<A>(noise_args::survivor_scale(k, level));
    const scalar_t* src = xs.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = xs.stride(0);
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;  // masked in place
    const int64_t grad_stride = with_grad ? grad.stride(0) : 0;
    const bool stream = may_stream && out.nbytes() >= kStreamedOutputBytes;
    // float32 with AVX-512 or AVX2: each range's draws made in registers and used at
    // once. (Generic, so that the float32 call is compiled for float32 alone.)
    auto draws_in_registers = [&](const auto* from, auto* to, auto* to_grad, int64_t begin, int64_t end, int64_t b0,
                                  int64_t b1) {
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(from)>>, float>) {
        const RegisterCorrupt a{from, to, to_grad, begin, end, static_cast<float>(level), scale,
                                static_cast<float>(low), static_cast<float>(high), stream};
        corrupt_in_registers(in_registers, k, s, a, b0, b1);
      }
#endif
    };
    auto apply_to = [&](const scalar_t* from, scalar_t* to, int64_t ne, const float* draws, A lo, A hi) {
      write_block(to, ne, stream, [&](scalar_t* results) {
        corrupt_span_any(k, from, results, ne, draws, static_cast<float>(level), scale, lo, hi);
      });
    };
    // x's span [x_at, x_at + ne) and, with grad, grad's at grad_at (low = high = 0: the mask).
    auto apply = [&](int64_t x_at, int64_t out_at, int64_t grad_at, int64_t ne, const float* draws) {
      apply_to(src + x_at, dst + out_at, ne, draws, static_cast<A>(low), static_cast<A>(high));
      if (with_grad) apply_to(grad_data + grad_at, grad_data + grad_at, ne, draws, A(0), A(0));
    };
    const int64_t first = row_offset * row_length + col_offset;
    const bool grad_whole = !with_grad || grad_stride == C;  // else by rows, below
    if (C == row_length && stride == C && grad_whole) {  // whole rows: one range, split by blocks
      if (in_registers != Simd::kNone) {
        parallel_blocks(first, first + R * C, [&](int64_t b0, int64_t b1) {
          draws_in_registers(src, dst, grad_data, first, first + R * C, b0, b1);
        });
        return;
      }
      for_each_block(first, first + R * C, s, k == nz::kGaussian, [&](int64_t, int64_t e0, int64_t ne, const float* d) {
        apply(e0 - first, e0 - first, e0 - first, ne, d);
      });
      return;
    }
    at::parallel_for(0, R, std::max<int64_t>(1, kBlockElements * 16 / C), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t begin = first + i * row_length, end = begin + C;
        if (in_registers != Simd::kNone) {
          draws_in_registers(src + i * stride, dst + i * C, with_grad ? grad_data + i * grad_stride : nullptr, begin,
                             end, begin / kBlockElements, (end - 1) / kBlockElements + 1);
          continue;
        }
        blocks_in(begin, end, begin / kBlockElements, (end - 1) / kBlockElements + 1, s, k == nz::kGaussian,
                  [&](int64_t, int64_t e0, int64_t ne, const float* d) {
                    apply(i * stride + (e0 - begin), i * C + (e0 - begin), i * grad_stride + (e0 - begin), ne, d);
                  });
      }
      fence_streams();
    });
  });
  return out;
}

at::Tensor corrupt_window(const at::Tensor& x, int64_t row_offset, int64_t col_offset, int64_t row_length,
                          c10::string_view kind, double level, const at::Tensor& seed, double low, double high) {
  return corrupt_rows(x, row_offset, col_offset, row_length, kind, level, seed, low, high, false);
}

at::Tensor corrupt_window_and_mask(const at::Tensor& x, at::Tensor& grad, int64_t row_offset, int64_t col_offset,
                                   int64_t row_length, c10::string_view kind, double level, const at::Tensor& seed,
                                   double low, double high) {
  TORCH_CHECK_VALUE(grad.defined(), "grad must be a tensor");
  // An op that writes an argument takes no autograd formula: where one would be needed,
  // an error, not the autograd fallback's silent zero gradients.
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || grad.requires_grad())),
              "aefast::corrupt_window_and_mask has no derivative: call it under torch.no_grad() (as the CPU "
              "noisy_linear's backward does)");
  return corrupt_rows(x, row_offset, col_offset, row_length, kind, level, seed, low, high, false, grad);
}

// The whole of x (any shape) is one window: a row of x.numel() elements.
at::Tensor corrupt(const at::Tensor& x, c10::string_view kind, double level, const at::Tensor& seed,
                   double low, double high) {
  const int64_t n = x.numel();
  return corrupt_rows(x.contiguous().view({1, n}), 0, 0, n, kind, level, seed, low, high, true).view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> reparameterize_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                          const at::Tensor& seed) {
  noise_args::check_gaussian_params(mu, logvar);
  const uint64_t s = read_seed(seed, mu);
  const at::Tensor m = mu.contiguous(), lv = logvar.contiguous();
  const int64_t B = m.size(0);
  at::Tensor z = empty_output_like(m);
  const bool stream = z.nbytes() >= kStreamedOutputBytes;
  const int64_t n = m.numel();
  std::vector<double> block_sums(static_cast<size_t>((n + kBlockElements - 1) / kBlockElements), 0.0);
  const Simd simd = register_draws_simd(m);
  if (simd != Simd::kNone) {
#if defined(__x86_64__) && defined(__GNUC__)
    const auto blocks = simd == Simd::kAvx512 ? reparameterize_blocks_avx512 : reparameterize_blocks_avx2;
    parallel_blocks(0, n, [&](int64_t b0, int64_t b1) {
      blocks(s, m.const_data_ptr<float>(), lv.const_data_ptr<float>(), z.data_ptr<float>(), n, b0, b1, stream,
             block_sums.data());
    });
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize", [&] {
      using A = acc_t<scalar_t>;
      for_each_block(n, s, true, [&](int64_t b, int64_t e0, int64_t ne, const float* eps) {
        A terms[kBlockElements];
        write_block(z.data_ptr<scalar_t>() + e0, ne, stream, [&](scalar_t* results) {
          reparameterize_span(m.data_ptr<scalar_t>() + e0, lv.data_ptr<scalar_t>() + e0, results, terms, ne, eps);
        });
        block_sums[b] = block_sum(terms, ne);
      });
    });
  }
  double total = 0.0;
  for (double v : block_sums) total += v;
  return {z, at::scalar_tensor(-0.5 * total / static_cast<double>(std::max<int64_t>(B, 1)), m.options())};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                           const at::Tensor& mu, const at::Tensor& logvar,
                                                           const at::Tensor& seed) {
  noise_args::check_gaussian_params(mu, logvar);
  TORCH_CHECK_VALUE(grad_z.sizes() == mu.sizes(), "grad_z must have mu's shape");
  const uint64_t s = read_seed(seed, mu);
  const at::Tensor g = grad_z.to(mu.scalar_type()).contiguous(), m = mu.contiguous(), lv = logvar.contiguous();
  const int64_t B = m.size(0);
  at::Tensor grad_mu = empty_output_like(m), grad_lv = empty_output_like(m);
  const bool stream = grad_mu.nbytes() >= kStreamedOutputBytes;
  const double gkl_over_b = grad_kl.item<double>() / static_cast<double>(std::max<int64_t>(B, 1));
  const Simd simd = register_draws_simd(m);
  if (simd != Simd::kNone) {
#if defined(__x86_64__) && defined(__GNUC__)
    const int64_t n = m.numel();
    const auto blocks = simd == Simd::kAvx512 ? reparameterize_grad_blocks_avx512 : reparameterize_grad_blocks_avx2;
    parallel_blocks(0, n, [&](int64_t b0, int64_t b1) {
      blocks(s, g.const_data_ptr<float>(), m.const_data_ptr<float>(), lv.const_data_ptr<float>(),
             grad_mu.data_ptr<float>(), grad_lv.data_ptr<float>(), n, b0, b1, stream, static_cast<float>(gkl_over_b));
    });
#endif
    return {grad_mu, grad_lv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize_backward", [&] {
    using A = acc_t<scalar_t>;
    for_each_block(m.numel(), s, true, [&](int64_t, int64_t e0, int64_t ne, const float* eps) {
      write_block(grad_mu.data_ptr<scalar_t>() + e0, ne, stream, [&](scalar_t* gmu) {
        write_block(grad_lv.data_ptr<scalar_t>() + e0, ne, stream, [&](scalar_t* glv) {
          reparameterize_grad_span(g.data_ptr<scalar_t>() + e0, m.data_ptr<scalar_t>() + e0,
                                   lv.data_ptr<scalar_t>() + e0, gmu, glv, ne, eps, static_cast<A>(gkl_over_b));
        });
      });
    });
  });
  return {grad_mu, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("corrupt", &corrupt);
  m.impl("corrupt_window", &corrupt_window);
  m.impl("corrupt_window_and_mask", &corrupt_window_and_mask);
  m.impl("reparameterize_forward", &reparameterize_forward);
  m.impl("reparameterize_backward", &reparameterize_backward);
}

}  // namespace cpu
}  // namespace aefast
