// edgelm native kernels: "qd8" integer matmuls. The activation rows of one matmul call are
// quantized once to int8 with one float scale per 32 values (ggml Q8_0-style), and every
// integer weight scheme is then multiplied with integer dot products:
//
//   y[i, r] = rs_r * sum_b  dw_{r,b} * dx_{i,b} * sum_{k in b} qw_{r,k} * qx_{i,k}
//
//   activation block b of row i:  amax = max|x|, dx = amax / 127, qx = rint(x * (127 / amax))
//   (|qx| <= 127; amax == 0 gives dx = 0, qx = 0). int4 weights are the unsigned nibbles u
//   with qw = u - 8; the kernels compute sum u*qx and subtract 8 * sum qx (exact, in int32).
//   int8 per-row: dw = 1, rs = the row scale; blocked schemes: rs = 1, dw = the block scale
//   (int4-b128: one dw for 4 activation blocks). A partial last block (int8 per-row only,
//   cols % 32 != 0) is quantized with its own amax.
//
// Quantized values are bitwise identical on every ISA (same float ops, round-to-nearest-even);
// integer sums are exact; only the order of the float accumulation of the per-block terms
// differs between the scalar and AVX2 kernels. docs/kernels.md derives the error bound.
//
// AVX2: int8 weights use the sign trick (|w| unsigned x sign-adjusted x in vpmaddubsw);
// int4 weights take two blocks (32 bytes of nibbles) per step: the low nibbles are weights
// 0..15 of both blocks and the high nibbles weights 16..31, so the activations of a block
// pair are stored pre-shuffled to match ("pair layout", with each pair's per-lane scale and
// offset-correction vectors next to it). Everything else stores activations in order.
#pragma once

#include <algorithm>
#include <array>
#include <utility>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "simd.h"
#include "threadpool.h"

#if defined(__GNUC__) || defined(__clang__)
#define EDGELM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define EDGELM_INLINE_LAMBDA
#endif

namespace edgelm {

#if defined(EDGELM_PATH_AVX2)
constexpr bool kQd8Fast = true;  // auto mode uses qd8 for integer schemes
#else
constexpr bool kQd8Fast = false;  // the portable qd8 code is for agreement tests, not speed
#endif

inline bool qd8_scheme(int scheme) { return scheme >= kINT8 && scheme <= kINT4B128; }

// ----------------------------------------------------------------------------- activations

struct QAct {
    int64_t n = 0, cols = 0;
    int64_t nb = 0;    // full 32-blocks
    int64_t nbt = 0;   // blocks including a partial tail
    bool pairs = false;
    bool gemm = false;   // natural layout with c = 8 dx sx (float) in place of s: the packed GEMM (int4 reads c)
    bool u8 = false;     // natural layout, int8 weights, n > 1, VNNI builds: the bytes hold qx + 128 (q8_tile, q8_gemm_tile)
    bool xt = false;     // 2 <= n < kGemmMinN, VNNI builds: the transposed copy xtb (xt_band)
    bool xt4 = false;    // ... for int4 weights (c terms in place of corr)
    const uint8_t* xtb = nullptr;  // groups of 8 rows, xts bytes each: per block [8 x 32 bytes of quads][dx 8 floats]
    int64_t xts = 0;
    uint8_t* base = nullptr;
    int64_t stride = 0;  // bytes per activation row
    // natural layout: [q int8 nbt*32][d float nbt][s int32 nbt]
    const int8_t* q(int64_t i) const { return reinterpret_cast<const int8_t*>(base + i * stride); }
    const float* d(int64_t i) const { return reinterpret_cast<const float*>(base + i * stride + nbt * 32); }
    const int32_t* s(int64_t i) const {
        return reinterpret_cast<const int32_t*>(base + i * stride + nbt * 32 + nbt * 4);
    }
    const float* c(int64_t i) const { return reinterpret_cast<const float*>(s(i)); }
    // pair layout: units of 128 bytes: [xa 32][xb 32][dvec 8 float][cvec 8 int32], then
    // one 64-byte group per 8 full blocks for the one-row GEMV (q4_gemv): [dx 8 float][c 8
    // int32], both in the lane order of its horizontal sums, blocks 0,2,4,6,1,3,5,7.
    int64_t ngroups = 0;
    const uint8_t* unit(int64_t i, int64_t u) const { return base + i * stride + 128 * u; }
    const uint8_t* group(int64_t i, int64_t g) const { return base + i * stride + 128 * ((nb + 1) / 2) + 64 * g; }
};

// Quantizes one block of L <= 32 values: writes 32 int8 (zero padded), returns dx and sum q.
EDGELM_INLINE void quant_block_scalar(const float* x, int L, int8_t* q, float* d, int32_t* s) {
    float amax = 0.f;
    for (int k = 0; k < L; ++k) {
        const float a = std::fabs(x[k]);
        amax = a > amax ? a : amax;
    }
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int k = 0; k < 32; ++k) {
        int v = 0;
        if (k < L) {
            float r = std::nearbyint(x[k] * id);
            if (!(r == r)) r = 0.f;
            r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
            v = static_cast<int>(r);
        }
        q[k] = static_cast<int8_t>(v);
        sum += v;
    }
    *d = amax / 127.f;
    *s = sum;
}

#if defined(EDGELM_PATH_AVX2)
// 32 floats -> 32 int8 in order; returns dx, sum.
EDGELM_INLINE __m256i quant_block_avx2(const float* x, float* d, int32_t* s) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vid));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    *s = _mm_cvtsi128_si32(t4);
    *d = amax / 127.f;
    const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b = _mm256_packs_epi16(p01, p23);
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// Quantizes activation row i of x (length cols) into A.
inline void quant_row(const float* x, const QAct& A, int64_t i) {
    uint8_t* row = A.base + i * A.stride;
#if defined(EDGELM_PATH_AVX2)
    if (A.pairs) {
        const int64_t nu = (A.nb + 1) / 2;
        for (int64_t u = 0; u < nu; ++u) {
            uint8_t* un = row + 128 * u;
            float d0 = 0.f, d1 = 0.f;
            int32_t s0 = 0, s1 = 0;
            const __m256i b0 = quant_block_avx2(x + 64 * u, &d0, &s0);
            __m256i b1 = _mm256_setzero_si256();
            if (2 * u + 1 < A.nb) b1 = quant_block_avx2(x + 64 * u + 32, &d1, &s1);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(un), _mm256_permute2x128_si256(b0, b1, 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(un + 32), _mm256_permute2x128_si256(b0, b1, 0x31));
            _mm256_storeu_ps(reinterpret_cast<float*>(un + 64), _mm256_setr_ps(d0, d0, d0, d0, d1, d1, d1, d1));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(un + 96),
                                _mm256_setr_epi32(8 * s0, 0, 0, 0, 8 * s1, 0, 0, 0));
            if (u / 4 < A.ngroups) {  // pair u = 4g + k holds blocks 2u (lane k) and 2u + 1 (lane 4 + k)
                uint8_t* gr = row + 128 * nu + 64 * (u / 4);
                const int k = static_cast<int>(u % 4);
                const int32_t c0 = 8 * s0, c1 = 8 * s1;
                std::memcpy(gr + 4 * k, &d0, 4);
                std::memcpy(gr + 4 * (4 + k), &d1, 4);
                std::memcpy(gr + 32 + 4 * k, &c0, 4);
                std::memcpy(gr + 32 + 4 * (4 + k), &c1, 4);
            }
        }
        return;
    }
#endif
    int8_t* q = reinterpret_cast<int8_t*>(row);
    float* d = reinterpret_cast<float*>(row + A.nbt * 32);
    int32_t* s = reinterpret_cast<int32_t*>(row + A.nbt * 32 + A.nbt * 4);
    for (int64_t b = 0; b < A.nb; ++b) {
#if defined(EDGELM_PATH_AVX2)
        __m256i qb = quant_block_avx2(x + 32 * b, d + b, s + b);
        if (A.u8) qb = _mm256_xor_si256(qb, _mm256_set1_epi8(static_cast<char>(0x80)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), qb);
#else
        quant_block_scalar(x + 32 * b, 32, q + 32 * b, d + b, s + b);
#endif
    }
    if (A.nbt > A.nb) {
        quant_block_scalar(x + 32 * A.nb, static_cast<int>(A.cols - 32 * A.nb), q + 32 * A.nb, d + A.nb, s + A.nb);
        if (A.u8)
            for (int k = 0; k < 32; ++k) q[32 * A.nb + k] = static_cast<int8_t>(static_cast<uint8_t>(q[32 * A.nb + k]) ^ 0x80u);
    }
    if (A.gemm)
        for (int64_t b = 0; b < A.nbt; ++b) {
            const float c = 8.f * d[b] * static_cast<float>(s[b]);
            std::memcpy(s + b, &c, 4);
        }
}

// ----------------------------------------------------------------------------- tiles

using QTileFn = void (*)(const WView&, int64_t, int64_t, const QAct&, int64_t, float*, int64_t);

#if defined(EDGELM_PATH_AVX2)

EDGELM_INLINE float hsum8(__m256 a) { return vhsum(VF{a}); }

