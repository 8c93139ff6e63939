// Does one core overlap its reads of memory with its arithmetic? (bench/NOTES.md, issue 14, third round)
// Reads two 64 MiB float32 arrays the way pass 2 of project_lora_b does (three rows of each at a time), with K
// rounds of 24 independent FMAs per vector read, and once with the same FMAs on register data only. If the
// memory system overlapped the two, "reads + FMAs" would take max(reads, FMAs); on the machines this project was
// measured on it takes their sum.
//   g++ -O2 -mavx2 -mfma bench/overlap_probe.cpp -o /tmp/overlap_probe && /tmp/overlap_probe
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace {
constexpr long kRows = 4096, kCols = 4096;
float* A;
float* B;

template <int K>
float run(bool read_memory) {
  __m256 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(1.0001f);
  for (long i0 = 0; i0 + 3 <= kRows; i0 += 3)
    for (long j = 0; j < kCols; j += 8) {
      __m256 v[3];
      for (int r = 0; r < 3; ++r)
        v[r] = read_memory ? _mm256_sub_ps(_mm256_loadu_ps(A + (i0 + r) * kCols + j),
                                           _mm256_loadu_ps(B + (i0 + r) * kCols + j))
                           : _mm256_set1_ps(static_cast<float>(j + r));
      for (int k = 0; k < K; ++k)
        for (int q = 0; q < 8; ++q)
          for (int r = 0; r < 3; ++r) acc[r * 8 + q] = _mm256_fmadd_ps(v[r], m, acc[r * 8 + q]);
    }
  __m256 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}

template <class F>
double best_ms(F f) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    volatile float sink = f();
    (void)sink;
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}
}  // namespace

int main() {
  A = static_cast<float*>(std::aligned_alloc(64, kRows * kCols * 4));
  B = static_cast<float*>(std::aligned_alloc(64, kRows * kCols * 4));
  for (long i = 0; i < kRows * kCols; ++i) {
    A[i] = static_cast<float>(i % 7);
    B[i] = static_cast<float>(i % 5);
  }
  std::printf("one core, 2 x 64 MiB float32, best of 5\n");
  const double reads = best_ms([] { return run<1>(true); });  // K = 1 is light enough to be read-bound
  std::printf("%-34s %8.2f ms\n", "reads (+ 1 FMA round)", reads);
  for (const int k : {2, 4}) {
    const double fmas = k == 2 ? best_ms([] { return run<2>(false); }) : best_ms([] { return run<4>(false); });
    const double both = k == 2 ? best_ms([] { return run<2>(true); }) : best_ms([] { return run<4>(true); });
    std::printf("K=%d: FMAs alone %7.2f ms, reads + FMAs %7.2f ms (max %.2f, sum %.2f)\n", k, fmas, both,
                std::max(reads, fmas), reads + fmas);
  }
}
