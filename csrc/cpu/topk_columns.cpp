// CPU lifetime top-k: per column of a row-major x (B, H) the k largest (ties to the
// lower row), and the matrix that keeps them and zeros the rest, written row-major
// (column_topk); its gradient keeps the same entries of grad (keep_rows). Reading
// and writing x's layout in place: a column-wise selection on x.t() returns an (H, B)
// result whose transposed copies (and the backward's) cost more than the selection.
//
// x goes by in panels of 64 columns, four tiles of 16: 256 contiguous bytes of each
// float32 row read per step (the rows are pages apart: prefetched a few rows ahead),
// kept per tile as integer keys in the values' order, one vector lane per column,
// with each lane's min, max, sum and sum of squares. 32-bit keys (float32, float16,
// bfloat16) are kept as two 16-bit halves, apart: the count passes read the high
// halves alone (half the bytes; at 1024 rows a tile of them stays in L1). Per tile, 16
// bars in lockstep: first two counts a quarter of a deviation either side of where the
// k-th would be for normal data (a bracket of a few dozen elements, most of the time),
// then steps on the key, one vector count over the tile each (halving a wide bracket,
// interpolating the counts in a narrow one), until each lane keeps k to k + 4 or its
// bracket is one high half wide; the candidates collected (a compress with AVX-512, a
// permute from a table with AVX2: no branch per hit), their whole keys gathered, the
// few extra dropped by a vector min (cut_lane_halves). (Where a lane's bracket holds
// many keys of one high half, the tile's whole keys are put together and the steps go
// on over them.) A bit per kept entry, grouped by 64 columns, then the output written
// row by row from x, streamed.
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "topk_candidates.h"
#include "topk_column_tiles.h"

namespace aefast {
namespace cpu {
namespace {

using namespace columns;

// A thread's scratch. A tile's keys are in its row-major layout: lane l of row j at
// [j * kLanes + l].
template <typename Key>
struct TileScratch {
  std::vector<Key> keys;  // a panel's whole keys; for 32-bit keys, a tile's when its halves do not do
  std::vector<ShortKey> high;  // a panel's keys' halves (32-bit keys)
  std::vector<uint16_t> low;
  std::vector<int32_t> rows;  // per lane, the rows of its candidates
  std::vector<uint32_t> entries;  // (row << 4 | lane) of the candidates, in row order
  std::vector<Candidate<Key>> found;
  std::vector<Key> scratch;
};

// Where a normal distribution's top `share` begins, in standard deviations (clamped to
// +-8): the first guess of each column's bar.
double normal_quantile_above(double share) {
  double low = -8.0, high = 8.0;
  for (int i = 0; i < 60; ++i) {
    const double mid = 0.5 * (low + high);
    (0.5 * std::erfc(mid / std::sqrt(2.0)) > share ? low : high) = mid;
  }
  return 0.5 * (low + high);
}

// Per lane, a bracket [bar, top) around the k-th largest key: count(>= bar) >= k >
// count(>= top), the two counts kept.
template <typename Key>
struct Brackets {
  Key bar[kLanes], top[kLanes];
  int32_t at_bar[kLanes], at_top[kLanes];
  int32_t lowered[kLanes];  // passes in a row that brought top down

