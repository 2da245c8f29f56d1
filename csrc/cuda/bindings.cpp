// Registers the CUDA kernels (csrc/cuda/*.cu) for the CUDA dispatch key: tensor
// checks, allocation and the current stream here, the arithmetic in the .cu files.
// Compiled only when torch is a CUDA build (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../noise_args.h"
#include "kl.h"
#include "noise.h"
#include "decode.h"
#include "topk.h"

namespace aefast {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "aefast: unsupported dtype ", t.scalar_type());
  return DType::kFloat32;
}

at::TensorOptions stat_options(const at::Tensor& t) {
  return t.options().dtype(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

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

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "aefast CUDA kernel: ", cudaGetErrorString(err)); }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of the current device (torch caches the properties: no sync).
int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The CUDA device an op runs on, its first tensor's, made current for the op; every other
// tensor argument must be on it too (a kernel would read another device's pointer), and
// the error names the one that is not.
class OnDevice {
 public:
  OnDevice(const at::Tensor& first, const char* name) : guard_(first.device()), device_(first.device()) {
    TORCH_CHECK_VALUE(first.is_cuda(), "aefast: ", name, " must be a CUDA tensor, got one on ", first.device());
  }
  const OnDevice& also(const at::Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.device() == device_, "aefast: ", name, " is on ", t.device(), " but the op runs on ",
                      device_, ": every tensor argument must be on the same CUDA device");
    return *this;
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  const c10::Device device_;
};

std::tuple<at::Tensor, at::Tensor> kl_sparsity_forward_op(const at::Tensor& a_in, double rho, double beta) {
  const OnDevice on(a_in, "a");
  const auto a = matrix(a_in, "a");
  const int64_t B = a.size(0), H = a.size(1);
  const int64_t splits = column_splits(B, H, multiprocessors());
  auto partial = at::empty({splits, H}, stat_options(a));
  auto rho_hat = at::empty({H}, stat_options(a));
  auto penalty = at::empty({}, a.options());
  check(kl_sparsity_forward(a.const_data_ptr(), dtype_of(a), B, H, rho, beta, splits,
                            partial.data_ptr(), rho_hat.data_ptr(), penalty.data_ptr(), stream()));
  return {penalty, rho_hat};
}

at::Tensor kl_sparsity_backward_op(const at::Tensor& grad_penalty, const at::Tensor& rho_hat_in,
                                int64_t B, double rho, double beta, at::ScalarType dtype) {
  const OnDevice on(rho_hat_in, "rho_hat");
  on.also(grad_penalty, "grad_penalty");
  const auto rho_hat = stats(rho_hat_in, dtype, "rho_hat");
  const int64_t H = rho_hat.numel();
  auto out = at::empty({B, H}, rho_hat.options().dtype(dtype));
  const auto g = grad_penalty.to(dtype).contiguous();
  check(kl_sparsity_backward(g.const_data_ptr(), rho_hat.const_data_ptr(), out.data_ptr(),
                             dtype_of(out), B, H, rho, beta, stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_kl_sparsity_forward_op(const at::Tensor& z_in,
                                                                           double rho, double beta) {
  const OnDevice on(z_in, "z");
  const auto z = matrix(z_in, "z");
  const int64_t B = z.size(0), H = z.size(1);
  const int64_t splits = column_splits(B, H, multiprocessors());
  auto h = at::empty_like(z);
  auto partial = at::empty({splits, H}, stat_options(z));
  auto rho_hat = at::empty({H}, stat_options(z));
  auto penalty = at::empty({}, z.options());
  check(sigmoid_kl_sparsity_forward(z.const_data_ptr(), h.data_ptr(), dtype_of(z), B, H, rho, beta,
                                    splits, partial.data_ptr(), rho_hat.data_ptr(),
                                    penalty.data_ptr(), stream()));
  return {h, penalty, rho_hat};
}

at::Tensor sigmoid_kl_sparsity_backward_op(const at::Tensor& grad_h_in, const at::Tensor& grad_penalty,
                                        const at::Tensor& h_in, const at::Tensor& rho_hat_in,
                                        double rho, double beta) {
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
                                     h.size(0), h.size(1), rho, beta, stream()));
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

// ---- noise-injection family ----

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

// ---- sparse decoder ----

void check_decode_inputs(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(values.dim() == 2 && indices.sizes() == values.sizes(),
                    "aefast: values and indices must both be (B, k)");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong, "aefast: indices must be int64");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == values.scalar_type(),
                    "aefast: weight must be (L, D) of the values' dtype");
  // Indices are not range-checked here: that would read them back to the host every call.
  // The kernels read nothing for an index out of [0, L) and make its outputs NaN.
}

