// Every native op of safeshape, in one place: the table of contents of the native code.
// C++ callers use include/safeshape/ops.h (implemented in cpp/api.cpp), Python callers safeshape.ops.
// Kernels register themselves next to their code (cpp/*_cpu.cpp, cpp/*_cuda.cpp); fake (meta) kernels and
// autograd formulas are registered from Python in python/safeshape/ops/.
#include <torch/library.h>

TORCH_LIBRARY(safeshape, m) {
  // ---- Safe LoRA (docs/math.md#safe-lora) ----
  // B' = V (V^T B) / ||V||_F with V = aligned - base; never forms V V^T, never stores V.
  // Returns (projected_b in lora_b's dtype, ||V||_F as a float32 scalar).
  m.def("project_lora_b(Tensor aligned, Tensor base, Tensor lora_b) -> (Tensor, Tensor)");
  // cos(C dW, dW) by the r x r Gram form, accumulated in fp64; a float64 scalar.
  m.def("lora_cosine(Tensor lora_b, Tensor projected_b, Tensor lora_a) -> Tensor");
  // The explicit C = V V^T / ||V||_F (d_out x d_out, float32), for parity checks.
  m.def("alignment_projection_matrix(Tensor aligned, Tensor base) -> Tensor");

  // ---- DSS loss (docs/math.md#dss-loss) ----
  // Per row of logits [N, V]: logsumexp and z[y] in one pass; rows whose label is ignore_index give 0.
  // Statistics are float32 (float64 for float64 logits). Returns (logprobs, logsumexp).
  m.def("token_logprobs(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // loss_t = w_t (-l_t) + kl_coef (1 - w_t) 0.5 (l_t - l_ref_t)^2. Returns (loss, logprobs, logsumexp).
  m.def("dss_loss(Tensor logits, Tensor labels, Tensor weights, Tensor ref_logprobs, float kl_coef, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)");
  // grad_logits = grad_loss_t c_t (softmax(z_t) - onehot(y_t)), c_t = w_t - kl_coef (1 - w_t) (l_t - l_ref_t);
  // one pass per row, reusing the forward's logsumexp. grad_loss may differ per row.
  m.def("dss_loss_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor weights, Tensor ref_logprobs, "
        "Tensor logprobs, Tensor logsumexp, float kl_coef, int ignore_index) -> Tensor");
  // kl = "full": loss_t = w_t (-l_t) + kl_coef (1 - w_t) KL(p_t || q_t) against reference logits [N, V].
  // Returns (loss, logprobs, kl, logsumexp, ref_logsumexp).
  m.def("dss_loss_full_kl(Tensor logits, Tensor labels, Tensor weights, Tensor ref_logits, float kl_coef, "
        "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dss_loss_full_kl_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor weights, "
        "Tensor ref_logits, Tensor logsumexp, Tensor ref_logsumexp, Tensor kl, float kl_coef, int ignore_index) "
        "-> Tensor");
  // lm-head-fused: logits = hidden [N, H] @ weight [V, H]^T exist one chunk of rows at a time
  // (chunk_rows = 0: automatic, at most 256 MiB of float32 logits per chunk).
  m.def("fused_linear_token_logprobs(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
        "int chunk_rows) -> (Tensor, Tensor)");
  m.def("fused_linear_dss_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor weights, Tensor ref_logprobs, "
        "float kl_coef, int ignore_index, int chunk_rows) -> (Tensor, Tensor, Tensor)");
  // (grad_hidden, grad_weight); recomputes each chunk's logits. compute_grad_weight = false (a frozen lm_head, as
  // in LoRA) skips that GEMM and returns grad_weight as an empty [0] tensor.
  m.def("fused_linear_dss_loss_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor labels, "
        "Tensor weights, Tensor ref_logprobs, Tensor logprobs, Tensor logsumexp, float kl_coef, int ignore_index, "
        "int chunk_rows, bool compute_grad_weight) -> (Tensor, Tensor)");
  // Forward plus the gradient of sum_t grad_loss_t loss_t in one pass over the chunks (three GEMMs, no recompute):
  // for a summed loss, whose upstream gradient is known up to a scalar. Returns (loss, logprobs, grad_hidden,
  // grad_weight).
  m.def("fused_linear_dss_loss_with_grad(Tensor hidden, Tensor weight, Tensor labels, Tensor weights, "
        "Tensor ref_logprobs, Tensor grad_loss, float kl_coef, int ignore_index, int chunk_rows, "
        "bool compute_grad_weight) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- STAR (docs/math.md#star-token-weights) ----
  // weights[b, t] = values[b, k] for the first chunk k (in order) with chunk_ends[b, k] > t, i.e. chunk k's value
  // on the tokens at/after the previous end and before its own end; a negative end (-1) marks a padding chunk;
  // tokens at/after the last end get 0. values [B, K] float, chunk_ends [B, K] int64/int32 -> [B, seq_len].
  m.def("star_token_weights(Tensor values, Tensor chunk_ends, int seq_len) -> Tensor");
}
