// CPU kernels of the JumpReLU family. Forward: z read once, the output and each row's
// L0 count written. Backward: z and the gradients read once, z's gradient written, and
// the threshold's gradient summed over fixed chunks of rows (common.h column_sums:
// the same bits for any number of threads).
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace aefast {
namespace cpu {
namespace {

// ---- per-row loops: generic templates, plus float32 copies with SIMD clones ----

template <typename T, typename A>
AEFAST_INLINE void jumprelu_rows(const T* z, const T* threshold, T* out, A* l0, int64_t rows, int64_t L) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * L;
    T* oi = out + i * L;
    int32_t count = 0;  // an integer sum vectorizes; a float one is a chain of dependent adds
    for (int64_t j = 0; j < L; ++j) {
      const bool on = static_cast<A>(zi[j]) > static_cast<A>(threshold[j]);
      oi[j] = on ? zi[j] : T(0);
      count += on;
    }
    l0[i] = static_cast<A>(count);
  }
}

// grad_z = grad_out where z > threshold; acc[j] += K_ij * (threshold_j * grad_out_ij +
// grad_l0_i) with K_ij = 1 where |z_ij - threshold_j| < bandwidth / 2 (the caller
// scales the sums by -1 / bandwidth).
template <typename T, typename A>
AEFAST_INLINE void jumprelu_grad_rows(const T* g, const A* gl0, const T* z, const T* threshold, T* gz,
                                      int64_t rows, int64_t L, A half_width, A* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * L;
    const A l = gl0[i];
    for (int64_t j = 0; j < L; ++j) {
      const A zv = static_cast<A>(z[o + j]), t = static_cast<A>(threshold[j]), gv = static_cast<A>(g[o + j]);
      gz[o + j] = zv > t ? g[o + j] : T(0);
      const A gap = zv - t;
      acc[j] += (gap < half_width && gap > -half_width) ? t * gv + l : A(0);
    }
  }
}

AEFAST_SIMD_CLONES void jumprelu_rows(const float* z, const float* threshold, float* out, float* l0, int64_t rows,
                                      int64_t L) {
  jumprelu_rows<float, float>(z, threshold, out, l0, rows, L);
}
AEFAST_SIMD_CLONES void jumprelu_grad_rows(const float* g, const float* gl0, const float* z, const float* threshold,
                                           float* gz, int64_t rows, int64_t L, float half_width, float* acc) {
  jumprelu_grad_rows<float, float>(g, gl0, z, threshold, gz, rows, L, half_width, acc);
}

void check_inputs(const at::Tensor& z, const at::Tensor& threshold) {
  TORCH_CHECK(z.dim() == 2 && at::isFloatingType(z.scalar_type()), "aefast: z must be a floating 2-D tensor");
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == z.size(1) && threshold.scalar_type() == z.scalar_type(),
              "aefast: threshold must be (L,) in z's dtype");
}

// ---- operators ----

std::tuple<at::Tensor, at::Tensor> jumprelu_forward(const at::Tensor& z_in, const at::Tensor& threshold_in,
                                                    double /*bandwidth: the backward's*/) {
  check_inputs(z_in, threshold_in);
  const auto z = z_in.contiguous();
  const auto threshold = threshold_in.contiguous();
  const int64_t B = z.size(0), L = z.size(1);
  auto out = empty_output_like(z);
  auto l0 = at::empty({B}, z.options().dtype(stat_dtype(z.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "jumprelu_forward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = threshold.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    A* lp = l0.data_ptr<A>();
    for_rows(B, L, [&](int64_t r0, int64_t rows) {
      jumprelu_rows(zp + r0 * L, tp, op + r0 * L, lp + r0, rows, L);
    });
  });
  return {out, l0};
}

std::tuple<at::Tensor, at::Tensor> jumprelu_backward(const at::Tensor& grad_out_in, const at::Tensor& grad_l0_in,
                                                     const at::Tensor& z_in, const at::Tensor& threshold_in,
                                                     double bandwidth) {
  check_inputs(z_in, threshold_in);
  TORCH_CHECK(grad_out_in.sizes() == z_in.sizes(), "aefast: grad_out must have the shape of z");
  TORCH_CHECK(grad_l0_in.dim() == 1 && grad_l0_in.size(0) == z_in.size(0), "aefast: grad_l0 must be (B,)");
  TORCH_CHECK(bandwidth > 0, "aefast: bandwidth must be positive");
  const auto z = z_in.contiguous();
  const auto threshold = threshold_in.contiguous();
  const auto grad_out = grad_out_in.to(z.scalar_type()).contiguous();
  const auto acc_type = stat_dtype(z.scalar_type());
  const auto grad_l0 = grad_l0_in.to(acc_type).contiguous();
  const int64_t B = z.size(0), L = z.size(1);
  auto grad_z = empty_output_like(z);
  auto grad_threshold = at::empty({L}, threshold.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "jumprelu_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const A* lp = grad_l0.const_data_ptr<A>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = threshold.const_data_ptr<scalar_t>();
    scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    const A half_width = static_cast<A>(bandwidth / 2);
    const auto sums = column_sums<A>(B, L, [&](int64_t r0, int64_t rows, A* acc) {
      jumprelu_grad_rows(gp + r0 * L, lp + r0, zp + r0 * L, tp, gzp + r0 * L, rows, L, half_width, acc);
    });
    scalar_t* out = grad_threshold.data_ptr<scalar_t>();
    for (int64_t j = 0; j < L; ++j) out[j] = static_cast<scalar_t>(-sums[j] / bandwidth);
  });
  return {grad_z, grad_threshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("jumprelu_forward", &jumprelu_forward);
  m.impl("jumprelu_backward", &jumprelu_backward);
}

}  // namespace cpu
}  // namespace aefast
