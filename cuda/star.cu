// CUDA kernel of star_token_weights (docs/math.md#star-token-weights): weights[b, t] = values[b, k] for the first chunk k with
// chunk_ends[b, k] > t, else 0. One thread per token; a block walks the row's chunk ends in shared-memory tiles. A
// tile none of whose ends passes the block's first token is skipped after one barrier; otherwise the tile's prefix
// maximum is formed (before the first end past t, every earlier end is <= t, so "first end > t" is "first prefix
// maximum > t") and each thread still looking binary-searches it: O(log) per tile and thread, where a linear scan
// of every tile cost O(chunks) per thread (32k steps at one chunk per token). The block stops as soon as every
// token has its chunk. The copy is bitwise (any float dtype).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "block_reduce.cuh"
#include "launchers.h"

namespace safeshape::cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;

template <typename Bits>
__global__ void star_token_weights_kernel(const Bits* __restrict__ values, const int64_t* __restrict__ chunk_ends,
                                          Bits* __restrict__ weights, int64_t batch, int64_t chunks,
                                          int64_t seq_len) {
  __shared__ int64_t tile[kThreads];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kThreads;  // the block's first token
  const int64_t t = t0 + threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t* ends = chunk_ends + b * chunks;
    int64_t found = -1;
    for (int64_t k0 = 0; k0 < chunks; k0 += kThreads) {
      const int64_t e = k0 + threadIdx.x < chunks ? ends[k0 + threadIdx.x] : INT64_MIN;
      __syncthreads();  // the previous tile is no longer read
      tile[threadIdx.x] = e;
      // uniform: no end of this tile passes any token of the block, so no thread finds its chunk here
      if (!__syncthreads_or(e > t0)) continue;
      for (int o = 1; o < kThreads; o <<= 1) {  // inclusive prefix maximum of the tile (Hillis-Steele)
        const int64_t left = threadIdx.x >= o ? tile[threadIdx.x - o] : INT64_MIN;
        __syncthreads();
        if (left > tile[threadIdx.x]) tile[threadIdx.x] = left;
        __syncthreads();
      }
      const int n = static_cast<int>(min(static_cast<int64_t>(kThreads), chunks - k0));
      if (found < 0 && t < seq_len && tile[n - 1] > t) {
        int lo = 0, hi = n - 1;  // the first i with tile[i] > t; tile[hi] > t holds throughout
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (tile[mid] > t) {
            hi = mid;
          } else {
            lo = mid + 1;
          }
        }
        found = k0 + lo;
      }
      // uniform across the block, so every thread leaves the loop together
      if (__syncthreads_and(found >= 0 || t >= seq_len)) break;
    }
    if (t < seq_len) weights[b * seq_len + t] = found >= 0 ? values[b * chunks + found] : Bits(0);
  }
}

template <typename Bits>
void launch_for_bits(const void* values, const int64_t* chunk_ends, void* weights, int64_t batch, int64_t chunks,
                     int64_t seq_len, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((seq_len + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min(batch, kMaxGridY)));
  star_token_weights_kernel<Bits><<<grid, kThreads, 0, s>>>(static_cast<const Bits*>(values), chunk_ends,
                                                            static_cast<Bits*>(weights), batch, chunks, seq_len);
}

}  // namespace

int launch_star_token_weights(int elem_bytes, const void* values, const int64_t* chunk_ends, void* weights,
                              int64_t batch, int64_t chunks, int64_t seq_len, void* stream) {
  if (batch == 0 || seq_len == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (elem_bytes) {
    case 2: launch_for_bits<uint16_t>(values, chunk_ends, weights, batch, chunks, seq_len, s); break;
    case 4: launch_for_bits<uint32_t>(values, chunk_ends, weights, batch, chunks, seq_len, s); break;
    case 8: launch_for_bits<uint64_t>(values, chunk_ends, weights, batch, chunks, seq_len, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace safeshape::cuda