  // A key inside (bar, top) whose count came back: the end of the bracket it replaces.
  void narrow(int64_t l, Key key, int32_t count, int64_t k) {
    if (count >= k && key > bar[l]) {
      bar[l] = key;
      at_bar[l] = count;
      lowered[l] = 0;
    } else if (count < k && key < top[l]) {
      top[l] = key;
      at_top[l] = count;
      ++lowered[l];
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
// narrow_brackets for 32-bit keys with AVX-512: the 16 lanes' brackets in registers, the
// same steps in float instead of double (where a step lands does not change what is
// selected, only how many passes it takes). The scalar steps, with a division and
// unpredictable branches per lane, cost about as much as the count pass itself.
template <typename CountPass>
AEFAST_AVX512 void narrow_brackets_avx512(Brackets<int32_t>& b, int64_t k, int64_t enough,
                                                                        CountPass count_pass) {
  static_assert(kLanes == 16, "one vector of brackets");
  __m512i bar = _mm512_loadu_si512(b.bar), top = _mm512_loadu_si512(b.top);
  __m512i at_bar = _mm512_loadu_si512(b.at_bar), at_top = _mm512_loadu_si512(b.at_top);
  __m512i lowered = _mm512_loadu_si512(b.lowered);
  const __m512i k_vector = _mm512_set1_epi32(static_cast<int>(k)), one = _mm512_set1_epi32(1);
  const __m512 aim = _mm512_set1_ps(static_cast<float>(k + 2));
  alignas(64) int32_t mid_keys[kLanes], counts[kLanes];
  for (;;) {
    const __m512i gap = _mm512_sub_epi32(top, bar);  // unsigned: top > bar
    const __mmask16 done = _mm512_cmple_epi32_mask(at_bar, _mm512_set1_epi32(static_cast<int>(enough))) |
                           _mm512_cmple_epu32_mask(gap, one);
    if (done == 0xFFFF) break;
    // As in narrow_brackets: within a bracket of a few k elements, aim at k + 2 by the
    // counts (a quarter of the gap at least from each end); where top came down twice
    // running, one pass at bar + 1; else halve.
    const __m512i spread = _mm512_sub_epi32(at_bar, at_top);
    const __mmask16 near = ~done & _mm512_cmple_epi32_mask(spread, _mm512_set1_epi32(static_cast<int>(4 * k)));
    const __mmask16 many_at_bar = ~done & ~near & _mm512_cmpge_epi32_mask(lowered, _mm512_set1_epi32(2));
    __m512 f = _mm512_div_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(at_bar), aim), _mm512_cvtepi32_ps(spread));
    f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(0.25f)), _mm512_set1_ps(0.75f));
    __m512i step = _mm512_cvttps_epu32(_mm512_mul_ps(f, _mm512_cvtepu32_ps(gap)));
    step = _mm512_min_epu32(_mm512_max_epu32(step, one), _mm512_sub_epi32(gap, one));
    step = _mm512_mask_mov_epi32(_mm512_srli_epi32(gap, 1), near, step);
    step = _mm512_mask_mov_epi32(step, many_at_bar, one);
    const __m512i mid = _mm512_mask_add_epi32(bar, ~done, bar, step);  // done: bar, no change
    _mm512_store_si512(mid_keys, mid);
    count_pass(mid_keys, counts);
    const __m512i count = _mm512_load_si512(counts);
    const __mmask16 raise = _mm512_cmpge_epi32_mask(count, k_vector) & _mm512_cmpgt_epi32_mask(mid, bar);
    const __mmask16 lower = _mm512_cmplt_epi32_mask(count, k_vector) & _mm512_cmplt_epi32_mask(mid, top);
    bar = _mm512_mask_mov_epi32(bar, raise, mid);
    at_bar = _mm512_mask_mov_epi32(at_bar, raise, count);
    top = _mm512_mask_mov_epi32(top, lower, mid);
    at_top = _mm512_mask_mov_epi32(at_top, lower, count);
    lowered = _mm512_mask_add_epi32(_mm512_maskz_mov_epi32(~raise, lowered), lower, lowered, one);
  }
  _mm512_storeu_si512(b.bar, bar);
  _mm512_storeu_si512(b.top, top);
  _mm512_storeu_si512(b.at_bar, at_bar);
  _mm512_storeu_si512(b.at_top, at_top);
  _mm512_storeu_si512(b.lowered, lowered);
}
#endif

// Count passes over a tile, all lanes in lockstep (count_pass(bars, counts): one), until
// each lane keeps at most `enough` or its bracket is two adjacent keys. (Its steps are
// narrow_brackets_avx512's: keep the two in step, so that every SIMD level takes about as
// many passes.)
template <typename Key, typename CountPass>
void narrow_brackets(Brackets<Key>& b, int64_t k, int64_t enough, CountPass count_pass) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<Key, int32_t>) {
    if (simd_level() == Simd::kAvx512) return narrow_brackets_avx512(b, k, enough, count_pass);
  }
#endif
  using UKey = std::make_unsigned_t<Key>;
  int32_t counts[kLanes];
  for (;;) {
    Key mid[kLanes];
    bool all_done = true;
    for (int64_t l = 0; l < kLanes; ++l) {
      const UKey gap = static_cast<UKey>(b.top[l]) - static_cast<UKey>(b.bar[l]);
      const bool done = b.at_bar[l] <= enough || gap <= 1;
      all_done = all_done && done;
      // Within a bracket of a few k elements the counts are near linear in the key: aim
      // at k + 2 between the two ends' counts (a quarter of the gap at least from each
      // end); wider, halve it.
      UKey step = gap / 2;
      if (!done && b.at_bar[l] - b.at_top[l] <= 4 * k) {
        const double f = static_cast<double>(b.at_bar[l] - (k + 2)) / static_cast<double>(b.at_bar[l] - b.at_top[l]);
        step = static_cast<UKey>(std::clamp(f, 0.25, 0.75) * static_cast<double>(gap));
        step = std::clamp<UKey>(step, 1, gap - 1);
      } else if (!done && b.lowered[l] >= 2) {
        // A wide bracket whose top came down twice running may hold many elements
        // equal to bar (ReLU's zeros): then the k-th is bar itself, and halving would
        // take some 30 passes to find the next key. One pass at bar + 1 tells.
        step = 1;
      }
      mid[l] = done ? b.bar[l] : static_cast<Key>(static_cast<UKey>(b.bar[l]) + step);  // bar: no change
    }
    if (all_done) return;
    count_pass(mid, counts);
    for (int64_t l = 0; l < kLanes; ++l) b.narrow(l, mid[l], counts[l], k);
  }
}

