// What the CPU top-k kernels (topk.cpp, topk_index_order.cpp) share: a candidate
// winner and the one order every backend selects by.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace aefast {
namespace cpu {

template <typename A>
struct Candidate {
  A value;
  int64_t index;
};

// a is better than b: larger value, then lower index.
template <typename A>
inline bool better(const Candidate<A>& a, const Candidate<A>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Per row of x the k largest, in value order (descending, ties to the lower index):
// the CPU kernel of aefast::topk_forward (topk.cpp).
std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& x, int64_t k, bool relu);

}  // namespace cpu
}  // namespace aefast
