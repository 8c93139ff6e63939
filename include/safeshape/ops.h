// safeshape's C++ API: typed calls of torch.ops.safeshape.* through the dispatcher (so CPU and CUDA tensors both
// work), for training stacks that link libsafeshape_ops directly. Find it with find_package(safeshape); see
// examples/cpp/. Autograd formulas are registered from Python (safeshape.ops); from C++, call the backward ops
// declared here (token_logprobs_backward_, full_kl_backward) or fused_linear_token_loss with compute_grad.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include <string>
#include <string_view>
#include <tuple>

namespace safeshape {

struct BuildInfo {
  std::string torch_version;  // the torch this library was compiled against
  bool cuda;                  // CUDA kernels compiled in
  std::string cuda_version;   // "" without CUDA
  std::string cuda_archs;     // comma-separated compute capabilities, e.g. "8.0,9.0"
  std::string cpu_isa;        // the CPU code path the projection kernels run: avx512, avx2 or generic
                              // (detected, or forced by the environment variable SAFESHAPE_ISA)
};
BuildInfo build_info();

// For benchmarks: fused multiply-adds per second (vector lanes counted) that one thread of the projection kernels'
// code path (cpu_isa) reaches on register-only data, float64 and float32. Runs about 2 x `seconds`.
struct FmaRate {
  double float64;
  double float32;
};
FmaRate cpu_fma_rate(double seconds = 0.02);

// ---- Safe LoRA (docs/math.md#safe-lora) ----
// (B' = V (V^T B) / ||V||_F in lora_b's dtype, ||V||_F float32), V = aligned - base.
std::tuple<at::Tensor, at::Tensor> project_lora_b(const at::Tensor& aligned, const at::Tensor& base,
                                                  const at::Tensor& lora_b);
// cos(C dW, dW), float64 scalar, Gram form.
at::Tensor lora_cosine(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a);
// C = V V^T / ||V||_F, float32.
at::Tensor alignment_projection_matrix(const at::Tensor& aligned, const at::Tensor& base);

// ---- token losses: DSS, SFT, RS, Deep Token (docs/math.md#dss-loss, docs/math.md#deep-token); see cpp/schemas.cpp for the math ----
// Per row of logits [N, V]: (l_t = log softmax(z_t)[y_t] [N], logsumexp [N] float64); ignored rows give 0.
std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                                  int64_t ignore_index = -100);
// In place: logits (contiguous) become grad_logprobs_t (onehot(y_t) - softmax(z_t)).
void token_logprobs_backward_(const at::Tensor& logits, const at::Tensor& grad_logprobs, const at::Tensor& labels,
                              const at::Tensor& logsumexp, int64_t ignore_index = -100);
// (loss_t, dloss_t/dl_t) of objective "logprob" | "sft" | "dss_k2" (params {kl_coef}, or {kl_coef, kl_clamp}: the
// k2 term clamped as OpenRLHF does) | "deep_token" (params: betas).
std::tuple<at::Tensor, at::Tensor> token_objective(const at::Tensor& logprobs, const at::Tensor& labels,
                                                   const std::optional<at::Tensor>& weights,
                                                   const std::optional<at::Tensor>& ref_logprobs,
                                                   const std::optional<at::Tensor>& positions,
                                                   std::string_view objective, c10::ArrayRef<double> params,
                                                   int64_t ignore_index = -100);
// lm-head-fused objective, logits = hidden [N, H] @ weight [V, H]^T one chunk of rows at a time:
// (loss_t, l_t, dloss_t/dl_t, grad_hidden, grad_weight), the gradients those of sum_t loss_t (when compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_token_loss(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& ref_logprobs,
    const std::optional<at::Tensor>& positions, std::string_view objective, c10::ArrayRef<double> params,
    int64_t ignore_index = -100, int64_t chunk_rows = 0, bool compute_grad = false, bool compute_grad_weight = false,
    bool fp32_grad_weight = false);
// Full-vocabulary KL(p_t || q_t) against reference logits: (l_t, KL_t, logsumexp, ref_logsumexp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> full_kl(const at::Tensor& logits,
                                                                   const at::Tensor& ref_logits,
                                                                   const at::Tensor& labels,
                                                                   int64_t ignore_index = -100);
// grad_logits = grad_logprobs (onehot - p) + grad_kl p (log p - log q - KL).
at::Tensor full_kl_backward(const at::Tensor& grad_logprobs, const at::Tensor& grad_kl, const at::Tensor& logits,
                            const at::Tensor& ref_logits, const at::Tensor& labels, const at::Tensor& logsumexp,
                            const at::Tensor& ref_logsumexp, const at::Tensor& kl, int64_t ignore_index = -100);

// ---- STAR (docs/math.md#star-token-weights) ----
// weights [B, seq_len]: chunk k's value on the tokens before chunk_ends[b, k] and at/after the previous end.
at::Tensor star_token_weights(const at::Tensor& values, const at::Tensor& chunk_ends, int64_t seq_len);

}  // namespace safeshape
