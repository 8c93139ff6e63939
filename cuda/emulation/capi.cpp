// The C interface of the emulated kernels, for ctypes (tests/test_cuda_emulated.py): each cuda/launchers.h launcher
// over host pointers, plus the emulation's own state (the fault message, the launch count, the SM count).
#include <cstring>

#include "launchers.h"

namespace sc = safeshape::cuda;

extern "C" {

const char* cuemu_message() { return ::cuemu::state().message.c_str(); }
long cuemu_launches() { return ::cuemu::state().launches; }
void cuemu_set_sms(int sms) { ::cuemu::state().sms = sms; }
void cuemu_set_max_blocks(long n) { ::cuemu::state().max_blocks = n; }
int cuemu_threads_mode() { return ::cuemu::use_threads() ? 1 : 0; }
int cuemu_get_last_error() { return static_cast<int>(cudaGetLastError()); }

size_t emu_project_lora_b_workspace_bytes(int64_t d_out, int64_t d_in, int64_t r) {
  return sc::project_lora_b_workspace_bytes(d_out, d_in, r);
}
int emu_project_lora_b(int dtype, const void* aligned, const void* base, const float* lora_b, float* projected,
                       float* v_norm, int64_t d_out, int64_t d_in, int64_t r, void* workspace, size_t ws_bytes) {
  return sc::launch_project_lora_b(static_cast<safeshape::DType>(dtype), aligned, base, lora_b, projected, v_norm,
                                   d_out, d_in, r, workspace, ws_bytes, nullptr);
}
size_t emu_lora_cosine_workspace_bytes(int64_t r) { return sc::lora_cosine_workspace_bytes(r); }
int emu_lora_cosine(const double* lora_b, const double* projected_b, const double* lora_a, double* cosine,
                    int64_t d_out, int64_t d_in, int64_t r, void* workspace, size_t ws_bytes) {
  return sc::launch_lora_cosine(lora_b, projected_b, lora_a, cosine, d_out, d_in, r, workspace, ws_bytes, nullptr);
}
int emu_star_token_weights(int elem_bytes, const void* values, const int64_t* chunk_ends, void* weights,
                           int64_t batch, int64_t chunks, int64_t seq_len) {
  return sc::launch_star_token_weights(elem_bytes, values, chunk_ends, weights, batch, chunks, seq_len, nullptr);
}
int emu_token_logprobs(const safeshape::TokenRows* a) { return sc::launch_token_logprobs(*a, nullptr); }
int emu_token_logprobs_backward(const safeshape::TokenRows* a) {
  return sc::launch_token_logprobs_backward(*a, nullptr);
}
int emu_full_kl(const safeshape::TokenRows* a) { return sc::launch_full_kl(*a, nullptr); }
int emu_full_kl_backward(const safeshape::TokenRows* a) { return sc::launch_full_kl_backward(*a, nullptr); }
size_t emu_token_rows_size() { return sizeof(safeshape::TokenRows); }

}  // extern "C"