// AVX-512 VNNI: vpdpbusd adds, to each int32 lane, the four products of its unsigned bytes
// of u with the signed bytes of s, exactly (no int16 stage, no saturation). It replaces the
// vpmaddubsw (+ vpaddw) + vpmaddwd sequences below. The 256-bit form needs AVX512VL, which
// the avx512 build has. EDGELM_VNNI_EMULATE (the `vnniemu` test build, AVX2 flags) computes
// the same sums with AVX2 instructions, so that the VNNI code paths are tested on CPUs
// without VNNI: bytes widened to int16 (products fit: 255 * 128 = 32640), multiplied, and
// the even and odd products summed pairwise into int32.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EDGELM_VNNI 1
EDGELM_INLINE __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(EDGELM_VNNI_EMULATE)
#define EDGELM_VNNI 1
EDGELM_INLINE __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
    const __m256i lo8 = _mm256_set1_epi16(0x00ff), ones = _mm256_set1_epi16(1);
    const __m256i ue = _mm256_and_si256(u, lo8), uo = _mm256_srli_epi16(u, 8);
    const __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    const __m256i pe = _mm256_madd_epi16(_mm256_mullo_epi16(ue, se), ones);
    const __m256i po = _mm256_madd_epi16(_mm256_mullo_epi16(uo, so), ones);
    return _mm256_add_epi32(acc, _mm256_add_epi32(pe, po));
}
#endif
#if defined(EDGELM_VNNI)
// acc - 128 * (the lane sums of the signed bytes w, four per lane): added to the sums of
// unsigned activations (qx + 128) times w, it leaves the exact sums of qx times w.
EDGELM_INLINE __m256i sub_128_wsum(__m256i acc, __m256i w) {
    return _mm256_sub_epi32(acc, dpbusd(_mm256_setzero_si256(), _mm256_set1_epi8(static_cast<char>(0x80)), w));
}
#endif
// The block scales of pair p (blocks 2p, 2p + 1) in the pair lanes: [d0 x4 | d1 x4] for
// BS 32 (pidx = 0,0,0,0,1,1,1,1); BS 128: the one scale both blocks share, broadcast.
template <int BS>
EDGELM_INLINE __m256 pair_scales(const uint16_t* ws, int64_t p, __m256i pidx) {
    if (BS == 32) {
        int32_t two;
        std::memcpy(&two, ws + 2 * p, 4);
        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_set1_epi32(two)), pidx);
    }
    return _mm256_set1_ps(_cvtsh_ss(ws[(64 * p) / BS]));
}

// int32 lane sums of a block pair's nibbles wv (low nibbles: elements 0..15 of both
// blocks, high: 16..31) with the pair unit's activations un ([xa 32][xb 32] bytes).
EDGELM_INLINE __m256i pair_dot(__m256i wv, const uint8_t* un, __m256i m0f, [[maybe_unused]] __m256i ones) {
    const __m256i lo = _mm256_and_si256(wv, m0f);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m0f);
    const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un));
    const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un + 32));
#if defined(EDGELM_VNNI)
    return dpbusd(dpbusd(_mm256_setzero_si256(), lo, xa), hi, xb);
#else
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb)), ones);
#endif
}

// Weights of a one-row GEMV are read once, so they are prefetched into L1 at a steady
// distance along each thread's contiguous range (rows are contiguous), one line per 64
// bytes consumed. (Prefetching a whole row ~2.5 KB ahead at each row start came in bursts on
// long rows and was slower; measurements in docs/kernels.md.) The distance can
// be set at compile time for benchmarks/native/gemvbench.cpp's sweeps.
#ifndef EDGELM_GEMV_PREFETCH
#define EDGELM_GEMV_PREFETCH 3072
#endif
constexpr int64_t kGemvPrefetch = EDGELM_GEMV_PREFETCH;

// int4 (BS = 32 or 128) GEMV, one activation row (decode). Per group of 4 pairs (8 blocks)
// the 4 pairs' int32 lane sums are reduced by three vphaddd into one vector of the 8 block
// sums (lane order 0,2,4,6,1,3,5,7), so the correction, the int-to-float conversion, the
// scale product and the FMA are paid once per 8 blocks instead of once per 2: ~10.5 vector
// ops per pair instead of ~15. The activation's per-group dx and corrections are stored
// in that lane order by quant_row. Remaining pairs (< 4) and an odd last block go as in
// q4_tile. Results differ from q4_tile's only in float rounding.
template <int BS>
void q4_gemv(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out) {
    const auto* Q = static_cast<const uint8_t*>(v.w);
    const auto* S = static_cast<const uint16_t*>(v.scale);
    const int64_t cols = v.cols, nb = cols / 32, np = nb / 2, ng = A.ngroups, rb = cols / 2;
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const __m256i pidx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    // the group's 8 block scales (BS 32) or its 2 (BS 128: blocks 0-3, 4-7) in lane order
    const __m256i gidx = BS == 32 ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7) : _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
    const uint8_t* xr = A.unit(i0, 0);
    const uint8_t* xg = A.group(i0, 0);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* wq = Q + r * rb;
        const uint16_t* ws = S + r * (cols / BS);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        auto pairv = [&](int64_t p) EDGELM_INLINE_LAMBDA {
            return pair_dot(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * p)), xr + 128 * p, m0f,
                            ones);
        };
        auto group = [&](int64_t g, __m256& acc) EDGELM_INLINE_LAMBDA {
            _mm_prefetch(reinterpret_cast<const char*>(wq + 128 * g + kGemvPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wq + 128 * g + kGemvPrefetch + 64), _MM_HINT_T0);
            const __m256i h01 = _mm256_hadd_epi32(pairv(4 * g), pairv(4 * g + 1));
            const __m256i h23 = _mm256_hadd_epi32(pairv(4 * g + 2), pairv(4 * g + 3));
            const uint8_t* gr = xg + 64 * g;
            const __m256i h = _mm256_sub_epi32(_mm256_hadd_epi32(h01, h23),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gr + 32)));
            __m256 dw;
            if (BS == 32) {
                dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + 8 * g)));
            } else {
                int32_t two;
                std::memcpy(&two, ws + 2 * g, 4);
                dw = _mm256_cvtph_ps(_mm_set1_epi32(two));
            }
            const __m256 d = _mm256_mul_ps(_mm256_permutevar8x32_ps(dw, gidx),
                                           _mm256_loadu_ps(reinterpret_cast<const float*>(gr)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), d, acc);
        };
        int64_t g = 0;
        for (; g + 2 <= ng; g += 2) {
            group(g, acc0);
            group(g + 1, acc1);
        }
        if (g < ng) group(g, acc0);
        auto tail = [&](__m256i s32, __m256 dw, int64_t p) EDGELM_INLINE_LAMBDA {
            const uint8_t* un = xr + 128 * p;
            s32 = _mm256_sub_epi32(s32, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un + 96)));
            const __m256 d = _mm256_mul_ps(dw, _mm256_loadu_ps(reinterpret_cast<const float*>(un + 64)));
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), d, acc1);
        };
        for (int64_t p = 4 * ng; p < np; ++p) tail(pairv(p), pair_scales<BS>(ws, p, pidx), p);
        if (nb & 1) {  // the last block alone: the high half of its pair unit is zero
            const __m256i wv = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 32 * np)));
            tail(pair_dot(wv, xr + 128 * np, m0f, ones), _mm256_set1_ps(_cvtsh_ss(ws[(64 * np) / BS])), np);
        }
        out[r] = hsum8(_mm256_add_ps(acc0, acc1));
    }
}

// int4 (BS = 32 or 128), pair layout. NX activation rows from i0.
template <int BS, int NX>
void q4_tile(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out, int64_t ldo) {
    constexpr int NACC = NX <= 2 ? 2 : 1;
    const auto* Q = static_cast<const uint8_t*>(v.w);
    const auto* S = static_cast<const uint16_t*>(v.scale);
    if constexpr (NX == 1) {
        q4_gemv<BS>(v, r0, r1, A, i0, out);
        return;
    }
    const int64_t cols = v.cols, nb = cols / 32, np = nb / 2;
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const __m256i pidx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const uint8_t* xr[NX];
    for (int i = 0; i < NX; ++i) xr[i] = A.unit(i0 + i, 0);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* wq = Q + r * (cols / 2);
        const uint16_t* ws = S + r * (cols / BS);
        __m256 acc[NX][NACC];
        for (int i = 0; i < NX; ++i)
            for (int a = 0; a < NACC; ++a) acc[i][a] = _mm256_setzero_ps();
        auto step = [&](__m256i wv, __m256 dw, int64_t p, int a) EDGELM_INLINE_LAMBDA {
            const __m256i lo = _mm256_and_si256(wv, m0f);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m0f);
            for (int i = 0; i < NX; ++i) {
                const uint8_t* un = xr[i] + 128 * p;
                const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un));
                const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un + 32));
#if defined(EDGELM_VNNI)
                const __m256i s32 = _mm256_sub_epi32(dpbusd(dpbusd(_mm256_setzero_si256(), lo, xa), hi, xb),
                                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un + 96)));
#else
                const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
                const __m256i s32 = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones),
                                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(un + 96)));
#endif
                const __m256 d = _mm256_mul_ps(dw, _mm256_loadu_ps(reinterpret_cast<const float*>(un + 64)));
                acc[i][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), d, acc[i][a]);
            }
        };
        auto pair = [&](int64_t p, int a) EDGELM_INLINE_LAMBDA {
            step(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * p)), pair_scales<BS>(ws, p, pidx), p, a);
        };
        // Accumulator indices must be compile-time constants (a runtime index spills them).
        int64_t p = 0;
        if (NACC == 2)
            for (; p + 2 <= np; p += 2) {
                pair(p, 0);
                pair(p + 1, NACC - 1);
            }
        for (; p < np; ++p) pair(p, 0);
        if (nb & 1) {
            const __m256i wv = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 32 * np)));
            step(wv, _mm256_set1_ps(_cvtsh_ss(ws[(64 * np) / BS])), np, 0);
        }
        for (int i = 0; i < NX; ++i) {
            __m256 a = acc[i][0];
            for (int k = 1; k < NACC; ++k) a = _mm256_add_ps(a, acc[i][k]);
            out[i * ldo + r] = hsum8(a);
        }
    }
}

// int8 per-row (ROWSCALE) or int8-b32, natural layout. U8 (VNNI builds, A.u8: products of
// more than one activation row): the activations are stored as qx + 128 and vpdpbusd takes
// them with the signed weights as they are; each weight block's 128 * (lane sums of its
// weights), one more vpdpbusd shared by the NX rows, is subtracted, so the int32 sums are the
// signed route's exactly (and so are the results), for one vpdpbusd per row and block
// instead of two vpsignb and a vpdpbusd.
template <bool ROWSCALE, int NX, bool U8>
void q8_tile_impl(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out, int64_t ldo) {
    constexpr int NACC = NX <= 2 ? 2 : 1;
    const auto* Q = static_cast<const int8_t*>(v.w);
    const int64_t cols = v.cols, nb = cols / 32;
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* xq[NX];
    const float* xd[NX];
    for (int i = 0; i < NX; ++i) {
        xq[i] = A.q(i0 + i);
        xd[i] = A.d(i0 + i);
    }
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wq = Q + r * cols;
        __m256 acc[NX][NACC];
        for (int i = 0; i < NX; ++i)
            for (int a = 0; a < NACC; ++a) acc[i][a] = _mm256_setzero_ps();
        auto blk = [&](int64_t b, int a) EDGELM_INLINE_LAMBDA {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b));
            [[maybe_unused]] __m256i aw = w, c0 = w;
