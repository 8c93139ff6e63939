// CPU kernel of star_token_weights (docs/math.md#star-token-weights): expand per-chunk STAR values to per-token weights.
// weights[b, t] = values[b, k] for the first chunk k with chunk_ends[b, k] > t; 0 when no chunk ends after t.
// With the running maximum M[k] of the ends, "first k with end > t" is "first k with M[k] > t", which is monotone
// in t: each task binary-searches its first token once and then fills whole runs of tokens with one value.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "star_checks.h"

namespace safeshape {
namespace {

constexpr int64_t kTokenBlock = 4096;  // tokens per task: rows of any length spread over the threads

// The fill is a bitwise copy, so one routine per element size serves every float dtype.
SAFESHAPE_CLONES
void fill_u16(uint16_t* __restrict out, uint16_t v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = v;
}
SAFESHAPE_CLONES
void fill_u32(uint32_t* __restrict out, uint32_t v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = v;
}
SAFESHAPE_CLONES
void fill_u64(uint64_t* __restrict out, uint64_t v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = v;
}

inline void fill(uint16_t* out, uint16_t v, int64_t n) { fill_u16(out, v, n); }
inline void fill(uint32_t* out, uint32_t v, int64_t n) { fill_u32(out, v, n); }
inline void fill(uint64_t* out, uint64_t v, int64_t n) { fill_u64(out, v, n); }

template <typename Bits>
void expand_rows(const Bits* values, const int64_t* running_max, Bits* out, int64_t batch, int64_t chunks,
                 int64_t seq_len) {
  const int64_t blocks_per_row = (seq_len + kTokenBlock - 1) / kTokenBlock;
  at::parallel_for(0, batch * blocks_per_row, 4, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / blocks_per_row;
      const int64_t t_end = std::min(seq_len, (task % blocks_per_row + 1) * kTokenBlock);
      int64_t t = (task % blocks_per_row) * kTokenBlock;
      const int64_t* m = running_max + b * chunks;
      const Bits* v = values + b * chunks;
      Bits* o = out + b * seq_len;
      int64_t k = std::upper_bound(m, m + chunks, t) - m;  // first chunk whose (running) end is past t
      for (; t < t_end && k < chunks; ++k) {
        const int64_t stop = std::min(m[k], t_end);
        if (stop <= t) continue;  // an empty chunk (its end does not pass the previous one)
        fill(o + t, v[k], stop - t);
        t = stop;
      }
      if (t < t_end) fill(o + t, Bits{0}, t_end - t);  // past the last end: no chunk, weight 0
    }
  });
}

at::Tensor star_token_weights_cpu(const at::Tensor& values, const at::Tensor& chunk_ends, int64_t seq_len) {
  check_star_token_weights_args(values, chunk_ends, seq_len);
  const at::Tensor vals = values.contiguous();
  const at::Tensor ends = chunk_ends.to(at::kLong).contiguous();
  const int64_t batch = vals.size(0), chunks = vals.size(1);
  at::Tensor out = at::empty({batch, seq_len}, vals.options());
  if (batch == 0 || seq_len == 0) return out;
  // running maximum of the ends per row (negative ends, the padding, never raise it)
  std::vector<int64_t> running_max(batch * chunks);
  const int64_t* e = ends.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    int64_t m = -1;
    for (int64_t k = 0; k < chunks; ++k) running_max[b * chunks + k] = m = std::max(m, e[b * chunks + k]);
  }
  switch (vals.element_size()) {
    case 2:
      expand_rows(static_cast<const uint16_t*>(vals.const_data_ptr()), running_max.data(),
                  static_cast<uint16_t*>(out.mutable_data_ptr()), batch, chunks, seq_len);
      break;
    case 4:
      expand_rows(static_cast<const uint32_t*>(vals.const_data_ptr()), running_max.data(),
                  static_cast<uint32_t*>(out.mutable_data_ptr()), batch, chunks, seq_len);
      break;
    case 8:
      expand_rows(static_cast<const uint64_t*>(vals.const_data_ptr()), running_max.data(),
                  static_cast<uint64_t*>(out.mutable_data_ptr()), batch, chunks, seq_len);
      break;
    default:
      TORCH_CHECK(false, "star_token_weights: values has an unsupported dtype ", vals.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CPU, m) { m.impl("star_token_weights", &star_token_weights_cpu); }

}  // namespace safeshape
