// CUDA kernels of the Safe LoRA ops (docs/math.md#safe-lora-without-forming-c). Two passes over the weights, V never stored:
//   pass 1: partial[s, j, :] = sum_{i in split s} V[i, j] B[i, :] (float64)  and per-block sums of V^2
//   reduce: M[j, :] = sum_s partial[s, j, :],  norm = sqrt(sum of the block sums)   (fp64 for the norm)
//   pass 2: B'[i, :] = sum_j V[i, j] M[j, :] / norm, several rows per block (pass2_rows).
// V^T B and ||V||^2 are accumulated in float64 (as on the CPU): per thread, per block and across blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "block_reduce.cuh"
#include "launchers.h"

namespace safeshape::cuda {
namespace {

constexpr int kRowsPerTile = 32;  // rows of B staged in shared memory per step of pass 1

// grid (ceil(d_in / kThreads), nsplit, ceil(r / R)); each thread owns column j and R rank columns.
template <typename T, int R>
__global__ void pass1_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ lora_b,
                             double* __restrict__ partial, double* __restrict__ block_ss, int64_t d_out, int64_t d_in,
                             int64_t r, int64_t rows_per_split) {
  __shared__ float bs[kRowsPerTile][R];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * R;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t i_end = min(d_out, i_begin + rows_per_split);
  double acc[R];  // float64: products of float32 values are exact, and V^T B may cancel (hard modules)
#pragma unroll
  for (int k = 0; k < R; ++k) acc[k] = 0.0;
  double ss = 0.0;  // float64: a float32 sum of 64 rows per thread lost up to 2e-6 of ||V||^2 (issue 22)
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kRowsPerTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRowsPerTile), i_end - i0));
    __syncthreads();
    for (int e = threadIdx.x; e < kRowsPerTile * R; e += kThreads) {
      const int ii = e / R, k = e % R;
      bs[ii][k] = (ii < rows && k0 + k < r) ? lora_b[(i0 + ii) * r + k0 + k] : 0.f;
    }
    __syncthreads();
    if (j < d_in) {
      for (int ii = 0; ii < rows; ++ii) {
        const int64_t idx = (i0 + ii) * d_in + j;
        // the difference in float64 too: exact for float32/bfloat16/float16 inputs (a float32 difference is
        // rounded, which moved the hard module's cosine by up to 8.6e-7 in an fp64 emulation)
        const double v = static_cast<double>(to_float(a[idx])) - static_cast<double>(to_float(b[idx]));
        ss += v * v;
#pragma unroll
        for (int k = 0; k < R; ++k) acc[k] += v * bs[ii][k];
      }
    }
  }
  if (j < d_in) {
    double* p = partial + (static_cast<int64_t>(blockIdx.y) * d_in + j) * r + k0;
#pragma unroll
    for (int k = 0; k < R; ++k)
      if (k0 + k < r) p[k] = acc[k];
  }
  // only the first rank chunk counts V^2, so each element is counted once
  if (blockIdx.z == 0) {  // uniform across the block, as block_sum needs
    const double t = block_sum(ss);
    if (threadIdx.x == 0) block_ss[blockIdx.y * gridDim.x + blockIdx.x] = t;
  }
}

// M[e] = sum_s partial[s, e] over e < d_in * r; then block 0 sums the block sums of V^2 into the norm.
__global__ void reduce_kernel(const double* __restrict__ partial, float* __restrict__ M, int64_t n, int nsplit) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  double s = 0.0;
  for (int q = 0; q < nsplit; ++q) s += partial[q * n + e];
  M[e] = static_cast<float>(s);
}

__global__ void norm_kernel(const double* __restrict__ block_ss, int64_t n, double* __restrict__ norm64,
                            float* __restrict__ v_norm) {
  double s = 0.0;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) s += block_ss[e];
  const double t = block_sum(s);
  if (threadIdx.x == 0) {
    const double nrm = sqrt(t);
    norm64[0] = nrm;
    v_norm[0] = static_cast<float>(nrm);
  }
}

