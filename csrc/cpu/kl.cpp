// CPU kernels of the sparse-KL family (kl_sparsity, sigmoid_kl_sparsity,
// contractive_penalty). Forward: one read of the activations (column sums over
// the batch). Backward: one read of what the gradient needs and one write.
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "aefast/kl_math.h"

namespace aefast {
namespace cpu {
namespace {

namespace m = aefast::math;

// ---- per-row loops: generic templates, plus float32 copies with SIMD clones ----

// Column sums take four rows per pass over acc: a quarter of acc's loads and
// stores, which bound a one-row pass (it read at 20 GB/s where a row maximum read
// at 36). The order of the adds is fixed: results do not depend on the threads.
template <typename T, typename A, typename Term>
AEFAST_INLINE void sum_rows_of(const T* x, int64_t rows, int64_t H, A* acc, const Term& term) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const T *x0 = x + i * H, *x1 = x0 + H, *x2 = x1 + H, *x3 = x2 + H;
    for (int64_t j = 0; j < H; ++j) acc[j] += (term(x0[j]) + term(x1[j])) + (term(x2[j]) + term(x3[j]));
  }
  for (; i < rows; ++i) {
    const T* xi = x + i * H;
    for (int64_t j = 0; j < H; ++j) acc[j] += term(xi[j]);
  }
}

template <typename T, typename A>
AEFAST_INLINE void sum_rows(const T* x, int64_t rows, int64_t H, A* acc) {
  sum_rows_of(x, rows, H, acc, [](T v) { return static_cast<A>(v); });
}

template <typename T, typename A>
AEFAST_INLINE void sigmoid_sum_rows(const T* z, T* h, int64_t rows, int64_t H, A* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * H;
    T* hi = h + i * H;
    for (int64_t j = 0; j < H; ++j) {
      const T v = static_cast<T>(m::sigmoid(static_cast<A>(zi[j])));
      hi[j] = v;
      acc[j] += static_cast<A>(v);  // rho_hat is the mean of the h returned
    }
  }
}

template <typename T, typename A>
AEFAST_INLINE void contractive_sum_rows(const T* h, int64_t rows, int64_t H, A* acc) {
  sum_rows_of(h, rows, H, acc, [](T v) { return m::contractive_term(static_cast<A>(v)); });
}

template <typename T, typename A>
AEFAST_INLINE void broadcast_rows(const A* c, T* out, int64_t rows, int64_t H) {
  for (int64_t i = 0; i < rows; ++i) {
    T* oi = out + i * H;
    for (int64_t j = 0; j < H; ++j) oi[j] = static_cast<T>(c[j]);
  }
}

template <typename T, typename A>
AEFAST_INLINE void sigmoid_kl_grad_rows(const T* gh, const T* h, const A* c, T* gz,
                                        int64_t rows, int64_t H) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * H;
    for (int64_t j = 0; j < H; ++j) {
      const A hv = static_cast<A>(h[o + j]);
      gz[o + j] = static_cast<T>((static_cast<A>(gh[o + j]) + c[j]) * m::sigmoid_grad(hv));
    }
  }
}

template <typename T, typename A>
AEFAST_INLINE void contractive_grad_rows(const T* h, const A* v, T* gh, int64_t rows, int64_t H) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * H;
    for (int64_t j = 0; j < H; ++j)
      gh[o + j] = static_cast<T>(m::contractive_term_grad(static_cast<A>(h[o + j])) * v[j]);
  }
}

// sum_d w[d]^2 in double, in kLanes interleaved partial sums that vectorize (in a
// fixed order): one running sum was a chain of dependent adds, half of
// contractive_penalty's forward (2.0 -> 0.95 ms at h 1024 x 4096, weight 4096 x 784).
template <typename T>
AEFAST_INLINE double squared_norm(const T* w, int64_t D) {
  constexpr int64_t kLanes = 32;
  double lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(w[d + l]);
      lane[l] += v * v;
    }
  for (; d < D; ++d) {
    const double v = static_cast<double>(w[d]);
    lane[0] += v * v;
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  return lane[0];
}

// float32: the same loops, compiled per instruction set (common.h); the overloads
// win over the templates for float32 pointers.
AEFAST_SIMD_CLONES void sum_rows(const float* x, int64_t rows, int64_t H, float* acc) {
  sum_rows<float, float>(x, rows, H, acc);
}
AEFAST_SIMD_CLONES void sigmoid_sum_rows(const float* z, float* h, int64_t rows, int64_t H,
                                             float* acc) {
  sigmoid_sum_rows<float, float>(z, h, rows, H, acc);
}
AEFAST_SIMD_CLONES void contractive_sum_rows(const float* h, int64_t rows, int64_t H,
                                                 float* acc) {
  contractive_sum_rows<float, float>(h, rows, H, acc);
}
AEFAST_SIMD_CLONES double squared_norm(const float* w, int64_t D) { return squared_norm<float>(w, D); }
AEFAST_SIMD_CLONES void broadcast_rows(const float* c, float* out, int64_t rows, int64_t H) {
  broadcast_rows<float, float>(c, out, rows, H);
}
AEFAST_SIMD_CLONES void sigmoid_kl_grad_rows(const float* gh, const float* h, const float* c,
                                                 float* gz, int64_t rows, int64_t H) {
  sigmoid_kl_grad_rows<float, float>(gh, h, c, gz, rows, H);
}
AEFAST_SIMD_CLONES void contractive_grad_rows(const float* h, const float* v, float* gh,
                                                  int64_t rows, int64_t H) {
  contractive_grad_rows<float, float>(h, v, gh, rows, H);
}

