// edgelm native kernels: per-scheme row access, the matmul micro-kernel, embedding rows,
// the per-scheme function table and the threaded drivers. No Python here; inputs are
// validated by kernels.cpp before anything in this file runs.
//
// Layouts (see edgelm/quant/schemes.py, the reference these kernels are tested against):
//
//   id scheme     parts
//   0  fp32       w float32 [rows, cols]
//   1  fp16       w float16 [rows, cols]
//   2  int8       q int8  [rows, cols]     scale float32 [rows]
//   3  int8-b32   q int8  [rows, cols]     scale float16 [rows, cols/32]
//   4  int4-b32   q uint8 [rows, cols/2]   scale float16 [rows, cols/32]   (Q4_0 nibble order)
//   5  int4-b128  q uint8 [rows, cols/2]   scale float16 [rows, cols/128]
//
// Every scheme is read in blocks of 32 weights: `S::load(row, b, w)` produces weights
// 32b..32b+31 of a row as 4 VF, already multiplied by their block scale. A per-row scale
// (int8) is applied once to the finished dot product. Columns past the last full block
// (only fp32/fp16/int8 allow them) go through a scalar tail.
//
// This file is the fp32-activation path (every scheme; exact up to fp32 rounding). The
// int8-quantized-activation ("qd8") path for the integer schemes is qd8.h; kernels.cpp picks
// one per call (EDGELM_QD8 / set_qd8 / the qd8 argument). To add a weight format write one S
// struct and one table row here and, for an integer format, a tile family in qd8.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "simd.h"
#include "threadpool.h"

