// One-row (decode) qd8 GEMV throughput, straight on the kernel headers (no Python): an
// int8 / int8-b32 / int4-b32 / int4-b128 weight of ~192 KB (L2), ~3 MB (L3) and ~256 MB
// (DRAM) with `cols` columns, best of 7 timed loops. Built and run by
// `python benchmarks/microbench.py gemv-native` (which also sweeps the prefetch distance,
// -DEDGELM_GEMV_PREFETCH=N).
//
//   gemvbench SCHEME_ID THREADS COLS      (scheme ids: 2 int8, 3 int8-b32, 4 int4-b32, 5 int4-b128)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels.h"
#include "qd8.h"
#include "randweight.h"

using namespace edgelm;

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: gemvbench SCHEME_ID THREADS COLS\n");
        return 2;
    }
    const int scheme = std::atoi(argv[1]);
    const int T = std::atoi(argv[2]);
    const int64_t cols = std::atoll(argv[3]);
    const int64_t blk = scheme == kINT4B128 ? 128 : 32;
    if (scheme < kINT8 || scheme > kINT4B128 || T < 1 || T > 64 || cols < blk || cols > (1 << 20) || cols % blk) {
        std::fprintf(stderr, "gemvbench: bad arguments (scheme 2-5, threads 1-64, cols a multiple of the block)\n");
        return 2;
    }
    ThreadPool::instance().set_threads(T);
    std::mt19937 rng(1);
    for (const int64_t target : {int64_t(192) << 10, int64_t(3) << 20, int64_t(256) << 20}) {
        const int64_t rb = row_bytes(scheme, cols);
        const int64_t rows = std::max<int64_t>(16, target / rb);
        const RandomWeight rw(scheme, rows, cols, rng);
        const WView& W = rw.W;
        const std::vector<float> x = random_activations(1, cols, rng);
        std::vector<float> out(static_cast<size_t>(rows));
        const int reps = static_cast<int>(std::max<int64_t>(3, static_cast<int64_t>(4e9 / (rows * rb))));
        double best = 1e9;
        for (int k = 0; k < 7; ++k) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int r = 0; r < reps; ++r) matmul_qd8(W, x.data(), 1, out.data());
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        }
        const double mb = static_cast<double>(rows * rb) / 1e6;
        std::printf("%8.2f MB  %8.1f us  %6.1f GB/s  %6.1f GMAC/s\n", mb, best * 1e6, mb / 1e3 / best,
                    static_cast<double>(rows * cols) / best / 1e9);
    }
    return 0;
}
