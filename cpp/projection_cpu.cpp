// CPU kernels of the Safe LoRA ops (docs/math.md#safe-lora-without-forming-c).
//   project_lora_b: pass 1 reads both weights tile by tile and accumulates M = V^T B and ||V||^2;
//                   pass 2 reads them again and forms B' = V M / ||V||. V is never stored whole.
//   lora_cosine:    cos(C dW, dW) through r x r Gram matrices, accumulated in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace safeshape {
namespace {

using cpu::round_up;

constexpr int64_t kRank = 16;       // rank columns held in registers at a time (lora_b padded to a multiple)
constexpr int64_t kRows1 = 8;       // rows of V per rank-8 update in pass 1
constexpr int64_t kCols1 = 2048;    // widest column tile of pass 1: long row segments keep the prefetchers busy
constexpr int64_t kRowBlock = 256;  // pass 1 sums this many rows in a fresh accumulator (two-level summation)
constexpr int64_t kRows2 = 8;       // rows of V per block in pass 2 (each M row load serves 8 rows)
constexpr int64_t kColBlock = 256;  // pass 2 two-level summation block

// out[j] = a[j] - b[j] in float32; adds sum(out^2) to *ss when ss is not null. Explicit 16-wide vectors: the
// compiler will not vectorise a float reduction on its own (it may not reorder the sum), which left this
// loop scalar and made it the slowest part of the op.
template <bool kSumSq>
SAFESHAPE_CLONES
void diff_f32_impl(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n,
                   double* ss) {
  cpu::vf16 acc0 = {}, acc1 = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const cpu::vf16 v0 = cpu::load16(a + j) - cpu::load16(b + j);
    const cpu::vf16 v1 = cpu::load16(a + j + 16) - cpu::load16(b + j + 16);
    cpu::store16(out + j, v0);
    cpu::store16(out + j + 16, v1);
    if constexpr (kSumSq) {
      acc0 += v0 * v0;
      acc1 += v1 * v1;
    }
  }
  float tail = 0.f;
  for (; j < n; ++j) {
    const float v = a[j] - b[j];
    out[j] = v;
    tail += v * v;
  }
  if constexpr (kSumSq) *ss += cpu::hsum(acc0 + acc1) + static_cast<double>(tail);
}

template <bool kSumSq>
SAFESHAPE_CLONES
void diff_bf16_impl(const uint16_t* __restrict a, const uint16_t* __restrict b, float* __restrict out, int64_t n,
                    double* ss) {
  cpu::vf16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const cpu::vf16 v = cpu::bf16x16_to_float(a + j) - cpu::bf16x16_to_float(b + j);
    cpu::store16(out + j, v);
    if constexpr (kSumSq) acc += v * v;
  }
  float tail = 0.f;
  for (; j < n; ++j) {
    const float v = cpu::bf16_bits_to_float(a[j]) - cpu::bf16_bits_to_float(b[j]);
    out[j] = v;
    tail += v * v;
  }
  if constexpr (kSumSq) *ss += cpu::hsum(acc) + static_cast<double>(tail);
}

void diff_f32(const float* a, const float* b, float* out, int64_t n, double* ss) {
  ss ? diff_f32_impl<true>(a, b, out, n, ss) : diff_f32_impl<false>(a, b, out, n, ss);
}

void diff_bf16(const uint16_t* a, const uint16_t* b, float* out, int64_t n, double* ss) {
  ss ? diff_bf16_impl<true>(a, b, out, n, ss) : diff_bf16_impl<false>(a, b, out, n, ss);
}

void diff_f16(const c10::Half* a, const c10::Half* b, float* out, int64_t n, double* ss) {
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(a[j]) - static_cast<float>(b[j]);
    out[j] = v;
    acc += v * v;
  }
  if (ss) *ss += acc;
}

template <typename T>
void diff_row(const T* a, const T* b, float* out, int64_t n, double* ss) {
  if constexpr (std::is_same_v<T, float>) {
    diff_f32(a, b, out, n, ss);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    diff_bf16(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b), out, n, ss);
  } else {
    diff_f16(a, b, out, n, ss);
  }
}

