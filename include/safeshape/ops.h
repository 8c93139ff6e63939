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
};
BuildInfo build_info();

// ---- Safe LoRA (SPEC.md section 1) ----
// (B' = V (V^T B) / ||V||_F in lora_b's dtype, ||V||_F float32), V = aligned - base.
std::tuple<at::Tensor, at::Tensor> project_lora_b(const at::Tensor& aligned, const at::Tensor& base,
                                                  const at::Tensor& lora_b);
// cos(C dW, dW), float64 scalar, Gram form.
at::Tensor lora_cosine(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a);
// C = V V^T / ||V||_F, float32.
at::Tensor alignment_projection_matrix(const at::Tensor& aligned, const at::Tensor& base);

}  // namespace safeshape
