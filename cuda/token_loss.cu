// CUDA row kernels of the token losses (docs/math.md#dss-loss, docs/math.md#deep-token). One block per row of logits:
//   logprobs: each thread keeps an online (max, sum exp) over its elements (16-byte vector loads), the block
//             merges the pairs; thread 0 forms lse and l = z[y] - lse.
//   backward: grad = g (onehot(y) - exp(z - lse)), one pass with vector loads and stores; may run in place.
//   full KL:  pass 1 online logsumexp of z and of the reference r, pass 2 sum p (log p - log q) over the row
//             (the row is re-read from L2); the backward is one pass. Terms with p = 0 add 0 (not 0 x -inf).
// NaN logits give NaN results, as on the CPU.
// Accumulation is float32 for float32 / bfloat16 / float16 logits and float64 for float64 logits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "block_reduce.cuh"
#include "launchers.h"

namespace safeshape::cuda {
namespace {

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float expm1_(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Elements [0, head) and [head + nvec * kN, V) are scalar; the middle is read 16 bytes at a time.
template <typename T>
struct RowSplit {
  int64_t head, nvec, tail_begin;
  __device__ RowSplit(const T* row, int64_t V) {
    constexpr int kN = Pack<T>::kN;
    const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(T));
    head = mis ? min(V, static_cast<int64_t>(kN) - mis) : 0;
    nvec = (V - head) / kN;
    tail_begin = head + nvec * kN;
  }
};

// f(j, x) for every element x = row[j] of this block's row, spread over the block's threads.
template <typename T, typename F>
__device__ __forceinline__ void row_visit(const T* __restrict__ row, int64_t V, F&& f) {
  constexpr int kN = Pack<T>::kN;
  const RowSplit<T> sp(row, V);
  for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) f(j, to_float(row[j]));
  const Pack<T>* vec = reinterpret_cast<const Pack<T>*>(row + sp.head);
  for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
    const Pack<T> p = vec[q];
#pragma unroll
    for (int k = 0; k < kN; ++k) f(sp.head + q * kN + k, to_float(p.v[k]));
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) f(j, to_float(row[j]));
}

template <typename T>
__device__ __forceinline__ T store_cast(typename Acc<T>::type x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return from_acc<T>(x);
  }
}

// out[j] = f(j, in[j]); in and out share their alignment (same row offsets), out may alias in.
template <typename T, typename F>
__device__ __forceinline__ void row_map(const T* in, T* out, int64_t V, F&& f) {
  constexpr int kN = Pack<T>::kN;
  const RowSplit<T> sp(in, V);
  const bool out_aligned = ((reinterpret_cast<uintptr_t>(out) ^ reinterpret_cast<uintptr_t>(in)) & 15) == 0;
  if (!out_aligned) {  // different alignment: scalar (never the case for rows of one allocation pattern)
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = store_cast<T>(f(j, to_float(in[j])));
    return;
  }
  for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) out[j] = store_cast<T>(f(j, to_float(in[j])));
  const Pack<T>* vin = reinterpret_cast<const Pack<T>*>(in + sp.head);
  Pack<T>* vout = reinterpret_cast<Pack<T>*>(out + sp.head);
  for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
    const Pack<T> p = vin[q];
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < kN; ++k) o.v[k] = store_cast<T>(f(sp.head + q * kN + k, to_float(p.v[k])));
    vout[q] = o;
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) out[j] = store_cast<T>(f(j, to_float(in[j])));
}

// Online logsumexp state: sum of exp(x - m).
template <typename A>
struct Lse {
  A m, s;
  __device__ void init() {
    m = -INFINITY;
    s = A(0);
  }
  __device__ void add(A x) {
    if (x > m) {
      s = s * exp_(m - x) + A(1);
      m = x;
    } else if (x != -INFINITY) {  // a masked -inf logit adds 0 (-inf - -inf would be NaN); a NaN makes s NaN
      s += exp_(x - m);
    }
  }
  // s is NaN once a NaN was added; with m still -inf (a thread that saw only NaN and -inf) that NaN must survive
  // the merge, so the -inf sides add their s (0 or NaN) instead of being dropped
  __device__ void merge(A om, A os) {
    if (om == -INFINITY) {
      s += os;
      return;
    }
    if (m == -INFINITY) {
      m = om;
      s += os;
      return;
    }
    const A nm = m > om ? m : om;
    s = s * exp_(m - nm) + os * exp_(om - nm);
    m = nm;
  }
};

