// Torch glue for the CUDA token-loss row kernels in cuda/token_loss.cu; the checks and allocation are shared with
// the CPU in token_loss.h. The lm-head-fused ops and the objectives are device-neutral (cpp/token_loss_ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "token_loss.h"

namespace safeshape {
namespace {

std::tuple<at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  token::LogprobsCall c(logits, labels, ignore_index);
  check_launch(cuda::launch_token_logprobs(c.rows, current_stream(c.z)), "token_logprobs");
  return {c.logprobs, c.logsumexp};
}

void token_logprobs_backward_cuda(const at::Tensor& logits, const at::Tensor& grad_logprobs, const at::Tensor& labels,
                                  const at::Tensor& logsumexp, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  token::LogprobsBackwardCall c(logits, grad_logprobs, labels, logsumexp, ignore_index);
  check_launch(cuda::launch_token_logprobs_backward(c.rows, current_stream(logits)), "token_logprobs_backward_");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> full_kl_cuda(const at::Tensor& logits,
                                                                        const at::Tensor& ref_logits,
                                                                        const at::Tensor& labels,
                                                                        int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  token::FullKlCall c(logits, ref_logits, labels, ignore_index);
  check_launch(cuda::launch_full_kl(c.rows, current_stream(c.z)), "full_kl");
  return {c.logprobs, c.kl, c.logsumexp, c.ref_logsumexp};
}

at::Tensor full_kl_backward_cuda(const at::Tensor& grad_logprobs, const at::Tensor& grad_kl, const at::Tensor& logits,
                                 const at::Tensor& ref_logits, const at::Tensor& labels, const at::Tensor& logsumexp,
                                 const at::Tensor& ref_logsumexp, const at::Tensor& kl, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  token::FullKlBackwardCall c(grad_logprobs, grad_kl, logits, ref_logits, labels, logsumexp, ref_logsumexp, kl,
                              ignore_index);
  check_launch(cuda::launch_full_kl_backward(c.rows, current_stream(c.z)), "full_kl_backward");
  return c.grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_cuda);
  m.impl("full_kl", &full_kl_cuda);
  m.impl("full_kl_backward", &full_kl_backward_cuda);
}

}  // namespace safeshape
