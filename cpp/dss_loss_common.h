// Device-independent torch glue of the DSS loss ops (docs/math.md#dss-loss): argument checks, output allocation and
// the chunk loop of the lm-head-fused ops. Each device supplies its row kernels as a DssRowKernels table
// (cpp/dss_loss_cpu.cpp, cpp/dss_loss_cuda.cpp); the kernels themselves see only raw pointers (cuda::DssRows).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "launchers.h"

namespace safeshape::dss {

using Rows = cuda::DssRows;

// Row kernels of one device; each returns 0 or an error code that check_launch understands.
struct DssRowKernels {
  int (*forward)(const Rows&, void* stream);
  int (*backward)(const Rows&, void* stream);
  int (*full_kl_forward)(const Rows&, void* stream);
  int (*full_kl_backward)(const Rows&, void* stream);
  void* (*stream)(const at::Tensor&);
  void (*check)(int err, const char* op);
};

// The fused ops hold at most this many bytes of float32-equivalent logits per chunk (256 MiB).
constexpr int64_t kChunkBytes = int64_t{256} << 20;

inline bool is_logits_dtype(at::ScalarType t) { return is_weight_dtype(t) || t == at::kDouble; }

// float64 statistics for float64 logits (gradcheck), float32 otherwise.
inline at::ScalarType stat_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [tokens, ...], got shape ", t.sizes());
  TORCH_CHECK(is_logits_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_row_vector(const at::Tensor& t, int64_t n, const at::Tensor& like, const char* op,
                             const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "] (one value per row), got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  check_same_device(like, "logits", t, name, op);
}

// labels: integer [n], each in [0, vocab) or equal to ignore_index. Returns them as contiguous int64.
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t n, int64_t vocab, int64_t ignore_index,
                                 const at::Tensor& like, const char* op) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must have shape [", n,
              "] (one label per row), got ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  check_same_device(like, "logits", labels, "labels", op);
  at::Tensor l = labels.to(at::kLong).contiguous();
  if (n > 0) {
    const at::Tensor bad = l.ne(ignore_index).logical_and(l.lt(0).logical_or(l.ge(vocab)));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
      TORCH_CHECK(false, op, ": labels[", i, "] = ", l[i].item<int64_t>(), " is outside [0, ", vocab,
                  ") and is not ignore_index (", ignore_index, ")");
    }
  }
  return l;
}

inline at::Tensor stat(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }
// logsumexp is kept in float64 for every logits dtype: at |logits| ~ 1e4 a float32 one is off by ~1e-3, and so
// would be every exp(z - lse) of the backward. The kernels split it into two floats (hi + lo).
inline at::Tensor lse_stat(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

template <typename P>
inline P* shift(P* p, int64_t rows, size_t elt) {
  return p ? reinterpret_cast<P*>(reinterpret_cast<std::conditional_t<std::is_const_v<P>, const char*, char*>>(p) +
                                  rows * static_cast<int64_t>(elt))
           : nullptr;
}

// Rows [s, s + n) of a Rows description whose per-row arrays start at row 0.
inline Rows row_slice(const Rows& a, int64_t s, int64_t n) {
  const size_t e = a.logits_f64 ? sizeof(double) : sizeof(float);
  Rows b = a;
  b.rows = n;
  b.labels = a.labels ? a.labels + s : nullptr;
  b.weights = shift(a.weights, s, e);
  b.ref_logprobs = shift(a.ref_logprobs, s, e);
  b.grad_loss = shift(a.grad_loss, s, e);
  b.loss = shift(a.loss, s, e);
  b.logprobs = shift(a.logprobs, s, e);
  b.logsumexp = shift(a.logsumexp, s, sizeof(double));
  b.ref_logsumexp = shift(a.ref_logsumexp, s, sizeof(double));
  b.kl = shift(a.kl, s, e);
  return b;
}

inline cuda::DType row_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kFloat32;  // float32, and float64 (flagged by logits_f64)
  }
}

inline Rows rows_for(const at::Tensor& logits, int64_t n, int64_t vocab) {
  Rows a{};
  a.logits_f64 = logits.scalar_type() == at::kDouble;
  a.dtype = a.logits_f64 ? cuda::DType::kFloat32 : row_dtype(logits.scalar_type());
  a.rows = n;
  a.vocab = vocab;
  return a;
}


// ---- the unfused ops -------------------------------------------------------------------------------------------