at::Tensor sparse_decode_forward_op(const at::Tensor& values_in, const at::Tensor& indices_in,
                                    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  const OnDevice on(values_in, "values");
  on.also(indices_in, "indices").also(weight_in, "weight");
  check_decode_inputs(values_in, indices_in, weight_in);
  const auto values = values_in.contiguous(), weight = weight_in.contiguous();
  const auto indices = indices_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    on.also(*bias_in, "bias");
    bias = bias_in->to(values.scalar_type()).contiguous();
  }
  const int64_t B = values.size(0), K = values.size(1), L = weight.size(0), D = weight.size(1);
  auto out = at::empty({B, D}, values.options());
  check(sparse_decode_forward(values.const_data_ptr(), indices.const_data_ptr<int64_t>(), weight.const_data_ptr(),
                              bias.defined() ? bias.const_data_ptr() : nullptr, out.data_ptr(), dtype_of(values), B, K,
                              L, D, stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_op(const at::Tensor& grad_out_in,
                                                             const at::Tensor& values_in,
                                                             const at::Tensor& indices_in,
                                                             const at::Tensor& weight_in) {
  const OnDevice on(values_in, "values");
  on.also(grad_out_in, "grad_out").also(indices_in, "indices").also(weight_in, "weight");
  check_decode_inputs(values_in, indices_in, weight_in);
  const auto values = values_in.contiguous(), weight = weight_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto grad_out = grad_out_in.to(values.scalar_type()).contiguous();
  const int64_t B = values.size(0), K = values.size(1), L = weight.size(0), D = weight.size(1);
  // The (row, slot) pairs sorted by latent, stably: each latent's run in (row, slot) order.
  // Each latent's run is found by a search of the sorted indices (a bincount would read
  // their maximum back to the host); pairs out of range fall in no latent's run.
  const auto sorted = at::sort(indices.flatten(), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto order = std::get<1>(sorted).contiguous();
  const auto starts = at::searchsorted(std::get<0>(sorted), at::arange(L + 1, indices.options())).contiguous();
  auto grad_values = at::empty({B, K}, values.options());
  auto grad_weight = at::empty({L, D}, weight.options());
  check(sparse_decode_backward(grad_out.const_data_ptr(), values.const_data_ptr(), indices.const_data_ptr<int64_t>(),
                               weight.const_data_ptr(), order.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), grad_values.data_ptr(), grad_weight.data_ptr(),
                               dtype_of(values), B, K, L, D, stream()));
  return {grad_values, grad_weight};
}

// ---- top-k selection ----

std::tuple<at::Tensor, at::Tensor> topk_forward_op(const at::Tensor& x_in, int64_t k, bool relu) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "aefast: x must be 2-D, got ", x_in.dim(), "-D");
  const OnDevice on(x_in, "x");
  const int64_t B = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= H, "aefast: k must be in [1, ", H, "], got ", k);
  const auto x = x_in.contiguous();
  const DType dtype = dtype_of(x);
  const auto index_options = x.options().dtype(at::kLong);
  if (B == 0) return {at::empty({0, k}, x.options()), at::empty({0, k}, index_options)};
  // The winners of each row, in no order, with their sort keys (csrc/cuda/topk.h).
  const bool packed = topk_packs_keys(dtype, H);
  const int64_t chunks = topk_row_chunks(B, H, multiprocessors());
  auto workspace = at::empty({topk_workspace_bytes(B, chunks)}, x.options().dtype(at::kByte));
  auto nan_flag = at::zeros({}, x.options().dtype(at::kInt));
  auto keys = at::empty({B, k}, index_options);
  auto unordered = packed ? at::Tensor() : at::empty({B, k}, index_options);
  check(topk_select(x.const_data_ptr(), dtype, B, H, k, chunks, packed,
                    workspace.numel() > 0 ? workspace.data_ptr() : nullptr, nan_flag.data_ptr<int>(),
                    keys.data_ptr<int64_t>(), packed ? nullptr : unordered.data_ptr<int64_t>(), stream()));
  // Order: value descending, then index ascending. Integer sorts: exact, and -0.0 and
  // +0.0 (one key) stay tied.
  at::Tensor indices;
  if (packed) {  // ((~key) << 31) | index: unique, so one plain sort is the order
    const auto sorted = std::get<0>(at::sort(keys, /*dim=*/1));
    indices = at::bitwise_and(sorted, (int64_t(1) << 31) - 1);
  } else {  // by index, then stably by key
    const auto by_index = at::sort(unordered, /*dim=*/1);
    const auto keys_by_index = keys.gather(1, std::get<1>(by_index));
    const auto order = std::get<1>(at::sort(keys_by_index, /*stable=*/true, /*dim=*/1, /*descending=*/false));
    indices = std::get<0>(by_index).gather(1, order);
  }
  auto values = x.gather(1, indices);
  if (relu) values.clamp_min_(0);
  // NaN in x: reading the flag here would stall the host every call, so the outputs
  // report it instead, on the device: NaN values, and indices 0..k-1 (safe to scatter).
  const auto nan = nan_flag.to(at::kBool);
  values = at::where(nan, at::full_like(values, std::numeric_limits<double>::quiet_NaN()), values);
  indices = at::where(nan, at::arange(k, index_options).expand({B, k}), indices);
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("kl_sparsity_forward", &kl_sparsity_forward_op);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward_op);
  m.impl("sigmoid_kl_sparsity_forward", &sigmoid_kl_sparsity_forward_op);
  m.impl("sigmoid_kl_sparsity_backward", &sigmoid_kl_sparsity_backward_op);
  m.impl("contractive_penalty_forward", &contractive_penalty_forward_op);
  m.impl("contractive_penalty_backward", &contractive_penalty_backward_op);
  m.impl("corrupt", &corrupt_op);
  m.impl("reparameterize_forward", &reparameterize_forward_op);
  m.impl("reparameterize_backward", &reparameterize_backward_op);
  m.impl("sparse_decode_forward", &sparse_decode_forward_op);
  m.impl("sparse_decode_backward", &sparse_decode_backward_op);
  m.impl("topk_forward", &topk_forward_op);
}

}  // namespace cuda
}  // namespace aefast
