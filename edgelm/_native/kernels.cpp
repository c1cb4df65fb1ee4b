// edgelm native kernels: the Python module.
//
// This one source is compiled several times with different instruction-set flags
// (setup.py), each time as a differently named module (EDGELM_MODNAME): _kern_scalar,
// _kern_avx2, _kern_avx512, _kern_neon. Python (edgelm/backends/native.py) checks the CPU
// with cpu_features() from _kern_scalar before it imports any of the others.
//
// Entry points: matmul (fp32-activation kernels.h or qd8.h), embed, the fused ops of ops.h
// (rmsnorm, rope, gelu_mul, softcap, attention), stream_read_gbs, threads and qd8 settings.
//
// Every argument is validated here, with the GIL held, before any kernel runs: a bad
// dtype is a TypeError, a bad shape / layout / id a ValueError. Compute runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "qd8.h"
#include "fused.h"
#include "block.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#ifndef EDGELM_MODNAME
#error "EDGELM_MODNAME must name the module (set by setup.py)"
#endif
#ifndef EDGELM_BUILD_ISA
#define EDGELM_BUILD_ISA "unknown"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

constexpr int kNpyAligned = 0x0100;  // NPY_ARRAY_ALIGNED

struct DT {
    char kind;
    int size;
    const char* name;
};
constexpr DT kF32{'f', 4, "float32"};
constexpr DT kF16{'f', 2, "float16"};
constexpr DT kI8{'i', 1, "int8"};
constexpr DT kU8{'u', 1, "uint8"};

std::string shape_str(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
    if (a.ndim() == 1) os << ",";
    os << ")";
    return os.str();
}

std::string shape_str(const std::vector<int64_t>& s) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
    if (s.size() == 1) os << ",";
    os << ")";
    return os.str();
}

bool dtype_is(const py::array& a, const DT& d) {
    const py::dtype dt = a.dtype();
    return dt.kind() == d.kind && dt.itemsize() == d.size && dt.byteorder() != '>';
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// The object must be a numpy array (no implicit conversion: a converted copy of `out` would
// silently swallow the result).
py::array as_array(const char* fn, const char* name, py::handle h) {
    if (!py::isinstance<py::array>(h)) {
        throw py::type_error(std::string(fn) + ": " + name + " must be a numpy array, got " +
                             py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>());
    }
    return py::reinterpret_borrow<py::array>(h);
}

void check_layout(const char* fn, const char* name, const py::array& a, bool writable) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(fn) + ": " + name + " must be C-contiguous");
    if (!(a.flags() & kNpyAligned)) throw py::value_error(std::string(fn) + ": " + name + " must be aligned");
    if (writable && !a.writeable()) throw py::value_error(std::string(fn) + ": " + name + " must be writable");
}

// Checks dtype, exact shape and layout; returns the array.
py::array check_array(const char* fn, const char* name, py::handle h, const DT& d, const std::vector<int64_t>& shape,
                      bool writable = false) {
    py::array a = as_array(fn, name, h);
    if (!dtype_is(a, d))
        throw py::type_error(std::string(fn) + ": " + name + " must be " + d.name + ", got " + dtype_str(a));
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    if (!ok)
        throw py::value_error(std::string(fn) + ": " + name + " must have shape " + shape_str(shape) + ", got " +
                              shape_str(a));
    check_layout(fn, name, a, writable);
    return a;
}

struct Range {
    uintptr_t lo, hi;
};
Range byte_range(const py::array& a) {
    auto p = reinterpret_cast<uintptr_t>(a.data());
    return {p, p + static_cast<uintptr_t>(a.nbytes())};
}
void check_no_overlap(const char* fn, const char* name, const py::array& out, const char* other_name,
                      const py::array& other) {
    if (out.nbytes() == 0 || other.nbytes() == 0) return;
    const Range a = byte_range(out), b = byte_range(other);
    if (a.lo < b.hi && b.lo < a.hi)
        throw py::value_error(std::string(fn) + ": " + name + " must not overlap " + other_name);
}

struct Weights {
    edgelm::WView view;
    py::array w;
    py::array scale;  // empty handle when the scheme has none
    bool has_scale = false;
};

// Validates scheme id, sizes and the weight parts against the layout table in kernels.h.
Weights check_weights(const char* fn, int scheme, py::handle w, py::handle scale, int64_t rows, int64_t cols) {
    if (scheme < 0 || scheme >= edgelm::kNumSchemes)
        throw py::value_error(std::string(fn) + ": unknown scheme id " + std::to_string(scheme));
    const char* sname = edgelm::scheme_kernels(scheme).name;
    if (rows < 1 || cols < 1)
        throw py::value_error(std::string(fn) + ": rows and cols must be >= 1, got rows=" + std::to_string(rows) +
                              ", cols=" + std::to_string(cols));
    if (rows > (std::numeric_limits<int64_t>::max() / 8) / cols)
        throw py::value_error(std::string(fn) + ": rows*cols is too large");
    int block = 0;
    if (scheme == edgelm::kINT8B32 || scheme == edgelm::kINT4B32) block = 32;
    if (scheme == edgelm::kINT4B128) block = 128;
    if (block && cols % block)
        throw py::value_error(std::string(fn) + ": scheme " + sname + " needs cols to be a multiple of " +
                              std::to_string(block) + ", got " + std::to_string(cols));

    Weights r;
    const bool wants_scale = scheme >= edgelm::kINT8;
    const char* wname = wants_scale ? "q" : "w";
    switch (scheme) {
        case edgelm::kFP32: r.w = check_array(fn, wname, w, kF32, {rows, cols}); break;
        case edgelm::kFP16: r.w = check_array(fn, wname, w, kF16, {rows, cols}); break;
        case edgelm::kINT8:
            r.w = check_array(fn, wname, w, kI8, {rows, cols});
            r.scale = check_array(fn, "scale", scale, kF32, {rows});
            break;
        case edgelm::kINT8B32:
            r.w = check_array(fn, wname, w, kI8, {rows, cols});
            r.scale = check_array(fn, "scale", scale, kF16, {rows, cols / 32});
            break;
        case edgelm::kINT4B32:
        case edgelm::kINT4B128:
            r.w = check_array(fn, wname, w, kU8, {rows, cols / 2});
            r.scale = check_array(fn, "scale", scale, kF16, {rows, cols / block});
            break;
    }
    if (!wants_scale && !scale.is_none())
        throw py::value_error(std::string(fn) + ": scheme " + sname + " takes no scale (pass None)");
    r.has_scale = wants_scale;
    r.view.scheme = scheme;
    r.view.rows = rows;
    r.view.cols = cols;
    r.view.w = r.w.data();
    r.view.scale = wants_scale ? r.scale.data() : nullptr;
    return r;
}

// qd8 mode: -1 auto, 0 off (exact fp32-activation kernels everywhere), 1 on (every integer
// scheme). Auto (measured, docs/kernels.md): every integer scheme and every n where the build
// has fast integer kernels (AVX2: fewer instructions per weight than dequantizing to fp32,
// for GEMV and GEMM alike); the portable build keeps fp32 activations.
std::atomic<int> g_qd8{-1};

bool use_qd8(int scheme, int mode, int64_t n) {
    if (!edgelm::qd8_scheme(scheme)) return false;
    if (mode < 0) mode = g_qd8.load(std::memory_order_relaxed);
    if (mode < 0) return edgelm::kQd8Fast && n >= 1;
    return mode > 0;
}

