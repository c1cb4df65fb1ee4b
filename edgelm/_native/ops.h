// edgelm native kernels: fused elementwise ops, attention over the KV cache, and a
// STREAM-style read-bandwidth probe. Inputs are validated by kernels.cpp.
//
// Every op follows edgelm/backends/numpy_ops.py (the reference) in fp32; differences are
// summation order, the vector exp/tanh approximations of vmath.h, and (attention) the online
// softmax. docs/kernels.md lists the bounds the tests use.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"
#include "threadpool.h"
#include "vmath.h"

namespace edgelm {

// Runs f(i0, i1) over [0, total) in chunks of `grain`, threaded when total >= par_min.
template <class F>
void parallel_range(int64_t total, int64_t grain, F&& f, int64_t par_min = 65536) {
    if (total <= 0) return;
    grain = std::max<int64_t>(1, grain);
    auto task = [&](int64_t t) { f(t * grain, std::min(total, (t + 1) * grain)); };
    ThreadPool::instance().run(ceil_div(total, grain), task, total >= par_min);
}

// ----------------------------------------------------------------------------- rmsnorm

// 1 / sqrt(mean(x^2) + eps) of one row of length d
inline float inv_rms(const float* xr, int64_t d, float eps) {
    VF a0 = vzero(), a1 = vzero();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        const VF u = vloadu(xr + k), v = vloadu(xr + k + 8);
        a0 = vfma(u, u, a0);
        a1 = vfma(v, v, a1);
    }
    for (; k + 8 <= d; k += 8) {
        const VF u = vloadu(xr + k);
        a0 = vfma(u, u, a0);
    }
    float ss = vhsum(vadd(a0, a1));
    for (; k < d; ++k) ss += xr[k] * xr[k];
    return 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
}

// o = x * inv * w over one row of length d
inline void scale_row(const float* xr, float inv, const float* w, int64_t d, float* o) {
    const VF vi = vset1(inv);
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) vstoreu(o + k, vmul(vmul(vloadu(xr + k), vi), vloadu(w + k)));
    for (; k < d; ++k) o[k] = (xr[k] * inv) * w[k];
}

inline void gelu_serial(const float* x, int64_t a, int64_t b, float* out);

// Activation applied after a norm (rmsnorm's `act`).
enum NormAct : int { kActNone = 0, kActGelu = 1 };

// out[r, :] = x[r, :] * (1 / sqrt(mean(x[r]^2) + eps)) * w, for rows r of length d; then, with
// act = kActGelu, tanh-approximated GELU of each normed row while it is in cache (the image
// tower's norm + activation pairs).
inline void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out,
                    int act = kActNone) {
    auto rowfn = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * d;
            float* o = out + r * d;
            scale_row(xr, inv_rms(xr, d, eps), w, d, o);
            if (act == kActGelu) gelu_serial(o, 0, d, o);
        }
    };
    parallel_range(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)),
                   [&](int64_t a, int64_t b) { rowfn(a, b); }, 65536 / std::max<int64_t>(1, d));
}

// The residual step of a block, fused: x[r] += rmsnorm(h[r]) * w_post, then (when w_next is
// given) next[r] = rmsnorm(x[r]) * w_next, the input of the following block.
inline void add_rmsnorm(float* x, const float* h, const float* w_post, const float* w_next, int64_t rows,
                        int64_t d, float eps, float* next) {
    auto rowfn = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            float* xr = x + r * d;
            const float* hr = h + r * d;
            const float inv = inv_rms(hr, d, eps);
            const VF vi = vset1(inv);
            int64_t k = 0;
            for (; k + 8 <= d; k += 8)
                vstoreu(xr + k, vadd(vloadu(xr + k), vmul(vmul(vloadu(hr + k), vi), vloadu(w_post + k))));
            for (; k < d; ++k) xr[k] = xr[k] + (hr[k] * inv) * w_post[k];
            if (w_next) scale_row(xr, inv_rms(xr, d, eps), w_next, d, next + r * d);
        }
    };
    parallel_range(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, d)),
                   [&](int64_t a, int64_t b) { rowfn(a, b); }, 65536 / std::max<int64_t>(1, d));
}

// ----------------------------------------------------------------------------- rope

// x, out [n, heads, hd]; cs, sn [n, hd/2]: rotate-half pairing (j, j + hd/2).
inline void rope(const float* x, const float* cs, const float* sn, int64_t n, int64_t heads, int64_t hd, float* out) {
    const int64_t half = hd / 2;
    auto fn = [&](int64_t a, int64_t b) {
        for (int64_t ih = a; ih < b; ++ih) {
            const int64_t i = ih / heads;
            const float* c = cs + i * half;
            const float* s = sn + i * half;
            const float* x1 = x + ih * hd;
            const float* x2 = x1 + half;
            float* o1 = out + ih * hd;
            float* o2 = o1 + half;
            int64_t j = 0;
            for (; j + 8 <= half; j += 8) {
                const VF a1 = vloadu(x1 + j), a2 = vloadu(x2 + j), vc = vloadu(c + j), vs = vloadu(s + j);
                vstoreu(o1 + j, vsub(vmul(a1, vc), vmul(a2, vs)));
                vstoreu(o2 + j, vadd(vmul(a2, vc), vmul(a1, vs)));
            }
            for (; j < half; ++j) {
                const float a1 = x1[j], a2 = x2[j];
                o1[j] = a1 * c[j] - a2 * s[j];
                o2[j] = a2 * c[j] + a1 * s[j];
            }
        }
    };
    parallel_range(n * heads, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, hd)), fn,
                   65536 / std::max<int64_t>(1, hd));
}

// Per-head RMSNorm (Gemma's q/k norm) then RoPE: x, out [n, heads, hd], w [hd],
// cs/sn [n, hd/2]. out may be x.
inline void rmsnorm_rope(const float* x, const float* w, const float* cs, const float* sn, int64_t n,
                         int64_t heads, int64_t hd, float eps, float* out) {
    const int64_t half = hd / 2;
    auto fn = [&](int64_t a, int64_t b) {
        for (int64_t ih = a; ih < b; ++ih) {
            const int64_t i = ih / heads;
            const float* xr = x + ih * hd;
            float* o = out + ih * hd;
            const float inv = inv_rms(xr, hd, eps);
            const float* c = cs + i * half;
            const float* s = sn + i * half;
            const VF vi = vset1(inv);
            int64_t j = 0;
            for (; j + 8 <= half; j += 8) {
                const VF a1 = vmul(vmul(vloadu(xr + j), vi), vloadu(w + j));
                const VF a2 = vmul(vmul(vloadu(xr + half + j), vi), vloadu(w + half + j));
                const VF vc = vloadu(c + j), vs = vloadu(s + j);
                vstoreu(o + j, vsub(vmul(a1, vc), vmul(a2, vs)));
                vstoreu(o + half + j, vadd(vmul(a2, vc), vmul(a1, vs)));
            }
            for (; j < half; ++j) {
                const float a1 = (xr[j] * inv) * w[j], a2 = (xr[half + j] * inv) * w[half + j];
                o[j] = a1 * c[j] - a2 * s[j];
                o[half + j] = a2 * c[j] + a1 * s[j];
            }
        }
    };
    parallel_range(n * heads, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, hd)), fn,
                   65536 / std::max<int64_t>(1, hd));
}

// ----------------------------------------------------------------------------- gelu_mul, softcap