// (logprobs, logsumexp) per row.
inline std::tuple<at::Tensor, at::Tensor> token_logprobs(const DssRowKernels& k, const at::Tensor& logits,
                                                         const at::Tensor& labels, int64_t ignore_index) {
  const char* op = "token_logprobs";
  check_matrix(logits, op, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, op, ": logits must have at least one column (the vocabulary), got shape ", logits.sizes());
  const at::Tensor lab = checked_labels(labels, n, vocab, ignore_index, logits, op);
  const at::Tensor z = logits.contiguous();
  auto opts = z.options().dtype(stat_dtype(z));
  at::Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts.dtype(at::kDouble));
  if (n == 0) return {lp, lse};
  Rows a = rows_for(z, n, vocab);
  a.logits = z.const_data_ptr();
  a.labels = lab.const_data_ptr<int64_t>();
  a.logprobs = lp.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.ignore_index = ignore_index;
  k.check(k.forward(a, k.stream(z)), op);
  return {lp, lse};
}

struct LossInputs {
  at::Tensor labels, weights, ref;  // contiguous, labels int64, the others in the statistics dtype
};

inline LossInputs loss_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
                              const at::Tensor& ref_logprobs, int64_t ignore_index, const char* op) {
  check_matrix(logits, op, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, op, ": logits must have at least one column (the vocabulary), got shape ", logits.sizes());
  check_row_vector(weights, n, logits, op, "weights");
  check_row_vector(ref_logprobs, n, logits, op, "ref_logprobs");
  const at::ScalarType dt = stat_dtype(logits);
  return {checked_labels(labels, n, vocab, ignore_index, logits, op), stat(weights, dt), stat(ref_logprobs, dt)};
}

// (loss, logprobs, logsumexp) per row.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dss_loss(const DssRowKernels& k, const at::Tensor& logits,
                                                               const at::Tensor& labels, const at::Tensor& weights,
                                                               const at::Tensor& ref_logprobs, double kl_coef,
                                                               int64_t ignore_index) {
  const char* op = "dss_loss";
  const LossInputs in = loss_inputs(logits, labels, weights, ref_logprobs, ignore_index, op);
  const at::Tensor z = logits.contiguous();
  const int64_t n = z.size(0);
  auto opts = z.options().dtype(stat_dtype(z));
  at::Tensor loss = at::empty({n}, opts), lp = at::empty({n}, opts), lse = at::empty({n}, opts.dtype(at::kDouble));
  if (n == 0) return {loss, lp, lse};
  Rows a = rows_for(z, n, z.size(1));
  a.logits = z.const_data_ptr();
  a.labels = in.labels.const_data_ptr<int64_t>();
  a.weights = in.weights.const_data_ptr();
  a.ref_logprobs = in.ref.const_data_ptr();
  a.loss = loss.mutable_data_ptr();
  a.logprobs = lp.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  k.check(k.forward(a, k.stream(z)), op);
  return {loss, lp, lse};
}

inline at::Tensor dss_loss_backward(const DssRowKernels& k, const at::Tensor& grad_loss, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& weights,
                                    const at::Tensor& ref_logprobs, const at::Tensor& logprobs,
                                    const at::Tensor& logsumexp, double kl_coef, int64_t ignore_index) {
  const char* op = "dss_loss_backward";
  const LossInputs in = loss_inputs(logits, labels, weights, ref_logprobs, ignore_index, op);
  const at::Tensor z = logits.contiguous();
  const int64_t n = z.size(0);
  check_row_vector(grad_loss, n, z, op, "grad_loss");
  check_row_vector(logprobs, n, z, op, "logprobs");
  check_row_vector(logsumexp, n, z, op, "logsumexp");
  const at::ScalarType dt = stat_dtype(z);
  const at::Tensor g = stat(grad_loss, dt), lp = stat(logprobs, dt), lse = lse_stat(logsumexp);
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (n == 0) return grad;
  Rows a = rows_for(z, n, z.size(1));
  a.logits = z.const_data_ptr();
  a.grad_logits = grad.mutable_data_ptr();
  a.labels = in.labels.const_data_ptr<int64_t>();
  a.weights = in.weights.const_data_ptr();
  a.ref_logprobs = in.ref.const_data_ptr();
  a.grad_loss = g.const_data_ptr();
  a.logprobs = const_cast<void*>(lp.const_data_ptr());
  a.logsumexp = const_cast<double*>(lse.const_data_ptr<double>());
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  k.check(k.backward(a, k.stream(z)), op);
  return grad;
}

