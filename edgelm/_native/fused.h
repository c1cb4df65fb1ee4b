// Products that share one input, in one thread-pool job (decode calls these once per layer
// instead of three or four separate matmuls):
//   matmul_multi:    out_j[n, rows_j] = x[n, cols] @ W_j^T for several W_j (q, k, v);
//   matmul_gelu_mul: out[n, rows] = gelu_tanh(x @ Wg^T) * (x @ Wu^T) (gate, up, GeGLU).
// With qd8 the input is quantized once for all of them (the W_j must share a scheme).
// Each output element is still computed by exactly one micro-kernel call, so results are
// bitwise equal to separate matmul calls with the same qd8 choice.
#pragma once

#include <memory>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "qd8.h"

namespace edgelm {

struct RowTask {
    int w;        // which weight
    int64_t r0, r1;
};

// Runs tile(w, r0, r1) over the row bands of every weight (and then `after(w, r0, r1)`).
template <class Tile>
inline void run_row_tasks(const WView* Ws, int nw, int64_t n, int64_t band_of_w0_only, Tile& tile) {
    ThreadPool& pool = ThreadPool::instance();
    const int64_t T = pool.threads();
    std::vector<RowTask> tasks;
    double work = 0;
    const int wmax = band_of_w0_only ? 1 : nw;
    if (n == 1) {  // decode: per weight, T parts with tail stealing (GemvSplit)
        std::vector<std::unique_ptr<GemvSplit>> splits;
        for (int j = 0; j < wmax; ++j) {
            int64_t rb = 0;
            for (int k = band_of_w0_only ? 0 : j; k < (band_of_w0_only ? nw : j + 1); ++k)
                rb += row_bytes(Ws[k].scheme, Ws[k].cols);  // gate + up rows go together
            splits.emplace_back(new GemvSplit(Ws[j].rows, rb, static_cast<int>(T)));
        }
        for (int j = 0; j < nw; ++j) work += static_cast<double>(Ws[j].rows) * Ws[j].cols;
        auto task = [&](int64_t t) {
            const int j = static_cast<int>(t / T);
            auto band = [&](int64_t r0, int64_t r1) { tile(j, r0, r1); };
            splits[j]->run(static_cast<int>(t % T), band);
        };
        pool.run(wmax * T, task, work >= 65536.0);
        return;
    }
    for (int j = 0; j < wmax; ++j) {
        const int64_t chunk = band_rows(Ws[j], n, T);
        for (int64_t r0 = 0; r0 < Ws[j].rows; r0 += chunk) tasks.push_back({j, r0, std::min(Ws[j].rows, r0 + chunk)});
        work += static_cast<double>(n) * Ws[j].rows * Ws[j].cols;
    }
    auto task = [&](int64_t t) { tile(tasks[t].w, tasks[t].r0, tasks[t].r1); };
    pool.run(static_cast<int64_t>(tasks.size()), task, work >= 65536.0);
}

// One band of rows [r0, r1) of W into out (leading dimension ldo), all n activation rows.
inline void band(const WView& W, bool q, const QAct& A, const float* x, int64_t n, int64_t r0, int64_t r1,
                 float* out, int64_t ldo) {
    if (q) {
        q_band(W, A, n, r0, r1, out, ldo);
    } else if (float_gemm_applies(W.scheme, n)) {  // as matmul()
        fgemm_band(W, x, n, r0, r1, out, ldo);
    } else {
        const SchemeKernels& K = scheme_kernels(W.scheme);
        const int64_t maxnx = deterministic() ? 2 : kMaxNX;  // as matmul()
        for (int64_t i0 = 0; i0 < n; i0 += maxnx) {
            const int nx = static_cast<int>(std::min<int64_t>(maxnx, n - i0));
            K.tile[nx](W, r0, r1, x + i0 * W.cols, W.cols, out + i0 * ldo, ldo);
        }
    }
}

// `q`: use qd8 (all Ws must then share one integer scheme).
inline void matmul_multi(const WView* Ws, int nw, const float* x, int64_t n, float* const* outs, bool q) {
    if (n <= 0 || nw <= 0) return;
    QAct A;
    if (q) quantize_input(A, Ws[0].scheme, x, n, Ws[0].cols);
    auto tile = [&](int j, int64_t r0, int64_t r1) { band(Ws[j], q, A, x, n, r0, r1, outs[j], Ws[j].rows); };
    run_row_tasks(Ws, nw, n, 0, tile);
}

// out = gelu(x @ Wg^T) * (x @ Wu^T); tmp [n, rows] holds the up product. Wg, Wu same shape.
inline void matmul_gelu_mul(const WView& Wg, const WView& Wu, const float* x, int64_t n, float* out, float* tmp,
                            bool q) {
    if (n <= 0) return;
    QAct A;
    if (q) quantize_input(A, Wg.scheme, x, n, Wg.cols);
    const int64_t rows = Wg.rows;
    auto tile = [&](int, int64_t r0, int64_t r1) {
        band(Wg, q, A, x, n, r0, r1, out, rows);
        band(Wu, q, A, x, n, r0, r1, tmp, rows);
        for (int64_t i = 0; i < n; ++i) gelu_mul_serial(out + i * rows, tmp + i * rows, r0, r1, out + i * rows);
    };
    const WView both[2] = {Wg, Wu};
    run_row_tasks(both, 2, n, 1, tile);
}

}  // namespace edgelm