// tanh-approximated GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): one vector, one value
EDGELM_INLINE VF gelu_v(VF x) {
    const VF inner = vadd(x, vmul(vmul(vmul(vset1(0.044715f), x), x), x));
    const VF t = vtanh(vmul(vset1(0.7978845608028654f), inner));
    return vmul(vmul(vset1(0.5f), x), vadd(vset1(1.f), t));
}
EDGELM_INLINE float gelu_s(float x) {
    const float t = tanh_scalar(0.7978845608028654f * (x + ((0.044715f * x) * x) * x));
    return (0.5f * x) * (1.f + t);
}

// out[a:b] = gelu(g) * u, on the calling thread
inline void gelu_mul_serial(const float* g, const float* u, int64_t a, int64_t b, float* out) {
    int64_t i = a;
    for (; i + 8 <= b; i += 8) vstoreu(out + i, vmul(gelu_v(vloadu(g + i)), vloadu(u + i)));
    for (; i < b; ++i) out[i] = gelu_s(g[i]) * u[i];
}

// out[a:b] = gelu(x[a:b]), on the calling thread
inline void gelu_serial(const float* x, int64_t a, int64_t b, float* out) {
    int64_t i = a;
    for (; i + 8 <= b; i += 8) vstoreu(out + i, gelu_v(vloadu(x + i)));
    for (; i < b; ++i) out[i] = gelu_s(x[i]);
}

// out = x * sigmoid(g), sigmoid(g) = 0.5 + 0.5 tanh(g / 2) (SiLU is x = g; a GLU's gate is g).
inline void sigmoid_mul(const float* x, const float* g, int64_t size, float* out) {
    auto fn = [&](int64_t a, int64_t b) {
        int64_t i = a;
        const VF half = vset1(0.5f);
        for (; i + 8 <= b; i += 8)
            vstoreu(out + i, vmul(vloadu(x + i), vfma(half, vtanh(vmul(half, vloadu(g + i))), half)));
        for (; i < b; ++i) out[i] = x[i] * (0.5f * tanh_scalar(0.5f * g[i]) + 0.5f);
    };
    parallel_range(size, 16384, fn);
}

inline void gelu_mul(const float* g, const float* u, int64_t size, float* out) {
    auto fn = [&](int64_t a, int64_t b) { gelu_mul_serial(g, u, a, b, out); };
    parallel_range(size, 16384, fn);
}

// out = tanh(x / cap) * cap
inline void softcap(const float* x, int64_t size, float cap, float* out) {
    const float inv = 1.f / cap;
    auto fn = [&](int64_t a, int64_t b) {
        int64_t i = a;
        const VF vi = vset1(inv), vc = vset1(cap);
        for (; i + 8 <= b; i += 8) vstoreu(out + i, vmul(vtanh(vmul(vloadu(x + i), vi)), vc));
        for (; i < b; ++i) out[i] = tanh_scalar(x[i] * inv) * cap;
    };
    parallel_range(size, 32768, fn);
}

// ----------------------------------------------------------------------------- depthwise convolution

// Channels-last depthwise convolution (Gemma 3n's image tower): x [H, W, C], taps [k, k, C],
// out [oh, ow, C] with out[o, p, c] = sum over taps (i, j) whose input row s*o + i - top and
// column s*p + j - left lie inside x of x[.., .., c] * taps[i, j, c] (padding reads as zero).
// Output rows are spread over the threads; each pixel sums its taps in order, 8 channels at a
// time, so results do not depend on the thread count.
inline void depthwise_conv2d(const float* x, int64_t H, int64_t W, int64_t C, const float* taps, int64_t k,
                             int64_t s, int64_t top, int64_t left, float* out, int64_t oh, int64_t ow) {
    auto rows = [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
            // the taps whose input row / column lies inside x: i in [ia, ib), j in [ja, jb)
            const int64_t ia = std::max<int64_t>(0, top - s * o), ib = std::min<int64_t>(k, H + top - s * o);
            for (int64_t p = 0; p < ow; ++p) {
                const int64_t ja = std::max<int64_t>(0, left - s * p), jb = std::min<int64_t>(k, W + left - s * p);
                // offset of tap (0, 0)'s input, which may lie outside x: only in-range taps are read
                const int64_t base = ((s * o - top) * W + (s * p - left)) * C;
                float* dst = out + (o * ow + p) * C;
                int64_t c = 0;
                for (; c + 8 <= C; c += 8) {
                    VF acc = vzero();
                    for (int64_t i = ia; i < ib; ++i)
                        for (int64_t j = ja; j < jb; ++j)
                            acc = vfma(vloadu(x + base + (i * W + j) * C + c), vloadu(taps + (i * k + j) * C + c), acc);
                    vstoreu(dst + c, acc);
                }
                for (; c < C; ++c) {
                    float acc = 0.f;
                    for (int64_t i = ia; i < ib; ++i)
                        for (int64_t j = ja; j < jb; ++j)
                            acc = std::fma(x[base + (i * W + j) * C + c], taps[(i * k + j) * C + c], acc);
                    dst[c] = acc;
                }
            }
        }
    };
    const int64_t per_row = std::max<int64_t>(1, ow * C * k * k);
    parallel_range(oh, std::max<int64_t>(1, 65536 / per_row), rows);
}

// ----------------------------------------------------------------------------- attention

struct AttnParams {
    const float* q;  // [n, H, hd]
    const float* k;  // [T, KV, hd] float32, or null when k16 is set
    const float* v;  // [T, KV, hd] float32, or null when v16 is set
    const uint16_t* k16 = nullptr;  // [T, KV, hd] IEEE half (an fp16 KV cache)
    const uint16_t* v16 = nullptr;
    const int64_t* qpos;  // [n]
    const int64_t* kpos;  // [T], -1 = empty
    int64_t n, H, KV, hd, T;
    int64_t window;  // 0 = global
    float scale;
    float cap;  // 0 = no softcap
    float* out;  // [n, H * hd]
    // bf16 dot products (builds with kAttnBf16, not in batch-invariant mode): Q, K, the
    // unnormalized probabilities and V rounded to bf16, products summed in fp32 (vdpbf16ps:
    // twice the multiply-adds per instruction of an FMA). Softmax, sums and output stay fp32.
    bool bf16 = false;
    // set by attention() on the bf16 path: K and V of every slot in bf16, converted once per
    // call (K: [KV][ceil(T/8)] groups of 8 slots, each [hd16/2][8][2]; V: [KV][ceil(T/2)][hd8][2],
    // pairs of consecutive slots)
    const uint16_t* kbf = nullptr;
    const uint16_t* vbf = nullptr;
};

// Which builds have the bf16 attention path: 2 = vdpbf16ps (AVX512_BF16; the CPU must have it
// too, attn_bf16_ready()), 1 = emulated with FMAs, bit for bit (the vnniemu test build), 0 = none.
#if defined(EDGELM_PATH_AVX2) && defined(__AVX512BF16__) && defined(__AVX512VL__)
constexpr int kAttnBf16 = 2;
#elif defined(EDGELM_PATH_AVX2) && defined(EDGELM_VNNI_EMULATE)
constexpr int kAttnBf16 = 1;
#else
constexpr int kAttnBf16 = 0;
#endif

inline bool attn_bf16_ready() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    if constexpr (kAttnBf16 == 2) {
        static const bool hw = [] {
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx512bf16") != 0;
        }();
        return hw;
    }
