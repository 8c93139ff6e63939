// Argument checks shared by the torch glue: every message names the op and the argument at fault.
#pragma once
#include <ATen/ATen.h>

namespace safeshape {

inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_weight(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(is_weight_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

// Shapes shared by the projection ops; returns (d_out, d_in, r).
inline std::tuple<int64_t, int64_t, int64_t> check_projection_args(const at::Tensor& aligned, const at::Tensor& base,
                                                                   const at::Tensor& lora_b, const char* op) {
  check_weight(aligned, op, "aligned");
  check_weight(base, op, "base");
  check_weight(lora_b, op, "lora_b");
  TORCH_CHECK(aligned.sizes() == base.sizes(), op, ": aligned and base must have the same shape, got ",
              aligned.sizes(), " and ", base.sizes());
  TORCH_CHECK(aligned.scalar_type() == base.scalar_type(), op, ": aligned and base must have the same dtype, got ",
              aligned.scalar_type(), " and ", base.scalar_type());
  TORCH_CHECK(lora_b.size(0) == aligned.size(0), op, ": lora_b has ", lora_b.size(0),
              " rows but the weights have d_out = ", aligned.size(0), " (lora_b is [d_out, r])");
  TORCH_CHECK(lora_b.size(1) >= 1, op, ": lora_b must have rank >= 1, got shape ", lora_b.sizes());
  check_same_device(aligned, "aligned", base, "base", op);
  check_same_device(aligned, "aligned", lora_b, "lora_b", op);
  return {aligned.size(0), aligned.size(1), lora_b.size(1)};
}

inline void check_cosine_args(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a,
                              const char* op) {
  check_weight(lora_b, op, "lora_b");
  check_weight(projected_b, op, "projected_b");
  check_weight(lora_a, op, "lora_a");
  TORCH_CHECK(lora_b.sizes() == projected_b.sizes(), op, ": lora_b and projected_b must have the same shape, got ",
              lora_b.sizes(), " and ", projected_b.sizes());
  TORCH_CHECK(lora_a.size(0) == lora_b.size(1), op, ": lora_a has ", lora_a.size(0), " rows but lora_b has rank ",
              lora_b.size(1), " (lora_a is [r, d_in], lora_b is [d_out, r])");
  check_same_device(lora_b, "lora_b", projected_b, "projected_b", op);
  check_same_device(lora_b, "lora_b", lora_a, "lora_a", op);
}

}  // namespace safeshape