// One pass per first guess; a guess outside its lane's bracket is replaced by the bar
// (no news).
template <typename Key, typename CountPass>
void try_guesses(Brackets<Key>& b, Key (&guess)[2][kLanes], int64_t k, CountPass count_pass) {
  int32_t counts[kLanes];
  for (int g = 0; g < 2; ++g) {
    for (int64_t l = 0; l < kLanes; ++l)
      if (!(guess[g][l] > b.bar[l] && guess[g][l] < b.top[l])) guess[g][l] = b.bar[l];
    count_pass(guess[g], counts);
    for (int64_t l = 0; l < kLanes; ++l) b.narrow(l, guess[g][l], counts[l], k);
  }
}

// Each lane's first bracket, the whole range of its keys (no NaN, so high + 1 is a
// key), and two first guesses a quarter of a standard deviation either side of where the
// k-th would be for normal data: for most columns a bracket of a few dozen elements
// after their two passes. Data far from normal only spends them. z:
// normal_quantile_above(k / B).
template <typename Key, typename A>
void first_brackets(const LaneStats<Key, A>& stats, int64_t B, double z, Brackets<Key>& b, Key (&guess)[2][kLanes]) {
  constexpr double kWidth = 0.25;
  for (int64_t l = 0; l < kLanes; ++l) {
    b.bar[l] = stats.low[l];
    b.top[l] = static_cast<Key>(stats.high[l] + 1);
    b.at_bar[l] = static_cast<int32_t>(B);
    b.at_top[l] = 0;
    b.lowered[l] = 0;
    const double mean = static_cast<double>(stats.sum[l]) / B;
    const double sd = std::sqrt(std::max(0.0, static_cast<double>(stats.squares[l]) / B - mean * mean));
    for (int g = 0; g < 2; ++g) {
      const A value = static_cast<A>(mean + (z + (g == 0 ? -kWidth : kWidth)) * sd);
      guess[g][l] = std::isfinite(value) ? order_key(value) : b.bar[l];
    }
  }
}

