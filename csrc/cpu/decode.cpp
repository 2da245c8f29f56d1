// CPU sparse decoder: out[b] = bias + sum_k values[b, k] * weight[indices[b, k]].
// The forward walks the k selected weight rows of each output row. The backward
// sorts the (row, slot) pairs by latent (a stable counting sort: (row, slot) order
// within a latent) and walks the latents: each latent's weight gradient row is the
// sum over its pairs, and, in the same walk, each pair's values gradient is the dot
// of its gradient row with the latent's weight row, read once. Deterministic, no
// atomics, and no dense (B, L) tensor anywhere.
//
// The weight may be float32 under float16 or bfloat16 values (autocast's mixed
// precision): its rows are read as they are, the sums kept in float32, the output in
// the values' dtype and the weight gradient in float32, so no cast of the whole
// (L, D) weight or of its gradient. Otherwise one dtype for all.
#include "common.h"  // first: see its note on the intrinsics

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../decode_args.h"

namespace aefast {
namespace cpu {
namespace {

// Element types: R, the rows gathered (the weight in the forward, the output gradient
// in the weight gradient); V, the values; O, what is written; A, the sums (float32 for
// float16 and bfloat16, else the type itself).
template <typename R, typename A>
inline __attribute__((always_inline)) void axpy_loop(A a, const R* x, A* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * static_cast<A>(x[d]);
}

template <typename X, typename Y, typename A>
inline __attribute__((always_inline)) A dot_loop(const X* x, const Y* y, int64_t n) {
  A s = 0;
  for (int64_t d = 0; d < n; ++d) s += static_cast<A>(x[d]) * static_cast<A>(y[d]);
  return s;
}

AEFAST_SIMD_CLONES void axpy(float a, const float* x, float* y, int64_t n) { axpy_loop<float, float>(a, x, y, n); }
template <typename R, typename A>
void axpy(A a, const R* x, A* y, int64_t n) { axpy_loop<R, A>(a, x, y, n); }

// float32: the sum is reassociated so that it vectorizes (a fixed order still: the
// same bits on every run on a machine). Without this the 768-long dependent chain
// of adds made the values gradient the slowest part of the backward.
__attribute__((optimize("associative-math", "no-signed-zeros")))
AEFAST_SIMD_CLONES float dot(const float* x, const float* y, int64_t n) { return dot_loop<float, float, float>(x, y, n); }
template <typename X, typename Y>
acc_t<X> dot(const X* x, const Y* y, int64_t n) { return dot_loop<X, Y, acc_t<X>>(x, y, n); }

// One output row of the forward: its k weight rows added a block of C columns at a
// time, the block's sums held in registers while all k rows pass, each (row, block)
// asked for kDecodeAhead steps before its use. Each column's sum is still bias, then
// rows 0..k-1 in order: the same bits as adding row after row, at any C. (1024 x 32
// rows of 768 from a 48 MiB weight, 2 threads, on a Xeon: whole rows one after another,
// the next one prefetched, took 1.6x F.embedding_bag's time; blocks of 64 or 256
// without the prefetch 2x; blocks of 128 with it 1.0x.) In the vectorized copies
// (float32, and the mixed precision of autocast) C = 256 with AVX-512, whose 32
// registers hold the 16 vectors of sums (Zen 5, 2 threads: 0.93x the time of 128 at
// 4096 x 32 rows, the same at 1024 x 32); 128 elsewhere (AVX2 has 16 registers) and in
// the baseline copies. The weight gradient alone sums its latents' rows the same way.
constexpr int64_t kDecodeColumns = 128;
constexpr int64_t kWideDecodeColumns = 256;
constexpr int64_t kDecodeAhead = 8;  // rows of a block requested ahead of their use
// The weight gradient alone sums a latent's rows as the forward does from this many
// pairs on (4096 x 32 pairs over 16384 latents: 0.8x the time of adding each pair's
// row whole; from 2 pairs on, 3% slower where most latents have one or two).
constexpr int64_t kBlockedPairs = 4;

// Columns [d0, d0 + width) of one output row, width = C when kFull (a constant, for
// the compiler, and the later blocks prefetched), else the last, narrower block's.
template <int64_t C, bool kFull, typename R, typename V, typename O, typename A>
AEFAST_INLINE void decode_block(const R* weight, const int64_t* rows, const V* values, int64_t K, int64_t D,
                                int64_t d0, int64_t narrow, const O* bias, O* out) {
  const int64_t width = kFull ? C : narrow;
  A acc[C];
  for (int64_t d = 0; d < width; ++d) acc[d] = bias ? static_cast<A>(bias[d0 + d]) : A(0);
  for (int64_t j = 0; j < K; ++j) {
    if constexpr (kFull) {
      // The (row, block) pair kDecodeAhead steps later: this block of a later row, or a
      // later block of an early one (a hint: the last, narrower block is not asked for).
      const int64_t ahead = j + kDecodeAhead, later = d0 + (ahead / K) * C;
      if (later + C <= D) {
        const char* next = reinterpret_cast<const char*>(weight + rows[ahead % K] * D + later);
        for (int64_t b = 0; b < C * static_cast<int64_t>(sizeof(R)); b += 64) __builtin_prefetch(next + b);
      }
    }
    const A a = static_cast<A>(values[j]);
    const R* row = weight + rows[j] * D + d0;
    for (int64_t d = 0; d < width; ++d) acc[d] += a * static_cast<A>(row[d]);
  }
  for (int64_t d = 0; d < width; ++d) out[d0 + d] = static_cast<O>(acc[d]);
}

template <int64_t C, typename R, typename V, typename O, typename A>
AEFAST_INLINE void decode_blocks(const R* weight, const int64_t* rows, const V* values, int64_t K, int64_t D,
                                 const O* bias, O* out) {
  int64_t d0 = 0;
  for (; d0 + C <= D; d0 += C) decode_block<C, true, R, V, O, A>(weight, rows, values, K, D, d0, 0, bias, out);
  if (d0 < D) decode_block<C, false, R, V, O, A>(weight, rows, values, K, D, d0, D - d0, bias, out);
}

// The vectorized copies' loop (below): the block width by the CPU's vectors.
template <typename R, typename V, typename O, typename A>
AEFAST_INLINE void decode_row_loop(const R* weight, const int64_t* rows, const V* values, int64_t K, int64_t D,
                                   const O* bias, O* out) {
  if (simd_level() == Simd::kAvx512)
    decode_blocks<kWideDecodeColumns, R, V, O, A>(weight, rows, values, K, D, bias, out);
  else
    decode_blocks<kDecodeColumns, R, V, O, A>(weight, rows, values, K, D, bias, out);
}

// Vectorized copies for float32, and for the mixed precision of autocast: float32 rows
// under bfloat16 values (the forward), bfloat16 rows summed into float32 (the weight
// gradient); any other combination compiles once, for the baseline CPU.
AEFAST_SIMD_CLONES void decode_row(const float* weight, const int64_t* rows, const float* values, int64_t K,
                                   int64_t D, const float* bias, float* out) {
  decode_row_loop<float, float, float, float>(weight, rows, values, K, D, bias, out);
}
AEFAST_SIMD_CLONES void decode_row(const float* weight, const int64_t* rows, const at::BFloat16* values, int64_t K,
                                   int64_t D, const at::BFloat16* bias, at::BFloat16* out) {
  decode_row_loop<float, at::BFloat16, at::BFloat16, float>(weight, rows, values, K, D, bias, out);
}
AEFAST_SIMD_CLONES void decode_row(const at::BFloat16* weight, const int64_t* rows, const at::BFloat16* values,
                                   int64_t K, int64_t D, const float* bias, float* out) {
  decode_row_loop<at::BFloat16, at::BFloat16, float, float>(weight, rows, values, K, D, bias, out);
}
template <typename R, typename V, typename O>
void decode_row(const R* weight, const int64_t* rows, const V* values, int64_t K, int64_t D, const O* bias, O* out) {
  decode_blocks<kDecodeColumns, R, V, O, acc_t<O>>(weight, rows, values, K, D, bias, out);
}

// Both gradients of one latent in one walk over its n pairs' gradient rows, a block of
// kFusedColumns columns at a time: the weight gradient row (the sum of value *
// grad[row], in pair order, in registers) and each pair's values gradient, the dot of
// grad[row] and the latent's weight row, kept as 16 lane-wise partial sums per pair
// (partial, n x 16) and added up at the end. The weight row is read once, in latent
// order, where a walk by output rows gathers it once per pair. G: the output gradient's
// and the values' type; W: the weight's and its gradient's.
constexpr int64_t kFusedColumns = 64;
constexpr int64_t kFusedAhead = 4;  // pairs ahead whose gradient row block is asked for
constexpr int64_t kPartialLanes = 16;

// Columns [d0, d0 + width) of latent_grads, width = kFusedColumns when kFull (a
// constant, for the compiler), else the last, narrower block's.
template <bool kFull, typename G, typename W, typename A>
AEFAST_INLINE void latent_grads_block(const G* grad, const W* weight_row, const int64_t* rows, const G* values,
                                      int64_t n, int64_t D, int64_t d0, int64_t narrow, A* partial,
                                      W* grad_weight_row) {
  constexpr int64_t C = kFusedColumns, kLanes = kPartialLanes;
  const int64_t width = kFull ? C : narrow;
  A w[C], acc[C];
  for (int64_t d = 0; d < width; ++d) {
    w[d] = static_cast<A>(weight_row[d0 + d]);
    acc[d] = A(0);
  }
  for (int64_t i = 0; i < n; ++i) {
    // The pair kFusedAhead later: in this block, or the next full block's first pairs.
    const int64_t ahead = i + kFusedAhead;
    const int64_t block_ahead = ahead < n ? d0 : d0 + C, pair_ahead = ahead < n ? ahead : ahead - n;
    if (pair_ahead < n && block_ahead + C <= D) {
      const char* next = reinterpret_cast<const char*>(grad + rows[pair_ahead] * D + block_ahead);
      for (int64_t b = 0; b < C * static_cast<int64_t>(sizeof(G)); b += 64) __builtin_prefetch(next + b);
    }
    const G* g = grad + rows[i] * D + d0;
    const A v = static_cast<A>(values[i]);
    for (int64_t d = 0; d < width; ++d) acc[d] += v * static_cast<A>(g[d]);
    A p[kLanes];  // a local copy: partial might alias g as far as the compiler knows
    for (int64_t l = 0; l < kLanes; ++l) p[l] = partial[i * kLanes + l];
    int64_t c = 0;
    for (; c + kLanes <= width; c += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) p[l] += static_cast<A>(g[c + l]) * w[c + l];
    for (int64_t l = 0; c + l < width; ++l) p[l] += static_cast<A>(g[c + l]) * w[c + l];
    for (int64_t l = 0; l < kLanes; ++l) partial[i * kLanes + l] = p[l];
  }
  for (int64_t d = 0; d < width; ++d) grad_weight_row[d0 + d] = static_cast<W>(acc[d]);
}

template <typename G, typename W, typename A>
AEFAST_INLINE void latent_grads_loop(const G* grad, const W* weight_row, const int64_t* rows, const G* values,
                                     const int64_t* pairs, int64_t n, int64_t D, A* partial, W* grad_weight_row,
                                     G* grad_values) {
  for (int64_t i = 0; i < n * kPartialLanes; ++i) partial[i] = A(0);
  int64_t d0 = 0;
  for (; d0 + kFusedColumns <= D; d0 += kFusedColumns)
    latent_grads_block<true>(grad, weight_row, rows, values, n, D, d0, 0, partial, grad_weight_row);
  if (d0 < D) latent_grads_block<false>(grad, weight_row, rows, values, n, D, d0, D - d0, partial, grad_weight_row);
  for (int64_t i = 0; i < n; ++i) {
    A sum = 0;
    for (int64_t l = 0; l < kPartialLanes; ++l) sum += partial[i * kPartialLanes + l];
    grad_values[pairs[i]] = static_cast<G>(sum);
  }
}

AEFAST_SIMD_CLONES void latent_grads(const float* grad, const float* weight_row, const int64_t* rows,
                                     const float* values, const int64_t* pairs, int64_t n, int64_t D, float* partial,
                                     float* grad_weight_row, float* grad_values) {
  latent_grads_loop(grad, weight_row, rows, values, pairs, n, D, partial, grad_weight_row, grad_values);
}
AEFAST_SIMD_CLONES void latent_grads(const at::BFloat16* grad, const float* weight_row, const int64_t* rows,
                                     const at::BFloat16* values, const int64_t* pairs, int64_t n, int64_t D,
                                     float* partial, float* grad_weight_row, at::BFloat16* grad_values) {
  latent_grads_loop(grad, weight_row, rows, values, pairs, n, D, partial, grad_weight_row, grad_values);
}
template <typename G, typename W>
void latent_grads(const G* grad, const W* weight_row, const int64_t* rows, const G* values, const int64_t* pairs,
                  int64_t n, int64_t D, acc_t<G>* partial, W* grad_weight_row, G* grad_values) {
  latent_grads_loop(grad, weight_row, rows, values, pairs, n, D, partial, grad_weight_row, grad_values);
}

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

void check_indices(const int64_t* idx, int64_t n, int64_t L) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < L, "aefast: indices must be in [0, ", L, "), got ", idx[i]);
}

// fn(const W* tag) with W the weight's element type: the values' own, or float32 under
// float16 or bfloat16 values (decode_args::check_inputs allows no other).
template <typename V, typename Fn>
void with_weight_type(const at::Tensor& weight, const Fn& fn) {
  if constexpr (std::is_same_v<V, at::Half> || std::is_same_v<V, at::BFloat16>) {
    if (weight.scalar_type() == at::kFloat) return fn(static_cast<const float*>(nullptr));
  }
  fn(static_cast<const V*>(nullptr));
}

template <typename Tag>
using pointee_t = std::remove_const_t<std::remove_pointer_t<Tag>>;

at::Tensor sparse_decode_forward(const at::Tensor& values_in, const at::Tensor& indices_in,
                                 const at::Tensor& weight_in, const std::optional<at::Tensor>& bias) {
  decode_args::check_inputs(values_in, indices_in, weight_in);
  const auto values = values_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t B = values.size(0), K = values.size(1), L = weight.size(0), D = weight.size(1);
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  check_indices(ip, B * K, L);
  auto out = empty_output({B, D}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_decode_forward", [&] {
    const scalar_t* vp = values.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::optional<at::Tensor> b;
    if (bias.has_value() && bias->defined()) b = bias->to(values.scalar_type()).contiguous();
    const scalar_t* bp = b ? b->const_data_ptr<scalar_t>() : nullptr;
    with_weight_type<scalar_t>(weight, [&](auto tag) {
      const auto* wp = weight.const_data_ptr<pointee_t<decltype(tag)>>();
      at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) decode_row(wp, ip + r * K, vp + r * K, K, D, bp, op + r * D);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward(const at::Tensor& grad_in,
                                                          const at::Tensor& values_in,
                                                          const at::Tensor& indices_in,
                                                          const at::Tensor& weight_in, bool values_grad) {
  decode_args::check_inputs(values_in, indices_in, weight_in);
  const auto values = values_in.contiguous();
  const auto indices = indices_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto grad = grad_in.to(values.scalar_type()).contiguous();
  const int64_t B = values.size(0), K = values.size(1), L = weight.size(0), D = weight.size(1);
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  check_indices(ip, B * K, L);
  auto grad_values = values_grad ? at::empty({B, K}, values.options()) : at::empty({0}, values.options());
  auto grad_weight = empty_output({L, D}, weight.options());

  std::vector<int64_t> start(static_cast<size_t>(L + 1), 0);  // latent l's pairs: [start[l], start[l + 1])
  for (int64_t e = 0; e < B * K; ++e) ++start[ip[e] + 1];
  for (int64_t l = 0; l < L; ++l) start[l + 1] += start[l];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_decode_backward", [&] {
    with_weight_type<scalar_t>(weight, [&](auto tag) {
      using A = acc_t<scalar_t>;
      using W = pointee_t<decltype(tag)>;
      const scalar_t* vp = values.const_data_ptr<scalar_t>();
      const W* wp = weight.const_data_ptr<W>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* gvp = grad_values.data_ptr<scalar_t>();
      W* gwp = grad_weight.data_ptr<W>();
      // The pairs in latent order (counting sort, stable: (row, slot) order within a
      // latent): their rows, values and, for the values gradient's walk, places.
      const bool walk_both = values_grad && D >= kFusedColumns;
      std::vector<int64_t> pair_rows(static_cast<size_t>(B * K)), pair_index(walk_both ? pair_rows.size() : 0);
      std::vector<scalar_t> pair_values(pair_rows.size());
      {
        std::vector<int64_t> next(start.begin(), start.end() - 1);
        for (int64_t b = 0, e = 0; b < B; ++b)
          for (int64_t j = 0; j < K; ++j, ++e) {
            const int64_t s = next[ip[e]]++;
            pair_rows[s] = b;
            pair_values[s] = vp[e];
            if (walk_both) pair_index[s] = e;
          }
      }
      if (walk_both) {
        at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
          std::vector<A> partial;
          for (int64_t l = l0; l < l1; ++l) {
            const int64_t first = start[l], n = start[l + 1] - first;
            if (n == 0) {  // no pair names it: its weight row is never read
              std::fill(gwp + l * D, gwp + (l + 1) * D, W(0));
              continue;
            }
            if (static_cast<int64_t>(partial.size()) < kPartialLanes * n)
              partial.resize(static_cast<size_t>(kPartialLanes * n));
            latent_grads(gp, wp + l * D, pair_rows.data() + first, pair_values.data() + first, pair_index.data() + first,
                         n, D, partial.data(), gwp + l * D, gvp);
          }
        });
        return;
      }
      if (values_grad) {  // rows narrower than a block: by output row, each pair's weight row gathered
        at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t j = 0; j < K; ++j) {
              if (j + 1 < K) prefetch_row(wp + ip[r * K + j + 1] * D, D);
              gvp[r * K + j] = static_cast<scalar_t>(dot(gp + r * D, wp + ip[r * K + j] * D, D));
            }
        });
      }
      // The weight gradient alone: a latent named by several pairs is summed as the
      // forward sums an output row, a block of columns at a time in registers; with
      // fewer, each pair's row is added whole, which the hardware prefetcher follows
      // better. The same bits either way, and as latent_grads'.
      at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
        std::vector<A> buffer(std::is_same_v<W, A> ? 0 : static_cast<size_t>(D));
        for (int64_t l = l0; l < l1; ++l) {
          const int64_t first = start[l], n = start[l + 1] - first;
          if (n >= kBlockedPairs) {
            decode_row(gp, pair_rows.data() + first, pair_values.data() + first, n, D, static_cast<const W*>(nullptr),
                       gwp + l * D);
            continue;
          }
          // Accumulate straight into the gradient row when it has the accumulation type.
          A* acc = std::is_same_v<W, A> ? reinterpret_cast<A*>(gwp + l * D) : buffer.data();
          std::fill(acc, acc + D, A(0));
          for (int64_t i = first; i < first + n; ++i)
            axpy(static_cast<A>(pair_values[i]), gp + pair_rows[i] * D, acc, D);
          if constexpr (!std::is_same_v<W, A>)
            for (int64_t d = 0; d < D; ++d) gwp[l * D + d] = static_cast<W>(acc[d]);
        }
      });
    });
  });
  return {grad_values, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("sparse_decode_forward", &sparse_decode_forward);
  m.impl("sparse_decode_backward", &sparse_decode_backward);
}

}  // namespace cpu
}  // namespace aefast
