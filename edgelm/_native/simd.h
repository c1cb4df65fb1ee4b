// edgelm native kernels: the SIMD layer.
//
// One code path is chosen at compile time from the flags the including module is built
// with (see setup.py):
//
//   EDGELM_FORCE_SCALAR                         -> portable C++ only (the _kern_scalar build)
//   __AVX2__ && __FMA__ && __F16C__             -> AVX2 intrinsics (_kern_avx2, and _kern_avx512,
//                                                  which reuses this path compiled with wider flags)
//   __aarch64__ && __ARM_NEON                   -> NEON intrinsics (_kern_neon)
//   anything else                               -> portable C++
//
// Everything above this layer is written against a tiny vector type `VF` of 8 floats and a
// handful of "load 32 weights of format X as 4 VF" helpers, so the kernels in kernels.h
// are shared by every ISA. Adding an ISA means adding one block here.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(EDGELM_FORCE_SCALAR)
#define EDGELM_PATH_SCALAR 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EDGELM_PATH_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define EDGELM_PATH_NEON 1
#include <arm_neon.h>
#else
#define EDGELM_PATH_SCALAR 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define EDGELM_INLINE inline __attribute__((always_inline))
#else
#define EDGELM_INLINE inline
#endif

namespace edgelm {

#if defined(EDGELM_PATH_AVX2)
constexpr const char* kCodePath = "avx2";
#elif defined(EDGELM_PATH_NEON)
constexpr const char* kCodePath = "neon";
#else
constexpr const char* kCodePath = "scalar";
#endif

// IEEE half -> float, exact for every input (subnormals, inf, nan included). Branch-free
// (selects only) so that loops over it vectorize in the portable build.
EDGELM_INLINE float half_to_float_portable(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                    // exponent and mantissa
    const uint32_t normal = (em << 13) + 0x38000000u;   // rebias the exponent: (127 - 15) << 23
    const uint32_t infnan = (em << 13) | 0x7f800000u;   // exponent all ones stays all ones
    const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f;  // em * 2^-24
    uint32_t subbits;
    std::memcpy(&subbits, &sub, 4);
    const uint32_t bits = sign | (em >= 0x7c00u ? infnan : (em >= 0x0400u ? normal : subbits));
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// float -> IEEE half, rounding to nearest even (as F16C's vcvtps2ph and numpy's astype do).
// Overflow gives inf; NaN gives a quiet NaN (payload not kept).
EDGELM_INLINE uint16_t float_to_half_portable(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
    if (ax >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65536 or inf
    if (ax >= 0x38800000u) {  // a normal half: rebias the exponent, round away 13 mantissa bits
        uint32_t h = (ax - 0x38000000u) >> 13;
        const uint32_t rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach inf: right
        return static_cast<uint16_t>(sign | h);
    }
    if (ax < 0x33000000u) return sign;  // below 2^-25: zero (2^-25 itself ties to even 0)
    // a subnormal half: round(|f| * 2^24) from the 24-bit significand
    const uint32_t shift = 126u - (ax >> 23);  // 14..24
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
}

// ============================================================================ AVX2 (+FMA, F16C)
#if defined(EDGELM_PATH_AVX2)

struct VF {
    __m256 v;
};

EDGELM_INLINE VF vzero() { return {_mm256_setzero_ps()}; }
EDGELM_INLINE VF vset1(float s) { return {_mm256_set1_ps(s)}; }
EDGELM_INLINE VF vloadu(const float* p) { return {_mm256_loadu_ps(p)}; }
EDGELM_INLINE void vstoreu(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
EDGELM_INLINE VF vadd(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
EDGELM_INLINE VF vmul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
// a * b + c
EDGELM_INLINE VF vfma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
EDGELM_INLINE float vhsum(VF a) {
    __m128 lo = _mm256_castps256_ps128(a.v);
    __m128 hi = _mm256_extractf128_ps(a.v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
EDGELM_INLINE float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
EDGELM_INLINE uint16_t float_to_half(float f) { return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }

EDGELM_INLINE void load32_f32(const float* p, VF* w) {
    for (int j = 0; j < 4; ++j) w[j].v = _mm256_loadu_ps(p + 8 * j);
}
EDGELM_INLINE void load32_f16(const uint16_t* p, VF* w) {
    for (int j = 0; j < 4; ++j)
        w[j].v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * j)));
}
// 8 halves -> 8 floats
EDGELM_INLINE VF vload8h(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
// 8 floats -> 8 halves, round to nearest even
EDGELM_INLINE void vstore8h(uint16_t* p, VF x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}
// 8 bytes at p -> 8 int32 lanes (vpmovsxbd / vpmovzxbd with a memory operand)
EDGELM_INLINE __m256i load8_i8_epi32(const void* p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}
EDGELM_INLINE __m256i load8_u8_epi32(const void* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}

EDGELM_INLINE void load32_i8(const int8_t* p, VF* w) {
    for (int j = 0; j < 4; ++j) w[j].v = _mm256_cvtepi32_ps(load8_i8_epi32(p + 8 * j));
}
// 16 bytes of Q4_0 nibbles -> 32 weights (nibble - 8): low nibbles are weights 0..15,
// high nibbles weights 16..31. Bytes are zero-extended to 32-bit lanes first, so the high
// nibble is a plain shift and the low one a mask.
EDGELM_INLINE void load32_i4(const uint8_t* p, VF* w) {
    const __m256i m = _mm256_set1_epi32(0x0f);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256i b0 = load8_u8_epi32(p);      // bytes 0..7
    const __m256i b1 = load8_u8_epi32(p + 8);  // bytes 8..15
    w[0].v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, m), eight));
    w[1].v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, m), eight));
    w[2].v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), eight));
    w[3].v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), eight));
}

