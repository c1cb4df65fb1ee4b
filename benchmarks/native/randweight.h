// A random integer-scheme weight (int8, int8-b32, int4-b32, int4-b128) for the native
// benchmarks: random bytes, fp16 block scales of ~0.008-0.016 (or per-row float scales for
// per-channel int8), and a WView over them. Not copyable: the view points into the vectors.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "kernels.h"

struct RandomWeight {
    std::vector<uint8_t> w;
    std::vector<uint16_t> s16;
    std::vector<float> s32;
    edgelm::WView W;

    RandomWeight(int scheme, int64_t rows, int64_t cols, std::mt19937& rng) {
        using namespace edgelm;
        const int64_t blk = scheme == kINT4B128 ? 128 : 32;
        const bool i8 = scheme == kINT8 || scheme == kINT8B32;
        w.resize(static_cast<size_t>(i8 ? rows * cols : rows * cols / 2));
        for (auto& b : w) b = static_cast<uint8_t>(rng());
        s16.resize(static_cast<size_t>(rows * (cols / blk)));
        for (auto& x : s16) x = static_cast<uint16_t>(0x2000 + (rng() & 0x3ff));
        s32.assign(static_cast<size_t>(rows), 0.01f);
        W.scheme = scheme;
        W.rows = rows;
        W.cols = cols;
        W.w = w.data();
        W.scale = scheme == kINT8 ? static_cast<const void*>(s32.data()) : static_cast<const void*>(s16.data());
    }
    RandomWeight(const RandomWeight&) = delete;
    RandomWeight& operator=(const RandomWeight&) = delete;
};

// n rows of `cols` activations, uniform in [-1, 1).
inline std::vector<float> random_activations(int64_t n, int64_t cols, std::mt19937& rng) {
    std::vector<float> x(static_cast<size_t>(n * cols));
    for (auto& v : x) v = static_cast<float>(rng() % 2000) / 1000.f - 1.f;
    return x;
}
