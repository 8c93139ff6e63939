// The C++ API of include/safeshape/ops.h: each function calls its op through the dispatcher.
#include "safeshape/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace safeshape {

BuildInfo build_info() {
#ifdef SAFESHAPE_WITH_CUDA
  return {SAFESHAPE_TORCH_VERSION, true, SAFESHAPE_CUDA_VERSION, SAFESHAPE_CUDA_ARCHS};
#else
  return {SAFESHAPE_TORCH_VERSION, false, "", ""};
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

}  // namespace safeshape
