// Peak issue rates of one core for the two operations that bound a prefill: vpdpbusd on
// 256-bit vectors (the integer GEMM's multiply-accumulate: 32 int8 MACs each) and vfmadd on
// 256-bit vectors (float attention: 8 MACs each). Twelve independent accumulator chains, so
// that latency does not limit the rate; the best of 5 timed loops. Built and run by
// `python benchmarks/microbench.py isa-peak` (with the avx512 build's flags).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#define EDGELM_R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

template <bool DP>
static double ops_per_second(long iters) {
#define EDGELM_DECL(i) __m256i a##i = _mm256_set1_epi32(i); __m256 f##i = _mm256_set1_ps(static_cast<float>(i));
    EDGELM_R12(EDGELM_DECL)
    __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2);
    __m256 x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
    __asm__ volatile("" : "+v"(u), "+v"(s), "+v"(x), "+v"(y));
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) {
#define EDGELM_BODY(i)                                        \
    if (DP) a##i = _mm256_dpbusd_epi32(a##i, u, s);           \
    else f##i = _mm256_fmadd_ps(x, y, f##i);                  \
    __asm__ volatile("" : "+v"(a##i), "+v"(f##i));
        EDGELM_R12(EDGELM_BODY)
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 12.0 * static_cast<double>(iters) / dt;
}

int main() {
    const long iters = 20000000;
    double dp = 0, fma = 0;
    for (int r = 0; r < 5; ++r) {
        dp = std::max(dp, ops_per_second<true>(iters));
        fma = std::max(fma, ops_per_second<false>(iters));
    }
    std::printf("vpdpbusd_ymm_per_s %.4g\nvfmadd_ymm_per_s %.4g\n", dp, fma);
    return 0;
}
