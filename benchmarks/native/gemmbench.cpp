// Prefill-sized qd8 products (the packed GEMM) straight on the kernel headers (no Python):
// one 128-token chunk (n = 128 activation rows) through the 270M's four products, random
// weights of the given scheme, best of 9 timed loops each. Built and run by
// `python benchmarks/microbench.py gemm-native` (which can also build the same program
// against an older revision's headers and alternate the two).
//
//   gemmbench SCHEME_ID THREADS      (scheme ids: 2 int8, 3 int8-b32, 4 int4-b32, 5 int4-b128)
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
    if (argc != 3) {
        std::fprintf(stderr, "usage: gemmbench SCHEME_ID THREADS\n");
        return 2;
    }
    const int scheme = std::atoi(argv[1]);
    const int T = std::atoi(argv[2]);
    if (scheme < kINT8 || scheme > kINT4B128 || T < 1 || T > 64) {
        std::fprintf(stderr, "gemmbench: bad arguments (scheme 2-5, threads 1-64)\n");
        return 2;
    }
    ThreadPool::instance().set_threads(T);
    std::mt19937 rng(1);
    const int64_t n = 128;
    struct Shape { const char* name; int64_t rows, cols; };
    for (const Shape& sh : {Shape{"qkv", 1536, 640}, Shape{"o", 640, 1024}, Shape{"gate_up", 4096, 640},
                            Shape{"down", 640, 2048}}) {
        const int64_t rows = sh.rows, cols = sh.cols;
        const RandomWeight rw(scheme, rows, cols, rng);
        const WView& W = rw.W;
        const std::vector<float> x = random_activations(n, cols, rng);
        std::vector<float> out(static_cast<size_t>(n * rows));
        double best = 1e9;
        for (int k = 0; k < 9; ++k) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int r = 0; r < 5; ++r) matmul_qd8(W, x.data(), n, out.data());
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 5);
        }
        std::printf("%-8s %5ldx%5ldx%5ld  %8.1f us  %6.1f GMAC/s\n", sh.name, static_cast<long>(n),
                    static_cast<long>(rows), static_cast<long>(cols), best * 1e6,
                    static_cast<double>(n) * rows * cols / best / 1e9);
    }
    return 0;
}