// grid (ceil(d_out / ROWS), ceil(r / R)); block-wide dots of ROWS rows of V with M[:, k0:k0+R]. Each M row
// a thread loads serves ROWS rows of V, so M (d_in x r) is re-read from L2 d_out / ROWS times, not d_out times.
template <typename T, int R, int ROWS>
__global__ void pass2_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ M,
                             const double* __restrict__ norm64, float* __restrict__ out, int64_t d_out, int64_t d_in,
                             int64_t r) {
  __shared__ float red[kThreads / 32][ROWS * R];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * R;
  const int kn = static_cast<int>(min(static_cast<int64_t>(R), r - k0));
  const int rows = static_cast<int>(min(static_cast<int64_t>(ROWS), d_out - i0));
  float acc[ROWS][R];
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
#pragma unroll
    for (int k = 0; k < R; ++k) acc[q][k] = 0.f;
  for (int64_t j = threadIdx.x; j < d_in; j += kThreads) {
    float m[R];
    const float* mr = M + j * r + k0;
#pragma unroll
    for (int k = 0; k < R; ++k) m[k] = k < kn ? mr[k] : 0.f;
#pragma unroll
    for (int q = 0; q < ROWS; ++q) {
      if (q < rows) {
        const int64_t idx = (i0 + q) * d_in + j;
        const float v = to_float(a[idx]) - to_float(b[idx]);
#pragma unroll
        for (int k = 0; k < R; ++k) acc[q][k] += v * m[k];
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const float s = warp_sum(acc[q][k]);
      if (lane == 0) red[warp][q * R + k] = s;
    }
  __syncthreads();
  const double nrm = norm64[0];
  for (int e = threadIdx.x; e < ROWS * R; e += kThreads) {
    const int q = e / R, k = e % R;
    if (q >= rows || k >= kn) continue;
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][e];
    // V = 0 gives 0; a NaN norm (non-finite weights) stays NaN
    out[(i0 + q) * r + k0 + k] = nrm == 0.0 ? 0.f : static_cast<float>(s / nrm);
  }
}

// rows of V per pass-2 block: ROWS x R accumulators per thread (at most 64 registers)
template <int R>
constexpr int pass2_rows() {
  return R <= 16 ? 4 : R == 32 ? 2 : 1;
}

int rank_tile(int64_t r) { return r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }

struct Plan {
  int64_t col_blocks, nsplit, rows_per_split;
};

// Pass 1 splits the rows so that the grid fills the GPU: at least 8 blocks per SM (and 1024 in all), at least
// kMinRowsPerSplit rows per split, and at most kMaxPartialBytes of float64 partial sums (8 d_in r bytes a split:
// 147 MB at d_in 28672, r 64 without the cap), but always one split. workspace_bytes and the launch both call this,
// on the same device.
constexpr int64_t kMinRowsPerSplit = 4;
constexpr int64_t kMaxPartialBytes = int64_t{64} << 20;
Plan make_plan(int64_t d_out, int64_t d_in, int64_t r) {
  Plan p;
  p.col_blocks = std::max<int64_t>(1, (d_in + kThreads - 1) / kThreads);
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 132;
    cudaGetLastError();  // the failed query must not be reported as the launch's error
  }
  const int64_t target = std::max<int64_t>(1024, 8 * static_cast<int64_t>(sms));
  const int64_t want = std::max<int64_t>(1, (target + p.col_blocks - 1) / p.col_blocks);
  const int64_t split_bytes = std::max<int64_t>(1, static_cast<int64_t>(sizeof(double)) * d_in * r);
  p.nsplit = std::min<int64_t>({want, std::max<int64_t>(1, d_out / kMinRowsPerSplit),
                                std::max<int64_t>(1, kMaxPartialBytes / split_bytes)});
  p.rows_per_split = std::max<int64_t>(1, (d_out + p.nsplit - 1) / p.nsplit);  // d_out = 0: one empty split
  p.nsplit = std::max<int64_t>(1, (d_out + p.rows_per_split - 1) / p.rows_per_split);
  return p;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

template <typename T, int R>
void launch_passes(const T* a, const T* b, const float* lora_b, float* projected, float* v_norm, int64_t d_out,
                   int64_t d_in, int64_t r, char* ws, cudaStream_t stream) {
  const Plan p = make_plan(d_out, d_in, r);
  double* partial = reinterpret_cast<double*>(ws);
  ws += align256(sizeof(double) * p.nsplit * d_in * r);
  float* M = reinterpret_cast<float*>(ws);
  ws += align256(sizeof(float) * d_in * r);
  double* block_ss = reinterpret_cast<double*>(ws);
  ws += align256(sizeof(double) * p.nsplit * p.col_blocks);
  double* norm64 = reinterpret_cast<double*>(ws);

  const int64_t rchunks = (r + R - 1) / R;
  dim3 g1(static_cast<unsigned>(p.col_blocks), static_cast<unsigned>(p.nsplit), static_cast<unsigned>(rchunks));
  pass1_kernel<T, R><<<g1, kThreads, 0, stream>>>(a, b, lora_b, partial, block_ss, d_out, d_in, r, p.rows_per_split);
  const int64_t n = d_in * r;
  reduce_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial, M, n, static_cast<int>(p.nsplit));
  norm_kernel<<<1, kThreads, 0, stream>>>(block_ss, p.nsplit * p.col_blocks, norm64, v_norm);
  constexpr int rows = pass2_rows<R>();
  dim3 g2(static_cast<unsigned>((d_out + rows - 1) / rows), static_cast<unsigned>(rchunks));
  pass2_kernel<T, R, rows><<<g2, kThreads, 0, stream>>>(a, b, M, norm64, projected, d_out, d_in, r);
}

