// CPU row kernels of the token losses (docs/math.md#dss-loss, docs/math.md#deep-token). Per row only logsumexp(z) and z[y] are needed:
//   logprobs: max, then sum exp(z - max) (two passes over a row that sits in L2), lse = max + log(sum)
//   backward: grad = g (onehot(y) - exp(z - lse)), one pass, reusing the forward's lse; may run in place
//   full KL:  the same passes over z and the reference row r, plus sum exp(z - mz) ((z - mz) - (r - mr)); terms
//             with p = 0 add 0 (a -inf logit would give 0 x -inf = NaN)
// Rows are spread over threads with at::parallel_for; the inner loops are written so that gcc vectorises them
// (16 independent lanes, a branch-free exp) and SAFESHAPE_CLONES builds AVX-512 / AVX2 copies.
// float64 rows (gradcheck) take plain scalar loops with std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "token_loss.h"

namespace safeshape {
namespace {


constexpr int kLanes = 16;        // independent accumulators, one vector register's worth (or two) per loop
constexpr int64_t kBlock = 2048;  // elements summed in float before adding into a double (two-level summation)
constexpr float kExpMin = -87.33654f;  // below this exp(x) is under FLT_MIN: return 0

// exp(x) for x <= 88 (Cephes polynomial, about 1 ulp); branch-free so that loops calling it vectorise.
__attribute__((always_inline)) inline float exp_f32(float x) {
  const float xc = x < kExpMin ? kExpMin : x;
  float fx = xc * 1.44269504088896341f;
  fx = (fx + 12582912.f) - 12582912.f;  // round to nearest integer (|fx| < 2^22)
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t n = static_cast<int32_t>(fx);
  const float y = p * std::bit_cast<float>(static_cast<uint32_t>(n + 127) << 23);
  return x < kExpMin ? 0.f : y;
}

// ---- float32 row primitives (vectorised) ----

SAFESHAPE_CLONES
float max_f32(const float* z, int64_t n) {
  float m[kLanes];
  for (int k = 0; k < kLanes; ++k) m[k] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) m[k] = z[j + k] > m[k] ? z[j + k] : m[k];
  float out = m[0];
  for (int k = 1; k < kLanes; ++k) out = m[k] > out ? m[k] : out;
  for (; j < n; ++j) out = z[j] > out ? z[j] : out;
  return out;
}

// sum_j exp(z[j] - shift)
SAFESHAPE_CLONES
double sum_exp_f32(const float* z, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    float acc[kLanes] = {};
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes)
      for (int k = 0; k < kLanes; ++k) acc[k] += exp_f32(z[j + k] - shift);
    float s = 0.f;
    for (int k = 0; k < kLanes; ++k) s += acc[k];
    for (; j < e; ++j) s += exp_f32(z[j] - shift);
    total += s;
  }
  return total;
}

// (sum_j exp(z[j] - mz), sum_j exp(z[j] - mz) ((z[j] - mz) - (r[j] - mr)))
SAFESHAPE_CLONES
void sum_exp_kl_f32(const float* z, const float* r, int64_t n, float mz, float mr, double* sz, double* t) {
  double tot_s = 0.0, tot_t = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    float as[kLanes] = {}, at[kLanes] = {};
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const float dz = z[j + k] - mz;
        const float ez = exp_f32(dz);
        as[k] += ez;
        at[k] += ez > 0.f ? ez * (dz - (r[j + k] - mr)) : 0.f;
      }
    float s = 0.f, tt = 0.f;
    for (int k = 0; k < kLanes; ++k) {
      s += as[k];
      tt += at[k];
    }
    for (; j < e; ++j) {
      const float dz = z[j] - mz;
      const float ez = exp_f32(dz);
      s += ez;
      tt += ez > 0.f ? ez * (dz - (r[j] - mr)) : 0.f;
    }
    tot_s += s;
    tot_t += tt;
  }
  *sz = tot_s;
  *t = tot_t;
}

// out[j] = coef * exp(z[j] - lse) with lse = hi + lo (hi is near the row max, so z - hi is exact); out may alias z.
SAFESHAPE_CLONES
void scaled_softmax_f32(const float* z, float* out, int64_t n, float hi, float lo, float coef) {
  for (int64_t j = 0; j < n; ++j) out[j] = coef * exp_f32((z[j] - hi) - lo);
}

