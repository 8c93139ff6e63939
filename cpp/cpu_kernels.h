// Small CPU building blocks shared by the CPU kernels: function multiversioning so that one wheel runs the
// AVX-512 / AVX2 code paths where the CPU has them, and dtype conversion to float32.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define SAFESHAPE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAFESHAPE_CLONES
#endif

namespace safeshape::cpu {

// 16 floats as one value: one zmm with AVX-512, two ymm with AVX2, four xmm otherwise. Written explicitly so the
// compiler vectorises over the rank dimension instead of guessing (it shuffled across rows when left alone).
typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));

// always_inline: these are also called from kernels compiled for a wider ISA (#pragma GCC target), where an
// out-of-line default-ISA copy would pass vectors through memory.
[[gnu::always_inline]] inline vf16 load16(const float* p) { return *reinterpret_cast<const vf16*>(p); }
[[gnu::always_inline]] inline void store16(float* p, vf16 v) { *reinterpret_cast<vf16*>(p) = v; }

[[gnu::always_inline]] inline double hsum(vf16 v) {
  double s = 0.0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

typedef uint16_t vu16x16 __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t vu32x16 __attribute__((vector_size(64)));

// 16 bfloat16 values (raw bits) to float32: widen and shift into the high half.
[[gnu::always_inline]] inline vf16 bf16x16_to_float(const uint16_t* p) {
  const vu32x16 w = __builtin_convertvector(*reinterpret_cast<const vu16x16*>(p), vu32x16) << 16;
  vf16 f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Run-time choice of the vector code path for kernels that dispatch by hand (the projection kernels; the
// target_clones ones follow the CPU). SAFESHAPE_ISA=avx512|avx2|generic forces a path (for tests and benchmarks);
// a path the CPU lacks, or an unknown name, is an error. Read once per process.
enum class Isa { kGeneric, kAvx2, kAvx512 };
Isa active_isa();
const char* isa_name(Isa isa);

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace safeshape::cpu
