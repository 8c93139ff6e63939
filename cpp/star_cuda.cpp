// Torch glue for the CUDA STAR kernel in cuda/star.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "star_checks.h"

namespace safeshape {
namespace {

at::Tensor star_token_weights_cuda(const at::Tensor& values, const at::Tensor& chunk_ends, int64_t seq_len) {
  check_star_token_weights_args(values, chunk_ends, seq_len);
  // the kernel copies 2, 4 or 8 bytes; float8 passes is_floating_point (same message as the CPU kernel's)
  const int64_t elem = values.element_size();
  TORCH_CHECK(elem == 2 || elem == 4 || elem == 8, "star_token_weights: values has an unsupported dtype ",
              values.scalar_type());
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor vals = values.contiguous();
  const at::Tensor ends = chunk_ends.to(at::kLong).contiguous();
  at::Tensor out = at::empty({vals.size(0), seq_len}, vals.options());
  check_launch(cuda::launch_star_token_weights(static_cast<int>(vals.element_size()), vals.const_data_ptr(),
                                               ends.const_data_ptr<int64_t>(), out.mutable_data_ptr(), vals.size(0),
                                               vals.size(1), seq_len, current_stream(vals)),
               "star_token_weights");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CUDA, m) { m.impl("star_token_weights", &star_token_weights_cuda); }

}  // namespace safeshape
