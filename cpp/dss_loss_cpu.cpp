// CPU kernels of the DSS loss ops (docs/math.md#dss-gradient). Per row only logsumexp(z) and z[y] are needed:
//   forward:  max, then sum exp(z - max) (two passes over a row that sits in L2), lse = max + log(sum)
//   backward: grad = g c (exp(z - lse) - onehot(y)), one pass, reusing the forward's lse; may run in place
//   full KL:  the same passes over z and the reference row r, plus sum exp(z - mz) ((z - mz) - (r - mr))
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
#include "dss_loss_common.h"

namespace safeshape {
namespace {

using dss::Rows;

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
        at[k] += ez * (dz - (r[j + k] - mr));
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
      tt += ez * (dz - (r[j] - mr));
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
    out[j] = exp_f32(lz) * (a + b * (lz - ((r[j] - rhi) - rlo) - kl));
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
    tt += ez * (dz - (r[j] - mr));
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
    out[j] = std::exp(lz) * (a + b * (lz - ((r[j] - rhi) - rlo) - kl));
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
// lse (float64) as hi + lo in the accumulation dtype
template <typename A>
struct Split {
  A hi, lo;
  explicit Split(double v) : hi(static_cast<A>(v)), lo(static_cast<A>(v - static_cast<double>(hi))) {}
};

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

template <typename A>
A at_row(const void* p, int64_t i) {
  return p ? static_cast<const A*>(p)[i] : A(0);
}

// c_t = w - kl_coef (1 - w) (l - l_ref): dloss/dz = c (softmax - onehot)
inline double dss_coef(double w, double lp, double lref, double kl_coef) {
  return w - kl_coef * (1.0 - w) * (lp - lref);
}

// Rows per task: enough work to amortise the task (about 32K elements).
inline int64_t grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

template <typename T>
void forward_rows(const Rows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  A* lp = static_cast<A*>(a.logprobs);
  double* lse_out = a.logsumexp;
  A* loss = static_cast<A*>(a.loss);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : V);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = a.labels[i];
      if (y == a.ignore_index) {
        lp[i] = A(0);
        lse_out[i] = 0.0;
        if (loss) loss[i] = A(0);
        continue;
      }
      const A* z = load_row(logits + i * V, V, scratch.data());
      const A m = row_max(z, V);
      const double lse = static_cast<double>(m) + std::log(row_sum_exp(z, V, m));
      const double l = static_cast<double>(z[y]) - lse;
      lp[i] = static_cast<A>(l);
      lse_out[i] = lse;
      if (loss) {
        const double w = a.weights ? at_row<A>(a.weights, i) : 1.0;
        const double d = l - static_cast<double>(at_row<A>(a.ref_logprobs, i));
        loss[i] = static_cast<A>(w * -l + a.kl_coef * (1.0 - w) * 0.5 * d * d);
      }
    }
  });
}

template <typename T>
void backward_rows(const Rows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad_logits);
  const A* lp = static_cast<const A*>(a.logprobs);
  const double* lse = a.logsumexp;
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : V);
    for (int64_t i = r0; i < r1; ++i) {
      T* out = grad + i * V;
      const int64_t y = a.labels[i];
      if (y == a.ignore_index) {
        std::fill(out, out + V, T(0));
        continue;
      }
      const double w = a.weights ? at_row<A>(a.weights, i) : 1.0;
      const double l = lp[i];
      const double coef = at_row<A>(a.grad_loss, i) * dss_coef(w, l, at_row<A>(a.ref_logprobs, i), a.kl_coef);
      const A* z = load_row(logits + i * V, V, scratch.data());
      A* o = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) : scratch.data();
      row_scaled_softmax(z, o, V, Split<A>(lse[i]), static_cast<A>(coef));
      o[y] = static_cast<A>(coef * std::expm1(l));  // p_y - 1 from the saved log-probability, no cancellation
      store_row<T>(o, out, V);
    }
  });
}