#if defined(EDGELM_VNNI)
            if constexpr (U8)
                c0 = sub_128_wsum(_mm256_setzero_si256(), w);
            else
#endif
                aw = _mm256_sign_epi8(w, w);
            __m256 dw = _mm256_setzero_ps();
            if (!ROWSCALE) dw = _mm256_set1_ps(_cvtsh_ss(static_cast<const uint16_t*>(v.scale)[r * nb + b]));
            for (int i = 0; i < NX; ++i) {
                const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + 32 * b));
#if defined(EDGELM_VNNI)
                const __m256i s32 = U8 ? dpbusd(c0, x, w) : dpbusd(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, w));
#else
                const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
#endif
                __m256 d = _mm256_broadcast_ss(xd[i] + b);
                if (!ROWSCALE) d = _mm256_mul_ps(dw, d);
                acc[i][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), d, acc[i][a]);
            }
        };
        int64_t b = 0;
        if (NACC == 2)
            for (; b + 2 <= nb; b += 2) {
                // GEMV: a steady prefetch along the thread's contiguous rows, one line per 64 B
                // (a whole row ahead at each row's start came in bursts: 0.7x at 6912 columns)
                if (NX == 1) _mm_prefetch(reinterpret_cast<const char*>(wq + 32 * b + kGemvPrefetch), _MM_HINT_T0);
                blk(b, 0);
                blk(b + 1, NACC - 1);
            }
        for (; b < nb; ++b) blk(b, 0);
        const int64_t tail = cols - 32 * nb;
        for (int i = 0; i < NX; ++i) {
            __m256 a = acc[i][0];
            for (int k = 1; k < NACC; ++k) a = _mm256_add_ps(a, acc[i][k]);
            float sum = hsum8(a);
            if (ROWSCALE) {
                if (tail) {
                    int32_t it = 0;
                    for (int64_t k = 0; k < tail; ++k) {
                        int32_t xk = xq[i][32 * nb + k];
                        if constexpr (U8) xk = static_cast<int32_t>(static_cast<uint8_t>(xk)) - 128;
                        it += static_cast<int32_t>(wq[32 * nb + k]) * xk;
                    }
                    sum += static_cast<float>(it) * xd[i][nb];
                }
                sum *= static_cast<const float*>(v.scale)[r];
            }
            out[i * ldo + r] = sum;
        }
    }
}

template <bool ROWSCALE, int NX>
void q8_tile(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out, int64_t ldo) {
#if defined(EDGELM_VNNI)
    if (A.u8) {
        q8_tile_impl<ROWSCALE, NX, true>(v, r0, r1, A, i0, out, ldo);
        return;
    }
#endif
    q8_tile_impl<ROWSCALE, NX, false>(v, r0, r1, A, i0, out, ldo);
}

#else  // portable qd8 (same math, natural layout)

template <int BS, int NX>
void q4_tile(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out, int64_t ldo) {
    const auto* Q = static_cast<const uint8_t*>(v.w);
    const auto* S = static_cast<const uint16_t*>(v.scale);
    const int64_t cols = v.cols, nb = cols / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* wq = Q + r * (cols / 2);
        const uint16_t* ws = S + r * (cols / BS);
        for (int i = 0; i < NX; ++i) {
            const int8_t* xq = A.q(i0 + i);
            const float* xd = A.d(i0 + i);
            const int32_t* xs = A.s(i0 + i);
            float acc = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* p = wq + 16 * b;
                const int8_t* x = xq + 32 * b;
                int32_t isum = 0;
                for (int k = 0; k < 16; ++k)
                    isum += static_cast<int32_t>(p[k] & 0x0f) * x[k] + static_cast<int32_t>(p[k] >> 4) * x[k + 16];
                isum -= 8 * xs[b];
                acc += (half_to_float(ws[(32 * b) / BS]) * xd[b]) * static_cast<float>(isum);
            }
            out[i * ldo + r] = acc;
        }
    }
}

template <bool ROWSCALE, int NX>
void q8_tile(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i0, float* out, int64_t ldo) {
    const auto* Q = static_cast<const int8_t*>(v.w);
    const int64_t cols = v.cols, nb = cols / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t* wq = Q + r * cols;
        for (int i = 0; i < NX; ++i) {
            const int8_t* xq = A.q(i0 + i);
            const float* xd = A.d(i0 + i);
            float acc = 0.f;
            for (int64_t b = 0; b < A.nbt; ++b) {
                const int64_t L = std::min<int64_t>(32, cols - 32 * b);
                int32_t isum = 0;
                for (int64_t k = 0; k < L; ++k) isum += static_cast<int32_t>(wq[32 * b + k]) * xq[32 * b + k];
                float d = xd[b];
                if (!ROWSCALE) d = half_to_float(static_cast<const uint16_t*>(v.scale)[r * nb + b]) * d;
                acc += d * static_cast<float>(isum);
            }
            out[i * ldo + r] = ROWSCALE ? acc * static_cast<const float*>(v.scale)[r] : acc;
        }
    }
}

#endif

constexpr int kQMaxNX = 8;


struct QKernels {
    QTileFn tile[kQMaxNX + 1];
    bool pairs;
};

template <template <int> class F>
constexpr QKernels make_q(bool pairs) {
    return {{nullptr, &F<1>::fn, &F<2>::fn, &F<3>::fn, &F<4>::fn, &F<5>::fn, &F<6>::fn, &F<7>::fn, &F<8>::fn}, pairs};
}
template <int NX> struct Q8RowF { static void fn(const WView& v, int64_t a, int64_t b, const QAct& A, int64_t i, float* o, int64_t l) { q8_tile<true, NX>(v, a, b, A, i, o, l); } };
template <int NX> struct Q8B32F { static void fn(const WView& v, int64_t a, int64_t b, const QAct& A, int64_t i, float* o, int64_t l) { q8_tile<false, NX>(v, a, b, A, i, o, l); } };
template <int NX> struct Q4B32F { static void fn(const WView& v, int64_t a, int64_t b, const QAct& A, int64_t i, float* o, int64_t l) { q4_tile<32, NX>(v, a, b, A, i, o, l); } };
template <int NX> struct Q4B128F { static void fn(const WView& v, int64_t a, int64_t b, const QAct& A, int64_t i, float* o, int64_t l) { q4_tile<128, NX>(v, a, b, A, i, o, l); } };

inline const QKernels& q_kernels(int scheme) {
#if defined(EDGELM_PATH_AVX2)
    constexpr bool kPairs = true;
#else
    constexpr bool kPairs = false;
#endif
    static const QKernels t8 = make_q<Q8RowF>(false), t8b = make_q<Q8B32F>(false), t4 = make_q<Q4B32F>(kPairs),
                          t4b = make_q<Q4B128F>(kPairs);
    switch (scheme) {
        case kINT8: return t8;
        case kINT8B32: return t8b;
        case kINT4B32: return t4;
        default: return t4b;
    }
}

// ----------------------------------------------------------------------------- packed GEMM
// For prefill-sized products (n >= kGemmMinN activation rows) the integer schemes take a
// different route on AVX2. Each task packs 8 weight rows at a time (int4: two such groups,
// 16 rows, for the two-group tiles) into a small L1-resident buffer, "row-interleaved":
// vector 8b+k holds, for each of the 8 rows j, the 4 weights of elements 4k..4k+3 of block
// b in bytes 4j..4j+3 (int4: the unsigned nibble values u), and
// the 8 rows' block scales sit in one float vector per block. One vpmaddubsw of such a
// vector with 4 broadcast activation bytes yields 32 MACs spread over 8 rows, so a block's
// dot products for 8 rows come out in one vector, and the per-block conversion, scaling and
// accumulation (vcvtdq2ps, the scale product, the FMA) is paid once per 8 rows instead of
// once per row. int4: the 8 products of a block add up in int16 without saturating
// (8 * 2 * 15 * 127 = 30480), then one vpmaddwd, and
//     acc_j += dw_{j,b} * (dx_b * S_{j,b} - 8 dx_b sx_b)
// ~19 vector ops per 256 MACs against ~32 for the one-row tiles above (measured 1.5x);
// with two groups per tile, one activation broadcast feeds two vpmaddubsw (1.16-1.26x more).
// int8: |w| x sign-adjusted x as in the tiles, each product widened by vpmaddwd and summed in
// int32 (~35 ops against ~48; measured 1.3-1.6x). Packing costs a few shuffles per weight
// byte, paid once per call and spread over all n rows; the bundle layout (which the
// bandwidth-bound GEMV reads) is unchanged. Results differ from the tiles' only by float
// rounding (the int4 offset term is subtracted in float, not int32; the sums are ordered
// differently).
#if defined(EDGELM_PATH_AVX2)
constexpr bool kPackedGemmBuilt = true;
#else
constexpr bool kPackedGemmBuilt = false;
#endif
constexpr int64_t kGemmMinN = 16;
constexpr int kGemmNX = 6;

// Module switch for A/B runs (`set_weight_prefetch`): 1 = the packed GEMM prefetches the next
// group's weight rows (default), 0 = it does not.
inline std::atomic<int>& weight_prefetch_mode() {
    static std::atomic<int> v{1};
    return v;
}

// Module switch (benchmarks and tests compare the routes): 1 = the packed GEMM from kGemmMinN
// rows and the few-row route (xt_band) below it (default), 0 = always the one-row
// tiles, 2 = the packed GEMM for every product of 2+ rows (the few-row route's reference:
// both give the same bits).
inline std::atomic<int>& packed_gemm_mode() {
    static std::atomic<int> m{1};
    return m;
}