// ---- full-vocabulary KL ----------------------------------------------------------------------------------------

inline void check_ref_logits(const at::Tensor& logits, const at::Tensor& ref_logits, const char* op) {
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), op, ": ref_logits must have the shape of logits ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), op, ": ref_logits must have the dtype of logits (",
              logits.scalar_type(), "), got ", ref_logits.scalar_type());
  check_same_device(logits, "logits", ref_logits, "ref_logits", op);
}

// (loss, logprobs, kl, logsumexp, ref_logsumexp) per row.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dss_loss_full_kl(
    const DssRowKernels& k, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logits, double kl_coef, int64_t ignore_index) {
  const char* op = "dss_loss_full_kl";
  check_matrix(logits, op, "logits");
  check_ref_logits(logits, ref_logits, op);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, op, ": logits must have at least one column (the vocabulary), got shape ", logits.sizes());
  check_row_vector(weights, n, logits, op, "weights");
  const at::Tensor lab = checked_labels(labels, n, vocab, ignore_index, logits, op);
  const at::ScalarType dt = stat_dtype(logits);
  const at::Tensor w = stat(weights, dt);
  const at::Tensor z = logits.contiguous(), r = ref_logits.contiguous();
  auto opts = z.options().dtype(dt);
  at::Tensor loss = at::empty({n}, opts), lp = at::empty({n}, opts), kl = at::empty({n}, opts);
  at::Tensor lse = at::empty({n}, opts.dtype(at::kDouble)), rlse = at::empty({n}, opts.dtype(at::kDouble));
  if (n == 0) return {loss, lp, kl, lse, rlse};
  Rows a = rows_for(z, n, vocab);
  a.logits = z.const_data_ptr();
  a.ref_logits = r.const_data_ptr();
  a.labels = lab.const_data_ptr<int64_t>();
  a.weights = w.const_data_ptr();
  a.loss = loss.mutable_data_ptr();
  a.logprobs = lp.mutable_data_ptr();
  a.kl = kl.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.ref_logsumexp = rlse.mutable_data_ptr<double>();
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  k.check(k.full_kl_forward(a, k.stream(z)), op);
  return {loss, lp, kl, lse, rlse};
}

inline at::Tensor dss_loss_full_kl_backward(const DssRowKernels& k, const at::Tensor& grad_loss,
                                            const at::Tensor& logits, const at::Tensor& labels,
                                            const at::Tensor& weights, const at::Tensor& ref_logits,
                                            const at::Tensor& logsumexp, const at::Tensor& ref_logsumexp,
                                            const at::Tensor& kl, double kl_coef, int64_t ignore_index) {
  const char* op = "dss_loss_full_kl_backward";
  check_matrix(logits, op, "logits");
  check_ref_logits(logits, ref_logits, op);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_row_vector(weights, n, logits, op, "weights");
  check_row_vector(grad_loss, n, logits, op, "grad_loss");
  check_row_vector(logsumexp, n, logits, op, "logsumexp");
  check_row_vector(ref_logsumexp, n, logits, op, "ref_logsumexp");
  check_row_vector(kl, n, logits, op, "kl");
  const at::Tensor lab = checked_labels(labels, n, vocab, ignore_index, logits, op);
  const at::ScalarType dt = stat_dtype(logits);
  const at::Tensor w = stat(weights, dt), g = stat(grad_loss, dt), lse = lse_stat(logsumexp),
                   rlse = lse_stat(ref_logsumexp), klr = stat(kl, dt);
  const at::Tensor z = logits.contiguous(), r = ref_logits.contiguous();
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (n == 0) return grad;
  Rows a = rows_for(z, n, vocab);
  a.logits = z.const_data_ptr();
  a.ref_logits = r.const_data_ptr();
  a.grad_logits = grad.mutable_data_ptr();
  a.labels = lab.const_data_ptr<int64_t>();
  a.weights = w.const_data_ptr();
  a.grad_loss = g.const_data_ptr();
  a.logsumexp = const_cast<double*>(lse.const_data_ptr<double>());
  a.ref_logsumexp = const_cast<double*>(rlse.const_data_ptr<double>());
  a.kl = const_cast<void*>(klr.const_data_ptr());
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  k.check(k.full_kl_backward(a, k.stream(z)), op);
  return grad;
}

// ---- the lm-head-fused ops: logits exist one chunk of rows at a time -----------------------------------------

struct FusedInputs {
  at::Tensor hidden, weight, labels, weights, ref;
  int64_t n, vocab, chunk;
};