// ---- drivers ----

// rho_hat = sums / B in the statistics dtype; returns beta * sum_j KL(rho || clamp(rho_hat_j)).
double rho_hat_and_penalty(const std::vector<double>& sums, int64_t B, double rho, double beta, double eps,
                           at::Tensor& rho_hat) {
  const int64_t H = static_cast<int64_t>(sums.size());
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(rho_hat.scalar_type(), "rho_hat_and_penalty", [&] {
    scalar_t* r = rho_hat.data_ptr<scalar_t>();
    for (int64_t j = 0; j < H; ++j) {
      r[j] = static_cast<scalar_t>(sums[j] / static_cast<double>(B));
      // in the statistics dtype, as the reference and the GPU kernels: a saturated unit's
      // 1 - clamp is 1.013e-6 in float32, not 1e-6 (1.3% apart in its penalty and gradient)
      total += m::kl_bernoulli(static_cast<scalar_t>(rho), m::clamp_rho_hat(r[j], static_cast<scalar_t>(eps)));
    }
  });
  return beta * total;
}

// c_j = scale * dKL(rho || clamp(rho_hat_j)) / d rho_hat_j, in the accumulation type.
template <typename A>
std::vector<A> kl_grad_per_unit(const at::Tensor& rho_hat, double rho, double eps, double scale) {
  const int64_t H = rho_hat.numel();
  std::vector<A> c(static_cast<size_t>(H));
  auto r = rho_hat.contiguous();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "kl_grad_per_unit", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < H; ++j) {  // the derivative in the statistics dtype, as the forward
      const scalar_t d = m::kl_bernoulli_grad(static_cast<scalar_t>(rho), rp[j], static_cast<scalar_t>(eps));
      c[j] = static_cast<A>(scale * static_cast<double>(d));
    }
  });
  return c;
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "aefast: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "aefast: ", name, " must be floating point");
}

// ---- operators ----

std::tuple<at::Tensor, at::Tensor> kl_sparsity_forward(const at::Tensor& a_in, double rho,
                                                        double beta, double eps) {
  check_matrix(a_in, "a");
  const auto a = a_in.contiguous();
  const int64_t B = a.size(0), H = a.size(1);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "kl_sparsity_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* x = a.const_data_ptr<scalar_t>();
    sums = column_sums<A>(B, H, [&](int64_t r0, int64_t rows, A* acc) {
      sum_rows(x + r0 * H, rows, H, acc);
    });
  });
  auto rho_hat = at::empty({H}, a.options().dtype(stat_dtype(a.scalar_type())));
  const double penalty = rho_hat_and_penalty(sums, B, rho, beta, eps, rho_hat);
  return {at::scalar_tensor(penalty, a.options()), rho_hat};
}

at::Tensor kl_sparsity_backward(const at::Tensor& grad_penalty, const at::Tensor& rho_hat,
                                int64_t B, double rho, double beta, double eps, at::ScalarType dtype) {
  const int64_t H = rho_hat.numel();
  auto out = empty_output({B, H}, rho_hat.options().dtype(dtype));
  const double scale = grad_penalty.item<double>() * beta / static_cast<double>(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kl_sparsity_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto c = kl_grad_per_unit<A>(rho_hat, rho, eps, scale);
    scalar_t* o = out.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t r0, int64_t rows) {
      broadcast_rows(c.data(), o + r0 * H, rows, H);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_kl_sparsity_forward(const at::Tensor& z_in,
                                                                           double rho, double beta,
                                                                           double eps) {
  check_matrix(z_in, "z");
  const auto z = z_in.contiguous();
  const int64_t B = z.size(0), H = z.size(1);
  auto h = empty_output_like(z);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "sigmoid_kl_sparsity_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    sums = column_sums<A>(B, H, [&](int64_t r0, int64_t rows, A* acc) {
      sigmoid_sum_rows(zp + r0 * H, hp + r0 * H, rows, H, acc);
    });
  });
  auto rho_hat = at::empty({H}, z.options().dtype(stat_dtype(z.scalar_type())));
  const double penalty = rho_hat_and_penalty(sums, B, rho, beta, eps, rho_hat);
  return {h, at::scalar_tensor(penalty, z.options()), rho_hat};
}

