// Torch glue for the CUDA DSS loss row kernels in cuda/dss_loss.cu. The op logic (checks, allocation, the chunk
// loop of the fused ops with at::matmul for the chunk GEMMs) is shared with the CPU in dss_loss_common.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "dss_loss_common.h"

namespace safeshape {
namespace {

using dss::Rows;

const dss::DssRowKernels kCuda{
    &cuda::launch_dss_rows_forward,
    &cuda::launch_dss_rows_backward,
    &cuda::launch_dss_rows_full_kl_forward,
    &cuda::launch_dss_rows_full_kl_backward,
    [](const at::Tensor& t) { return current_stream(t); },
    &check_launch,
};

std::tuple<at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return dss::token_logprobs(kCuda, logits, labels, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dss_loss_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                             const at::Tensor& weights,
                                                             const at::Tensor& ref_logprobs, double kl_coef,
                                                             int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return dss::dss_loss(kCuda, logits, labels, weights, ref_logprobs, kl_coef, ignore_index);
}

at::Tensor dss_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& weights, const at::Tensor& ref_logprobs,
                                  const at::Tensor& logprobs, const at::Tensor& logsumexp, double kl_coef,
                                  int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return dss::dss_loss_backward(kCuda, grad_loss, logits, labels, weights, ref_logprobs, logprobs, logsumexp,
                                kl_coef, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dss_loss_full_kl_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& ref_logits,
    double kl_coef, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return dss::dss_loss_full_kl(kCuda, logits, labels, weights, ref_logits, kl_coef, ignore_index);
}

at::Tensor dss_loss_full_kl_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                          const at::Tensor& labels, const at::Tensor& weights,
                                          const at::Tensor& ref_logits, const at::Tensor& logsumexp,
                                          const at::Tensor& ref_logsumexp, const at::Tensor& kl, double kl_coef,
                                          int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return dss::dss_loss_full_kl_backward(kCuda, grad_loss, logits, labels, weights, ref_logits, logsumexp,
                                        ref_logsumexp, kl, kl_coef, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_token_logprobs_cuda(const at::Tensor& hidden,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& labels, int64_t ignore_index,
                                                                    int64_t chunk_rows) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return dss::fused_linear_token_logprobs(kCuda, hidden, weight, labels, ignore_index, chunk_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logprobs, double kl_coef, int64_t ignore_index, int64_t chunk_rows) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return dss::fused_linear_dss_loss(kCuda, hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index,
                                    chunk_rows);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_dss_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& logprobs,
    const at::Tensor& logsumexp, double kl_coef, int64_t ignore_index, int64_t chunk_rows,
    bool compute_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return dss::fused_linear_dss_loss_backward(kCuda, grad_loss, hidden, weight, labels, weights, ref_logprobs,
                                             logprobs, logsumexp, kl_coef, ignore_index, chunk_rows,
                                             compute_grad_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss_with_grad_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logprobs, const at::Tensor& grad_loss, double kl_coef, int64_t ignore_index,
    int64_t chunk_rows, bool compute_grad_weight) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return dss::fused_linear_dss_loss_with_grad(kCuda, hidden, weight, labels, weights, ref_logprobs, grad_loss,
                                              kl_coef, ignore_index, chunk_rows, compute_grad_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("dss_loss", &dss_loss_cuda);
  m.impl("dss_loss_backward", &dss_loss_backward_cuda);
  m.impl("dss_loss_full_kl", &dss_loss_full_kl_cuda);
  m.impl("dss_loss_full_kl_backward", &dss_loss_full_kl_backward_cuda);
  m.impl("fused_linear_token_logprobs", &fused_linear_token_logprobs_cuda);
  m.impl("fused_linear_dss_loss", &fused_linear_dss_loss_cuda);
  m.impl("fused_linear_dss_loss_backward", &fused_linear_dss_loss_backward_cuda);
  m.impl("fused_linear_dss_loss_with_grad", &fused_linear_dss_loss_with_grad_cuda);
}

}  // namespace safeshape
