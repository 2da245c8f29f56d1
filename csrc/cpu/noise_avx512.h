// The noise family's draws with AVX-512, in registers: Philox for 16 counters at once
// and the uniforms or Box-Muller normals of their 64 elements, in element order. The
// same formulas as philox.h (Philox and the uniforms bit for bit; log, sin, cos and exp
// the same polynomials, so normals within an ulp or two of the scalar path's), written
// with intrinsics because the compiler's vectorization of words_to_draws stored every
// intermediate and interleaved the four words through memory. Included by noise.cpp
// only, inside its x86-64 GCC section.
#pragma once

#include <cstdint>

#include "common.h"  // the intrinsics

namespace aefast {
namespace cpu {
namespace noise_avx512 {

// The ten round keys of a seed, broadcast once per call.
struct PhiloxKeys {
  __m512i k0[10], k1[10];
};

AEFAST_AVX512 inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    keys.k0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    keys.k1[round] = _mm512_set1_epi32(static_cast<int>(k1));
  }
  return keys;
}

// 32 x 32 -> 64-bit products of 16 lanes: each product's high and low words gathered
// by one masked shuffle (no shift-and-blend).
AEFAST_AVX512 inline void mul_hi_lo(__m512i constant, __m512i b, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(constant, b);  // 64-bit products of the even lanes
  const __m512i odd = _mm512_mul_epu32(constant, _mm512_srli_epi64(b, 32));
  // lo: even lanes keep even's low word, odd lanes take odd's (dword 2i, moved up);
  // hi: odd lanes keep odd's high word, even lanes take even's (dword 2i + 1, moved down).
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
  *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
}

// The four words of counters first .. first + 16 G - 1 (first a multiple of 16: the
// high words are equal and the low words do not carry), group g's word j of lane l in
// w[g][j]. The G groups' rounds interleaved: a round waits on its products (5 cycles),
// and the other groups' fill the ports meanwhile.
template <int G>
AEFAST_AVX512 inline void philox16(const PhiloxKeys& keys, uint64_t first, __m512i (*w)[4]) {
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr int kXor3 = 0x96;  // a ^ b ^ c: each round's two XORs in one instruction
  __m512i c0[G], c1[G], c2[G], c3[G];
  // Rounds 0 and 1 peeled: the counters' words 2 and 3 start at zero and word 1 is the
  // same in every lane, so round 0 has one product, not two, and leaves word 0 the
  // same in every lane: round 1's product of it is one scalar multiply. The same
  // values as the loop's rounds, with 18 mul_hi_lo where ten plain rounds have 20 (as
  // noise_avx2::philox8's).
  const uint32_t k0_0 = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(keys.k0[0])));
  const uint32_t word0 = static_cast<uint32_t>(first >> 32) ^ k0_0;  // round 0's word 0, every lane
  const uint64_t product = uint64_t{0xD2511F53u} * word0;  // round 1's by round_a
  const __m512i word2_mask = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(product >> 32)), keys.k1[1]);
  for (int g = 0; g < G; ++g) {
    __m512i hi_a, lo_a;  // round 0
    mul_hi_lo(round_a, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first + 16 * g)), lanes), &hi_a, &lo_a);
    const __m512i word2 = _mm512_xor_si512(hi_a, keys.k1[0]);
    __m512i hi_b, lo_b;  // round 1: word 1 is 0 and word 3 is lo_a
    mul_hi_lo(round_b, word2, &hi_b, &lo_b);
    c0[g] = _mm512_xor_si512(hi_b, keys.k0[1]);
    c1[g] = lo_b;
    c2[g] = _mm512_xor_si512(lo_a, word2_mask);
    c3[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(product)));
  }
  for (int round = 2; round < 10; ++round) {
    for (int g = 0; g < G; ++g) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(round_b, c2[g], &hi_b, &lo_b);
      mul_hi_lo(round_a, c0[g], &hi_a, &lo_a);
      c0[g] = _mm512_ternarylogic_epi32(hi_b, c1[g], keys.k0[round], kXor3);
      c2[g] = _mm512_ternarylogic_epi32(hi_a, c3[g], keys.k1[round], kXor3);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
  }
  for (int g = 0; g < G; ++g) {
    w[g][0] = c0[g];
    w[g][1] = c1[g];
    w[g][2] = c2[g];
    w[g][3] = c3[g];
  }
}

// noise::uniform: the word as int32, negatives folded (~x is x ^ (x >> 31) there).
AEFAST_AVX512 inline __m512 uniform(__m512i bits) {
  const __m512i folded = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(4.6566127342e-10f));
}

// noise::log_poly for finite x > 0.
AEFAST_AVX512 inline __m512 log_poly(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff)),
                               _mm512_set1_epi32(126));
  __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)),
                                                 _mm512_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __mmask16 below = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.70710678118654752f), _CMP_LT_OQ);
  e = _mm512_mask_sub_epi32(e, below, e, _mm512_set1_epi32(1));
  const __m512 one = _mm512_set1_ps(1.0f);
  m = _mm512_mask_sub_ps(_mm512_sub_ps(m, one), below, _mm512_add_ps(m, m), one);
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174e-1f));
  const __m512 fe = _mm512_cvtepi32_ps(e);
  y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(2.12194440e-4f), fe, y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(_mm512_set1_ps(0.693359375f), fe, _mm512_add_ps(m, y));
}

