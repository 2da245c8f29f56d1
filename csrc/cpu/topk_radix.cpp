// Top-k of rows with many winners by radix select. Each value's order key (an unsigned
// integer in the values' order) is cut into four 8-bit digits. Counting the top digit
// of every key says in which bucket the k-th largest lies and how many keys lie above
// that bucket; the keys of that bucket alone go on to the next digit, and after the
// fourth (or once a few are left, ranked directly) the k-th largest key is known
// exactly, with how many of the keys equal to it are among the k best (the first ones,
// in index order). One vector pass then collects the winners in index order. Every
// step is a count or a compare: no heap, no comparison sort, nothing that depends on
// the values' distribution (ReLU's zeros, all ties, cost what random values cost).
// Rows of 1024 or more are narrowed first: a sample of 16 lines gives a bar that the
// k best are very likely above, one vector pass keeps the elements at or above it
// (a few times k), and the digits are counted over those alone; if fewer than k pass,
// the whole row is counted. The winners are ranked by a radix sort too: stable passes
// over their keys' digits, from the lowest, skipping digits that all share.
#include "topk_radix.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "common.h"


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
// how many. keys has room for n + 16. From keys[from] on, `kept` of those before it
// already kept (the vector paths' tails).
template <int kShift>
int64_t keep_digit_portable(uint32_t* keys, int64_t n, uint32_t d, int64_t from = 0, int64_t kept = 0) {
  for (int64_t i = from; i < n; ++i) {  // branch-free: the store always, the count by the test
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
AEFAST_AVX512 int64_t keep_digit_avx512(uint32_t* keys, int64_t n, uint32_t d) {
  const __m512i digit = _mm512_set1_epi32(static_cast<int>(d)), mask = _mm512_set1_epi32(kDigitMask);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = i + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i v = load16_in(keys + i, in);
    const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(in, _mm512_and_si512(_mm512_srli_epi32(v, kShift), mask), digit);
    _mm512_storeu_si512(keys + kept, _mm512_maskz_compress_epi32(same, v));
    kept += __builtin_popcount(same);
  }
  return kept;
}

// The lanes of v (elements j .. j + 7) set in `take` appended to values and offsets at
// m (room for 8 more); returns the new m.
AEFAST_AVX2 inline int64_t append_taken8(__m256 v, uint32_t take, int64_t j, float* values, int32_t* offsets,
                                         int64_t m) {
  return m + left_pack8(v, take, static_cast<int32_t>(j), values + m, offsets + m);
}

// offsets[m, m + rest) of a portable tail that began at element j, made the row's.
inline int64_t from_tail(int32_t* offsets, int64_t m, int64_t rest, int64_t j) {
  for (int64_t i = m; i < m + rest; ++i) offsets[i] += static_cast<int32_t>(j);
  return m + rest;
}

template <int kShift>
AEFAST_AVX2 int64_t keep_digit_avx2(uint32_t* keys, int64_t n, uint32_t d) {
  const __m256i digit = _mm256_set1_epi32(static_cast<int>(d)), mask = _mm256_set1_epi32(kDigitMask);
  int64_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i same = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(v, kShift), mask), digit);
    const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(same)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + kept), _mm256_permutevar8x32_epi32(v, left_pack_order8(bits)));
    kept += __builtin_popcount(bits);
  }
  return keep_digit_portable<kShift>(keys, n, d, i, kept);
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
  if (simd_level() == Simd::kAvx2) {
    n = keep_digit_avx2<kShift>(keys, n, d);
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
AEFAST_AVX512 int64_t collect_avx512(const float* x, int64_t n, float bar, int64_t ties,
                                                          float* values, int32_t* offsets) {
  const __m512 bars = _mm512_set1_ps(bar);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = load16_in(x + j, in);
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

// The same with AVX2, 8 at a time; the last n % 8 by the portable loop.
AEFAST_AVX2 int64_t collect_avx2(const float* x, int64_t n, float bar, int64_t ties, float* values, int32_t* offsets) {
  const __m256 bars = _mm256_set1_ps(bar);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    uint32_t take = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, bars, _CMP_GT_OQ)));
    if (ties > 0) {
      uint32_t equal = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, bars, _CMP_EQ_OQ)));
      while (__builtin_popcount(equal) > ties) equal &= ~(1u << (31 - __builtin_clz(equal)));  // the first `ties`
      ties -= __builtin_popcount(equal);
      take |= equal;
    }
    m = append_taken8(v, take, j, values, offsets, m);
  }
  return from_tail(offsets, m, collect_portable(x + j, n - j, bar, ties, values + m, offsets + m), j);
}
#endif

