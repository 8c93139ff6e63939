// The CUDA kernels' C++ interface: raw pointers, sizes and a stream; no torch types, so this folder can be
// compiled, checked and linked without torch. Every launcher returns a cudaError_t as int (0 = success).
#pragma once
#include <cstddef>
#include <cstdint>

namespace safeshape::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- Safe LoRA ----
// Bytes of device workspace that launch_project_lora_b needs.
size_t project_lora_b_workspace_bytes(int64_t d_out, int64_t d_in, int64_t r);
// projected[d_out, r] (float32) = V (V^T B) / ||V||_F with V = aligned - base ([d_out, d_in], dtype),
// B = lora_b [d_out, r] float32 row-major; v_norm[0] receives ||V||_F (float32).
int launch_project_lora_b(DType dtype, const void* aligned, const void* base, const float* lora_b, float* projected,
                          float* v_norm, int64_t d_out, int64_t d_in, int64_t r, void* workspace,
                          size_t workspace_bytes, void* stream);
// cosine[0] = tr(P^T B G) / sqrt(tr(P^T P G) tr(B^T B G)), G = A A^T; B, P [d_out, r], A [r, d_in], all float64.
size_t lora_cosine_workspace_bytes(int64_t r);
int launch_lora_cosine(const double* lora_b, const double* projected_b, const double* lora_a, double* cosine,
                       int64_t d_out, int64_t d_in, int64_t r, void* workspace, size_t workspace_bytes, void* stream);

// ---- STAR ----
// weights[b, t] = values[b, k] for the first k with chunk_ends[b, k] > t, else 0 (t < seq_len). The copy is bitwise,
// so any element size works: elem_bytes is 2 (float16/bfloat16), 4 (float32) or 8 (float64).
// values [batch, chunks] and chunk_ends [batch, chunks] (int64) row-major; weights [batch, seq_len].
int launch_star_token_weights(int elem_bytes, const void* values, const int64_t* chunk_ends, void* weights,
                              int64_t batch, int64_t chunks, int64_t seq_len, void* stream);

// ---- DSS loss ----
// Row kernels over a [rows, vocab] block of logits (row-major, row stride = vocab), one CUDA block per row.
// Statistics (loss, logprobs, kl, weights, ref_logprobs, grad_loss) are float32, or float64 when the logits are
// float64 (logits_f64 = true; dtype is then ignored); logsumexp and ref_logsumexp are always float64. Rows whose label is ignore_index give 0 outputs
// and 0 gradients. Nullable pointers are marked.
struct DssRows {
  DType dtype;
  bool logits_f64;
  int64_t rows, vocab;
  const void* logits;
  const void* ref_logits;    // full-KL only: [rows, vocab] in the logits' dtype
  void* grad_logits;         // backward output, may alias logits (in-place for the fused ops)
  const int64_t* labels;
  const void* weights;       // nullable: w = 1
  const void* ref_logprobs;  // nullable: treated as 0 (with kl_coef = 0)
  const void* grad_loss;     // backward: upstream gradient of the per-token loss
  void* loss;                // nullable in forward: then only logprobs / logsumexp are written
  void* logprobs;
  double* logsumexp;
  double* ref_logsumexp;     // full-KL only
  void* kl;                  // full-KL only: KL(p || q) per row
  double kl_coef;
  int64_t ignore_index;
};
// forward: logsumexp, logprobs and (if loss) the k2 DSS loss per row, one pass over each row.
int launch_dss_rows_forward(const DssRows& a, void* stream);
// backward: grad_logits = grad_loss * c * (softmax - onehot(y)), c = w - kl_coef (1 - w) (l - l_ref).
int launch_dss_rows_backward(const DssRows& a, void* stream);
// full-vocabulary KL(p || q) variant: forward writes loss, logprobs, logsumexp, ref_logsumexp, kl.
int launch_dss_rows_full_kl_forward(const DssRows& a, void* stream);
// grad = g (w (p - onehot) + kl_coef (1 - w) p (log p - log q - KL)).
int launch_dss_rows_full_kl_backward(const DssRows& a, void* stream);

}  // namespace safeshape::cuda