// weights / ref_logprobs may be undefined (token logprobs only).
inline FusedInputs fused_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                const at::Tensor* weights, const at::Tensor* ref_logprobs, int64_t ignore_index,
                                int64_t chunk_rows, const char* op) {
  check_matrix(hidden, op, "hidden");
  check_matrix(weight, op, "weight");
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight is [vocab, hidden] = ", weight.sizes(),
              " but hidden has ", hidden.size(1), " columns");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight (", weight.scalar_type(),
              ") and hidden (", hidden.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row (the vocabulary), got shape ",
              weight.sizes());
  check_same_device(hidden, "hidden", weight, "weight", op);
  TORCH_CHECK(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0 = automatic), got ", chunk_rows);
  FusedInputs in;
  in.n = hidden.size(0);
  in.vocab = weight.size(0);
  in.hidden = hidden.contiguous();
  in.weight = weight.contiguous();
  in.labels = checked_labels(labels, in.n, in.vocab, ignore_index, hidden, op);
  const at::ScalarType dt = stat_dtype(hidden);
  if (weights) {
    check_row_vector(*weights, in.n, hidden, op, "weights");
    in.weights = stat(*weights, dt);
  }
  if (ref_logprobs) {
    check_row_vector(*ref_logprobs, in.n, hidden, op, "ref_logprobs");
    in.ref = stat(*ref_logprobs, dt);
  }
  const int64_t auto_rows = std::max<int64_t>(1, kChunkBytes / (in.vocab * 4));
  in.chunk = std::max<int64_t>(1, std::min(in.n, chunk_rows > 0 ? chunk_rows : auto_rows));
  return in;
}

inline Rows fused_rows(const FusedInputs& in) {
  Rows a = rows_for(in.hidden, in.n, in.vocab);
  a.labels = in.labels.const_data_ptr<int64_t>();
  a.weights = in.weights.defined() ? in.weights.const_data_ptr() : nullptr;
  a.ref_logprobs = in.ref.defined() ? in.ref.const_data_ptr() : nullptr;
  return a;
}

// Forward over chunks; with grad_loss defined also the backward of sum_t grad_loss[t] * loss[t] in the same pass
// (grad_hidden, grad_weight), so the logits of each chunk are computed once.
inline void fused_pass(const DssRowKernels& k, const FusedInputs& in, Rows a, const at::Tensor* grad_hidden,
                       at::Tensor* grad_weight, bool forward, bool backward, const char* op) {
  // One logits buffer for every chunk: a fresh one per chunk costs its page faults (or allocator churn) each time.
  at::Tensor zbuf = at::empty({in.chunk, in.vocab}, in.hidden.options());
  for (int64_t s = 0; s < in.n; s += in.chunk) {
    const int64_t m = std::min(in.chunk, in.n - s);
    const at::Tensor h = in.hidden.narrow(0, s, m);
    at::Tensor z = zbuf.narrow(0, 0, m);  // [m, vocab], the only logits that exist
    at::mm_out(z, h, in.weight.t());
    Rows c = row_slice(a, s, m);
    c.logits = z.const_data_ptr();
    void* stream = k.stream(z);
    if (forward) k.check(k.forward(c, stream), op);
    if (!backward) continue;
    c.grad_logits = z.mutable_data_ptr();  // the gradient overwrites the chunk's logits in place
    k.check(k.backward(c, stream), op);
    at::Tensor gh = grad_hidden->narrow(0, s, m);
    at::mm_out(gh, z, in.weight);
    if (grad_weight) grad_weight->addmm_(z.t(), h);
  }
}

// (logprobs, logsumexp)
inline std::tuple<at::Tensor, at::Tensor> fused_linear_token_logprobs(const DssRowKernels& k,
                                                                      const at::Tensor& hidden,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& labels, int64_t ignore_index,
                                                                      int64_t chunk_rows) {
  const char* op = "fused_linear_token_logprobs";
  const FusedInputs in = fused_inputs(hidden, weight, labels, nullptr, nullptr, ignore_index, chunk_rows, op);
  auto opts = in.hidden.options().dtype(stat_dtype(in.hidden));
  at::Tensor lp = at::empty({in.n}, opts), lse = at::empty({in.n}, opts.dtype(at::kDouble));
  Rows a = fused_rows(in);
  a.logprobs = lp.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.ignore_index = ignore_index;
  fused_pass(k, in, a, nullptr, nullptr, true, false, op);
  return {lp, lse};
}

