// edgelm native kernels: a run of Gemma 3 decoder blocks as one call.
//
// A forward step calls the block's 9 products and fused ops once per layer; from Python
// that is 9 x 18 calls per step for the 270M, each paying argument checks, the GIL round
// trip and (prefill) fresh numpy allocations. g3_blocks runs every block of a forward in C++ with the same kernels, in
// the same order, on the same data, so its result is bitwise the per-op path's
// (tests/test_block.py checks that). The KV cache (numpy arrays that Python owns) is written
// here too: slot = position % slots, fp16 caches rounded to nearest even as numpy's
// astype(float16) does.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#include "fused.h"
#include "kernels.h"
#include "ops.h"
#include "qd8.h"
#include "simd.h"

namespace edgelm {

struct G3BlockW {
    WView q, k, v, o, gate, up, down;
    bool q_qkv, q_o, q_gate, q_up, q_down;  // qd8 choices, made by the caller
    const float* q_norm;
    const float* k_norm;
    const float* post_attn;
    const float* ffn_norm;
    const float* post_ffw;
    const float* next_norm;  // the next block's input norm (or the final norm); null = none
    bool local;
};

struct G3Cache {  // one layer's KV cache: numpy arrays owned by Python
    void* k;
    void* v;
    int64_t* pos;
    int64_t slots;
    bool half;
    int64_t filled;  // in: slots [0, filled) hold data; out: updated
};

struct G3Dims {
    int64_t hidden, H, KV, hd, ffn, window;
    float eps, scale, cap;
    bool attn_bf16 = false;  // AttnParams::bf16 for every block's attention
};

// Optional wall-clock timing of g3_blocks' phases, for profiling (`set_phase_timing`,
// `phase_times` in the module; off by default, and then one relaxed load per phase). Each
// phase also counts the bytes it must read from memory: weights for the products, the
// filled K/V slots for attention.
enum G3Phase { kPhQKV, kPhNormRope, kPhAttn, kPhO, kPhAddNorm1, kPhGateUp, kPhDown, kPhAddNorm2, kNumPhases };
struct PhaseClock {
    std::atomic<int> on{0};
    std::atomic<int64_t> ns[kNumPhases];
    std::atomic<int64_t> bytes[kNumPhases];
    std::atomic<int64_t> calls[kNumPhases];
    PhaseClock() { reset(); }
    void reset() {
        for (int i = 0; i < kNumPhases; ++i) {
            ns[i].store(0);
            bytes[i].store(0);
            calls[i].store(0);
        }
    }
};
inline PhaseClock& phase_clock() {
    static PhaseClock c;
    return c;
}
inline const char* phase_name(int i) {
    static const char* names[kNumPhases] = {"qkv", "norm_rope_cache", "attention", "o", "add_norm_attn",
                                            "gate_up", "down", "add_norm_ffn"};
    return names[i];
}
inline int64_t weight_bytes(const WView& W) { return W.rows * row_bytes(W.scheme, W.cols); }

// Times the span between mark() calls when the clock is on.
class PhaseTimer {
public:
    PhaseTimer() : on_(phase_clock().on.load(std::memory_order_relaxed) != 0) {
        if (on_) t_ = std::chrono::steady_clock::now();
    }
    void mark(int phase, int64_t bytes) {
        if (!on_) return;
        const auto t = std::chrono::steady_clock::now();
        PhaseClock& c = phase_clock();
        c.ns[phase].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(t - t_).count(),
                              std::memory_order_relaxed);
        c.bytes[phase].fetch_add(bytes, std::memory_order_relaxed);
        c.calls[phase].fetch_add(1, std::memory_order_relaxed);
        t_ = t;
    }

private:
    bool on_;
    std::chrono::steady_clock::time_point t_{};
};

inline void g3_matmul(const WView& W, const float* x, int64_t n, float* out, bool q) {
    if (q)
        matmul_qd8(W, x, n, out);
    else
        matmul(W, x, n, out);
}

// Writes n rows of K and V ([n, KV*hd] float) into the cache at slot = pos % slots.
inline void g3_cache_write(G3Cache& C, const float* k, const float* v, const int64_t* pos, int64_t n, int64_t row) {
    for (int64_t i = 0; i < n; ++i) {
        const int64_t slot = pos[i] % C.slots;
        if (C.half) {
            uint16_t* kd = static_cast<uint16_t*>(C.k) + slot * row;
            uint16_t* vd = static_cast<uint16_t*>(C.v) + slot * row;
            int64_t j = 0;
            for (; j + 8 <= row; j += 8) {
                vstore8h(kd + j, vloadu(k + i * row + j));
                vstore8h(vd + j, vloadu(v + i * row + j));
            }
            for (; j < row; ++j) {
                kd[j] = float_to_half(k[i * row + j]);
                vd[j] = float_to_half(v[i * row + j]);
            }
        } else {
            std::copy(k + i * row, k + (i + 1) * row, static_cast<float*>(C.k) + slot * row);
            std::copy(v + i * row, v + (i + 1) * row, static_cast<float*>(C.v) + slot * row);
        }
        C.pos[slot] = pos[i];
        C.filled = std::max(C.filled, slot + 1);
    }
}

