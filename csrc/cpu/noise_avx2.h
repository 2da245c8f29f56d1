// The noise family's draws with AVX2 and FMA, in registers: Philox for 8 counters at
// once and the uniforms or Box-Muller normals of their 32 elements, in element order.
// The same operations as noise_avx512.h, one for one on half the lanes (the masked
// instructions become blends, scalef an exponent built in bits as philox.h's exp_poly
// does), so the normals, and the reparameterize results built from them, are the
// AVX-512 path's bit for bit. Included by noise.cpp only, inside its x86-64 GCC section.
#pragma once

#include <cstdint>

#include "common.h"  // AEFAST_AVX2

namespace aefast {
namespace cpu {
namespace noise_avx2 {

// The ten round keys of a seed, broadcast once per call.
struct PhiloxKeys {
  __m256i k0[10], k1[10];
};

AEFAST_AVX2 inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    keys.k0[round] = _mm256_set1_epi32(static_cast<int>(k0));
    keys.k1[round] = _mm256_set1_epi32(static_cast<int>(k1));
  }
  return keys;
}

// 32 x 32 -> 64-bit products of 8 lanes: the high words from the even and odd lanes'
// vpmuludq, blended; the low words by one vpmulld (one instruction on Zen 3, where it
// took 0.94-0.95x the time of masking corrupt against a shift and a blend of the
// products; two micro-ops on Intel's AVX2-only cores, as many as it replaces).
AEFAST_AVX2 inline void mul_hi_lo(__m256i constant, __m256i b, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(constant, b);
  const __m256i odd = _mm256_mul_epu32(constant, _mm256_srli_epi64(b, 32));
  *lo = _mm256_mullo_epi32(constant, b);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The four words of counters first .. first + 8 G - 1 (first a multiple of 8: the high
// words are equal and the low words do not carry), group g's word j of lane l in
// w[g][j]. The G groups' rounds interleaved, as noise_avx512::philox16's.
template <int G>
AEFAST_AVX2 inline void philox8(const PhiloxKeys& keys, uint64_t first, __m256i (*w)[4]) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[G], c1[G], c2[G], c3[G];
  // Rounds 0 and 1 peeled: the counters' words 2 and 3 start at zero and word 1 is the
  // same in every lane, so round 0 has one product, not two, and leaves word 0 the
  // same in every lane: round 1's product of it is one scalar multiply. The same
  // values as the loop's rounds, with 18 mul_hi_lo where it had 20.
  // Round 0's key from lane 0 (through 128 bits: GCC 10 has no _mm256_cvtsi256_si32).
  const uint32_t k0_0 = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(keys.k0[0])));
  const uint32_t word0 = static_cast<uint32_t>(first >> 32) ^ k0_0;  // round 0's word 0, every lane
  const uint64_t product = uint64_t{0xD2511F53u} * word0;  // round 1's by round_a
  const __m256i word2_mask = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(product >> 32)), keys.k1[1]);
  for (int g = 0; g < G; ++g) {
    __m256i hi_a, lo_a;  // round 0
    mul_hi_lo(round_a, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + 8 * g)), lanes), &hi_a, &lo_a);
    const __m256i word2 = _mm256_xor_si256(hi_a, keys.k1[0]);
    __m256i hi_b, lo_b;  // round 1: word 1 is 0 and word 3 is lo_a
    mul_hi_lo(round_b, word2, &hi_b, &lo_b);
    c0[g] = _mm256_xor_si256(hi_b, keys.k0[1]);
    c1[g] = lo_b;
    c2[g] = _mm256_xor_si256(lo_a, word2_mask);
    c3[g] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(product)));
  }
  for (int round = 2; round < 10; ++round) {
    for (int g = 0; g < G; ++g) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(round_b, c2[g], &hi_b, &lo_b);
      mul_hi_lo(round_a, c0[g], &hi_a, &lo_a);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), keys.k0[round]);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), keys.k1[round]);
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
AEFAST_AVX2 inline __m256 uniform(__m256i bits) {
  const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(4.6566127342e-10f));
}

// noise::log_poly for finite x > 0.
AEFAST_AVX2 inline __m256 log_poly(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 below = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678118654752f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(below));  // all ones: - 1
  const __m256 one = _mm256_set1_ps(1.0f);
  m = _mm256_blendv_ps(_mm256_sub_ps(m, one), _mm256_sub_ps(_mm256_add_ps(m, m), one), below);
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(2.12194440e-4f), fe, y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(_mm256_set1_ps(0.693359375f), fe, _mm256_add_ps(m, y));
}

