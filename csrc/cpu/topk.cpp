// CPU top-k per row in one streaming pass: a k-entry heap of the best values seen
// and a vectorized filter that skips whole blocks of the row whose elements cannot
// enter it (none above the heap's worst value). For random rows only ~k log(H/k)
// elements ever reach the heap, so the pass runs at memory speed; torch.topk
// instead copies every (value, int64 index) pair of the row and partially sorts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace aefast {
namespace cpu {
namespace {

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

constexpr int64_t kBlock = 16;

// heap[0] is the worst of the k candidates (every node is no better than its
// children); put `c` in its place and sift it down: one pass, no pop + push.
template <typename A>
inline void replace_worst(Candidate<A>* heap, int64_t k, Candidate<A> c) {
  int64_t i = 0;
  for (;;) {
    int64_t child = 2 * i + 1;
    if (child >= k) break;
    if (child + 1 < k && better(heap[child], heap[child + 1])) ++child;  // the worse child
    if (!better(c, heap[child])) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = c;
}

// Top `k` of x[0, n) (global indices offset by `first`) into `heap` (size k, n >= k).
// Returns false if x holds a NaN. The heap's front is its worst candidate.
template <typename T, typename A>
inline __attribute__((always_inline)) bool topk_scan(const T* x, int64_t n, int64_t first, int64_t k,
                                                     Candidate<A>* heap) {
  auto worse_first = [](const Candidate<A>& a, const Candidate<A>& b) { return better(a, b); };
  bool nan = false;
  for (int64_t j = 0; j < k; ++j) {
    const A v = static_cast<A>(x[j]);
    nan |= v != v;
    heap[j] = {v, first + j};
  }
  std::make_heap(heap, heap + k, worse_first);
  A threshold = heap[0].value;
  int64_t j = k;
  for (; j + kBlock <= n; j += kBlock) {
    // Later elements equal to the threshold lose the tie (higher index): strict >.
    // !(v <= threshold) also catches NaN; an int OR-reduction is what GCC vectorizes.
    int any = 0;
    for (int64_t t = 0; t < kBlock; ++t) any |= !(static_cast<A>(x[j + t]) <= threshold);
    if (!any) continue;
    for (int64_t t = 0; t < kBlock; ++t) {
      const A v = static_cast<A>(x[j + t]);
      nan |= v != v;
      if (v > threshold) {
        replace_worst(heap, k, {v, first + j + t});
        threshold = heap[0].value;
      }
    }
  }
  for (; j < n; ++j) {
    const A v = static_cast<A>(x[j]);
    nan |= v != v;
    if (v > threshold) {
      replace_worst(heap, k, {v, first + j});
      threshold = heap[0].value;
    }
  }
  return !nan;
}

AEFAST_SIMD_CLONES bool topk_scan_f32(const float* x, int64_t n, int64_t first, int64_t k,
                                      Candidate<float>* heap) {
  return topk_scan<float, float>(x, n, first, k, heap);
}

template <typename T, typename A>
bool scan(const T* x, int64_t n, int64_t first, int64_t k, Candidate<A>* heap) {
  if constexpr (std::is_same_v<T, float>) {
    return topk_scan_f32(x, n, first, k, heap);
  } else {
    return topk_scan<T, A>(x, n, first, k, heap);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& x_in, int64_t k, bool relu) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "aefast: x must be 2-D, got ", x_in.dim(), "-D");
  const int64_t B = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= H, "aefast: k must be in [1, ", H, "], got ", k);
  const auto x = x_in.contiguous();
  auto values = at::empty({B, k}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  std::atomic<bool> has_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_forward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    // Few long rows (batch_topk flattens the batch into one): split each row into
    // chunks scanned in parallel, then merge their candidates. Exact either way.
    const int64_t threads = at::get_num_threads();
    const int64_t chunks =
        B >= threads ? 1 : std::max<int64_t>(1, std::min(2 * threads / B, H / std::max<int64_t>(8 * k, 4096)));
    const int64_t chunk_len = (H + chunks - 1) / chunks;
    std::vector<Candidate<A>> cand(static_cast<size_t>(B * chunks * k));
    std::vector<int64_t> cand_count(static_cast<size_t>(B * chunks), 0);
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t / chunks, c = t % chunks;
        const int64_t first = c * chunk_len, n = std::min(H, first + chunk_len) - first;
        if (n <= 0) continue;
        const int64_t kk = std::min(k, n);
        if (!scan(xp + row * H + first, n, first, kk, cand.data() + t * k)) has_nan = true;
        cand_count[t] = kk;
      }
    });
    TORCH_CHECK_VALUE(!has_nan.load(), "aefast: x contains NaN; top-k of NaN is undefined");
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      std::vector<Candidate<A>> merged;
      for (int64_t row = r0; row < r1; ++row) {
        merged.clear();
        for (int64_t c = 0; c < chunks; ++c) {
          const Candidate<A>* p = cand.data() + (row * chunks + c) * k;
          merged.insert(merged.end(), p, p + cand_count[row * chunks + c]);
        }
        std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), better<A>);
        for (int64_t j = 0; j < k; ++j) {
          A v = merged[j].value;
          if (relu && v < A(0)) v = A(0);
          vp[row * k + j] = static_cast<scalar_t>(v);
          ip[row * k + j] = merged[j].index;
        }
      }
    });
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) { m.impl("topk_forward", &topk_forward); }

}  // namespace cpu
}  // namespace aefast