namespace edgelm {

enum SchemeId : int { kFP32 = 0, kFP16 = 1, kINT8 = 2, kINT8B32 = 3, kINT4B32 = 4, kINT4B128 = 5, kNumSchemes = 6 };

// A validated weight: `w` is the data part (w or q), `scale` the scale part or null.
struct WView {
    int scheme = -1;
    int64_t rows = 0, cols = 0;
    const void* w = nullptr;
    const void* scale = nullptr;
};

// Bytes of weight data plus scales per row (for cache blocking).
inline int64_t row_bytes(int scheme, int64_t cols) {
    switch (scheme) {
        case kFP32: return 4 * cols;
        case kFP16: return 2 * cols;
        case kINT8: return cols + 4;
        case kINT8B32: return cols + 2 * (cols / 32);
        case kINT4B32: return cols / 2 + 2 * (cols / 32);
        case kINT4B128: return cols / 2 + 2 * (cols / 128);
        default: return 4 * cols;
    }
}

// ----------------------------------------------------------------------------- row access

struct SchFP32 {
    static constexpr bool kRowScale = false;
    struct Row { const float* p; };
    const float* w; int64_t cols;
    explicit SchFP32(const WView& v) : w(static_cast<const float*>(v.w)), cols(v.cols) {}
    EDGELM_INLINE Row row(int64_t r) const { return {w + r * cols}; }
    static EDGELM_INLINE void load(const Row& R, int64_t b, VF* o) { load32_f32(R.p + 32 * b, o); }
    static EDGELM_INLINE float at(const Row& R, int64_t k) { return R.p[k]; }
    static EDGELM_INLINE float rscale(const Row&) { return 1.f; }
};

struct SchFP16 {
    static constexpr bool kRowScale = false;
    struct Row { const uint16_t* p; };
    const uint16_t* w; int64_t cols;
    explicit SchFP16(const WView& v) : w(static_cast<const uint16_t*>(v.w)), cols(v.cols) {}
    EDGELM_INLINE Row row(int64_t r) const { return {w + r * cols}; }
    static EDGELM_INLINE void load(const Row& R, int64_t b, VF* o) { load32_f16(R.p + 32 * b, o); }
    static EDGELM_INLINE float at(const Row& R, int64_t k) { return half_to_float(R.p[k]); }
    static EDGELM_INLINE float rscale(const Row&) { return 1.f; }
};

// int8, one float32 scale per row, applied to the finished dot product.
struct SchINT8 {
    static constexpr bool kRowScale = true;
    struct Row { const int8_t* p; float s; };
    const int8_t* q; const float* s; int64_t cols;
    explicit SchINT8(const WView& v)
        : q(static_cast<const int8_t*>(v.w)), s(static_cast<const float*>(v.scale)), cols(v.cols) {}
    EDGELM_INLINE Row row(int64_t r) const { return {q + r * cols, s[r]}; }
    static EDGELM_INLINE void load(const Row& R, int64_t b, VF* o) { load32_i8(R.p + 32 * b, o); }
    static EDGELM_INLINE float at(const Row& R, int64_t k) { return static_cast<float>(R.p[k]); }
    static EDGELM_INLINE float rscale(const Row& R) { return R.s; }
};

// int8 with one float16 scale per 32 weights (GGUF Q8_0).
struct SchINT8B32 {
    static constexpr bool kRowScale = false;
    struct Row { const int8_t* p; const uint16_t* s; };
    const int8_t* q; const uint16_t* s; int64_t cols;
    explicit SchINT8B32(const WView& v)
        : q(static_cast<const int8_t*>(v.w)), s(static_cast<const uint16_t*>(v.scale)), cols(v.cols) {}
    EDGELM_INLINE Row row(int64_t r) const { return {q + r * cols, s + r * (cols / 32)}; }
    static EDGELM_INLINE void load(const Row& R, int64_t b, VF* o) {
        load32_i8(R.p + 32 * b, o);
        const VF d = vset1(half_to_float(R.s[b]));
        for (int j = 0; j < 4; ++j) o[j] = vmul(o[j], d);
    }
    static EDGELM_INLINE float at(const Row& R, int64_t k) {
        return static_cast<float>(R.p[k]) * half_to_float(R.s[k / 32]);
    }
    static EDGELM_INLINE float rscale(const Row&) { return 1.f; }
};

// int4 (Q4_0 nibble order within each 32), one float16 scale per BS weights.
template <int BS>
struct SchINT4 {
    static_assert(BS % 32 == 0, "int4 block must be a multiple of 32");
    static constexpr bool kRowScale = false;
    struct Row { const uint8_t* p; const uint16_t* s; };
    const uint8_t* q; const uint16_t* s; int64_t cols;
    explicit SchINT4(const WView& v)
        : q(static_cast<const uint8_t*>(v.w)), s(static_cast<const uint16_t*>(v.scale)), cols(v.cols) {}
    EDGELM_INLINE Row row(int64_t r) const { return {q + r * (cols / 2), s + r * (cols / BS)}; }
    static EDGELM_INLINE void load(const Row& R, int64_t b, VF* o) {
        load32_i4(R.p + 16 * b, o);
        const VF d = vset1(half_to_float(R.s[(32 * b) / BS]));
        for (int j = 0; j < 4; ++j) o[j] = vmul(o[j], d);
    }
    static EDGELM_INLINE float at(const Row& R, int64_t k) {
        const uint8_t byte = R.p[(k / 32) * 16 + (k % 16)];
        const int nib = (k % 32) < 16 ? (byte & 0x0f) : (byte >> 4);
        return static_cast<float>(nib - 8) * half_to_float(R.s[k / BS]);
    }
    static EDGELM_INLINE float rscale(const Row&) { return 1.f; }
};

// ----------------------------------------------------------------------------- micro-kernels

constexpr int kMaxNX = 8;  // activation rows per tile

// out[i*ldo + r] = dot(x[i*ldx : +cols], W[r]) for r in [r0, r1), i in [0, NX).
// Each 32-weight block is loaded (and dequantized) once and used for all NX activation rows.
// NACC independent accumulators per activation row hide the FMA latency.
template <class S, int NX>
void tile_rows(const WView& v, int64_t r0, int64_t r1, const float* x, int64_t ldx, float* out, int64_t ldo) {
    constexpr int NACC = NX <= 2 ? 4 : (NX <= 4 ? 2 : 1);  // NX 1 and 2: the same per-row sums (see matmul)
    const S s(v);
    const int64_t cols = v.cols;
    const int64_t nb = cols / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const auto R = s.row(r);
        VF acc[NX][NACC];
        for (int i = 0; i < NX; ++i)
            for (int a = 0; a < NACC; ++a) acc[i][a] = vzero();
        for (int64_t b = 0; b < nb; ++b) {
            VF w[4];
            S::load(R, b, w);
            const float* xb = x + 32 * b;
            for (int i = 0; i < NX; ++i)
                for (int j = 0; j < 4; ++j)
                    acc[i][j % NACC] = vfma(w[j], vloadu(xb + i * ldx + 8 * j), acc[i][j % NACC]);
        }
        const float rs = S::rscale(R);
        for (int i = 0; i < NX; ++i) {
            VF a = acc[i][0];
            for (int k = 1; k < NACC; ++k) a = vadd(a, acc[i][k]);
            float sum = vhsum(a);
            const float* xi = x + i * ldx;
            for (int64_t k = 32 * nb; k < cols; ++k) sum += S::at(R, k) * xi[k];
            out[i * ldo + r] = sum * rs;
        }
    }
}

