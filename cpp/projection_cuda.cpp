// Torch glue for the CUDA Safe LoRA kernels in cuda/projection.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_glue.h"

namespace safeshape {
namespace {

std::tuple<at::Tensor, at::Tensor> project_lora_b_cuda(const at::Tensor& aligned, const at::Tensor& base,
                                                       const at::Tensor& lora_b) {
  const auto [d_out, d_in, r] = check_projection_args(aligned, base, lora_b, "project_lora_b");
  const c10::cuda::CUDAGuard guard(aligned.device());
  const at::Tensor a = aligned.contiguous();
  const at::Tensor b = base.contiguous();
  const at::Tensor bt = lora_b.to(at::kFloat).contiguous();
  auto f32 = aligned.options().dtype(at::kFloat);
  at::Tensor out = at::empty({d_out, r}, f32);
  at::Tensor v_norm = at::empty({}, f32);
  const size_t ws_bytes = cuda::project_lora_b_workspace_bytes(d_out, d_in, r);
  at::Tensor ws = workspace(ws_bytes, a);
  check_launch(cuda::launch_project_lora_b(to_cuda_dtype(a.scalar_type()), a.const_data_ptr(), b.const_data_ptr(),
                                           bt.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                           v_norm.mutable_data_ptr<float>(), d_out, d_in, r, ws.mutable_data_ptr(),
                                           ws_bytes, current_stream(a)),
               "project_lora_b");
  return {out.to(lora_b.scalar_type()), v_norm};
}

at::Tensor lora_cosine_cuda(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a) {
  check_cosine_args(lora_b, projected_b, lora_a, "lora_cosine");
  TORCH_CHECK(lora_b.size(1) <= cuda::kMaxCosineRank, "lora_cosine: rank ", lora_b.size(1),
              " is above the CUDA kernel's limit of ", cuda::kMaxCosineRank, " (one block per entry of r x r)");
  const c10::cuda::CUDAGuard guard(lora_b.device());
  const at::Tensor B = lora_b.to(at::kDouble).contiguous();
  const at::Tensor P = projected_b.to(at::kDouble).contiguous();
  const at::Tensor A = lora_a.to(at::kDouble).contiguous();
  at::Tensor cosine = at::empty({}, B.options());
  const int64_t r = B.size(1);
  const size_t ws_bytes = cuda::lora_cosine_workspace_bytes(r);
  at::Tensor ws = workspace(ws_bytes, B);
  check_launch(cuda::launch_lora_cosine(B.const_data_ptr<double>(), P.const_data_ptr<double>(),
                                        A.const_data_ptr<double>(), cosine.mutable_data_ptr<double>(), B.size(0),
                                        A.size(1), r, ws.mutable_data_ptr(), ws_bytes, current_stream(B)),
               "lora_cosine");
  return cosine;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CUDA, m) {
  m.impl("project_lora_b", &project_lora_b_cuda);
  m.impl("lora_cosine", &lora_cosine_cuda);
}

}  // namespace safeshape
