// Top-k of rows with many winners by radix select. Each value's order key (an unsigned
// integer in the values' order) is cut into four 8-bit digits. Counting the top digit
// of every key says in which bucket the k-th largest lies and how many keys lie above
// that bucket; the keys of that bucket alone go on to the next digit, and after the
// fourth the k-th largest key is known exactly, with how many of the keys equal to it
// are among the k best (the first ones, in index order). One vector pass over the row
// then collects the winners in index order. Every step is a count or a compare: no
// heap, no comparison sort, nothing that depends on the values' distribution (ReLU's
// zeros, all ties, cost what random values cost). The winners are ranked by a radix
// sort too: four stable passes over their keys' digits, from the lowest.
#include "topk_radix.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace aefast {
namespace cpu {
namespace {

constexpr int kDigitBits = 8;
constexpr int kBuckets = 1 << kDigitBits;
constexpr uint32_t kDigitMask = kBuckets - 1;

// Larger value, larger key; -0.0 has +0.0's key (the two tie).
AEFAST_INLINE uint32_t unsigned_key(float v) { return static_cast<uint32_t>(order_key(v)) ^ 0x80000000u; }

// The value of a key (order_key's bit map is its own inverse).
inline float value_of_key(uint32_t key) {
  const int32_t ordered = static_cast<int32_t>(key ^ 0x80000000u);
  const int32_t bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// keys[i] = unsigned_key(x[i]); returns whether x holds a NaN.
AEFAST_SIMD_CLONES bool row_keys(const float* x, int64_t n, uint32_t* keys) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan |= x[i] != x[i];
    keys[i] = unsigned_key(x[i]);
  }
  return nan != 0;
}

// counts[d]: how many of keys[0, n) have digit d at kShift. Four sets of counts, taken
// in turn: a run of one digit (ReLU's zeros) would otherwise wait on its own increments.
template <int kShift>
void digit_counts(const uint32_t* keys, int64_t n, int64_t (&counts)[kBuckets]) {
  uint32_t sub[4][kBuckets] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) ++sub[j][(keys[i + j] >> kShift) & kDigitMask];
  for (; i < n; ++i) ++sub[0][(keys[i] >> kShift) & kDigitMask];
  for (int d = 0; d < kBuckets; ++d) counts[d] = int64_t(sub[0][d]) + sub[1][d] + sub[2][d] + sub[3][d];
}

// The keys of keys[0, n) with digit d at kShift moved to the front, in order; returns
// how many. keys has room for n + 16.
template <int kShift>
int64_t keep_digit_portable(uint32_t* keys, int64_t n, uint32_t d) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: the store always, the count by the test
    const uint32_t key = keys[i];
    keys[kept] = key;
    kept += ((key >> kShift) & kDigitMask) == d;
  }
  return kept;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512: 16 keys compared at once, the kept ones compressed to the front
// of a vector stored whole at the next free place (at or before the keys just read).
template <int kShift>
__attribute__((target("avx512f"))) int64_t keep_digit_avx512(uint32_t* keys, int64_t n, uint32_t d) {
  const __m512i digit = _mm512_set1_epi32(static_cast<int>(d)), mask = _mm512_set1_epi32(kDigitMask);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = i + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i v = _mm512_maskz_loadu_epi32(in, keys + i);
    const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(in, _mm512_and_si512(_mm512_srli_epi32(v, kShift), mask), digit);
    _mm512_storeu_si512(keys + kept, _mm512_maskz_compress_epi32(same, v));
    kept += __builtin_popcount(same);
  }
  return kept;
}
#endif

// One digit of the search: the bucket of the k-th largest of keys[0, n) at kShift into
// prefix, its keys moved to the front; n and k become the bucket's.
template <int kShift>
void narrow_to_digit(uint32_t* keys, int64_t& n, int64_t& k, uint32_t& prefix) {
  int64_t counts[kBuckets];
  digit_counts<kShift>(keys, n, counts);
  int d = kBuckets - 1;
  while (counts[d] < k) k -= counts[d--];  // k now counts within bucket d
  prefix |= uint32_t(d) << kShift;
  if (kShift == 0 || counts[d] == n) return;
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() >= Simd::kAvx512) {
    n = keep_digit_avx512<kShift>(keys, n, d);
    return;
  }
#endif
  n = keep_digit_portable<kShift>(keys, n, d);
}

struct KthKey {
  uint32_t key;
  int64_t ties;  // how many keys equal to it are among the k largest
};

// The k-th largest of keys[0, n) (1 <= k <= n), digit by digit from the top (keys
// reordered; room for n + 16).
KthKey kth_largest_key(uint32_t* keys, int64_t n, int64_t k) {
  uint32_t prefix = 0;
  // A few survivors are ranked directly: a digit's counts cost a few hundred cycles,
  // whatever the number of keys.
  constexpr int64_t kFew = 32;
  const auto among_few = [&] {
    std::nth_element(keys, keys + (k - 1), keys + n, std::greater<uint32_t>());
    const uint32_t kth = keys[k - 1];
    return KthKey{kth, k - std::count_if(keys, keys + n, [&](uint32_t key) { return key > kth; })};
  };
  narrow_to_digit<24>(keys, n, k, prefix);
  if (n <= kFew) return among_few();
  narrow_to_digit<16>(keys, n, k, prefix);
  if (n <= kFew) return among_few();
  narrow_to_digit<8>(keys, n, k, prefix);
  if (n <= kFew) return among_few();
  narrow_to_digit<0>(keys, n, k, prefix);
  return {prefix, k};
}