// Lane l's candidates (rows[l * B ...], counts[l] of them, in increasing order, at least
// k) cut to its k best by key_of(l, row), still in row order, into rows_out[l * k ...].
// A few too many (the usual case): the worst dropped one at a time, the smallest key
// (among equal ones the later row) found by a min over the bare keys, which vectorizes;
// more, keep_best_in_index_order. simd_cut(l, rows, n, out): the same for one lane with
// the machine's vectors where it can (returns whether it did).
template <typename Key, typename KeyOfRow, typename SimdCut>
void cut_lanes(int64_t B, int64_t lanes, int64_t k, const int32_t* counts, TileScratch<Key>& s, KeyOfRow key_of,
               int64_t* rows_out, SimdCut simd_cut) {
  constexpr Key kDropped = std::numeric_limits<Key>::max();  // a NaN's key: no candidate has it
  for (int64_t l = 0; l < lanes; ++l) {
    const int32_t* rows = s.rows.data() + l * B;
    const int64_t n = counts[l], excess = n - k;
    int64_t* out = rows_out + l * k;
    if (simd_cut(l, rows, n, out)) continue;
    if (excess > kMaxCutExcess) {
      s.found.clear();
      for (int64_t i = 0; i < n; ++i) s.found.push_back({key_of(l, rows[i]), rows[i]});
      keep_best_in_index_order(s.found, k, s.scratch);
      for (int64_t i = 0; i < k; ++i) out[i] = s.found[i].index;
      continue;
    }
    s.scratch.resize(static_cast<size_t>(n));
    Key* keys = s.scratch.data();
    for (int64_t i = 0; i < n; ++i) keys[i] = key_of(l, rows[i]);
    for (int64_t e = 0; e < excess; ++e) {
      Key worst = kDropped;
      for (int64_t i = 0; i < n; ++i) worst = std::min(worst, keys[i]);
      int64_t i = n - 1;
      while (keys[i] != worst) --i;
      keys[i] = kDropped;
    }
    for (int64_t i = 0, kept = 0; i < n; ++i)
      if (keys[i] != kDropped) out[kept++] = rows[i];
  }
}

// From brackets b on, over a tile of keys (B, 16 lanes; lanes of them real columns): the
// rows of lane l's k winners, in increasing order, into rows_out[l * k, l * k + k).
template <typename Key>
void finish_on_keys(const Key* keys, int64_t B, int64_t lanes, int64_t k, Brackets<Key>& b, TileScratch<Key>& s,
                    int64_t* rows_out) {
  using UKey = std::make_unsigned_t<Key>;
  narrow_brackets(b, k, k + 4, [&](const Key* bars, int32_t* counts) { count_tile(keys, B, bars, counts); });
  // Where the k-th is bar itself (top = bar + 1), everything above it wins and the
  // first of those equal to it in row order: only they are collected, not all ties.
  int32_t ties[kLanes], counts[kLanes];
  for (int64_t l = 0; l < kLanes; ++l)
    ties[l] = static_cast<UKey>(b.top[l]) - static_cast<UKey>(b.bar[l]) <= 1 ? static_cast<int32_t>(k) - b.at_top[l]
                                                                              : std::numeric_limits<int32_t>::max();
  s.rows.resize(static_cast<size_t>(kLanes * B));
  collect_tile(keys, B, b.bar, ties, s.rows.data(), counts, s.entries);
  auto no_vector_cut = [](int64_t, const int32_t*, int64_t, int64_t*) { return false; };
  cut_lanes(B, lanes, k, counts, s, [&](int64_t l, int32_t row) { return keys[row * kLanes + l]; }, rows_out,
            no_vector_cut);
}

// One tile of keys and its lane statistics: lane l's k winners (finish_on_keys).
template <typename Key, typename A>
void select_in_tile(const Key* keys, int64_t B, int64_t lanes, int64_t k, const LaneStats<Key, A>& stats, double z,
                    TileScratch<Key>& s, int64_t* rows_out) {
  Brackets<Key> b;
  Key guess[2][kLanes];
  first_brackets(stats, B, z, b, guess);
  try_guesses(b, guess, k, [&](const Key* bars, int32_t* counts) { count_tile(keys, B, bars, counts); });
  finish_on_keys(keys, B, lanes, k, b, s, rows_out);
}

