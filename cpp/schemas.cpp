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

  // ---- token losses: DSS, SFT, RS, Deep Token (docs/math.md#dss-loss, docs/math.md#deep-token) ----
  // Every objective depends on the logits z_t only through l_t = log softmax(z_t)[y_t], so
  // dloss/dz_t = (dloss/dl_t) (onehot(y_t) - softmax(z_t)). Rows whose label is ignore_index give 0 (and 0 gradient).
  // Per-row statistics are float32 (float64 for float64 logits); logsumexp is always float64.
  //
  // Row ops (CPU and CUDA kernels): per row of logits [N, V], (l_t, logsumexp_t) in one pass.
  m.def("token_logprobs(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // In place: logits (contiguous) become grad_logprobs_t (onehot(y_t) - softmax(z_t)), from the forward's logsumexp.
  m.def("token_logprobs_backward_(Tensor(a!) logits, Tensor grad_logprobs, Tensor labels, Tensor logsumexp, "
        "int ignore_index) -> ()");
  // Per-token objective of the log-probabilities: (loss_t, dloss_t/dl_t). objective / params:
  //   logprob []: w l;   sft []: w (-l);   dss_k2 [lambda]: w (-l) + lambda (1 - w) 0.5 (l - l_ref)^2, or
  //   dss_k2 [lambda, C]: the k2 term clamp(0.5 (l - l_ref)^2, -C, C) (OpenRLHF's), gradient 0 where it reaches C;
  //   deep_token [beta_1, ..., beta_k]: w (2 / beta_t) (-log sigmoid(beta_t (l - l_ref))), beta_t = beta_min(t, k)
  //   at 1-based position t of the response. A missing weights tensor means w = 1.
  m.def("token_objective(Tensor logprobs, Tensor labels, Tensor? weights, Tensor? ref_logprobs, Tensor? positions, "
        "str objective, float[] params, int ignore_index) -> (Tensor, Tensor)");
  // lm-head-fused: logits = hidden [N, H] @ weight [V, H]^T exist one chunk of rows at a time (chunk_rows = 0:
  // automatic, at most 128 MiB of float32 logits per chunk). Returns (loss_t, l_t, dloss_t/dl_t, grad_hidden,
  // grad_weight); with compute_grad the gradients of sum_t loss_t come from the same pass (three GEMMs in all, the
  // logits never recomputed), else they are empty [0] tensors, as grad_weight is without compute_grad_weight (a
  // frozen lm_head). fp32_grad_weight accumulates a bfloat16/float16 grad_weight in float32 (returned as float32).
  m.def("fused_linear_token_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor? weights, Tensor? ref_logprobs, "
        "Tensor? positions, str objective, float[] params, int ignore_index, int chunk_rows, bool compute_grad, "
        "bool compute_grad_weight, bool fp32_grad_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Full-vocabulary KL(p_t || q_t) against reference logits [N, V] (kl = "full", docs/math.md#dss-full-kl):
  // (l_t, KL_t, logsumexp_t, ref_logsumexp_t). Terms with p = 0 add 0.
  m.def("full_kl(Tensor logits, Tensor ref_logits, Tensor labels, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_logits = grad_logprobs_t (onehot - p_t) + grad_kl_t p_t (log p_t - log q_t - KL_t).
  m.def("full_kl_backward(Tensor grad_logprobs, Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor labels, "
        "Tensor logsumexp, Tensor ref_logsumexp, Tensor kl, int ignore_index) -> Tensor");

  // ---- STAR (docs/math.md#star-token-weights) ----
  // weights[b, t] = values[b, k] for the first chunk k (in order) with chunk_ends[b, k] > t, i.e. chunk k's value
  // on the tokens at/after the previous end and before its own end; a negative end (-1) marks a padding chunk;
  // tokens at/after the last end get 0. values [B, K] float, chunk_ends [B, K] int64/int32 -> [B, seq_len].
  m.def("star_token_weights(Tensor values, Tensor chunk_ends, int seq_len) -> Tensor");
}