template <typename T>
void full_kl_forward_rows(const Rows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  const T* ref = static_cast<const T*>(a.ref_logits);
  A* loss = static_cast<A*>(a.loss);
  A* lp = static_cast<A*>(a.logprobs);
  A* kl = static_cast<A*>(a.kl);
  double* lse_out = a.logsumexp;
  double* rlse_out = a.ref_logsumexp;
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : 2 * V);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = a.labels[i];
      if (y == a.ignore_index) {
        loss[i] = lp[i] = kl[i] = A(0);
        lse_out[i] = rlse_out[i] = 0.0;
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
      const double klv = t / sz - log_sz + log_sr;
      const double lse = mz + log_sz;
      const double l = static_cast<double>(z[y]) - lse;
      const double w = at_row<A>(a.weights, i);
      loss[i] = static_cast<A>(w * -l + a.kl_coef * (1.0 - w) * klv);
      lp[i] = static_cast<A>(l);
      kl[i] = static_cast<A>(klv);
      lse_out[i] = lse;
      rlse_out[i] = static_cast<double>(mr) + log_sr;
    }
  });
}

template <typename T>
void full_kl_backward_rows(const Rows& a) {
  using A = acc_t<T>;
  const T* logits = static_cast<const T*>(a.logits);
  const T* ref = static_cast<const T*>(a.ref_logits);
  T* grad = static_cast<T*>(a.grad_logits);
  const double* lse = a.logsumexp;
  const double* rlse = a.ref_logsumexp;
  const A* kl = static_cast<const A*>(a.kl);
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> scratch(std::is_same_v<T, A> ? 0 : 3 * V);
    for (int64_t i = r0; i < r1; ++i) {
      T* out = grad + i * V;
      const int64_t y = a.labels[i];
      if (y == a.ignore_index) {
        std::fill(out, out + V, T(0));
        continue;
      }
      const double g = at_row<A>(a.grad_loss, i), w = at_row<A>(a.weights, i);
      const double ca = g * w, cb = g * a.kl_coef * (1.0 - w);
      const bool conv = !std::is_same_v<T, A>;
      const A* z = load_row(logits + i * V, V, scratch.data());
      const A* r = load_row(ref + i * V, V, conv ? scratch.data() + V : nullptr);
      A* o = conv ? scratch.data() + 2 * V : reinterpret_cast<A*>(out);
      row_kl_grad(z, r, o, V, Split<A>(lse[i]), Split<A>(rlse[i]), kl[i], static_cast<A>(ca), static_cast<A>(cb));
      // label column: g (w (p_y - 1) + kl_coef (1 - w) p_y (log p_y - log q_y - KL)), p_y - 1 by expm1
      const double ly = static_cast<double>(z[y]) - lse[i];
      const double lq = static_cast<double>(r[y]) - rlse[i];
      o[y] = static_cast<A>(ca * std::expm1(ly) + cb * std::exp(ly) * (ly - lq - kl[i]));
      store_row<T>(o, out, V);
    }
  });
}

template <template <typename> class Fn>
int dispatch(const Rows& a) {
  if (a.logits_f64) {
    Fn<double>::run(a);
    return 0;
  }
  switch (a.dtype) {
    case cuda::DType::kFloat32: Fn<float>::run(a); break;
    case cuda::DType::kBFloat16: Fn<c10::BFloat16>::run(a); break;
    case cuda::DType::kFloat16: Fn<c10::Half>::run(a); break;
  }
  return 0;
}

template <typename T> struct Forward { static void run(const Rows& a) { forward_rows<T>(a); } };
template <typename T> struct Backward { static void run(const Rows& a) { backward_rows<T>(a); } };
template <typename T> struct FullKlForward { static void run(const Rows& a) { full_kl_forward_rows<T>(a); } };
template <typename T> struct FullKlBackward { static void run(const Rows& a) { full_kl_backward_rows<T>(a); } };

