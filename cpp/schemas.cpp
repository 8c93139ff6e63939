// Every native op of safeshape, in one place: the table of contents of the native code.
// C++ callers use include/safeshape/ops.h (implemented in cpp/api.cpp), Python callers safeshape.ops.
// Kernels register themselves next to their code (cpp/*_cpu.cpp, cpp/*_cuda.cpp); fake (meta) kernels and
// autograd formulas are registered from Python in python/safeshape/ops/.
#include <torch/library.h>

TORCH_LIBRARY(safeshape, m) {
  // ---- Safe LoRA (SPEC.md section 1) ----
  // B' = V (V^T B) / ||V||_F with V = aligned - base; never forms V V^T, never stores V.
  // Returns (projected_b in lora_b's dtype, ||V||_F as a float32 scalar).
  m.def("project_lora_b(Tensor aligned, Tensor base, Tensor lora_b) -> (Tensor, Tensor)");
  // cos(C dW, dW) by the r x r Gram form, accumulated in fp64; a float64 scalar.
  m.def("lora_cosine(Tensor lora_b, Tensor projected_b, Tensor lora_a) -> Tensor");
  // The explicit C = V V^T / ||V||_F (d_out x d_out, float32), for parity checks.
  m.def("alignment_projection_matrix(Tensor aligned, Tensor base) -> Tensor");

  // ---- DSS loss (SPEC.md section 3) ----

  // ---- STAR (SPEC.md section 2) ----
  // weights[b, t] = values[b, k] for the first chunk k (in order) with chunk_ends[b, k] > t, i.e. chunk k's value
  // on the tokens at/after the previous end and before its own end; a negative end (-1) marks a padding chunk;
  // tokens at/after the last end get 0. values [B, K] float, chunk_ends [B, K] int64/int32 -> [B, seq_len].
  m.def("star_token_weights(Tensor values, Tensor chunk_ends, int seq_len) -> Tensor");
}