// x: float32 [n, cols], C-contiguous and aligned.
py::array check_input(const char* fn, py::handle x_h, int64_t cols) {
    py::array x = as_array(fn, "x", x_h);
    if (!dtype_is(x, kF32)) throw py::type_error(std::string(fn) + ": x must be float32, got " + dtype_str(x));
    if (x.ndim() != 2 || x.shape(1) != cols)
        throw py::value_error(std::string(fn) + ": x must have shape (n, " + std::to_string(cols) + "), got " +
                              shape_str(x));
    check_layout(fn, "x", x, false);
    return x;
}

void py_matmul(py::handle x_h, int scheme, py::handle w_h, py::handle scale_h, int64_t rows, int64_t cols,
               py::handle out_h, int qd8) {
    const char* fn = "matmul";
    Weights W = check_weights(fn, scheme, w_h, scale_h, rows, cols);
    py::array x = check_input(fn, x_h, cols);
    const int64_t n = x.shape(0);
    py::array out = check_array(fn, "out", out_h, kF32, {n, rows}, true);
    check_no_overlap(fn, "out", out, "x", x);
    check_no_overlap(fn, "out", out, "the weights", W.w);
    if (W.has_scale) check_no_overlap(fn, "out", out, "the scales", W.scale);

    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    if (qd8 < -1 || qd8 > 1) throw py::value_error(std::string(fn) + ": qd8 must be -1, 0 or 1");
    const bool q = use_qd8(scheme, qd8, n);
    py::gil_scoped_release nogil;
    if (q)
        edgelm::matmul_qd8(W.view, xp, n, op);
    else
        edgelm::matmul(W.view, xp, n, op);
}

// A weight given as the tuple (scheme_id, w, scale, rows, cols), as matmul takes them.
Weights weight_from_tuple(const char* fn, py::handle h) {
    py::tuple t = py::reinterpret_borrow<py::object>(h).cast<py::tuple>();
    if (t.size() != 5) throw py::value_error(std::string(fn) + ": each weight is (scheme_id, w, scale, rows, cols)");
    return check_weights(fn, t[0].cast<int>(), t[1], t[2], t[3].cast<int64_t>(), t[4].cast<int64_t>());
}

void check_out(const char* fn, const char* name, const py::array& out, const py::array& x,
               const std::vector<Weights>& ws) {
    check_no_overlap(fn, name, out, "x", x);
    for (const Weights& W : ws) {
        check_no_overlap(fn, name, out, "the weights", W.w);
        if (W.has_scale) check_no_overlap(fn, name, out, "the scales", W.scale);
    }
}

// outs[j] = x @ W_j^T for weights sharing x (q, k, v): one job, x quantized once.
void py_matmul_multi(py::handle x_h, py::sequence weights, py::sequence outs_h, int qd8) {
    const char* fn = "matmul_multi";
    const size_t nw = py::len(weights);
    if (nw < 1 || nw > 8) throw py::value_error(std::string(fn) + ": give 1 to 8 weights");
    if (py::len(outs_h) != nw) throw py::value_error(std::string(fn) + ": one out array per weight");
    if (qd8 < -1 || qd8 > 1) throw py::value_error(std::string(fn) + ": qd8 must be -1, 0 or 1");
    std::vector<Weights> ws;
    for (size_t j = 0; j < nw; ++j) ws.push_back(weight_from_tuple(fn, weights[j]));
    const int64_t cols = ws[0].view.cols;
    for (const Weights& W : ws)
        if (W.view.cols != cols) throw py::value_error(std::string(fn) + ": every weight must have the same cols");
    py::array x = check_input(fn, x_h, cols);
    const int64_t n = x.shape(0);
    std::vector<py::array> outs;
    std::vector<float*> optr;
    for (size_t j = 0; j < nw; ++j) {
        outs.push_back(check_array(fn, "out", outs_h[j], kF32, {n, ws[j].view.rows}, true));
        check_out(fn, "out", outs.back(), x, ws);
        for (size_t k = 0; k < j; ++k) check_no_overlap(fn, "out", outs[j], "another out", outs[k]);
        optr.push_back(static_cast<float*>(outs.back().mutable_data()));
    }
    std::vector<edgelm::WView> views;
    bool same = true;
    for (const Weights& W : ws) {
        views.push_back(W.view);
        same = same && W.view.scheme == ws[0].view.scheme;
    }
    const float* xp = static_cast<const float*>(x.data());
    const bool q = use_qd8(ws[0].view.scheme, qd8, n);
    py::gil_scoped_release nogil;
    if (same) {
        edgelm::matmul_multi(views.data(), static_cast<int>(nw), xp, n, optr.data(), q);
    } else {  // mixed schemes: one product at a time, each with its own qd8 choice
        for (size_t j = 0; j < nw; ++j) {
            const bool qj = use_qd8(views[j].scheme, qd8, n);
            if (qj)
                edgelm::matmul_qd8(views[j], xp, n, optr[j]);
            else
                edgelm::matmul(views[j], xp, n, optr[j]);
        }
    }
}

// out = gelu_tanh(x @ Wg^T) * (x @ Wu^T); tmp [n, rows] is scratch.
void py_matmul_gelu_mul(py::handle x_h, py::handle wg_h, py::handle wu_h, py::handle out_h, py::handle tmp_h,
                        int qd8) {
    const char* fn = "matmul_gelu_mul";
    if (qd8 < -1 || qd8 > 1) throw py::value_error(std::string(fn) + ": qd8 must be -1, 0 or 1");
    std::vector<Weights> ws;
    ws.push_back(weight_from_tuple(fn, wg_h));
    ws.push_back(weight_from_tuple(fn, wu_h));
    const edgelm::WView& G = ws[0].view;
    const edgelm::WView& U = ws[1].view;
    if (G.rows != U.rows || G.cols != U.cols)
        throw py::value_error(std::string(fn) + ": gate and up must have the same shape");
    py::array x = check_input(fn, x_h, G.cols);
    const int64_t n = x.shape(0);
    py::array out = check_array(fn, "out", out_h, kF32, {n, G.rows}, true);
    py::array tmp = check_array(fn, "tmp", tmp_h, kF32, {n, G.rows}, true);
    check_out(fn, "out", out, x, ws);
    check_out(fn, "tmp", tmp, x, ws);
    check_no_overlap(fn, "tmp", tmp, "out", out);
    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    float* tp = static_cast<float*>(tmp.mutable_data());
    const bool qg = use_qd8(G.scheme, qd8, n), qu = use_qd8(U.scheme, qd8, n);
    edgelm::WView gv = G, uv = U;
    py::gil_scoped_release nogil;
    if (G.scheme == U.scheme) {
        edgelm::matmul_gelu_mul(gv, uv, xp, n, op, tp, qg);
    } else {
        if (qg) edgelm::matmul_qd8(gv, xp, n, op); else edgelm::matmul(gv, xp, n, op);
        if (qu) edgelm::matmul_qd8(uv, xp, n, tp); else edgelm::matmul(uv, xp, n, tp);
        edgelm::gelu_mul(op, tp, n * gv.rows, op);
    }
}

// ----------------------------------------------------------------------------- fused ops

std::vector<int64_t> shape_of(const py::array& a) {
    std::vector<int64_t> s;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s.push_back(a.shape(i));
    return s;
}

