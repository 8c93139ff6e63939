// Argument checks of the STAR op, shared by its CPU kernel and its CUDA glue; messages name the op and argument.
#pragma once
#include <ATen/ATen.h>

namespace safeshape {

inline void check_star_token_weights_args(const at::Tensor& values, const at::Tensor& chunk_ends, int64_t seq_len) {
  constexpr const char* op = "star_token_weights";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [batch, chunks], got shape ", values.sizes());
  TORCH_CHECK(values.is_floating_point(), op, ": values must be a floating-point tensor, got ", values.scalar_type());
  TORCH_CHECK(chunk_ends.sizes() == values.sizes(), op, ": chunk_ends must have the shape of values ", values.sizes(),
              ", got ", chunk_ends.sizes());
  TORCH_CHECK(chunk_ends.scalar_type() == at::kLong || chunk_ends.scalar_type() == at::kInt, op,
              ": chunk_ends must be int64 or int32, got ", chunk_ends.scalar_type());
  TORCH_CHECK(seq_len >= 0, op, ": seq_len must be >= 0, got ", seq_len);
  TORCH_CHECK(values.device() == chunk_ends.device(), op, ": values is on ", values.device(), " but chunk_ends is on ",
              chunk_ends.device());
}

}  // namespace safeshape