// Integer products of kXtMinN .. kGemmMinN - 1 rows (batched decode, short prefill chunks) in
// VNNI builds (xt_band); from 2 rows in batch-invariant mode, where the alternative is
// the packed GEMM. Fewer rows are faster in the one-row tiles; AVX2 without VNNI has no
// cheap unsigned x signed product for it (int8 measured 0.4-1.2x the tiles).
#if defined(EDGELM_VNNI)
constexpr bool kXtBuilt = true;
#else
constexpr bool kXtBuilt = false;
#endif
constexpr int64_t kXtMinN8 = 4, kXtMinN4 = 6;  // int8, int4 (where the route measured >= 1x)
inline bool xt_applies(int scheme, int64_t n, int64_t cols) {
    const bool int4 = scheme == kINT4B32 || scheme == kINT4B128;
    return kXtBuilt && qd8_scheme(scheme) && cols % 32 == 0 &&
           n >= (deterministic() ? 2 : int4 ? kXtMinN4 : kXtMinN8) && n < kGemmMinN &&
           packed_gemm_mode().load(std::memory_order_relaxed) == 1;
}

inline bool packed_gemm_applies(int scheme, int64_t n) {
    if (kPackedGemmBuilt && qd8_scheme(scheme) && n >= 1 && deterministic()) return true;
    const int mode = packed_gemm_mode().load(std::memory_order_relaxed);
    return kPackedGemmBuilt && qd8_scheme(scheme) && mode != 0 && n >= (mode == 2 ? 2 : kGemmMinN);
}

#if defined(EDGELM_PATH_AVX2)
// In-register transpose of an 8 x 8 matrix of 32-bit lanes.
EDGELM_INLINE void transpose8_epi32(__m256i r[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 4; ++k) {
        t[2 * k] = _mm256_unpacklo_ps(_mm256_castsi256_ps(r[2 * k]), _mm256_castsi256_ps(r[2 * k + 1]));
        t[2 * k + 1] = _mm256_unpackhi_ps(_mm256_castsi256_ps(r[2 * k]), _mm256_castsi256_ps(r[2 * k + 1]));
    }
    for (int h = 0; h < 2; ++h) {
        u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xee);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xee);
    }
    for (int k = 0; k < 4; ++k) {
        r[k] = _mm256_castps_si256(_mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
        r[4 + k] = _mm256_castps_si256(_mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
    }
}

// dw[8 b + j] = the fp16 scale of block b (of 32) of row r0 + j, one scale per BS columns;
// rows past nr get 0. Eight scales of a row are widened per vcvtph2ps.
template <int BS>
inline void pack_scales(const uint16_t* S, int64_t r0, int nr, int64_t cols, float* dw) {
    constexpr int R = BS / 32;  // blocks per scale
    const int64_t ns = cols / BS;
    for (int j = 0; j < 8; ++j) {
        if (j >= nr) {
            for (int64_t b = 0; b < ns * R; ++b) dw[8 * b + j] = 0.f;
            continue;
        }
        const uint16_t* sr = S + (r0 + j) * ns;
        alignas(32) float f[8];
        for (int64_t t = 0; t < ns; t += 8) {
            const int64_t m = std::min<int64_t>(8, ns - t);
            if (m == 8) {
                _mm256_store_ps(f, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + t))));
            } else {
                for (int64_t u = 0; u < m; ++u) f[u] = half_to_float(sr[t + u]);
            }
            for (int64_t u = 0; u < m; ++u)
                for (int k = 0; k < R; ++k) dw[8 * ((t + u) * R + k) + j] = f[u];
        }
    }
}

// Packs rows [r0, r0 + nr) (nr <= 8) of an int4 weight into pw (nb * 256 bytes) and dw
// (nb * 8 floats); rows past nr are zero with scale 0.
template <int BS>
inline void q4_pack8(const WView& v, int64_t r0, int nr, uint8_t* pw, float* dw) {
    const auto* Q = static_cast<const uint8_t*>(v.w);
    const auto* S = static_cast<const uint16_t*>(v.scale);
    const int64_t cols = v.cols, nb = cols / 32;
    const __m128i m0f = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        __m256i r[8];
        for (int j = 0; j < 8; ++j) {
            if (j < nr) {
                const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Q + (r0 + j) * (cols / 2) + 16 * b));
                r[j] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m0f), _mm_and_si128(p, m0f));
            } else {
                r[j] = _mm256_setzero_si256();
            }
        }
        transpose8_epi32(r);
        for (int k = 0; k < 8; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(pw + 256 * b + 32 * k), r[k]);
    }
    pack_scales<BS>(S, r0, nr, cols, dw);
}

// Keeps v in a register at this point: stops GCC from reassociating an accumulation chain
// into a tree of temporaries (which spilled the int16 sums of the GEMM tile to the stack).
#if defined(__GNUC__) || defined(__clang__)
#define EDGELM_PIN(v) __asm__("" : "+x"(v))
#else
#define EDGELM_PIN(v) (void)0
#endif

EDGELM_INLINE __m256i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// out[i, 8g..8g+8) for activation rows i0..i0+NX of A (gemm layout) against G packed groups
// of 8 weight rows each (group g at pw + g * gs, its scales at dw + g * ds). Two groups with
// three rows (the default) share each activation broadcast between two vpmaddubsw: measured
// 1.16-1.26x over one group with six rows on the 270M's prefill products (`microbench.py
// gemm-native`; docs/kernels.md). Every output's float accumulation is the
// same sequence of operations for any G, so results do not depend on the grouping.
template <int G, int NX>
inline void q4_gemm_tile(const uint8_t* pw, const float* dw, int64_t gs, int64_t ds, int64_t nb, const QAct& A,
                         int64_t i0, float* out, int64_t ldo) {
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* xq[NX];
    const float* xd[NX];
    const float* xc[NX];
    __m256 acc[NX][G];
    for (int i = 0; i < NX; ++i) {
        xq[i] = A.q(i0 + i);
        xd[i] = A.d(i0 + i);
        xc[i] = A.c(i0 + i);
        for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = pw + 256 * b;
        __m256i s[NX][G];
#if defined(EDGELM_VNNI)
        for (int i = 0; i < NX; ++i)
            for (int g = 0; g < G; ++g) s[i][g] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
            __m256i w[G];
            for (int g = 0; g < G; ++g) w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + g * gs + 32 * k));
            for (int i = 0; i < NX; ++i) {
                const __m256i x = bcast4(xq[i] + 32 * b + 4 * k);
                for (int g = 0; g < G; ++g) {
                    s[i][g] = dpbusd(s[i][g], w[g], x);
                    EDGELM_PIN(s[i][g]);
                }
            }
        }
#else
        {
            __m256i w[G];
            for (int g = 0; g < G; ++g) w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + g * gs));
            for (int i = 0; i < NX; ++i) {
                const __m256i x = bcast4(xq[i] + 32 * b);
                for (int g = 0; g < G; ++g) s[i][g] = _mm256_maddubs_epi16(w[g], x);
            }
        }
        for (int k = 1; k < 8; ++k) {
            __m256i w[G];
            for (int g = 0; g < G; ++g) w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + g * gs + 32 * k));
            for (int i = 0; i < NX; ++i) {
                const __m256i x = bcast4(xq[i] + 32 * b + 4 * k);
                for (int g = 0; g < G; ++g) {
                    s[i][g] = _mm256_add_epi16(s[i][g], _mm256_maddubs_epi16(w[g], x));
                    EDGELM_PIN(s[i][g]);
                }
            }
        }
        for (int i = 0; i < NX; ++i)
            for (int g = 0; g < G; ++g) s[i][g] = _mm256_madd_epi16(s[i][g], ones);
#endif
        for (int i = 0; i < NX; ++i) {
            const __m256 xdv = _mm256_broadcast_ss(xd[i] + b), xcv = _mm256_broadcast_ss(xc[i] + b);
            for (int g = 0; g < G; ++g) {
                const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(s[i][g]), xdv, xcv);
                acc[i][g] = _mm256_fmadd_ps(t, _mm256_load_ps(dw + g * ds + 8 * b), acc[i][g]);
            }
        }
    }
    for (int i = 0; i < NX; ++i)
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(out + i * ldo + 8 * g, acc[i][g]);
}

// int8 weights (per-row or b32), packed the same way: vector 8b+k holds the signed bytes of
// elements 4k..4k+3 of block b for the 8 rows; dw holds the 8 rows' block scales (b32) or,
// in its first 8 floats, the row scales (per-row). A partial last block (per-row int8,
// cols % 32 != 0) is zero-padded, as its activations are. VNNI builds also write pc: per
// block, the 8 rows' -128 * (sum of the block's weights), the start of each tile's integer
// sums (q8_gemm_tile).
template <bool ROWSCALE>
inline void q8_pack8(const WView& v, int64_t r0, int nr, uint8_t* pw, float* dw, [[maybe_unused]] uint8_t* pc) {
    const auto* Q = static_cast<const int8_t*>(v.w);
    const int64_t cols = v.cols, nb = cols / 32, nbt = (cols + 31) / 32;
    for (int64_t b = 0; b < nbt; ++b) {
        __m256i r[8];
        for (int j = 0; j < 8; ++j) {
            if (j < nr) {
                const int8_t* src = Q + (r0 + j) * cols + 32 * b;
                if (b < nb) {
                    r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
                } else {
                    alignas(32) int8_t t[32] = {};
                    std::memcpy(t, src, static_cast<size_t>(cols - 32 * nb));
                    r[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
                }
            } else {
                r[j] = _mm256_setzero_si256();
            }
        }
        transpose8_epi32(r);
        for (int k = 0; k < 8; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(pw + 256 * b + 32 * k), r[k]);
#if defined(EDGELM_VNNI)
        __m256i c = _mm256_setzero_si256();  // lane j: row j's block
        for (int k = 0; k < 8; ++k) c = sub_128_wsum(c, r[k]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(pc + 32 * b), c);
#endif
    }
    if (ROWSCALE)
        for (int j = 0; j < 8; ++j) dw[j] = j < nr ? static_cast<const float*>(v.scale)[r0 + j] : 0.f;
    else
        pack_scales<32>(static_cast<const uint16_t*>(v.scale), r0, nr, cols, dw);
}

// AVX2: signed x signed bytes through vpmaddubsw: |w| times x with w's sign. A lane of one
// product can reach 2 * 127 * 127, so each is widened to int32 (vpmaddwd) before it is summed.
// VNNI: the activations are stored unsigned (qx + 128, A.u8) and vpdpbusd multiplies them with
// the signed weights directly; each block's sums start from -128 * (the block's weight sum,
// pc), so they end as the exact sum qw * qx, the same integers as the AVX2 route's. (vpsignb
// shares the vector multiply pipes with vpdpbusd on AMD Zen 4; dropping the two per product
// is what this form buys.) G groups of 8 rows (group g at pw + g * gs, its pc after its nbt
// weight blocks, its scales at dw + g * ds) share each activation broadcast.
template <bool ROWSCALE, int G, int NX>
inline void q8_gemm_tile(const uint8_t* pw, const float* dw, int64_t gs, int64_t ds, int64_t nbt, const QAct& A,
                         int64_t i0, float* out, int64_t ldo) {
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* xq[NX];
    const float* xd[NX];
    __m256 acc[NX][G];
    for (int i = 0; i < NX; ++i) {
        xq[i] = A.q(i0 + i);
        xd[i] = A.d(i0 + i);
        for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nbt; ++b) {
        const uint8_t* wb = pw + 256 * b;
        __m256i s[NX][G];
#if defined(EDGELM_VNNI)
        for (int g = 0; g < G; ++g) {
            const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pw + g * gs + 256 * nbt + 32 * b));
            for (int i = 0; i < NX; ++i) s[i][g] = c0;
        }
        for (int k = 0; k < 8; ++k) {
            __m256i w[G];
            for (int g = 0; g < G; ++g) w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + g * gs + 32 * k));
            for (int i = 0; i < NX; ++i) {
                const __m256i x = bcast4(xq[i] + 32 * b + 4 * k);
                for (int g = 0; g < G; ++g) {
                    s[i][g] = dpbusd(s[i][g], x, w[g]);
                    EDGELM_PIN(s[i][g]);
                }
            }
        }
