// The emulation's stand-in for c10/cuda/CUDAStream.h: one (null) stream; launches run synchronously.
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
