// Registers the noise-injection kernels (noise.cu) for the CUDA key: checks,
// allocation and the stream here, the arithmetic in noise.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../noise_args.h"
#include "bindings.h"
#include "noise.h"

namespace aefast {
namespace cuda {
namespace {

const int64_t* seed_on_device(const at::Tensor& seed, const at::Tensor& like) {
  noise_args::check_seed(seed, like);
  return seed.const_data_ptr<int64_t>();
}

at::Tensor corrupt_op(const at::Tensor& x_in, c10::string_view kind_name, double level, const at::Tensor& seed,
                      double low, double high) {
  const OnDevice on(x_in, "x");
  on.also(seed, "seed");
  const int kind = noise_args::parse_kind(kind_name);
  noise_args::check_level(kind, level);
  const auto x = x_in.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  check(corrupt(x.const_data_ptr(), out.data_ptr(), dtype_of(x), x.numel(), kind, static_cast<float>(level),
                noise_args::survivor_scale(kind, level), low, high, seed_on_device(seed, x), stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_forward_op(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                             const at::Tensor& seed) {
  const OnDevice on(mu_in, "mu");
  on.also(logvar_in, "logvar").also(seed, "seed");
  noise_args::check_gaussian_params(mu_in, logvar_in);
  const auto mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto z = at::empty(mu.sizes(), mu.options());
  auto partial = at::empty({reparameterize_blocks(mu.numel())}, stat_options(mu));
  auto kl = at::empty({}, mu.options());
  check(reparameterize_forward(mu.const_data_ptr(), logvar.const_data_ptr(), z.data_ptr(), partial.data_ptr(),
                               kl.data_ptr(), dtype_of(mu), mu.size(0), mu.numel(), seed_on_device(seed, mu),
                               stream()));
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_op(const at::Tensor& grad_z_in, const at::Tensor& grad_kl_in,
                                                              const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                              const at::Tensor& seed) {
  const OnDevice on(mu_in, "mu");
  on.also(grad_z_in, "grad_z").also(grad_kl_in, "grad_kl").also(logvar_in, "logvar").also(seed, "seed");
  noise_args::check_gaussian_params(mu_in, logvar_in);
  TORCH_CHECK_VALUE(grad_z_in.sizes() == mu_in.sizes(), "grad_z must have mu's shape");
  const auto mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  const auto grad_z = grad_z_in.to(mu.scalar_type()).contiguous();
  const auto grad_kl = grad_kl_in.to(mu.scalar_type()).contiguous();
  auto grad_mu = at::empty(mu.sizes(), mu.options()), grad_logvar = at::empty(mu.sizes(), mu.options());
  check(reparameterize_backward(grad_z.const_data_ptr(), grad_kl.const_data_ptr(), mu.const_data_ptr(),
                                logvar.const_data_ptr(), grad_mu.data_ptr(), grad_logvar.data_ptr(), dtype_of(mu),
                                mu.size(0), mu.numel(), seed_on_device(seed, mu), stream()));
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("corrupt", &corrupt_op);
  m.impl("reparameterize_forward", &reparameterize_forward_op);
  m.impl("reparameterize_backward", &reparameterize_backward_op);
}

}  // namespace cuda
}  // namespace aefast