#else
        static_assert(G == 1, "the AVX2 int8 tile takes one group");
        {
            const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb));
            const __m256i aw = _mm256_sign_epi8(w, w);
            for (int i = 0; i < NX; ++i)
                s[i][0] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xq[i] + 32 * b), w)), ones);
        }
        for (int k = 1; k < 8; ++k) {
            const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * k));
            const __m256i aw = _mm256_sign_epi8(w, w);
            for (int i = 0; i < NX; ++i) {
                const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xq[i] + 32 * b + 4 * k), w));
                s[i][0] = _mm256_add_epi32(s[i][0], _mm256_madd_epi16(p, ones));
                EDGELM_PIN(s[i][0]);
            }
        }
#endif
        if (ROWSCALE) {
            for (int i = 0; i < NX; ++i) {
                const __m256 xdv = _mm256_broadcast_ss(xd[i] + b);
                for (int g = 0; g < G; ++g) acc[i][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][g]), xdv, acc[i][g]);
            }
        } else {
            __m256 d[G];
            for (int g = 0; g < G; ++g) d[g] = _mm256_load_ps(dw + g * ds + 8 * b);
            for (int i = 0; i < NX; ++i) {
                const __m256 xdv = _mm256_broadcast_ss(xd[i] + b);
                for (int g = 0; g < G; ++g)
                    acc[i][g] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[i][g]), xdv), d[g], acc[i][g]);
            }
        }
    }
    if (ROWSCALE)
        for (int g = 0; g < G; ++g) {
            const __m256 rs = _mm256_load_ps(dw + g * ds);
            for (int i = 0; i < NX; ++i) acc[i][g] = _mm256_mul_ps(acc[i][g], rs);
        }
    for (int i = 0; i < NX; ++i)
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(out + i * ldo + 8 * g, acc[i][g]);
}

// Every packed tile takes (pw, dw, gs, ds, nb, A, i0, out, ldo); gs / ds are the strides of a
// second packed group (bytes / floats), read by the two-group tiles.
using GemmTileFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, const QAct&, int64_t, float*,
                            int64_t);
// Builds with 32 vector registers (AVX-512VL, which the avx512 build has) take two groups of
// 8 weight rows and up to 6 activation rows per tile for every integer scheme (2 x 6 int32
// sums + 2 x 6 float accumulators + 2 weights + 1 broadcast = 27 registers): one broadcast
// feeds two vpdpbusd and each weight vector six. AVX2 (16 registers): int4 two groups of 3
// rows, int8 one group of 6.
#if defined(EDGELM_VNNI) && defined(__AVX512VL__)
constexpr int kGemmNX2 = 6;
constexpr int kQ8Groups = 2;
#else
constexpr int kGemmNX2 = 3;  // rows per two-group int4 tile (2 x 3 x 2 accumulators + 2 weights + 1 broadcast)
constexpr int kQ8Groups = 1;
#endif
static_assert(kGemmNX2 <= kGemmNX, "tile tables hold kGemmNX + 1 entries");
// K: 0 = int4, 1 = int8 per-row, 2 = int8-b32; G groups; tiles for 1..M activation rows
template <int K, int G, int M, int NX>
constexpr GemmTileFn gemm_tile_at() {
    if constexpr (NX > M) return nullptr;
    else if constexpr (K == 0) return &q4_gemm_tile<G, NX>;
    else return &q8_gemm_tile<K == 1, G, NX>;
}
template <int K, int G, int M, int... I>
constexpr std::array<GemmTileFn, kGemmNX + 1> gemm_tiles(std::integer_sequence<int, I...>) {
    return {nullptr, gemm_tile_at<K, G, M, I + 1>()...};
}
template <int K, int G, int M>
inline constexpr auto kGemmTiles = gemm_tiles<K, G, M>(std::make_integer_sequence<int, kGemmNX>{});
inline constexpr auto kQ4GemmTiles = kGemmTiles<0, 1, kGemmNX>;
inline constexpr auto kQ4Gemm2Tiles = kGemmTiles<0, 2, kGemmNX2>;
inline constexpr auto kQ8RowGemmTiles = kGemmTiles<1, 1, kGemmNX>;
inline constexpr auto kQ8B32GemmTiles = kGemmTiles<2, 1, kGemmNX>;
inline constexpr auto kQ8RowGemm2Tiles = kGemmTiles<1, kQ8Groups, kGemmNX2>;
inline constexpr auto kQ8B32Gemm2Tiles = kGemmTiles<2, kQ8Groups, kGemmNX2>;

inline uint8_t* pack_buffer(size_t bytes) {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    auto p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

// The one-row product of batch-invariant mode, equal bit for bit to the packed GEMM tiles'
// result for that row (see q4_gemm_tile / q8_gemm_tile): per weight row and block, the exact
// integer sum S of the block, then, over the blocks in order,
//     int4:         acc = fma(fmsub(S, dx_b, c_b), dw_b, acc)
//     int8-b32:     acc = fma(S * dx_b, dw_b, acc)
//     int8 per-row: acc = fma(S, dx_b, acc), then acc * rs
// Unlike the packed GEMM it reads the weights where they lie (no packing per call), which a
// one-row product cannot amortize. Eight weight rows go together: each row's block sums are
// reduced to integers as q4_gemv does and stored per block ([b][8 rows]), and the float
// steps then run on vectors of the 8 rows.
template <int KIND>  // 0: int4 BS 32, 1: int4 BS 128, 2: int8 per-row, 3: int8-b32
void det_gemv(const WView& v, int64_t r0, int64_t r1, const QAct& A, int64_t i, float* out) {
    constexpr bool kInt4 = KIND <= 1;
    constexpr int BS = KIND == 1 ? 128 : 32;
    const int64_t cols = v.cols, nb = cols / 32, nbt = A.nbt, np = nb / 2, ng = nb / 8;
    const int8_t* xq = A.q(i);
    const float* xd = A.d(i);
    const float* xc = A.c(i);
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const uint16_t* S16 = static_cast<const uint16_t*>(v.scale);
    thread_local std::vector<uint8_t> xbuf_v;
    thread_local std::vector<int32_t> sbuf_v;
    thread_local std::vector<float> dbuf_v;
    sbuf_v.resize(static_cast<size_t>(8 * nbt));
    dbuf_v.resize(static_cast<size_t>(8 * nbt + 8));
    int32_t* sb = sbuf_v.data();
    float* db = dbuf_v.data();
    uint8_t* xu = nullptr;
    if constexpr (kInt4) {  // the activation in pair units [xa 32][xb 32], as the nibbles lie
        xbuf_v.resize(static_cast<size_t>(64 * (np + 1)));
        xu = xbuf_v.data();
        for (int64_t p = 0; p < np; ++p) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * p));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * p + 32));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xu + 64 * p), _mm256_permute2x128_si256(x0, x1, 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xu + 64 * p + 32), _mm256_permute2x128_si256(x0, x1, 0x31));
        }
        if (nb & 1) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * np));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xu + 64 * np), _mm256_permute2x128_si256(x0, x0, 0x80));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xu + 64 * np + 32), _mm256_permute2x128_si256(x0, x0, 0x81));
        }
    }
    // The int32 lane sums of one int4 block pair / one int8 block of a row.
    auto pairv = [&](const uint8_t* wq, int64_t p) EDGELM_INLINE_LAMBDA {
        return pair_dot(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * p)), xu + 64 * p, m0f, ones);
    };
    auto blk = [&](const int8_t* wq, int64_t b) EDGELM_INLINE_LAMBDA {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b));
        const __m256i aw = _mm256_sign_epi8(w, w);
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b));
#if defined(EDGELM_VNNI)
        return dpbusd(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, w));
#else
        return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
