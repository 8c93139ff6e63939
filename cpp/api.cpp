// The C++ API of include/safeshape/ops.h: each function calls its op through the dispatcher.
#include "safeshape/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu_kernels.h"

namespace safeshape {

BuildInfo build_info() {
  const char* isa = cpu::isa_name(cpu::active_isa());
#ifdef SAFESHAPE_WITH_CUDA
  return {SAFESHAPE_TORCH_VERSION, true, SAFESHAPE_CUDA_VERSION, SAFESHAPE_CUDA_ARCHS, isa};
#else
  return {SAFESHAPE_TORCH_VERSION, false, "", "", isa};
#endif
}

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> project_lora_b(const at::Tensor& aligned, const at::Tensor& base,
                                                  const at::Tensor& lora_b) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&)>("safeshape::project_lora_b");
  return handle.call(aligned, base, lora_b);
}

at::Tensor lora_cosine(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("safeshape::lora_cosine");
  return handle.call(lora_b, projected_b, lora_a);
}

at::Tensor alignment_projection_matrix(const at::Tensor& aligned, const at::Tensor& base) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&)>("safeshape::alignment_projection_matrix");
  return handle.call(aligned, base);
}

using T = at::Tensor;
using CT = const at::Tensor&;

std::tuple<T, T> token_logprobs(CT logits, CT labels, int64_t ignore_index) {
  static auto handle = op<std::tuple<T, T>(CT, CT, int64_t)>("safeshape::token_logprobs");
  return handle.call(logits, labels, ignore_index);
}

void token_logprobs_backward_(CT logits, CT grad_logprobs, CT labels, CT logsumexp, int64_t ignore_index) {
  static auto handle = op<void(CT, CT, CT, CT, int64_t)>("safeshape::token_logprobs_backward_");
  handle.call(logits, grad_logprobs, labels, logsumexp, ignore_index);
}

using OT = const std::optional<at::Tensor>&;

std::tuple<T, T> token_objective(CT logprobs, CT labels, OT weights, OT ref_logprobs, OT positions,
                                 std::string_view objective, c10::ArrayRef<double> params, int64_t ignore_index) {
  static auto handle = op<std::tuple<T, T>(CT, CT, OT, OT, OT, c10::string_view, c10::ArrayRef<double>, int64_t)>(
      "safeshape::token_objective");
  return handle.call(logprobs, labels, weights, ref_logprobs, positions,
                     c10::string_view(objective.data(), objective.size()), params, ignore_index);
}

std::tuple<T, T, T, T, T> fused_linear_token_loss(CT hidden, CT weight, CT labels, OT weights, OT ref_logprobs,
                                                  OT positions, std::string_view objective,
                                                  c10::ArrayRef<double> params, int64_t ignore_index,
                                                  int64_t chunk_rows, bool compute_grad, bool compute_grad_weight,
                                                  bool fp32_grad_weight) {
  static auto handle = op<std::tuple<T, T, T, T, T>(CT, CT, CT, OT, OT, OT, c10::string_view, c10::ArrayRef<double>,
                                                    int64_t, int64_t, bool, bool, bool)>(
      "safeshape::fused_linear_token_loss");
  return handle.call(hidden, weight, labels, weights, ref_logprobs, positions,
                     c10::string_view(objective.data(), objective.size()), params, ignore_index, chunk_rows,
                     compute_grad, compute_grad_weight, fp32_grad_weight);
}

std::tuple<T, T, T, T> full_kl(CT logits, CT ref_logits, CT labels, int64_t ignore_index) {
  static auto handle = op<std::tuple<T, T, T, T>(CT, CT, CT, int64_t)>("safeshape::full_kl");
  return handle.call(logits, ref_logits, labels, ignore_index);
}

T full_kl_backward(CT grad_logprobs, CT grad_kl, CT logits, CT ref_logits, CT labels, CT logsumexp,
                   CT ref_logsumexp, CT kl, int64_t ignore_index) {
  static auto handle = op<T(CT, CT, CT, CT, CT, CT, CT, CT, int64_t)>("safeshape::full_kl_backward");
  return handle.call(grad_logprobs, grad_kl, logits, ref_logits, labels, logsumexp, ref_logsumexp, kl, ignore_index);
}

T star_token_weights(CT values, CT chunk_ends, int64_t seq_len) {
  static auto handle = op<T(CT, CT, int64_t)>("safeshape::star_token_weights");
  return handle.call(values, chunk_ends, seq_len);
}

}  // namespace safeshape
