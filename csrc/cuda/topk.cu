// CUDA top-k selection: exact radix select on order-preserving integer keys.
//
// Every value maps to an unsigned key of its width (16 bits for float16/bfloat16, 32
// for float32, 64 for float64) that orders as the values do, -0.0 and +0.0 sharing one
// key. The k-th largest key of a row, T, is found 8 bits at a time, most significant
// digit first: a pass counts the digits of the keys that match the digits chosen so
// far, and the digit holding the rank still sought is chosen. After the last pass
// every key above T is a winner, and of the keys equal to T the `need` lowest-indexed
// (need = k - #keys above T): ties go to the lower index, as on every backend.
//
// Three layouts. Rows that fill the GPU by themselves: a block per row does every pass
// with its histogram in shared memory, then gathers. Long ones among them with few
// winners (topk_filters_rows: an SAE encoder's 32 of a block's 16384 latents) are read
// once instead: a bar from a sample of the row, the keys at or above it collected into
// shared memory, the k best of those (see "long rows" below), the radix passes only
// where the bar fails. Few long rows (batch_topk selects from one row of k * B out of
// B * H): each row is split into chunks, a block per (row, chunk) and pass counts into
// shared memory and adds its counts to the row's global histogram (integer atomics:
// exact, the same on every run), and a block per row chooses the digit. The keys equal
// to T are then ranked in index order: per chunk counts, their prefix over the chunks,
// and a block scan inside the chunk.
//
// The winners are written in no particular order with a sort key (see topk.h); the
// bindings sort the (B, k) keys with ATen to put them in order.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.cuh"
#include "topk.h"

