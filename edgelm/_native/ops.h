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

// out[r, :] = x[r, :] * (1 / sqrt(mean(x[r]^2) + eps)) * w, for rows r of length d.
inline void rmsnorm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out) {
    auto rowfn = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * d;
            scale_row(xr, inv_rms(xr, d, eps), w, d, out + r * d);
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

// out[a:b] = 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3))) * u, on the calling thread
inline void gelu_mul_serial(const float* g, const float* u, int64_t a, int64_t b, float* out) {
    const float c = 0.7978845608028654f, k3 = 0.044715f;
    int64_t i = a;
    const VF vc = vset1(c), vk = vset1(k3), half = vset1(0.5f), one = vset1(1.f);
    for (; i + 8 <= b; i += 8) {
        const VF x = vloadu(g + i);
        const VF inner = vadd(x, vmul(vmul(vmul(vk, x), x), x));
        const VF t = vtanh(vmul(vc, inner));
        vstoreu(out + i, vmul(vmul(vmul(half, x), vadd(one, t)), vloadu(u + i)));
    }
    for (; i < b; ++i) {
        const float x = g[i];
        const float t = tanh_scalar(c * (x + ((k3 * x) * x) * x));
        out[i] = ((0.5f * x) * (1.f + t)) * u[i];
    }
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
};

namespace attn_detail {

constexpr int KB = 64;  // keys per block

EDGELM_INLINE float dot1(const float* a, const float* b, int64_t hd) {
    VF s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    int64_t j = 0;
    for (; j + 32 <= hd; j += 32) {
        s0 = vfma(vloadu(a + j), vloadu(b + j), s0);
        s1 = vfma(vloadu(a + j + 8), vloadu(b + j + 8), s1);
        s2 = vfma(vloadu(a + j + 16), vloadu(b + j + 16), s2);
        s3 = vfma(vloadu(a + j + 24), vloadu(b + j + 24), s3);
    }
    for (; j + 8 <= hd; j += 8) s0 = vfma(vloadu(a + j), vloadu(b + j), s0);
    float s = vhsum(vadd(vadd(s0, s1), vadd(s2, s3)));
    for (; j < hd; ++j) s += a[j] * b[j];
    return s;
}

// 4 query rows against one key.
EDGELM_INLINE void dot4(const float* const* qr, const float* kt, int64_t hd, float* s, int64_t ld) {
    VF a[4][2];
    for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = vzero();
    int64_t j = 0;
    for (; j + 16 <= hd; j += 16) {
        const VF k0 = vloadu(kt + j), k1 = vloadu(kt + j + 8);
        for (int i = 0; i < 4; ++i) {
            a[i][0] = vfma(vloadu(qr[i] + j), k0, a[i][0]);
            a[i][1] = vfma(vloadu(qr[i] + j + 8), k1, a[i][1]);
        }
    }
    for (; j + 8 <= hd; j += 8) {
        const VF k0 = vloadu(kt + j);
        for (int i = 0; i < 4; ++i) a[i][0] = vfma(vloadu(qr[i] + j), k0, a[i][0]);
    }
    for (int i = 0; i < 4; ++i) {
        float t = vhsum(vadd(a[i][0], a[i][1]));
        for (int64_t jj = j; jj < hd; ++jj) t += qr[i][jj] * kt[jj];
        s[i * ld] = t;
    }
}

// 4 query rows against two keys (8 dot products; each q load feeds 2 FMAs).
EDGELM_INLINE void dot4x2(const float* const* qr, const float* k0, const float* k1, int64_t hd, float* s, int64_t ld) {
    VF a[4][2];
    for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = vzero();
    int64_t j = 0;
    for (; j + 8 <= hd; j += 8) {
        const VF x0 = vloadu(k0 + j), x1 = vloadu(k1 + j);
        for (int i = 0; i < 4; ++i) {
            const VF qv = vloadu(qr[i] + j);
            a[i][0] = vfma(qv, x0, a[i][0]);
            a[i][1] = vfma(qv, x1, a[i][1]);
        }
    }
    for (int i = 0; i < 4; ++i) {
        float t0 = vhsum(a[i][0]), t1 = vhsum(a[i][1]);
        for (int64_t jj = j; jj < hd; ++jj) {
            t0 += qr[i][jj] * k0[jj];
            t1 += qr[i][jj] * k1[jj];
        }
        s[i * ld] = t0;
        s[i * ld + 1] = t1;
    }
}

// o[r0/r1][0:W*8] += sum_a p[r][a] * v_a[0:W*8] for two rows (each v load feeds 2 FMAs).
template <int W>
EDGELM_INLINE void pv2(const float* p0, const float* p1, const float* const* vp, int64_t na, int64_t c, float* o0,
                       float* o1) {
    VF a0[W], a1[W];
    for (int j = 0; j < W; ++j) {
        a0[j] = vloadu(o0 + c + 8 * j);
        a1[j] = vloadu(o1 + c + 8 * j);
    }
    for (int64_t a = 0; a < na; ++a) {
        const VF b0 = vset1(p0[a]), b1 = vset1(p1[a]);
        const float* vt = vp[a] + c;
        for (int j = 0; j < W; ++j) {
            const VF vv = vloadu(vt + 8 * j);
            a0[j] = vfma(b0, vv, a0[j]);
            a1[j] = vfma(b1, vv, a1[j]);
        }
    }
    for (int j = 0; j < W; ++j) {
        vstoreu(o0 + c + 8 * j, a0[j]);
        vstoreu(o1 + c + 8 * j, a1[j]);
    }
}

template <int W>
EDGELM_INLINE void pv1(const float* p0, const float* const* vp, int64_t na, int64_t c, float* o0) {
    VF a0[W];
    for (int j = 0; j < W; ++j) a0[j] = vloadu(o0 + c + 8 * j);
    for (int64_t a = 0; a < na; ++a) {
        const VF b0 = vset1(p0[a]);
        const float* vt = vp[a] + c;
        for (int j = 0; j < W; ++j) a0[j] = vfma(b0, vloadu(vt + 8 * j), a0[j]);
    }
    for (int j = 0; j < W; ++j) vstoreu(o0 + c + 8 * j, a0[j]);
}

// n halves -> floats (an fp16 KV row into the fp32 block scratch)
EDGELM_INLINE void halves_to_floats(const uint16_t* src, float* dst, int64_t n) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        VF w[4];
        load32_f16(src + j, w);
        for (int i = 0; i < 4; ++i) vstoreu(dst + j + 8 * i, w[i]);
    }
    for (; j < n; ++j) dst[j] = half_to_float(src[j]);
}

