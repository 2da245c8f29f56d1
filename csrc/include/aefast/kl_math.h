// Per-element math of the sparse-KL family, shared by the CPU kernels (csrc/cpu)
// and the CUDA kernels (csrc/cuda): the CPU tests exercise the very formulas the
// GPU runs. Plain C++ on a host compiler, __host__ __device__ under nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#include "aefast/hd.h"

namespace aefast {
namespace math {

// rho_hat is clamped to [eps, 1 - eps] before the KL divergence is taken, so a dead
// (or saturated) unit gives a large but finite penalty. The gradient is the sparse
// autoencoder's dKL/drho_hat taken at the clamped value, also where the clamp is active
// (a straight-through clamp): a dead unit gets the strongest push back to life, where
// torch.clamp's zero gradient would leave it dead for good. eps is an argument of the
// ops, passed in from aefast.reference.RHO_HAT_EPS: defined once, there.

// exp for float with only +, *, compares and a bit cast (Cephes' expf polynomial,
// about 1 ulp), so a host compiler vectorizes loops that call it: libm's expf,
// fminf and floorf are calls it cannot vectorize without -ffast-math.
AEFAST_HD float exp_poly(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.37626f ? 88.37626f : x);  // NaN stays NaN
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: adding it rounds to an integer.
  const float shift = 12582912.0f;
  float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693359375f;  // ln 2 split in two for an exact product
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n: n is in [-126, 128]; 128 gives +inf, as exp does past 88.72.
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

AEFAST_HD float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
AEFAST_HD double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// d sigmoid / dz from the output h.
template <typename T>
AEFAST_HD T sigmoid_grad(T h) {
  return h * (T(1) - h);
}

template <typename T>
AEFAST_HD T clamp_rho_hat(T r, T eps) {
  const T lo = eps, hi = T(1) - eps;
  return r < lo ? lo : (r > hi ? hi : r);
}

// KL(rho || r) between Bernoulli(rho) and Bernoulli(r), r already clamped.
template <typename T>
AEFAST_HD T kl_bernoulli(T rho, T r) {
  return rho * std::log(rho / r) + (T(1) - rho) * std::log((T(1) - rho) / (T(1) - r));
}

// d KL(rho || c) / d c at c = clamp(r): the straight-through gradient of the penalty.
template <typename T>
AEFAST_HD T kl_bernoulli_grad(T rho, T r, T eps) {
  const T c = clamp_rho_hat(r, eps);
  return -rho / c + (T(1) - rho) / (T(1) - c);
}

// Contractive penalty of a sigmoid unit: (h (1 - h))^2, and its derivative in h.
template <typename T>
AEFAST_HD T contractive_term(T h) {
  T s = h * (T(1) - h);
  return s * s;
}

template <typename T>
AEFAST_HD T contractive_term_grad(T h) {
  return T(2) * h * (T(1) - h) * (T(1) - T(2) * h);
}

}  // namespace math
}  // namespace aefast