template <typename T>
void launch_for_dtype(const void* a, const void* b, const float* lora_b, float* projected, float* v_norm,
                      int64_t d_out, int64_t d_in, int64_t r, char* ws, cudaStream_t stream) {
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  switch (rank_tile(r)) {
    case 8: launch_passes<T, 8>(ta, tb, lora_b, projected, v_norm, d_out, d_in, r, ws, stream); break;
    case 16: launch_passes<T, 16>(ta, tb, lora_b, projected, v_norm, d_out, d_in, r, ws, stream); break;
    case 32: launch_passes<T, 32>(ta, tb, lora_b, projected, v_norm, d_out, d_in, r, ws, stream); break;
    default: launch_passes<T, 64>(ta, tb, lora_b, projected, v_norm, d_out, d_in, r, ws, stream); break;
  }
}

// ---- lora_cosine ----
// out[k * r + l] = sum_t X[t * sxt + k * sxk] * Y[t * syt + l * syk]; one block per (k, l).
__global__ void gram_kernel(const double* __restrict__ X, int64_t sxt, int64_t sxk, const double* __restrict__ Y,
                            int64_t syt, int64_t syk, int64_t n, int64_t r, double* __restrict__ out) {
  const int64_t k = blockIdx.x / r, l = blockIdx.x % r;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < n; t += kThreads) s += X[t * sxt + k * sxk] * Y[t * syt + l * syk];
  const double total = block_sum(s);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

__global__ void cosine_kernel(const double* __restrict__ grams, int64_t r, double* __restrict__ cosine) {
  const int64_t rr = r * r;
  const double* G = grams;
  double tr[3] = {0.0, 0.0, 0.0};
  for (int64_t e = threadIdx.x; e < rr; e += kThreads) {
    const int64_t k = e / r, l = e % r;
    const double g = G[l * r + k];
    for (int q = 0; q < 3; ++q) tr[q] += grams[(q + 1) * rr + e] * g;
  }
  double t[3];
  for (int q = 0; q < 3; ++q) t[q] = block_sum(tr[q]);
  if (threadIdx.x == 0) {
    double c = 0.0;  // 0 when dW = 0 or C dW = 0; NaN when an input is not finite (as on the CPU)
    if (!isfinite(t[0]) || !isfinite(t[1]) || !isfinite(t[2])) {
      c = nan("");
    } else if (t[1] > 0.0 && t[2] > 0.0) {
      c = fmin(fmax(t[0] / sqrt(t[1] * t[2]), 0.0), 1.0);
    }
    cosine[0] = c;
  }
}

}  // namespace