// dst[0:cols] = dequantized row r.
template <class S>
void embed_row(const WView& v, int64_t r, float* dst) {
    const S s(v);
    const auto R = s.row(r);
    const int64_t nb = v.cols / 32;
    const float rs = S::rscale(R);
    const VF vrs = vset1(rs);
    for (int64_t b = 0; b < nb; ++b) {
        VF w[4];
        S::load(R, b, w);
        for (int j = 0; j < 4; ++j) vstoreu(dst + 32 * b + 8 * j, S::kRowScale ? vmul(w[j], vrs) : w[j]);
    }
    for (int64_t k = 32 * nb; k < v.cols; ++k) dst[k] = S::kRowScale ? S::at(R, k) * rs : S::at(R, k);
}

// ----------------------------------------------------------------------------- the table

using TileFn = void (*)(const WView&, int64_t, int64_t, const float*, int64_t, float*, int64_t);
using EmbedFn = void (*)(const WView&, int64_t, float*);

struct SchemeKernels {
    const char* name;
    TileFn tile[kMaxNX + 1];  // tile[nx] handles nx activation rows; tile[0] unused
    EmbedFn embed;
};

template <class S>
constexpr SchemeKernels make_kernels(const char* name) {
    return {name,
            {nullptr, &tile_rows<S, 1>, &tile_rows<S, 2>, &tile_rows<S, 3>, &tile_rows<S, 4>, &tile_rows<S, 5>,
             &tile_rows<S, 6>, &tile_rows<S, 7>, &tile_rows<S, 8>},
            &embed_row<S>};
}

inline const SchemeKernels& scheme_kernels(int id) {
    static const SchemeKernels table[kNumSchemes] = {
        make_kernels<SchFP32>("fp32"),        make_kernels<SchFP16>("fp16"),
        make_kernels<SchINT8>("int8"),        make_kernels<SchINT8B32>("int8-b32"),
        make_kernels<SchINT4<32>>("int4-b32"), make_kernels<SchINT4<128>>("int4-b128"),
    };
    return table[id];
}

// ----------------------------------------------------------------------------- drivers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool float_gemm_applies(int scheme, int64_t n);

// Output rows per task. GEMV (n = 1): one contiguous range per thread, so each thread's
// reads form one long stream the hardware prefetcher follows. GEMM: a band of weight rows
// small enough to stay in L2 while every activation tile sweeps over it, in whole 16-row
// groups (the packed int4 GEMM packs two groups of 8 at a time). The packed float GEMM holds
// only one K block of its band at a time (panels of 256 k x 16 columns), so its band is
// sized by that: up to 128 rows (128 KB of panels) whatever K is. Sized by the whole row,
// fp16 rows of K = 6144 (the audio tower's FFW down projection) gave bands of 16 rows, and the
// 750 x 6144 activations were read once per 16 outputs.
inline int64_t band_rows(const WView& W, int64_t n, int64_t T) {
    if (n == 1) return std::max<int64_t>(16, ceil_div(W.rows, T));
    if (float_gemm_applies(W.scheme, n)) {
        const int64_t c = std::min<int64_t>(128, std::max<int64_t>(1, ceil_div(W.rows, 4 * T)));
        return (c + 15) & ~int64_t(15);
    }
    constexpr int64_t kL2Band = 160 * 1024;
    const int64_t chunk = std::max<int64_t>(4, kL2Band / std::max<int64_t>(1, row_bytes(W.scheme, W.cols)));
    const int64_t c = std::min(chunk, std::max<int64_t>(1, ceil_div(W.rows, 4 * T)));
    return (c + 15) & ~int64_t(15);  // whole 16-row groups for the packed int4 GEMM
}

