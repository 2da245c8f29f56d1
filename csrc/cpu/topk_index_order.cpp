// CPU top-k in index order: per row of x the k largest (ties to the lower index),
// returned in the order of their indices. It serves the selections over a whole
// batch, whose winners are only scattered into a dense output: batch_topk's one row
// of B*H with k*B winners, lifetime_topk's columns. topk.cpp keeps winners in value
// order in a heap, log(k) work per improvement: with thousands of winners per row
// that is most of the time. Without the order, a bar and one filtering pass:
// - a transposed x (lifetime_topk's x.t(): its rows are the columns of a row-major
//   matrix) goes by in tiles of 16 of its rows, 16 contiguous elements of each matrix
//   row, kept in that layout as integer keys in the values' order: one vector lane
//   per row of x. The 16 bars are bisected on the key in lockstep (one vector count
//   over the tile per step) until each keeps k to k + 4 elements; the exact
//   selection is among those;
// - a long contiguous row: the bar comes from a sample of the row, a little below
//   where the k-th largest must lie, then one parallel pass at memory speed keeps the
//   elements above it (a vector compare, and only the hits looked at); the exact
//   selection is among those, or, when fewer than k are above it, they and the first
//   elements equal to it. If the sample misled (fewer than k at or above the bar, or
//   far more candidates than it predicted), or
// - anything else: topk_forward's exact scan, its winners sorted into index order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "topk_candidates.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace aefast {
namespace cpu {
namespace {

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

template <typename A>
using KeyOf = std::conditional_t<std::is_same_v<A, double>, int64_t, int32_t>;

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

template <typename T, typename A>
void write_winners(const std::vector<Candidate<A>>& winners, bool relu, T* values, int64_t* indices) {
  for (size_t j = 0; j < winners.size(); ++j) {
    A v = winners[j].value;
    if (relu && v < A(0)) v = A(0);
    values[j] = static_cast<T>(v);
    indices[j] = winners[j].index;
  }
}

// ------------------------------------------------------------ a transposed x

constexpr int64_t kLanes = 16;

// A tile in its row-major layout: element (r, j) of x's rows row0.. at [j * kLanes + r - row0].
template <typename A>
struct TileScratch {
  std::vector<KeyOf<A>> keys;
  std::vector<A> values;
  std::vector<int32_t> rows;  // per lane, the positions of its candidates
  std::vector<Candidate<A>> found;
  std::vector<A> scratch;
};

// counts[l] = how many of the tile's keys in lane l are >= bars[l].
template <typename Key>
AEFAST_INLINE void count_lanes(const Key* keys, int64_t n, const Key* bars, int32_t* counts) {
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int64_t l = 0; l < kLanes; ++l) c[l] += keys[j * kLanes + l] >= bars[l];
  std::copy(c, c + kLanes, counts);
}

// Per lane l, the positions j whose key is >= bars[l], into rows[l * n ...]; their number into counts.
template <typename Key>
AEFAST_INLINE void collect_lanes(const Key* keys, int64_t n, const Key* bars, int32_t* rows, int32_t* counts) {
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j)
    for (int64_t l = 0; l < kLanes; ++l)
      if (keys[j * kLanes + l] >= bars[l]) rows[l * n + c[l]++] = static_cast<int32_t>(j);
  std::copy(c, c + kLanes, counts);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw"))) void count_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
                                                                    int32_t* counts) {
  const __m512i bar = _mm512_loadu_si512(bars), one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; ++j)
    c = _mm512_mask_add_epi32(c, _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + j * kLanes), bar), c, one);
  _mm512_storeu_si512(counts, c);
}

__attribute__((target("avx2"))) void count_lanes_avx2(const int32_t* keys, int64_t n, const int32_t* bars,
                                                      int32_t* counts) {
  // a >= b as !(b > a): a compare gives -1 where true, so subtracting it counts.
  const __m256i bar0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  const __m256i bar1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars + 8));
  __m256i below0 = _mm256_setzero_si256(), below1 = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; ++j) {
    const __m256i* row = reinterpret_cast<const __m256i*>(keys + j * kLanes);
    below0 = _mm256_sub_epi32(below0, _mm256_cmpgt_epi32(bar0, _mm256_loadu_si256(row)));
    below1 = _mm256_sub_epi32(below1, _mm256_cmpgt_epi32(bar1, _mm256_loadu_si256(row + 1)));
  }
  alignas(32) int32_t below[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(below), below0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(below + 8), below1);
  for (int64_t l = 0; l < kLanes; ++l) counts[l] = static_cast<int32_t>(n) - below[l];
}

