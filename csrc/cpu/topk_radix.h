// The CPU top-k's way for rows with many winners (k a sizeable share of the row, where
// topk.cpp's block selection reads again most of the row and its heap sifts at every
// element): a radix select on the values' order keys (long rows narrowed first by a
// sampled bar), and a radix sort of the winners.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "topk_candidates.h"

namespace aefast {
namespace cpu {

// Room for n elements, left as it was: a vector's resize would zero all n (the
// candidates' room is a whole row's, of which a few percent is written; zeroing it
// faulted in every page of a fresh buffer, most of a call on one row of 4M).
template <typename T>
class Room {
 public:
  T* at_least(int64_t n) {
    if (n > size_) {
      data_.reset(new T[static_cast<size_t>(n)]);
      size_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t size_ = 0;
};

struct RadixScratch {
  Room<float> candidates;           // a long row's elements above a sampled bar
  Room<int32_t> candidate_offsets;  // and their offsets in the row
  Room<uint32_t> keys;              // the order keys, then the digits' survivors
  Room<float> values;               // the winners' values, compressed (AVX-512)
  Room<int32_t> offsets;            // and their offsets among the keys
  std::vector<uint64_t> order, spare;      // radix_rank: (key, position) pairs
  std::vector<Candidate<float>> ranked;
};

// The k best of x[0, n) (float32, n >= k >= 1; indices offset by `first`) into
// out[0, k), in index order: every element above the k-th largest value and the first
// ones equal to it. Returns false if x holds a NaN.
bool radix_select(const float* x, int64_t n, int64_t first, int64_t k, Candidate<float>* out, RadixScratch& s);

// c (in index order, fewer than 2^31) cut to its k best, still in index order.
void radix_keep_best(std::vector<Candidate<float>>& c, int64_t k, RadixScratch& s);

// c[0, n) (distinct indices) into rank order: value descending, then index ascending.
void radix_rank(Candidate<float>* c, int64_t n, RadixScratch& s);

}  // namespace cpu
}  // namespace aefast