// (loss, logprobs, logsumexp)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss(
    const DssRowKernels& k, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& weights, const at::Tensor& ref_logprobs, double kl_coef, int64_t ignore_index,
    int64_t chunk_rows) {
  const char* op = "fused_linear_dss_loss";
  const FusedInputs in = fused_inputs(hidden, weight, labels, &weights, &ref_logprobs, ignore_index, chunk_rows, op);
  auto opts = in.hidden.options().dtype(stat_dtype(in.hidden));
  at::Tensor loss = at::empty({in.n}, opts), lp = at::empty({in.n}, opts);
  at::Tensor lse = at::empty({in.n}, opts.dtype(at::kDouble));
  Rows a = fused_rows(in);
  a.loss = loss.mutable_data_ptr();
  a.logprobs = lp.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  fused_pass(k, in, a, nullptr, nullptr, true, false, op);
  return {loss, lp, lse};
}

// (grad_hidden, grad_weight) of sum_t grad_loss[t] * loss[t]; the logits are recomputed chunk by chunk.
inline std::tuple<at::Tensor, at::Tensor> fused_linear_dss_loss_backward(
    const DssRowKernels& k, const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& logprobs,
    const at::Tensor& logsumexp, double kl_coef, int64_t ignore_index, int64_t chunk_rows,
    bool compute_grad_weight) {
  const char* op = "fused_linear_dss_loss_backward";
  const FusedInputs in = fused_inputs(hidden, weight, labels, &weights, &ref_logprobs, ignore_index, chunk_rows, op);
  check_row_vector(grad_loss, in.n, hidden, op, "grad_loss");
  check_row_vector(logprobs, in.n, hidden, op, "logprobs");
  check_row_vector(logsumexp, in.n, hidden, op, "logsumexp");
  const at::ScalarType dt = stat_dtype(in.hidden);
  const at::Tensor g = stat(grad_loss, dt), lp = stat(logprobs, dt), lse = lse_stat(logsumexp);
  at::Tensor grad_hidden = at::empty_like(in.hidden);
  at::Tensor grad_weight = compute_grad_weight ? at::zeros_like(in.weight) : in.weight.new_empty({0});
  Rows a = fused_rows(in);
  a.grad_loss = g.const_data_ptr();
  a.logprobs = const_cast<void*>(lp.const_data_ptr());
  a.logsumexp = const_cast<double*>(lse.const_data_ptr<double>());
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  fused_pass(k, in, a, &grad_hidden, compute_grad_weight ? &grad_weight : nullptr, false, true, op);
  return {grad_hidden, grad_weight};
}

// (loss, logprobs, grad_hidden, grad_weight): forward and the backward of sum_t grad_loss[t] * loss[t] in one pass
// (three GEMMs in all). Right when the upstream gradient is known before the forward, as for a summed loss.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss_with_grad(
    const DssRowKernels& k, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& grad_loss, double kl_coef,
    int64_t ignore_index, int64_t chunk_rows, bool compute_grad_weight) {
  const char* op = "fused_linear_dss_loss_with_grad";
  const FusedInputs in = fused_inputs(hidden, weight, labels, &weights, &ref_logprobs, ignore_index, chunk_rows, op);
  check_row_vector(grad_loss, in.n, hidden, op, "grad_loss");
  const at::ScalarType dt = stat_dtype(in.hidden);
  const at::Tensor g = stat(grad_loss, dt);
  auto opts = in.hidden.options().dtype(dt);
  at::Tensor loss = at::empty({in.n}, opts), lp = at::empty({in.n}, opts);
  at::Tensor lse = at::empty({in.n}, opts.dtype(at::kDouble));
  at::Tensor grad_hidden = at::empty_like(in.hidden);
  at::Tensor grad_weight = compute_grad_weight ? at::zeros_like(in.weight) : in.weight.new_empty({0});
  Rows a = fused_rows(in);
  a.grad_loss = g.const_data_ptr();
  a.loss = loss.mutable_data_ptr();
  a.logprobs = lp.mutable_data_ptr();
  a.logsumexp = lse.mutable_data_ptr<double>();
  a.kl_coef = kl_coef;
  a.ignore_index = ignore_index;
  fused_pass(k, in, a, &grad_hidden, compute_grad_weight ? &grad_weight : nullptr, true, true, op);
  return {loss, lp, grad_hidden, grad_weight};
}

}  // namespace safeshape::dss