#endif
    return kAttnBf16 == 1;
}

namespace attn_detail {

constexpr int KB = 64;  // keys per block

// Decode (at most 8 query rows per unit, each K/V row read once, from DRAM): blocks of
// KB_DECODE keys, and while the scores of one block are computed, the next block's K/V rows
// are prefetched into L2. Measured 1.11-1.24x on cold decode attention against 64-key blocks
// without prefetch; on 270M decode, where attention is ~7-9% of a step, 0.99-1.07x, i.e. within
// this host's noise (measurements in docs/kernels.md).
// Module switch for A/B runs: 1 = this (default), 0 = 64-key blocks, no prefetch.
constexpr int KB_DECODE = 16;
inline std::atomic<int>& decode_prefetch_mode() {
    static std::atomic<int> v{1};
    return v;
}

// K/V rows are float32 or IEEE half (an fp16 KV cache, widened in registers as they load).
EDGELM_INLINE VF ld8(const float* p) { return vloadu(p); }
EDGELM_INLINE VF ld8(const uint16_t* p) { return vload8h(p); }
EDGELM_INLINE float ld1(const float* p) { return *p; }
EDGELM_INLINE float ld1(const uint16_t* p) { return half_to_float(*p); }

// Keeps a vector in a register: without it GCC may fold one query load into each of the NK
// FMAs that use it (seen in the fp16-K instantiation inside attn_unit_t: 15 loads per 12
// FMAs instead of 7, load-bound; prefill attention on fp16 K/V measured 1.25-1.29x faster
// with the pin, `microbench.py attention-ab`).
#if defined(EDGELM_PATH_AVX2) && (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512VL__)
EDGELM_INLINE void vpin(VF& x) { __asm__("" : "+v"(x.v)); }  // any of the 32 registers
#elif defined(EDGELM_PATH_AVX2) && (defined(__GNUC__) || defined(__clang__))
EDGELM_INLINE void vpin(VF& x) { __asm__("" : "+x"(x.v)); }
#else
EDGELM_INLINE void vpin(VF&) {}
#endif

// Scores of NR query rows against NK keys: s[i*ld + c] = q_i . k_c. Lanes run along
// head_dim; each key load feeds NR FMAs and each query load NK. The register tile is at most
// 4 x 3 (12 accumulators + 3 keys + 1 query = 16 AVX2 registers); builds with 32 vector
// registers (AVX-512VL) take 8 x 3 (kAttnRows), which halves the loads and the fp16
// widenings of K and V per FMA. Every score and output element is the same sequence of
// operations for any NR, so the tile height does not change results.
#if defined(EDGELM_PATH_AVX2) && defined(__AVX512VL__)
constexpr int kAttnRows = 8;
#else
constexpr int kAttnRows = 4;
#endif
template <int NR, int NK, class T>
EDGELM_INLINE void qk_tile(const float* const* qr, const T* const* kt, int64_t hd, float* s, int64_t ld) {
    VF a[NR][NK];
    for (int i = 0; i < NR; ++i)
        for (int c = 0; c < NK; ++c) a[i][c] = vzero();
    int64_t j = 0;
    for (; j + 8 <= hd; j += 8) {
        VF x[NK];
        for (int c = 0; c < NK; ++c) x[c] = ld8(kt[c] + j);
        for (int i = 0; i < NR; ++i) {
            VF qv = vloadu(qr[i] + j);
            vpin(qv);
            for (int c = 0; c < NK; ++c) a[i][c] = vfma(qv, x[c], a[i][c]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int c = 0; c < NK; ++c) {
            float t = vhsum(a[i][c]);
            for (int64_t jj = j; jj < hd; ++jj) t += qr[i][jj] * ld1(kt[c] + jj);
            s[i * ld + c] = t;
        }
}

// o_i[c : c + 8W] += sum_a p_i[a] * v_a[c : c + 8W] for NR rows (p_i = p0 + i * KB, o_i = o0 +
// i * hd). Each V load feeds NR FMAs; 4 rows x 3 vectors is the largest AVX2 tile (8 x 3 with 32 registers).
template <int NR, int W, class T>
EDGELM_INLINE void pv_tile(const float* p0, const T* const* vp, int64_t na, int64_t c, float* o0, int64_t hd) {
    VF acc[NR][W];
    for (int i = 0; i < NR; ++i)
        for (int w = 0; w < W; ++w) acc[i][w] = vloadu(o0 + i * hd + c + 8 * w);
    for (int64_t a = 0; a < na; ++a) {
        const T* vt = vp[a] + c;
        VF x[W];
        for (int w = 0; w < W; ++w) x[w] = ld8(vt + 8 * w);
        for (int i = 0; i < NR; ++i) {
            const VF b = vset1(p0[i * KB + a]);
            for (int w = 0; w < W; ++w) acc[i][w] = vfma(b, x[w], acc[i][w]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int w = 0; w < W; ++w) vstoreu(o0 + i * hd + c + 8 * w, acc[i][w]);
}

template <int NR, class T>
EDGELM_INLINE void pv_rows(const float* p0, const T* const* vp, int64_t na, float* o0, int64_t hd) {
    int64_t c = 0;
    for (; c + 24 <= hd; c += 24) pv_tile<NR, 3>(p0, vp, na, c, o0, hd);
    if (c + 16 <= hd) {
        pv_tile<NR, 2>(p0, vp, na, c, o0, hd);
        c += 16;
    }
    if (c + 8 <= hd) {
        pv_tile<NR, 1>(p0, vp, na, c, o0, hd);
        c += 8;
    }
    for (; c < hd; ++c)
        for (int i = 0; i < NR; ++i) {
            float x = o0[i * hd + c];
            for (int64_t a = 0; a < na; ++a) x += p0[i * KB + a] * ld1(vp[a] + c);
            o0[i * hd + c] = x;
        }
}

#if defined(EDGELM_PATH_AVX2)
// bf16 tiles (AttnParams::bf16). Query rows are bf16 arrays padded with zeros to a multiple
// of 16 and K comes in groups of 8 slots (bf16_kv), so each vdpbf16ps adds one query's pair of
// head_dim elements to 8 scores; a block's probabilities are bf16 rows (viewed as uint32: key
// pairs 2a, 2a + 1) and V comes interleaved in pairs of slots ([hd8][2] per pair), so each
// vdpbf16ps adds two keys' terms to 8 output columns. Same tile heights as the fp32 ones.
EDGELM_INLINE void vpin(__m256i& x) {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512VL__)
    __asm__("" : "+v"(x));
#elif defined(__GNUC__) || defined(__clang__)
    __asm__("" : "+x"(x));
#endif
}

// n values -> bf16 (zeros from n to npad)
template <class T>
EDGELM_INLINE void bf16_row(const T* src, int64_t n, uint16_t* dst, int64_t npad) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m256i a = _mm256_srli_epi32(bf16_round_hi(ld8(src + j).v), 16);
        const __m256i b = _mm256_srli_epi32(bf16_round_hi(ld8(src + j + 8).v), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                            _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
    }
    for (; j < n; ++j) dst[j] = bf16_bits(ld1(src + j));
    for (; j < npad; ++j) dst[j] = 0;
}

// dst[2c] = bf16(v0[c]), dst[2c + 1] = bf16(v1[c]) (zero when v1 is null), zeros from n to npad
template <class T>
EDGELM_INLINE void bf16_pair_rows(const T* v0, const T* v1, int64_t n, uint16_t* dst, int64_t npad) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256i lo = _mm256_srli_epi32(bf16_round_hi(ld8(v0 + c).v), 16);
        const __m256i hi = v1 ? bf16_round_hi(ld8(v1 + c).v) : _mm256_setzero_si256();
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * c), _mm256_or_si256(lo, hi));
    }
    for (; c < n; ++c) {
        dst[2 * c] = bf16_bits(ld1(v0 + c));
        dst[2 * c + 1] = v1 ? bf16_bits(ld1(v1 + c)) : 0;
    }
    for (; c < npad; ++c) dst[2 * c] = dst[2 * c + 1] = 0;
}

