// Warp and block sums and the small helpers shared by the CUDA kernels (no torch headers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace safeshape::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here

// Storage to accumulation dtype: float for float / bfloat16 / float16, double for double.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_float(double x) { return x; }

template <typename A>
__device__ __forceinline__ A warp_shfl_xor(A v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += warp_shfl_xor(v, o);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread. Every thread of
// the block must call it. The warps' partial sums are added in warp order, so the result is deterministic.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A part[32];
  __shared__ A result;
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    A t = A(0);
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t += part[w];
    result = t;
  }
  __syncthreads();
  return result;
}

}  // namespace safeshape::cuda