namespace aefast {
namespace cuda {
namespace {

using Count = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kDigitBits = 8;
constexpr int kRadix = 1 << kDigitBits;
static_assert(kThreads == kRadix, "choosing a digit gives each thread one bin");
constexpr int kUnroll = 4;                        // loads in flight per thread when streaming a row
constexpr int64_t kMinChunk = 4096;               // the fewest elements a block of a split row takes
constexpr int64_t kMaxChunk = int64_t(1) << 30;   // the most: a block's 32-bit counts cannot wrap
constexpr int kIndexBits = 31;                    // packed sort keys: ((~key) << 31) | index
constexpr int64_t kMaxChunks = 65535;             // gridDim.y

// The order-preserving key of each dtype: its bits, the width, and the bits of +inf
// (a magnitude above it is a NaN).
template <typename T>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using Key = unsigned int;
  static constexpr int kBits = 32;
  static constexpr Key kAll = 0xFFFFFFFFu;
  static constexpr Key kInf = 0x7F800000u;
  __device__ static Key bits(float v) { return __float_as_uint(v); }
};

template <>
struct KeyTraits<double> {
  using Key = unsigned long long;
  static constexpr int kBits = 64;
  static constexpr Key kAll = 0xFFFFFFFFFFFFFFFFull;
  static constexpr Key kInf = 0x7FF0000000000000ull;
  __device__ static Key bits(double v) { return static_cast<Key>(__double_as_longlong(v)); }
};

template <>
struct KeyTraits<__half> {
  using Key = unsigned int;
  static constexpr int kBits = 16;
  static constexpr Key kAll = 0xFFFFu;
  static constexpr Key kInf = 0x7C00u;
  __device__ static Key bits(__half v) { return __half_as_ushort(v); }
};

template <>
struct KeyTraits<__nv_bfloat16> {
  using Key = unsigned int;
  static constexpr int kBits = 16;
  static constexpr Key kAll = 0xFFFFu;
  static constexpr Key kInf = 0x7F80u;
  __device__ static Key bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

// a > b as values iff key(a) > key(b); -0.0 gets +0.0's key. Sets `nan` for a NaN
// (whose key is then some value's: the caller reports the NaN, the result is void).
template <typename T>
__device__ __forceinline__ typename KeyTraits<T>::Key order_key(T v, bool& nan) {
  using K = KeyTraits<T>;
  using Key = typename K::Key;
  constexpr Key sign = Key(1) << (K::kBits - 1);
  Key u = K::bits(v);
  const Key magnitude = u & (sign - 1);
  nan |= magnitude > K::kInf;
  if (magnitude == 0) u = 0;
  return (u & sign) ? (~u & K::kAll) : (u | sign);
}

// Pass `pass` over kValueBits-bit values looks at the digit at bit `shift` of the values
// whose bits above it (`high`, in a V) equal the prefix chosen so far.
template <int kValueBits>
__device__ __forceinline__ int digit_shift(int pass) {
  return kValueBits - kDigitBits * (pass + 1);
}

template <typename V, int kValueBits>
__device__ __forceinline__ V high_bits(int pass) {
  return pass == 0 ? V(0) : ~((V(1) << (digit_shift<kValueBits>(pass) + kDigitBits)) - 1);
}

// A winner's key complemented: ascending order of these is descending values (topk.h).
template <typename T>
__device__ __forceinline__ Count descending_key(typename KeyTraits<T>::Key key) {
  return static_cast<Count>(~key & KeyTraits<T>::kAll);
}

// A winner's packed sort key (topk.h): its descending key above its index.
template <typename T>
__device__ __forceinline__ int64_t packed_sort_key(typename KeyTraits<T>::Key key, Count index) {
  return static_cast<int64_t>((descending_key<T>(key) << kIndexBits) | index);
}

// Exclusive prefix sum of v over the block's threads in thread order; `total` gets
// the sum of all. Every thread of the block must call it (it synchronizes).
template <typename C>
__device__ C block_exclusive_sum(C v, C& total) {
  __shared__ C warp_sums[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  C inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const C other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarp - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  C before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const C s = warp_sums[w];
    before += w < warp ? s : C(0);
    total += s;
  }
  __syncthreads();  // warp_sums is free again when this returns
  return before + inclusive - v;
}

// Thread t holds `count`, the number of keys still in the running whose current digit
// is kRadix - 1 - t. True in the one thread whose digit holds the rem-th largest of
// them (1 <= rem <= their total); `larger` is then how many have a larger digit.
// Every thread of the block must call it.
__device__ __forceinline__ bool choose_digit(Count count, Count rem, Count& larger) {
  Count total;
  larger = block_exclusive_sum(count, total);
  return larger < rem && rem <= larger + count;
}

// 16 bytes of a row: 8 bfloat16/float16, 4 float32 or 2 float64 values in one load.
struct alignas(16) Pack16 {
  unsigned words[4];
};

// fn(key, i) for every element i of row[begin, end), in no particular order (the
// callers count or collect). Where row + begin is 16-byte aligned (the same in every
// thread), 16-byte loads, kUnroll in flight per thread (with a load per element, 2
// bytes of 16-bit values, the H200 profile had the selection reading about 330 GB/s:
// bound by issuing loads, we think, not by memory). The rest element by element,
// kUnroll in flight.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_key(const T* __restrict__ row, int64_t begin, int64_t end, bool& nan,
                                             Fn&& fn) {
  constexpr int kPerPack = sizeof(Pack16) / sizeof(T);
  int64_t first = begin;  // of the elements left to the element-by-element loop
  if (reinterpret_cast<uintptr_t>(row + begin) % sizeof(Pack16) == 0) {
    constexpr int64_t kStep = int64_t(kUnroll) * kThreads * kPerPack;
    for (; first + kStep <= end; first += kStep) {
      Pack16 packs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        packs[u] = *reinterpret_cast<const Pack16*>(row + first + (u * kThreads + threadIdx.x) * kPerPack);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        T v[kPerPack];
        memcpy(v, &packs[u], sizeof(Pack16));
#pragma unroll
        for (int e = 0; e < kPerPack; ++e)
          fn(order_key(v[e], nan), first + (u * kThreads + threadIdx.x) * kPerPack + e);
      }
    }
  }
  int64_t i = first + threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < end; i += kUnroll * kThreads) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = row[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) fn(order_key(v[u], nan), i + u * kThreads);
  }
  for (; i < end; i += kThreads) fn(order_key(row[i], nan), i);
}