#endif
    };
    // One float step of the 8 rows for block b: S the rows' integer sums, dw their scales.
    auto fstep = [&](__m256 acc, __m256i S, __m256 dw, int64_t b) EDGELM_INLINE_LAMBDA {
        const __m256 f = _mm256_cvtepi32_ps(S);
        if constexpr (kInt4) return _mm256_fmadd_ps(_mm256_fmsub_ps(f, _mm256_broadcast_ss(xd + b), _mm256_broadcast_ss(xc + b)), dw, acc);
        else if constexpr (KIND == 2) return _mm256_fmadd_ps(f, _mm256_broadcast_ss(xd + b), acc);
        else return _mm256_fmadd_ps(_mm256_mul_ps(f, _mm256_broadcast_ss(xd + b)), dw, acc);
    };
    thread_local std::vector<uint8_t> hv_v;  // per group and row: block sums, then scales (32-byte aligned)
    hv_v.resize(static_cast<size_t>(2 * 32 * (8 * ng + 8) + 32));
    __m256i* hb = reinterpret_cast<__m256i*>((reinterpret_cast<uintptr_t>(hv_v.data()) + 31) & ~uintptr_t(31));
    __m256i* vb = hb + 8 * ng + 8;
    // a 4-pair horizontal sum holds blocks 0,2,4,6,1,3,5,7 of its group; kSlot[b]: block b's lane
    static constexpr int kSlot[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    for (int64_t g0 = r0; g0 < r1; g0 += 8) {
        const int nr = static_cast<int>(std::min<int64_t>(8, r1 - g0));
        const uint8_t* rowp[8];  // rows past r1 repeat the last one (their results are dropped)
        for (int j = 0; j < 8; ++j) {
            const int64_t r = g0 + std::min(j, nr - 1);
            rowp[j] = static_cast<const uint8_t*>(v.w) + r * (kInt4 ? cols / 2 : cols);
        }
        __m256 acc = _mm256_setzero_ps();
        // Whole groups of 8 blocks. Each row is read start to end (the way the prefetchers
        // follow it) and its 8 block sums per group kept as one vector (with its 8 scales);
        // then per group the 8 rows' vectors are transposed, so that vector k holds lane k of
        // every row, and the float steps run on those.
        for (int j = 0; j < 8; ++j) {
            if constexpr (kInt4) {
                const uint8_t* wq = rowp[j];
                for (int64_t g = 0; g < ng; ++g) {
                    _mm_prefetch(reinterpret_cast<const char*>(wq + 128 * g + kGemvPrefetch), _MM_HINT_T0);
                    _mm_prefetch(reinterpret_cast<const char*>(wq + 128 * g + kGemvPrefetch + 64), _MM_HINT_T0);
                    _mm256_store_si256(hb + 8 * g + j,
                                       _mm256_hadd_epi32(_mm256_hadd_epi32(pairv(wq, 4 * g), pairv(wq, 4 * g + 1)),
                                                         _mm256_hadd_epi32(pairv(wq, 4 * g + 2), pairv(wq, 4 * g + 3))));
                }
            } else {
                const int8_t* wq = reinterpret_cast<const int8_t*>(rowp[j]);
                for (int64_t g = 0; g < ng; ++g) {
                    const int64_t b = 8 * g;
                    for (int k = 0; k < 4; ++k)
                        _mm_prefetch(reinterpret_cast<const char*>(wq + 32 * b + kGemvPrefetch + 64 * k), _MM_HINT_T0);
                    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(blk(wq, b), blk(wq, b + 1)),
                                                        _mm256_hadd_epi32(blk(wq, b + 2), blk(wq, b + 3)));
                    const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(blk(wq, b + 4), blk(wq, b + 5)),
                                                        _mm256_hadd_epi32(blk(wq, b + 6), blk(wq, b + 7)));
                    _mm256_store_si256(hb + 8 * g + j, _mm256_add_epi32(_mm256_permute2x128_si256(a, c, 0x20),
                                                                        _mm256_permute2x128_si256(a, c, 0x31)));
                }
            }
            // the blocks after the last whole group: their sums and scales per block
            {
                alignas(32) int32_t t8[8];
                const __m256i z = _mm256_setzero_si256();
                const int64_t b0 = 8 * ng;
                if constexpr (kInt4) {
                    const uint8_t* wq = rowp[j];
                    for (int64_t p = b0 / 2; p < np; ++p) {
                        _mm256_store_si256(reinterpret_cast<__m256i*>(t8),
                                           _mm256_hadd_epi32(_mm256_hadd_epi32(pairv(wq, p), z), z));
                        sb[8 * (2 * p) + j] = t8[0];
                        sb[8 * (2 * p + 1) + j] = t8[4];
                    }
                    if (nb & 1) {
                        const __m256i wv =
                            _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 32 * np)));
                        _mm256_store_si256(reinterpret_cast<__m256i*>(t8),
                                           _mm256_hadd_epi32(_mm256_hadd_epi32(pair_dot(wv, xu + 64 * np, m0f, ones), z), z));
                        sb[8 * (2 * np) + j] = t8[0];
                    }
                } else {
                    const int8_t* wq = reinterpret_cast<const int8_t*>(rowp[j]);
                    for (int64_t b = b0; b < nb; ++b) {
                        _mm256_store_si256(reinterpret_cast<__m256i*>(t8), _mm256_hadd_epi32(_mm256_hadd_epi32(blk(wq, b), z), z));
                        sb[8 * b + j] = t8[0] + t8[4];
                    }
                    if (nbt > nb) {  // int8 per-row: a partial last block
                        int32_t it = 0;
                        for (int64_t k = 32 * nb; k < cols; ++k) it += static_cast<int32_t>(wq[k]) * xq[k];
                        sb[8 * nb + j] = it;
                    }
                }
                if constexpr (KIND != 2) {
                    const uint16_t* ws = S16 + (g0 + std::min(j, nr - 1)) * (cols / BS);
                    for (int64_t b = b0; b < nb; ++b) db[8 * b + j] = half_to_float(ws[(32 * b) / BS]);
                }
            }
            if constexpr (KIND != 2) {
                const uint16_t* ws = S16 + (g0 + std::min(j, nr - 1)) * (cols / BS);
                for (int64_t g = 0; g < ng; ++g) {
                    __m256 f;
                    if constexpr (BS == 32) {
                        f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + 8 * g)));
                    } else {
                        int32_t two;
                        std::memcpy(&two, ws + 2 * g, 4);
                        f = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_set1_epi32(two)),
                                                     _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
                    }
                    _mm256_store_si256(vb + 8 * g + j, _mm256_castps_si256(f));
                }
            }
        }
        for (int64_t g = 0; g < ng; ++g) {
            __m256i h[8];
            for (int j = 0; j < 8; ++j) h[j] = _mm256_load_si256(hb + 8 * g + j);
            transpose8_epi32(h);
            if constexpr (KIND == 2) {
                for (int b = 0; b < 8; ++b) acc = fstep(acc, h[b], acc, 8 * g + b);
            } else {
                __m256i sv[8];
                for (int j = 0; j < 8; ++j) sv[j] = _mm256_load_si256(vb + 8 * g + j);
                transpose8_epi32(sv);
                for (int b = 0; b < 8; ++b)
                    acc = fstep(acc, h[kInt4 ? kSlot[b] : b], _mm256_castsi256_ps(sv[b]), 8 * g + b);
            }
        }
        // the blocks after the last whole group, in order
        for (int64_t b = 8 * ng; b < nbt; ++b)
            acc = fstep(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 8 * b)),
                        KIND == 2 ? acc : _mm256_loadu_ps(db + 8 * b), b);
        if constexpr (KIND == 2) {
            alignas(32) float rs[8];
            for (int j = 0; j < 8; ++j) rs[j] = static_cast<const float*>(v.scale)[g0 + std::min(j, nr - 1)];
            acc = _mm256_mul_ps(acc, _mm256_load_ps(rs));
        }
        alignas(32) float o8[8];
        _mm256_store_ps(o8, acc);
        for (int j = 0; j < nr; ++j) out[g0 + j] = o8[j];
    }
}

// Software prefetch (into L2) of the weight rows [r0, r1) of W (their quants, then their
// scales), spread over the tiles of the group before them: `step(k)` issues the next k lines.
// Packing reads each group of rows once, straight from the bundle's mapping; without this it
// waited on DRAM for every group (a 2048 x 640 int4 product of 128 rows took 1.3x as long with
// its weights cold as with them in L2; docs/kernels.md, "bf16 prefill attention and weight prefetch").
struct RowsPrefetch {
    const char* p[2] = {nullptr, nullptr};
    int64_t bytes[2] = {0, 0};
    int64_t part = 0, off = 0;
    RowsPrefetch() = default;
    RowsPrefetch(const WView& W, int64_t r0, int64_t r1) {
        const int64_t cols = W.cols;
        int64_t qrow = cols, srow = 0;
        switch (W.scheme) {
            case kINT8: srow = 4; break;
            case kINT8B32: srow = 2 * (cols / 32); break;
            case kINT4B32: qrow = cols / 2; srow = 2 * (cols / 32); break;
            default: qrow = cols / 2; srow = 2 * (cols / 128); break;
        }
        p[0] = static_cast<const char*>(W.w) + r0 * qrow;
        bytes[0] = (r1 - r0) * qrow;
        p[1] = static_cast<const char*>(W.scale) + r0 * srow;
        bytes[1] = (r1 - r0) * srow;
    }
    int64_t lines() const { return (bytes[0] + 63) / 64 + (bytes[1] + 63) / 64; }
    EDGELM_INLINE void step(int64_t k) {
        for (; k > 0 && part < 2; --k) {
#if defined(__GNUC__) || defined(__clang__)
            __builtin_prefetch(p[part] + off, 0, 2);
#endif
            off += 64;
            if (off >= bytes[part]) {
                ++part;
                off = 0;
            }
        }
    }
};

