// AVX-512 under emulation: the hand-written AVX-512 paths compiled for, and run on, a CPU
// without AVX-512, so that the tests check them on any machine (tests/test_topk.py's
// every-SIMD-path test; a separate build, made with AEFAST_EMULATE_AVX512=1 by setup.py,
// never the installed one). Each _mm512_ intrinsic becomes SIMDe's portable definition
// (libsimde-dev, https://github.com/simd-everywhere/simde) on GCC's own 512-bit vector
// types, which GCC lowers to pairs of AVX2 registers; the few SIMDe 0.7.4 lacks are
// written below, lane by lane, from Intel's definitions of them, and so are the aligned
// loads and stores, which fault off a 64-byte boundary here as they do there. Slow and,
// where the kernels use them, exact: the point is the same bits as the real
// instructions, tails and masked lanes included. (SIMDe's scalef flushes subnormal
// inputs and overflows past 2^127, where the instruction does not: exp_poly's clamps
// keep it to normal p and n in [-126, 127], where both agree.) Included by common.h
// after <immintrin.h>, whose declarations the macros shadow.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the AVX-512 emulation is built with -mavx2 -mfma -mf16c (setup.py, AEFAST_EMULATE_AVX512=1)"
#endif

#define SIMDE_ENABLE_NATIVE_ALIASES
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include <simde/x86/avx512.h>
#pragma GCC diagnostic pop

// Checked against SIMDe 0.7.4 (Debian's and Ubuntu's libsimde-dev): another version may
// define what is written below, or define it differently.
#if SIMDE_VERSION != HEDLEY_VERSION_ENCODE(0, 7, 4)
#warning "the AVX-512 emulation was checked with SIMDe 0.7.4 only"
#endif

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace aefast {
namespace avx512_emulation {

using i16x16 = int16_t __attribute__((vector_size(32)));
using i16x32 = int16_t __attribute__((vector_size(64)));
using u16x16 = uint16_t __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));
using i32x16 = int32_t __attribute__((vector_size(64)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
using f32x16 = float __attribute__((vector_size(64)));
using i64x8 = int64_t __attribute__((vector_size(64)));

// Bit i of the result: lane i of a vector comparison (all ones or zero).
template <int N, typename V>
inline uint32_t lanes_to_mask(V lanes) {
  uint32_t mask = 0;
  for (int i = 0; i < N; ++i) mask |= (lanes[i] != 0 ? 1u : 0u) << i;
  return mask;
}

inline __m512 cvtepi32_ps(__m512i a) { return (__m512)__builtin_convertvector((i32x16)a, f32x16); }
inline __m512 cvtepu32_ps(__m512i a) { return (__m512)__builtin_convertvector((u32x16)a, f32x16); }
inline __m512i cvtepi16_epi32(__m256i a) { return (__m512i)__builtin_convertvector((i16x16)a, i32x16); }
inline __m512i cvtepu16_epi32(__m256i a) { return (__m512i)__builtin_convertvector((u16x16)a, i32x16); }
inline __m256i cvtepi32_epi16(__m512i a) { return (__m256i)__builtin_convertvector((i32x16)a, i16x16); }  // truncates
inline __m512i cvtepi32_epi64(__m256i a) { return (__m512i)__builtin_convertvector((i32x8)a, i64x8); }

inline __m512 cvtph_ps(__m256i a) {
  float out[16];
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm256_castsi256_si128(a)));
  _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)));
  __m512 v;
  std::memcpy(&v, out, sizeof v);
  return v;
}

// Truncating conversions: out of range (NaN included) gives the integer indefinite,
// INT_MIN signed and all ones unsigned.
inline __m512i cvttps_epi32(__m512 a) {
  i32x16 r;
  for (int i = 0; i < 16; ++i)
    r[i] = a[i] >= -2147483648.0f && a[i] < 2147483648.0f ? static_cast<int32_t>(a[i]) : INT32_MIN;
  return (__m512i)r;
}
inline __m512i cvttps_epu32(__m512 a) {
  u32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = a[i] > -1.0f && a[i] < 4294967296.0f ? static_cast<uint32_t>(a[i]) : UINT32_MAX;
  return (__m512i)r;
}

inline __mmask16 cmplt_epi32_mask(__m512i a, __m512i b) { return lanes_to_mask<16>((i32x16)a < (i32x16)b); }
inline __mmask16 cmpneq_epi32_mask(__m512i a, __m512i b) { return lanes_to_mask<16>((i32x16)a != (i32x16)b); }

// (SIMDe 0.7's alias of this one takes four arguments.)
inline __mmask32 mask_cmpge_epi16_mask(__mmask32 k, __m512i a, __m512i b) {
  return k & lanes_to_mask<32>((i16x32)a >= (i16x32)b);
}

inline __m512i srai_epi32(__m512i a, unsigned count) { return (__m512i)((i32x16)a >> (count > 31 ? 31 : count)); }

// Within each 128-bit lane, element j from element (imm >> 2 j) & 3; masked-off lanes from src.
inline __m512i mask_shuffle_epi32(__m512i src, __mmask16 k, __m512i a, int imm) {
  i32x16 r = (i32x16)src;
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r[i] = ((i32x16)a)[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
  return (__m512i)r;
}

// 128-bit blocks 0 and 1 from a, 2 and 3 from b, each picked by two bits of imm.
inline __m512 shuffle_f32x4(__m512 a, __m512 b, int imm) {
  f32x16 r;
  for (int block = 0; block < 4; ++block) {
    const int from = (imm >> (2 * block)) & 3;
    for (int j = 0; j < 4; ++j) r[4 * block + j] = (block < 2 ? a : b)[4 * from + j];
  }
  return (__m512)r;
}

inline __m512i mask_i32gather_epi32(__m512i src, __mmask16 k, __m512i index, const void* base, int scale) {
  i32x16 r = (i32x16)src;
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1)
      std::memcpy(&r[i], static_cast<const char*>(base) + static_cast<int64_t>(((i32x16)index)[i]) * scale, 4);
  return (__m512i)r;
}