// out[j] = p_j (a + b ((z_j - lse) - (r_j - rlse) - kl)) with p_j = exp(z_j - lse), both lse split as hi + lo.
SAFESHAPE_CLONES
void kl_grad_f32(const float* __restrict z, const float* __restrict r, float* __restrict out, int64_t n, float hi,
                 float lo, float rhi, float rlo, float kl, float a, float b) {
  for (int64_t j = 0; j < n; ++j) {
    const float lz = (z[j] - hi) - lo;
    const float p = exp_f32(lz);
    out[j] = p > 0.f ? p * (a + b * (lz - ((r[j] - rhi) - rlo) - kl)) : 0.f;
  }
}

SAFESHAPE_CLONES
void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = cpu::bf16_bits_to_float(src[j]);
}

SAFESHAPE_CLONES
void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u = std::bit_cast<uint32_t>(src[j]);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (inputs are finite)
    dst[j] = static_cast<uint16_t>(u >> 16);
  }
}

// ---- float64 row primitives (scalar: for gradcheck and exactness tests) ----

double max_f64(const double* z, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

double sum_exp_f64(const double* z, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(z[j] - shift);
  return s;
}

void sum_exp_kl_f64(const double* z, const double* r, int64_t n, double mz, double mr, double* sz, double* t) {
  double s = 0.0, tt = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double dz = z[j] - mz, ez = std::exp(dz);
    s += ez;
    tt += ez > 0.0 ? ez * (dz - (r[j] - mr)) : 0.0;
  }
  *sz = s;
  *t = tt;
}

void scaled_softmax_f64(const double* z, double* out, int64_t n, double hi, double lo, double coef) {
  for (int64_t j = 0; j < n; ++j) out[j] = coef * std::exp((z[j] - hi) - lo);
}

void kl_grad_f64(const double* z, const double* r, double* out, int64_t n, double hi, double lo, double rhi,
                 double rlo, double kl, double a, double b) {
  for (int64_t j = 0; j < n; ++j) {
    const double lz = (z[j] - hi) - lo;
    const double p = std::exp(lz);
    out[j] = p > 0.0 ? p * (a + b * (lz - ((r[j] - rhi) - rlo) - kl)) : 0.0;
  }
}

inline float row_max(const float* z, int64_t n) { return max_f32(z, n); }
inline double row_max(const double* z, int64_t n) { return max_f64(z, n); }
inline double row_sum_exp(const float* z, int64_t n, float s) { return sum_exp_f32(z, n, s); }
inline double row_sum_exp(const double* z, int64_t n, double s) { return sum_exp_f64(z, n, s); }
inline void row_sum_exp_kl(const float* z, const float* r, int64_t n, float mz, float mr, double* sz, double* t) {
  sum_exp_kl_f32(z, r, n, mz, mr, sz, t);
}
inline void row_sum_exp_kl(const double* z, const double* r, int64_t n, double mz, double mr, double* sz, double* t) {
  sum_exp_kl_f64(z, r, n, mz, mr, sz, t);
}
inline void row_scaled_softmax(const float* z, float* o, int64_t n, Split<float> s, float c) {
  scaled_softmax_f32(z, o, n, s.hi, s.lo, c);
}
inline void row_scaled_softmax(const double* z, double* o, int64_t n, Split<double> s, double c) {
  scaled_softmax_f64(z, o, n, s.hi, s.lo, c);
}
inline void row_kl_grad(const float* z, const float* r, float* o, int64_t n, Split<float> s, Split<float> rs,
                        float kl, float a, float b) {
  kl_grad_f32(z, r, o, n, s.hi, s.lo, rs.hi, rs.lo, kl, a, b);
}
inline void row_kl_grad(const double* z, const double* r, double* o, int64_t n, Split<double> s, Split<double> rs,
                        double kl, double a, double b) {
  kl_grad_f64(z, r, o, n, s.hi, s.lo, rs.hi, rs.lo, kl, a, b);
}

// ---- storage dtype <-> accumulation dtype ----

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The row as acc_t: the storage itself for float / double, else converted into scratch.
template <typename T>
const acc_t<T>* load_row(const T* src, int64_t n, acc_t<T>* scratch) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(src), scratch, n);
    return scratch;
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(src[j]);
    return scratch;
  }
}

