// A stand-alone driver of the native kernels (no Python), for builds this host can't import:
// tests/test_neon.py cross-compiles it for aarch64 (the NEON path of simd.h) and runs it
// under qemu-user. It reads a batch of cases and writes one output array per case.
//
//   harness IN OUT [threads]
//   IN:  repeated { int64 op; int64 hdr[8]; int64 narrays; narrays x { int64 nbytes; bytes } }
//   OUT: repeated { int64 nbytes; bytes }   (one float32 result per case)
//
// The file comes from the test itself, so sizes are checked only as far as keeping a bad
// batch from crashing (every array must have the byte count its op needs).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../edgelm/_native/kernels.h"
#include "../../edgelm/_native/ops.h"
#include "../../edgelm/_native/qd8.h"

namespace {

using Bytes = std::vector<unsigned char>;

struct Reader {
    FILE* f;
    bool i64(int64_t& v) { return std::fread(&v, 8, 1, f) == 1; }
    Bytes arr() {
        int64_t n = 0;
        if (!i64(n) || n < 0 || n > (int64_t(1) << 32)) throw std::runtime_error("bad array size");
        Bytes b(static_cast<size_t>(n));
        if (n && std::fread(b.data(), 1, b.size(), f) != b.size()) throw std::runtime_error("short array");
        return b;
    }
};

void need(const Bytes& b, int64_t n, const char* what) {
    if (static_cast<int64_t>(b.size()) != n) throw std::runtime_error(std::string("wrong byte count for ") + what);
}

template <class T>
const T* as(const Bytes& b) {
    return reinterpret_cast<const T*>(b.data());
}

int64_t data_bytes(int scheme, int64_t rows, int64_t cols) {
    switch (scheme) {
        case edgelm::kFP32: return 4 * rows * cols;
        case edgelm::kFP16: return 2 * rows * cols;
        case edgelm::kINT8:
        case edgelm::kINT8B32: return rows * cols;
        default: return rows * cols / 2;
    }
}

int64_t scale_bytes(int scheme, int64_t rows, int64_t cols) {
    switch (scheme) {
        case edgelm::kINT8: return 4 * rows;
        case edgelm::kINT8B32: return 2 * rows * (cols / 32);
        case edgelm::kINT4B32: return 2 * rows * (cols / 32);
        case edgelm::kINT4B128: return 2 * rows * (cols / 128);
        default: return 0;
    }
}

std::vector<float> run_case(int64_t op, const int64_t* h, const std::vector<Bytes>& a) {
    std::vector<float> out;
    switch (op) {
        case 1:    // matmul, fp32 activations: scheme rows cols n | w scale x
        case 2:    // matmul, qd8 activations
        case 7: {  // embed: scheme rows cols n | w scale ids(int64)
            const int scheme = static_cast<int>(h[0]);
            const int64_t rows = h[1], cols = h[2], n = h[3];
            if (scheme < 0 || scheme >= edgelm::kNumSchemes || a.size() != 3) throw std::runtime_error("bad matmul case");
            need(a[0], data_bytes(scheme, rows, cols), "w");
            need(a[1], scale_bytes(scheme, rows, cols), "scale");
            edgelm::WView W;
            W.scheme = scheme;
            W.rows = rows;
            W.cols = cols;
            W.w = a[0].data();
            W.scale = a[1].empty() ? nullptr : a[1].data();
            if (op == 7) {
                need(a[2], 8 * n, "ids");
                for (int64_t i = 0; i < n; ++i)
                    if (as<int64_t>(a[2])[i] < 0 || as<int64_t>(a[2])[i] >= rows) throw std::runtime_error("bad id");
                out.resize(static_cast<size_t>(n * cols));
                edgelm::embed(W, as<int64_t>(a[2]), n, out.data());
                break;
            }
            need(a[2], 4 * n * cols, "x");
            out.resize(static_cast<size_t>(n * rows));
            if (op == 1)
                edgelm::matmul(W, as<float>(a[2]), n, out.data());
            else
                edgelm::matmul_qd8(W, as<float>(a[2]), n, out.data());
            break;
        }
        case 3: {  // attention: n H KV hd T window half | q k v qpos kpos [scale, cap]
            const int64_t n = h[0], H = h[1], KV = h[2], hd = h[3], T = h[4], window = h[5], half = h[6];
            if (a.size() != 6) throw std::runtime_error("bad attention case");
            const int64_t es = half ? 2 : 4;
            need(a[0], 4 * n * H * hd, "q");
            need(a[1], es * T * KV * hd, "k");
            need(a[2], es * T * KV * hd, "v");
            need(a[3], 8 * n, "qpos");
            need(a[4], 8 * T, "kpos");
            need(a[5], 8, "scale, cap");
            edgelm::AttnParams P;
            P.q = as<float>(a[0]);
            if (half) {
                P.k = P.v = nullptr;
                P.k16 = as<uint16_t>(a[1]);
                P.v16 = as<uint16_t>(a[2]);
            } else {
                P.k = as<float>(a[1]);
                P.v = as<float>(a[2]);
            }
            P.qpos = as<int64_t>(a[3]);
            P.kpos = as<int64_t>(a[4]);
            P.n = n;
            P.H = H;
            P.KV = KV;
            P.hd = hd;
            P.T = T;
            P.window = window;
            P.scale = as<float>(a[5])[0];
            P.cap = as<float>(a[5])[1];
            out.resize(static_cast<size_t>(n * H * hd));
            P.out = out.data();
            edgelm::attention(P);
            break;
        }
        case 4:     // rmsnorm: rows d | x w [eps]
        case 12: {  // rmsnorm then gelu: the same
            const int64_t rows = h[0], d = h[1];
            need(a.at(0), 4 * rows * d, "x");
            need(a.at(1), 4 * d, "w");
            need(a.at(2), 4, "eps");
            out.resize(static_cast<size_t>(rows * d));
            edgelm::rmsnorm(as<float>(a[0]), as<float>(a[1]), rows, d, as<float>(a[2])[0], out.data(),
                            op == 12 ? edgelm::kActGelu : edgelm::kActNone);
            break;
        }
        case 5:     // gelu_mul: size | g u
        case 11: {  // sigmoid_mul: size | x g
            const int64_t size = h[0];
            need(a.at(0), 4 * size, "first input");
            need(a.at(1), 4 * size, "second input");
            out.resize(static_cast<size_t>(size));
            (op == 5 ? edgelm::gelu_mul : edgelm::sigmoid_mul)(as<float>(a[0]), as<float>(a[1]), size, out.data());
            break;
        }
        case 10: {  // full_attention: n H KV hd T | q k v [scale]
            const int64_t n = h[0], H = h[1], KV = h[2], hd = h[3], T = h[4];
            if (n < 1 || H < 1 || KV < 1 || hd < 1 || T < 1 || H % KV) throw std::runtime_error("bad full_attention case");
            need(a.at(0), 4 * n * H * hd, "q");
            need(a.at(1), 4 * T * KV * hd, "k");
            need(a.at(2), 4 * T * KV * hd, "v");
            need(a.at(3), 4, "scale");
            out.resize(static_cast<size_t>(n * H * hd));
            edgelm::full_attention(as<float>(a[0]), as<float>(a[1]), as<float>(a[2]), n, H, KV, hd, T,
                                   as<float>(a[3])[0], out.data());
            break;
        }
        case 6: {  // softcap: size | x [cap]
            const int64_t size = h[0];
            need(a.at(0), 4 * size, "x");
            need(a.at(1), 4, "cap");
            out.resize(static_cast<size_t>(size));
            edgelm::softcap(as<float>(a[0]), size, as<float>(a[1])[0], out.data());
            break;
        }
        case 8: {  // rope: n heads hd | x cos sin   (tables [n, hd/2])
            const int64_t n = h[0], heads = h[1], hd = h[2];
            need(a.at(0), 4 * n * heads * hd, "x");
            need(a.at(1), 4 * n * (hd / 2), "cos");
            need(a.at(2), 4 * n * (hd / 2), "sin");
            out.resize(static_cast<size_t>(n * heads * hd));
            edgelm::rope(as<float>(a[0]), as<float>(a[1]), as<float>(a[2]), n, heads, hd, out.data());
            break;
        }
        case 9: {  // depthwise_conv2d: H W C k stride top left oh | x [H,W,C] taps [k,k,C] ow (one int64)
            const int64_t H = h[0], W = h[1], C = h[2], k = h[3], s = h[4], top = h[5], left = h[6], oh = h[7];
            need(a.at(0), 4 * H * W * C, "x");
            need(a.at(1), 4 * k * k * C, "taps");
            need(a.at(2), 8, "ow");
            const int64_t ow = as<int64_t>(a[2])[0];
            if (oh < 1 || ow < 1 || ow > 4096 || oh > 4096) throw std::runtime_error("bad depthwise output size");
            out.resize(static_cast<size_t>(oh * ow * C));
            edgelm::depthwise_conv2d(as<float>(a[0]), H, W, C, as<float>(a[1]), k, s, top, left, out.data(), oh, ow);
            break;
        }
        default:
            throw std::runtime_error("unknown op " + std::to_string(op));
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: harness IN OUT [threads]\n");
        return 2;
    }
    edgelm::ThreadPool::instance().set_threads(argc > 3 ? std::atoi(argv[3]) : 2);
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) {
        std::fprintf(stderr, "harness: can't open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    Reader r{in};
    try {
        int64_t op = 0;
        while (r.i64(op)) {
            int64_t h[8], na = 0;
            for (auto& v : h)
                if (!r.i64(v)) throw std::runtime_error("short header");
            if (!r.i64(na) || na < 0 || na > 16) throw std::runtime_error("bad array count");
            std::vector<Bytes> a;
            for (int64_t i = 0; i < na; ++i) a.push_back(r.arr());
            const std::vector<float> y = run_case(op, h, a);
            const int64_t nb = static_cast<int64_t>(y.size() * 4);
            std::fwrite(&nb, 8, 1, out);
            std::fwrite(y.data(), 4, y.size(), out);
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "harness: %s\n", e.what());
        return 1;
    }
    std::fclose(out);
    return 0;
}
