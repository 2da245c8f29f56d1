// The one random generator of the noise-injection family: Philox4x32-10 keyed by
// (seed, element index). Element i takes word i mod 4 of the Philox block of
// counter i div 4 (four draws per block, as curand_uniform4 does), mapped to a
// float exactly as Triton's tl.rand maps a word (uint_to_uniform_float); normals
// come in Box-Muller pairs (cos, sin) of words (0, 1) and (2, 3), as
// tl.random.pair_uniform_to_normal. So the CPU, CUDA and Triton backends draw the
// same numbers: bit-identical uniforms (hence identical masks) and normals within
// a few ulps (log, cos and sin are polynomials here, libdevice calls in Triton).
// Everything is branch-free so a host compiler vectorizes loops over counters.
#pragma once

#include <cstdint>

#include "aefast/hd.h"
#include "aefast/kl_math.h"

namespace aefast {
namespace noise {

// Corruption kinds, in the order of aefast.reference.CORRUPTION_KINDS.
enum Kind : int { kGaussian = 0, kMasking = 1, kSaltPepper = 2, kDropout = 3 };

constexpr int kDrawsPerCounter = 4;

struct Bits4 {
  uint32_t a, b, c, d;
};

// Philox4x32-10 of counter (counter_lo, counter_hi, 0, 0) under key (seed_lo,
// seed_hi): the four words of tl.randint4x(seed, counter) for an int64 counter.
AEFAST_HD Bits4 philox(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t p1 = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p0);
    c3 = static_cast<uint32_t>(p1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// U[0, 1) as tl.rand: the word as int32, negatives folded (~x == -x - 1), times the
// largest scale that keeps INT32_MAX below 1.0 after rounding.
AEFAST_HD float uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Natural log for finite x > 0 (Cephes' logf polynomial).
AEFAST_HD float log_poly(float x) {
  const int32_t bits = math::float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = math::bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool below = m < 0.70710678118654752f;
  e = below ? e - 1 : e;
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  y = y * m * z - 2.12194440e-4f * fe - 0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// sin and cos for |x| up to a few thousand (Cephes' sinf/cosf polynomials after a
// three-part Cody-Waite reduction by pi/2).
AEFAST_HD void sincos_poly(float x, float* sin_x, float* cos_x) {
  const float sign = x < 0.0f ? -1.0f : 1.0f;
  x = x * sign;
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float j = (x * 0.63661977236758134f + shift) - shift;
  const float r = ((x - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
  const int32_t q = static_cast<int32_t>(j) & 3;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  // x = q * pi/2 + r: cos x = c, -s, -c, s and sin x = s, c, -s, -c for q = 0..3.
  const float cos_v = (q & 1) ? s : c, sin_v = (q & 1) ? c : s;
  *cos_x = (q == 1 || q == 2) ? -cos_v : cos_v;
  *sin_x = sign * ((q & 2) ? -sin_v : sin_v);
}

// Two N(0, 1) draws from two words by Box-Muller, as tl.random.pair_uniform_to_normal.
AEFAST_HD void normal_pair(uint32_t a, uint32_t b, float* first, float* second) {
  float u1 = uniform(a);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float radius = std::sqrt(-2.0f * log_poly(u1));
  float s, c;
  sincos_poly(6.283185307179586f * uniform(b), &s, &c);
  *first = radius * c;
  *second = radius * s;
}

// The four draws of one counter (elements 4 counter .. 4 counter + 3): normals for
// gaussian noise, uniforms otherwise.
template <bool kNormal>
AEFAST_HD void draws(uint64_t seed, uint64_t counter, float* out) {
  const Bits4 r = philox(seed, counter);
  if (kNormal) {
    normal_pair(r.a, r.b, out, out + 1);
    normal_pair(r.c, r.d, out + 2, out + 3);
  } else {
    out[0] = uniform(r.a);
    out[1] = uniform(r.b);
    out[2] = uniform(r.c);
    out[3] = uniform(r.d);
  }
}

// One corrupted element, given its draw: a normal for gaussian, else a uniform.
// `level` is the noise scale (gaussian) or the fraction hit, compared in float32
// so every backend draws the same mask; `scale` = 1 / (1 - level) for dropout.
// Salt and pepper needs no second draw: given a hit, u / level is uniform, so
// u < level / 2 chooses low with probability 1/2.
template <int kKind, typename A>
AEFAST_HD A corrupt_element(A x, float draw, float level, A scale, A low, A high) {
  if (kKind == kGaussian) return x + static_cast<A>(level) * static_cast<A>(draw);
  const bool hit = draw < level;
  if (kKind == kMasking) return hit ? A(0) : x;
  if (kKind == kDropout) return hit ? A(0) : x * scale;
  return hit ? (draw < 0.5f * level ? low : high) : x;  // salt and pepper
}

}  // namespace noise
}  // namespace aefast

namespace aefast {
namespace noise {

// exp(logvar / 2): the standard deviation of the reparameterization trick.
AEFAST_HD float std_from_logvar(float logvar) { return math::exp_poly(0.5f * logvar); }
AEFAST_HD double std_from_logvar(double logvar) { return std::exp(0.5 * logvar); }

}  // namespace noise
}  // namespace aefast
