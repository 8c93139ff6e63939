// Device-neutral description of the token-loss row kernels (docs/math.md#dss-loss and docs/math.md#deep-token): plain C++, no torch and no
// CUDA headers, shared by the CPU kernels (cpp/token_loss_cpu.cpp), the CUDA kernels (cuda/token_loss.cu) and the
// torch glue (cpp/token_loss.h).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SAFESHAPE_HOST_DEVICE __host__ __device__
#else
#define SAFESHAPE_HOST_DEVICE
#endif

namespace safeshape {

// Storage dtype of a kernel operand. Statistics are float32, or float64 when the logits are float64.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// A [rows, vocab] block of logits (row-major, row stride = vocab) and its per-row values. A row whose label is
// ignore_index gives 0 outputs and a 0 gradient; a label outside [0, vocab) gives NaN (the glue rejects such labels
// on the CPU; on CUDA it does not read them back, which would need a host sync).
struct TokenRows {
  DType dtype;
  int64_t rows, vocab;
  const void* logits;
  void* grad_logits;            // backward output; may alias logits (the fused ops work in place)
  const int64_t* labels;
  int64_t ignore_index;
  void* logprobs;               // forward: l = z[y] - logsumexp(z)
  double* logsumexp;            // forward output, backward input (float64: see Split)
  const void* grad_logprobs;    // backward: g, grad = g (onehot(y) - softmax(z))
  // full-vocabulary KL(p || q) rows only
  const void* ref_logits;       // [rows, vocab], the logits' dtype
  double* ref_logsumexp;
  void* kl;                     // forward output, backward input
  const void* grad_kl;          // backward: grad += grad_kl p (log p - log q - KL)
};

// A float64 logsumexp as hi + lo in the accumulation dtype A: (z - hi) - lo keeps the digits of z - lse that a
// float32 lse of |z| ~ 1e4 would lose.
template <typename A>
struct Split {
  A hi, lo;
  SAFESHAPE_HOST_DEVICE explicit Split(double v) : hi(static_cast<A>(v)), lo(static_cast<A>(v - static_cast<double>(hi))) {}
  SAFESHAPE_HOST_DEVICE A log_prob(A z) const { return (z - hi) - lo; }
};

}  // namespace safeshape