// One-row products (decode) are bandwidth-bound, and each thread streams one contiguous
// range of rows so that its reads form one long stream the prefetchers follow. With a fixed
// split, whichever thread reads slower at the moment (this host's vCPUs do not get equal
// memory rates) sets the time and the other waits. GemvSplit cuts each part's range into
// chunks (<= 64 KB of weights, ~4+ per part, multiples of 8 rows); part p takes its own chunks front to back,
// then takes chunks from the back of the other parts' ranges, one CAS per chunk on a word
// per range (front | back). Every chunk is taken exactly once, and each row is computed by
// the same micro-kernel whoever takes it, so results do not depend on the split.
class GemvSplit {
public:
    static constexpr int64_t kChunkBytes = 64 * 1024;

    GemvSplit(int64_t rows, int64_t bytes_per_row, int parts) : rows_(rows), parts_(std::max(1, parts)) {
        chunk_ = std::max<int64_t>(1, std::min(kChunkBytes / std::max<int64_t>(1, bytes_per_row),
                                               ceil_div(rows, 4 * static_cast<int64_t>(parts_))));
        // Multiples of 8 rows: fused epilogues (gelu_mul_serial) take 8 rows per vector step and
        // the rest in scalar code, so chunk edges at multiples of 8 keep results split-independent.
        chunk_ = ceil_div(chunk_, 8) * 8;
        const int64_t nch = ceil_div(rows, chunk_), per = ceil_div(nch, parts_);
        slots_.reset(new Slot[static_cast<size_t>(parts_)]);
        for (int p = 0; p < parts_; ++p)
            slots_[p].s.store(pack(std::min(nch, p * per), std::min(nch, (p + 1) * per)), std::memory_order_relaxed);
    }
    int parts() const { return parts_; }

    // Runs f(r0, r1) over part `part`'s chunks, then over chunks left in the other parts.
    template <class F>
    void run(int part, F& f) {
        for (int k = 0; k < parts_; ++k) {
            const int p = (part + k) % parts_;
            for (int64_t c; (c = take(p, k == 0)) >= 0;) f(c * chunk_, std::min(rows_, (c + 1) * chunk_));
        }
    }

private:
    struct alignas(64) Slot {
        std::atomic<uint64_t> s{0};
    };
    static uint64_t pack(int64_t f, int64_t b) { return static_cast<uint64_t>(f) | (static_cast<uint64_t>(b) << 32); }
    int64_t take(int p, bool front) {
        uint64_t s = slots_[p].s.load(std::memory_order_relaxed);
        for (;;) {
            const int64_t f = static_cast<int64_t>(s & 0xffffffffu), b = static_cast<int64_t>(s >> 32);
            if (f >= b) return -1;
            if (slots_[p].s.compare_exchange_weak(s, front ? pack(f + 1, b) : pack(f, b - 1), std::memory_order_relaxed))
                return front ? f : b - 1;
        }
    }
    int64_t rows_, chunk_ = 1;
    int parts_;
    std::unique_ptr<Slot[]> slots_;
};

// out[n, rows] = x[n, cols] @ W^T. Work is split over output rows. For n > 1, each task
// owns a band of weight rows small enough to stay in L2 and sweeps all activation tiles
// over it, so weights come from memory once per call.
// ----------------------------------------------------------------------------- float GEMM
//
// fp32 / fp16 weights times float32 activations with many rows (prefill chunks, the image and
// audio towers' convolutions): an outer-product GEMM. The weight rows of a band are packed,
// one K block at a time, into panels of 16 output columns laid out k-major (panel[k*16 + j],
// fp16 widened once here), and a micro-kernel keeps a 6 x 16 block of outputs in registers:
// per k, two weight vectors and six broadcast activations feed twelve FMAs, where the one-row
// tiles above spend a load per FMA and a horizontal sum per output. Each output's sum runs
// over k in order within a K block, blocks added in order, so it does not depend on the band
// split or the thread count. Off in batch-invariant mode (the tiles' sums are the GEMV's) and
// below kFGemmMinN rows; set_float_gemm(0) switches it off for comparisons.