// A float32 C-contiguous aligned array of any shape.
py::array check_f32(const char* fn, const char* name, py::handle h, bool writable = false) {
    py::array a = as_array(fn, name, h);
    if (!dtype_is(a, kF32)) throw py::type_error(std::string(fn) + ": " + name + " must be float32, got " + dtype_str(a));
    check_layout(fn, name, a, writable);
    return a;
}

// out may be exactly `in` (in place) but must not partially overlap it.
void check_same_or_disjoint(const char* fn, const py::array& out, const char* other_name, const py::array& other) {
    if (out.nbytes() == 0 || other.nbytes() == 0) return;
    if (out.data() == other.data() && out.nbytes() == other.nbytes()) return;
    check_no_overlap(fn, "out", out, other_name, other);
}

void py_rmsnorm(py::handle x_h, py::handle w_h, double eps, py::handle out_h, int act) {
    const char* fn = "rmsnorm";
    py::array x = check_f32(fn, "x", x_h);
    if (x.ndim() < 1) throw py::value_error("rmsnorm: x must have at least one dimension");
    const int64_t d = x.shape(x.ndim() - 1);
    py::array w = check_array(fn, "w", w_h, kF32, {d});
    py::array out = check_array(fn, "out", out_h, kF32, shape_of(x), true);
    check_same_or_disjoint(fn, out, "x", x);
    check_no_overlap(fn, "out", out, "w", w);
    if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error("rmsnorm: eps must be finite and >= 0");
    if (act != edgelm::kActNone && act != edgelm::kActGelu)
        throw py::value_error("rmsnorm: act must be 0 (none) or 1 (gelu), got " + std::to_string(act));
    const int64_t rows = d ? x.size() / d : 0;
    const float* xp = static_cast<const float*>(x.data());
    const float* wp = static_cast<const float*>(w.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    if (d > 0) edgelm::rmsnorm(xp, wp, rows, d, static_cast<float>(eps), op, act);
}

void py_rope(py::handle x_h, py::handle cos_h, py::handle sin_h, py::handle out_h) {
    const char* fn = "rope";
    py::array x = check_f32(fn, "x", x_h);
    if (x.ndim() != 3) throw py::value_error("rope: x must have shape (n, heads, head_dim), got " + shape_str(x));
    const int64_t n = x.shape(0), h = x.shape(1), hd = x.shape(2);
    if (hd % 2) throw py::value_error("rope: head_dim must be even, got " + std::to_string(hd));
    py::array c = check_array(fn, "cos", cos_h, kF32, {n, hd / 2});
    py::array s = check_array(fn, "sin", sin_h, kF32, {n, hd / 2});
    py::array out = check_array(fn, "out", out_h, kF32, {n, h, hd}, true);
    check_same_or_disjoint(fn, out, "x", x);
    check_no_overlap(fn, "out", out, "cos", c);
    check_no_overlap(fn, "out", out, "sin", s);
    const float* xp = static_cast<const float*>(x.data());
    const float* cp = static_cast<const float*>(c.data());
    const float* sp = static_cast<const float*>(s.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    edgelm::rope(xp, cp, sp, n, h, hd, op);
}

// x += rmsnorm(h) * w_post (in place); with w_next, next = rmsnorm(x) * w_next.
void py_add_rmsnorm(py::handle x_h, py::handle h_h, py::handle wp_h, double eps, py::handle wn_h,
                    py::handle next_h) {
    const char* fn = "add_rmsnorm";
    py::array x = check_f32(fn, "x", x_h, true);
    if (x.ndim() != 2) throw py::value_error("add_rmsnorm: x must have shape (n, d), got " + shape_str(x));
    const int64_t n = x.shape(0), d = x.shape(1);
    py::array h = check_array(fn, "h", h_h, kF32, {n, d});
    py::array wp = check_array(fn, "w_post", wp_h, kF32, {d});
    check_no_overlap(fn, "x", x, "h", h);
    check_no_overlap(fn, "x", x, "w_post", wp);
    if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error("add_rmsnorm: eps must be finite and >= 0");
    const bool has_next = !wn_h.is_none();
    if (has_next == next_h.is_none())
        throw py::value_error("add_rmsnorm: give both w_next and next, or neither");
    py::array wn, nx;
    if (has_next) {
        wn = check_array(fn, "w_next", wn_h, kF32, {d});
        nx = check_array(fn, "next", next_h, kF32, {n, d}, true);
        check_no_overlap(fn, "next", nx, "x", x);
        check_no_overlap(fn, "next", nx, "h", h);
        check_no_overlap(fn, "next", nx, "w_next", wn);
        check_no_overlap(fn, "x", x, "w_next", wn);
    }
    float* xp = static_cast<float*>(x.mutable_data());
    const float* hp = static_cast<const float*>(h.data());
    const float* wpp = static_cast<const float*>(wp.data());
    const float* wnp = has_next ? static_cast<const float*>(wn.data()) : nullptr;
    float* np_ = has_next ? static_cast<float*>(nx.mutable_data()) : nullptr;
    py::gil_scoped_release nogil;
    if (d > 0) edgelm::add_rmsnorm(xp, hp, wpp, wnp, n, d, static_cast<float>(eps), np_);
}

// Per-head rmsnorm then rotate-half RoPE: x [n, heads, hd], w [hd], cos/sin [n, hd/2].
void py_rmsnorm_rope(py::handle x_h, py::handle w_h, py::handle cos_h, py::handle sin_h, double eps,
                     py::handle out_h) {
    const char* fn = "rmsnorm_rope";
    py::array x = check_f32(fn, "x", x_h);
    if (x.ndim() != 3) throw py::value_error("rmsnorm_rope: x must have shape (n, heads, head_dim), got " + shape_str(x));
    const int64_t n = x.shape(0), h = x.shape(1), hd = x.shape(2);
    if (hd % 2) throw py::value_error("rmsnorm_rope: head_dim must be even, got " + std::to_string(hd));
    py::array w = check_array(fn, "w", w_h, kF32, {hd});
    py::array c = check_array(fn, "cos", cos_h, kF32, {n, hd / 2});
    py::array s = check_array(fn, "sin", sin_h, kF32, {n, hd / 2});
    py::array out = check_array(fn, "out", out_h, kF32, {n, h, hd}, true);
    if (!(eps >= 0.0) || !std::isfinite(eps)) throw py::value_error("rmsnorm_rope: eps must be finite and >= 0");
    check_same_or_disjoint(fn, out, "x", x);
    check_no_overlap(fn, "out", out, "w", w);
    check_no_overlap(fn, "out", out, "cos", c);
    check_no_overlap(fn, "out", out, "sin", s);
    const float* xp = static_cast<const float*>(x.data());
    const float* wp = static_cast<const float*>(w.data());
    const float* cp = static_cast<const float*>(c.data());
    const float* sp = static_cast<const float*>(s.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    edgelm::rmsnorm_rope(xp, wp, cp, sp, n, h, hd, static_cast<float>(eps), op);
}

// out = kernel(a, b) elementwise over two float32 arrays of one shape (a, b and out may alias).
template <void (*Kernel)(const float*, const float*, int64_t, float*)>
void elementwise2(const char* fn, const char* a_name, const char* b_name, py::handle a_h, py::handle b_h,
                  py::handle out_h) {
    py::array a = check_f32(fn, a_name, a_h);
    py::array b = check_array(fn, b_name, b_h, kF32, shape_of(a));
    py::array out = check_array(fn, "out", out_h, kF32, shape_of(a), true);
    check_same_or_disjoint(fn, out, a_name, a);
    check_same_or_disjoint(fn, out, b_name, b);
    const float* ap = static_cast<const float*>(a.data());
    const float* bp = static_cast<const float*>(b.data());
    float* op = static_cast<float*>(out.mutable_data());
    const int64_t size = a.size();
    py::gil_scoped_release nogil;
    Kernel(ap, bp, size, op);
}

void py_gelu_mul(py::handle g_h, py::handle u_h, py::handle out_h) {
    elementwise2<edgelm::gelu_mul>("gelu_mul", "g", "u", g_h, u_h, out_h);
}

void py_sigmoid_mul(py::handle x_h, py::handle g_h, py::handle out_h) {
    elementwise2<edgelm::sigmoid_mul>("sigmoid_mul", "x", "g", x_h, g_h, out_h);
}

// Attention where every query sees every key: q [n, H, hd], k, v [T, KV, hd] float32.
void py_full_attention(py::handle q_h, py::handle k_h, py::handle v_h, double scale, py::handle out_h) {
    const char* fn = "full_attention";
    py::array q = check_f32(fn, "q", q_h);
    if (q.ndim() != 3)
        throw py::value_error("full_attention: q must have shape (n, heads, head_dim), got " + shape_str(q));
    py::array k = check_f32(fn, "k", k_h);
    if (k.ndim() != 3)
        throw py::value_error("full_attention: k must have shape (T, kv_heads, head_dim), got " + shape_str(k));
    const int64_t n = q.shape(0), H = q.shape(1), hd = q.shape(2), T = k.shape(0), KV = k.shape(1);
    if (k.shape(2) != hd)
        throw py::value_error("full_attention: k head_dim " + std::to_string(k.shape(2)) + " != q head_dim " +
                              std::to_string(hd));
    if (H < 1 || KV < 1 || hd < 1 || T < 1)
        throw py::value_error("full_attention: heads, kv_heads, head_dim and keys must be >= 1");
    if (H % KV)
        throw py::value_error("full_attention: " + std::to_string(H) + " query heads do not group over " +
                              std::to_string(KV) + " kv heads");
    py::array v = check_array(fn, "v", v_h, kF32, {T, KV, hd});
    py::array out = check_array(fn, "out", out_h, kF32, {n, H * hd}, true);
    for (auto* p : {&q, &k, &v}) check_no_overlap(fn, "out", out, "an input", *p);
    if (!std::isfinite(scale)) throw py::value_error("full_attention: scale must be finite");
    const float* qp = static_cast<const float*>(q.data());
    const float* kp = static_cast<const float*>(k.data());
    const float* vp = static_cast<const float*>(v.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    edgelm::full_attention(qp, kp, vp, n, H, KV, hd, T, static_cast<float>(scale), op);
}

void py_softcap(py::handle x_h, double cap, py::handle out_h) {
    const char* fn = "softcap";
    py::array x = check_f32(fn, "x", x_h);
    py::array out = check_array(fn, "out", out_h, kF32, shape_of(x), true);
    check_same_or_disjoint(fn, out, "x", x);
    if (!(cap > 0.0) || !std::isfinite(cap)) throw py::value_error("softcap: cap must be finite and > 0");
    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    const int64_t size = x.size();
    py::gil_scoped_release nogil;
    edgelm::softcap(xp, size, static_cast<float>(cap), op);
}

void py_depthwise_conv2d(py::handle x_h, py::handle taps_h, int64_t stride, int64_t top, int64_t left,
                         py::handle out_h) {
    const char* fn = "depthwise_conv2d";
    py::array x = check_f32(fn, "x", x_h);
    if (x.ndim() != 3 || x.shape(0) < 1 || x.shape(1) < 1 || x.shape(2) < 1)
        throw py::value_error("depthwise_conv2d: x must be [H, W, C] with every dimension >= 1, got " + shape_str(x));
    const int64_t H = x.shape(0), W = x.shape(1), C = x.shape(2);
    py::array t = check_f32(fn, "taps", taps_h);
    if (t.ndim() != 3 || t.shape(0) < 1 || t.shape(0) != t.shape(1) || t.shape(2) != C)
        throw py::value_error("depthwise_conv2d: taps must be [k, k, C] with C = " + std::to_string(C) + ", got " +
                              shape_str(t));
    const int64_t k = t.shape(0);
    if (k > 64 || stride < 1 || stride > 64 || top < 0 || top >= k || left < 0 || left >= k)
        throw py::value_error("depthwise_conv2d: need 1 <= k <= 64, 1 <= stride <= 64 and 0 <= top, left < k");
    py::array out = as_array(fn, "out", out_h);
    if (out.ndim() != 3 || out.shape(0) < 1 || out.shape(1) < 1 || out.shape(2) != C)
        throw py::value_error("depthwise_conv2d: out must be [oh, ow, C] with oh, ow >= 1, got " + shape_str(out));
    const int64_t oh = out.shape(0), ow = out.shape(1);
    if (stride * (oh - 1) - top >= H || stride * (ow - 1) - left >= W)
        throw py::value_error("depthwise_conv2d: the output is larger than the input and stride allow");
    check_array(fn, "out", out_h, kF32, {oh, ow, C}, true);
    check_no_overlap(fn, "out", out, "x", x);
    check_no_overlap(fn, "out", out, "taps", t);
    const float* xp = static_cast<const float*>(x.data());
    const float* tp = static_cast<const float*>(t.data());
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    edgelm::depthwise_conv2d(xp, H, W, C, tp, k, stride, top, left, op, oh, ow);
}

void py_attention(py::handle q_h, py::handle k_h, py::handle v_h, py::handle qpos_h, py::handle kpos_h,
                  int64_t window, double scale, double cap, py::handle out_h, bool bf16) {
    const char* fn = "attention";
    py::array q = check_f32(fn, "q", q_h);
    if (q.ndim() != 3) throw py::value_error("attention: q must have shape (n, heads, head_dim), got " + shape_str(q));
    // k/v: float32, or float16 (an fp16 KV cache; widened block by block inside the kernel)
    py::array k = as_array(fn, "k", k_h);
    const bool half = dtype_is(k, kF16);
    if (half)
        check_layout(fn, "k", k, false);
    else
        k = check_f32(fn, "k", k_h);
    if (k.ndim() != 3)
        throw py::value_error("attention: k must have shape (T, kv_heads, head_dim), got " + shape_str(k));
    const int64_t n = q.shape(0), H = q.shape(1), hd = q.shape(2), T = k.shape(0), KV = k.shape(1);
    if (k.shape(2) != hd)
        throw py::value_error("attention: k head_dim " + std::to_string(k.shape(2)) + " != q head_dim " +
                              std::to_string(hd));
    if (H < 1 || KV < 1 || hd < 1) throw py::value_error("attention: heads, kv_heads and head_dim must be >= 1");
    if (H % KV)
        throw py::value_error("attention: " + std::to_string(H) + " query heads do not group over " +
                              std::to_string(KV) + " kv heads");
    py::array v = check_array(fn, "v", v_h, half ? kF16 : kF32, {T, KV, hd});
    const DT kI64{'i', 8, "int64"};
    py::array qp = check_array(fn, "q_pos", qpos_h, kI64, {n});
    py::array kp = check_array(fn, "k_pos", kpos_h, kI64, {T});
    py::array out = check_array(fn, "out", out_h, kF32, {n, H * hd}, true);
    for (auto* p : {&q, &k, &v, &qp, &kp}) check_no_overlap(fn, "out", out, "an input", *p);
    if (window < 0) throw py::value_error("attention: window must be >= 0, got " + std::to_string(window));
    if (!std::isfinite(scale)) throw py::value_error("attention: scale must be finite");
    if (!(cap >= 0.0) || !std::isfinite(cap)) throw py::value_error("attention: softcap must be finite and >= 0");
    edgelm::AttnParams P;
    P.q = static_cast<const float*>(q.data());
    if (half) {
        P.k = P.v = nullptr;
        P.k16 = static_cast<const uint16_t*>(k.data());
        P.v16 = static_cast<const uint16_t*>(v.data());
    } else {
        P.k = static_cast<const float*>(k.data());
        P.v = static_cast<const float*>(v.data());
    }
    P.qpos = static_cast<const int64_t*>(qp.data());
    P.kpos = static_cast<const int64_t*>(kp.data());
    P.n = n;
    P.H = H;
    P.KV = KV;
    P.hd = hd;
    P.T = T;
    P.window = window;
    P.scale = static_cast<float>(scale);
    P.cap = static_cast<float>(cap);
    P.out = static_cast<float*>(out.mutable_data());
    P.bf16 = bf16;
    py::gil_scoped_release nogil;
    edgelm::attention(P);
}

template <class I>
void check_ids(const I* ids, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; ++i) {
        const long long v = static_cast<long long>(ids[i]);
        if (v < 0 || v >= rows)
            throw py::value_error("embed: id " + std::to_string(v) + " at position " + std::to_string(i) +
                                  " is out of range for " + std::to_string(rows) + " rows");
    }
}

void py_embed(py::handle ids_h, int scheme, py::handle w_h, py::handle scale_h, int64_t rows, int64_t cols,
              py::handle out_h) {
    const char* fn = "embed";
    Weights W = check_weights(fn, scheme, w_h, scale_h, rows, cols);
    py::array ids = as_array(fn, "ids", ids_h);
    const bool i32 = dtype_is(ids, DT{'i', 4, "int32"});
    const bool i64 = dtype_is(ids, DT{'i', 8, "int64"});
    if (!i32 && !i64) throw py::type_error(std::string(fn) + ": ids must be int32 or int64, got " + dtype_str(ids));
    if (ids.ndim() != 1) throw py::value_error(std::string(fn) + ": ids must be 1-D, got shape " + shape_str(ids));
    check_layout(fn, "ids", ids, false);
    const int64_t n = ids.shape(0);
    py::array out = check_array(fn, "out", out_h, kF32, {n, cols}, true);
    check_no_overlap(fn, "out", out, "ids", ids);
    check_no_overlap(fn, "out", out, "the weights", W.w);
    if (W.has_scale) check_no_overlap(fn, "out", out, "the scales", W.scale);

    float* op = static_cast<float*>(out.mutable_data());
    if (i32) {
        const auto* p = static_cast<const int32_t*>(ids.data());
        check_ids(p, n, rows);
        py::gil_scoped_release nogil;
        edgelm::embed(W.view, p, n, op);
    } else {
        const auto* p = static_cast<const int64_t*>(ids.data());
        check_ids(p, n, rows);
        py::gil_scoped_release nogil;
        edgelm::embed(W.view, p, n, op);
    }
}

py::dict cpu_features() {
    py::dict d;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    d["x86"] = true;
    d["sse4_2"] = static_cast<bool>(__builtin_cpu_supports("sse4.2"));
    d["avx"] = static_cast<bool>(__builtin_cpu_supports("avx"));
    d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
    d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
    // F16C has no __builtin_cpu_supports name in every compiler: read CPUID.1:ECX directly
    // (AVX must also be usable, which implies the OS saves the ymm state).
    {
        unsigned int a = 0, b = 0, c = 0, dd = 0;
        const bool ok = __get_cpuid(1, &a, &b, &c, &dd) != 0;
        d["f16c"] = ok && ((c >> 29) & 1u) && static_cast<bool>(__builtin_cpu_supports("avx"));
    }
    d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
    d["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
    d["avx512vl"] = static_cast<bool>(__builtin_cpu_supports("avx512vl"));
    d["avx512dq"] = static_cast<bool>(__builtin_cpu_supports("avx512dq"));
    d["avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
    d["neon"] = false;
#elif defined(__aarch64__)
    d["x86"] = false;
    d["neon"] = true;  // Advanced SIMD is mandatory on AArch64
#else
    d["x86"] = false;
    d["neon"] = false;
#endif
    return d;
}

}  // namespace

// ----------------------------------------------------------------------------- Gemma 3 blocks

// A model's Gemma 3 blocks, validated once (weights, norms, dimensions); forward() then runs
// all of them in one call (block.h). Holds references to every array it points into.
class G3Plan {
public:
    G3Plan(py::sequence blocks, int64_t hidden, int64_t H, int64_t KV, int64_t hd, int64_t ffn, int64_t window,
           double eps, double scale, double cap) {
        const char* fn = "Gemma3Blocks";
        if (hidden < 1 || H < 1 || KV < 1 || hd < 2 || hd % 2 || ffn < 1 || H % KV || window < 0)
            throw py::value_error(std::string(fn) + ": bad dimensions");
        if (!(eps >= 0.0) || !std::isfinite(eps) || !std::isfinite(scale) || !(cap >= 0.0) || !std::isfinite(cap))
            throw py::value_error(std::string(fn) + ": eps, scale and softcap must be finite (eps, softcap >= 0)");
        D_ = {hidden, H, KV, hd, ffn, window, static_cast<float>(eps), static_cast<float>(scale),
              static_cast<float>(cap)};
        for (py::handle bh : blocks) {
            py::tuple t = py::reinterpret_borrow<py::object>(bh).cast<py::tuple>();
            if (t.size() != 14)
                throw py::value_error(std::string(fn) + ": each block is (q, k, v, o, gate, up, down, q_norm, k_norm, "
                                      "post_attn_norm, ffn_norm, post_ffw_norm, next_norm or None, local)");
            const int64_t want[7][2] = {{H * hd, hidden}, {KV * hd, hidden}, {KV * hd, hidden}, {hidden, H * hd},
                                        {ffn, hidden},    {ffn, hidden},     {hidden, ffn}};
            const char* names[7] = {"q", "k", "v", "o", "gate", "up", "down"};
            edgelm::G3BlockW L{};
            edgelm::WView* views[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
            for (int j = 0; j < 7; ++j) {
                keep_.push_back(weight_from_tuple(fn, t[j]));
                const edgelm::WView& v = keep_.back().view;
                if (v.rows != want[j][0] || v.cols != want[j][1])
                    throw py::value_error(std::string(fn) + ": block " + std::to_string(blocks_.size()) + " weight " +
                                          names[j] + " must be " + std::to_string(want[j][0]) + " x " +
                                          std::to_string(want[j][1]));
                *views[j] = v;
            }
            const float** norms[6] = {&L.q_norm, &L.k_norm, &L.post_attn, &L.ffn_norm, &L.post_ffw, &L.next_norm};
            const int64_t nlen[6] = {hd, hd, hidden, hidden, hidden, hidden};
            for (int j = 0; j < 6; ++j) {
                if (j == 5 && t[7 + j].is_none()) {
                    L.next_norm = nullptr;
                    continue;
                }
                norms_.push_back(check_array(fn, "norm", t[7 + j], kF32, {nlen[j]}));
                *norms[j] = static_cast<const float*>(norms_.back().data());
            }
            L.local = t[13].cast<bool>();
            blocks_.push_back(L);
        }
        if (blocks_.empty()) throw py::value_error(std::string(fn) + ": no blocks");
    }

    int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

    // x, h [n, hidden] float32 (x updated in place, h replaced by the last block's next_norm
    // output); positions [n] int64 >= 0; cos/sin [n, hd/2] for local and global layers;
    // caches: one (k, v, pos) per block, k/v [slots, KV, hd] float32 or float16, pos [slots]
    // int64; filled [blocks] int64, updated. seq_rows (batched decode): the rows of each of S
    // sequences, in order (sum n); caches then hold S * blocks entries, sequence by sequence,
    // and filled has that many.
    void forward(py::handle x_h, py::handle h_h, py::handle pos_h, py::handle cl_h, py::handle sl_h, py::handle cg_h,
                 py::handle sg_h, py::sequence caches, py::handle filled_h, int qd8, py::object seq_rows_h,
                 int64_t need, bool attn_bf16) {
        const char* fn = "Gemma3Blocks.forward";
        if (qd8 < -1 || qd8 > 1) throw py::value_error(std::string(fn) + ": qd8 must be -1, 0 or 1");
        py::array x = check_f32(fn, "x", x_h, true);
        if (x.ndim() != 2 || x.shape(1) != D_.hidden)
            throw py::value_error(std::string(fn) + ": x must have shape (n, " + std::to_string(D_.hidden) + ")");
        const int64_t n = x.shape(0);
        py::array h = check_array(fn, "h", h_h, kF32, {n, D_.hidden}, true);
        check_no_overlap(fn, "x", x, "h", h);
        const DT kI64{'i', 8, "int64"};
        py::array pos = check_array(fn, "positions", pos_h, kI64, {n});
        const int64_t* pp = static_cast<const int64_t*>(pos.data());
        for (int64_t i = 0; i < n; ++i)
            if (pp[i] < 0) throw py::value_error(std::string(fn) + ": positions must be >= 0");
        py::array tabs[4];
        py::handle th[4] = {cl_h, sl_h, cg_h, sg_h};
        for (int j = 0; j < 4; ++j) tabs[j] = check_array(fn, "rope table", th[j], kF32, {n, D_.hd / 2});
        const int64_t nb = size();
        std::vector<int64_t> rows{n};
        if (!seq_rows_h.is_none()) {
            if (!py::isinstance<py::sequence>(seq_rows_h))
                throw py::type_error(std::string(fn) + ": seq_rows must be a sequence of ints");
            rows.clear();
            for (py::handle r : py::reinterpret_borrow<py::sequence>(seq_rows_h)) {
                if (!py::isinstance<py::int_>(r)) throw py::type_error(std::string(fn) + ": seq_rows must be a sequence of ints");
                rows.push_back(r.cast<int64_t>());
            }
            int64_t total = 0;
            for (int64_t r : rows) {
                if (r < 1) throw py::value_error(std::string(fn) + ": seq_rows must be >= 1");
                total += r;
            }
            if (rows.empty() || total != n)
                throw py::value_error(std::string(fn) + ": seq_rows must sum to the rows of x (" + std::to_string(n) + ")");
        }
        const int64_t S = static_cast<int64_t>(rows.size()), nc = S * nb;
        if (need < -1 || need > n) throw py::value_error(std::string(fn) + ": need must be -1 (all) or 0..n");
        if (S > 1 && need != -1) throw py::value_error(std::string(fn) + ": need applies to one sequence");
        if (static_cast<int64_t>(py::len(caches)) != nc)
            throw py::value_error(std::string(fn) + ": give one cache per block" + (S > 1 ? " and sequence" : ""));
        py::array filled = check_array(fn, "filled", filled_h, kI64, {nc}, true);
        int64_t* fp = static_cast<int64_t*>(filled.mutable_data());
        std::vector<py::array> held;
        std::vector<edgelm::G3Cache> C(static_cast<size_t>(nc));
        for (int64_t b = 0; b < nc; ++b) {
            py::tuple t = py::reinterpret_borrow<py::object>(caches[b]).cast<py::tuple>();
            if (t.size() != 3) throw py::value_error(std::string(fn) + ": each cache is (k, v, pos)");
            py::array k = as_array(fn, "cache k", t[0]);
            const bool half = dtype_is(k, kF16);
            const DT& dt = half ? kF16 : kF32;
            if (k.ndim() != 3) throw py::value_error(std::string(fn) + ": cache k must be (slots, kv_heads, head_dim)");
            const int64_t slots = k.shape(0);
            k = check_array(fn, "cache k", t[0], dt, {slots, D_.KV, D_.hd}, true);
            py::array v = check_array(fn, "cache v", t[1], dt, {slots, D_.KV, D_.hd}, true);
            py::array cp = check_array(fn, "cache pos", t[2], kI64, {slots}, true);
            if (slots < rows[static_cast<size_t>(b / nb)])
                throw py::value_error(std::string(fn) + ": a cache has fewer slots than the step's tokens");
            if (fp[b] < 0 || fp[b] > slots) throw py::value_error(std::string(fn) + ": filled out of range");
            for (const py::array* a : {&k, &v, &cp}) {
                check_no_overlap(fn, "a cache", *a, "x", x);
                check_no_overlap(fn, "a cache", *a, "h", h);
            }
            check_no_overlap(fn, "cache k", k, "cache v", v);
            C[b] = {k.mutable_data(), v.mutable_data(), static_cast<int64_t*>(cp.mutable_data()), slots, half, fp[b]};
            held.push_back(k);
            held.push_back(v);
            held.push_back(cp);
        }
        if (S > 1) {  // every cache array its own: no two sequences (or blocks) write one cache
            std::vector<Range> rs;
            for (const py::array& a : held)
                if (a.nbytes() > 0) rs.push_back(byte_range(a));
            std::sort(rs.begin(), rs.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
            for (size_t i = 1; i < rs.size(); ++i)
                if (rs[i].lo < rs[i - 1].hi) throw py::value_error(std::string(fn) + ": two caches share memory");
        }
        for (edgelm::G3BlockW& L : blocks_) {
            // the last block's products after attention run on the wanted rows only
            const int64_t m = &L == &blocks_.back() && need >= 0 ? std::max<int64_t>(need, 1) : n;
            L.q_qkv = use_qd8(L.q.scheme, qd8, n);
            L.q_o = use_qd8(L.o.scheme, qd8, m);
            L.q_gate = use_qd8(L.gate.scheme, qd8, m);
            L.q_up = use_qd8(L.up.scheme, qd8, m);
            L.q_down = use_qd8(L.down.scheme, qd8, m);
        }
        float* xp = static_cast<float*>(x.mutable_data());
        float* hp = static_cast<float*>(h.mutable_data());
        const float* tp[4];
        for (int j = 0; j < 4; ++j) tp[j] = static_cast<const float*>(tabs[j].data());
        {
            py::gil_scoped_release nogil;
            edgelm::G3Dims D = D_;
            D.attn_bf16 = attn_bf16;
            edgelm::g3_blocks(D, blocks_.data(), C.data(), nb, xp, hp, pp, n, tp[0], tp[1], tp[2], tp[3], S,
                              S > 1 ? rows.data() : nullptr, need);
        }
        for (int64_t b = 0; b < nc; ++b) fp[b] = C[b].filled;
    }

private:
    edgelm::G3Dims D_{};
    std::vector<edgelm::G3BlockW> blocks_;
    std::vector<Weights> keep_;
    std::vector<py::array> norms_;
};

#define EDGELM_DEFINE_MODULE(name, m) PYBIND11_MODULE(name, m)

EDGELM_DEFINE_MODULE(EDGELM_MODNAME, m) {
    m.doc() = "edgelm native CPU kernels (one instruction-set build; see edgelm/backends/native.py)";
    m.attr("BUILD_ISA") = EDGELM_BUILD_ISA;       // which build this is: scalar / avx2 / avx512 / neon
    m.attr("CODE_PATH") = edgelm::kCodePath;      // which SIMD code path it compiled to
    // the bf16 attention path: "vdpbf16ps", "emulated" (the same bits with FMAs) or "" (none)
    m.attr("ATTN_BF16") = edgelm::kAttnBf16 == 2 ? "vdpbf16ps" : edgelm::kAttnBf16 == 1 ? "emulated" : "";
    m.def("attn_bf16_ready", &edgelm::attn_bf16_ready, "Whether attention(bf16=True) takes the bf16 path here.");
    m.attr("SCHEMES") = py::make_tuple("fp32", "fp16", "int8", "int8-b32", "int4-b32", "int4-b128");

    m.def("cpu_features", &cpu_features, "Instruction-set support of this CPU (and OS), as a dict of bools.");

    m.def(
        "set_threads",
        [](int n) {
            if (n < 1 || n > edgelm::ThreadPool::kMaxThreads)
                throw py::value_error("set_threads: n must be in [1, " +
                                      std::to_string(edgelm::ThreadPool::kMaxThreads) + "], got " +
                                      std::to_string(n));
            py::gil_scoped_release nogil;  // may wait for a job in another thread
            edgelm::ThreadPool::instance().set_threads(n);
        },
        "n"_a, "Number of threads (the caller included) kernels of this module use.");
    m.def("get_threads", [] { return edgelm::ThreadPool::instance().threads(); });

    m.def("matmul", &py_matmul, "x"_a, "scheme_id"_a, "w"_a, "scale"_a, "rows"_a, "cols"_a, "out"_a, "qd8"_a = -1,
          "out[n, rows] = x[n, cols] @ W.T for a weight W[rows, cols] stored in scheme `scheme_id`.\n"
          "qd8: -1 = the module setting (set_qd8), 0 = fp32 activations, 1 = int8-quantized activations\n"
          "(integer schemes only; ignored for fp32/fp16).\n"
          "w: the 'w' part (fp32/fp16) or 'q' part; scale: the 'scale' part or None. All arrays\n"
          "C-contiguous, aligned, exact dtypes; out float32 [n, rows], writable, not overlapping.");
    m.def("matmul_multi", &py_matmul_multi, "x"_a, "weights"_a, "outs"_a, "qd8"_a = -1,
          "outs[j][n, rows_j] = x[n, cols] @ W_j.T for weights given as (scheme_id, w, scale, rows, cols)\n"
          "tuples sharing cols: one thread-pool job, x quantized once under qd8 (same scheme).");
    m.def("matmul_gelu_mul", &py_matmul_gelu_mul, "x"_a, "gate"_a, "up"_a, "out"_a, "tmp"_a, "qd8"_a = -1,
          "out = gelu_tanh(x @ G.T) * (x @ U.T), gate/up as (scheme_id, w, scale, rows, cols); tmp [n, rows]\n"
          "is scratch. One thread-pool job; each row band computes both products and the GeGLU.");
    m.def(
        "float_to_half",
        [](py::handle x_h) {
            py::array x = check_f32("float_to_half", "x", x_h);
            py::array_t<uint16_t> out(x.size());
            const float* xp = static_cast<const float*>(x.data());
            uint16_t* op = out.mutable_data();
            const int64_t n = x.size();
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) edgelm::vstore8h(op + i, edgelm::vloadu(xp + i));
            for (; i < n; ++i) op[i] = edgelm::float_to_half(xp[i]);
            return out;
        },
        "x"_a, "float32 -> IEEE half bits (uint16), as the KV-cache writes round (nearest even).");
    py::class_<G3Plan>(m, "Gemma3Blocks", py::module_local(),
                       "Gemma 3 decoder blocks validated once and run in one call (block.h): the cpu\n"
                       "backend's path for decode-sized steps. Bitwise the per-op forward.")
        .def(py::init<py::sequence, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, double>(),
             "blocks"_a, "hidden"_a, "heads"_a, "kv_heads"_a, "head_dim"_a, "ffn"_a, "window"_a, "eps"_a,
             "scale"_a, "softcap"_a)
        .def("__len__", &G3Plan::size)
        .def("forward", &G3Plan::forward, "x"_a, "h"_a, "positions"_a, "cos_local"_a, "sin_local"_a,
             "cos_global"_a, "sin_global"_a, "caches"_a, "filled"_a, "qd8"_a = -1, "seq_rows"_a = py::none(),
             "need"_a = -1, "attn_bf16"_a = false);
    m.def(
        "set_weight_prefetch",
        [](int mode) {
            if (mode < 0 || mode > 1) throw py::value_error("set_weight_prefetch: mode must be 0 or 1");
            edgelm::weight_prefetch_mode().store(mode);
        },
        "mode"_a,
        "Packed GEMM (prefill products): 1 = prefetch the next weight rows while a group's tiles run "
        "(default), 0 = no prefetch. For A/B measurements.");
    m.def(
        "set_qd8",
        [](int mode) {
            if (mode < -1 || mode > 1) throw py::value_error("set_qd8: mode must be -1 (auto), 0 or 1");
            g_qd8.store(mode);
        },
        "mode"_a, "Default activation path for integer schemes: -1 auto, 0 fp32 activations, 1 qd8.");
    m.def("get_qd8", [] { return g_qd8.load(); });
    m.def(
        "set_packed_gemm",
        [](int mode) {
            if (mode < 0 || mode > 2) throw py::value_error("set_packed_gemm: mode must be 0, 1 or 2");
            edgelm::packed_gemm_mode().store(mode);
        },
        "mode"_a,
        "1 (default): qd8 products with >= 16 activation rows use the packed GEMM where the build has it, "
        "integer products of 4-15 rows (int4 6-15) the few-row route in VNNI builds; 0: always the one-row tiles; 2: the packed GEMM from 2 rows "
        "(for comparisons)");
    m.def("get_packed_gemm", [] { return edgelm::packed_gemm_mode().load(); });
    m.def(
        "set_float_gemm",
        [](int mode) {
            if (mode != 0 && mode != 1) throw py::value_error("set_float_gemm: mode must be 0 or 1");
            edgelm::float_gemm_mode().store(mode);
        },
        "mode"_a,
        "1 (default): fp32/fp16 products with >= 16 activation rows use the packed outer-product GEMM; "
        "0: always the one-row tiles (for comparisons)");
    m.def("get_float_gemm", [] { return edgelm::float_gemm_mode().load(); });
    m.def(
        "set_deterministic",
        [](int on) {
            if (on != 0 && on != 1) throw py::value_error("set_deterministic: on must be 0 or 1");
            edgelm::deterministic_mode() = on;
        },
        "on"_a,
        "For the calling thread: 1 = batch-invariant kernels (a row's result does not depend on the other "
        "rows of the call, the chunking of a prompt or the cache's history); 0 = the fastest kernels (default)");
    m.def("get_deterministic", [] { return edgelm::deterministic_mode(); });
    m.def("packed_gemm_built", [] { return edgelm::kPackedGemmBuilt; });
    m.def(
        "set_decode_prefetch",
        [](int mode) {
            if (mode != 0 && mode != 1) throw py::value_error("set_decode_prefetch: mode must be 0 or 1");
            edgelm::attn_detail::decode_prefetch_mode().store(mode);
        },
        "mode"_a,
        "Decode attention (<= 8 query rows per KV group): 1 = 16-key blocks with the next block's K/V "
        "prefetched (default), 0 = 64-key blocks without prefetch (for comparisons)");
    m.def("get_decode_prefetch", [] { return edgelm::attn_detail::decode_prefetch_mode().load(); });
    m.def(
        "set_phase_timing",
        [](int on) {
            if (on != 0 && on != 1) throw py::value_error("set_phase_timing: on must be 0 or 1");
            edgelm::phase_clock().on.store(on);
        },
        "on"_a, "1: time each phase of Gemma3Blocks.forward (for profiling; see phase_times); 0: off (default)");
    m.def(
        "phase_times",
        [](bool reset) {
            edgelm::PhaseClock& c = edgelm::phase_clock();
            py::dict d;
            for (int i = 0; i < edgelm::kNumPhases; ++i)
                d[edgelm::phase_name(i)] = py::make_tuple(c.ns[i].load() * 1e-9, c.calls[i].load(), c.bytes[i].load());
            if (reset) c.reset();
            return d;
        },
        "reset"_a = true,
        "Per phase of Gemma3Blocks.forward since the last reset: (seconds, calls, bytes read from memory:\n"
        "weights for the products, filled K/V slots for attention). Counts only while set_phase_timing(1).");
    m.def("vnni_built", [] {
#if defined(EDGELM_VNNI)
        return true;
#else
        return false;
#endif
    }, "Whether the qd8 dot products use vpdpbusd (avx512) or its exact AVX2 emulation (vnniemu).");
    m.def("qd8_default_on", [] { return edgelm::kQd8Fast; }, "Whether auto mode picks qd8 in this build.");
    m.def("uses_qd8", [](int scheme, int64_t n) { return use_qd8(scheme, -1, n); }, "scheme_id"_a, "n"_a = 1,
          "Whether matmul(qd8=-1) takes the qd8 path for this scheme and row count.");
    m.def("rmsnorm", &py_rmsnorm, "x"_a, "w"_a, "eps"_a, "out"_a, "act"_a = 0,
          "out = x / sqrt(mean(x^2, -1) + eps) * w; x float32 [..., d], w [d]; out may be x.\n"
          "act=1: then gelu_tanh of the result.");
    m.def("rope", &py_rope, "x"_a, "cos"_a, "sin"_a, "out"_a,
          "Rotate-half RoPE: x [n, heads, hd], cos/sin [n, hd/2] float32; out may be x.");
    m.def("add_rmsnorm", &py_add_rmsnorm, "x"_a, "h"_a, "w_post"_a, "eps"_a, "w_next"_a, "next"_a,
          "The residual step, fused: x += rmsnorm(h) * w_post in place (x, h [n, d]); with w_next,\n"
          "next = rmsnorm(x) * w_next (else pass None for both).");
    m.def("rmsnorm_rope", &py_rmsnorm_rope, "x"_a, "w"_a, "cos"_a, "sin"_a, "eps"_a, "out"_a,
          "Per-head rmsnorm (w [hd]) then rotate-half RoPE: x [n, heads, hd]; out may be x.");
    m.def("gelu_mul", &py_gelu_mul, "g"_a, "u"_a, "out"_a, "out = gelu_tanh(g) * u (same shapes, float32).");
    m.def("full_attention", &py_full_attention, "q"_a, "k"_a, "v"_a, "scale"_a, "out"_a,
          "out = softmax(q.k * scale over all keys) . v: q [n, H, hd], k/v [T, KV, hd] float32, out [n, H*hd].");
    m.def("sigmoid_mul", &py_sigmoid_mul, "x"_a, "g"_a, "out"_a,
          "out = x * sigmoid(g) (same shapes, float32; SiLU when g is x).");
    m.def("softcap", &py_softcap, "x"_a, "cap"_a, "out"_a, "out = tanh(x / cap) * cap.");
    m.def("depthwise_conv2d", &py_depthwise_conv2d, "x"_a, "taps"_a, "stride"_a, "top"_a, "left"_a, "out"_a,
          "Channels-last depthwise convolution: x [H,W,C], taps [k,k,C] float32, out [oh,ow,C];\n"
          "out[o,p,c] = sum of x[s*o+i-top, s*p+j-left, c] * taps[i,j,c] over the taps inside x.");
    m.def("attention", &py_attention, "q"_a, "k"_a, "v"_a, "q_pos"_a, "k_pos"_a, "window"_a, "scale"_a,
          "softcap"_a, "out"_a, "bf16"_a = false,
          "Softmax attention over a KV cache. q [n,H,hd], k/v [T,KV,hd] float32 or float16 (both the same); q_pos [n], k_pos [T]\n"
          "int64 (k_pos -1 = empty); key t visible to query i iff k_pos >= 0 and\n"
          "0 <= q_pos - k_pos < window (window 0 = no upper limit); softcap 0 = none.\n"
          "out [n, H*hd]; a query that sees no key gets zeros. bf16: bf16 dot products where the build\n"
          "and CPU have them (ATTN_BF16, attn_bf16_ready()) and not in deterministic mode; else ignored.");
    m.def(
        "stream_read_gbs",
        [](int64_t nbytes, int threads, int passes) {
            if (nbytes < 4096 || nbytes > (int64_t(1) << 36))
                throw py::value_error("stream_read_gbs: nbytes must be in [4096, 2**36]");
            if (threads < 1 || threads > 256) throw py::value_error("stream_read_gbs: threads must be in [1, 256]");
            if (passes < 1 || passes > 100) throw py::value_error("stream_read_gbs: passes must be in [1, 100]");
            py::gil_scoped_release nogil;
            return edgelm::stream_read_gbs(nbytes, threads, passes);
        },
        "nbytes"_a = int64_t(256) << 20, "threads"_a = 1, "passes"_a = 5,
        "Best-of-`passes` read bandwidth in GB/s: `threads` threads sum a float buffer of `nbytes`.");
    m.def("embed", &py_embed, "ids"_a, "scheme_id"_a, "w"_a, "scale"_a, "rows"_a, "cols"_a, "out"_a,
          "out[i, :] = dequantized W[ids[i], :]; ids int32 or int64 [n], out float32 [n, cols].");
}