// Block-wide merge of the threads' Lse; every thread gets m + log(s) in float64 (m is a logit, log(s) is small:
// their float64 sum keeps the digits a float32 lse of |z| ~ 1e4 would lose). A row whose maximum is not finite (all
// -inf, or a +inf) gives NaN, as on the CPU (max + log(sum exp(z - max)) with exp(-inf - -inf) = exp(inf - inf) = NaN).
template <typename A>
__device__ double block_lse(Lse<A> st) {
  __shared__ A sm[kThreads / 32], ss[kThreads / 32];
  __shared__ double result;
  for (int o = 16; o > 0; o >>= 1) st.merge(warp_shfl_xor(st.m, o), warp_shfl_xor(st.s, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Lse<A> t;
    t.init();
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t.merge(sm[w], ss[w]);
    result = isfinite(t.m) ? static_cast<double>(t.m) + static_cast<double>(log_(t.s)) : static_cast<double>(NAN);
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ bool bad_label(int64_t y, int64_t vocab) {
  return y < 0 || y >= vocab;
}

// Backward: an ignored row gets a 0 gradient, a label outside the vocabulary NaN; true when the row was one of those.
template <typename T>
__device__ bool fill_skipped_row(const TokenRows& a, int64_t y, const T* row, T* out) {
  using A = typename Acc<T>::type;
  if (y != a.ignore_index && !bad_label(y, a.vocab)) return false;
  const A fill = y == a.ignore_index ? A(0) : A(NAN);
  row_map(row, out, a.vocab, [fill](int64_t, A) { return fill; });
  return true;
}

template <typename T>
__global__ void logprobs_kernel(TokenRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  A* lp = static_cast<A*>(a.logprobs);
  if (y == a.ignore_index || bad_label(y, a.vocab)) {
    if (threadIdx.x == 0) {
      const bool ignored = y == a.ignore_index;
      lp[i] = ignored ? A(0) : A(NAN);
      a.logsumexp[i] = ignored ? 0.0 : NAN;
    }
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + i * a.vocab;
  Lse<A> st;
  st.init();
  row_visit(row, a.vocab, [&](int64_t, A x) { st.add(x); });
  const double lse = block_lse(st);
  if (threadIdx.x == 0) {
    lp[i] = static_cast<A>(static_cast<double>(to_float(row[y])) - lse);
    a.logsumexp[i] = lse;
  }
}

template <typename T>
__global__ void logprobs_backward_kernel(TokenRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  const T* row = static_cast<const T*>(a.logits) + i * V;
  T* out = static_cast<T*>(a.grad_logits) + i * V;
  if (fill_skipped_row(a, y, row, out)) return;
  const Split<A> lse(a.logsumexp[i]);
  const A g = static_cast<const A*>(a.grad_logprobs)[i];
  const A l = lse.log_prob(to_float(row[y]));
  __syncthreads();  // every thread has read z[y] before the row is overwritten (in place)
  const A at_label = -g * expm1_(l);  // g (1 - p_y), no cancellation
  row_map(row, out, V, [&](int64_t j, A x) { return j == y ? at_label : -g * exp_(lse.log_prob(x)); });
}

template <typename T>
__global__ void full_kl_kernel(TokenRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  A* lp = static_cast<A*>(a.logprobs);
  A* kl = static_cast<A*>(a.kl);
  if (y == a.ignore_index || bad_label(y, V)) {
    if (threadIdx.x == 0) {
      const A fill = y == a.ignore_index ? A(0) : A(NAN);
      lp[i] = kl[i] = fill;
      a.logsumexp[i] = a.ref_logsumexp[i] = static_cast<double>(fill);
    }
    return;
  }
  const T* z = static_cast<const T*>(a.logits) + i * V;
  const T* r = static_cast<const T*>(a.ref_logits) + i * V;
  Lse<A> sz, sr;
  sz.init();
  sr.init();
  row_visit(z, V, [&](int64_t, A x) { sz.add(x); });
  row_visit(r, V, [&](int64_t, A x) { sr.add(x); });
  const double lse_d = block_lse(sz);
  const double rlse_d = block_lse(sr);
  const Split<A> lse(lse_d), rlse(rlse_d);
  // KL = sum_j p_j ((z_j - lse) - (r_j - rlse)); p_j = 0 adds 0 (a -inf logit would give 0 x -inf = NaN), a NaN
  // p_j (a NaN row) adds NaN
  auto kl_term = [&](A zj, A rj) {
    const A lz = lse.log_prob(zj);
    const A p = exp_(lz);
    return p == A(0) ? A(0) : p * (lz - rlse.log_prob(rj));
  };
  A part = A(0);
  const RowSplit<T> sp(z, V);
  constexpr int kN = Pack<T>::kN;
  const bool same = ((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(r)) & 15) == 0;
  if (same) {
    for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) part += kl_term(to_float(z[j]), to_float(r[j]));
    const Pack<T>* vz = reinterpret_cast<const Pack<T>*>(z + sp.head);
    const Pack<T>* vr = reinterpret_cast<const Pack<T>*>(r + sp.head);
    for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
      const Pack<T> pz = vz[q], pr = vr[q];
#pragma unroll
      for (int k = 0; k < kN; ++k) part += kl_term(to_float(pz.v[k]), to_float(pr.v[k]));
    }
    for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) part += kl_term(to_float(z[j]), to_float(r[j]));
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) part += kl_term(to_float(z[j]), to_float(r[j]));
  }
  const A klv = block_sum(part);
  if (threadIdx.x == 0) {
    lp[i] = static_cast<A>(static_cast<double>(to_float(z[y])) - lse_d);
    kl[i] = klv;
    a.logsumexp[i] = lse_d;
    a.ref_logsumexp[i] = rlse_d;
  }
}

