// CUDA row kernels of the DSS loss ops (docs/math.md#dss-gradient). One block per row of logits:
//   forward:  each thread keeps an online (max, sum exp) over its elements (16-byte vector loads), the block
//             merges the pairs; thread 0 forms lse, l = z[y] - lse and the loss.
//   backward: grad = g c (exp(z - lse) - onehot(y)), one pass with vector loads and stores; may run in place.
//   full KL:  pass 1 online logsumexp of z and of the reference r, pass 2 sum p (log p - log q) over the row
//             (the row is re-read from L2); the backward is one pass.
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

constexpr int kThreads = 256;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// A float64 logsumexp as hi + lo in the accumulation dtype (as the CPU kernels' Split): (x - hi) - lo keeps the
// digits of x - lse that a float32 lse of |z| ~ 1e4 would lose.
template <typename A>
struct Split {
  A hi, lo;
  __device__ explicit Split(double v) : hi(static_cast<A>(v)), lo(static_cast<A>(v - static_cast<double>(hi))) {}
  __device__ __forceinline__ A log_prob(A x) const { return (x - hi) - lo; }
};

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
  for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) f(j, to_acc(row[j]));
  const Pack<T>* vec = reinterpret_cast<const Pack<T>*>(row + sp.head);
  for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
    const Pack<T> p = vec[q];
#pragma unroll
    for (int k = 0; k < kN; ++k) f(sp.head + q * kN + k, to_acc(p.v[k]));
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) f(j, to_acc(row[j]));
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
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = store_cast<T>(f(j, to_acc(in[j])));
    return;
  }
  for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) out[j] = store_cast<T>(f(j, to_acc(in[j])));
  const Pack<T>* vin = reinterpret_cast<const Pack<T>*>(in + sp.head);
  Pack<T>* vout = reinterpret_cast<Pack<T>*>(out + sp.head);
  for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
    const Pack<T> p = vin[q];
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < kN; ++k) o.v[k] = store_cast<T>(f(sp.head + q * kN + k, to_acc(p.v[k])));
    vout[q] = o;
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) out[j] = store_cast<T>(f(j, to_acc(in[j])));
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
    } else if (x > -INFINITY) {  // a masked -inf logit adds 0 (and -inf - -inf would be NaN)
      s += exp_(x - m);
    }
  }
  __device__ void merge(A om, A os) {
    if (om == -INFINITY) return;
    if (m == -INFINITY) {
      m = om;
      s = os;
      return;
    }
    const A nm = m > om ? m : om;
    s = s * exp_(m - nm) + os * exp_(om - nm);
    m = nm;
  }
};

// Block-wide merge of the threads' Lse; every thread gets m + log(s) in float64 (m is a logit, log(s) is small:
// their float64 sum keeps the digits a float32 lse of |z| ~ 1e4 would lose).
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
    result = static_cast<double>(t.m) + static_cast<double>(log_(t.s));
  }
  __syncthreads();
  return result;
}

template <typename A>
__device__ __forceinline__ A row_value(const void* p, int64_t i, A dflt) {
  return p ? static_cast<const A*>(p)[i] : dflt;
}

