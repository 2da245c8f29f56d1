// Registers the JumpReLU kernels (jumprelu.cu) for the CUDA key: checks, allocation
// and the stream here, the arithmetic in jumprelu.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings.h"
#include "jumprelu.h"

namespace aefast {
namespace cuda {
namespace {

// z (B, L) and threshold (L,), contiguous, one dtype.
std::tuple<at::Tensor, at::Tensor> inputs(const at::Tensor& z_in, const at::Tensor& threshold_in) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(0) > 0 && z_in.size(1) > 0, "aefast: z must be a non-empty 2-D tensor");
  TORCH_CHECK(threshold_in.dim() == 1 && threshold_in.size(0) == z_in.size(1) &&
                  threshold_in.scalar_type() == z_in.scalar_type(),
              "aefast: threshold must be (L,) in z's dtype");
  return {z_in.contiguous(), threshold_in.contiguous()};
}

std::tuple<at::Tensor, at::Tensor> jumprelu_forward_op(const at::Tensor& z_in, const at::Tensor& threshold_in,
                                                       double /*bandwidth: the backward's*/) {
  const OnDevice on(z_in, "z");
  on.also(threshold_in, "threshold");
  const auto [z, threshold] = inputs(z_in, threshold_in);
  auto out = at::empty_like(z);
  auto l0 = at::empty({z.size(0)}, stat_options(z));
  check(jumprelu_forward(z.const_data_ptr(), threshold.const_data_ptr(), out.data_ptr(), l0.data_ptr(), dtype_of(z),
                         z.size(0), z.size(1), stream()));
  return {out, l0};
}

std::tuple<at::Tensor, at::Tensor> jumprelu_backward_op(const at::Tensor& grad_out_in, const at::Tensor& grad_l0_in,
                                                        const at::Tensor& z_in, const at::Tensor& threshold_in,
                                                        double bandwidth) {
  const OnDevice on(z_in, "z");
  on.also(threshold_in, "threshold").also(grad_out_in, "grad_out").also(grad_l0_in, "grad_l0");
  const auto [z, threshold] = inputs(z_in, threshold_in);
  TORCH_CHECK(grad_out_in.sizes() == z.sizes(), "aefast: grad_out must have the shape of z");
  TORCH_CHECK(grad_l0_in.dim() == 1 && grad_l0_in.size(0) == z.size(0), "aefast: grad_l0 must be (B,)");
  TORCH_CHECK(bandwidth > 0, "aefast: bandwidth must be positive");
  const auto grad_out = grad_out_in.to(z.scalar_type()).contiguous();
  const auto grad_l0 = grad_l0_in.to(stat_options(z).dtype()).contiguous();
  const int64_t B = z.size(0), L = z.size(1);
  const int64_t splits = jumprelu_splits(B, L, multiprocessors());
  auto grad_z = at::empty_like(z);
  auto partial = at::empty({splits, L}, stat_options(z));
  auto grad_threshold = at::empty_like(threshold);
  check(jumprelu_backward(grad_out.const_data_ptr(), grad_l0.const_data_ptr(), z.const_data_ptr(),
                          threshold.const_data_ptr(), grad_z.data_ptr(), partial.data_ptr(), grad_threshold.data_ptr(),
                          dtype_of(z), B, L, bandwidth, splits, stream()));
  return {grad_z, grad_threshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("jumprelu_forward", &jumprelu_forward_op);
  m.impl("jumprelu_backward", &jumprelu_backward_op);
}

}  // namespace cuda
}  // namespace aefast