// bf16 (the optional dot products of prefill attention, ops.h). A bf16 is a float's top 16
// bits. Rounding is to nearest even and subnormal inputs become signed zeros, as AVX512_BF16's
// vcvtneps2bf16 does; every build uses this integer form, so the native and the emulated
// dot products see the same bf16 values. Each 32-bit lane of the result holds the rounded
// value's bf16 bits in its high half and zeros below (NaN payloads are not kept).
EDGELM_INLINE __m256i bf16_round_hi(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i sub = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
    const __m256i v = _mm256_blendv_epi8(r, _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0x80000000u))), sub);
    return _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
}
EDGELM_INLINE uint16_t bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
EDGELM_INLINE float bf16_float(uint32_t b) {
    const uint32_t u = b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// acc + a . b over each lane's two bf16 (the high one's product first, then the low one's,
// each rounded: the order vdpbf16ps follows, so the emulation gives its bits exactly).
EDGELM_INLINE VF vdpbf16(VF acc, __m256i a, __m256i b) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    return {_mm256_dpbf16_ps(acc.v, (__m256bh)a, (__m256bh)b)};
#else
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    acc.v = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, hi)), _mm256_castsi256_ps(_mm256_and_si256(b, hi)),
                            acc.v);
    return {_mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                            acc.v)};
#endif
}

// ============================================================================ NEON (aarch64)
#elif defined(EDGELM_PATH_NEON)

struct VF {
    float32x4_t a, b;
};

EDGELM_INLINE VF vzero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
EDGELM_INLINE VF vset1(float s) { return {vdupq_n_f32(s), vdupq_n_f32(s)}; }
EDGELM_INLINE VF vloadu(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
EDGELM_INLINE void vstoreu(float* p, VF x) {
    vst1q_f32(p, x.a);
    vst1q_f32(p + 4, x.b);
}
EDGELM_INLINE VF vadd(VF x, VF y) { return {vaddq_f32(x.a, y.a), vaddq_f32(x.b, y.b)}; }
EDGELM_INLINE VF vmul(VF x, VF y) { return {vmulq_f32(x.a, y.a), vmulq_f32(x.b, y.b)}; }
// x * y + c
EDGELM_INLINE VF vfma(VF x, VF y, VF c) { return {vfmaq_f32(c.a, x.a, y.a), vfmaq_f32(c.b, x.b, y.b)}; }
EDGELM_INLINE float vhsum(VF x) { return vaddvq_f32(vaddq_f32(x.a, x.b)); }
EDGELM_INLINE float half_to_float(uint16_t h) { return half_to_float_portable(h); }
EDGELM_INLINE uint16_t float_to_half(float f) { return float_to_half_portable(f); }

// 16 signed bytes -> 2 VF
EDGELM_INLINE void widen16_i8(int8x16_t b, VF* w) {
    const int16x8_t h0 = vmovl_s8(vget_low_s8(b));
    const int16x8_t h1 = vmovl_high_s8(b);
    w[0].a = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h0)));
    w[0].b = vcvtq_f32_s32(vmovl_high_s16(h0));
    w[1].a = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h1)));
    w[1].b = vcvtq_f32_s32(vmovl_high_s16(h1));
}

