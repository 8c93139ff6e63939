// Registration of the CUDA glue (cpp/*_cuda.cpp) under emulation. build.py rewrites each
// `TORCH_LIBRARY_IMPL(safeshape, CUDA, m) {` into a fragment of the namespace safeshape_cuda_emu whose `m.impl(name,
// fn)` defines torch.ops.safeshape_cuda_emu.<name> with the schema inferred from fn: the unmodified glue (checks,
// allocation, the launcher call) then runs on CPU tensors, and tests/cuda_emu.py routes the safeshape ops to it.
#pragma once
#include <torch/library.h>

#include <utility>

namespace cuemu_glue {
struct Defs {
  torch::Library& lib;
  template <typename F>
  Defs& impl(const char* name, F&& f) {
    lib.def(name, std::forward<F>(f));
    return *this;
  }
};
}  // namespace cuemu_glue
