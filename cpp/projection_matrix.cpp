// alignment_projection_matrix: the explicit C = V V^T / ||V||_F that the reference Safe LoRA code forms.
// Kept for parity checks and for users who want C; it is a GEMM, so it uses ATen's (BLAS / cuBLAS) on any device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace safeshape {
namespace {

at::Tensor alignment_projection_matrix(const at::Tensor& aligned, const at::Tensor& base) {
  check_weight(aligned, "alignment_projection_matrix", "aligned");
  check_weight(base, "alignment_projection_matrix", "base");
  TORCH_CHECK(aligned.sizes() == base.sizes(), "alignment_projection_matrix: aligned and base must have the same "
              "shape, got ", aligned.sizes(), " and ", base.sizes());
  check_same_device(aligned, "aligned", base, "base", "alignment_projection_matrix");
  const at::Tensor V = aligned.to(at::kFloat) - base.to(at::kFloat);
  const double norm = at::linalg_vector_norm(V, 2, c10::nullopt, false, at::kDouble).item<double>();
  at::Tensor C = at::mm(V, V.t());
  if (norm > 0.0) {
    C.div_(norm);
  } else {
    C.zero_();
  }
  return C;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CPU, m) { m.impl("alignment_projection_matrix", &alignment_projection_matrix); }
TORCH_LIBRARY_IMPL(safeshape, CUDA, m) { m.impl("alignment_projection_matrix", &alignment_projection_matrix); }

}  // namespace safeshape
