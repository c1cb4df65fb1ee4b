// edgelm native kernels: vector exp / tanh on VF (8 floats), and a few VF helpers the fused
// ops need. AVX2 has intrinsic versions; every other path runs the same polynomial per lane
// (branch-free, so the portable build auto-vectorizes it).
//
// exp: Cephes expf (range reduction by ln2 in two parts, degree-6 polynomial), max relative
//      error ~2 ulp on [-87.3, 88.7]; inputs below -87.33 (including -inf) give exactly 0, so
//      masked attention scores vanish. Inputs above 88.7 saturate at ~2^128 (no inf).
// tanh: Eigen's rational approximation (odd degree-13 numerator / degree-6 denominator),
//      clamped at |x| = 7.905 where float tanh is +-1; max abs error ~1e-7 (a few ulp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace edgelm {

namespace vm {
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365447504f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kC1 = 0.693359375f;
constexpr float kC2 = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500E-4f, kP1 = 1.3981999507E-3f, kP2 = 8.3334519073E-3f,
                kP3 = 4.1665795894E-2f, kP4 = 1.6666665459E-1f, kP5 = 5.0000001201E-1f;
constexpr float kTanhClamp = 7.90531110763549805f;
constexpr float kA1 = 4.89352455891786e-03f, kA3 = 6.37261928875436e-04f, kA5 = 1.48572235717979e-05f,
                kA7 = 5.12229709037114e-08f, kA9 = -8.60467152213735e-11f, kA11 = 2.00018790482477e-13f,
                kA13 = -2.76076847742355e-16f;
constexpr float kB0 = 4.89352518554385e-03f, kB2 = 2.26843463243900e-03f, kB4 = 1.18534705686654e-04f,
                kB6 = 1.19825839466702e-06f;
}  // namespace vm

// Scalar versions (same algorithms).
EDGELM_INLINE float exp_scalar(float x0) {
    using namespace vm;
    float x = x0 < kExpHi ? x0 : kExpHi;
    x = x > kExpLo ? x : kExpLo;
    const float fx = std::nearbyint(x * kLog2e);
    x = x - fx * kC1;
    x = x - fx * kC2;
    const float z = x * x;
    float y = kP0;
    y = y * x + kP1;
    y = y * x + kP2;
    y = y * x + kP3;
    y = y * x + kP4;
    y = y * x + kP5;
    y = y * z + x + 1.f;
    const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
    float p2;
    std::memcpy(&p2, &e, 4);
    const float r = y * p2;
    return x0 < kExpLo ? 0.f : r;
}

EDGELM_INLINE float tanh_scalar(float x0) {
    using namespace vm;
    float x = x0 < kTanhClamp ? x0 : kTanhClamp;
    x = x > -kTanhClamp ? x : -kTanhClamp;
    const float x2 = x * x;
    float p = x2 * kA13 + kA11;
    p = p * x2 + kA9;
    p = p * x2 + kA7;
    p = p * x2 + kA5;
    p = p * x2 + kA3;
    p = p * x2 + kA1;
    p = p * x;
    float q = x2 * kB6 + kB4;
    q = q * x2 + kB2;
    q = q * x2 + kB0;
    const float r = p / q;
    return std::fabs(x0) < 0.0004f ? x0 : r;
}

#if defined(EDGELM_PATH_AVX2)

EDGELM_INLINE VF vsub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
EDGELM_INLINE VF vmax(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
EDGELM_INLINE float vhmax(VF a) {
    __m128 lo = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

EDGELM_INLINE VF vexp(VF in) {
    using namespace vm;
    const __m256 x0 = in.v;
    __m256 x = _mm256_min_ps(x0, _mm256_set1_ps(kExpHi));
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpLo));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kC1), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kC2), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(kP0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP5));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    const __m256 under = _mm256_cmp_ps(x0, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
    return {_mm256_andnot_ps(under, r)};
}

EDGELM_INLINE VF vtanh(VF in) {
    using namespace vm;
    const __m256 x0 = in.v;
    __m256 x = _mm256_min_ps(x0, _mm256_set1_ps(kTanhClamp));
    x = _mm256_max_ps(x, _mm256_set1_ps(-kTanhClamp));
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(kA13), _mm256_set1_ps(kA11));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kA9));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kA7));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kA5));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kA3));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kA1));
    p = _mm256_mul_ps(p, x);
    __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(kB6), _mm256_set1_ps(kB4));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kB2));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kB0));
    const __m256 r = _mm256_div_ps(p, q);
    const __m256 absx = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x0);
    const __m256 tiny = _mm256_cmp_ps(absx, _mm256_set1_ps(0.0004f), _CMP_LT_OQ);
    return {_mm256_blendv_ps(r, x0, tiny)};
}

#else

EDGELM_INLINE VF vsub(VF a, VF b) {
    float pa[8], pb[8];
    vstoreu(pa, a);
    vstoreu(pb, b);
    for (int i = 0; i < 8; ++i) pa[i] -= pb[i];
    return vloadu(pa);
}
EDGELM_INLINE VF vmax(VF a, VF b) {
    float pa[8], pb[8];
    vstoreu(pa, a);
    vstoreu(pb, b);
    for (int i = 0; i < 8; ++i) pa[i] = pa[i] > pb[i] ? pa[i] : pb[i];
    return vloadu(pa);
}
EDGELM_INLINE float vhmax(VF a) {
    float p[8];
    vstoreu(p, a);
    float m = p[0];
    for (int i = 1; i < 8; ++i) m = p[i] > m ? p[i] : m;
    return m;
}
EDGELM_INLINE VF vexp(VF a) {
    float p[8];
    vstoreu(p, a);
    for (int i = 0; i < 8; ++i) p[i] = exp_scalar(p[i]);
    return vloadu(p);
}
EDGELM_INLINE VF vtanh(VF a) {
    float p[8];
    vstoreu(p, a);
    for (int i = 0; i < 8; ++i) p[i] = tanh_scalar(p[i]);
    return vloadu(p);
}

#endif

}  // namespace edgelm
