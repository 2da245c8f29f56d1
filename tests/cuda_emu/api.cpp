// extern "C" wrappers of the launchers of csrc/cuda/*.h, for ctypes. A launcher
// returns its cudaError_t, or -1 when the emulator found a misuse (emu_error()).
#include "jumprelu.h"
#include "kl.h"
#include "noise.h"
#include "decode.h"
#include "topk.h"

using namespace aefast::cuda;

extern "C" const char* emu_error();

namespace {
int status(cudaError_t err) { return *emu_error() ? -1 : static_cast<int>(err); }
DType dt(int d) { return static_cast<DType>(d); }
}  // namespace

extern "C" {

// ---- sizes and layouts the bindings ask for
int64_t emu_column_splits(int64_t B, int64_t H, int sms) { return column_splits(B, H, sms); }
int64_t emu_jumprelu_splits(int64_t B, int64_t L, int sms) { return jumprelu_splits(B, L, sms); }
int64_t emu_reparameterize_blocks(int64_t n) { return reparameterize_blocks(n); }
int64_t emu_topk_row_chunks(int64_t B, int64_t H, int sms) { return topk_row_chunks(B, H, sms); }
int64_t emu_topk_workspace_bytes(int64_t B, int64_t chunks) { return topk_workspace_bytes(B, chunks); }
int emu_topk_packs_keys(int dtype, int64_t H) { return topk_packs_keys(dt(dtype), H); }
int emu_topk_filters_rows(int dtype, int64_t H, int64_t k, int64_t chunks) {
  return topk_filters_rows(dt(dtype), H, k, chunks);
}

// ---- the conversions of cuda_fp16.h / cuda_bf16.h, for a test of the emulator itself
void emu_to_half(const float* in, int64_t n, int bf16, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(in[i])) : __half_as_ushort(__float2half_rn(in[i]));
}

// ---- launchers
int emu_jumprelu_forward(const void* z, const void* threshold, void* out, void* l0, int dtype, int64_t B, int64_t L) {
  return status(jumprelu_forward(z, threshold, out, l0, dt(dtype), B, L, nullptr));
}

int emu_jumprelu_backward(const void* grad_out, const void* grad_l0, const void* z, const void* threshold,
                          void* grad_z, void* partial, void* grad_threshold, int dtype, int64_t B, int64_t L,
                          double bandwidth, int64_t splits) {
  return status(jumprelu_backward(grad_out, grad_l0, z, threshold, grad_z, partial, grad_threshold, dt(dtype), B, L,
                                  bandwidth, splits, nullptr));
}

int emu_kl_sparsity_forward(const void* a, int dtype, int64_t B, int64_t H, double rho, double beta,
                            double eps, int64_t splits, void* partial, void* rho_hat, void* penalty) {
  return status(kl_sparsity_forward(a, dt(dtype), B, H, rho, beta, eps, splits, partial, rho_hat, penalty, nullptr));
}

int emu_kl_sparsity_backward(const void* grad_penalty, const void* rho_hat, void* grad_a, int dtype, int64_t B,
                             int64_t H, double rho, double beta, double eps) {
  return status(kl_sparsity_backward(grad_penalty, rho_hat, grad_a, dt(dtype), B, H, rho, beta, eps, nullptr));
}

int emu_sigmoid_kl_sparsity_forward(const void* z, void* h, int dtype, int64_t B, int64_t H, double rho,
                                    double beta, double eps, int64_t splits, void* partial, void* rho_hat,
                                    void* penalty) {
  return status(
      sigmoid_kl_sparsity_forward(z, h, dt(dtype), B, H, rho, beta, eps, splits, partial, rho_hat, penalty, nullptr));
}

int emu_sigmoid_kl_sparsity_backward(const void* grad_h, const void* grad_penalty, const void* h,
                                     const void* rho_hat, void* grad_z, int dtype, int64_t B, int64_t H, double rho,
                                     double beta, double eps) {
  return status(sigmoid_kl_sparsity_backward(grad_h, grad_penalty, h, rho_hat, grad_z, dt(dtype), B, H, rho, beta,
                                             eps, nullptr));
}

int emu_contractive_penalty_forward(const void* h, const void* weight, int dtype, int64_t B, int64_t H, int64_t D,
                                    int64_t h_splits, void* partial, void* s2, void* w2, void* penalty) {
  return status(
      contractive_penalty_forward(h, weight, dt(dtype), B, H, D, h_splits, partial, s2, w2, penalty, nullptr));
}

int emu_contractive_penalty_backward(const void* grad_penalty, const void* h, const void* weight, const void* s2,
                                     const void* w2, void* grad_h, void* grad_weight, int dtype, int64_t B,
                                     int64_t H, int64_t D) {
  return status(contractive_penalty_backward(grad_penalty, h, weight, s2, w2, grad_h, grad_weight, dt(dtype), B, H,
                                             D, nullptr));
}

int emu_corrupt(const void* x, void* out, int dtype, int64_t n, int kind, float level, double scale, double low,
                double high, const int64_t* seed) {
  return status(corrupt(x, out, dt(dtype), n, kind, level, scale, low, high, seed, nullptr));
}

int emu_reparameterize_forward(const void* mu, const void* logvar, void* z, void* partial, void* kl, int dtype,
                               int64_t batch, int64_t n, const int64_t* seed) {
  return status(reparameterize_forward(mu, logvar, z, partial, kl, dt(dtype), batch, n, seed, nullptr));
}

int emu_reparameterize_backward(const void* grad_z, const void* grad_kl, const void* mu, const void* logvar,
                                void* grad_mu, void* grad_logvar, int dtype, int64_t batch, int64_t n,
                                const int64_t* seed) {
  return status(reparameterize_backward(grad_z, grad_kl, mu, logvar, grad_mu, grad_logvar, dt(dtype), batch, n,
                                        seed, nullptr));
}

int emu_sparse_decode_forward(const void* values, const int64_t* indices, const void* weight, const void* bias,
                              void* out, int dtype, int weight_dtype, int64_t B, int64_t K, int64_t L, int64_t D) {
  return status(
      sparse_decode_forward(values, indices, weight, bias, out, dt(dtype), dt(weight_dtype), B, K, L, D, nullptr));
}

int emu_sparse_decode_backward(const void* grad_out, const void* values, const int64_t* indices, const void* weight,
                               const int64_t* order, const int64_t* starts, void* grad_values, void* grad_weight,
                               int dtype, int weight_dtype, int64_t B, int64_t K, int64_t L, int64_t D) {
  return status(sparse_decode_backward(grad_out, values, indices, weight, order, starts, grad_values, grad_weight,
                                       dt(dtype), dt(weight_dtype), B, K, L, D, nullptr));
}

int emu_topk_select(const void* x, int dtype, int64_t B, int64_t H, int64_t k, int64_t chunks, int packed,
                    int filter, void* workspace, int* nan_flag, int* fallbacks, int64_t* keys, int64_t* indices) {
  return status(topk_select(x, dt(dtype), B, H, k, chunks, packed != 0, filter != 0, workspace, nan_flag, fallbacks,
                            keys, indices, nullptr));
}

}  // extern "C"
