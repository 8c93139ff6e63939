// active_isa(): which hand-dispatched CPU code path runs (cpu_kernels.h).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "cpu_kernels.h"

namespace safeshape::cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  // the feature sets of GCC's x86-64-v3 / x86-64-v4, which the kernels are compiled for
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  return isa == Isa::kGeneric || (isa == Isa::kAvx2 && v3) || (isa == Isa::kAvx512 && v4);
#else
  return isa == Isa::kGeneric;
#endif
}

Isa select_isa() {
  const char* env = std::getenv("SAFESHAPE_ISA");
  const std::string want = env ? env : "";
  if (want.empty()) return cpu_has(Isa::kAvx512) ? Isa::kAvx512 : cpu_has(Isa::kAvx2) ? Isa::kAvx2 : Isa::kGeneric;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric}) {
    if (want != isa_name(isa)) continue;
    TORCH_CHECK(cpu_has(isa), "SAFESHAPE_ISA=", want, ": this CPU does not support ", want);
    return isa;
  }
  TORCH_CHECK(false, "SAFESHAPE_ISA=", want, ": expected avx512, avx2 or generic");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

Isa active_isa() {
  static const Isa isa = select_isa();
  return isa;
}

}  // namespace safeshape::cpu