// Rows [r0, r1) of W for all n activation rows of A (gemm layout). int4 (and int8 in builds
// with 32 registers) packs 16 rows (two groups) at a time for the two-group tiles; a last
// group of 8 or fewer rows alone takes the one-group tiles; int8 on AVX2 packs 8. While a
// group's tiles run, the next group's rows are prefetched.
inline void gemm_band(const WView& W, const QAct& A, int64_t n, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t nbt = (W.cols + 31) / 32;
    const int64_t gs = nbt * (256 + 32), ds = nbt * 8;  // a group: its weights, then int8's pc
    uint8_t* pw = pack_buffer(static_cast<size_t>(nbt) * 2 * (256 + 32 + 32));
    float* dw = reinterpret_cast<float*>(pw + 2 * gs);
    const bool int4 = W.scheme == kINT4B32 || W.scheme == kINT4B128;
    const int64_t step = int4 || kQ8Groups == 2 ? 16 : 8;
    for (int64_t g = r0; g < r1; g += step) {
        const int nr = static_cast<int>(std::min<int64_t>(step, r1 - g));
        const int G = nr > 8 ? 2 : 1;
        for (int h = 0; h < G; ++h) {
            const int64_t gr = g + 8 * h;
            const int hr = std::min(8, nr - 8 * h);
            uint8_t* ph = pw + h * gs;
            switch (W.scheme) {
                case kINT8: q8_pack8<true>(W, gr, hr, ph, dw + h * ds, ph + 256 * nbt); break;
                case kINT8B32: q8_pack8<false>(W, gr, hr, ph, dw + h * ds, ph + 256 * nbt); break;
                case kINT4B32: q4_pack8<32>(W, gr, hr, ph, dw + h * ds); break;
                default: q4_pack8<128>(W, gr, hr, ph, dw + h * ds); break;
            }
        }
        const auto& tiles = W.scheme == kINT8 ? (G == 2 ? kQ8RowGemm2Tiles : kQ8RowGemmTiles)
                            : W.scheme == kINT8B32 ? (G == 2 ? kQ8B32Gemm2Tiles : kQ8B32GemmTiles)
                            : G == 2 ? kQ4Gemm2Tiles : kQ4GemmTiles;
        const int64_t maxnx = G == 2 ? kGemmNX2 : kGemmNX;
        const bool full = nr == 8 * G;
        RowsPrefetch next;
        int64_t per = 0;
        if (g + step < r1 && weight_prefetch_mode().load(std::memory_order_relaxed) != 0) {
            next = RowsPrefetch(W, g + step, std::min(r1, g + 2 * step));
            per = ceil_div(next.lines(), std::max<int64_t>(1, ceil_div(n, maxnx)));
        }
        for (int64_t i0 = 0; i0 < n;) {
            // tiles of maxnx rows; a short remainder is shared with the tile before it
            // (n = 128, maxnx 6: 20 tiles of 6 and 2 of 4, not 21 of 6 and 1 of 2)
            int64_t left = n - i0;
            int nx = static_cast<int>(left > 2 * maxnx || left == maxnx ? maxnx
                                      : left > maxnx ? (left + 1) / 2 : left);
            float tmp[kGemmNX * 16];
            float* o = full ? out + i0 * ldo + g : tmp;
            const int64_t lo = full ? ldo : 8 * G;
            tiles[nx](pw, dw, gs, ds, nbt, A, i0, o, lo);
            next.step(per);
            if (!full)
                for (int i = 0; i < nx; ++i)
                    for (int j = 0; j < nr; ++j) out[(i0 + i) * ldo + g + j] = tmp[i * 8 * G + j];
            i0 += nx;
        }
    }
}
#if defined(EDGELM_VNNI)
// ----------------------------------------------------------------------------- few-row route
// Integer products with 4 .. kGemmMinN - 1 activation rows (int4: 6..; batched decode: one
// row per sequence; short prefill chunks) are where the one-row tiles are weakest: each
// vpdpbusd there yields 8 partial sums of one (weight row, activation row) pair that are
// converted, scaled and accumulated on their own (~9 vector ops per 32 MACs), and the packed
// GEMM's weight packing is paid over too few rows. This route transposes the activations
// instead, which are few and cheap to move. Activation rows go in groups of 4; per block of
// 32 columns, vector k (0..3) of a group holds each of its rows' elements 8k..8k+7, so lane
// 2i + h belongs to row i and element quad 2k + h. One broadcast of a weight row's 8 bytes
// for elements 8k..8k+7 then lines up with every lane, and each vpdpbusd adds 32 products
// spread over 4 activation rows; two groups' block sums are combined by one vphaddd into a
// vector of 8 rows' sums, so the conversion and scaling are paid once per 8 activation rows
// and each weight broadcast feeds one vpdpbusd per group.
// vpdpbusd multiplies unsigned by signed bytes. int8: the broadcast weights go in as
// w ^ 0x80 = w + 128 and each row's block sum starts from -128 * (its activation block sum),
// the corr vector stored with the block (in the row's even lane), so the sums end as the
// exact sum qw * qx. (Measured faster than the other arrangement, activations stored as
// qx + 128 against the weights as they are, whose -128 * (weight block sums) cost a vpdpbusd
// and horizontal adds per weight row and block.) int4: see xt_rows. VNNI builds only: on
// AVX2 the sign trick per product made this route 0.4-1.2x the tiles.
// The float steps per block are the packed GEMM's, in its order, so the results equal its
// results bit for bit (tests compare with set_packed_gemm(2)), which also makes this route
// batch-invariant.
//
// Layout (A.xtb): per pair of groups (8 activation rows), per block: group A's 4 vectors,
// group B's 4 vectors, dx of the 8 rows in the lane order of the combined sums (rows 0 1 4 5
// 2 3 6 7 of the pair), then int8: group A's corr, group B's corr; int4: c = 8 dx sum(qx) of
// the 8 rows in dx's lane order. Absent rows are zero.
constexpr int64_t kXtBlock = 4 * 32 + 4 * 32 + 32 + 32 + 32;
constexpr int kXtLaneRow[8] = {0, 1, 4, 5, 2, 3, 6, 7};  // pair row of each lane of a combined sum
#ifndef EDGELM_XT_PREFETCH_ROWS
#define EDGELM_XT_PREFETCH_ROWS 8
#endif
constexpr int64_t kXtPrefetchRows = EDGELM_XT_PREFETCH_ROWS;

inline void xt_build(QAct& A) {
    const int64_t nb = A.nb, np = ceil_div(A.n, int64_t(8));
    A.xts = nb * kXtBlock;
    thread_local std::vector<uint8_t> buf;
    const size_t bytes = static_cast<size_t>(np * A.xts) + 64;
    if (buf.size() < bytes) buf.resize(bytes);
    auto* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    std::memset(base, 0, static_cast<size_t>(np * A.xts));
    for (int64_t p = 0; p < np; ++p)
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t* u = base + p * A.xts + b * kXtBlock;
            auto* dx = reinterpret_cast<float*>(u + 256);
            for (int l = 0; l < 8; ++l) {
                const int64_t row = 8 * p + kXtLaneRow[l];
                dx[l] = row < A.n ? A.d(row)[b] : 0.f;
            }
            for (int g = 0; g < 2; ++g) {
                auto* corr = reinterpret_cast<int32_t*>(u + 288 + 32 * g);
                for (int i = 0; i < 4; ++i) {
                    const int64_t row = 8 * p + 4 * g + i;
                    if (row >= A.n) continue;
                    const int8_t* q = A.q(row) + 32 * b;
                    int32_t sum = 0;
                    for (int e = 0; e < 32; ++e) sum += q[e];
                    for (int k = 0; k < 4; ++k) std::memcpy(u + 128 * g + 32 * k + 8 * i, q + 8 * k, 8);
                    if (!A.xt4) corr[2 * i] = -128 * sum;
                }
            }
            if (A.xt4) {  // int4: c = 8 dx sum(qx) per row, in dx's lane order, as the packed GEMM's
                auto* c = reinterpret_cast<float*>(u + 288);
                for (int l = 0; l < 8; ++l) {
                    const int64_t row = 8 * p + kXtLaneRow[l];
                    if (row >= A.n) continue;
                    const int8_t* q = A.q(row) + 32 * b;
                    int32_t sum = 0;
                    for (int e = 0; e < 32; ++e) sum += q[e];
                    c[l] = 8.f * A.d(row)[b] * static_cast<float>(sum);
                }
            }
        }
    A.xtb = base;
}