// Scores of NR query rows against 8 * NV keys, lanes along the keys: K is stored in groups of
// 8 slots, each group [hdp / 2][8][2] (for every pair of head_dim elements, the 8 slots' pairs
// side by side; group stride 8 * hdp), so one vdpbf16ps adds a query's pair to 8 scores and no
// horizontal sums are left. s[i*KB + 8v + j] = q_i . k_{8v + j}; q rows q0 + i * hdp.
template <int NR, int NV>
EDGELM_INLINE void qk_tile_bf(const uint16_t* q0, const uint16_t* kg, int64_t hdp, float* s) {
    VF a[NR][NV];
    for (int i = 0; i < NR; ++i)
        for (int v = 0; v < NV; ++v) a[i][v] = vzero();
    for (int64_t p = 0; p < hdp / 2; ++p) {
        __m256i x[NV];
        for (int v = 0; v < NV; ++v)
            x[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kg + v * 8 * hdp + 16 * p));
        for (int i = 0; i < NR; ++i) {
            int32_t qq;
            std::memcpy(&qq, q0 + i * hdp + 2 * p, 4);
            const __m256i b = _mm256_set1_epi32(qq);
            for (int v = 0; v < NV; ++v) a[i][v] = vdpbf16(a[i][v], b, x[v]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int v = 0; v < NV; ++v) vstoreu(s + i * KB + 8 * v, a[i][v]);
}

// all the block's na keys (in groups of 8 from kg)
template <int NR>
EDGELM_INLINE void qk_rows_bf(const uint16_t* q0, const uint16_t* kg, int64_t na, int64_t hdp, float* S) {
    const int64_t nv = (na + 7) / 8;
    int64_t v = 0;
    for (; v + 3 <= nv; v += 3) qk_tile_bf<NR, 3>(q0, kg + v * 8 * hdp, hdp, S + 8 * v);
    if (v + 2 <= nv) {
        qk_tile_bf<NR, 2>(q0, kg + v * 8 * hdp, hdp, S + 8 * v);
        v += 2;
    }
    if (v < nv) qk_tile_bf<NR, 1>(q0, kg + v * 8 * hdp, hdp, S + 8 * v);
}

// o_i[c : c + 8W] += sum over key pairs of p_i . v, for NR rows; p rows p0 + i*(KB/2) (uint32
// pairs), V pair rows vb + a*vst (vst = 2 * hd8)
template <int NR, int W>
EDGELM_INLINE void pv_tile_bf(const uint32_t* p0, const uint16_t* vb, int64_t vst, int64_t na2, int64_t c, float* o0,
                              int64_t hd) {
    VF acc[NR][W];
    for (int i = 0; i < NR; ++i)
        for (int w = 0; w < W; ++w) acc[i][w] = vloadu(o0 + i * hd + c + 8 * w);
    for (int64_t a = 0; a < na2; ++a) {
        const uint16_t* vt = vb + a * vst + 2 * c;
        __m256i x[W];
        for (int w = 0; w < W; ++w) x[w] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vt + 16 * w));
        for (int i = 0; i < NR; ++i) {
            const __m256i b = _mm256_set1_epi32(static_cast<int>(p0[i * (KB / 2) + a]));
            for (int w = 0; w < W; ++w) acc[i][w] = vdpbf16(acc[i][w], b, x[w]);
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int w = 0; w < W; ++w) vstoreu(o0 + i * hd + c + 8 * w, acc[i][w]);
}

template <int NR>
EDGELM_INLINE void pv_rows_bf(const uint32_t* p0, const uint16_t* vb, int64_t vst, int64_t na2, float* o0,
                              int64_t hd) {
    int64_t c = 0;
    for (; c + 24 <= hd; c += 24) pv_tile_bf<NR, 3>(p0, vb, vst, na2, c, o0, hd);
    if (c + 16 <= hd) {
        pv_tile_bf<NR, 2>(p0, vb, vst, na2, c, o0, hd);
        c += 16;
    }
    if (c + 8 <= hd) {
        pv_tile_bf<NR, 1>(p0, vb, vst, na2, c, o0, hd);
        c += 8;
    }
    for (; c < hd; ++c)  // the same two roundings per key pair as a vdpbf16ps lane
        for (int i = 0; i < NR; ++i) {
            float x = o0[i * hd + c];
            for (int64_t a = 0; a < na2; ++a) {
                const uint32_t p = p0[i * (KB / 2) + a];
                const uint16_t* v = vb + a * vst + 2 * c;
                x = std::fma(bf16_float(p >> 16), bf16_float(v[1]), x);
                x = std::fma(bf16_float(p & 0xffffu), bf16_float(v[0]), x);
            }
            o0[i * hd + c] = x;
        }
}
#endif

// Software prefetch (into L2) of the K and V rows of the next key block, spread over this
// block's score tiles. Decode reads every K/V row once, from DRAM, and waits on it without
// this; prefetching a block's own rows in a burst at its start measured no gain.
struct NextBlock {
    const char* k = nullptr;  // first row of the next block (slot order), or null
    const char* v = nullptr;
    int64_t rows = 0, stride = 0, row_bytes = 0;  // stride: bytes between consecutive slots
};

EDGELM_INLINE void prefetch_l2(const char* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 2);  // read, moderate locality: prefetcht1 on x86, PRFM PLDL2KEEP on aarch64
#elif defined(EDGELM_PATH_AVX2)
    _mm_prefetch(p, _MM_HINT_T1);
#else
    (void)p;
#endif
}

EDGELM_INLINE void prefetch_rows(const NextBlock& nb, int64_t a0, int64_t a1) {
    a1 = std::min(a1, nb.rows);
    for (int64_t a = a0; a < a1; ++a)
        for (int64_t o = 0; o < nb.row_bytes; o += 64) {
            prefetch_l2(nb.k + a * nb.stride + o);
            prefetch_l2(nb.v + a * nb.stride + o);
        }
}

template <int NR, class T>
EDGELM_INLINE void qk_rows(const float* const* qr, const T* const* kp, int64_t na, int64_t hd, float* S,
                           const NextBlock* nb = nullptr) {
    int64_t a = 0;
    if (nb && nb->k) {  // the next block's rows spread evenly over the tiles of 3 keys, the rest at the end
        const int64_t per = (nb->rows + std::max<int64_t>(1, na / 3) - 1) / std::max<int64_t>(1, na / 3);
        int64_t done = 0;
        for (; a + 3 <= na; a += 3) {
            qk_tile<NR, 3>(qr, kp + a, hd, S + a, KB);
            prefetch_rows(*nb, done, done + per);
            done += per;
        }
        prefetch_rows(*nb, done, nb->rows);
    }
    for (; a + 3 <= na; a += 3) qk_tile<NR, 3>(qr, kp + a, hd, S + a, KB);
    if (a + 2 <= na) {
        qk_tile<NR, 2>(qr, kp + a, hd, S + a, KB);
        a += 2;
    }
    if (a < na) qk_tile<NR, 1>(qr, kp + a, hd, S + a, KB);
}