// The lanes at or above their bars as a bit mask, then only those lanes visited.
__attribute__((target("avx512f,avx512bw"))) void collect_lanes_avx512(const int32_t* keys, int64_t n, const int32_t* bars,
                                                                      int32_t* rows, int32_t* counts) {
  const __m512i bar = _mm512_loadu_si512(bars);
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    for (uint32_t m = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + j * kLanes), bar); m != 0; m &= m - 1) {
      const int l = __builtin_ctz(m);
      rows[l * n + c[l]++] = static_cast<int32_t>(j);
    }
  }
  std::copy(c, c + kLanes, counts);
}

__attribute__((target("avx2"))) void collect_lanes_avx2(const int32_t* keys, int64_t n, const int32_t* bars,
                                                        int32_t* rows, int32_t* counts) {
  const __m256i bar0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars));
  const __m256i bar1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bars + 8));
  int32_t c[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    const __m256i* row = reinterpret_cast<const __m256i*>(keys + j * kLanes);
    const uint32_t below = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bar0, _mm256_loadu_si256(row))))) |
                           static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bar1, _mm256_loadu_si256(row + 1))))) << 8;
    for (uint32_t m = ~below & 0xFFFFu; m != 0; m &= m - 1) {
      const int l = __builtin_ctz(m);
      rows[l * n + c[l]++] = static_cast<int32_t>(j);
    }
  }
  std::copy(c, c + kLanes, counts);
}

// A full tile of float32: vals and keys of X's rows j, columns [0, 16); each lane's
// smallest and largest key into low and high. Returns false on a NaN.
__attribute__((target("avx512f,avx512bw"))) bool copy_tile_avx512(const float* X, int64_t R, int64_t n, float* vals,
                                                                  int32_t* keys, int32_t* low, int32_t* high) {
  __m512i lo = _mm512_set1_epi32(std::numeric_limits<int32_t>::max()), hi = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < n; ++j) {
    const __m512 v = _mm512_loadu_ps(X + j * R);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i i = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));  // -0.0 -> +0.0
    const __m512i key = _mm512_xor_si512(i, _mm512_and_si512(_mm512_srai_epi32(i, 31), magnitude));
    _mm512_storeu_ps(vals + j * kLanes, v);
    _mm512_storeu_si512(keys + j * kLanes, key);
    lo = _mm512_min_epi32(lo, key);
    hi = _mm512_max_epi32(hi, key);
  }
  _mm512_storeu_si512(low, lo);
  _mm512_storeu_si512(high, hi);
  return nan == 0;
}

__attribute__((target("avx2"))) bool copy_tile_avx2(const float* X, int64_t R, int64_t n, float* vals, int32_t* keys,
                                                    int32_t* low, int32_t* high) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i lo[2], hi[2];
  __m256 unordered = _mm256_setzero_ps();
  for (int h = 0; h < 2; ++h) {
    lo[h] = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    hi[h] = _mm256_set1_epi32(std::numeric_limits<int32_t>::min());
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(X + j * R + 8 * h);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i i = _mm256_castps_si256(_mm256_add_ps(v, _mm256_setzero_ps()));
      const __m256i key = _mm256_xor_si256(i, _mm256_and_si256(_mm256_srai_epi32(i, 31), magnitude));
      _mm256_storeu_ps(vals + j * kLanes + 8 * h, v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j * kLanes + 8 * h), key);
      lo[h] = _mm256_min_epi32(lo[h], key);
      hi[h] = _mm256_max_epi32(hi[h], key);
    }
  }
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + 8 * h), lo[h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + 8 * h), hi[h]);
  }
  return _mm256_movemask_ps(unordered) == 0;
}
#endif

// vals and keys of the tile (lanes past the last row: copies of the last), each lane's
// smallest and largest key. Returns false on a NaN.
template <typename T, typename A>
bool copy_tile(const T* X, int64_t R, int64_t n, int64_t lanes, A* vals, KeyOf<A>* keys, KeyOf<A>* low, KeyOf<A>* high) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    if (lanes == kLanes && simd_level() == Simd::kAvx512) return copy_tile_avx512(X, R, n, vals, keys, low, high);
    if (lanes == kLanes && simd_level() == Simd::kAvx2) return copy_tile_avx2(X, R, n, vals, keys, low, high);
  }