// RR weight rows from r against NG groups of 4 activation rows (pair q at xg[q]; the last
// group may be absent, NG odd); the outputs of the first nx activation rows are stored.
// KIND: 0 int8 per-row, 1 int8-b32, 2 int4-b32, 3 int4-b128. dwf: RR * nb floats.
// int4: the nibbles u (0..15) are unsigned already, so they go into vpdpbusd as they are
// (bytes 0..7 of a block's 16 hold elements 0..7 in their low and 16..23 in their high
// nibbles, bytes 8..15 elements 8..15 and 24..31), and the offset 8 * sum(qx) is taken off
// in float as the packed GEMM does: fmsub(S, dx, c), c = 8 dx sum(qx).
template <int KIND, int RR, int NG>
EDGELM_INLINE void xt_rows(const WView& v, int64_t r, const uint8_t* const* xg, int64_t nb, float* dwf, int nx,
                           float* out, int64_t ldo) {
    constexpr int NP = (NG + 1) / 2;
    constexpr bool kInt4 = KIND >= 2, kRowScale = KIND == 0;
    constexpr int64_t kBlockBytes = kInt4 ? 16 : 32;  // weight bytes per block of 32
    const auto* Q = static_cast<const uint8_t*>(v.w);
    const int64_t rb = v.cols / 32 * kBlockBytes;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), m0f = _mm256_set1_epi8(0x0f);
    const uint8_t* wr[RR];
    for (int rr = 0; rr < RR; ++rr) wr[rr] = Q + (r + rr) * rb;
    if (!kRowScale)
        for (int rr = 0; rr < RR; ++rr) {  // the block scales as floats (int4-b128: one per 4 blocks)
            const int64_t ns = KIND == 3 ? nb / 4 : nb;
            const uint16_t* sr = static_cast<const uint16_t*>(v.scale) + (r + rr) * ns;
            float* d = dwf + rr * nb;
            int64_t b = 0;
            for (; b + 8 <= ns; b += 8)
                _mm256_storeu_ps(d + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + b))));
            for (; b < ns; ++b) d[b] = half_to_float(sr[b]);
        }
    __m256 acc[RR][NP];
    for (int rr = 0; rr < RR; ++rr)
        for (int q = 0; q < NP; ++q) acc[rr][q] = _mm256_setzero_ps();
    // Rows are contiguous: the rows kXtPrefetchRows ahead are prefetched, RR block rows per
    // block step (without it, reading 4 rows side by side ran at a third of the one-row
    // tiles' bandwidth on an AMD Zen 4 host; docs/kernels.md)
    const uint8_t* pf = wr[0] + kXtPrefetchRows * rb;
    for (int64_t b = 0; b < nb; ++b) {
        if (kXtPrefetchRows > 0)
            for (int h = 0; h < (RR * kBlockBytes + 63) / 64; ++h)
                _mm_prefetch(reinterpret_cast<const char*>(pf + RR * kBlockBytes * b + 64 * h), _MM_HINT_T0);
        // two sums per output, of the even and of the odd element vectors k, added at the end:
        // twice the independent vpdpbusd chains (1.05-1.2x on weights streamed from memory,
        // 0.9x on weights in L2; docs/kernels.md)
        __m256i s[RR][NG], s2[RR][NG];
        for (int g = 0; g < NG; ++g) {
            const __m256i c = kInt4 ? _mm256_setzero_si256()
                                    : _mm256_load_si256(reinterpret_cast<const __m256i*>(xg[g / 2] + kXtBlock * b +
                                                                                        288 + 32 * (g & 1)));
            for (int rr = 0; rr < RR; ++rr) {
                s[rr][g] = c;
                s2[rr][g] = _mm256_setzero_si256();
            }
        }
        for (int k = 0; k < 4; ++k) {
            __m256i x[NG];
            for (int g = 0; g < NG; ++g)
                x[g] = _mm256_load_si256(
                    reinterpret_cast<const __m256i*>(xg[g / 2] + kXtBlock * b + 128 * (g & 1) + 32 * k));
            for (int rr = 0; rr < RR; ++rr) {
                int64_t w8;
                __m256i u;
                if constexpr (kInt4) {
                    std::memcpy(&w8, wr[rr] + 16 * b + 8 * (k & 1), 8);
                    u = _mm256_set1_epi64x(w8);
                    u = _mm256_and_si256(k < 2 ? u : _mm256_srli_epi16(u, 4), m0f);
                } else {
                    std::memcpy(&w8, wr[rr] + 32 * b + 8 * k, 8);
                    u = _mm256_xor_si256(_mm256_set1_epi64x(w8), flip);
                }
                auto& t = k & 1 ? s2 : s;
                for (int g = 0; g < NG; ++g) t[rr][g] = dpbusd(t[rr][g], u, x[g]);
            }
        }
        for (int rr = 0; rr < RR; ++rr)
            for (int g = 0; g < NG; ++g) s[rr][g] = _mm256_add_epi32(s[rr][g], s2[rr][g]);
        for (int q = 0; q < NP; ++q) {
            const __m256 xdv = _mm256_load_ps(reinterpret_cast<const float*>(xg[q] + kXtBlock * b + 256));
            [[maybe_unused]] __m256 xcv;
            if constexpr (kInt4) xcv = _mm256_load_ps(reinterpret_cast<const float*>(xg[q] + kXtBlock * b + 288));
            for (int rr = 0; rr < RR; ++rr) {
                const __m256 sum = _mm256_cvtepi32_ps(
                    _mm256_hadd_epi32(s[rr][2 * q], 2 * q + 1 < NG ? s[rr][2 * q + 1] : _mm256_setzero_si256()));
                if constexpr (kRowScale)
                    acc[rr][q] = _mm256_fmadd_ps(sum, xdv, acc[rr][q]);
                else if constexpr (kInt4)
                    acc[rr][q] = _mm256_fmadd_ps(_mm256_fmsub_ps(sum, xdv, xcv),
                                                 _mm256_set1_ps(dwf[rr * nb + (KIND == 3 ? b / 4 : b)]), acc[rr][q]);
                else
                    acc[rr][q] = _mm256_fmadd_ps(_mm256_mul_ps(sum, xdv), _mm256_set1_ps(dwf[rr * nb + b]), acc[rr][q]);
            }
        }
    }
    for (int rr = 0; rr < RR; ++rr)
        for (int q = 0; q < NP; ++q) {
            __m256 a = acc[rr][q];
            if (kRowScale) a = _mm256_mul_ps(a, _mm256_set1_ps(static_cast<const float*>(v.scale)[r + rr]));
            alignas(32) float o[8];
            _mm256_store_ps(o, a);
            for (int l = 0; l < 8; ++l) {
                const int row = 8 * q + kXtLaneRow[l];
                if (row < nx) out[row * ldo + r + rr] = o[l];
            }
        }
}

// Rows [r0, r1) of W for the n (< kGemmMinN) activation rows of A (A.xt).
template <int KIND>
inline void xt_band(const WView& W, const QAct& A, int64_t n, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t nb = W.cols / 32;
    constexpr int R = 4;  // weight rows side by side for up to 8 activation rows (2 for more)
    float* dwf = reinterpret_cast<float*>(pack_buffer(static_cast<size_t>(R * nb) * sizeof(float)));
    const uint8_t* xg[2] = {A.xtb, A.xtb + A.xts};
    const int nx = static_cast<int>(n);
    int64_t r = r0;
    auto run = [&](auto rr_c, auto ng_c) {
        constexpr int RR = decltype(rr_c)::value, NG = decltype(ng_c)::value;
        for (; r + RR <= r1; r += RR) xt_rows<KIND, RR, NG>(W, r, xg, nb, dwf, nx, out, ldo);
        for (; r < r1; ++r) xt_rows<KIND, 1, NG>(W, r, xg, nb, dwf, nx, out, ldo);
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I3 = std::integral_constant<int, 3>;
    using I4 = std::integral_constant<int, 4>;
    switch ((n + 3) / 4) {
        case 1: run(I4{}, I1{}); break;
        case 2: run(I4{}, I2{}); break;
        case 3: run(I2{}, I3{}); break;
        default: run(I2{}, I4{}); break;
    }
}
#endif  // EDGELM_VNNI
#endif

// Rows [r0, r1) of W for all n activation rows of A, by whichever route A was prepared for.
inline void q_band(const WView& W, const QAct& A, int64_t n, int64_t r0, int64_t r1, float* out, int64_t ldo) {
#if defined(EDGELM_PATH_AVX2)
#if defined(EDGELM_VNNI)
    if (A.xt) {
        switch (W.scheme) {
            case kINT8: xt_band<0>(W, A, n, r0, r1, out, ldo); break;
            case kINT8B32: xt_band<1>(W, A, n, r0, r1, out, ldo); break;
            case kINT4B32: xt_band<2>(W, A, n, r0, r1, out, ldo); break;
            default: xt_band<3>(W, A, n, r0, r1, out, ldo); break;
        }
        return;
    }
#endif
    if (A.gemm) {
        if (n == 1 && deterministic()) {  // batch-invariant, without packing
            switch (W.scheme) {
                case kINT4B32: det_gemv<0>(W, r0, r1, A, 0, out); break;
                case kINT4B128: det_gemv<1>(W, r0, r1, A, 0, out); break;
                case kINT8: det_gemv<2>(W, r0, r1, A, 0, out); break;
                default: det_gemv<3>(W, r0, r1, A, 0, out); break;
            }
            return;
        }
        gemm_band(W, A, n, r0, r1, out, ldo);
        return;
    }
#endif
    const QKernels& K = q_kernels(W.scheme);
    for (int64_t i0 = 0; i0 < n; i0 += kQMaxNX) {
        const int nx = static_cast<int>(std::min<int64_t>(kQMaxNX, n - i0));
        K.tile[nx](W, r0, r1, A, i0, out + i0 * ldo, ldo);
    }
}

// Reusable per-calling-thread buffer for quantized activations.
inline uint8_t* qact_buffer(size_t bytes) {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < bytes + 64) buf.resize(bytes + 64 + bytes / 4);
    auto p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}

inline void qact_prepare(QAct& A, int scheme, int64_t n, int64_t cols) {
    A.n = n;
    A.cols = cols;
    A.nb = cols / 32;
    A.nbt = (cols + 31) / 32;
    A.xt = xt_applies(scheme, n, cols);
    A.gemm = !A.xt && packed_gemm_applies(scheme, n);
    // the int8 tiles of VNNI builds take unsigned activations for products of several rows;
    // one-row products (decode's GEMV, batch-invariant mode's det_gemv) and the few-row
    // route read them signed
#if defined(EDGELM_VNNI)
    A.u8 = n > 1 && !A.xt && (scheme == kINT8 || scheme == kINT8B32);
#else
    A.u8 = false;
#endif
    A.pairs = !A.gemm && !A.xt && q_kernels(scheme).pairs;
    A.xt4 = A.xt && (scheme == kINT4B32 || scheme == kINT4B128);
    A.ngroups = 0;
    if (A.pairs) {
        A.ngroups = A.nb / 8;
        A.stride = 128 * ((A.nb + 1) / 2) + 64 * A.ngroups;
    } else {
        A.stride = A.nbt * (32 + 4 + 4);
        A.stride = (A.stride + 63) & ~int64_t(63);
    }
    A.base = qact_buffer(static_cast<size_t>(A.stride * n));
}

// Quantizes the n activation rows of x into A (threaded when large).
inline void quantize_input(QAct& A, int scheme, const float* x, int64_t n, int64_t cols) {
    qact_prepare(A, scheme, n, cols);
    const int64_t qchunk = std::max<int64_t>(1, 32768 / cols);
    auto qtask = [&](int64_t t) {
        const int64_t a = t * qchunk, b = std::min(n, a + qchunk);
        for (int64_t i = a; i < b; ++i) quant_row(x + i * cols, A, i);
    };
    ThreadPool::instance().run(ceil_div(n, qchunk), qtask, static_cast<double>(n) * cols >= 65536.0);
#if defined(EDGELM_VNNI)
    if (A.xt) xt_build(A);
#endif
}

// out[n, rows] = x[n, cols] @ W^T through quantized activations. W.scheme must be integer.
inline void matmul_qd8(const WView& W, const float* x, int64_t n, float* out) {
    if (n <= 0) return;
    ThreadPool& pool = ThreadPool::instance();
    const int64_t T = pool.threads();
    const int64_t rows = W.rows, cols = W.cols;
    QAct A;
    quantize_input(A, W.scheme, x, n, cols);
    const bool parallel = static_cast<double>(n) * rows * cols >= 65536.0;
    if (n == 1) {
        GemvSplit split(rows, row_bytes(W.scheme, cols), static_cast<int>(T));
        auto band = [&](int64_t r0, int64_t r1) { q_band(W, A, 1, r0, r1, out, rows); };
        auto task = [&](int64_t t) { split.run(static_cast<int>(t), band); };
        pool.run(split.parts(), task, parallel);
        return;
    }
    const int64_t chunk = band_rows(W, n, T);
    const int64_t ntasks = ceil_div(rows, chunk);
    auto task = [&](int64_t t) {
        const int64_t r0 = t * chunk, r1 = std::min(rows, r0 + chunk);
        q_band(W, A, n, r0, r1, out, rows);
    };
    pool.run(ntasks, task, parallel);
}

}  // namespace edgelm