EDGELM_INLINE void load32_f32(const float* p, VF* w) {
    for (int j = 0; j < 4; ++j) w[j] = vloadu(p + 8 * j);
}
EDGELM_INLINE void load32_f16(const uint16_t* p, VF* w) {
    for (int j = 0; j < 4; ++j) {
        const uint16x8_t h = vld1q_u16(p + 8 * j);
        w[j].a = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
        w[j].b = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
    }
}
EDGELM_INLINE VF vload8h(const uint16_t* p) {
    const uint16x8_t h = vld1q_u16(p);
    return {vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))), vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)))};
}
EDGELM_INLINE void vstore8h(uint16_t* p, VF x) {
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(x.a)));
    vst1_u16(p + 4, vreinterpret_u16_f16(vcvt_f16_f32(x.b)));
}
EDGELM_INLINE void load32_i8(const int8_t* p, VF* w) {
    widen16_i8(vld1q_s8(p), w);
    widen16_i8(vld1q_s8(p + 16), w + 2);
}
EDGELM_INLINE void load32_i4(const uint8_t* p, VF* w) {
    const uint8x16_t v = vld1q_u8(p);
    const int8x16_t eight = vdupq_n_s8(8);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), eight);
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
    widen16_i8(lo, w);
    widen16_i8(hi, w + 2);
}

// ============================================================================ portable C++
#else

struct VF {
    float v[8];
};

EDGELM_INLINE VF vzero() {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0.f;
    return r;
}
EDGELM_INLINE VF vset1(float s) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = s;
    return r;
}
EDGELM_INLINE VF vloadu(const float* p) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
}
EDGELM_INLINE void vstoreu(float* p, VF a) {
    for (int i = 0; i < 8; ++i) p[i] = a.v[i];
}
EDGELM_INLINE VF vadd(VF a, VF b) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
}
EDGELM_INLINE VF vmul(VF a, VF b) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
}
// a * b + c (two roundings unless the compiler contracts it; both are fine)
EDGELM_INLINE VF vfma(VF a, VF b, VF c) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
}
EDGELM_INLINE float vhsum(VF a) {
    return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7]));
}
EDGELM_INLINE float half_to_float(uint16_t h) { return half_to_float_portable(h); }
EDGELM_INLINE uint16_t float_to_half(float f) { return float_to_half_portable(f); }

EDGELM_INLINE void load32_f32(const float* p, VF* w) {
    for (int j = 0; j < 4; ++j) w[j] = vloadu(p + 8 * j);
}
EDGELM_INLINE void load32_f16(const uint16_t* p, VF* w) {
    for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 8; ++i) w[j].v[i] = half_to_float_portable(p[8 * j + i]);
}
EDGELM_INLINE VF vload8h(const uint16_t* p) {
    VF r;
    for (int i = 0; i < 8; ++i) r.v[i] = half_to_float_portable(p[i]);
    return r;
}
EDGELM_INLINE void vstore8h(uint16_t* p, VF x) {
    for (int i = 0; i < 8; ++i) p[i] = float_to_half_portable(x.v[i]);
}
EDGELM_INLINE void load32_i8(const int8_t* p, VF* w) {
    for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 8; ++i) w[j].v[i] = static_cast<float>(p[8 * j + i]);
}
EDGELM_INLINE void load32_i4(const uint8_t* p, VF* w) {
    for (int i = 0; i < 16; ++i) {
        w[i >> 3].v[i & 7] = static_cast<float>(static_cast<int>(p[i] & 0x0f) - 8);
        w[2 + (i >> 3)].v[i & 7] = static_cast<float>(static_cast<int>(p[i] >> 4) - 8);
    }
}

#endif

}  // namespace edgelm
