// Device-independent torch glue of the token-loss row ops (docs/math.md#dss-loss, docs/math.md#deep-token): argument checks, output
// allocation and the TokenRows a device kernel sees. Each device file (cpp/token_loss_cpu.cpp,
// cpp/token_loss_cuda.cpp) builds one of these calls and runs its kernel on call.rows.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"
#include "token_rows.h"

namespace safeshape::token {

inline bool is_logits_dtype(at::ScalarType t) { return is_weight_dtype(t) || t == at::kDouble; }

// float64 statistics for float64 logits (gradcheck), float32 otherwise.
inline at::ScalarType stat_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: return DType::kFloat32;
  }
}

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [tokens, ...], got shape ", t.sizes());
  TORCH_CHECK(is_logits_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  check_matrix(logits, op, "logits");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one column (the vocabulary), got shape ",
              logits.sizes());
}

// A per-row vector [n] as a contiguous tensor of `dt` on like's device.
inline at::Tensor row_vector(const at::Tensor& t, int64_t n, const at::Tensor& like, at::ScalarType dt,
                             const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "] (one value per row), got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  check_same_device(like, "logits", t, name, op);
  return t.to(dt).contiguous();
}

// labels: integer [n], each in [0, vocab) or equal to ignore_index; returned as contiguous int64. The range is
// checked here only on the CPU: on CUDA reading the verdict back is a host sync (it would block CUDA graph capture),
// so the kernels give NaN for a label outside the range instead.
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t n, int64_t vocab, int64_t ignore_index,
                                 const at::Tensor& like, const char* op) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must have shape [", n,
              "] (one label per row), got ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  check_same_device(like, "logits", labels, "labels", op);
  at::Tensor l = labels.to(at::kLong).contiguous();
  if (n > 0 && l.is_cpu()) {
    const int64_t* p = l.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < vocab), op, ": labels[", i, "] = ", p[i],
                  " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
    }
  }
  return l;
}

// logsumexp is kept in float64 for every logits dtype: at |logits| ~ 1e4 a float32 one is off by ~1e-3, and so
// would be every exp(z - lse) of the backward. The kernels split it into two floats (Split).
inline at::Tensor lse_vector(const at::Tensor& t, int64_t n, const at::Tensor& like, const char* op,
                             const char* name) {
  return row_vector(t, n, like, at::kDouble, op, name);
}

inline TokenRows rows_of(const at::Tensor& z, const at::Tensor& labels, int64_t ignore_index) {
  TokenRows a{};
  a.dtype = kernel_dtype(z.scalar_type());
  a.rows = z.size(0);
  a.vocab = z.size(1);
  a.logits = z.const_data_ptr();
  a.labels = labels.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  return a;
}

// token_logprobs: (logprobs, logsumexp) per row.
struct LogprobsCall {
  at::Tensor z, labels, logprobs, logsumexp;
  TokenRows rows;
  LogprobsCall(const at::Tensor& logits, const at::Tensor& lab, int64_t ignore_index) {
    const char* op = "token_logprobs";
    check_logits(logits, op);
    const int64_t n = logits.size(0);
    labels = checked_labels(lab, n, logits.size(1), ignore_index, logits, op);
    z = logits.contiguous();
    logprobs = at::empty({n}, z.options().dtype(stat_dtype(z)));
    logsumexp = at::empty({n}, z.options().dtype(at::kDouble));
    rows = rows_of(z, labels, ignore_index);
    rows.logprobs = logprobs.mutable_data_ptr();
    rows.logsumexp = logsumexp.mutable_data_ptr<double>();
  }
};

// token_logprobs_backward_: logits (contiguous) are overwritten by grad_logprobs (onehot(y) - softmax).
struct LogprobsBackwardCall {
  at::Tensor g, labels, lse;
  TokenRows rows;
  LogprobsBackwardCall(const at::Tensor& logits, const at::Tensor& grad_logprobs, const at::Tensor& lab,
                       const at::Tensor& logsumexp, int64_t ignore_index) {
    const char* op = "token_logprobs_backward_";
    check_logits(logits, op);
    TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (they are overwritten by the gradient)");
    const int64_t n = logits.size(0);
    labels = checked_labels(lab, n, logits.size(1), ignore_index, logits, op);
    g = row_vector(grad_logprobs, n, logits, stat_dtype(logits), op, "grad_logprobs");
    lse = lse_vector(logsumexp, n, logits, op, "logsumexp");
    rows = rows_of(logits, labels, ignore_index);
    rows.grad_logits = logits.data_ptr();
    rows.grad_logprobs = g.const_data_ptr();
    rows.logsumexp = const_cast<double*>(lse.const_data_ptr<double>());
  }
};