// The same for 32-bit keys from their halves: the same steps over the high halves, at
// half the bytes a pass, until each lane's bracket is one short key wide or keeps few
// enough. Where every lane then keeps at most a few more than k, its candidates' keys are
// put together for the cut. Where one does not (a short key shared by many: ties, ReLU's
// zeros, values close together), the tile's keys are put together and the steps go on
// over them.
inline void select_in_halves(const TileKeys<int32_t>& keys, int64_t B, int64_t lanes, int64_t k,
                             const LaneStats<int32_t, float>& stats, double z, TileScratch<int32_t>& s,
                             int64_t* rows_out) {
  Brackets<int32_t> b, coarse;
  int32_t guess[2][kLanes];
  first_brackets(stats, B, z, b, guess);
  coarse = b;
  for (int64_t l = 0; l < kLanes; ++l) {
    coarse.bar[l] = short_key(b.bar[l]);
    coarse.top[l] = short_key(stats.high[l]) + 1;  // no NaN: fits a short key
    for (int g = 0; g < 2; ++g) guess[g][l] = short_key(guess[g][l]);
  }
  auto count_high = [&](const int32_t* bars, int32_t* counts) { count_short_tile(keys.high, B, bars, counts); };
  try_guesses(coarse, guess, k, count_high);
  narrow_brackets(coarse, k, k + 4, count_high);
  // A cut among a few more than k (one scan per extra, or nth_element) costs less than
  // putting the whole tile's keys together and counting on.
  const int64_t few = k + std::max<int64_t>(16, k / 4);
  if (std::all_of(coarse.at_bar, coarse.at_bar + lanes, [&](int32_t n) { return n <= few; })) {
    int32_t counts[kLanes];
    s.rows.resize(static_cast<size_t>(kLanes * B));
    collect_short_tile(keys.high, B, coarse.bar, s.rows.data(), counts, s.entries);
    cut_lanes(B, lanes, k, counts, s, [&](int64_t l, int32_t row) {
      const int64_t at = row * kLanes + l;
      return whole_key(keys.high[at], keys.low[at]);
    }, rows_out, [&](int64_t l, const int32_t* rows, int64_t n, int64_t* out) {
      return cut_lane_halves(keys, l, rows, n, k, s.scratch, out);
    });
    return;
  }
  for (int64_t l = 0; l < kLanes; ++l) {  // count(>= key) = count(>= short key << 16): the counts carry over
    b.bar[l] = static_cast<int32_t>(static_cast<uint32_t>(coarse.bar[l]) << 16);
    if (coarse.top[l] <= short_key(stats.high[l])) b.top[l] = static_cast<int32_t>(static_cast<uint32_t>(coarse.top[l]) << 16);
    b.at_bar[l] = coarse.at_bar[l];
    b.at_top[l] = coarse.at_top[l];
    b.lowered[l] = coarse.lowered[l];
  }
  s.keys.resize(static_cast<size_t>(kLanes * B));
  for (int64_t i = 0; i < kLanes * B; ++i) s.keys[i] = whole_key(keys.high[i], keys.low[i]);
  finish_on_keys(s.keys.data(), B, lanes, k, b, s, rows_out);
}

// Tile t of a panel of B rows.
template <typename Key, typename A>
void select_tile(const TileKeys<Key>& panel, int64_t t, int64_t B, int64_t lanes, int64_t k,
                 const LaneStats<Key, A>& stats, double z, TileScratch<Key>& s, int64_t* rows_out) {
  if constexpr (std::is_same_v<Key, int32_t>)
    select_in_halves(panel.tile(t, B), B, lanes, k, stats, z, s, rows_out);
  else
    select_in_tile(panel.tile(t, B).whole, B, lanes, k, stats, z, s, rows_out);
}

// ------------------------------------------------------------ the kernels

// Which entries of a (B, H) matrix are kept, one bit each: column h of row b at bit
// h % 64 of word (h / 64) * B + b. A group of 64 columns is one run of B words, which
// stays in cache while the group's winners are marked.
struct KeptBits {
  int64_t B, H, W;  // W = ceil(H / 64) groups
  std::vector<uint64_t> words;
  KeptBits(int64_t b, int64_t h) : B(b), H(h), W((h + 63) / 64), words(static_cast<size_t>(b * ((h + 63) / 64)), 0) {}
  uint64_t* group(int64_t w) { return words.data() + w * B; }
};