// Adds to the shared `hist` the pass's digit of every key of row[begin, end) that
// matches `prefix` above it. The first pass sees every element: it reports NaN.
template <typename T>
__device__ __forceinline__ void count_digits(const T* __restrict__ row, int64_t begin, int64_t end,
                                             typename KeyTraits<T>::Key prefix, int pass, unsigned* hist,
                                             int* nan_flag) {
  using Key = typename KeyTraits<T>::Key;
  const int shift = digit_shift<KeyTraits<T>::kBits>(pass);
  const Key high = high_bits<Key, KeyTraits<T>::kBits>(pass);
  bool nan = false;
  for_each_key(row, begin, end, nan, [&](Key key, int64_t) {
    if ((key & high) == prefix) atomicAdd(&hist[static_cast<unsigned>(key >> shift) & (kRadix - 1)], 1u);
  });
  if (pass == 0 && nan) *nan_flag = 1;
}

// Writes the winners of row[begin, end): every key above `thr`, and the keys equal to
// it whose rank among the row's equal keys in index order (`before` of them precede
// this range) is below `rem`; with rank == false every equal key wins. Slots come from
// `counter` (the row's winners so far). Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void gather_winners(const T* __restrict__ row, int64_t begin, int64_t end,
                                               typename KeyTraits<T>::Key thr, Count rem, bool rank, Count before,
                                               Count* counter, bool packed, int64_t* __restrict__ keys,
                                               int64_t* __restrict__ indices) {
  using K = KeyTraits<T>;
  using Key = typename K::Key;
  const unsigned lane = threadIdx.x % kWarp;
  bool nan = false;
  // kUnroll tiles' loads in flight before the first is looked at (one load at a time kept
  // each thread waiting on memory for most of the pass); the tiles still go in index order.
  for (int64_t group = begin; group < end; group += kUnroll * kThreads) {  // the same trip count in every thread
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = group + u * kThreads + threadIdx.x;
      v[u] = i < end ? row[i] : T{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = group + u * kThreads + threadIdx.x;
      const bool valid = i < end;
      const Key key = valid ? order_key(v[u], nan) : Key(0);
      const bool larger = valid && key > thr;
      const bool tie = valid && key == thr;
      bool take = larger || tie;
      if (rank) {  // the same in every thread of the block
        unsigned tile_ties;
        const unsigned r = block_exclusive_sum<unsigned>(tie ? 1u : 0u, tile_ties);
        take = larger || (tie && before + r < rem);
        before += tile_ties;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (ballot == 0) continue;
      const int leader = __ffs(ballot) - 1;
      Count base = 0;
      if (lane == static_cast<unsigned>(leader)) base = atomicAdd(counter, static_cast<Count>(__popc(ballot)));
      base = __shfl_sync(0xffffffffu, base, leader);
      if (!take) continue;
      const int64_t at = static_cast<int64_t>(base) + __popc(ballot & ((1u << lane) - 1u));
      if (packed) {
        keys[at] = packed_sort_key<T>(key, static_cast<Count>(i));
      } else {
        keys[at] = static_cast<int64_t>(descending_key<T>(key) ^ (Count(1) << 63));
        indices[at] = i;
      }
    }
  }
}

// ---- one block per row ----

// The r-th largest value (1 <= r <= their number) of kValueBits-bit values, by one
// block, kDigitBits a pass, most significant first: count_pass(prefix, pass, hist) adds
// to `hist` the pass's digit of every value whose bits above it equal `prefix`. With how
// many values are greater than it and how many equal. Every thread of the block calls
// it; it synchronizes.
template <typename V>
struct Kth {
  V value;
  Count greater, equal;
};

template <typename V, int kValueBits, typename CountPass>
__device__ Kth<V> radix_select_in_block(Count r, unsigned* hist, CountPass count_pass) {
  __shared__ V chosen;
  __shared__ Count chosen_above, chosen_equal;
  V prefix = 0;
  Count above = 0, equal = 0;  // values above the prefix's range; values in it (after the last pass: equal)
  for (int pass = 0; pass < kValueBits / kDigitBits; ++pass) {
    hist[threadIdx.x] = 0;
    __syncthreads();
    count_pass(prefix, pass, hist);
    __syncthreads();
    const unsigned digit = kRadix - 1 - threadIdx.x;
    const Count count = hist[digit];
    Count larger;
    if (choose_digit(count, r - above, larger)) {
      chosen = prefix | (static_cast<V>(digit) << digit_shift<kValueBits>(pass));
      chosen_above = above + larger;
      chosen_equal = count;
    }
    __syncthreads();
    prefix = chosen;
    above = chosen_above;
    equal = chosen_equal;
  }
  return {prefix, above, equal};
}

// Row `row` (H keys) by the radix passes, one block: the k winners into out_keys (and
// out_indices where not packed). Every thread of the block calls it.
template <typename T>
__device__ void select_row_by_radix(const T* __restrict__ row, int64_t H, int64_t k, bool packed,
                                    int* __restrict__ nan_flag, int64_t* __restrict__ out_keys,
                                    int64_t* __restrict__ out_indices) {
  using Key = typename KeyTraits<T>::Key;
  __shared__ unsigned hist[kRadix];
  __shared__ Count counter;
  if (threadIdx.x == 0) counter = 0;  // read by gather_winners, after the select's barriers
  const auto kth = radix_select_in_block<Key, KeyTraits<T>::kBits>(
      static_cast<Count>(k), hist,
      [&](Key prefix, int pass, unsigned* h) { count_digits(row, 0, H, prefix, pass, h, nan_flag); });
  const Count rem = static_cast<Count>(k) - kth.greater;
  gather_winners(row, 0, H, kth.value, rem, rem < kth.equal, 0, &counter, packed, out_keys, out_indices);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_topk_kernel(const T* __restrict__ x, int64_t H, int64_t k, bool packed, int* __restrict__ nan_flag,
                    int64_t* __restrict__ keys, int64_t* __restrict__ indices) {
  const int64_t r = blockIdx.x;
  select_row_by_radix(x + r * H, H, k, packed, nan_flag, keys + r * k,
                      indices == nullptr ? nullptr : indices + r * k);
}

// ---- long rows: a bar from a sample, then one pass ----
//
// The radix passes read a row once per digit and once more to gather: three times for
// 16-bit keys, five for 32-bit ones. A long row with few winners (an SAE encoder's
// pre-activations: 32 of a block's 16384) is read once here, one block per row:
// 1. a bar: kSample keys from evenly spaced places, and the sample_rank-th largest of them
//    (a radix select in shared memory), low enough that, for any data, the row holds k
//    keys at or above it but no more than kCandidates, unless something improbable happens;
// 2. one pass over the row collects the keys at or above the bar, with their columns,
//    into shared memory (and reports NaN);
// 3. the k largest of the candidates by a radix select over their keys in shared memory,
//    and, only where more keys tie at the k-th than win, a second over the tied keys'
//    columns (lowest first).
// Where the bar let through fewer than k keys or more than kCandidates (ties around it,
// data arranged against the sample), the block falls back to the radix passes.
constexpr int kSample = 1024;
constexpr int kCandidates = 4096;
constexpr int64_t kFilterMinColumns = 16384;

// The sample's rank of the bar: about twice the k-th's expected rank among the samples,
// plus six. The bar lets through fewer than k keys only if at least this many samples
// fall among the row's k largest (expected: k kSample / H, half this or less), and more
// than kCandidates only if fewer fall among its kCandidates largest (expected:
// kCandidates kSample / H; topk_filters_rows asks for five deviations above the rank).
__host__ __device__ inline int64_t sample_rank(int64_t k, int64_t H) {
  const int64_t twice = ceil_div(2 * k * kSample, H);
  return twice + 6 < kSample ? twice + 6 : kSample;
}

// The r-th largest (1 <= r <= n) of value_at(0), ..., value_at(n - 1), kValueBits bits
// each (radix_select_in_block over values in shared memory).
template <typename V, int kValueBits, typename ValueAt>
__device__ Kth<V> kth_largest_in_block(int n, Count r, unsigned* hist, ValueAt value_at) {
  return radix_select_in_block<V, kValueBits>(r, hist, [&](V prefix, int pass, unsigned* h) {
    const int shift = digit_shift<kValueBits>(pass);
    const V high = high_bits<V, kValueBits>(pass);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const V v = value_at(i);
      if ((v & high) == prefix) atomicAdd(&h[static_cast<unsigned>(v >> shift) & (kRadix - 1)], 1u);
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_topk_filter_kernel(const T* __restrict__ x, int64_t H, int64_t k, int* __restrict__ nan_flag,
                           int* __restrict__ fallbacks, int64_t* __restrict__ keys) {
  using K = KeyTraits<T>;
  using Key = typename K::Key;
  static_assert(K::kBits <= 32, "packed keys only: 16- and 32-bit values");
  __shared__ Key candidate_keys[kCandidates];  // the sample first
  __shared__ unsigned candidate_columns[kCandidates];
  __shared__ unsigned hist[kRadix];
  __shared__ unsigned found, written;
  const int64_t r = blockIdx.x;
  const T* row = x + r * H;
  if (threadIdx.x == 0) found = written = 0;
  bool nan = false;
  for (int j = threadIdx.x; j < kSample; j += kThreads) candidate_keys[j] = order_key(row[j * H / kSample], nan);
  __syncthreads();
  const Key bar = kth_largest_in_block<Key, K::kBits>(kSample, static_cast<Count>(sample_rank(k, H)), hist,
                                                      [&](int i) { return candidate_keys[i]; }).value;
  const volatile unsigned& seen = found;
  for_each_key(row, 0, H, nan, [&](Key key, int64_t i) {
    // Past the room the count is only read, not added to: the radix passes decide then
    // (a row of one repeated key would otherwise add to one counter H times).
    if (key < bar || seen > static_cast<unsigned>(kCandidates)) return;
    const unsigned slot = atomicAdd(&found, 1u);
    if (slot < kCandidates) {
      candidate_keys[slot] = key;
      candidate_columns[slot] = static_cast<unsigned>(i);
    }
  });
  if (nan) *nan_flag = 1;
  __syncthreads();
  const unsigned n = found;  // the same in every thread
  if (n < static_cast<unsigned>(k) || n > static_cast<unsigned>(kCandidates)) {
    if (fallbacks != nullptr && threadIdx.x == 0) atomicAdd(fallbacks, 1);
    select_row_by_radix(row, H, k, true, nan_flag, keys + r * k, nullptr);
    return;
  }
  // The k-th largest candidate key T; of the keys equal to T, the `need` lowest columns
  // win: where more than that many tie, the need-th lowest column among them (the
  // need-th largest complement; other candidates count as 0, below every complement).
  const auto kth = kth_largest_in_block<Key, K::kBits>(static_cast<int>(n), static_cast<Count>(k), hist,
                                                       [&](int i) { return candidate_keys[i]; });
  const Count need = static_cast<Count>(k) - kth.greater;
  unsigned last_column = ~0u;
  if (kth.equal > need)  // the same in every thread
    last_column = ~kth_largest_in_block<unsigned, 32>(static_cast<int>(n), need, hist, [&](int i) {
                    return candidate_keys[i] == kth.value ? ~candidate_columns[i] : 0u;
                  }).value;
  for (int i = threadIdx.x; i < static_cast<int>(n); i += kThreads) {
    const Key key = candidate_keys[i];
    if (key < kth.value || (key == kth.value && candidate_columns[i] > last_column)) continue;
    const unsigned at = atomicAdd(&written, 1u);
    keys[r * k + at] = packed_sort_key<T>(key, static_cast<Count>(candidate_columns[i]));
  }
}

// ---- rows split into chunks ----

// Per row: the digits chosen so far (after the last pass: T), the keys above them,
// the keys matching them (after the last pass: equal to T), and the winners written.
struct RowState {
  Count prefix;
  Count above;
  Count equal;
  Count counter;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_histogram_kernel(const T* __restrict__ x, int64_t H, int64_t chunk_len, int pass,
                           const RowState* __restrict__ state, Count* __restrict__ hist, int* __restrict__ nan_flag) {
  using Key = typename KeyTraits<T>::Key;
  __shared__ unsigned counts[kRadix];
  const int64_t r = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t end = min(H, begin + chunk_len);
  counts[threadIdx.x] = 0;
  __syncthreads();
  count_digits(x + r * H, begin, end, static_cast<Key>(state[r].prefix), pass, counts, nan_flag);
  __syncthreads();
  const unsigned c = counts[threadIdx.x];
  if (c != 0) atomicAdd(&hist[r * kRadix + threadIdx.x], static_cast<Count>(c));
}

// A block per row: chooses the pass's digit from the row's histogram and zeroes the
// histogram for the next pass.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_choose_kernel(int pass, int64_t k, RowState* __restrict__ state, Count* __restrict__ hist) {
  const int64_t r = blockIdx.x;
  const unsigned digit = kRadix - 1 - threadIdx.x;
  const Count count = hist[r * kRadix + digit];
  hist[r * kRadix + digit] = 0;
  const Count above = state[r].above;  // read by every thread before the one below writes it
  Count larger;
  if (choose_digit(count, static_cast<Count>(k) - above, larger)) {
    state[r].prefix |= static_cast<Count>(digit) << digit_shift<KeyTraits<T>::kBits>(pass);
    state[r].above = above + larger;
    state[r].equal = count;
  }
}

// Whether the row takes only some of its keys equal to T, which must then be ranked.
__device__ __forceinline__ bool ranks_ties(const RowState& s, int64_t k) {
  return static_cast<Count>(k) - s.above < s.equal;
}

// equal_counts[r, chunk] = the keys equal to T in the chunk, for rows that rank ties.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_tie_count_kernel(const T* __restrict__ x, int64_t H, int64_t chunk_len, int64_t k,
                           const RowState* __restrict__ state, Count* __restrict__ equal_counts) {
  using Key = typename KeyTraits<T>::Key;
  const int64_t r = blockIdx.x;
  if (!ranks_ties(state[r], k)) return;  // the same for the whole block
  const Key thr = static_cast<Key>(state[r].prefix);
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t end = min(H, begin + chunk_len);
  unsigned n = 0;
  bool nan = false;
  for_each_key(x + r * H, begin, end, nan, [&](Key key, int64_t) { n += key == thr ? 1u : 0u; });
  Count total;
  block_exclusive_sum(static_cast<Count>(n), total);
  if (threadIdx.x == 0) equal_counts[r * gridDim.y + blockIdx.y] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_gather_kernel(const T* __restrict__ x, int64_t H, int64_t chunk_len, int64_t k, bool packed,
                        RowState* __restrict__ state, const Count* __restrict__ equal_counts,
                        int64_t* __restrict__ keys, int64_t* __restrict__ indices) {
  using Key = typename KeyTraits<T>::Key;
  const int64_t r = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  // Field by field: the counter changes under our feet.
  const Count prefix = state[r].prefix, above = state[r].above, equal = state[r].equal;
  const Count rem = static_cast<Count>(k) - above;
  const bool rank = rem < equal;
  Count before = 0;  // keys equal to T in the chunks before this one
  if (rank) {
    Count mine = 0;
    for (int64_t j = threadIdx.x; j < chunk; j += kThreads) mine += equal_counts[r * gridDim.y + j];
    block_exclusive_sum(mine, before);
  }
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min(H, begin + chunk_len);
  gather_winners(x + r * H, begin, end, static_cast<Key>(prefix), rem, rank, before, &state[r].counter, packed,
                 keys + r * k, indices == nullptr ? nullptr : indices + r * k);
}

int64_t chunk_length(int64_t H, int64_t chunks) { return ceil_div(ceil_div(H, chunks), kThreads) * kThreads; }

}  // namespace

int64_t topk_row_chunks(int64_t B, int64_t H, int sms) {
  const int64_t wave = 8LL * std::max(sms, 1);  // 8 blocks of kThreads fill an SM
  int64_t chunks = 1;
  if (B < wave) chunks = std::min(ceil_div(wave, B), ceil_div(H, kMinChunk));
  chunks = std::max(chunks, ceil_div(H, kMaxChunk));
  return std::min(std::max<int64_t>(chunks, 1), kMaxChunks);
}

int64_t topk_workspace_bytes(int64_t B, int64_t chunks) {
  if (chunks <= 1) return 0;
  return B * static_cast<int64_t>(sizeof(RowState) + (kRadix + chunks) * sizeof(Count));
}

bool topk_packs_keys(DType dtype, int64_t H) { return dtype != DType::kFloat64 && H <= (int64_t(1) << kIndexBits); }

bool topk_filters_rows(DType dtype, int64_t H, int64_t k, int64_t chunks) {
  // Samples expected among the row's kCandidates largest keys at least five deviations
  // (Poisson: the square root) above the bar's rank, so that the room overflows on
  // perhaps one row in a hundred million: up to H = 131072 for small k.
  if (chunks != 1 || !topk_packs_keys(dtype, H) || H < kFilterMinColumns) return false;
  const double rank = static_cast<double>(sample_rank(k, H));
  return rank + 5.0 * std::sqrt(rank) <= static_cast<double>(kCandidates) * kSample / static_cast<double>(H);
}

cudaError_t topk_select(const void* x, DType dtype, int64_t B, int64_t H, int64_t k, int64_t chunks, bool packed,
                        bool filter, void* workspace, int* nan_flag, int* fallbacks, int64_t* keys,
                        int64_t* indices, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (k < 1 || k > H || chunks < 1 || chunks > kMaxChunks || B > 0x7FFFFFFF ||
      (packed && !topk_packs_keys(dtype, H)) || (!packed && indices == nullptr) ||
      (chunks > 1 && workspace == nullptr) || (filter && !(packed && topk_filters_rows(dtype, H, k, chunks)))) {
    return cudaErrorInvalidValue;
  }
  cudaError_t status = cudaSuccess;
  const cudaError_t launch = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (filter) {
      if constexpr (KeyTraits<T>::kBits <= 32)
        row_topk_filter_kernel<T><<<grid_of(B), kThreads, 0, stream>>>(xt, H, k, nan_flag, fallbacks, keys);
      return;
    }
    if (chunks == 1) {
      row_topk_kernel<T><<<grid_of(B), kThreads, 0, stream>>>(xt, H, k, packed, nan_flag, keys,
                                                                             indices);
      return;
    }
    // Workspace: B RowStates, then the (B, kRadix) histograms, then the (B, chunks) tie counts.
    status = cudaMemsetAsync(workspace, 0, static_cast<size_t>(topk_workspace_bytes(B, chunks)), stream);
    if (status != cudaSuccess) return;
    auto* state = static_cast<RowState*>(workspace);
    auto* hist = reinterpret_cast<Count*>(state + B);
    Count* equal_counts = hist + B * kRadix;
    const int64_t chunk_len = chunk_length(H, chunks);
    const dim3 grid = grid_of(B, chunks);
    for (int pass = 0; pass < KeyTraits<T>::kBits / kDigitBits; ++pass) {
      chunk_histogram_kernel<T><<<grid, kThreads, 0, stream>>>(xt, H, chunk_len, pass, state, hist, nan_flag);
      chunk_choose_kernel<T><<<grid_of(B), kThreads, 0, stream>>>(pass, k, state, hist);
    }
    chunk_tie_count_kernel<T><<<grid, kThreads, 0, stream>>>(xt, H, chunk_len, k, state, equal_counts);
    chunk_gather_kernel<T><<<grid, kThreads, 0, stream>>>(xt, H, chunk_len, k, packed, state, equal_counts, keys,
                                                          indices);
  });
  return status != cudaSuccess ? status : launch;
}

}  // namespace cuda
}  // namespace aefast