constexpr int64_t kFGemmMinN = 16;
constexpr int kFGemmNR = 6;        // activation rows per micro-tile
constexpr int64_t kFGemmKC = 256;  // K block: a panel is 16 KB
constexpr int kFGemmCols = 16;     // output columns per panel (two 8-lane vectors)

inline std::atomic<int>& float_gemm_mode() {
    static std::atomic<int> mode{1};
    return mode;
}

inline bool float_gemm_applies(int scheme, int64_t n) {
    return (scheme == kFP32 || scheme == kFP16) && n >= kFGemmMinN && !deterministic() &&
           float_gemm_mode().load(std::memory_order_relaxed) != 0;
}

// panel[k*16 + j] = W[c0 + j][k0 + k] for k < kc, j < nc; zeros for j >= nc.
template <class S>
void fgemm_pack(const WView& v, int64_t c0, int nc, int64_t k0, int64_t kc, float* panel) {
    const S s(v);
    const int64_t full = v.cols / 32;  // whole 32-weight blocks of a row
    alignas(32) float tmp[32];
    for (int j = 0; j < kFGemmCols; ++j) {
        if (j >= nc) {
            for (int64_t k = 0; k < kc; ++k) panel[k * kFGemmCols + j] = 0.f;
            continue;
        }
        const auto R = s.row(c0 + j);
        int64_t k = 0;
        for (; k + 32 <= kc && (k0 + k) / 32 < full; k += 32) {  // k0 is a multiple of 32
            VF w[4];
            S::load(R, (k0 + k) / 32, w);
            for (int q = 0; q < 4; ++q) vstoreu(tmp + 8 * q, w[q]);
            for (int t = 0; t < 32; ++t) panel[(k + t) * kFGemmCols + j] = tmp[t];
        }
        for (; k < kc; ++k) panel[k * kFGemmCols + j] = S::at(R, k0 + k);
    }
}

// out[r*ldo + j] (+)= sum_k x[r*ldx + k] * panel[k*16 + j], r < NR, j < nc.
template <int NR>
EDGELM_INLINE void fgemm_micro(const float* x, int64_t ldx, const float* panel, int64_t kc, float* out, int64_t ldo,
                               int nc, bool add) {
    VF c0[NR], c1[NR];
    for (int r = 0; r < NR; ++r) c0[r] = c1[r] = vzero();
    for (int64_t k = 0; k < kc; ++k) {
        const VF w0 = vloadu(panel + k * kFGemmCols), w1 = vloadu(panel + k * kFGemmCols + 8);
        for (int r = 0; r < NR; ++r) {
            const VF a = vset1(x[r * ldx + k]);
            c0[r] = vfma(a, w0, c0[r]);
            c1[r] = vfma(a, w1, c1[r]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        float* o = out + r * ldo;
        if (nc == kFGemmCols) {
            if (add) {
                c0[r] = vadd(vloadu(o), c0[r]);
                c1[r] = vadd(vloadu(o + 8), c1[r]);
            }
            vstoreu(o, c0[r]);
            vstoreu(o + 8, c1[r]);
        } else {
            float t[kFGemmCols];
            vstoreu(t, c0[r]);
            vstoreu(t + 8, c1[r]);
            for (int j = 0; j < nc; ++j) o[j] = add ? o[j] + t[j] : t[j];
        }
    }
}

using FMicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool);

inline FMicroFn fgemm_micro_for(int nr) {
    static const FMicroFn table[kFGemmNR + 1] = {nullptr, &fgemm_micro<1>, &fgemm_micro<2>, &fgemm_micro<3>,
                                                 &fgemm_micro<4>, &fgemm_micro<5>, &fgemm_micro<6>};
    return table[nr];
}

// out[i*ldo + r] = dot(x[i], W[r]) for r in [r0, r1), all n rows of x (ldx = cols).
template <class S>
void fgemm_band_impl(const WView& v, const float* x, int64_t n, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t cols = v.cols;
    const int64_t np = ceil_div(r1 - r0, kFGemmCols);
    const int64_t kc_max = std::min<int64_t>(kFGemmKC, cols);
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(np * kc_max * kFGemmCols)]);
    float* packed = buf.get();
    for (int64_t k0 = 0; k0 < cols; k0 += kFGemmKC) {
        const int64_t kc = std::min<int64_t>(kFGemmKC, cols - k0);
        for (int64_t p = 0; p < np; ++p) {
            const int64_t c0 = r0 + p * kFGemmCols;
            const int nc = static_cast<int>(std::min<int64_t>(kFGemmCols, r1 - c0));
            fgemm_pack<S>(v, c0, nc, k0, kc, packed + p * kc * kFGemmCols);
        }
        const bool add = k0 > 0;
        for (int64_t i0 = 0; i0 < n; i0 += kFGemmNR) {
            const int nr = static_cast<int>(std::min<int64_t>(kFGemmNR, n - i0));
            const FMicroFn micro = fgemm_micro_for(nr);
            for (int64_t p = 0; p < np; ++p) {
                const int64_t c0 = r0 + p * kFGemmCols;
                const int nc = static_cast<int>(std::min<int64_t>(kFGemmCols, r1 - c0));
                micro(x + i0 * cols + k0, cols, packed + p * kc * kFGemmCols, kc, out + i0 * ldo + c0, ldo, nc, add);
            }
        }
    }
}