// M[j, :] += sum_ii vt[ii, j] * bt[ii, :] for j < w: a rank-kRows1 update of a w x rp tile.
// Eight columns at a time: eight independent accumulator chains, each bt row load serves eight FMAs.
SAFESHAPE_CLONES
void rank_update(float* __restrict M, const float* __restrict vt, int64_t ldv, const float* __restrict bt, int64_t w,
                 int64_t rp) {
  static_assert(kRank == 16, "the microkernels hold 16 rank columns in one vf16");
  constexpr int kCols = 8;
  int64_t j = 0;
  for (; j + kCols <= w; j += kCols) {
    for (int64_t k0 = 0; k0 < rp; k0 += kRank) {
      cpu::vf16 acc[kCols];
      for (int c = 0; c < kCols; ++c) acc[c] = cpu::load16(M + (j + c) * rp + k0);
      for (int ii = 0; ii < kRows1; ++ii) {
        const cpu::vf16 brow = cpu::load16(bt + ii * rp + k0);
        const float* vr = vt + ii * ldv + j;
        for (int c = 0; c < kCols; ++c) acc[c] += vr[c] * brow;
      }
      for (int c = 0; c < kCols; ++c) cpu::store16(M + (j + c) * rp + k0, acc[c]);
    }
  }
  for (; j < w; ++j) {
    float* m = M + j * rp;
    for (int64_t k0 = 0; k0 < rp; k0 += kRank) {
      cpu::vf16 acc = cpu::load16(m + k0);
      for (int ii = 0; ii < kRows1; ++ii) acc += vt[ii * ldv + j] * cpu::load16(bt + ii * rp + k0);
      cpu::store16(m + k0, acc);
    }
  }
}

SAFESHAPE_CLONES
void add_into(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// out[ii, :] = sum_j v[ii, j] * M[j, :] for ii < kRows2; v is kRows2 x d_in, M is d_in x rp, out kRows2 x rp.
// kRows2 independent accumulator chains; each M row load serves kRows2 FMAs.
SAFESHAPE_CLONES
void rows_times_m(float* __restrict out, const float* __restrict v, const float* __restrict M, int64_t d_in,
                  int64_t rp) {
  for (int64_t k0 = 0; k0 < rp; k0 += kRank) {
    cpu::vf16 total[kRows2] = {};
    for (int64_t jb = 0; jb < d_in; jb += kColBlock) {
      const int64_t je = std::min(jb + kColBlock, d_in);
      cpu::vf16 acc[kRows2] = {};
      for (int64_t j = jb; j < je; ++j) {
        const cpu::vf16 m = cpu::load16(M + j * rp + k0);
        for (int ii = 0; ii < kRows2; ++ii) acc[ii] += v[ii * d_in + j] * m;
      }
      for (int ii = 0; ii < kRows2; ++ii) total[ii] += acc[ii];
    }
    for (int ii = 0; ii < kRows2; ++ii) cpu::store16(out + ii * rp + k0, total[ii]);
  }
}

template <typename T>
double projection_pass1(const T* a, const T* b, const float* bt, float* M, int64_t d_out, int64_t d_in, int64_t rp) {
  // one tile per thread where possible (at least 256 columns, at most kCols1)
  const int64_t width = std::clamp<int64_t>(round_up((d_in + at::get_num_threads() - 1) / at::get_num_threads(), 16),
                                            256, kCols1);
  const int64_t ntiles = (d_in + width - 1) / width;
  std::vector<double> tile_ss(ntiles, 0.0);
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> vt(kRows1 * width, 0.f);
    std::vector<float> part(width * rp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * width;
      const int64_t w = std::min(width, d_in - j0);
      double ss = 0.0;
      for (int64_t rb = 0; rb < d_out; rb += kRowBlock) {
        const int64_t re = std::min(rb + kRowBlock, d_out);
        std::fill(part.begin(), part.begin() + w * rp, 0.f);
        for (int64_t i0 = rb; i0 < re; i0 += kRows1) {
          const int64_t rt = std::min(kRows1, re - i0);
          for (int64_t ii = 0; ii < rt; ++ii)
            diff_row(a + (i0 + ii) * d_in + j0, b + (i0 + ii) * d_in + j0, vt.data() + ii * width, w, &ss);
          for (int64_t ii = rt; ii < kRows1; ++ii) std::fill_n(vt.data() + ii * width, w, 0.f);
          // bt has kRows1 zero rows of padding past d_out, so a short last tile reads zeros.
          rank_update(part.data(), vt.data(), width, bt + i0 * rp, w, rp);
        }
        add_into(M + j0 * rp, part.data(), w * rp);
      }
      tile_ss[t] = ss;
    }
  });
  double total = 0.0;
  for (double s : tile_ss) total += s;
  return total;
}