size_t project_lora_b_workspace_bytes(int64_t d_out, int64_t d_in, int64_t r) {
  const Plan p = make_plan(d_out, d_in, r);
  return align256(sizeof(double) * p.nsplit * d_in * r) + align256(sizeof(float) * d_in * r) +
         align256(sizeof(double) * p.nsplit * p.col_blocks) + align256(sizeof(double));
}

int launch_project_lora_b(DType dtype, const void* aligned, const void* base, const float* lora_b, float* projected,
                          float* v_norm, int64_t d_out, int64_t d_in, int64_t r, void* workspace,
                          size_t workspace_bytes, void* stream) {
  if (workspace_bytes < project_lora_b_workspace_bytes(d_out, d_in, r)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  if (d_out == 0 || d_in == 0 || r == 0) {  // V has no elements: ||V|| = 0 and B' = 0, as on the CPU
    if (d_out * r > 0) cudaMemsetAsync(projected, 0, sizeof(float) * d_out * r, s);
    cudaMemsetAsync(v_norm, 0, sizeof(float), s);
    return static_cast<int>(cudaGetLastError());
  }
  char* ws = static_cast<char*>(workspace);
  switch (dtype) {
    case DType::kFloat32: launch_for_dtype<float>(aligned, base, lora_b, projected, v_norm, d_out, d_in, r, ws, s); break;
    case DType::kBFloat16:
      launch_for_dtype<__nv_bfloat16>(aligned, base, lora_b, projected, v_norm, d_out, d_in, r, ws, s);
      break;
    case DType::kFloat16: launch_for_dtype<__half>(aligned, base, lora_b, projected, v_norm, d_out, d_in, r, ws, s); break;
    default: return cudaErrorInvalidValue;
  }
  return static_cast<int>(cudaGetLastError());
}

size_t lora_cosine_workspace_bytes(int64_t r) { return sizeof(double) * 4 * r * r; }

int launch_lora_cosine(const double* lora_b, const double* projected_b, const double* lora_a, double* cosine,
                       int64_t d_out, int64_t d_in, int64_t r, void* workspace, size_t workspace_bytes, void* stream) {
  if (workspace_bytes < lora_cosine_workspace_bytes(r)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  double* grams = static_cast<double*>(workspace);  // G, P^T B, P^T P, B^T B
  const int64_t rr = r * r;
  if (r < 0 || rr > kMaxCosineBlocks) return cudaErrorInvalidValue;  // one block per (k, l): gridDim.x < 2^31
  const unsigned blocks = static_cast<unsigned>(rr);
  if (rr == 0) {  // r = 0: dW = 0, cosine 0 (an empty grid is not a valid launch)
    cosine_kernel<<<1, kThreads, 0, s>>>(grams, r, cosine);
    return static_cast<int>(cudaGetLastError());
  }
  gram_kernel<<<blocks, kThreads, 0, s>>>(lora_a, 1, d_in, lora_a, 1, d_in, d_in, r, grams);
  gram_kernel<<<blocks, kThreads, 0, s>>>(projected_b, r, 1, lora_b, r, 1, d_out, r, grams + rr);
  gram_kernel<<<blocks, kThreads, 0, s>>>(projected_b, r, 1, projected_b, r, 1, d_out, r, grams + 2 * rr);
  gram_kernel<<<blocks, kThreads, 0, s>>>(lora_b, r, 1, lora_b, r, 1, d_out, r, grams + 3 * rr);
  cosine_kernel<<<1, kThreads, 0, s>>>(grams, r, cosine);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace safeshape::cuda
