// Integer products with a few activation rows (batched decode: one row per sequence),
// straight on the kernel headers: the one-row tiles (set_packed_gemm(0)) against the few-row
// route of VNNI builds (the default), alternating, best of 5 loops each per round. Built and
// run by `python benchmarks/microbench.py few-row`.
//
//   fewrowbench SCHEME_ID THREADS ROWS COLS ROUNDS N...   (scheme ids: 2 int8, 3 int8-b32, 4 int4-b32, 5 int4-b128)
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
    if (argc < 7) {
        std::fprintf(stderr, "usage: fewrowbench SCHEME_ID THREADS ROWS COLS ROUNDS N...\n");
        return 2;
    }
    const int scheme = std::atoi(argv[1]), T = std::atoi(argv[2]), rounds = std::atoi(argv[5]);
    const int64_t rows = std::atoll(argv[3]), cols = std::atoll(argv[4]);
    if (scheme < kINT8 || scheme > kINT4B128 || T < 1 || T > 64 || rows < 1 || cols < 128 || cols % 128 ||
        rounds < 1) {
        std::fprintf(stderr, "fewrowbench: bad arguments (scheme 2-5, threads 1-64, cols a multiple of 128)\n");
        return 2;
    }
    ThreadPool::instance().set_threads(T);
    std::mt19937 rng(1);
    const RandomWeight rw(scheme, rows, cols, rng);
    const int reps = static_cast<int>(std::max<int64_t>(1, 40000000 / (rows * cols)));
    for (int a = 6; a < argc; ++a) {
        const int64_t n = std::atoll(argv[a]);
        if (n < 1 || n > 64) continue;
        const std::vector<float> x = random_activations(n, cols, rng);
        std::vector<float> out(static_cast<size_t>(n * rows));
        std::vector<double> best[2];
        for (int r = 0; r < rounds; ++r)
            for (int k = 0; k < 2; ++k) {
                const int mode = (r + k) % 2;  // alternate which route goes first
                packed_gemm_mode().store(mode);
                double b = 1e9;
                for (int t = 0; t < 5; ++t) {
                    const auto t0 = std::chrono::steady_clock::now();
                    for (int i = 0; i < reps; ++i) matmul_qd8(rw.W, x.data(), n, out.data());
                    b = std::min(b, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
                }
                best[mode].push_back(b);
            }
        packed_gemm_mode().store(1);
        std::vector<double> ratio;
        for (int r = 0; r < rounds; ++r) ratio.push_back(best[0][r] / best[1][r]);
        std::sort(ratio.begin(), ratio.end());
        std::sort(best[0].begin(), best[0].end());
        std::sort(best[1].begin(), best[1].end());
        const double macs = static_cast<double>(n) * rows * cols;
        std::printf("n %2ld  tiles %7.1f GMAC/s  route %7.1f GMAC/s  tiles / route time %.2f (%.2f-%.2f)\n",
                    static_cast<long>(n), macs / best[0][rounds / 2] / 1e9, macs / best[1][rounds / 2] / 1e9,
                    ratio[rounds / 2], ratio.front(), ratio.back());
    }
    return 0;
}