template <typename T>
void projection_pass2(const T* a, const T* b, const float* M, float* out, float scale, int64_t d_out, int64_t d_in,
                      int64_t rp) {
  const int64_t nblocks = (d_out + kRows2 - 1) / kRows2;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(kRows2 * d_in, 0.f);
    std::vector<float> o(kRows2 * rp);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows2;
      const int64_t rt = std::min(kRows2, d_out - i0);
      for (int64_t ii = 0; ii < rt; ++ii)
        diff_row(a + (i0 + ii) * d_in, b + (i0 + ii) * d_in, v.data() + ii * d_in, d_in, nullptr);
      for (int64_t ii = rt; ii < kRows2; ++ii) std::fill_n(v.data() + ii * d_in, d_in, 0.f);
      rows_times_m(o.data(), v.data(), M, d_in, rp);
      for (int64_t ii = 0; ii < rt; ++ii)
        for (int64_t k = 0; k < rp; ++k) out[(i0 + ii) * rp + k] = o[ii * rp + k] * scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> project_lora_b_cpu(const at::Tensor& aligned, const at::Tensor& base,
                                                      const at::Tensor& lora_b) {
  const auto [d_out, d_in, r] = check_projection_args(aligned, base, lora_b, "project_lora_b");
  const at::Tensor a = aligned.contiguous();
  const at::Tensor b = base.contiguous();
  const int64_t rp = round_up(r, kRank);
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  // lora_b in float32, zero-padded to rp columns and kRows1 extra rows.
  at::Tensor bt = at::zeros({d_out + kRows1, rp}, f32);
  bt.narrow(0, 0, d_out).narrow(1, 0, r).copy_(lora_b);
  at::Tensor M = at::zeros({d_in, rp}, f32);
  at::Tensor out = at::empty({d_out, rp}, f32);
  double sumsq = 0.0;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    sumsq = projection_pass1<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                       bt.const_data_ptr<float>(), M.mutable_data_ptr<float>(), d_out, d_in, rp);
    const double norm = std::sqrt(sumsq);
    // V = 0 (aligned == base) gives C = 0: the projection removes the update.
    const float scale = norm > 0.0 ? static_cast<float>(1.0 / norm) : 0.f;
    projection_pass2<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                               M.const_data_ptr<float>(), out.mutable_data_ptr<float>(), scale, d_out, d_in, rp);
  };
  switch (a.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;  // check_projection_args admits only these three
  }
  at::Tensor projected = out.narrow(1, 0, r).to(lora_b.scalar_type()).contiguous();
  return {projected, at::scalar_tensor(std::sqrt(sumsq), f32)};
}

// acc[k, l] += sum_t x[t, k] * y[t, l] over rows [t0, t1) of row-major n x r matrices.
void cross_gram_rows(const double* x, const double* y, int64_t t0, int64_t t1, int64_t r, double* acc) {
  for (int64_t t = t0; t < t1; ++t) {
    const double* xr = x + t * r;
    const double* yr = y + t * r;
    for (int64_t k = 0; k < r; ++k) {
      const double xv = xr[k];
      double* ar = acc + k * r;
      for (int64_t l = 0; l < r; ++l) ar[l] += xv * yr[l];
    }
  }
}

at::Tensor lora_cosine_cpu(const at::Tensor& lora_b, const at::Tensor& projected_b, const at::Tensor& lora_a) {
  check_cosine_args(lora_b, projected_b, lora_a, "lora_cosine");
  const at::Tensor B = lora_b.to(at::kDouble).contiguous();
  const at::Tensor P = projected_b.to(at::kDouble).contiguous();
  const at::Tensor A = lora_a.to(at::kDouble).contiguous();
  const int64_t d_out = B.size(0), r = B.size(1), d_in = A.size(1);
  const double* bp = B.const_data_ptr<double>();
  const double* pp = P.const_data_ptr<double>();
  const double* ap = A.const_data_ptr<double>();

  // G = A A^T (r x r), one row of G per task.
  std::vector<double> G(r * r, 0.0);
  at::parallel_for(0, r, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t l = 0; l < r; ++l) {
        double s = 0.0;
        const double* ak = ap + k * d_in;
        const double* al = ap + l * d_in;
        for (int64_t j = 0; j < d_in; ++j) s += ak[j] * al[j];
        G[k * r + l] = s;
      }
  });

  // S1 = P^T B, S2 = P^T P, S3 = B^T B over fixed row chunks (deterministic order of summation).
  constexpr int64_t kChunk = 1024;
  const int64_t nchunks = std::max<int64_t>(1, (d_out + kChunk - 1) / kChunk);
  std::vector<double> parts(nchunks * 3 * r * r, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * kChunk, t1 = std::min(d_out, t0 + kChunk);
      double* s = parts.data() + c * 3 * r * r;
      cross_gram_rows(pp, bp, t0, t1, r, s);
      cross_gram_rows(pp, pp, t0, t1, r, s + r * r);
      cross_gram_rows(bp, bp, t0, t1, r, s + 2 * r * r);
    }
  });
  double tr[3] = {0.0, 0.0, 0.0};
  for (int64_t c = 0; c < nchunks; ++c)
    for (int q = 0; q < 3; ++q) {
      const double* s = parts.data() + (c * 3 + q) * r * r;
      for (int64_t k = 0; k < r; ++k)
        for (int64_t l = 0; l < r; ++l) tr[q] += s[k * r + l] * G[l * r + k];
    }
  double cosine = 0.0;  // defined as 0 when dW = 0 or C dW = 0
  if (tr[1] > 0.0 && tr[2] > 0.0) cosine = std::clamp(tr[0] / std::sqrt(tr[1] * tr[2]), 0.0, 1.0);
  return at::scalar_tensor(cosine, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(safeshape, CPU, m) {
  m.impl("project_lora_b", &project_lora_b_cpu);
  m.impl("lora_cosine", &lora_cosine_cpu);
}

}  // namespace safeshape