struct Scratch {
    std::vector<float> o, m, l, s;
    std::vector<uint16_t> qb, pb;  // the bf16 path's query and probability rows
    std::vector<int64_t> act;
    std::vector<const void*> kp, vp;
    std::vector<const float*> qr;
    std::vector<int64_t> rpos;
};

inline Scratch& scratch() {
    thread_local Scratch sc;
    return sc;
}

// One (kv group, query tile, key range) unit: fills o (unnormalized), m, l for its R rows.
// Rows are (query, head) pairs: queries qi0..qi0+qn, heads h0..h0+hn of kv group g.
template <class T, bool BF>
void attn_unit_t(const AttnParams& P, const T* K, const T* V, int64_t g, int64_t qi0, int64_t qn, int64_t t0,
                 int64_t t1, float* o, float* m, float* l, int64_t h0, int64_t hn) {
    const int64_t G = P.H / P.KV, hd = P.hd, R = qn * hn;
    const bool det = deterministic();
    Scratch& sc = scratch();
    sc.s.resize(static_cast<size_t>(R * KB));
    sc.act.resize(KB);
    sc.kp.resize(KB);
    sc.vp.resize(KB);
    sc.qr.resize(static_cast<size_t>(R));
    sc.rpos.resize(static_cast<size_t>(R));
    float* S = sc.s.data();
    int64_t* act = sc.act.data();
    const T** kp = reinterpret_cast<const T**>(sc.kp.data());
    const T** vp = reinterpret_cast<const T**>(sc.vp.data());
    const float** qr = sc.qr.data();
    int64_t qmin = std::numeric_limits<int64_t>::max(), qmax = std::numeric_limits<int64_t>::min();
    for (int64_t r = 0; r < R; ++r) {
        const int64_t qi = qi0 + r / hn, h = g * G + h0 + r % hn;
        qr[r] = P.q + (qi * P.H + h) * hd;
        sc.rpos[r] = P.qpos[qi];
        qmin = std::min(qmin, P.qpos[qi]);
        qmax = std::max(qmax, P.qpos[qi]);
    }
    // bf16 path: head_dim padded to 16 (Q, K rows) and to 8 (V pair rows)
    [[maybe_unused]] const int64_t hdp = (hd + 15) & ~int64_t(15), hd8 = (hd + 7) & ~int64_t(7);
    uint16_t* qb = nullptr;
    uint32_t* pb = nullptr;
    if constexpr (BF) {
        sc.qb.resize(static_cast<size_t>(R * hdp));
        sc.pb.resize(static_cast<size_t>(R * KB));
        qb = sc.qb.data();
        pb = reinterpret_cast<uint32_t*>(sc.pb.data());
#if defined(EDGELM_PATH_AVX2)
        for (int64_t r = 0; r < R; ++r) bf16_row(qr[r], hd, qb + r * hdp, hdp);
#endif
    }
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < R; ++r) {
        m[r] = ninf;
        l[r] = 0.f;
    }
    std::fill(o, o + R * hd, 0.f);
    const float inv_cap = P.cap > 0.f ? 1.f / P.cap : 0.f;
    const int64_t W = P.window;
    const bool dpf = R <= 8 && decode_prefetch_mode().load(std::memory_order_relaxed) != 0;
    // Batch-invariant: the same 64-slot blocks for every call, and every slot of a block in
    // its place (masked, not skipped), so that a row's sums see the same lanes whatever the
    // other rows of the call or the slots beyond its own keys.
    const int64_t kbs = det ? KB : dpf ? KB_DECODE : KB;
    for (int64_t tb = t0; tb < t1; tb += kbs) {
        const int64_t te = std::min(t1, tb + kbs);
        int64_t na = 0, nvis = 0, last = -1;
        int64_t kmin = std::numeric_limits<int64_t>::max(), kmax = -1;
        bool holes = false;
        for (int64_t t = tb; t < te; ++t) {
            const int64_t kpos = P.kpos[t];
            const bool usable = kpos >= 0 && qmax - kpos >= 0 && !(W > 0 && qmin - kpos >= W);
            if (!usable) {
                if (det || BF) {  // (the bf16 path's blocks are whole runs of slots, as its K/V rows are)
                    act[na++] = t;
                    holes = true;
                }
                continue;
            }
            act[na++] = t;
            last = na;
            ++nvis;
            kmin = std::min(kmin, kpos);
            kmax = std::max(kmax, kpos);
        }
        if (nvis == 0) continue;
        if (det || BF) {  // slots after the last usable one only add zeros to every lane: leave them out
            na = last;
            holes = false;
            for (int64_t a = 0; a < na && !holes; ++a) {
                const int64_t kpos = P.kpos[act[a]];
                holes = !(kpos >= 0 && qmax - kpos >= 0 && !(W > 0 && qmin - kpos >= W));
            }
        }
        // every active key visible to every row: no per-element mask
        const bool all_visible = !((det || BF) && holes) && kmax <= qmin && (W == 0 || qmax - kmin < W);
        const int64_t nap = (na + 7) & ~int64_t(7);
        if constexpr (!BF)  // (the bf16 path reads the call's converted K/V instead)
            for (int64_t a = 0; a < na; ++a) {
                kp[a] = K + (act[a] * P.KV + g) * hd;
                vp[a] = V + (act[a] * P.KV + g) * hd;
            }
        // scores (decode: while prefetching the next block's K/V rows)
        NextBlock nb;
        if (dpf && te < t1) {
            nb.k = reinterpret_cast<const char*>(K + (te * P.KV + g) * hd);
            nb.v = reinterpret_cast<const char*>(V + (te * P.KV + g) * hd);
            nb.rows = std::min<int64_t>(kbs, t1 - te);
            nb.stride = static_cast<int64_t>(P.KV * hd * sizeof(T));
            nb.row_bytes = static_cast<int64_t>(hd * sizeof(T));
        }
        if constexpr (BF) {
#if defined(EDGELM_PATH_AVX2)
            const uint16_t* kb = P.kbf + (g * ((P.T + 7) / 8) + tb / 8) * 8 * hdp;  // tb: a multiple of 8
            int64_t r = 0;
            if constexpr (kAttnRows == 8)
                for (; r + 8 <= R; r += 8) qk_rows_bf<8>(qb + r * hdp, kb, na, hdp, S + r * KB);
            for (; r + 4 <= R; r += 4) qk_rows_bf<4>(qb + r * hdp, kb, na, hdp, S + r * KB);
            for (; r + 2 <= R; r += 2) qk_rows_bf<2>(qb + r * hdp, kb, na, hdp, S + r * KB);
            for (; r < R; ++r) qk_rows_bf<1>(qb + r * hdp, kb, na, hdp, S + r * KB);
#endif
        } else {
            const NextBlock* pnb = &nb;  // the first row group prefetches
            int64_t r = 0;
            if constexpr (kAttnRows == 8)
                for (; r + 8 <= R; r += 8, pnb = nullptr) qk_rows<8>(qr + r, kp, na, hd, S + r * KB, pnb);
            for (; r + 4 <= R; r += 4, pnb = nullptr) qk_rows<4>(qr + r, kp, na, hd, S + r * KB, pnb);
            for (; r + 2 <= R; r += 2, pnb = nullptr) qk_rows<2>(qr + r, kp, na, hd, S + r * KB, pnb);
            for (; r < R; ++r, pnb = nullptr) qk_rows<1>(qr + r, kp, na, hd, S + r * KB, pnb);
        }
        // scale, softcap, mask, online softmax
        for (int64_t r = 0; r < R; ++r) {
            float* s = S + r * KB;
            for (int64_t a = na; a < nap; ++a) s[a] = ninf;
            const VF vs = vset1(P.scale);
            for (int64_t a = 0; a < nap; a += 8) {
                VF x = vmul(vloadu(s + a), vs);
                if (P.cap > 0.f) x = vmul(vtanh(vmul(x, vset1(inv_cap))), vset1(P.cap));
                vstoreu(s + a, x);
            }
            float bm = ninf;
            if (all_visible) {
                for (int64_t a = 0; a < na; ++a) bm = s[a] > bm ? s[a] : bm;
            } else {
                const int64_t qp = sc.rpos[r];
                for (int64_t a = 0; a < na; ++a) {
                    const int64_t kp_a = P.kpos[act[a]];
                    const int64_t dd = qp - kp_a;
                    const bool vis = kp_a >= 0 && dd >= 0 && (W == 0 || dd < W);
                    if (!vis) s[a] = ninf;
                    bm = s[a] > bm ? s[a] : bm;
                }
            }
            if (bm == ninf) {  // nothing visible to this row in this block
                for (int64_t a = 0; a < nap; ++a) s[a] = 0.f;
                continue;
            }
            const float mn = std::max(m[r], bm);
            const float alpha = exp_scalar(m[r] - mn);
            const VF vmn = vset1(mn);
            VF ls = vzero();
            for (int64_t a = 0; a < nap; a += 8) {
                const VF p = vexp(vsub(vloadu(s + a), vmn));
                vstoreu(s + a, p);
                ls = vadd(ls, p);
            }
            l[r] = l[r] * alpha + vhsum(ls);
            m[r] = mn;
            if (alpha != 1.f) {
                float* orow = o + r * hd;
                for (int64_t j = 0; j < hd; ++j) orow[j] *= alpha;
            }
        }
        // o += P V
        if constexpr (BF) {
#if defined(EDGELM_PATH_AVX2)
            // slot pairs from tb (even); a lone last slot pairs with the next one, whose p is 0
            const int64_t na2 = (na + 1) / 2;
            const uint16_t* vb = P.vbf + (g * ((P.T + 1) / 2) + tb / 2) * 2 * hd8;
            uint16_t* pb16 = reinterpret_cast<uint16_t*>(pb);
            for (int64_t r = 0; r < R; ++r) bf16_row(S + r * KB, 2 * na2, pb16 + r * KB, 2 * na2);
            const int64_t vst = 2 * hd8;
            int64_t r = 0;
            if constexpr (kAttnRows == 8)
                for (; r + 8 <= R; r += 8) pv_rows_bf<8>(pb + r * (KB / 2), vb, vst, na2, o + r * hd, hd);
            for (; r + 4 <= R; r += 4) pv_rows_bf<4>(pb + r * (KB / 2), vb, vst, na2, o + r * hd, hd);
            for (; r + 2 <= R; r += 2) pv_rows_bf<2>(pb + r * (KB / 2), vb, vst, na2, o + r * hd, hd);
            for (; r < R; ++r) pv_rows_bf<1>(pb + r * (KB / 2), vb, vst, na2, o + r * hd, hd);
#endif
        } else {
            int64_t r = 0;
            if constexpr (kAttnRows == 8)
                for (; r + 8 <= R; r += 8) pv_rows<8>(S + r * KB, vp, na, o + r * hd, hd);
            for (; r + 4 <= R; r += 4) pv_rows<4>(S + r * KB, vp, na, o + r * hd, hd);
            for (; r + 2 <= R; r += 2) pv_rows<2>(S + r * KB, vp, na, o + r * hd, hd);
            for (; r < R; ++r) pv_rows<1>(S + r * KB, vp, na, o + r * hd, hd);
        }
    }
}