#endif
  std::fill(low, low + kLanes, std::numeric_limits<KeyOf<A>>::max());
  std::fill(high, high + kLanes, std::numeric_limits<KeyOf<A>>::min());
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(X[j * R + (l < lanes ? l : lanes - 1)]);
      bad |= v != v;
      const KeyOf<A> key = order_key(v);
      vals[j * kLanes + l] = v;
      keys[j * kLanes + l] = key;
      low[l] = std::min(low[l], key);
      high[l] = std::max(high[l], key);
    }
  }
  return bad == 0;
}

template <typename Key>
void count_tile(const Key* keys, int64_t n, const Key* bars, int32_t* counts) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<Key, int32_t>) {
    if (simd_level() == Simd::kAvx512) return count_lanes_avx512(keys, n, bars, counts);
    if (simd_level() == Simd::kAvx2) return count_lanes_avx2(keys, n, bars, counts);
  }
#endif
  count_lanes(keys, n, bars, counts);
}

template <typename Key>
void collect_tile(const Key* keys, int64_t n, const Key* bars, int32_t* rows, int32_t* counts) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<Key, int32_t>) {
    if (simd_level() == Simd::kAvx512) return collect_lanes_avx512(keys, n, bars, rows, counts);
    if (simd_level() == Simd::kAvx2) return collect_lanes_avx2(keys, n, bars, rows, counts);
  }
#endif
  collect_lanes(keys, n, bars, rows, counts);
}

// Rows [row0, row0 + lanes) of x (R, n), whose element (r, j) is X[j * R + r].
// Returns false if they hold a NaN.
template <typename T, typename A>
bool select_tile(const T* X, int64_t R, int64_t n, int64_t row0, int64_t lanes, int64_t k, bool relu,
                 TileScratch<A>& s, T* values, int64_t* indices) {
  using Key = KeyOf<A>;
  using UKey = std::make_unsigned_t<Key>;
  s.keys.resize(static_cast<size_t>(kLanes * n));
  s.values.resize(static_cast<size_t>(kLanes * n));
  Key* keys = s.keys.data();
  A* vals = s.values.data();
  Key bar[kLanes], top[kLanes];
  if (!copy_tile(X + row0, R, n, lanes, vals, keys, bar, top)) return false;
  // Per lane, invariant count(>= bar) >= k > count(>= top), narrowed in lockstep until
  // the count is near k (or bar and top are adjacent keys).
  const int64_t enough = k + 4;  // a few steps more, and no nth_element
  int32_t counts[kLanes];
  bool done[kLanes];
  count_tile(keys, n, top, counts);
  for (int64_t l = 0; l < kLanes; ++l) {
    done[l] = counts[l] >= k;
    if (done[l]) bar[l] = top[l];
  }
  for (;;) {
    Key mid[kLanes];
    bool all_done = true;
    for (int64_t l = 0; l < kLanes; ++l) {
      const UKey gap = static_cast<UKey>(top[l]) - static_cast<UKey>(bar[l]);
      done[l] = done[l] || gap <= 1;
      all_done = all_done && done[l];
      mid[l] = done[l] ? bar[l] : static_cast<Key>(static_cast<UKey>(bar[l]) + gap / 2);
    }
    if (all_done) break;
    count_tile(keys, n, mid, counts);
    for (int64_t l = 0; l < kLanes; ++l) {
      if (done[l]) continue;
      if (counts[l] < k) {
        top[l] = mid[l];
      } else {
        bar[l] = mid[l];
        done[l] = counts[l] <= enough;
      }
    }
  }
  s.rows.resize(static_cast<size_t>(kLanes * n));
  collect_tile(keys, n, bar, s.rows.data(), counts);
  for (int64_t l = 0; l < lanes; ++l) {
    s.found.clear();
    const int32_t* rows = s.rows.data() + l * n;
    for (int32_t i = 0; i < counts[l]; ++i) s.found.push_back({vals[rows[i] * kLanes + l], rows[i]});
    keep_best_in_index_order(s.found, k, s.scratch);
    write_winners(s.found, relu, values + (row0 + l) * k, indices + (row0 + l) * k);
  }
  return true;
}

// ------------------------------------------------------------ a long row

enum class Outcome { kDone, kMisled, kNaN };

constexpr int64_t kSample = 16384;

