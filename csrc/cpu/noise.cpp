// CPU kernels of the noise-injection family: corrupt and reparameterize. Every
// random number is Philox4x32-10 of (seed, logical element index) (philox.h), so a
// result does not depend on the thread count or on how the work is split, and the
// backward regenerates the noise from the seed instead of saving it.
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
#include "simd.h"

namespace aefast {
namespace cpu {
namespace {

namespace nz = aefast::noise;

#define AEFAST_INLINE inline __attribute__((always_inline))

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

uint64_t read_seed(const at::Tensor& seed, const at::Tensor& like) {
  noise_args::check_seed(seed, like);
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// ---- draws: blocks of 64 Philox counters, 256 elements ----

constexpr int64_t kBlockCounters = 64;
constexpr int64_t kBlockElements = kBlockCounters * nz::kDrawsPerCounter;

template <bool kNormal>
AEFAST_INLINE void fill_block(uint64_t seed, uint64_t first_counter, float* draws) {
  for (int64_t c = 0; c < kBlockCounters; ++c)
    nz::draws<kNormal>(seed, first_counter + static_cast<uint64_t>(c), draws + nz::kDrawsPerCounter * c);
}
AEFAST_SIMD_CLONES void fill_uniforms(uint64_t seed, uint64_t first_counter, float* draws) {
  fill_block<false>(seed, first_counter, draws);
}
AEFAST_SIMD_CLONES void fill_normals(uint64_t seed, uint64_t first_counter, float* draws) {
  fill_block<true>(seed, first_counter, draws);
}

// fn(block, first element, elements, draws) for every block of n elements, blocks
// split among threads. Block b always holds elements [256 b, 256 b + 256): results
// do not depend on the thread count.
template <typename Fn>
void for_each_block(int64_t n, uint64_t seed, bool normal, const Fn& fn) {
  const int64_t blocks = (n + kBlockElements - 1) / kBlockElements;
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    alignas(64) float draws[kBlockElements];
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t first_counter = static_cast<uint64_t>(b * kBlockCounters);
      normal ? fill_normals(seed, first_counter, draws) : fill_uniforms(seed, first_counter, draws);
      const int64_t e0 = b * kBlockElements;
      fn(b, e0, std::min(kBlockElements, n - e0), draws);
    }
  });
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

// float32: the same loops compiled per instruction set (simd.h).
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
    for_each_block(n, s, k == nz::kGaussian, [&](int64_t, int64_t e0, int64_t ne, const float* draws) {
      corrupt_span_any(k, src + e0, dst + e0, ne, draws, static_cast<float>(level), scale, static_cast<A>(low),
                       static_cast<A>(high));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                          const at::Tensor& seed) {
  noise_args::check_gaussian_params(mu, logvar);
  const uint64_t s = read_seed(seed, mu);
  const at::Tensor m = mu.contiguous(), lv = logvar.contiguous();
  const int64_t B = m.size(0);
  at::Tensor z = at::empty(m.sizes(), m.options());
  at::Tensor kl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize", [&] {
    using A = acc_t<scalar_t>;
    const int64_t n = m.numel();
    std::vector<double> block_sums(static_cast<size_t>((n + kBlockElements - 1) / kBlockElements), 0.0);
    for_each_block(n, s, true, [&](int64_t b, int64_t e0, int64_t ne, const float* eps) {
      A terms[kBlockElements];
      reparameterize_span(m.data_ptr<scalar_t>() + e0, lv.data_ptr<scalar_t>() + e0, z.data_ptr<scalar_t>() + e0,
                          terms, ne, eps);
      double sum = 0.0;
      for (int64_t i = 0; i < ne; ++i) sum += static_cast<double>(terms[i]);
      block_sums[b] = sum;
    });
    double total = 0.0;
    for (double v : block_sums) total += v;
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
  const int64_t B = m.size(0);
  at::Tensor grad_mu = at::empty(m.sizes(), m.options()), grad_lv = at::empty(m.sizes(), m.options());
  const double gkl_over_b = grad_kl.item<double>() / static_cast<double>(std::max<int64_t>(B, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "reparameterize_backward", [&] {
    using A = acc_t<scalar_t>;
    for_each_block(m.numel(), s, true, [&](int64_t, int64_t e0, int64_t ne, const float* eps) {
      reparameterize_grad_span(g.data_ptr<scalar_t>() + e0, m.data_ptr<scalar_t>() + e0, lv.data_ptr<scalar_t>() + e0,
                               grad_mu.data_ptr<scalar_t>() + e0, grad_lv.data_ptr<scalar_t>() + e0, ne, eps,
                               static_cast<A>(gkl_over_b));
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