#if defined(EDGELM_PATH_AVX2)
// The bf16 path's K groups and V slot pairs (AttnParams::kbf / vbf), for every slot and kv head.
inline void bf16_kv(const AttnParams& P, std::vector<uint16_t>& kbf, std::vector<uint16_t>& vbf) {
    const int64_t hd = P.hd, hdp = (hd + 15) & ~int64_t(15), hd8 = (hd + 7) & ~int64_t(7);
    const int64_t T2 = (P.T + 1) / 2, T8 = (P.T + 7) / 8;
    kbf.resize(static_cast<size_t>(P.KV * T8 * 8 * hdp));
    vbf.resize(static_cast<size_t>(P.KV * T2 * 2 * hd8));
    constexpr int64_t kChunk = 8;  // groups of 8 slots per task
    const int64_t per_g = ceil_div(std::max<int64_t>(T8, 1), kChunk);
    auto task = [&](int64_t t) {
        const int64_t g = t / per_g, g0 = (t % per_g) * kChunk, g1 = std::min(T8, g0 + kChunk);
        std::vector<uint16_t>& tmp = scratch().qb;  // one bf16 row
        tmp.resize(static_cast<size_t>(hdp));
        auto rows = [&](auto* K, auto* V) {
            using T = std::remove_const_t<std::remove_pointer_t<decltype(K)>>;
            for (int64_t gi = g0; gi < g1; ++gi) {
                uint32_t* dst = reinterpret_cast<uint32_t*>(kbf.data() + (g * T8 + gi) * 8 * hdp);
                for (int64_t j = 0; j < 8; ++j) {
                    const int64_t ts = 8 * gi + j;
                    if (ts < P.T)
                        bf16_row(K + (ts * P.KV + g) * hd, hd, tmp.data(), hdp);
                    else
                        std::fill(tmp.begin(), tmp.end(), uint16_t(0));
                    const uint32_t* src = reinterpret_cast<const uint32_t*>(tmp.data());
                    for (int64_t p = 0; p < hdp / 2; ++p) dst[p * 8 + j] = src[p];
                }
                for (int64_t a = 4 * gi; a < std::min(T2, 4 * gi + 4); ++a) {
                    const T* v1 = 2 * a + 1 < P.T ? V + ((2 * a + 1) * P.KV + g) * hd : nullptr;
                    bf16_pair_rows(V + (2 * a * P.KV + g) * hd, v1, hd, vbf.data() + (g * T2 + a) * 2 * hd8, hd8);
                }
            }
        };
        if (P.k16)
            rows(P.k16, P.v16);
        else
            rows(P.k, P.v);
    };
    ThreadPool::instance().run(P.KV * per_g, task, P.KV * P.T * hd >= 32768);
}
#else
inline void bf16_kv(const AttnParams&, std::vector<uint16_t>&, std::vector<uint16_t>&) {}
#endif

}  // namespace attn_detail

