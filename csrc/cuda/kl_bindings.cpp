// Registers the sparse-KL kernels (kl.cu) for the CUDA key: checks, allocation and
// the stream here, the arithmetic in kl.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings.h"
#include "kl.h"

namespace aefast {
namespace cuda {
namespace {

at::Tensor matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "aefast: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) > 0 && t.size(1) > 0, "aefast: ", name,
              " must be a non-empty 2-D tensor");
  return t.contiguous();
}

// The statistics saved by the forward: on the device, float32 (float64 for float64 data).
at::Tensor stats(const at::Tensor& t, at::ScalarType data, const char* name) {
  const auto want = data == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == want, "aefast: ", name, " must be a CUDA ", want,
              " tensor, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> kl_sparsity_forward_op(const at::Tensor& a_in, double rho, double beta, double eps) {
  const OnDevice on(a_in, "a");
  const auto a = matrix(a_in, "a");
  const int64_t B = a.size(0), H = a.size(1);
  const int64_t splits = column_splits(B, H, multiprocessors());
  auto partial = at::empty({splits, H}, stat_options(a));
  auto rho_hat = at::empty({H}, stat_options(a));
  auto penalty = at::empty({}, a.options());
  check(kl_sparsity_forward(a.const_data_ptr(), dtype_of(a), B, H, rho, beta, eps, splits,
                            partial.data_ptr(), rho_hat.data_ptr(), penalty.data_ptr(), stream()));
  return {penalty, rho_hat};
}

at::Tensor kl_sparsity_backward_op(const at::Tensor& grad_penalty, const at::Tensor& rho_hat_in,
                                int64_t B, double rho, double beta, double eps, at::ScalarType dtype) {
  const OnDevice on(rho_hat_in, "rho_hat");
  on.also(grad_penalty, "grad_penalty");
  const auto rho_hat = stats(rho_hat_in, dtype, "rho_hat");
  const int64_t H = rho_hat.numel();
  auto out = at::empty({B, H}, rho_hat.options().dtype(dtype));
  const auto g = grad_penalty.to(dtype).contiguous();
  check(kl_sparsity_backward(g.const_data_ptr(), rho_hat.const_data_ptr(), out.data_ptr(),
                             dtype_of(out), B, H, rho, beta, eps, stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_kl_sparsity_forward_op(const at::Tensor& z_in,
                                                                           double rho, double beta,
                                                                           double eps) {
  const OnDevice on(z_in, "z");
  const auto z = matrix(z_in, "z");
  const int64_t B = z.size(0), H = z.size(1);
  const int64_t splits = column_splits(B, H, multiprocessors());
  auto h = at::empty_like(z);
  auto partial = at::empty({splits, H}, stat_options(z));
  auto rho_hat = at::empty({H}, stat_options(z));
  auto penalty = at::empty({}, z.options());
  check(sigmoid_kl_sparsity_forward(z.const_data_ptr(), h.data_ptr(), dtype_of(z), B, H, rho, beta, eps,
                                    splits, partial.data_ptr(), rho_hat.data_ptr(),
                                    penalty.data_ptr(), stream()));
  return {h, penalty, rho_hat};
}

at::Tensor sigmoid_kl_sparsity_backward_op(const at::Tensor& grad_h_in, const at::Tensor& grad_penalty,
                                        const at::Tensor& h_in, const at::Tensor& rho_hat_in,
                                        double rho, double beta, double eps) {
  const OnDevice on(h_in, "h");
  on.also(grad_h_in, "grad_h").also(grad_penalty, "grad_penalty").also(rho_hat_in, "rho_hat");
  const auto h = matrix(h_in, "h");
  TORCH_CHECK(grad_h_in.sizes() == h.sizes(), "aefast: grad_h must have the shape of h");
  const auto grad_h = grad_h_in.to(h.scalar_type()).contiguous();
  const auto g = grad_penalty.to(h.scalar_type()).contiguous();
  const auto rho_hat = stats(rho_hat_in, h.scalar_type(), "rho_hat");
  TORCH_CHECK(rho_hat.numel() == h.size(1), "aefast: rho_hat must have one entry per column of h");
  auto grad_z = at::empty_like(h);
  check(sigmoid_kl_sparsity_backward(grad_h.const_data_ptr(), g.const_data_ptr(), h.const_data_ptr(),
                                     rho_hat.const_data_ptr(), grad_z.data_ptr(), dtype_of(h),
                                     h.size(0), h.size(1), rho, beta, eps, stream()));
  return grad_z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contractive_penalty_forward_op(const at::Tensor& h_in,
                                                                           const at::Tensor& w_in) {
  const OnDevice on(h_in, "h");
  on.also(w_in, "weight");
  const auto h = matrix(h_in, "h");
  const auto w = matrix(w_in, "weight");
  TORCH_CHECK(w.size(0) == h.size(1) && w.scalar_type() == h.scalar_type(),
              "aefast: weight must be (H, D) of h's dtype");
  const int64_t B = h.size(0), H = h.size(1), D = w.size(1);
  const int64_t splits = column_splits(B, H, multiprocessors());
  auto partial = at::empty({splits + 1, H}, stat_options(h));
  auto s2 = at::empty({H}, stat_options(h));
  auto w2 = at::empty({H}, stat_options(h));
  auto penalty = at::empty({}, h.options());
  check(contractive_penalty_forward(h.const_data_ptr(), w.const_data_ptr(), dtype_of(h), B, H, D,
                                    splits, partial.data_ptr(), s2.data_ptr(), w2.data_ptr(),
                                    penalty.data_ptr(), stream()));
  return {penalty, s2, w2};
}

std::tuple<at::Tensor, at::Tensor> contractive_penalty_backward_op(const at::Tensor& grad_penalty,
                                                                const at::Tensor& h_in,
                                                                const at::Tensor& w_in,
                                                                const at::Tensor& s2_in,
                                                                const at::Tensor& w2_in) {
  const OnDevice on(h_in, "h");
  on.also(grad_penalty, "grad_penalty").also(w_in, "weight").also(s2_in, "s2").also(w2_in, "w2");
  const auto h = matrix(h_in, "h");
  const auto w = matrix(w_in, "weight");
  const auto g = grad_penalty.to(h.scalar_type()).contiguous();
  const auto s2 = stats(s2_in, h.scalar_type(), "s2");
  const auto w2 = stats(w2_in, h.scalar_type(), "w2");
  TORCH_CHECK(s2.numel() == h.size(1) && w2.numel() == h.size(1) && w.size(0) == h.size(1) &&
                  w.scalar_type() == h.scalar_type(),
              "aefast: s2, w2 and the weight must match h's units and dtype");
  auto grad_h = at::empty_like(h);
  auto grad_w = at::empty_like(w);
  check(contractive_penalty_backward(g.const_data_ptr(), h.const_data_ptr(), w.const_data_ptr(),
                                     s2.const_data_ptr(), w2.const_data_ptr(), grad_h.data_ptr(),
                                     grad_w.data_ptr(), dtype_of(h), h.size(0), h.size(1), w.size(1),
                                     stream()));
  return {grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("kl_sparsity_forward", &kl_sparsity_forward_op);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward_op);
  m.impl("sigmoid_kl_sparsity_forward", &sigmoid_kl_sparsity_forward_op);
  m.impl("sigmoid_kl_sparsity_backward", &sigmoid_kl_sparsity_backward_op);
  m.impl("contractive_penalty_forward", &contractive_penalty_forward_op);
  m.impl("contractive_penalty_backward", &contractive_penalty_backward_op);
}

}  // namespace cuda
}  // namespace aefast