inline uint64_t mix(uint64_t z) {  // splitmix64's finalizer: sample offsets
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// One chunk's share of the filtering pass: its elements above the bar, in index order.
template <typename A>
struct ChunkFound {
  std::vector<Candidate<A>> greater;
  bool nan = false, overflow = false;
};

// x[0, n)'s elements above `bar` into `out` (at most `cap` of them, else overflow).
template <typename T, typename A>
AEFAST_INLINE void filter_above(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    int any = 0;  // !(v <= bar): above the bar, or NaN
    for (int64_t t = 0; t < kLanes; ++t) any |= !(static_cast<A>(x[j + t]) <= bar);
    if (!any) continue;
    for (int64_t t = j; t < j + kLanes; ++t) {
      const A v = static_cast<A>(x[t]);
      if (v > bar) out.greater.push_back({v, first + t});
      out.nan |= v != v;
    }
    if (out.greater.size() > cap || out.nan) break;
  }
  for (; j < n && !out.nan && out.greater.size() <= cap; ++j) {  // not on past an overflow
    const A v = static_cast<A>(x[j]);
    if (v > bar) out.greater.push_back({v, first + j});
    out.nan |= v != v;
  }
  out.overflow = !out.nan && out.greater.size() > cap;
}

#if defined(__x86_64__) && defined(__GNUC__)
// float32: a compare mask per vector (!(v <= bar): above, or NaN), then only its set bits.
AEFAST_INLINE bool take_masked(const float* x, int64_t j, uint32_t m, int64_t first, ChunkFound<float>& out) {
  for (; m != 0; m &= m - 1) {
    const int64_t t = j + __builtin_ctz(m);
    if (x[t] != x[t]) return false;
    out.greater.push_back({x[t], first + t});
  }
  return true;
}

// After a vector loop stopped at j: the last n % 16 elements (unless it met a NaN or
// overflowed), then the overflow flag.
inline void filter_rest(const float* x, int64_t n, int64_t j, int64_t first, float bar, size_t cap, ChunkFound<float>& out) {
  ChunkFound<float> rest;
  if (j < n && !out.nan && out.greater.size() <= cap) filter_above<float, float>(x + j, n - j, first + j, bar, cap, rest);
  out.greater.insert(out.greater.end(), rest.greater.begin(), rest.greater.end());
  out.nan |= rest.nan;
  out.overflow = !out.nan && out.greater.size() > cap;
}

__attribute__((target("avx512f,avx512bw"))) void filter_above_avx512(const float* x, int64_t n, int64_t first, float bar,
                                                                     size_t cap, ChunkFound<float>& out) {
  const __m512 b = _mm512_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), b, _CMP_NLE_UQ);
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out);
}

__attribute__((target("avx2"))) void filter_above_avx2(const float* x, int64_t n, int64_t first, float bar, size_t cap,
                                                       ChunkFound<float>& out) {
  const __m256 b = _mm256_set1_ps(bar);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), b, _CMP_NLE_UQ))) |
                       static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j + 8), b, _CMP_NLE_UQ))) << 8;
    if (m == 0) continue;
    out.nan = !take_masked(x, j, m, first, out);
    if (out.nan || out.greater.size() > cap) break;
  }
  filter_rest(x, n, j, first, bar, cap, out);
}
#endif

template <typename T, typename A>
void filter_chunk(const T* x, int64_t n, int64_t first, A bar, size_t cap, ChunkFound<A>& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_level() == Simd::kAvx512) return filter_above_avx512(x, n, first, bar, cap, out);
    if (simd_level() == Simd::kAvx2) return filter_above_avx2(x, n, first, bar, cap, out);
  }
#endif
  filter_above<T, A>(x, n, first, bar, cap, out);
}