// noise::sincos_poly for x >= 0 (2 pi times a uniform: no sign to restore).
AEFAST_AVX512 inline void sincos_poly(__m512 x, __m512* sin_x, __m512* cos_x) {
  const __m512 shift = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 j = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(0.63661977236758134f), shift), shift);
  __m512 r = _mm512_fnmadd_ps(j, _mm512_set1_ps(1.5703125f), x);
  r = _mm512_fnmadd_ps(j, _mm512_set1_ps(4.837512969970703125e-4f), r);
  r = _mm512_fnmadd_ps(j, _mm512_set1_ps(7.54978995489188216e-8f), r);
  const __m512i q = _mm512_cvttps_epi32(j);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948e-5f), z, _mm512_set1_ps(-1.388731625493765e-3f));
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(4.166664568298827e-2f));
  c = _mm512_mul_ps(_mm512_mul_ps(c, z), z);
  c = _mm512_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, c), _mm512_set1_ps(1.0f));
  __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891e-4f), z, _mm512_set1_ps(8.3321608736e-3f));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(-1.6666654611e-1f));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), r, r);
  // x = q * pi/2 + r: cos x = c, -s, -c, s and sin x = s, c, -s, -c for q = 0..3 (mod 4).
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __mmask16 cos_negative = _mm512_test_epi32_mask(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2));
  const __mmask16 sin_negative = _mm512_test_epi32_mask(q, _mm512_set1_epi32(2));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i cos_v = _mm512_castps_si512(_mm512_mask_blend_ps(odd, c, s));
  const __m512i sin_v = _mm512_castps_si512(_mm512_mask_blend_ps(odd, s, c));
  *cos_x = _mm512_castsi512_ps(_mm512_mask_xor_epi32(cos_v, cos_negative, cos_v, sign));
  *sin_x = _mm512_castsi512_ps(_mm512_mask_xor_epi32(sin_v, sin_negative, sin_v, sign));
}

// math::exp_poly: NaN stays NaN (max and min return their second operand for it).
AEFAST_AVX512 inline __m512 exp_poly(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.37626f), _mm512_max_ps(_mm512_set1_ps(-87.33654f), x));
  const __m512 shift = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shift), shift);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n in one instruction (n is whole)
}

// noise::normal_pair of 16 word pairs.
AEFAST_AVX512 inline void normal_pairs(__m512i a, __m512i b, __m512* first, __m512* second) {
  const __m512 u1 = _mm512_max_ps(uniform(a), _mm512_set1_ps(1.0e-7f));
  const __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_poly(u1)));
  __m512 s, c;
  sincos_poly(_mm512_mul_ps(_mm512_set1_ps(6.283185307179586f), uniform(b)), &s, &c);
  *first = _mm512_mul_ps(radius, c);
  *second = _mm512_mul_ps(radius, s);
}

// Draws of word j of counters c .. c + 15 in d[j] into element order (element 4 c + j):
// out[v] holds counters 4 v .. 4 v + 3, all four words each.
AEFAST_AVX512 inline void to_element_order(const __m512 d[4], __m512 out[4]) {
  // Per 128-bit lane: counters interleaved two words at a time, then four.
  const __m512 t0 = _mm512_unpacklo_ps(d[0], d[1]), t1 = _mm512_unpackhi_ps(d[0], d[1]);
  const __m512 t2 = _mm512_unpacklo_ps(d[2], d[3]), t3 = _mm512_unpackhi_ps(d[2], d[3]);
  // u[i]: counters i, i + 4, i + 8, i + 12, all four words each, one per 128-bit lane.
  const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // 4 x 4 transpose of 128-bit lanes.
  const __m512 a0 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));  // c0 c4 | c1 c5
  const __m512 a1 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));  // c2 c6 | c3 c7
  const __m512 a2 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));  // c8 c12 | c9 c13
  const __m512 a3 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));  // c10 c14 | c11 c15
  out[0] = _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(2, 0, 2, 0));  // c0 c1 c2 c3
  out[1] = _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 1, 3, 1));  // c4 c5 c6 c7
  out[2] = _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(2, 0, 2, 0));  // c8 .. c11
  out[3] = _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 1, 3, 1));  // c12 .. c15
}

// The draws of elements 4 first .. 4 first + 64 G - 1 (counters first .. first + 16 G - 1,
// first a multiple of 16), in element order: out[g][v] holds elements 4 first + 64 g +
// 16 v .. + 15. Normals (noise::normal_pair) or uniforms (noise::uniform), as noise::draws.
template <bool kNormal, int G>
AEFAST_AVX512 inline void draws64(const PhiloxKeys& keys, uint64_t first, __m512 (*out)[4]) {
  __m512i w[G][4];
  philox16<G>(keys, first, w);
  for (int g = 0; g < G; ++g) {
    __m512 d[4];  // d[j]: word j's draw of each counter (element 4 c + j)
    if (kNormal) {
      normal_pairs(w[g][0], w[g][1], &d[0], &d[1]);
      normal_pairs(w[g][2], w[g][3], &d[2], &d[3]);
    } else {
      for (int j = 0; j < 4; ++j) d[j] = uniform(w[g][j]);
    }
    to_element_order(d, out[g]);
  }
}

}  // namespace noise_avx512
}  // namespace cpu
}  // namespace aefast