// Masked loads and stores touch the selected lanes' memory alone (the real ones do not
// fault on the others: a kernel may rely on it at the end of a buffer).
template <typename E, int N, typename V>
inline V masked_load(uint64_t k, const void* p) {
  V v{};
  for (int i = 0; i < N; ++i)
    if (k >> i & 1) std::memcpy(reinterpret_cast<char*>(&v) + i * sizeof(E), static_cast<const E*>(p) + i, sizeof(E));
  return v;
}
template <typename E, int N, typename V>
inline void masked_store(void* p, uint64_t k, V v) {
  for (int i = 0; i < N; ++i)
    if (k >> i & 1) std::memcpy(static_cast<E*>(p) + i, reinterpret_cast<const char*>(&v) + i * sizeof(E), sizeof(E));
}

inline int reduce_min_epi32(__m512i a) {
  int m = ((i32x16)a)[0];
  for (int i = 1; i < 16; ++i) m = ((i32x16)a)[i] < m ? ((i32x16)a)[i] : m;
  return m;
}

// The aligned loads and stores (streamed too) fault on an address off a 64-byte
// boundary: so do these.
inline void check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) std::abort();
}
template <typename V>
inline V aligned_load(const void* p) {
  check_aligned(p);
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
inline void aligned_store(void* p, V v) {
  check_aligned(p);
  std::memcpy(p, &v, sizeof v);
}

}  // namespace avx512_emulation
}  // namespace aefast

#define AEFAST_EMU ::aefast::avx512_emulation
// Each name undefined first: SIMDe may alias it (wrongly: its mask_cmpge_epi16_mask
// takes four arguments; or without the alignment check).
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) AEFAST_EMU::cvtepi32_ps(a)
#undef _mm512_cvtepu32_ps
#define _mm512_cvtepu32_ps(a) AEFAST_EMU::cvtepu32_ps(a)
#undef _mm512_cvtepi16_epi32
#define _mm512_cvtepi16_epi32(a) AEFAST_EMU::cvtepi16_epi32(a)
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) AEFAST_EMU::cvtepu16_epi32(a)
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) AEFAST_EMU::cvtepi32_epi16(a)
#undef _mm512_cvtepi32_epi64
#define _mm512_cvtepi32_epi64(a) AEFAST_EMU::cvtepi32_epi64(a)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) AEFAST_EMU::cvtph_ps(a)
#undef _mm512_cvttps_epi32
#define _mm512_cvttps_epi32(a) AEFAST_EMU::cvttps_epi32(a)
#undef _mm512_cvttps_epu32
#define _mm512_cvttps_epu32(a) AEFAST_EMU::cvttps_epu32(a)
#undef _mm512_cmplt_epi32_mask
#define _mm512_cmplt_epi32_mask(a, b) AEFAST_EMU::cmplt_epi32_mask(a, b)
#undef _mm512_cmpneq_epi32_mask
#define _mm512_cmpneq_epi32_mask(a, b) AEFAST_EMU::cmpneq_epi32_mask(a, b)
#undef _mm512_mask_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask(k, a, b, predicate) \
  static_cast<__mmask16>((k) & _mm512_cmp_ps_mask((a), (b), (predicate)))
#undef _mm512_mask_cmpge_epi16_mask
#define _mm512_mask_cmpge_epi16_mask(k, a, b) AEFAST_EMU::mask_cmpge_epi16_mask(k, a, b)
#undef _mm512_srai_epi32
#define _mm512_srai_epi32(a, count) AEFAST_EMU::srai_epi32(a, count)
#undef _mm512_mask_shuffle_epi32
#define _mm512_mask_shuffle_epi32(src, k, a, imm) AEFAST_EMU::mask_shuffle_epi32(src, k, a, imm)
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) AEFAST_EMU::shuffle_f32x4(a, b, imm)
#undef _mm512_mask_i32gather_epi32
#define _mm512_mask_i32gather_epi32(src, k, index, base, scale) \
  AEFAST_EMU::mask_i32gather_epi32(src, k, index, base, scale)
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16(k, p) (AEFAST_EMU::masked_load<int16_t, 32, __m512i>((k), (p)))
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32(k, p) (AEFAST_EMU::masked_load<int32_t, 16, __m512i>((k), (p)))
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) (AEFAST_EMU::masked_load<float, 16, __m512>((k), (p)))
#undef _mm512_mask_storeu_epi64
#define _mm512_mask_storeu_epi64(p, k, a) (AEFAST_EMU::masked_store<int64_t, 8, __m512i>((p), (k), (a)))
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) (AEFAST_EMU::masked_store<float, 16, __m512>((p), (k), (a)))
#undef _mm512_reduce_min_epi32
#define _mm512_reduce_min_epi32(a) AEFAST_EMU::reduce_min_epi32(a)
#undef _mm512_load_si512
#define _mm512_load_si512(p) AEFAST_EMU::aligned_load<__m512i>(p)
#undef _mm512_store_si512
#define _mm512_store_si512(p, a) AEFAST_EMU::aligned_store<__m512i>((p), (a))
#undef _mm512_store_ps
#define _mm512_store_ps(p, a) AEFAST_EMU::aligned_store<__m512>((p), (a))
#undef _mm512_stream_ps
#define _mm512_stream_ps(p, a) AEFAST_EMU::aligned_store<__m512>((p), (a))
