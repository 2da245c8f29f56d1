// Registers the sparse decoder (decode.cu) for the CUDA key: checks, allocation and
// the stream here, and the sort of the (row, slot) pairs by latent that the weight
// gradient walks (ATen's sort and searchsorted); the arithmetic in decode.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../decode_args.h"
#include "bindings.h"
#include "decode.h"

namespace aefast {
namespace cuda {
namespace {

// Indices are not range-checked here: that would read them back to the host every call.
// The kernels read nothing for an index out of [0, L) and make its outputs NaN.

at::Tensor sparse_decode_forward_op(const at::Tensor& values_in, const at::Tensor& indices_in,
                                    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  const OnDevice on(values_in, "values");
  on.also(indices_in, "indices").also(weight_in, "weight");
  decode_args::check_inputs(values_in, indices_in, weight_in);
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
                              bias.defined() ? bias.const_data_ptr() : nullptr, out.data_ptr(), dtype_of(values),
                              dtype_of(weight), B, K, L, D, stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_op(const at::Tensor& grad_out_in,
                                                             const at::Tensor& values_in,
                                                             const at::Tensor& indices_in,
                                                             const at::Tensor& weight_in, bool values_grad) {
  const OnDevice on(values_in, "values");
  on.also(grad_out_in, "grad_out").also(indices_in, "indices").also(weight_in, "weight");
  decode_args::check_inputs(values_in, indices_in, weight_in);
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
  auto grad_values = values_grad ? at::empty({B, K}, values.options()) : at::empty({0}, values.options());
  auto grad_weight = at::empty({L, D}, weight.options());
  check(sparse_decode_backward(grad_out.const_data_ptr(), values.const_data_ptr(), indices.const_data_ptr<int64_t>(),
                               weight.const_data_ptr(), order.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), values_grad ? grad_values.data_ptr() : nullptr,
                               grad_weight.data_ptr(),
                               dtype_of(values), dtype_of(weight), B, K, L, D, stream()));
  return {grad_values, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("sparse_decode_forward", &sparse_decode_forward_op);
  m.impl("sparse_decode_backward", &sparse_decode_backward_op);
}

}  // namespace cuda
}  // namespace aefast
