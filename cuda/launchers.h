// The CUDA kernels' C++ interface: raw pointers, sizes and a stream; no torch types, so this folder can be
// compiled, checked and linked without torch. Every launcher returns a cudaError_t as int (0 = success).
#pragma once
#include <cstddef>
#include <cstdint>

#include "token_rows.h"

namespace safeshape::cuda {

// ---- Safe LoRA ----
// Bytes of device workspace that launch_project_lora_b needs.
size_t project_lora_b_workspace_bytes(int64_t d_out, int64_t d_in, int64_t r);
// projected[d_out, r] (float32) = V (V^T B) / ||V||_F with V = aligned - base ([d_out, d_in], dtype),
// B = lora_b [d_out, r] float32 row-major; v_norm[0] receives ||V||_F (float32).
int launch_project_lora_b(DType dtype, const void* aligned, const void* base, const float* lora_b, float* projected,
                          float* v_norm, int64_t d_out, int64_t d_in, int64_t r, void* workspace,
                          size_t workspace_bytes, void* stream);
// cosine[0] = tr(P^T B G) / sqrt(tr(P^T P G) tr(B^T B G)), G = A A^T; B, P [d_out, r], A [r, d_in], all float64.
// One block per entry of an r x r Gram matrix: r up to kMaxCosineRank (else cudaErrorInvalidValue).
constexpr int64_t kMaxCosineBlocks = 0x7fffffff;  // CUDA's largest gridDim.x
constexpr int64_t kMaxCosineRank = 46340;         // the largest r with r * r <= kMaxCosineBlocks
size_t lora_cosine_workspace_bytes(int64_t r);
int launch_lora_cosine(const double* lora_b, const double* projected_b, const double* lora_a, double* cosine,
                       int64_t d_out, int64_t d_in, int64_t r, void* workspace, size_t workspace_bytes, void* stream);

// ---- STAR ----
// weights[b, t] = values[b, k] for the first k with chunk_ends[b, k] > t, else 0 (t < seq_len). The copy is bitwise,
// so any element size works: elem_bytes is 2 (float16/bfloat16), 4 (float32) or 8 (float64).
// values [batch, chunks] and chunk_ends [batch, chunks] (int64) row-major; weights [batch, seq_len].
int launch_star_token_weights(int elem_bytes, const void* values, const int64_t* chunk_ends, void* weights,
                              int64_t batch, int64_t chunks, int64_t seq_len, void* stream);

// ---- token losses (docs/math.md#dss-loss, docs/math.md#deep-token): row kernels over TokenRows, one CUDA block per row ----
// logprobs, logsumexp per row.
int launch_token_logprobs(const TokenRows& a, void* stream);
// grad_logits = grad_logprobs (onehot(y) - softmax(z)); may run in place.
int launch_token_logprobs_backward(const TokenRows& a, void* stream);
// logprobs, kl = KL(softmax(z) || softmax(r)), logsumexp, ref_logsumexp per row.
int launch_full_kl(const TokenRows& a, void* stream);
// grad = grad_logprobs (onehot - p) + grad_kl p (log p - log q - KL).
int launch_full_kl_backward(const TokenRows& a, void* stream);

}  // namespace safeshape::cuda
