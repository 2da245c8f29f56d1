// Registers the top-k selection (topk.cu) for the CUDA key: checks, allocation and
// the stream here; topk.cu selects each row's winners, unordered, and this file
// puts them in order with ATen's integer sort (value descending, then index).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "bindings.h"
#include "topk.h"

namespace aefast {
namespace cuda {
namespace {

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
  // AEFAST_CUDA_TOPK=radix keeps long rows on the radix passes: the same winners, to time
  // one way against the other (read at each call, so one process can alternate).
  const char* way = std::getenv("AEFAST_CUDA_TOPK");
  const bool filter = !(way != nullptr && std::string(way) == "radix") && topk_filters_rows(dtype, H, k, chunks);
  auto workspace = at::empty({topk_workspace_bytes(B, chunks)}, x.options().dtype(at::kByte));
  auto nan_flag = at::zeros({}, x.options().dtype(at::kInt));
  auto keys = at::empty({B, k}, index_options);
  auto unordered = packed ? at::Tensor() : at::empty({B, k}, index_options);
  check(topk_select(x.const_data_ptr(), dtype, B, H, k, chunks, packed, filter,
                    workspace.numel() > 0 ? workspace.data_ptr() : nullptr, nan_flag.data_ptr<int>(), nullptr,
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
  m.impl("topk_forward", &topk_forward_op);
}

}  // namespace cuda
}  // namespace aefast
