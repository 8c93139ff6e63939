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

std::tuple<T, T, T> dss_loss(CT logits, CT labels, CT weights, CT ref_logprobs, double kl_coef, int64_t ignore_index) {
  static auto handle = op<std::tuple<T, T, T>(CT, CT, CT, CT, double, int64_t)>("safeshape::dss_loss");
  return handle.call(logits, labels, weights, ref_logprobs, kl_coef, ignore_index);
}

T dss_loss_backward(CT grad_loss, CT logits, CT labels, CT weights, CT ref_logprobs, CT logprobs, CT logsumexp,
                    double kl_coef, int64_t ignore_index) {
  static auto handle = op<T(CT, CT, CT, CT, CT, CT, CT, double, int64_t)>("safeshape::dss_loss_backward");
  return handle.call(grad_loss, logits, labels, weights, ref_logprobs, logprobs, logsumexp, kl_coef, ignore_index);
}

std::tuple<T, T> token_logprobs(CT logits, CT labels, int64_t ignore_index) {
  static auto handle = op<std::tuple<T, T>(CT, CT, int64_t)>("safeshape::token_logprobs");
  return handle.call(logits, labels, ignore_index);
}

std::tuple<T, T, T> fused_linear_dss_loss(CT hidden, CT weight, CT labels, CT weights, CT ref_logprobs,
                                          double kl_coef, int64_t ignore_index, int64_t chunk_rows) {
  static auto handle =
      op<std::tuple<T, T, T>(CT, CT, CT, CT, CT, double, int64_t, int64_t)>("safeshape::fused_linear_dss_loss");
  return handle.call(hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index, chunk_rows);
}

T star_token_weights(CT values, CT chunk_ends, int64_t seq_len) {
  static auto handle = op<T(CT, CT, int64_t)>("safeshape::star_token_weights");
  return handle.call(values, chunk_ends, seq_len);
}

}  // namespace safeshape
