// Peak issue rates of one core for the two operations that bound a prefill: vpdpbusd on
// 256-bit vectors (the integer GEMM's multiply-accumulate: 32 int8 MACs each) and vfmadd on
// 256-bit vectors (float attention: 8 MACs each), and the rate of vpdpbusd when other
// operations are mixed in (which of them share its pipes). Twelve independent accumulator
// chains, so that latency does not limit the rate; the best of 5 timed loops. Built and run
// by `python benchmarks/microbench.py isa-peak` (with the avx512 build's flags).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#define EDGELM_R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// MODE 0: vpdpbusd only; 1: vfmadd only; 2-5: vpdpbusd with, per 4 of them, one more op
// (2: vfmadd, 3: vcvtdq2ps, 4: vpaddd, 5: vcvtph2ps); 6: one vpsignb per vpdpbusd; 7: vdpbf16ps
// only (bf16 attention's dot product: 16 MACs; run only on CPUs with AVX512_BF16). The
// mixed-in operand passes through an empty asm first, so that it is computed in the loop.
template <int MODE>
static double seconds(long iters) {
#define EDGELM_DECL(i) __m256i a##i = _mm256_set1_epi32(i); __m256 f##i = _mm256_set1_ps(static_cast<float>(i));
    EDGELM_R12(EDGELM_DECL)
    __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2);
    __m256 x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
    __m128i h = _mm_set1_epi16(0x3c00);
    __asm__ volatile("" : "+v"(u), "+v"(s), "+v"(x), "+v"(y), "+v"(h));
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) {
#define EDGELM_BODY(i)                                                                               \
    if (MODE != 1 && MODE != 7) a##i = _mm256_dpbusd_epi32(a##i, u, s);                              \
    if (MODE == 1) f##i = _mm256_fmadd_ps(x, y, f##i);                                               \
    if (MODE == 7) f##i = _mm256_dpbf16_ps(f##i, (__m256bh)u, (__m256bh)s);                          \
    if (MODE == 2 && i % 4 == 0) f##i = _mm256_fmadd_ps(x, y, f##i);                                 \
    if (MODE == 3 && i % 4 == 0) { __m256i t = u; __asm__ volatile("" : "+v"(t)); f##i = _mm256_cvtepi32_ps(t); } \
    if (MODE == 4 && i % 4 == 0) { __m256i t = u; __asm__ volatile("" : "+v"(t)); t = _mm256_add_epi32(t, s); f##i = _mm256_castsi256_ps(t); } \
    if (MODE == 5 && i % 4 == 0) { __m128i t = h; __asm__ volatile("" : "+v"(t)); f##i = _mm256_cvtph_ps(t); } \
    if (MODE == 6) { __m256i t = u; __asm__ volatile("" : "+v"(t)); t = _mm256_sign_epi8(t, s); f##i = _mm256_castsi256_ps(t); } \
    __asm__ volatile("" : "+v"(a##i), "+v"(f##i));
        EDGELM_R12(EDGELM_BODY)
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <int MODE>
static double best(long iters) {
    double t = 1e30;
    for (int r = 0; r < 5; ++r) t = std::min(t, seconds<MODE>(iters));
    return t;
}

int main() {
    const long iters = 20000000;
    const double n = 12.0 * static_cast<double>(iters);
    const double dp = best<0>(iters);
    std::printf("vpdpbusd_ymm_per_s %.4g\n", n / dp);
    std::printf("vfmadd_ymm_per_s %.4g\n", n / best<1>(iters));
    // time of the vpdpbusd stream with the extra operations / time without them
    std::printf("slowdown_fma_1_per_4 %.3f\n", best<2>(iters) / dp);
    std::printf("slowdown_cvtdq2ps_1_per_4 %.3f\n", best<3>(iters) / dp);
    std::printf("slowdown_vpaddd_1_per_4 %.3f\n", best<4>(iters) / dp);
    std::printf("slowdown_cvtph2ps_1_per_4 %.3f\n", best<5>(iters) / dp);
    std::printf("slowdown_vpsignb_1_per_1 %.3f\n", best<6>(iters) / dp);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16")) std::printf("vdpbf16ps_ymm_per_s %.4g\n", n / best<7>(iters));
    return 0;
}