// The elements of x[0, n) above `bar` and the first `ties` equal to it, in index
// order, into values / offsets (room for n + 16); returns how many.
int64_t collect_portable(const float* x, int64_t n, float bar, int64_t ties, float* values, int32_t* offsets) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const bool equal = v == bar;
    const bool take = v > bar || (equal && ties > 0);
    ties -= equal && take;
    values[m] = v;
    offsets[m] = static_cast<int32_t>(j);
    m += take;
  }
  return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512: a compare mask per 16 elements, the taken ones compressed to
// the front of a vector and stored whole (the next store overwrites the rest).
__attribute__((target("avx512f"))) int64_t collect_avx512(const float* x, int64_t n, float bar, int64_t ties,
                                                          float* values, int32_t* offsets) {
  const __m512 bars = _mm512_set1_ps(bar);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + j);
    uint32_t take = _mm512_mask_cmp_ps_mask(in, v, bars, _CMP_GT_OQ);
    if (ties > 0) {
      uint32_t equal = _mm512_mask_cmp_ps_mask(in, v, bars, _CMP_EQ_OQ);
      while (__builtin_popcount(equal) > ties) equal &= ~(1u << (31 - __builtin_clz(equal)));  // the first `ties`
      ties -= __builtin_popcount(equal);
      take |= equal;
    }
    const __mmask16 mask = static_cast<__mmask16>(take);
    _mm512_storeu_ps(values + m, _mm512_maskz_compress_ps(mask, v));
    _mm512_storeu_si512(offsets + m, _mm512_maskz_compress_epi32(mask, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)))));
    m += __builtin_popcount(take);
  }
  return m;
}
#endif

}  // namespace

bool radix_select(const float* x, int64_t n, int64_t first, int64_t k, Candidate<float>* out, RadixScratch& s) {
  s.keys.resize(static_cast<size_t>(n + 16));
  if (row_keys(x, n, s.keys.data())) return false;
  const KthKey kth = kth_largest_key(s.keys.data(), n, k);
  const float bar = value_of_key(kth.key);
  s.values.resize(static_cast<size_t>(k + 16));  // k taken, and a vector's overrun
  s.offsets.resize(static_cast<size_t>(k + 16));
  // Everything above the bar and `ties` equal to it: k in all, never more.
  int64_t taken;
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() >= Simd::kAvx512)
    taken = collect_avx512(x, n, bar, kth.ties, s.values.data(), s.offsets.data());
  else
#endif
    taken = collect_portable(x, n, bar, kth.ties, s.values.data(), s.offsets.data());
  TORCH_CHECK(taken == k, "aefast: radix select took ", taken, " of k = ", k);
  for (int64_t i = 0; i < k; ++i) out[i] = {s.values[i], first + s.offsets[i]};
  return true;
}

void radix_rank(Candidate<float>* c, int64_t n, RadixScratch& s) {
  if (n < 2) return;
  const auto by_index = [](const Candidate<float>& a, const Candidate<float>& b) { return a.index < b.index; };
  if (!std::is_sorted(c, c + n, by_index)) {  // ties would not come out in index order
    std::sort(c, c + n, [](const Candidate<float>& a, const Candidate<float>& b) { return better(a, b); });
    return;
  }
  // (descending key, position) pairs; stable passes over the key's digits from the
  // lowest leave equal keys in position order, which is index order.
  s.order.resize(static_cast<size_t>(n));
  s.spare.resize(static_cast<size_t>(n));
  uint64_t* from = s.order.data();
  uint64_t* to = s.spare.data();
  for (int64_t i = 0; i < n; ++i) from[i] = uint64_t(~unsigned_key(c[i].value)) << 32 | uint64_t(i);
  for (int shift = 32; shift < 64; shift += kDigitBits) {
    int64_t start[kBuckets] = {};
    for (int64_t i = 0; i < n; ++i) ++start[(from[i] >> shift) & kDigitMask];
    if (*std::max_element(start, start + kBuckets) == n) continue;  // one digit for all: in order already
    int64_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) {
      const int64_t count = start[d];
      start[d] = sum;
      sum += count;
    }
    for (int64_t i = 0; i < n; ++i) to[start[(from[i] >> shift) & kDigitMask]++] = from[i];
    std::swap(from, to);
  }
  s.ranked.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.ranked[i] = c[from[i] & 0xFFFFFFFFu];
  std::copy(s.ranked.begin(), s.ranked.end(), c);
}

}  // namespace cpu
}  // namespace aefast