// The m-th largest (1 <= m <= count) of keys[0, count), built bit by bit from the top:
// 32 vector counts, no branch on the data.
AEFAST_SIMD_CLONES uint32_t mth_largest_key(const uint32_t* keys, int64_t count, int64_t m) {
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = t | (uint32_t(1) << bit);
    int32_t at_least = 0;
    for (int64_t i = 0; i < count; ++i) at_least += keys[i] >= trial;
    if (at_least >= m) t = trial;
  }
  return t;
}

// The elements of x[0, n) at or above `low`, in index order, into values / offsets
// (room for n + 16); returns how many, and in `nan` whether x holds a NaN.
int64_t candidates_portable(const float* x, int64_t n, float low, bool& nan, float* values, int32_t* offsets) {
  int64_t m = 0;
  int unordered = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    unordered |= v != v;
    values[m] = v;
    offsets[m] = static_cast<int32_t>(j);
    m += v >= low;
  }
  nan = unordered != 0;
  return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
AEFAST_AVX512 int64_t candidates_avx512(const float* x, int64_t n, float low, bool& nan,
                                                             float* values, int32_t* offsets) {
  const __m512 lows = _mm512_set1_ps(low);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  __mmask16 unordered = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = load16_in(x + j, in);
    unordered |= _mm512_mask_cmp_ps_mask(in, v, v, _CMP_UNORD_Q);
    const __mmask16 take = _mm512_mask_cmp_ps_mask(in, v, lows, _CMP_GE_OQ);
    _mm512_storeu_ps(values + m, _mm512_maskz_compress_ps(take, v));
    _mm512_storeu_si512(offsets + m, _mm512_maskz_compress_epi32(take, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)))));
    m += __builtin_popcount(take);
  }
  nan = unordered != 0;
  return m;
}

// The same with AVX2, 8 at a time; the last n % 8 by the portable loop.
AEFAST_AVX2 int64_t candidates_avx2(const float* x, int64_t n, float low, bool& nan, float* values, int32_t* offsets) {
  const __m256 lows = _mm256_set1_ps(low);
  __m256 unordered = _mm256_setzero_ps();
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const uint32_t take = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, lows, _CMP_GE_OQ)));
    m = append_taken8(v, take, j, values, offsets, m);
  }
  bool rest_nan = false;
  m = from_tail(offsets, m, candidates_portable(x + j, n - j, low, rest_nan, values + m, offsets + m), j);
  nan = rest_nan || _mm256_movemask_ps(unordered) != 0;
  return m;
}
#endif

// The k best of v[0, n) (1 <= k <= n): their values and positions in v, in index
// order, into s.values / s.offsets. Returns false if v holds a NaN.
bool pick_best(const float* v, int64_t n, int64_t k, RadixScratch& s) {
  uint32_t* keys = s.keys.at_least(n + 16);
  if (row_keys(v, n, keys)) return false;
  const KthKey kth = kth_largest_key(keys, n, k);
  const float bar = value_of_key(kth.key);
  float* values = s.values.at_least(k + 16);  // k taken, and a vector's overrun
  int32_t* offsets = s.offsets.at_least(k + 16);
  // Everything above the bar and `ties` equal to it: k in all, never more.
  int64_t taken;
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() >= Simd::kAvx512)
    taken = collect_avx512(v, n, bar, kth.ties, values, offsets);
  else if (simd_level() == Simd::kAvx2)
    taken = collect_avx2(v, n, bar, kth.ties, values, offsets);
  else
#endif
    taken = collect_portable(v, n, bar, kth.ties, values, offsets);
  TORCH_CHECK(taken == k, "aefast: radix select took ", taken, " of k = ", k);
  return true;
}

