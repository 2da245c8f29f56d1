// The one place where every aefast operator schema is declared. Kernels are
// registered per dispatch key elsewhere: csrc/cpu/*.cpp for CPU,
// csrc/cuda/bindings.cpp for CUDA; autograd and fake (meta) implementations are
// registered from Python (aefast/ops/).
#include <torch/extension.h>

TORCH_LIBRARY(aefast, m) {
  // Sparse-KL family. rho_hat (the column means, float32; float64 for float64 input)
  // is returned for the backward and is not differentiable.
  m.def("kl_sparsity_forward(Tensor a, float rho, float beta) -> (Tensor penalty, Tensor rho_hat)");
  m.def(
      "kl_sparsity_backward(Tensor grad_penalty, Tensor rho_hat, SymInt batch, float rho, "
      "float beta, ScalarType dtype) -> Tensor");
  m.def(
      "sigmoid_kl_sparsity_forward(Tensor z, float rho, float beta) "
      "-> (Tensor h, Tensor penalty, Tensor rho_hat)");
  m.def(
      "sigmoid_kl_sparsity_backward(Tensor grad_h, Tensor grad_penalty, Tensor h, "
      "Tensor rho_hat, float rho, float beta) -> Tensor");
  // s2 = per-unit sum over the batch of (h (1 - h))^2, w2 = squared row norms of
  // the weight; both float32 (float64 for float64 input), saved for the backward.
  m.def("contractive_penalty_forward(Tensor h, Tensor weight) -> (Tensor penalty, Tensor s2, Tensor w2)");
  m.def(
      "contractive_penalty_backward(Tensor grad_penalty, Tensor h, Tensor weight, Tensor s2, "
      "Tensor w2) -> (Tensor grad_h, Tensor grad_weight)");

  // Winner-take-all family. Per row the k largest values, ordered by value
  // (descending) then index (ascending): ties go to the lower index on every
  // backend. relu=True clamps the selected values at 0 after selection.
  m.def("topk_forward(Tensor x, int k, bool relu) -> (Tensor values, Tensor indices)");
  // The (B, width) matrix that is 0 but for out[b, indices[b, j]] = values[b, j]
  // (indices distinct within a row): a top-k mask or its gradient, written in one pass
  // (CPU kernel only; on GPU the ops scatter with torch).
  m.def("scatter_rows(Tensor values, Tensor indices, int width) -> Tensor");
  // out[b] = bias + sum_k values[b, k] * weight[indices[b, k]], weight (L, D).
  m.def("sparse_decode_forward(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor");
  // Gradients of values and weight; the weight gradient is reduced per latent in
  // (row, slot) order: deterministic, no atomics.
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weight) "
      "-> (Tensor grad_values, Tensor grad_weight)");

  // Noise-injection family. Every random number is Philox4x32-10 of (seed, logical
  // element index): seed is a 0-dim int64 tensor on the input's device. kind is
  // gaussian, masking, salt_pepper or dropout; the backward of corrupt is corrupt
  // itself applied to the gradient (same seed, same mask).
  m.def("corrupt(Tensor x, str kind, float level, Tensor seed, float low, float high) -> Tensor");
  // z = mu + eps * exp(logvar / 2); kl = batch mean of -1/2 sum(1 + logvar - mu^2 - exp(logvar)).
  m.def("reparameterize_forward(Tensor mu, Tensor logvar, Tensor seed) -> (Tensor z, Tensor kl)");
  m.def(
      "reparameterize_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor seed) "
      "-> (Tensor grad_mu, Tensor grad_logvar)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aefast compiled kernels; the operators live under torch.ops.aefast";
  m.def("cuda_kernels_built", [] {
#ifdef AEFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