template <typename T>
void store_row(const acc_t<T>* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
  }
}

// Rows per task: enough work to amortise the task (about 32K elements).
inline int64_t grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// 0 for an ignored row, NaN for a label outside [0, vocab) (the glue rejects those before a CPU kernel runs).
inline bool skip_row(int64_t y, const TokenRows& a, double* fill) {
  if (y == a.ignore_index) {
    *fill = 0.0;
    return true;
  }
  if (y < 0 || y >= a.vocab) {
    *fill = kNaN;
    return true;
  }
  return false;
}

// Backward: an ignored row gets a 0 gradient, a label outside the vocabulary NaN; true when the row was one of
// those (the CPU twin of cuda/token_loss.cu's fill_skipped_row).
template <typename T>
bool fill_skipped_row(const TokenRows& a, int64_t y, T* out) {
  double fill;
  if (!skip_row(y, a, &fill)) return false;
  std::fill(out, out + a.vocab, static_cast<T>(fill));
  return true;
}

template <typename T>
void logprobs_rows(const TokenRows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  A* lp = static_cast<A*>(a.logprobs);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : V);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = a.labels[i];
      double fill;
      if (skip_row(y, a, &fill)) {
        lp[i] = static_cast<A>(fill);
        a.logsumexp[i] = fill;
        continue;
      }
      const A* z = load_row(logits + i * V, V, scratch.data());
      const A m = row_max(z, V);
      const double lse = static_cast<double>(m) + std::log(row_sum_exp(z, V, m));
      lp[i] = static_cast<A>(static_cast<double>(z[y]) - lse);
      a.logsumexp[i] = lse;
    }
  });
}

template <typename T>
void logprobs_backward_rows(const TokenRows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad_logits);
  const A* g_lp = static_cast<const A*>(a.grad_logprobs);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : V);
    for (int64_t i = r0; i < r1; ++i) {
      T* out = grad + i * V;
      const int64_t y = a.labels[i];
      if (fill_skipped_row(a, y, out)) continue;
      const A* z = load_row(logits + i * V, V, scratch.data());
      const double g = g_lp[i];
      const Split<A> lse(a.logsumexp[i]);
      const double l = static_cast<double>(z[y]) - a.logsumexp[i];  // read before an in-place overwrite
      A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) : scratch.data();
      row_scaled_softmax(z, o, V, lse, static_cast<A>(-g));
      o[y] = static_cast<A>(-g * std::expm1(l));  // g (1 - p_y) from the log-probability, no cancellation
      store_row<T>(o, out, V);
    }
  });
}

template <typename T>
void full_kl_rows(const TokenRows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  const T* ref = static_cast<const T*>(a.ref_logits);
  A* lp = static_cast<A*>(a.logprobs);
  A* kl = static_cast<A*>(a.kl);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : 2 * V);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = a.labels[i];
      double fill;
      if (skip_row(y, a, &fill)) {
        lp[i] = kl[i] = static_cast<A>(fill);
        a.logsumexp[i] = a.ref_logsumexp[i] = fill;
        continue;
      }
      const A* z = load_row(logits + i * V, V, scratch.data());
      const A* r = load_row(ref + i * V, V, scratch.data() + (scratch.empty() ? 0 : V));
      const A mz = row_max(z, V), mr = row_max(r, V);
      double sz, t;
      row_sum_exp_kl(z, r, V, mz, mr, &sz, &t);
      const double log_sr = std::log(row_sum_exp(r, V, mr));
      const double log_sz = std::log(sz);
      // KL = sum_j p_j (log p_j - log q_j), log p_j = z_j - mz - log sz, log q_j = r_j - mr - log sr
      const double lse = mz + log_sz;
      lp[i] = static_cast<A>(static_cast<double>(z[y]) - lse);
      kl[i] = static_cast<A>(t / sz - log_sz + log_sr);
      a.logsumexp[i] = lse;
      a.ref_logsumexp[i] = static_cast<double>(mr) + log_sr;
    }
  });
}