template <typename T>
__global__ void full_kl_backward_kernel(TokenRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  const T* z = static_cast<const T*>(a.logits) + i * V;
  const T* r = static_cast<const T*>(a.ref_logits) + i * V;
  T* out = static_cast<T*>(a.grad_logits) + i * V;
  if (fill_skipped_row(a, y, z, out)) return;
  const A ca = -static_cast<const A*>(a.grad_logprobs)[i], cb = static_cast<const A*>(a.grad_kl)[i];
  const Split<A> lse(a.logsumexp[i]), rlse(a.ref_logsumexp[i]);
  const A klv = static_cast<const A*>(a.kl)[i];
  // the label column: -g_l (p_y - 1) by expm1, no cancellation
  const A ly = lse.log_prob(to_float(z[y]));
  const A py = exp_(ly);
  const A at_label = ca * expm1_(ly) + (py > A(0) ? cb * py * (ly - rlse.log_prob(to_float(r[y])) - klv) : A(0));
  __syncthreads();  // z[y], r[y] read before the row is overwritten (out may alias z)
  row_map(z, out, V, [&](int64_t j, A x) {
    if (j == y) return at_label;
    const A lz = lse.log_prob(x);
    const A p = exp_(lz);
    return p > A(0) ? p * (ca + cb * (lz - rlse.log_prob(to_float(r[j])) - klv)) : A(0);
  });
}

using Kernel = void (*)(TokenRows);

int launch_rows(const TokenRows& a, void* stream, Kernel f32, Kernel bf16, Kernel f16, Kernel f64) {
  if (a.rows <= 0) return 0;
  if (a.rows > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  Kernel k = nullptr;
  switch (a.dtype) {
    case DType::kFloat32: k = f32; break;
    case DType::kBFloat16: k = bf16; break;
    case DType::kFloat16: k = f16; break;
    case DType::kFloat64: k = f64; break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  k<<<static_cast<unsigned>(a.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_token_logprobs(const TokenRows& a, void* stream) {
  return launch_rows(a, stream, logprobs_kernel<float>, logprobs_kernel<__nv_bfloat16>, logprobs_kernel<__half>,
                     logprobs_kernel<double>);
}

int launch_token_logprobs_backward(const TokenRows& a, void* stream) {
  return launch_rows(a, stream, logprobs_backward_kernel<float>, logprobs_backward_kernel<__nv_bfloat16>,
                     logprobs_backward_kernel<__half>, logprobs_backward_kernel<double>);
}

int launch_full_kl(const TokenRows& a, void* stream) {
  return launch_rows(a, stream, full_kl_kernel<float>, full_kl_kernel<__nv_bfloat16>, full_kl_kernel<__half>,
                     full_kl_kernel<double>);
}

int launch_full_kl_backward(const TokenRows& a, void* stream) {
  return launch_rows(a, stream, full_kl_backward_kernel<float>, full_kl_backward_kernel<__nv_bfloat16>,
                     full_kl_backward_kernel<__half>, full_kl_backward_kernel<double>);
}

}  // namespace safeshape::cuda