template <typename T>
__global__ void forward_kernel(DssRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  A* lp = static_cast<A*>(a.logprobs);
  double* lse_out = a.logsumexp;
  A* loss = static_cast<A*>(a.loss);
  if (y == a.ignore_index) {
    if (threadIdx.x == 0) {
      lp[i] = A(0);
      lse_out[i] = 0.0;
      if (loss) loss[i] = A(0);
    }
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + i * a.vocab;
  Lse<A> st;
  st.init();
  row_visit(row, a.vocab, [&](int64_t, A x) { st.add(x); });
  const double lse = block_lse(st);
  if (threadIdx.x == 0) {
    const A l = static_cast<A>(static_cast<double>(to_acc(row[y])) - lse);
    lp[i] = l;
    lse_out[i] = lse;
    if (loss) {
      const A w = row_value<A>(a.weights, i, A(1));
      const A d = l - row_value<A>(a.ref_logprobs, i, A(0));
      loss[i] = w * -l + static_cast<A>(a.kl_coef) * (A(1) - w) * A(0.5) * d * d;
    }
  }
}

template <typename T>
__global__ void backward_kernel(DssRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  const T* row = static_cast<const T*>(a.logits) + i * V;
  T* out = static_cast<T*>(a.grad_logits) + i * V;
  if (y == a.ignore_index) {
    row_map(row, out, V, [](int64_t, A) { return A(0); });
    return;
  }
  const A l = static_cast<const A*>(a.logprobs)[i];
  const Split<A> lse(a.logsumexp[i]);
  const A w = row_value<A>(a.weights, i, A(1));
  const A c = w - static_cast<A>(a.kl_coef) * (A(1) - w) * (l - row_value<A>(a.ref_logprobs, i, A(0)));
  const A coef = static_cast<const A*>(a.grad_loss)[i] * c;
  const A at_label = coef * expm1_(l);  // p_y - 1 from the saved log-probability, no cancellation
  row_map(row, out, V, [&](int64_t j, A x) { return j == y ? at_label : coef * exp_(lse.log_prob(x)); });
}

template <typename T>
__global__ void full_kl_forward_kernel(DssRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  A* loss = static_cast<A*>(a.loss);
  A* lp = static_cast<A*>(a.logprobs);
  A* kl = static_cast<A*>(a.kl);
  double* lse_out = a.logsumexp;
  double* rlse_out = a.ref_logsumexp;
  if (y == a.ignore_index) {
    if (threadIdx.x == 0) {
      loss[i] = lp[i] = kl[i] = A(0);
      lse_out[i] = rlse_out[i] = 0.0;
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
  // KL = sum_j p_j ((z_j - lse) - (r_j - rlse)); r_j is read with the same split as z_j (same row offsets)
  auto kl_term = [&](A zj, A rj) {
    const A lz = lse.log_prob(zj);
    return exp_(lz) * (lz - rlse.log_prob(rj));
  };
  A part = A(0);
  const RowSplit<T> sp(z, V);
  constexpr int kN = Pack<T>::kN;
  const bool same = ((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(r)) & 15) == 0;
  if (same) {
    for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) {
      part += kl_term(to_acc(z[j]), to_acc(r[j]));
    }
    const Pack<T>* vz = reinterpret_cast<const Pack<T>*>(z + sp.head);
    const Pack<T>* vr = reinterpret_cast<const Pack<T>*>(r + sp.head);
    for (int64_t q = threadIdx.x; q < sp.nvec; q += blockDim.x) {
      const Pack<T> pz = vz[q], pr = vr[q];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        part += kl_term(to_acc(pz.v[k]), to_acc(pr.v[k]));
      }
    }
    for (int64_t j = sp.tail_begin + threadIdx.x; j < V; j += blockDim.x) {
      part += kl_term(to_acc(z[j]), to_acc(r[j]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      part += kl_term(to_acc(z[j]), to_acc(r[j]));
    }
  }
  const A klv = block_sum(part);
  if (threadIdx.x == 0) {
    const A l = static_cast<A>(static_cast<double>(to_acc(z[y])) - lse_d);
    const A w = row_value<A>(a.weights, i, A(1));
    loss[i] = w * -l + static_cast<A>(a.kl_coef) * (A(1) - w) * klv;
    lp[i] = l;
    kl[i] = klv;
    lse_out[i] = lse_d;
    rlse_out[i] = rlse_d;
  }
}

template <typename T>
__global__ void full_kl_backward_kernel(DssRows a) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t y = a.labels[i];
  const int64_t V = a.vocab;
  const T* z = static_cast<const T*>(a.logits) + i * V;
  const T* r = static_cast<const T*>(a.ref_logits) + i * V;
  T* out = static_cast<T*>(a.grad_logits) + i * V;
  if (y == a.ignore_index) {
    row_map(z, out, V, [](int64_t, A) { return A(0); });
    return;
  }
  const A g = static_cast<const A*>(a.grad_loss)[i];
  const A w = row_value<A>(a.weights, i, A(1));
  const A ca = g * w, cb = g * static_cast<A>(a.kl_coef) * (A(1) - w);
  const Split<A> lse(a.logsumexp[i]), rlse(a.ref_logsumexp[i]);
  const A klv = static_cast<const A*>(a.kl)[i];
  // the label column: w (p_y - 1) by expm1, no cancellation
  const A ly = lse.log_prob(to_acc(z[y]));
  const A at_label = ca * expm1_(ly) + cb * exp_(ly) * (ly - rlse.log_prob(to_acc(r[y])) - klv);
  row_map(z, out, V, [&](int64_t j, A x) {
    if (j == y) return at_label;
    const A lz = lse.log_prob(x);
    return exp_(lz) * (ca + cb * (lz - rlse.log_prob(to_acc(r[j])) - klv));
  });
}

using Kernel = void (*)(DssRows);

int launch_rows(const DssRows& a, void* stream, Kernel f32, Kernel bf16, Kernel f16, Kernel f64) {
  if (a.rows <= 0) return 0;
  if (a.rows > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  Kernel k = nullptr;
  if (a.logits_f64) {
    k = f64;
  } else {
    switch (a.dtype) {
      case DType::kFloat32: k = f32; break;
      case DType::kBFloat16: k = bf16; break;
      case DType::kFloat16: k = f16; break;
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  }
  k<<<static_cast<unsigned>(a.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_dss_rows_forward(const DssRows& a, void* stream) {
  return launch_rows(a, stream, forward_kernel<float>, forward_kernel<__nv_bfloat16>, forward_kernel<__half>,
                     forward_kernel<double>);
}

int launch_dss_rows_backward(const DssRows& a, void* stream) {
  return launch_rows(a, stream, backward_kernel<float>, backward_kernel<__nv_bfloat16>, backward_kernel<__half>,
                     backward_kernel<double>);
}

int launch_dss_rows_full_kl_forward(const DssRows& a, void* stream) {
  return launch_rows(a, stream, full_kl_forward_kernel<float>, full_kl_forward_kernel<__nv_bfloat16>,
                     full_kl_forward_kernel<__half>, full_kl_forward_kernel<double>);
}

int launch_dss_rows_full_kl_backward(const DssRows& a, void* stream) {
  return launch_rows(a, stream, full_kl_backward_kernel<float>, full_kl_backward_kernel<__nv_bfloat16>,
                     full_kl_backward_kernel<__half>, full_kl_backward_kernel<double>);
}

}  // namespace safeshape::cuda