// Marks the winners of columns [64 w, 64 w + 64): rows (H, k), k per column. Returns
// false if a row is outside [0, B).
bool mark_group(const int64_t* rows, int64_t k, int64_t w, KeptBits& kept) {
  uint64_t* words = kept.group(w);
  bool in_range = true;
  for (int64_t h = w * 64; h < std::min(kept.H, w * 64 + 64); ++h) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = rows[h * k + i];
      if (r < 0 || r >= kept.B) {
        in_range = false;
        continue;
      }
      words[r] |= uint64_t(1) << (h % 64);
    }
  }
  return in_range;
}

bool mark_rows(const int64_t* rows, int64_t k, KeptBits& kept) {
  std::atomic<bool> in_range{true};
  at::parallel_for(0, kept.W, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      if (!mark_group(rows, k, w, kept)) in_range = false;
  });
  return in_range.load();
}

template <typename T>
AEFAST_INLINE void copy_kept_portable(const T* src, uint64_t bits, int64_t n, T* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = ((bits >> c) & 1) ? src[c] : T(0);
}

#if defined(__x86_64__) && defined(__GNUC__)
// 64 columns; kStream: out is 64-byte aligned, written around the caches (no read
// for ownership of lines that are written whole).
template <bool kStream>
AEFAST_AVX512 void copy_kept_avx512(const float* src, uint64_t bits, float* out) {
  for (int c = 0; c < 64; c += 16) {
    const __m512 v = _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> c), loaded(_mm512_loadu_ps(src + c)));
    if (kStream) _mm512_stream_ps(out + c, v);
    else _mm512_storeu_ps(out + c, v);
  }
}

template <bool kStream>
AEFAST_AVX2 void copy_kept_avx2(const float* src, uint64_t bits, float* out) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int c = 0; c < 64; c += 8) {
    const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> c) & 0xFF));
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(src + c), _mm256_castsi256_ps(keep));
    if (kStream) _mm256_stream_ps(out + c, v);
    else _mm256_storeu_ps(out + c, v);
  }
}
#endif

// Rows [b0, b1) x groups [w0, w1) of out = src where kept, else 0 (+0.0). stream:
// out's float32 rows start on 64-byte lines (stream_rows), written around the caches
// (no read for ownership of lines written whole); the caller fences.
template <typename T>
void copy_kept_block(const T* src, const KeptBits& kept, T* out, int64_t b0, int64_t b1, int64_t w0, int64_t w1,
                     bool stream) {
  const Simd simd = simd_level();
  for (int64_t b = b0; b < b1; ++b) {
    const T* s = src + b * kept.H;
    T* o = out + b * kept.H;
    for (int64_t w = w0; w < w1; ++w) {
      const uint64_t bits = kept.words[w * kept.B + b];
      const int64_t n = std::min<int64_t>(64, kept.H - 64 * w);
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<T, float>) {
        if (n == 64 && simd == Simd::kAvx512) {
          stream ? copy_kept_avx512<true>(s + 64 * w, bits, o + 64 * w) : copy_kept_avx512<false>(s + 64 * w, bits, o + 64 * w);
          continue;
        }
        if (n == 64 && simd == Simd::kAvx2) {
          stream ? copy_kept_avx2<true>(s + 64 * w, bits, o + 64 * w) : copy_kept_avx2<false>(s + 64 * w, bits, o + 64 * w);
          continue;
        }
      }
#endif
      copy_kept_portable(s + 64 * w, bits, n, o + 64 * w);
    }
  }
}

template <typename T>
bool stream_rows(const T* out, int64_t H) {
  return std::is_same_v<T, float> && reinterpret_cast<uintptr_t>(out) % 64 == 0 && H % 16 == 0;
}

