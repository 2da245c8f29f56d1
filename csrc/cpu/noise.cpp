// CPU kernels of the noise-injection family: corrupt and reparameterize. Every
// random number is Philox4x32-10 of (seed, logical element index) (philox.h), so a
// result does not depend on the thread count or on how the work is split, and the
// backward regenerates the noise from the seed instead of saving it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../noise_args.h"
#include "aefast/philox.h"
#include "simd.h"

namespace aefast {
namespace cpu {
namespace {

namespace nz = aefast::noise;

#define AEFAST_INLINE inline __attribute__((always_inline))

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kGrain = 1 << 14;  // elements per task: a task costs ~10 us

uint64_t read_seed(const at::Tensor& seed, const at::Tensor& like) {
  noise_args::check_seed(seed, like);
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// ---- per-span loops; `first` is the logical index of the span's first element ----

template <int kKind, typename T, typename A>
AEFAST_INLINE void corrupt_span(const T* x, T* out, int64_t n, uint64_t seed, uint64_t first,
                                float level, A scale, A low, A high) {
  for (int64_t i = 0; i < n; ++i) {
    const nz::Bits2 r = nz::philox(seed, first + static_cast<uint64_t>(i));
    out[i] = static_cast<T>(nz::corrupt_element<kKind, A>(static_cast<A>(x[i]), r, level, scale, low, high));
  }
}

template <typename T, typename A>
AEFAST_INLINE void corrupt_span_any(int kind, const T* x, T* out, int64_t n, uint64_t seed,
                                    uint64_t first, float level, A scale, A low, A high) {
  switch (kind) {
    case nz::kGaussian: return corrupt_span<nz::kGaussian>(x, out, n, seed, first, level, scale, low, high);
    case nz::kMasking: return corrupt_span<nz::kMasking>(x, out, n, seed, first, level, scale, low, high);
    case nz::kSaltPepper: return corrupt_span<nz::kSaltPepper>(x, out, n, seed, first, level, scale, low, high);
    default: return corrupt_span<nz::kDropout>(x, out, n, seed, first, level, scale, low, high);
  }
}

// z = mu + eps * std for one row; terms[j] = 1 + logvar - mu^2 - std^2 (summed by
// the caller in double, in a fixed order).
template <typename T, typename A>
AEFAST_INLINE void reparameterize_row(const T* mu, const T* logvar, T* z, A* terms, int64_t n,
                                      uint64_t seed, uint64_t first) {
  for (int64_t j = 0; j < n; ++j) {
    const A eps = static_cast<A>(nz::normal(nz::philox(seed, first + static_cast<uint64_t>(j))));
    const A m = static_cast<A>(mu[j]), lv = static_cast<A>(logvar[j]);
    const A sd = nz::std_from_logvar(lv);
    z[j] = static_cast<T>(m + eps * sd);
    terms[j] = A(1) + lv - m * m - sd * sd;
  }
}

template <typename T, typename A>
AEFAST_INLINE void reparameterize_grad_row(const T* gz, const T* mu, const T* logvar, T* gmu, T* glv,
                                           int64_t n, uint64_t seed, uint64_t first, A gkl_over_b) {
  for (int64_t j = 0; j < n; ++j) {
    const A eps = static_cast<A>(nz::normal(nz::philox(seed, first + static_cast<uint64_t>(j))));
    const A g = static_cast<A>(gz[j]), lv = static_cast<A>(logvar[j]);
    const A sd = nz::std_from_logvar(lv);
    gmu[j] = static_cast<T>(g + gkl_over_b * static_cast<A>(mu[j]));
    glv[j] = static_cast<T>(A(0.5) * (g * eps * sd + gkl_over_b * (sd * sd - A(1))));
  }
}

// float32: the same loops compiled per instruction set (simd.h).
AEFAST_SIMD_CLONES void corrupt_span_any(int kind, const float* x, float* out, int64_t n, uint64_t seed,
                                         uint64_t first, float level, float scale, float low, float high) {
  corrupt_span_any<float, float>(kind, x, out, n, seed, first, level, scale, low, high);
}
AEFAST_SIMD_CLONES void reparameterize_row(const float* mu, const float* logvar, float* z, float* terms,
                                           int64_t n, uint64_t seed, uint64_t first) {
  reparameterize_row<float, float>(mu, logvar, z, terms, n, seed, first);
}
AEFAST_SIMD_CLONES void reparameterize_grad_row(const float* gz, const float* mu, const float* logvar,
                                                float* gmu, float* glv, int64_t n, uint64_t seed,
                                                uint64_t first, float gkl_over_b) {
  reparameterize_grad_row<float, float>(gz, mu, logvar, gmu, glv, n, seed, first, gkl_over_b);
}

// ---- operators ----

at::Tensor corrupt(const at::Tensor& x, c10::string_view kind, double level, const at::Tensor& seed,
                   double low, double high) {
  const int k = noise_args::parse_kind(kind);
  noise_args::check_level(k, level);
  const uint64_t s = read_seed(seed, x);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "corrupt", [&] {
    using A = acc_t<scalar_t>;
    const A scale = static_cast<A>(noise_args::survivor_scale(k, level));
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      corrupt_span_any(k, src + i0, dst + i0, i1 - i0, s, static_cast<uint64_t>(i0),
                       static_cast<float>(level), scale, static_cast<A>(low), static_cast<A>(high));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                          const at::Tensor& seed) {
  noise_args::check_gaussian_params(mu, logvar);
  const uint64_t s = read_seed(seed, mu);
  const at::Tensor m = mu.contiguous(), lv = logvar.contiguous();
  const int64_t B = m.size(0), Z = m.size(1);
  at::Tensor z = at::empty(m.sizes(), m.options());
  at::Tensor kl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize", [&] {
    using A = acc_t<scalar_t>;
    std::vector<double> row_sums(static_cast<size_t>(B), 0.0);
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(Z, 1)), [&](int64_t r0, int64_t r1) {
      std::vector<A> terms(static_cast<size_t>(Z));
      for (int64_t i = r0; i < r1; ++i) {
        reparameterize_row(m.data_ptr<scalar_t>() + i * Z, lv.data_ptr<scalar_t>() + i * Z,
                           z.data_ptr<scalar_t>() + i * Z, terms.data(), Z, s, static_cast<uint64_t>(i * Z));
        double sum = 0.0;
        for (int64_t j = 0; j < Z; ++j) sum += static_cast<double>(terms[j]);
        row_sums[i] = sum;
      }
    });
    double total = 0.0;
    for (double v : row_sums) total += v;
    kl = at::scalar_tensor(-0.5 * total / static_cast<double>(std::max<int64_t>(B, 1)), m.options());
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                           const at::Tensor& mu, const at::Tensor& logvar,
                                                           const at::Tensor& seed) {
  noise_args::check_gaussian_params(mu, logvar);
  TORCH_CHECK_VALUE(grad_z.sizes() == mu.sizes(), "grad_z must have mu's shape");
  const uint64_t s = read_seed(seed, mu);
  const at::Tensor g = grad_z.to(mu.scalar_type()).contiguous(), m = mu.contiguous(), lv = logvar.contiguous();
  const int64_t B = m.size(0), Z = m.size(1);
  at::Tensor grad_mu = at::empty(m.sizes(), m.options()), grad_lv = at::empty(m.sizes(), m.options());
  const double gkl_over_b = grad_kl.item<double>() / static_cast<double>(std::max<int64_t>(B, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize_backward", [&] {
    using A = acc_t<scalar_t>;
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(Z, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t o = i * Z;
        reparameterize_grad_row(g.data_ptr<scalar_t>() + o, m.data_ptr<scalar_t>() + o, lv.data_ptr<scalar_t>() + o,
                                grad_mu.data_ptr<scalar_t>() + o, grad_lv.data_ptr<scalar_t>() + o, Z, s,
                                static_cast<uint64_t>(o), static_cast<A>(gkl_over_b));
      }
    });
  });
  return {grad_mu, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("corrupt", &corrupt);
  m.impl("reparameterize_forward", &reparameterize_forward);
  m.impl("reparameterize_backward", &reparameterize_backward);
}

}  // namespace cpu
}  // namespace aefast