struct Scratch {
    std::vector<float> o, m, l, s, kbuf, vbuf;
    std::vector<int64_t> act;
    std::vector<const float*> qr, kp, vp;
    std::vector<int64_t> rpos;
};

inline Scratch& scratch() {
    thread_local Scratch sc;
    return sc;
}

}  // namespace attn_detail

// One (kv group, query tile, key range) unit: fills o (unnormalized), m, l for its R rows.
inline void attn_unit(const AttnParams& P, int64_t g, int64_t qi0, int64_t qn, int64_t t0, int64_t t1, float* o,
                      float* m, float* l) {
    using namespace attn_detail;
    const int64_t G = P.H / P.KV, hd = P.hd, R = qn * G;
    Scratch& sc = scratch();
    sc.s.resize(static_cast<size_t>(R * KB));
    sc.act.resize(KB);
    sc.kp.resize(KB);
    sc.vp.resize(KB);
    sc.qr.resize(static_cast<size_t>(R));
    sc.rpos.resize(static_cast<size_t>(R));
    if (P.k16) {
        sc.kbuf.resize(static_cast<size_t>(KB * hd));
        sc.vbuf.resize(static_cast<size_t>(KB * hd));
    }
    float* S = sc.s.data();
    int64_t* act = sc.act.data();
    int64_t qmin = std::numeric_limits<int64_t>::max(), qmax = std::numeric_limits<int64_t>::min();
    for (int64_t r = 0; r < R; ++r) {
        const int64_t qi = qi0 + r / G, h = g * G + r % G;
        sc.qr[r] = P.q + (qi * P.H + h) * hd;
        sc.rpos[r] = P.qpos[qi];
        qmin = std::min(qmin, P.qpos[qi]);
        qmax = std::max(qmax, P.qpos[qi]);
    }
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < R; ++r) {
        m[r] = ninf;
        l[r] = 0.f;
    }
    std::fill(o, o + R * hd, 0.f);
    const float inv_cap = P.cap > 0.f ? 1.f / P.cap : 0.f;
    const int64_t W = P.window;
    for (int64_t tb = t0; tb < t1; tb += KB) {
        const int64_t te = std::min(t1, tb + KB);
        int64_t na = 0;
        for (int64_t t = tb; t < te; ++t) {
            const int64_t kp = P.kpos[t];
            if (kp < 0 || qmax - kp < 0) continue;
            if (W > 0 && qmin - kp >= W) continue;
            act[na++] = t;
        }
        if (na == 0) continue;
        const int64_t nap = (na + 7) & ~int64_t(7);
        const float** kp = sc.kp.data();
        const float** vp = sc.vp.data();
        if (P.k16) {  // fp16 cache: widen this block's visible keys/values once (L1/L2-resident)
            float* kb = sc.kbuf.data();
            float* vb = sc.vbuf.data();
            for (int64_t a = 0; a < na; ++a) {
                halves_to_floats(P.k16 + (act[a] * P.KV + g) * hd, kb + a * hd, hd);
                halves_to_floats(P.v16 + (act[a] * P.KV + g) * hd, vb + a * hd, hd);
                kp[a] = kb + a * hd;
                vp[a] = vb + a * hd;
            }
        } else {
            for (int64_t a = 0; a < na; ++a) {
                kp[a] = P.k + (act[a] * P.KV + g) * hd;
                vp[a] = P.v + (act[a] * P.KV + g) * hd;
            }
        }
        // scores
        {
            int64_t a = 0;
            for (; a + 2 <= na; a += 2) {
                int64_t r = 0;
                for (; r + 4 <= R; r += 4) dot4x2(sc.qr.data() + r, kp[a], kp[a + 1], hd, S + r * KB + a, KB);
                for (; r < R; ++r) {
                    S[r * KB + a] = dot1(sc.qr[r], kp[a], hd);
                    S[r * KB + a + 1] = dot1(sc.qr[r], kp[a + 1], hd);
                }
            }
            for (; a < na; ++a) {
                int64_t r = 0;
                for (; r + 4 <= R; r += 4) dot4(sc.qr.data() + r, kp[a], hd, S + r * KB + a, KB);
                for (; r < R; ++r) S[r * KB + a] = dot1(sc.qr[r], kp[a], hd);
            }
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
            const int64_t qp = sc.rpos[r];
            float bm = ninf;
            for (int64_t a = 0; a < na; ++a) {
                const int64_t dd = qp - P.kpos[act[a]];
                const bool vis = dd >= 0 && (W == 0 || dd < W);
                if (!vis) s[a] = ninf;
                bm = s[a] > bm ? s[a] : bm;
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
        // o += P V (rows in pairs: each V load feeds two rows)
        {
            int64_t r = 0;
            for (; r + 2 <= R; r += 2) {
                const float* p0 = S + r * KB;
                const float* p1 = p0 + KB;
                float* o0 = o + r * hd;
                float* o1 = o0 + hd;
                int64_t c = 0;
                for (; c + 32 <= hd; c += 32) pv2<4>(p0, p1, vp, na, c, o0, o1);
                for (; c + 8 <= hd; c += 8) pv2<1>(p0, p1, vp, na, c, o0, o1);
                for (; c < hd; ++c) {
                    float x0 = o0[c], x1 = o1[c];
                    for (int64_t a = 0; a < na; ++a) {
                        x0 += p0[a] * vp[a][c];
                        x1 += p1[a] * vp[a][c];
                    }
                    o0[c] = x0;
                    o1[c] = x1;
                }
            }
            for (; r < R; ++r) {
                const float* p0 = S + r * KB;
                float* o0 = o + r * hd;
                int64_t c = 0;
                for (; c + 32 <= hd; c += 32) pv1<4>(p0, vp, na, c, o0);
                for (; c + 8 <= hd; c += 8) pv1<1>(p0, vp, na, c, o0);
                for (; c < hd; ++c) {
                    float x0 = o0[c];
                    for (int64_t a = 0; a < na; ++a) x0 += p0[a] * vp[a][c];
                    o0[c] = x0;
                }
            }
        }
    }
}

inline void attention(const AttnParams& P) {
    if (P.n <= 0) return;
    const int64_t G = P.H / P.KV, hd = P.hd;
    const int64_t QT = std::max<int64_t>(1, std::min<int64_t>(P.n, 16 / std::max<int64_t>(1, G)));
    const int64_t ntiles = ceil_div(P.n, QT);
    const int64_t units = P.KV * ntiles;
    ThreadPool& pool = ThreadPool::instance();
    int64_t S = 1;
    // Few query tiles (decode): split the keys into parts of 64+ so threads share the work.
    // The split depends on the shapes only, never on the thread count, so results are the
    // same for any --threads.
    if (units < 8 && P.T >= 128) S = std::min<int64_t>(ceil_div(8, units), P.T / 64);
    S = std::max<int64_t>(1, S);
    const int64_t span = ceil_div(std::max<int64_t>(P.T, 1), S);
    const int64_t Rmax = QT * G;
    std::vector<float> part_o, part_ml;
    if (S > 1) {
        part_o.resize(static_cast<size_t>(units * S * Rmax * hd));
        part_ml.resize(static_cast<size_t>(units * S * Rmax * 2));
    }
    auto write_rows = [&](int64_t g, int64_t qi0, int64_t qn, const float* o, const float* l) {
        for (int64_t r = 0; r < qn * G; ++r) {
            const int64_t qi = qi0 + r / G, h = g * G + r % G;
            float* dst = P.out + (qi * P.H + h) * hd;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            for (int64_t j = 0; j < hd; ++j) dst[j] = o[r * hd + j] * inv;
        }
    };
    auto task = [&](int64_t t) {
        const int64_t u = t / S, s = t % S;
        const int64_t g = u / ntiles, tile = u % ntiles;
        const int64_t qi0 = tile * QT, qn = std::min(QT, P.n - qi0);
        const int64_t t0 = std::min(P.T, s * span), t1 = std::min(P.T, t0 + span);
        if (S == 1) {
            thread_local std::vector<float> o, m, l;
            o.resize(static_cast<size_t>(Rmax * hd));
            m.resize(static_cast<size_t>(Rmax));
            l.resize(static_cast<size_t>(Rmax));
            attn_unit(P, g, qi0, qn, t0, t1, o.data(), m.data(), l.data());
            write_rows(g, qi0, qn, o.data(), l.data());
        } else {
            float* o = part_o.data() + t * Rmax * hd;
            float* ml = part_ml.data() + t * Rmax * 2;
            attn_unit(P, g, qi0, qn, t0, t1, o, ml, ml + Rmax);
        }
    };
    const double work = static_cast<double>(P.n) * P.H * hd * std::max<int64_t>(P.T, 1);
    pool.run(units * S, task, work >= 32768.0);
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

// ----------------------------------------------------------------------------- bandwidth probe

// Best-of-`passes` read bandwidth (GB/s) summing `nbytes` with `threads` threads.
inline double stream_read_gbs(int64_t nbytes, int threads, int passes) {
    const int64_t nf = std::max<int64_t>(1024, nbytes / 4) & ~int64_t(255);
    std::vector<float> storage(static_cast<size_t>(nf + 16), 1.f);  // written: pages are resident
    float* buf = storage.data();
    while (reinterpret_cast<uintptr_t>(buf) % 64) ++buf;
    std::atomic<float> sink{0.f};
    auto sum_range = [&](int64_t a, int64_t b) {
        VF s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
        for (int64_t i = a; i < b; i += 32) {
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
    for (int p = 0; p < passes; ++p) {
        std::atomic<int> ready{0};
        std::atomic<bool> go{false};
        std::vector<std::thread> th;
        std::vector<double> secs(static_cast<size_t>(threads), 0.0);
        for (int t = 0; t < threads; ++t) {
            th.emplace_back([&, t] {
                const int64_t a = t * per, b = (t == threads - 1) ? (nf & ~int64_t(31)) : a + per;
                ready.fetch_add(1);
                while (!go.load(std::memory_order_acquire)) EDGELM_CPU_RELAX();
                sum_range(a, b);
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