at::Tensor sigmoid_kl_sparsity_backward(const at::Tensor& grad_h_in, const at::Tensor& grad_penalty,
                                        const at::Tensor& h_in, const at::Tensor& rho_hat,
                                        double rho, double beta, double eps) {
  check_matrix(h_in, "h");
  TORCH_CHECK(grad_h_in.sizes() == h_in.sizes(), "aefast: grad_h must have the shape of h");
  const auto h = h_in.contiguous();
  const auto grad_h = grad_h_in.to(h.scalar_type()).contiguous();
  const int64_t B = h.size(0), H = h.size(1);
  auto grad_z = empty_output_like(h);
  const double scale = grad_penalty.item<double>() * beta / static_cast<double>(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "sigmoid_kl_sparsity_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto c = kl_grad_per_unit<A>(rho_hat, rho, eps, scale);
    const scalar_t* gh = grad_h.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t r0, int64_t rows) {
      const int64_t o = r0 * H;
      sigmoid_kl_grad_rows(gh + o, hp + o, c.data(), gz + o, rows, H);
    });
  });
  return grad_z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contractive_penalty_forward(const at::Tensor& h_in,
                                                                           const at::Tensor& w_in) {
  check_matrix(h_in, "h");
  check_matrix(w_in, "weight");
  TORCH_CHECK(w_in.size(0) == h_in.size(1), "aefast: weight must have one row per hidden unit");
  const auto h = h_in.contiguous();
  const auto w = w_in.contiguous();
  const int64_t B = h.size(0), H = h.size(1), D = w.size(1);
  const auto stat = h.options().dtype(stat_dtype(h.scalar_type()));
  auto s2 = at::empty({H}, stat);
  auto w2 = at::empty({H}, stat);
  double penalty = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "contractive_penalty_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const auto sums = column_sums<A>(B, H, [&](int64_t r0, int64_t rows, A* acc) {
      contractive_sum_rows(hp + r0 * H, rows, H, acc);
    });
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    auto s2a = s2.accessor<acc_t<scalar_t>, 1>();
    auto w2a = w2.accessor<acc_t<scalar_t>, 1>();
    at::parallel_for(0, H, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) w2a[j] = static_cast<A>(squared_norm(wp + j * D, D));
    });
    for (int64_t j = 0; j < H; ++j) {
      s2a[j] = static_cast<A>(sums[j]);
      penalty += static_cast<double>(s2a[j]) * static_cast<double>(w2a[j]);
    }
  });
  return {at::scalar_tensor(penalty, h.options()), s2, w2};
}

std::tuple<at::Tensor, at::Tensor> contractive_penalty_backward(const at::Tensor& grad_penalty,
                                                                const at::Tensor& h_in,
                                                                const at::Tensor& w_in,
                                                                const at::Tensor& s2,
                                                                const at::Tensor& w2) {
  const auto h = h_in.contiguous();
  const auto w = w_in.contiguous();
  const int64_t B = h.size(0), H = h.size(1), D = w.size(1);
  const double g = grad_penalty.item<double>();
  auto grad_h = empty_output_like(h);
  auto grad_w = empty_output_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "contractive_penalty_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto w2d = w2.to(at::kDouble).contiguous();
    std::vector<A> v(static_cast<size_t>(H));
    for (int64_t j = 0; j < H; ++j) v[j] = static_cast<A>(g * w2d.const_data_ptr<double>()[j]);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* ghp = grad_h.data_ptr<scalar_t>();
    for_rows(B, H, [&](int64_t r0, int64_t rows) {
      const int64_t o = r0 * H;
      contractive_grad_rows(hp + o, v.data(), ghp + o, rows, H);
    });
  });
  // d penalty / d W_jd = 2 W_jd s2_j: a row scaling of the weight, in its own dtype.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "contractive_weight_grad", [&] {
    using A = acc_t<scalar_t>;
    const auto s2d = s2.to(at::kDouble).contiguous();
    const double* sp = s2d.const_data_ptr<double>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, H, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const A u = static_cast<A>(2.0 * g * sp[j]);
        for (int64_t d = 0; d < D; ++d)
          gw[j * D + d] = static_cast<scalar_t>(static_cast<A>(wp[j * D + d]) * u);
      }
    });
  });
  return {grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("kl_sparsity_forward", &kl_sparsity_forward);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward);
  m.impl("sigmoid_kl_sparsity_forward", &sigmoid_kl_sparsity_forward);
  m.impl("sigmoid_kl_sparsity_backward", &sigmoid_kl_sparsity_backward);
  m.impl("contractive_penalty_forward", &contractive_penalty_forward);
  m.impl("contractive_penalty_backward", &contractive_penalty_backward);
}

}  // namespace cpu
}  // namespace aefast