// noise::sincos_poly for x >= 0 (2 pi times a uniform: no sign to restore).
AEFAST_AVX2 inline void sincos_poly(__m256 x, __m256* sin_x, __m256* cos_x) {
  const __m256 shift = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m256 j = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(0.63661977236758134f), shift), shift);
  __m256 r = _mm256_fnmadd_ps(j, _mm256_set1_ps(1.5703125f), x);
  r = _mm256_fnmadd_ps(j, _mm256_set1_ps(4.837512969970703125e-4f), r);
  r = _mm256_fnmadd_ps(j, _mm256_set1_ps(7.54978995489188216e-8f), r);
  const __m256i q = _mm256_cvttps_epi32(j);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), z, _mm256_set1_ps(-1.388731625493765e-3f));
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(4.166664568298827e-2f));
  c = _mm256_mul_ps(_mm256_mul_ps(c, z), z);
  c = _mm256_add_ps(_mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, c), _mm256_set1_ps(1.0f));
  __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), z, _mm256_set1_ps(8.3321608736e-3f));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(-1.6666654611e-1f));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), r, r);
  // x = q * pi/2 + r: cos x = c, -s, -c, s and sin x = s, c, -s, -c for q = 0..3 (mod 4).
  // Bit 0 of q picks s or c (as a blend mask: moved to the sign bit); the signs are bit
  // 1 of q + 1 (cos) and of q (sin), moved to the sign bit and XORed in.
  const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));
  const __m256 cos_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 30));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(q, 30));
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  *cos_x = _mm256_xor_ps(_mm256_blendv_ps(c, s, odd), _mm256_and_ps(cos_sign, sign_bit));
  *sin_x = _mm256_xor_ps(_mm256_blendv_ps(s, c, odd), _mm256_and_ps(sin_sign, sign_bit));
}

// math::exp_poly: NaN stays NaN (max and min return their second operand for it).
AEFAST_AVX2 inline __m256 exp_poly(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift), shift);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  // 2^n built in bits, exact as AVX-512's scalef: the clamps keep n in [-126, 127]
  // (88.37626 log2(e) = 127.49999 rounds to 127).
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// noise::normal_pair of 8 word pairs.
AEFAST_AVX2 inline void normal_pairs(__m256i a, __m256i b, __m256* first, __m256* second) {
  const __m256 u1 = _mm256_max_ps(uniform(a), _mm256_set1_ps(1.0e-7f));
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_poly(u1)));
  __m256 s, c;
  sincos_poly(_mm256_mul_ps(_mm256_set1_ps(6.283185307179586f), uniform(b)), &s, &c);
  *first = _mm256_mul_ps(radius, c);
  *second = _mm256_mul_ps(radius, s);
}

// Draws of word j of counters c .. c + 7 in d[j] into element order (element 4 c + j):
// out[v] holds counters 2 v and 2 v + 1, all four words each.
AEFAST_AVX2 inline void to_element_order(const __m256 d[4], __m256 out[4]) {
  // Per 128-bit lane: counters interleaved two words at a time, then four.
  const __m256 t0 = _mm256_unpacklo_ps(d[0], d[1]), t1 = _mm256_unpackhi_ps(d[0], d[1]);
  const __m256 t2 = _mm256_unpacklo_ps(d[2], d[3]), t3 = _mm256_unpackhi_ps(d[2], d[3]);
  // u[i]: counters i and i + 4, all four words each, one per 128-bit lane.
  const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  out[0] = _mm256_permute2f128_ps(u0, u1, 0x20);  // c0 c1
  out[1] = _mm256_permute2f128_ps(u2, u3, 0x20);  // c2 c3
  out[2] = _mm256_permute2f128_ps(u0, u1, 0x31);  // c4 c5
  out[3] = _mm256_permute2f128_ps(u2, u3, 0x31);  // c6 c7
}

// The draws of elements 4 first .. 4 first + 32 G - 1 (counters first .. first + 8 G - 1,
// first a multiple of 8), in element order: out[g][v] holds elements 4 first + 32 g + 8 v
// .. + 7. Normals (noise::normal_pair) or uniforms (noise::uniform), as noise::draws.
template <bool kNormal, int G>
AEFAST_AVX2 inline void draws32(const PhiloxKeys& keys, uint64_t first, __m256 (*out)[4]) {
  __m256i w[G][4];
  philox8<G>(keys, first, w);
  for (int g = 0; g < G; ++g) {
    __m256 d[4];  // d[j]: word j's draw of each counter (element 4 c + j)
    if (kNormal) {
      normal_pairs(w[g][0], w[g][1], &d[0], &d[1]);
      normal_pairs(w[g][2], w[g][3], &d[2], &d[3]);
    } else {
      for (int j = 0; j < 4; ++j) d[j] = uniform(w[g][j]);
    }
    to_element_order(d, out[g]);
  }
}

}  // namespace noise_avx2
}  // namespace cpu
}  // namespace aefast
