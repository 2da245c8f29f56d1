// What the CPU top-k kernels (topk.cpp, topk_index_order.cpp, topk_columns.cpp) share:
// a candidate winner, the one order every backend selects by, the cut of candidates in
// index order to the k best.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace aefast {
namespace cpu {

template <typename A>
struct Candidate {
  A value;
  int64_t index;
};

// Integer keys in the values' order: -0.0 takes +0.0's key (the two tie); not for NaN.
inline int32_t order_key(float v) {
  v += 0.0f;  // -0.0 + 0.0 is +0.0
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}

inline int64_t order_key(double v) {
  v += 0.0;
  int64_t i;
  std::memcpy(&i, &v, sizeof i);
  return i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF);
}

// a is better than b: larger value, then lower index.
template <typename A>
inline bool better(const Candidate<A>& a, const Candidate<A>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Per row of x the k largest, in value order (descending, ties to the lower index):
// the CPU kernel of aefast::topk_forward (topk.cpp).
std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& x, int64_t k, bool relu);

// `found` (candidates in index order, at least k) cut to its k best, still in index order.
template <typename A>
void keep_best_in_index_order(std::vector<Candidate<A>>& found, int64_t k, std::vector<A>& scratch) {
  const int64_t excess = static_cast<int64_t>(found.size()) - k;
  if (excess <= 0) return;
  if (excess <= 8) {  // a few too many: drop the worst, one scan each
    for (int64_t e = 0; e < excess; ++e) {
      auto worst = found.begin();
      for (auto c = found.begin() + 1; c != found.end(); ++c)
        if (!better(*c, *worst)) worst = c;  // (value, index) pairs are distinct
      found.erase(worst);
    }
    return;
  }
  // The k-th largest value by nth_element on the bare values, then, in index order,
  // everything above it and the first of those equal to it.
  scratch.resize(found.size());
  std::transform(found.begin(), found.end(), scratch.begin(), [](const Candidate<A>& c) { return c.value; });
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<A>());
  const A kth = scratch[k - 1];
  int64_t above = 0;
  for (const auto& c : found) above += c.value > kth;
  int64_t ties = k - above;
  size_t kept = 0;
  for (const auto& c : found) {  // in index order: the first ties at kth win
    if (c.value > kth || (c.value == kth && ties-- > 0)) found[kept++] = c;
  }
  found.resize(kept);
}

}  // namespace cpu
}  // namespace aefast