template <typename T>
void full_kl_backward_rows(const TokenRows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  const T* ref = static_cast<const T*>(a.ref_logits);
  T* grad = static_cast<T*>(a.grad_logits);
  const A* kl = static_cast<const A*>(a.kl);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : 3 * V);
    for (int64_t i = r0; i < r1; ++i) {
      T* out = grad + i * V;
      const int64_t y = a.labels[i];
      if (fill_skipped_row(a, y, out)) continue;
      const double ca = -static_cast<const A*>(a.grad_logprobs)[i], cb = static_cast<const A*>(a.grad_kl)[i];
      const bool conv = !std::is_same_v<T, A>;
      const A* z = load_row(logits + i * V, V, scratch.data());
      const A* r = load_row(ref + i * V, V, conv ? scratch.data() + V : nullptr);
      // the label column first (out may alias z): -g_l (p_y - 1) by expm1, + g_kl p_y (log p_y - log q_y - KL)
      const double ly = static_cast<double>(z[y]) - a.logsumexp[i];
      const double lq = static_cast<double>(r[y]) - a.ref_logsumexp[i];
      const double py = std::exp(ly);
      const double at_label = ca * std::expm1(ly) + (py > 0.0 ? cb * py * (ly - lq - kl[i]) : 0.0);
      A* o = conv ? scratch.data() + 2 * V : reinterpret_cast<A*>(out);
      row_kl_grad(z, r, o, V, Split<A>(a.logsumexp[i]), Split<A>(a.ref_logsumexp[i]), kl[i], static_cast<A>(ca),
                  static_cast<A>(cb));
      o[y] = static_cast<A>(at_label);
      store_row<T>(o, out, V);
    }
  });
}

template <template <typename> class Fn>
void dispatch(const TokenRows& a) {
  switch (a.dtype) {
    case DType::kFloat32: Fn<float>::run(a); break;
    case DType::kBFloat16: Fn<c10::BFloat16>::run(a); break;
    case DType::kFloat16: Fn<c10::Half>::run(a); break;
    case DType::kFloat64: Fn<double>::run(a); break;
  }
}

template <typename T> struct Logprobs { static void run(const TokenRows& a) { logprobs_rows<T>(a); } };
template <typename T> struct LogprobsBackward { static void run(const TokenRows& a) { logprobs_backward_rows<T>(a); } };
template <typename T> struct FullKl { static void run(const TokenRows& a) { full_kl_rows<T>(a); } };
template <typename T> struct FullKlBackward { static void run(const TokenRows& a) { full_kl_backward_rows<T>(a); } };

std::tuple<at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                      int64_t ignore_index) {
  token::LogprobsCall c(logits, labels, ignore_index);
  dispatch<Logprobs>(c.rows);
  return {c.logprobs, c.logsumexp};
}

void token_logprobs_backward_cpu(const at::Tensor& logits, const at::Tensor& grad_logprobs, const at::Tensor& labels,
                                 const at::Tensor& logsumexp, int64_t ignore_index) {
  token::LogprobsBackwardCall c(logits, grad_logprobs, labels, logsumexp, ignore_index);
  dispatch<LogprobsBackward>(c.rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> full_kl_cpu(const at::Tensor& logits,
                                                                       const at::Tensor& ref_logits,
                                                                       const at::Tensor& labels, int64_t ignore_index) {
  token::FullKlCall c(logits, ref_logits, labels, ignore_index);
  dispatch<FullKl>(c.rows);
  return {c.logprobs, c.kl, c.logsumexp, c.ref_logsumexp};
}

at::Tensor full_kl_backward_cpu(const at::Tensor& grad_logprobs, const at::Tensor& grad_kl, const at::Tensor& logits,
                                const at::Tensor& ref_logits, const at::Tensor& labels, const at::Tensor& logsumexp,
                                const at::Tensor& ref_logsumexp, const at::Tensor& kl, int64_t ignore_index) {
  token::FullKlBackwardCall c(grad_logprobs, grad_kl, logits, ref_logits, labels, logsumexp, ref_logsumexp, kl,
                              ignore_index);
  dispatch<FullKlBackward>(c.rows);
  return c.grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_cpu);
  m.impl("full_kl", &full_kl_cpu);
  m.impl("full_kl_backward", &full_kl_backward_cpu);
}

}  // namespace safeshape