template <typename T, typename A>
Outcome select_long_row(const T* x, int64_t n, int64_t k, bool relu, T* values, int64_t* indices) {
  // The bar: the sample's r-th largest, r a few standard deviations above the k * s / n
  // winners the sample holds on average, so that at least k of the row are >= it.
  std::vector<A> sample(kSample);
  const int64_t stratum = n / kSample;
  for (int64_t i = 0; i < kSample; ++i) {
    sample[i] = static_cast<A>(x[i * stratum + static_cast<int64_t>(mix(i) % static_cast<uint64_t>(stratum))]);
    if (sample[i] != sample[i]) return Outcome::kNaN;
  }
  const double expected = static_cast<double>(k) * kSample / n;
  const int64_t rank = std::min<int64_t>(kSample, static_cast<int64_t>(std::ceil(expected + 4 * std::sqrt(expected) + 8)));
  std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<A>());
  const A bar = sample[rank - 1];

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), n >> 16));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  // Twice the candidates the sample predicts, and some: more means it misled.
  const size_t cap = static_cast<size_t>(2.0 * rank / kSample * chunk_len) + 4096;
  std::vector<ChunkFound<A>> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * chunk_len, len = std::min(n, first + chunk_len) - first;
      if (len <= 0) continue;
      found[c].greater.reserve(std::min(cap, static_cast<size_t>(len)) + kLanes);
      filter_chunk<T, A>(x + first, len, first, bar, cap, found[c]);
    }
  });
  int64_t greater = 0;
  for (const auto& f : found) {
    if (f.nan) return Outcome::kNaN;
    if (f.overflow) return Outcome::kMisled;
    greater += static_cast<int64_t>(f.greater.size());
  }
  std::vector<Candidate<A>> winners;
  winners.reserve(greater);
  for (const auto& f : found) winners.insert(winners.end(), f.greater.begin(), f.greater.end());
  if (greater >= k) {
    std::vector<A> scratch;
    keep_best_in_index_order(winners, k, scratch);
  } else {
    // All above the bar win, and the first k - greater elements equal to it, if so many.
    std::vector<Candidate<A>> ties;
    for (int64_t j = 0; j < n && static_cast<int64_t>(ties.size()) < k - greater; ++j) {
      const A v = static_cast<A>(x[j]);
      if (v == bar) ties.push_back({v, j});
    }
    if (static_cast<int64_t>(ties.size()) < k - greater) return Outcome::kMisled;
    std::vector<Candidate<A>> merged(k);
    std::merge(winners.begin(), winners.end(), ties.begin(), ties.end(), merged.begin(),
               [](const Candidate<A>& a, const Candidate<A>& b) { return a.index < b.index; });
    winners.swap(merged);
  }
  write_winners(winners, relu, values, indices);
  return Outcome::kDone;
}

// ------------------------------------------------------------ the kernel

std::tuple<at::Tensor, at::Tensor> in_index_order(const at::Tensor& values, const at::Tensor& indices) {
  auto [sorted, order] = indices.sort(1);
  return {values.gather(1, order), sorted};
}

std::tuple<at::Tensor, at::Tensor> topk_index_order(const at::Tensor& x, int64_t k, bool relu) {
  TORCH_CHECK_VALUE(x.dim() == 2, "aefast: x must be 2-D, got ", x.dim(), "-D");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, "aefast: k must be in [1, ", n, "], got ", k);
  const bool transposed = R > 1 && n > 1 && x.stride(0) == 1 && x.stride(1) == R && n < (int64_t(1) << 31);
  const bool long_rows = x.is_contiguous() && n >= 4 * kSample && k >= 256 && 8 * k <= n;
  if (!transposed && !long_rows) {
    auto [values, indices] = topk_forward(x, k, relu);
    return in_index_order(values, indices);
  }
  auto values = at::empty({R, k}, x.options());
  auto indices = at::empty({R, k}, x.options().dtype(at::kLong));
  bool nan = false, misled = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_index_order", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    if (transposed) {
      std::atomic<bool> has_nan{false};
      at::parallel_for(0, (R + kLanes - 1) / kLanes, 1, [&](int64_t t0, int64_t t1) {
        TileScratch<A> scratch;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t row0 = t * kLanes;
          if (!select_tile(xp, R, n, row0, std::min(kLanes, R - row0), k, relu, scratch, vp, ip)) has_nan = true;
        }
      });
      nan = has_nan.load();
      return;
    }
    for (int64_t r = 0; r < R && !nan && !misled; ++r) {
      const Outcome outcome = select_long_row<scalar_t, A>(xp + r * n, n, k, relu, vp + r * k, ip + r * k);
      nan = outcome == Outcome::kNaN;
      misled = outcome == Outcome::kMisled;
    }
  });
  TORCH_CHECK_VALUE(!nan, "aefast: x contains NaN; top-k of NaN is undefined");
  if (misled) {
    auto [v, i] = topk_forward(x, k, relu);
    return in_index_order(v, i);
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) { m.impl("topk_index_order", &topk_index_order); }

}  // namespace cpu
}  // namespace aefast