inline void attn_unit(const AttnParams& P, int64_t g, int64_t qi0, int64_t qn, int64_t t0, int64_t t1, float* o,
                      float* m, float* l, int64_t h0 = 0, int64_t hn = -1) {
    if (hn < 0) hn = P.H / P.KV;
    if constexpr (kAttnBf16 != 0) {
        if (P.kbf) {  // attention() took the bf16 path
            if (P.k16)
                attn_detail::attn_unit_t<uint16_t, true>(P, P.k16, P.v16, g, qi0, qn, t0, t1, o, m, l, h0, hn);
            else
                attn_detail::attn_unit_t<float, true>(P, P.k, P.v, g, qi0, qn, t0, t1, o, m, l, h0, hn);
            return;
        }
    }
    if (P.k16)
        attn_detail::attn_unit_t<uint16_t, false>(P, P.k16, P.v16, g, qi0, qn, t0, t1, o, m, l, h0, hn);
    else
        attn_detail::attn_unit_t<float, false>(P, P.k, P.v, g, qi0, qn, t0, t1, o, m, l, h0, hn);
}

inline void attention(const AttnParams& P) {
    if (P.n <= 0) return;
    const int64_t G = P.H / P.KV, hd = P.hd;
    const int64_t QT = std::max<int64_t>(1, std::min<int64_t>(P.n, 16 / std::max<int64_t>(1, G)));
    const int64_t ntiles = ceil_div(P.n, QT);
    const int64_t units = P.KV * ntiles;
    ThreadPool& pool = ThreadPool::instance();
    int64_t S = 1;
    // Few query tiles (decode): split the keys into parts of 128+ so threads share the work
    // (parts of 64 measured 3-16% slower decode: twice the tasks, each a shorter stream of
    // K/V from DRAM). The split depends on the shapes only, never on the thread count, so
    // results are the same for any --threads.
    if (units < 8 && P.T >= 256) S = std::min<int64_t>(ceil_div(8, units), P.T / 128);
    S = std::max<int64_t>(1, S);
    // Batch-invariant mode: a key split would combine partial sums in an order that depends on
    // the cache's length, so the threads share a unit's query heads instead (rows are
    // independent; each thread reads the group's keys).
    const bool det = deterministic();
    int64_t HS = 1, hl = G;
    if (det) {
        S = 1;
        if (units < pool.threads() && G > 1) {  // (rows are independent: any split gives the same bits)
            HS = std::min<int64_t>(G, ceil_div(pool.threads(), units));
            hl = ceil_div(G, HS);
            HS = ceil_div(G, hl);
        }
    }
    int64_t span = ceil_div(std::max<int64_t>(P.T, 1), S);
    const int64_t Rmax = QT * G;
    // bf16 path: every slot's K and V converted once here, for all the units
    AttnParams PA = P;
    std::vector<uint16_t> kbf, vbf;
    if (kAttnBf16 != 0 && P.bf16 && !det && attn_bf16_ready()) {
        span = (span + 7) & ~int64_t(7);  // units start at slots 8i (K groups of 8 slots, V pairs)
        attn_detail::bf16_kv(P, kbf, vbf);
        PA.kbf = kbf.data();
        PA.vbf = vbf.data();
    }
    std::vector<float> part_o, part_ml;
    if (S > 1) {
        part_o.resize(static_cast<size_t>(units * S * Rmax * hd));
        part_ml.resize(static_cast<size_t>(units * S * Rmax * 2));
    }
    auto write_rows = [&](int64_t g, int64_t qi0, int64_t qn, const float* o, const float* l, int64_t h0,
                          int64_t hn) {
        for (int64_t r = 0; r < qn * hn; ++r) {
            const int64_t qi = qi0 + r / hn, h = g * G + h0 + r % hn;
            float* dst = P.out + (qi * P.H + h) * hd;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            for (int64_t j = 0; j < hd; ++j) dst[j] = o[r * hd + j] * inv;
        }
    };
    auto task = [&](int64_t t) {
        const int64_t hs = t % HS;
        t /= HS;
        const int64_t u = t / S, s = t % S;
        const int64_t g = u / ntiles, tile = u % ntiles;
        const int64_t qi0 = tile * QT, qn = std::min(QT, P.n - qi0);
        const int64_t t0 = std::min(P.T, s * span), t1 = std::min(P.T, t0 + span);
        if (S == 1) {
            const int64_t h0 = hs * hl, hn = std::min(G, h0 + hl) - h0;
            thread_local std::vector<float> o, m, l;
            o.resize(static_cast<size_t>(Rmax * hd));
            m.resize(static_cast<size_t>(Rmax));
            l.resize(static_cast<size_t>(Rmax));
            attn_unit(PA, g, qi0, qn, t0, t1, o.data(), m.data(), l.data(), h0, hn);
            write_rows(g, qi0, qn, o.data(), l.data(), h0, hn);
        } else {
            float* o = part_o.data() + t * Rmax * hd;
            float* ml = part_ml.data() + t * Rmax * 2;
            attn_unit(PA, g, qi0, qn, t0, t1, o, ml, ml + Rmax);
        }
    };
    const double work = static_cast<double>(P.n) * P.H * hd * std::max<int64_t>(P.T, 1);
    pool.run(units * S * HS, task, work >= 32768.0);
    if (S == 1) return;
    // combine the key splits
    auto comb = [&](int64_t u) {
        const int64_t g = u / ntiles, tile = u % ntiles;
        const int64_t qi0 = tile * QT, qn = std::min(QT, P.n - qi0);
        for (int64_t r = 0; r < qn * G; ++r) {
            float M = -std::numeric_limits<float>::infinity();
            for (int64_t s = 0; s < S; ++s) M = std::max(M, part_ml[(u * S + s) * Rmax * 2 + r]);
            const int64_t qi = qi0 + r / G, h = g * G + r % G;
            float* dst = P.out + (qi * P.H + h) * hd;
            std::fill(dst, dst + hd, 0.f);
            if (M == -std::numeric_limits<float>::infinity()) continue;
            float L = 0.f;
            for (int64_t s = 0; s < S; ++s) {
                const float* ml = part_ml.data() + (u * S + s) * Rmax * 2;
                if (ml[r] == -std::numeric_limits<float>::infinity()) continue;
                const float w = exp_scalar(ml[r] - M);
                L += w * ml[Rmax + r];
                const float* o = part_o.data() + (u * S + s) * Rmax * hd + r * hd;
                for (int64_t j = 0; j < hd; ++j) dst[j] += w * o[j];
            }
            const float inv = L > 0.f ? 1.f / L : 0.f;
            for (int64_t j = 0; j < hd; ++j) dst[j] *= inv;
        }
    };
    for (int64_t u = 0; u < units; ++u) comb(u);
}

// ----------------------------------------------------------------------------- full attention

// Attention in which every query sees every key (an encoder's, e.g. the image tower's
// multi-query attention): q [n, H, hd], k, v [T, KV, hd] float32, out [n, H * hd]. No
// positions, window or cap, so it is two float GEMMs around a row softmax, run on the float
// GEMM's 6 x 16 micro-kernel: K is packed once per kv head into k-major panels of 16 keys
// ([hd][16]) and V into panels of 16 value columns ([T][16]); a task takes a band of up to
// kFullBand (query, head) rows of one kv head, gathers their q rows, writes their scores
// (times `scale`) to a [band, T] buffer, soft-maxes each row in place and multiplies by V.
// Every output is the same sequence of operations whatever the band split or thread count.
constexpr int64_t kFullBand = 48;  // rows per task: a multiple of the micro-kernel's 6