const dss::DssRowKernels kCpu{
    [](const Rows& a, void*) { return dispatch<Forward>(a); },
    [](const Rows& a, void*) { return dispatch<Backward>(a); },
    [](const Rows& a, void*) { return dispatch<FullKlForward>(a); },
    [](const Rows& a, void*) { return dispatch<FullKlBackward>(a); },
    [](const at::Tensor&) -> void* { return nullptr; },
    [](int err, const char* op) { TORCH_CHECK(err == 0, op, ": CPU kernel failed (", err, ")"); },
};

std::tuple<at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                      int64_t ignore_index) {
  return dss::token_logprobs(kCpu, logits, labels, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dss_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                            const at::Tensor& weights, const at::Tensor& ref_logprobs,
                                                            double kl_coef, int64_t ignore_index) {
  return dss::dss_loss(kCpu, logits, labels, weights, ref_logprobs, kl_coef, ignore_index);
}

at::Tensor dss_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& logprobs,
                                 const at::Tensor& logsumexp, double kl_coef, int64_t ignore_index) {
  return dss::dss_loss_backward(kCpu, grad_loss, logits, labels, weights, ref_logprobs, logprobs, logsumexp, kl_coef,
                                ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dss_loss_full_kl_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& ref_logits,
    double kl_coef, int64_t ignore_index) {
  return dss::dss_loss_full_kl(kCpu, logits, labels, weights, ref_logits, kl_coef, ignore_index);
}

at::Tensor dss_loss_full_kl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& labels, const at::Tensor& weights,
                                         const at::Tensor& ref_logits, const at::Tensor& logsumexp,
                                         const at::Tensor& ref_logsumexp, const at::Tensor& kl, double kl_coef,
                                         int64_t ignore_index) {
  return dss::dss_loss_full_kl_backward(kCpu, grad_loss, logits, labels, weights, ref_logits, logsumexp,
                                        ref_logsumexp, kl, kl_coef, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_token_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const at::Tensor& labels, int64_t ignore_index,
                                                                   int64_t chunk_rows) {
  return dss::fused_linear_token_logprobs(kCpu, hidden, weight, labels, ignore_index, chunk_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logprobs, double kl_coef, int64_t ignore_index, int64_t chunk_rows) {
  return dss::fused_linear_dss_loss(kCpu, hidden, weight, labels, weights, ref_logprobs, kl_coef, ignore_index,
                                    chunk_rows);
}

std::tuple<at::Tensor, at::Tensor> fused_linear_dss_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& weights, const at::Tensor& ref_logprobs, const at::Tensor& logprobs, const at::Tensor& logsumexp,
    double kl_coef, int64_t ignore_index, int64_t chunk_rows, bool compute_grad_weight) {
  return dss::fused_linear_dss_loss_backward(kCpu, grad_loss, hidden, weight, labels, weights, ref_logprobs, logprobs,
                                             logsumexp, kl_coef, ignore_index, chunk_rows, compute_grad_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_dss_loss_with_grad_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& weights,
    const at::Tensor& ref_logprobs, const at::Tensor& grad_loss, double kl_coef, int64_t ignore_index,
    int64_t chunk_rows, bool compute_grad_weight) {
  return dss::fused_linear_dss_loss_with_grad(kCpu, hidden, weight, labels, weights, ref_logprobs, grad_loss, kl_coef,
                                              ignore_index, chunk_rows, compute_grad_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("dss_loss", &dss_loss_cpu);
  m.impl("dss_loss_backward", &dss_loss_backward_cpu);
  m.impl("dss_loss_full_kl", &dss_loss_full_kl_cpu);
  m.impl("dss_loss_full_kl_backward", &dss_loss_full_kl_backward_cpu);
  m.impl("fused_linear_token_logprobs", &fused_linear_token_logprobs_cpu);
  m.impl("fused_linear_dss_loss", &fused_linear_dss_loss_cpu);
  m.impl("fused_linear_dss_loss_backward", &fused_linear_dss_loss_backward_cpu);
  m.impl("fused_linear_dss_loss_with_grad", &fused_linear_dss_loss_with_grad_cpu);
}

}  // namespace safeshape