inline void fgemm_band(const WView& v, const float* x, int64_t n, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    if (v.scheme == kFP16)
        fgemm_band_impl<SchFP16>(v, x, n, r0, r1, out, ldo);
    else
        fgemm_band_impl<SchFP32>(v, x, n, r0, r1, out, ldo);
}

inline void matmul(const WView& W, const float* x, int64_t n, float* out) {
    if (n <= 0) return;
    const SchemeKernels& K = scheme_kernels(W.scheme);
    ThreadPool& pool = ThreadPool::instance();
    const int64_t T = pool.threads();
    const int64_t rows = W.rows, cols = W.cols;
    // Tiny problems are not worth waking the workers.
    const bool parallel = static_cast<double>(n) * rows * cols >= 65536.0;
    if (n == 1) {
        GemvSplit split(rows, row_bytes(W.scheme, cols), static_cast<int>(T));
        auto band = [&](int64_t r0, int64_t r1) { K.tile[1](W, r0, r1, x, cols, out, rows); };
        auto task = [&](int64_t t) { split.run(static_cast<int>(t), band); };
        pool.run(split.parts(), task, parallel);
        return;
    }
    const int64_t chunk = band_rows(W, n, T);
    const int64_t ntasks = ceil_div(rows, chunk);
    if (float_gemm_applies(W.scheme, n)) {
        auto gtask = [&](int64_t t) {
            const int64_t r0 = t * chunk;
            fgemm_band(W, x, n, r0, std::min(rows, r0 + chunk), out, rows);
        };
        pool.run(ntasks, gtask, parallel);
        return;
    }
    // Batch-invariant mode: tiles of at most 2 rows, whose per-row sums (4 accumulators) are
    // the one-row GEMV's, operation for operation.
    const int64_t maxnx = deterministic() ? 2 : kMaxNX;
    auto task = [&](int64_t t) {
        const int64_t r0 = t * chunk, r1 = std::min(rows, r0 + chunk);
        for (int64_t i0 = 0; i0 < n; i0 += maxnx) {
            const int nx = static_cast<int>(std::min<int64_t>(maxnx, n - i0));
            K.tile[nx](W, r0, r1, x + i0 * cols, cols, out + i0 * rows, rows);
        }
    };
    pool.run(ntasks, task, parallel);
}

// out[i, :] = dequantized W[ids[i]]; ids are already range-checked.
template <class I>
void embed(const WView& W, const I* ids, int64_t n, float* out) {
    if (n <= 0) return;
    const SchemeKernels& K = scheme_kernels(W.scheme);
    const int64_t cols = W.cols;
    const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
    auto task = [&](int64_t t) {
        const int64_t i0 = t * chunk, i1 = std::min(n, i0 + chunk);
        for (int64_t i = i0; i < i1; ++i) K.embed(W, static_cast<int64_t>(ids[i]), out + i * cols);
    };
    const bool parallel = static_cast<double>(n) * cols >= 65536.0;
    ThreadPool::instance().run(ceil_div(n, chunk), task, parallel);
}

}  // namespace edgelm