inline void check_ref_logits(const at::Tensor& logits, const at::Tensor& ref_logits, const char* op) {
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), op, ": ref_logits must have the shape of logits ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), op, ": ref_logits must have the dtype of logits (",
              logits.scalar_type(), "), got ", ref_logits.scalar_type());
  check_same_device(logits, "logits", ref_logits, "ref_logits", op);
}

// full_kl: (logprobs, kl, logsumexp, ref_logsumexp) per row.
struct FullKlCall {
  at::Tensor z, r, labels, logprobs, kl, logsumexp, ref_logsumexp;
  TokenRows rows;
  FullKlCall(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& lab, int64_t ignore_index) {
    const char* op = "full_kl";
    check_logits(logits, op);
    check_ref_logits(logits, ref_logits, op);
    const int64_t n = logits.size(0);
    labels = checked_labels(lab, n, logits.size(1), ignore_index, logits, op);
    z = logits.contiguous();
    r = ref_logits.contiguous();
    auto opts = z.options().dtype(stat_dtype(z));
    logprobs = at::empty({n}, opts);
    kl = at::empty({n}, opts);
    logsumexp = at::empty({n}, opts.dtype(at::kDouble));
    ref_logsumexp = at::empty({n}, opts.dtype(at::kDouble));
    rows = rows_of(z, labels, ignore_index);
    rows.ref_logits = r.const_data_ptr();
    rows.logprobs = logprobs.mutable_data_ptr();
    rows.kl = kl.mutable_data_ptr();
    rows.logsumexp = logsumexp.mutable_data_ptr<double>();
    rows.ref_logsumexp = ref_logsumexp.mutable_data_ptr<double>();
  }
};

// full_kl_backward: grad = grad_logprobs (onehot - p) + grad_kl p (log p - log q - KL).
struct FullKlBackwardCall {
  at::Tensor z, r, labels, g_lp, g_kl, lse, rlse, klv, grad;
  TokenRows rows;
  FullKlBackwardCall(const at::Tensor& grad_logprobs, const at::Tensor& grad_kl, const at::Tensor& logits,
                     const at::Tensor& ref_logits, const at::Tensor& lab, const at::Tensor& logsumexp,
                     const at::Tensor& ref_logsumexp, const at::Tensor& kl, int64_t ignore_index) {
    const char* op = "full_kl_backward";
    check_logits(logits, op);
    check_ref_logits(logits, ref_logits, op);
    const int64_t n = logits.size(0);
    const at::ScalarType dt = stat_dtype(logits);
    labels = checked_labels(lab, n, logits.size(1), ignore_index, logits, op);
    g_lp = row_vector(grad_logprobs, n, logits, dt, op, "grad_logprobs");
    g_kl = row_vector(grad_kl, n, logits, dt, op, "grad_kl");
    klv = row_vector(kl, n, logits, dt, op, "kl");
    lse = lse_vector(logsumexp, n, logits, op, "logsumexp");
    rlse = lse_vector(ref_logsumexp, n, logits, op, "ref_logsumexp");
    z = logits.contiguous();
    r = ref_logits.contiguous();
    grad = at::empty_like(z, at::MemoryFormat::Contiguous);
    rows = rows_of(z, labels, ignore_index);
    rows.ref_logits = r.const_data_ptr();
    rows.grad_logits = grad.mutable_data_ptr();
    rows.grad_logprobs = g_lp.const_data_ptr();
    rows.grad_kl = g_kl.const_data_ptr();
    rows.kl = const_cast<void*>(klv.const_data_ptr());
    rows.logsumexp = const_cast<double*>(lse.const_data_ptr<double>());
    rows.ref_logsumexp = const_cast<double*>(rlse.const_data_ptr<double>());
  }
};

}  // namespace safeshape::token