// x [n, hidden]: the residual stream (updated in place); h [n, hidden]: the first block's
// normalized input, on return the last block's next_norm output (untouched if it has none).
// cos/sin [n, hd/2] for local and global layers. Scratch (7.3k floats per token for the
// 270M: 3.7 MB for a 128-token prefill chunk) is allocated here, once per call.
// The rows may belong to nseq sequences (batched decode): sequence s owns seq_rows[s]
// consecutive rows and the caches C[s * nb .. s * nb + nb); the products and norms run on all
// n rows at once, the cache writes and attention per sequence. seq_rows: null when nseq is 1.
// need (nseq 1 only; -1 = all): only the last `need` rows' outputs are wanted (a prefill
// chunk's last token, or none), so the last block computes attention, its products and norms
// for those rows only, after writing every row's K and V; the other rows of x and h are left
// as the previous block left them.
inline void g3_blocks(const G3Dims& D, const G3BlockW* B, G3Cache* C, int64_t nb, float* x, float* h,
                      const int64_t* pos, int64_t n, const float* cos_l, const float* sin_l, const float* cos_g,
                      const float* sin_g, int64_t nseq = 1, const int64_t* seq_rows = nullptr, int64_t need = -1) {
    const int64_t qd = D.H * D.hd, kvd = D.KV * D.hd;
    std::vector<float> qb(n * qd), kb(n * kvd), vb(n * kvd), ab(n * qd), ob(n * D.hidden), gb(n * D.ffn),
        tb(n * D.ffn);
    PhaseTimer tm;
    auto rows_of = [&](int64_t s) { return nseq > 1 ? seq_rows[s] : n; };  // sequence s's rows
    for (int64_t b = 0; b < nb; ++b) {
        const G3BlockW& L = B[b];
        // q, k, v (one job when they share a scheme, as matmul_multi does)
        if (L.q.scheme == L.k.scheme && L.q.scheme == L.v.scheme) {
            const WView ws[3] = {L.q, L.k, L.v};
            float* outs[3] = {qb.data(), kb.data(), vb.data()};
            matmul_multi(ws, 3, h, n, outs, L.q_qkv);
        } else {
            g3_matmul(L.q, h, n, qb.data(), L.q_qkv);
            g3_matmul(L.k, h, n, kb.data(), L.q_qkv);
            g3_matmul(L.v, h, n, vb.data(), L.q_qkv);
        }
        tm.mark(kPhQKV, weight_bytes(L.q) + weight_bytes(L.k) + weight_bytes(L.v));
        const float* cs = L.local ? cos_l : cos_g;
        const float* sn = L.local ? sin_l : sin_g;
        rmsnorm_rope(qb.data(), L.q_norm, cs, sn, n, D.H, D.hd, D.eps, qb.data());
        rmsnorm_rope(kb.data(), L.k_norm, cs, sn, n, D.KV, D.hd, D.eps, kb.data());
        for (int64_t s = 0, r0 = 0; s < nseq; r0 += rows_of(s), ++s)
            g3_cache_write(C[s * nb + b], kb.data() + r0 * kvd, vb.data() + r0 * kvd, pos + r0, rows_of(s), kvd);
        tm.mark(kPhNormRope, 0);
        // rows carried past the cache write: all, or the last block's wanted ones
        const int64_t m = b == nb - 1 && nseq == 1 && need >= 0 && need < n ? need : n, o0 = n - m;
        if (m == 0) break;
        int64_t kv_bytes = 0;
        for (int64_t s = 0, r0 = o0; s < nseq; r0 += rows_of(s), ++s) {
            const G3Cache& Cc = C[s * nb + b];
            AttnParams P;
            P.q = qb.data() + r0 * qd;
            if (Cc.half) {
                P.k = P.v = nullptr;
                P.k16 = static_cast<const uint16_t*>(Cc.k);
                P.v16 = static_cast<const uint16_t*>(Cc.v);
            } else {
                P.k = static_cast<const float*>(Cc.k);
                P.v = static_cast<const float*>(Cc.v);
            }
            P.qpos = pos + r0;
            P.kpos = Cc.pos;
            P.n = nseq > 1 ? rows_of(s) : m;
            P.H = D.H;
            P.KV = D.KV;
            P.hd = D.hd;
            P.T = Cc.filled;
            P.window = L.local ? D.window : 0;
            P.scale = D.scale;
            P.cap = D.cap;
            P.out = ab.data() + r0 * qd;
            P.bf16 = D.attn_bf16;
            attention(P);
            kv_bytes += 2 * Cc.filled * kvd * (Cc.half ? 2 : 4);
        }
        tm.mark(kPhAttn, kv_bytes);
        float* xm = x + o0 * D.hidden;
        float* hm = h + o0 * D.hidden;
        g3_matmul(L.o, ab.data() + o0 * qd, m, ob.data(), L.q_o);
        tm.mark(kPhO, weight_bytes(L.o));
        add_rmsnorm(xm, ob.data(), L.post_attn, L.ffn_norm, m, D.hidden, D.eps, hm);
        tm.mark(kPhAddNorm1, 0);
        if (L.gate.scheme == L.up.scheme) {
            matmul_gelu_mul(L.gate, L.up, hm, m, gb.data(), tb.data(), L.q_gate);
        } else {
            g3_matmul(L.gate, hm, m, gb.data(), L.q_gate);
            g3_matmul(L.up, hm, m, tb.data(), L.q_up);
            gelu_mul(gb.data(), tb.data(), m * D.ffn, gb.data());
        }
        tm.mark(kPhGateUp, weight_bytes(L.gate) + weight_bytes(L.up));
        g3_matmul(L.down, gb.data(), m, ob.data(), L.q_down);
        tm.mark(kPhDown, weight_bytes(L.down));
        add_rmsnorm(xm, ob.data(), L.post_ffw, L.next_norm, m, D.hidden, D.eps, L.next_norm ? hm : nullptr);
        tm.mark(kPhAddNorm2, 0);
    }
}

}  // namespace edgelm