// out = src where kept, else 0 (src and out contiguous (B, H)), whole rows per thread.
void copy_kept(const at::Tensor& src, const KeptBits& kept, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_kept", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool stream = stream_rows(op, kept.H);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(kept.H, 1));
    at::parallel_for(0, kept.B, grain, [&](int64_t b0, int64_t b1) {
      copy_kept_block(sp, kept, op, b0, b1, 0, kept.W, stream);
      fence_streams();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> column_topk(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "aefast: x must be 2-D, got ", x_in.dim(), "-D");
  const int64_t B = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= B, "aefast: k must be in [1, ", B, "], got ", k);
  TORCH_CHECK_VALUE(B < (int64_t(1) << 27), "aefast: x must have fewer than 2^27 rows, got ", B);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = empty_output({B, H}, x.options());
  at::Tensor rows = at::empty({H, k}, x.options().dtype(at::kLong));
  std::atomic<bool> nan{false};
  KeptBits kept(B, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_topk", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int64_t* rp = rows.data_ptr<int64_t>();
    constexpr int64_t width = kPanel * kLanes;
    const double z = normal_quantile_above(static_cast<double>(k) / B);
    at::parallel_for(0, (H + width - 1) / width, 1, [&](int64_t p0, int64_t p1) {
      using Key = KeyOf<A>;
      TileScratch<Key> scratch;
      TileKeys<Key> keys;
      if (std::is_same_v<Key, int32_t>) {  // float32, float16, bfloat16: halves
        scratch.high.resize(static_cast<size_t>(width * B + 1));  // + 1: cut_lane_halves reads 4 bytes an element
        scratch.low.resize(static_cast<size_t>(width * B + 1));
        keys.high = scratch.high.data();
        keys.low = scratch.low.data();
      } else {
        scratch.keys.resize(static_cast<size_t>(width * B));
        keys.whole = scratch.keys.data();
      }
      LaneStats<Key, A> stats[kPanel];
      for (int64_t p = p0; p < p1 && !nan.load(std::memory_order_relaxed); ++p) {
        const int64_t c0 = p * width, columns = std::min(width, H - c0);
        if (!copy_panel<scalar_t, A>(xp + c0, H, B, columns, keys, stats)) {
          nan = true;
          break;
        }
        for (int64_t t = 0; t * kLanes < columns; ++t) {
          const int64_t lanes = std::min(kLanes, columns - t * kLanes);
          int64_t* winners = rp + (c0 + t * kLanes) * k;
          select_tile(keys, t, B, lanes, k, stats[t], z, scratch, winners);
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!nan.load(), "aefast: x contains NaN; top-k of NaN is undefined");
  // Then out row by row: whole rows streamed beat each panel's 256-byte pieces of them
  // written while x's were in cache (4096 x 4096: 16 vs 18 ms on a Xeon).
  TORCH_CHECK(mark_rows(rows.const_data_ptr<int64_t>(), k, kept), "aefast: column selection lost its rows");
  copy_kept(x, kept, out);
  return {out, rows};
}

at::Tensor keep_rows(const at::Tensor& grad_in, const at::Tensor& rows_in) {
  TORCH_CHECK_VALUE(grad_in.dim() == 2, "aefast: grad must be 2-D, got ", grad_in.dim(), "-D");
  const int64_t B = grad_in.size(0), H = grad_in.size(1);
  TORCH_CHECK_VALUE(rows_in.dim() == 2 && rows_in.size(0) == H,
                    "aefast: rows must be (H, k) for grad (B, H) = ", grad_in.sizes(), ", got ", rows_in.sizes());
  TORCH_CHECK_VALUE(rows_in.scalar_type() == at::kLong, "aefast: rows must be int64");
  const at::Tensor grad = grad_in.contiguous(), rows = rows_in.contiguous();
  KeptBits kept(B, H);
  TORCH_CHECK_INDEX(mark_rows(rows.const_data_ptr<int64_t>(), rows.size(1), kept), "aefast: rows must be in [0, ", B, ")");
  at::Tensor out = empty_output({B, H}, grad.options());
  copy_kept(grad, kept, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("column_topk", &column_topk);
  m.impl("keep_rows", &keep_rows);
}

}  // namespace cpu
}  // namespace aefast
