// CPU kernels of the Safe LoRA ops (docs/math.md#safe-lora-without-forming-c).
//   project_lora_b: pass 1 reads both weights chunk by chunk and accumulates M = V^T B (as its transpose) and
//                   ||V||^2 in float64; pass 2 reads them again and forms B' = V M / ||V|| (float32). V is never
//                   stored whole.
//                   The vector kernels are in projection_kernels.inc, one copy per ISA, chosen at run time.
//   lora_cosine:    cos(C dW, dW) through r x r Gram matrices, accumulated in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "safeshape/ops.h"
#include "cpu_kernels.h"

namespace safeshape {
namespace {

constexpr int64_t kRankPad = 8;  // pass 1: lora_b's columns are zero-padded to a multiple of its blocks' ranks
constexpr int64_t kRank2 = 16;   // pass 2: rank columns per register block (M is padded to a multiple)

// One namespace per ISA path: the same source (projection_kernels.inc) compiled for its target.
namespace isa_generic {
constexpr int kVecRegs = 16, kVecBytes = 16;
#include "projection_kernels.inc"
}  // namespace isa_generic
#if defined(__x86_64__) && defined(__GNUC__)
#define SAFESHAPE_HAVE_ISA_PATHS 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
constexpr int kVecRegs = 16, kVecBytes = 32;
#include "projection_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
constexpr int kVecRegs = 32, kVecBytes = 64;
#include "projection_kernels.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// f(Kernels{}) with the Kernels of the path cpu::active_isa() names.
template <typename F>
void with_kernels(F&& f) {
#ifdef SAFESHAPE_HAVE_ISA_PATHS
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512: return f(isa_avx512::Kernels{});
    case cpu::Isa::kAvx2: return f(isa_avx2::Kernels{});
    default: break;
  }
#endif
  f(isa_generic::Kernels{});
}

// SAFESHAPE_PROFILE=1 in the environment: each project_lora_b call prints its two passes' times to stderr.
bool profile_passes() {
  static const bool on = [] {
    const char* e = std::getenv("SAFESHAPE_PROFILE");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  return on;
}

std::tuple<at::Tensor, at::Tensor> project_lora_b_cpu(const at::Tensor& aligned, const at::Tensor& base,
                                                      const at::Tensor& lora_b) {
  const auto [d_out, d_in, r] = check_projection_args(aligned, base, lora_b, "project_lora_b");
  const at::Tensor a = aligned.contiguous();
  const at::Tensor b = base.contiguous();
  const int64_t rp = cpu::round_up(r, kRankPad);
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  auto f64 = f32.dtype(at::kDouble);
  // lora_b in float64, zero-padded to rp columns.
  at::Tensor bt = at::zeros({d_out, rp}, f64);
  bt.narrow(1, 0, r).copy_(lora_b);
  const int64_t rp2 = cpu::round_up(r, kRank2);
  at::Tensor M32 = at::zeros({d_in, rp2}, f32);  // M = V^T B from pass 1, rounded to float32, zero-padded to rp2
  at::Tensor out = at::empty({d_out, rp2}, f32);
  double sumsq = 0.0;
  auto run = [&](auto tag, auto kernels) {
    using scalar_t = decltype(tag);
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    sumsq = kernels.pass1(pa, pb, bt.const_data_ptr<double>(), M32.mutable_data_ptr<float>(), d_out, d_in, rp,
                          rp2);
    const double norm = std::sqrt(sumsq);
    // V = 0 (aligned == base) gives C = 0: the projection removes the update. A NaN norm stays NaN.
    const float scale = norm == 0.0 ? 0.f : static_cast<float>(1.0 / norm);
    const auto t1 = clock::now();
    kernels.pass2(pa, pb, M32.const_data_ptr<float>(), out.mutable_data_ptr<float>(), scale, d_out, d_in, r,
                  rp2);
    if (profile_passes()) {
      const auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
      std::fprintf(stderr, "safeshape-profile project_lora_b %lldx%lld r=%lld pass1_ms=%.3f pass2_ms=%.3f\n",
                   static_cast<long long>(d_out), static_cast<long long>(d_in), static_cast<long long>(r),
                   ms(t1 - t0), ms(clock::now() - t1));
    }
  };
  with_kernels([&](auto kernels) {
    switch (a.scalar_type()) {
      case at::kFloat: run(float{}, kernels); break;
      case at::kBFloat16: run(c10::BFloat16{}, kernels); break;
      default: run(c10::Half{}, kernels); break;  // check_projection_args admits only these three
    }
  });
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
  double cosine = 0.0;  // defined as 0 when dW = 0 or C dW = 0; NaN when an input is not finite
  if (!std::isfinite(tr[0]) || !std::isfinite(tr[1]) || !std::isfinite(tr[2])) {
    cosine = std::numeric_limits<double>::quiet_NaN();
  } else if (tr[1] > 0.0 && tr[2] > 0.0) {
    cosine = std::clamp(tr[0] / std::sqrt(tr[1] * tr[2]), 0.0, 1.0);
  }
  return at::scalar_tensor(cosine, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

FmaRate cpu_fma_rate(double seconds) {
  FmaRate rate{0.0, 0.0};
  with_kernels([&](auto kernels) {
    rate.float64 = kernels.fma_rate_f64(seconds);
    rate.float32 = kernels.fma_rate_f32(seconds);
  });
  return rate;
}

TORCH_LIBRARY_IMPL(safeshape, CPU, m) {
  m.impl("project_lora_b", &project_lora_b_cpu);
  m.impl("lora_cosine", &lora_cosine_cpu);
}

}  // namespace safeshape
