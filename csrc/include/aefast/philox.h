// The one random generator of the noise-injection family: Philox4x32-10 keyed by
// (seed, element index), mapped to floats exactly as Triton's tl.randint4x /
// tl.rand / tl.randn do, so the CPU, CUDA and Triton backends draw the same
// numbers: bit-identical uniforms (hence identical masks) and normals within a few
// ulps (log and cos are polynomials here, libdevice calls in Triton). Everything
// is branch-free so a host compiler vectorizes loops over elements.
#pragma once

#include <cstdint>

#include "aefast/hd.h"
#include "aefast/kl_math.h"

namespace aefast {
namespace noise {

// Corruption kinds, in the order of aefast.reference.CORRUPTION_KINDS.
enum Kind : int { kGaussian = 0, kMasking = 1, kSaltPepper = 2, kDropout = 3 };

struct Bits2 {
  uint32_t a, b;
};

// Counter (index_lo, index_hi, 0, 0), key (seed_lo, seed_hi); the first two output
// words (tl.randint4x with an int64 offset gives the same four words).
AEFAST_HD Bits2 philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
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
  return {c0, c1};
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

// cos for |x| up to a few thousand (Cephes' sinf/cosf polynomials after a
// three-part Cody-Waite reduction by pi/2).
AEFAST_HD float cos_poly(float x) {
  x = x < 0.0f ? -x : x;
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float j = (x * 0.63661977236758134f + shift) - shift;
  const float r = ((x - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
  const int32_t q = static_cast<int32_t>(j) & 3;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float v = (q & 1) ? s : c;
  return (q == 1 || q == 2) ? -v : v;
}

// N(0, 1) as tl.randn: Box-Muller on the first two words, cosine branch.
AEFAST_HD float normal(Bits2 r) {
  float u1 = uniform(r.a);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float theta = 6.283185307179586f * uniform(r.b);
  return std::sqrt(-2.0f * log_poly(u1)) * cos_poly(theta);
}

// One corrupted element. `level` is the noise scale (gaussian) or the fraction hit;
// `scale` = 1 / (1 - level) for dropout. A float32 threshold, so every backend
// draws the same mask.
template <int kKind, typename A>
AEFAST_HD A corrupt_element(A x, Bits2 r, float level, A scale, A low, A high) {
  if (kKind == kGaussian) return x + static_cast<A>(level) * static_cast<A>(normal(r));
  const bool hit = uniform(r.a) < level;
  if (kKind == kMasking) return hit ? A(0) : x;
  if (kKind == kDropout) return hit ? A(0) : x * scale;
  return hit ? (uniform(r.b) < 0.5f ? low : high) : x;  // salt and pepper
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
