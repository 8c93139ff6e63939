// safeshape's C++ API: typed calls of torch.ops.safeshape.* through the dispatcher (so CPU and CUDA tensors both
// work), for training stacks that link libsafeshape_ops directly. Find it with find_package(safeshape); see
// examples/cpp/. Autograd formulas are registered from Python (safeshape.ops); from C++, call the *_backward ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
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

// ---- Safe LoRA (docs/math.md#safe-lora) ----
// (B' = V (V^T B) / ||V||_F in lora_b's dtype, ||V||_F float32), V = aligned - base.
std::tuple<at::Tensor, at::Tensor> project_lora_b(const at::Tensor& aligned, const at::Tensor& base,
                                                  const at::Tensor& lora_b);
// cos(C dW, dW), float64 scalar, Gram form.
at::Tensor lora_cosine(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a);
// C = V V^T / ||V||_F, float32.
at::Tensor alignment_projection_matrix(const at::Tensor& aligned, const at::Tensor& base);

// ---- DSS loss (docs/math.md#dss-loss) ----
// Per row t of logits [N, V]: loss_t = w_t (-l_t) + kl_coef (1 - w_t) 0.5 (l_t - l_ref_t)^2, l_t = log softmax(z_t)[y_t];
// rows with label == ignore_index give 0. Returns (loss [N], logprobs [N], logsumexp [N] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dss_loss(const at::Tensor& logits, const at::Tensor& labels,
                                                        const at::Tensor& weights, const at::Tensor& ref_logprobs,
                                                        double kl_coef, int64_t ignore_index = -100);
// grad_logits = grad_loss_t c_t (softmax(z_t) - onehot(y_t)), reusing dss_loss's logprobs and logsumexp.
at::Tensor dss_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& logprobs,
                             const at::Tensor& logsumexp, double kl_coef, int64_t ignore_index = -100);
// (logprobs [N], logsumexp [N]).
std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                                  int64_t ignore_index = -100);
// lm-head-fused DSS loss: logits = hidden [N, H] @ weight [V, H]^T one chunk of rows at a time (chunk_rows = 0:
// automatic). Returns (loss, logprobs, logsumexp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logprobs, double kl_coef, int64_t ignore_index = -100, int64_t chunk_rows = 0);

// ---- STAR (docs/math.md#star-token-weights) ----
// weights [B, seq_len]: chunk k's value on the tokens before chunk_ends[b, k] and at/after the previous end.
at::Tensor star_token_weights(const at::Tensor& values, const at::Tensor& chunk_ends, int64_t seq_len);

}  // namespace safeshape