inline void full_attention(const float* q, const float* k, const float* v, int64_t n, int64_t H, int64_t KV,
                           int64_t hd, int64_t T, float scale, float* out) {
    if (n <= 0 || T <= 0) return;
    const int64_t G = H / KV, R = n * G;  // rows per kv head
    const int64_t nk = ceil_div(T, kFGemmCols), nv = ceil_div(hd, kFGemmCols);
    const int64_t T16 = nk * kFGemmCols, hd16 = nv * kFGemmCols;
    // panels: K [KV][nk][hd][16], V [KV][nv][T][16], zero-padded past T keys / hd columns
    std::vector<float> kp(static_cast<size_t>(KV * nk * hd * kFGemmCols), 0.f);
    std::vector<float> vp(static_cast<size_t>(KV * nv * T * kFGemmCols), 0.f);
    for (int64_t g = 0; g < KV; ++g)
        for (int64_t t = 0; t < T; ++t) {
            const float* kr = k + (t * KV + g) * hd;
            const float* vr = v + (t * KV + g) * hd;
            float* kpp = kp.data() + ((g * nk + t / kFGemmCols) * hd) * kFGemmCols + t % kFGemmCols;
            for (int64_t d = 0; d < hd; ++d) kpp[d * kFGemmCols] = kr[d];
            for (int64_t d = 0; d < hd; ++d)
                vp[static_cast<size_t>(((g * nv + d / kFGemmCols) * T + t) * kFGemmCols + d % kFGemmCols)] = vr[d];
        }
    const int64_t bands = ceil_div(R, kFullBand);
    auto task = [&](int64_t tsk) {
        const int64_t g = tsk / bands, r0 = (tsk % bands) * kFullBand, rn = std::min(kFullBand, R - r0);
        thread_local std::vector<float> qb, sb, ob;
        qb.resize(static_cast<size_t>(kFullBand * hd));
        sb.resize(static_cast<size_t>(kFullBand * T16));
        ob.resize(static_cast<size_t>(kFullBand * hd16));
        auto qrow = [&](int64_t r) { return ((r0 + r) / G * H + g * G + (r0 + r) % G) * hd; };
        for (int64_t r = 0; r < rn; ++r) std::copy(q + qrow(r), q + qrow(r) + hd, qb.data() + r * hd);
        for (int64_t i0 = 0; i0 < rn; i0 += kFGemmNR) {
            const FMicroFn micro = fgemm_micro_for(static_cast<int>(std::min<int64_t>(kFGemmNR, rn - i0)));
            for (int64_t p = 0; p < nk; ++p)
                micro(qb.data() + i0 * hd, hd, kp.data() + (g * nk + p) * hd * kFGemmCols, hd,
                      sb.data() + i0 * T16 + p * kFGemmCols, T16, kFGemmCols, false);
        }
        float inv[kFullBand];
        const VF vs = vset1(scale);
        for (int64_t r = 0; r < rn; ++r) {
            float* s = sb.data() + r * T16;
            int64_t t = 0;
            VF vm = vset1(-std::numeric_limits<float>::infinity());
            for (; t + 8 <= T; t += 8) {
                const VF x = vmul(vloadu(s + t), vs);
                vstoreu(s + t, x);
                vm = vmax(vm, x);
            }
            float m = vhmax(vm);
            for (; t < T; ++t) m = std::max(m, s[t] *= scale);
            const VF vmv = vset1(m);
            VF vl = vzero();
            for (t = 0; t + 8 <= T; t += 8) {
                const VF e = vexp(vsub(vloadu(s + t), vmv));
                vstoreu(s + t, e);
                vl = vadd(vl, e);
            }
            float l = vhsum(vl);
            for (; t < T; ++t) l += (s[t] = exp_scalar(s[t] - m));
            inv[r] = 1.f / l;
        }
        for (int64_t i0 = 0; i0 < rn; i0 += kFGemmNR) {
            const FMicroFn micro = fgemm_micro_for(static_cast<int>(std::min<int64_t>(kFGemmNR, rn - i0)));
            for (int64_t p = 0; p < nv; ++p)
                micro(sb.data() + i0 * T16, T16, vp.data() + (g * nv + p) * T * kFGemmCols, T,
                      ob.data() + i0 * hd16 + p * kFGemmCols, hd16, kFGemmCols, false);
        }
        for (int64_t r = 0; r < rn; ++r) {
            const float* o = ob.data() + r * hd16;
            float* dst = out + qrow(r);
            const float iv = inv[r];
            for (int64_t d = 0; d < hd; ++d) dst[d] = o[d] * iv;
        }
    };
    const double work = static_cast<double>(R) * KV * hd * T;
    ThreadPool::instance().run(KV * bands, task, work >= 32768.0);
}

// ----------------------------------------------------------------------------- bandwidth probe

// Best-of-`passes` read bandwidth (GB/s) summing `nbytes` with `threads` threads. Each pass
// is run twice, as a plain sum (STREAM's read loop) and with software prefetch 2.5 KB ahead
// (as the GEMV kernels read): on this host a prefetching GEMV at times out-read the plain
// loop by up to 30%, so the plain loop alone was not a ceiling.
inline double stream_read_gbs(int64_t nbytes, int threads, int passes) {
    const int64_t nf = std::max<int64_t>(1024, nbytes / 4) & ~int64_t(255);
    std::vector<float> storage(static_cast<size_t>(nf + 16), 1.f);  // written: pages are resident
    float* buf = storage.data();
    while (reinterpret_cast<uintptr_t>(buf) % 64) ++buf;
    std::atomic<float> sink{0.f};
    auto sum_range = [&](int64_t a, int64_t b, bool pf) {
        VF s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
        constexpr int64_t kAhead = 640;  // floats: 2.5 KB
        for (int64_t i = a; i < b; i += 32) {
            if (pf && i + kAhead < b) {
#if defined(__GNUC__) || defined(__clang__)
                __builtin_prefetch(buf + i + kAhead, 0, 3);
                __builtin_prefetch(buf + i + kAhead + 16, 0, 3);
#endif
            }
            s0 = vadd(s0, vloadu(buf + i));
            s1 = vadd(s1, vloadu(buf + i + 8));
            s2 = vadd(s2, vloadu(buf + i + 16));
            s3 = vadd(s3, vloadu(buf + i + 24));
        }
        const float r = vhsum(vadd(vadd(s0, s1), vadd(s2, s3)));
        float cur = sink.load();
        while (!sink.compare_exchange_weak(cur, cur + r)) {
        }
    };
    double best = 0.0;
    const int64_t per = (nf / threads) & ~int64_t(31);
    for (int p = 0; p < 2 * passes; ++p) {
        const bool pf = p % 2 == 1;
        std::atomic<int> ready{0};
        std::atomic<bool> go{false};
        std::vector<std::thread> th;
        std::vector<double> secs(static_cast<size_t>(threads), 0.0);
        for (int t = 0; t < threads; ++t) {
            th.emplace_back([&, t] {
                const int64_t a = t * per, b = (t == threads - 1) ? (nf & ~int64_t(31)) : a + per;
                ready.fetch_add(1);
                while (!go.load(std::memory_order_acquire)) EDGELM_CPU_RELAX();
                sum_range(a, b, pf);
            });
        }
        while (ready.load() < threads) std::this_thread::yield();
        const auto t0 = std::chrono::steady_clock::now();
        go.store(true, std::memory_order_release);
        for (auto& x : th) x.join();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double gbs = static_cast<double>(nf & ~int64_t(31)) * 4.0 / s / 1e9;
        best = std::max(best, gbs);
    }
    return sink.load() == -1.f ? 0.0 : best;
}

}  // namespace edgelm