// Rows from this long on are narrowed first by a sample (bracketed_candidates).
constexpr int64_t kBracketedRow = 1024;
constexpr int64_t kSampleLines = 16, kSample = kSampleLines * 16;

enum class Bracket { kHeld, kMissed, kNan };

// A bar low enough to keep the k best of x[0, n) (n >= kBracketedRow) and not much
// more, from a sample of 16 lines of 16 elements spread over the row: the sample's
// key at the rank that k of n would have, three deviations and three keys further
// down. The elements at or above it into s.candidates / s.candidate_offsets, in one
// vector pass; kMissed if they are fewer than k (then the whole row is counted).
Bracket bracketed_candidates(const float* x, int64_t n, int64_t k, RadixScratch& s, int64_t& count) {
  uint32_t sample[kSample];
  for (int64_t line = 0; line < kSampleLines; ++line) {
    const float* p = x + (n - 16) * line / (kSampleLines - 1);
    for (int i = 0; i < 16; ++i) sample[line * 16 + i] = unsigned_key(p[i]);  // a NaN shows in the pass
  }
  const double share = static_cast<double>(k) / static_cast<double>(n), expected = share * kSample;
  const int64_t rank = static_cast<int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected * (1.0 - share)) + 3.0));
  if (rank >= kSample) return Bracket::kMissed;  // the bar would keep most of the row
  const float low = value_of_key(mth_largest_key(sample, kSample, rank));
  float* values = s.candidates.at_least(n + 16);
  int32_t* offsets = s.candidate_offsets.at_least(n + 16);
  bool nan;
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_level() >= Simd::kAvx512)
    count = candidates_avx512(x, n, low, nan, values, offsets);
  else if (simd_level() == Simd::kAvx2)
    count = candidates_avx2(x, n, low, nan, values, offsets);
  else
#endif
    count = candidates_portable(x, n, low, nan, values, offsets);
  if (nan) return Bracket::kNan;
  return count >= k ? Bracket::kHeld : Bracket::kMissed;
}

}  // namespace

bool radix_select(const float* x, int64_t n, int64_t first, int64_t k, Candidate<float>* out, RadixScratch& s) {
  if (n >= kBracketedRow) {
    int64_t count = 0;
    const Bracket bracket = bracketed_candidates(x, n, k, s, count);
    if (bracket == Bracket::kNan) return false;
    if (bracket == Bracket::kHeld) {
      pick_best(s.candidates.at_least(count), count, k, s);  // no NaN among them
      const float* values = s.values.at_least(k);
      const int32_t *picked = s.offsets.at_least(k), *offsets = s.candidate_offsets.at_least(count);
      for (int64_t i = 0; i < k; ++i) out[i] = {values[i], first + offsets[picked[i]]};
      return true;
    }
  }
  if (!pick_best(x, n, k, s)) return false;
  const float* values = s.values.at_least(k);
  const int32_t* picked = s.offsets.at_least(k);
  for (int64_t i = 0; i < k; ++i) out[i] = {values[i], first + picked[i]};
  return true;
}

void radix_keep_best(std::vector<Candidate<float>>& c, int64_t k, RadixScratch& s) {
  const int64_t n = static_cast<int64_t>(c.size());
  if (n <= k) return;
  float* values = s.candidates.at_least(n + 16);
  for (int64_t i = 0; i < n; ++i) values[i] = c[i].value;
  pick_best(values, n, k, s);  // candidates hold no NaN
  const int32_t* picked = s.offsets.at_least(k);
  s.ranked.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) s.ranked[i] = c[picked[i]];
  c.assign(s.ranked.begin(), s.ranked.end());
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
  uint64_t differ = 0;  // the key bits that differ somewhere: a digit without any needs no pass
  for (int64_t i = 0; i < n; ++i) {
    from[i] = uint64_t(~unsigned_key(c[i].value)) << 32 | uint64_t(i);
    differ |= from[i] ^ from[0];
  }
  for (int shift = 32; shift < 64; shift += kDigitBits) {
    if (((differ >> shift) & kDigitMask) == 0) continue;
    uint32_t start[kBuckets] = {};
    for (int64_t i = 0; i < n; ++i) ++start[(from[i] >> shift) & kDigitMask];
    uint32_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) {
      const uint32_t count = start[d];
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
