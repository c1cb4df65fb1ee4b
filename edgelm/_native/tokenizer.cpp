// edgelm native tokenizer: SentencePiece BPE encoding straight from a serialized ModelProto.
//
// Built once (no ISA variants) as edgelm._native._tok. It replaces the `sentencepiece`
// library for the bundles' "sentencepiece-model" tokenizers and gives the same ids as
// SentencePieceProcessor::Encode for BPE models with an empty precompiled_charsmap
// (identity normalization), which is what edgelm writes:
//
//   normalization   (normalizer.cc) ' ' -> U+2581 when escape_whitespaces, add_dummy_prefix
//                   (or a suffix with treat_whitespace_as_suffix), remove_extra_whitespaces
//                   with SentencePiece's segment-wise rule; the input is a Python str, so it
//                   is always valid UTF-8 and no U+FFFD substitution can happen.
//   initial symbols (PrefixMatcher) the longest USER_DEFINED piece at each position, frozen,
//                   else one character (OneCharLen of the lead byte, clipped to the end).
//   merges          (bpe_model.cc) a max-heap of adjacent pairs whose concatenation is a
//                   NORMAL / USER_DEFINED / UNUSED piece: highest score first, then the
//                   leftmost; an entry is stale when either side changed length; UNUSED
//                   results are split again with the last recorded merge for that piece.
//   ids             (model_interface.cc / sentencepiece_processor.cc) PieceToId, else unk (a
//                   spelling names one piece: repeats are rejected at load, as sentencepiece
//                   0.2 does); an unknown piece becomes its bytes' <0xNN> pieces with
//                   byte_fallback, and without it a run of unknown pieces becomes one unk id.
//                   A symbol spelling a CONTROL piece (possible only for a one-character
//                   control symbol) is unknown too: what sentencepiece 0.2 gives.
//
// "Plain" mode encodes as the same model would with its trainer_spec.control_symbols typed
// CONTROL instead of USER_DEFINED (tokenizer/wire.py::_plain_text_model): such pieces are
// neither matched in text nor produced by merges. That is a per-piece flag here, not a
// second model.
//
// Memory: pieces are (offset, length) into the caller's buffer, which is held (a Py_buffer)
// for the model's lifetime, so a memoryview of the bundle's mmap is never copied. Lookups use
// open-addressing tables of uint32 slots; user-defined pieces live in a small sorted trie.
// Every length and offset read from the buffer is checked; a malformed model is a ValueError
// naming the field, never a crash.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

enum : uint8_t { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6 };
constexpr uint8_t kTypeMask = 7;
constexpr uint8_t kPlainControl = 8;  // listed in control_symbols: CONTROL in plain mode
constexpr int kModelTypeBPE = 2, kModelTypeUnigram = 1;

[[noreturn]] void fail(const std::string &msg) { throw std::invalid_argument("tokenizer model: " + msg); }

std::string printable(const uint8_t *p, size_t n) {
    std::string s;
    for (size_t i = 0; i < n && i < 40; ++i) {
        uint8_t c = p[i];
        if (c >= 0x20 && c != 0x7f && c != '\\') {
            s += static_cast<char>(c);
        } else {
            char b[8];
            std::snprintf(b, sizeof b, "\\x%02x", c);
            s += b;
        }
    }
    if (n > 40) s += "...";
    return s;
}

// ------------------------------------------------------------------------------------------
// Protobuf wire format, bounds-checked
// ------------------------------------------------------------------------------------------

struct Span {
    size_t off = 0, len = 0;
};

class Wire {
public:
    Wire(const uint8_t *base, size_t begin, size_t end, const char *where)
        : b_(base), pos_(begin), end_(end), where_(where) {}
    bool done() const { return pos_ >= end_; }
    size_t pos() const { return pos_; }

    uint64_t varint() {
        uint64_t v = 0;
        for (int shift = 0; shift < 70; shift += 7) {
            if (pos_ >= end_) truncated();
            uint8_t c = b_[pos_++];
            if (shift < 64) v |= static_cast<uint64_t>(c & 0x7f) << shift;
            if (!(c & 0x80)) return v;
        }
        fail(std::string("malformed varint in ") + where_ + " at byte " + std::to_string(pos_));
    }
    Span bytes() {
        uint64_t n = varint();
        if (n > end_ - pos_)
            fail(std::string("field of ") + std::to_string(n) + " bytes overruns " + where_ + " at byte " +
                 std::to_string(pos_));
        Span s{pos_, static_cast<size_t>(n)};
        pos_ += static_cast<size_t>(n);
        return s;
    }
    uint32_t fixed32() {
        if (end_ - pos_ < 4) truncated();
        const uint8_t *p = b_ + pos_;
        pos_ += 4;
        return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
               static_cast<uint32_t>(p[3]) << 24;
    }
    void skip(int wire) {
        switch (wire) {
            case 0: varint(); return;
            case 1:
                if (end_ - pos_ < 8) truncated();
                pos_ += 8;
                return;
            case 2: bytes(); return;
            case 5: fixed32(); return;
            case 3:
            case 4: fail(std::string("protobuf groups are not supported (in ") + where_ + ")");
            default:
                fail(std::string("invalid protobuf wire type ") + std::to_string(wire) + " in " + where_ + " at byte " +
                     std::to_string(pos_));
        }
    }
    // next field key; false at the end
    bool next(uint32_t &field, int &wire) {
        if (done()) return false;
        uint64_t key = varint();
        field = static_cast<uint32_t>(key >> 3);
        wire = static_cast<int>(key & 7);
        if ((key >> 3) == 0 || (key >> 3) > 0x1fffffff) fail(std::string("invalid field number in ") + where_);
        return true;
    }

private:
    [[noreturn]] void truncated() { fail(std::string("truncated ") + where_ + " at byte " + std::to_string(pos_)); }
    const uint8_t *b_;
    size_t pos_, end_;
    const char *where_;
};

inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(n) * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        std::memcpy(&v, p, n);
        h = (h ^ v) * 0x94d049bb133111ebull;
        h ^= h >> 31;
    }
    h *= 0xd6e8feb86659fd93ull;
    h ^= h >> 32;
    return h;
}

inline size_t one_char_len(uint8_t lead) { return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[lead >> 4]; }

const uint8_t kWS[3] = {0xE2, 0x96, 0x81};  // U+2581

// ------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------

struct Piece {
    uint32_t off, len;
    float score;
};

// Open addressing over uint32 slots: low `id_bits` bits hold id + 1 (0 = empty), the rest a
// tag from the hash, so most mismatches are rejected without touching the piece bytes.
class Table {
public:
    void init(size_t count, size_t n_pieces) {
        size_t cap = 16;
        while (cap < count * 2) cap <<= 1;
        slots_.assign(cap, 0);
        mask_ = cap - 1;
        id_bits_ = 1;
        while (id_bits_ < 32 && (uint64_t(1) << id_bits_) <= n_pieces) ++id_bits_;
        id_mask_ = id_bits_ >= 32 ? 0xffffffffu : ((uint32_t(1) << id_bits_) - 1);
    }
    // returns the id already stored under these bytes, or -1 after inserting `id`
    int64_t insert(uint32_t id, const uint8_t *p, size_t n, uint64_t h, const uint8_t *base, const Piece *pieces) {
        uint32_t tag = tag_of(h);
        for (size_t i = h & mask_;; i = (i + 1) & mask_) {
            uint32_t s = slots_[i];
            if (s == 0) {
                slots_[i] = tag | (id + 1);
                return -1;
            }
            if ((s & ~id_mask_) == tag) {
                const Piece &q = pieces[(s & id_mask_) - 1];
                if (q.len == n && std::memcmp(base + q.off, p, n) == 0) return (s & id_mask_) - 1;
            }
        }
    }
    int64_t find(const uint8_t *p, size_t n, uint64_t h, const uint8_t *base, const Piece *pieces) const {
        uint32_t tag = tag_of(h);
        for (size_t i = h & mask_;; i = (i + 1) & mask_) {
            uint32_t s = slots_[i];
            if (s == 0) return -1;
            if ((s & ~id_mask_) == tag) {
                const Piece &q = pieces[(s & id_mask_) - 1];
                if (q.len == n && std::memcmp(base + q.off, p, n) == 0) return (s & id_mask_) - 1;
            }
        }
    }
    size_t bytes() const { return slots_.capacity() * sizeof(uint32_t); }

private:
    uint32_t tag_of(uint64_t h) const { return id_bits_ >= 32 ? 0 : static_cast<uint32_t>(h >> 32) & ~id_mask_; }
    std::vector<uint32_t> slots_;
    size_t mask_ = 0;
    int id_bits_ = 32;
    uint32_t id_mask_ = 0xffffffffu;
};

// Trie of the USER_DEFINED pieces: children of a node are contiguous and sorted by label.
struct TrieNode {
    uint32_t first;     // index of the first child
    int32_t piece;      // piece id ending here, -1 if none
    uint16_t nchild;
    uint8_t label;
};

struct Sym {
    int32_t prev, next;
    uint32_t start, len;
    bool freeze;
};

// A merge candidate. `key` orders candidates as sentencepiece does (higher score first, then
// the leftmost): the score's bits made monotone above the complemented left index, so a
// max-heap on `key` pops them in its order. -0.0 ranks below 0.0, which is what sentencepiece
// 0.2 does too (tests/test_native_tokenizer.py has such ties).
struct Pair {
    uint64_t key;
    int32_t right;
    uint32_t size;
    int32_t left() const { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key)); }
};

inline uint64_t pair_key(float score, int32_t left) {
    uint32_t b;
    std::memcpy(&b, &score, 4);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (static_cast<uint64_t>(b) << 32) | (0xffffffffu - static_cast<uint32_t>(left));
}

// A 4-ary max-heap on Pair::key: half the levels of a binary heap, which matters once a long
// run of text has a million candidates. (Any correct heap pops the same merges: two live
// candidates never share a key.)
class PairHeap {
public:
    bool empty() const { return v_.empty(); }
    void clear() { v_.clear(); }
    void push_unordered(const Pair &p) { v_.push_back(p); }
    void heapify() {
        if (v_.size() < 2) return;
        for (size_t i = (v_.size() - 2) / 4 + 1; i-- > 0;) sift_down(i);
    }
    void push(const Pair &p) {
        size_t i = v_.size();
        v_.push_back(p);
        while (i > 0) {
            size_t parent = (i - 1) / 4;
            if (v_[parent].key >= p.key) break;
            v_[i] = v_[parent];
            i = parent;
        }
        v_[i] = p;
    }
    Pair pop() {
        Pair top = v_[0];
        Pair last = v_.back();
        v_.pop_back();
        if (!v_.empty()) {
            v_[0] = last;
            sift_down(0);
        }
        return top;
    }

private:
    void sift_down(size_t i) {
        const size_t n = v_.size();
        const Pair x = v_[i];
        for (;;) {
            size_t c = 4 * i + 1;
            if (c >= n) break;
            size_t best = c;
            const size_t end = std::min(c + 4, n);
            for (size_t k = c + 1; k < end; ++k)
                if (v_[k].key > v_[best].key) best = k;
            if (v_[best].key <= x.key) break;
            v_[i] = v_[best];
            i = best;
        }
        v_[i] = x;
    }
    std::vector<Pair> v_;
};

class Model {
public:
    explicit Model(py::object data) {
        if (PyObject_GetBuffer(data.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
        have_view_ = true;
        owner_ = data;
        base_ = static_cast<const uint8_t *>(view_.buf);
        size_ = static_cast<size_t>(view_.len);
        try {
            parse();
            build();
        } catch (...) {
            release();
            throw;
        }
    }
    ~Model() { release(); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;

    size_t size() const { return pieces_.size(); }
    int unk_id() const { return unk_id_public_; }
    int model_unk_id() const { return unk_id_; }
    bool byte_fallback() const { return byte_fallback_; }
    bool add_dummy_prefix() const { return add_dummy_prefix_; }

    size_t check_id(int64_t i) const {
        if (i < 0 || static_cast<uint64_t>(i) >= pieces_.size())
            throw py::index_error("token id " + std::to_string(i) + " is out of range (vocabulary of " +
                                  std::to_string(pieces_.size()) + ")");
        return static_cast<size_t>(i);
    }
    py::bytes id_to_piece(int64_t i) const {
        const Piece &p = pieces_[check_id(i)];
        return py::bytes(reinterpret_cast<const char *>(base_ + p.off), p.len);
    }
    int piece_type(int64_t i, bool plain) const { return type_of(static_cast<int32_t>(check_id(i)), plain); }
    float piece_score(int64_t i) const { return pieces_[check_id(i)].score; }
    // the exact id of a piece (reserved pieces first, as PieceToId), -1 if there is none
    int64_t piece_to_id(py::bytes b) const {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
        return piece_id(reinterpret_cast<const uint8_t *>(p), static_cast<size_t>(n));
    }
    py::list control_ids() const {
        py::list out;
        for (int32_t i : control_ids_) out.append(i);
        return out;
    }
    size_t memory_bytes() const {
        return pieces_.capacity() * sizeof(Piece) + flags_.capacity() + normal_.bytes() + reserved_.bytes() +
               trie_.capacity() * sizeof(TrieNode) + control_ids_.capacity() * sizeof(int32_t);
    }

    py::list encode(py::handle text, bool plain) const {
        if (!PyUnicode_Check(text.ptr())) throw py::type_error("encode() takes a str");
        py::object holder;  // a temporary UTF-8 copy for non-ASCII text
        const char *s;
        Py_ssize_t n;
        if (PyUnicode_IS_COMPACT_ASCII(text.ptr())) {
            s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);  // the str's own buffer, no copy
            if (!s) throw py::error_already_set();
        } else {
            PyObject *b = PyUnicode_AsUTF8String(text.ptr());  // UnicodeEncodeError on lone surrogates
            if (!b) throw py::error_already_set();
            holder = py::reinterpret_steal<py::object>(b);
            s = PyBytes_AS_STRING(b);
            n = PyBytes_GET_SIZE(b);
        }
        std::vector<int32_t> ids;
        {
            py::gil_scoped_release nogil;
            encode_utf8(reinterpret_cast<const uint8_t *>(s), static_cast<size_t>(n), plain, ids);
        }
        py::list out(ids.size());
        for (size_t i = 0; i < ids.size(); ++i) {
            PyObject *v = PyLong_FromLong(ids[i]);
            if (!v) throw py::error_already_set();
            PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);
        }
        return out;
    }

    // normalized text (for tests)
    py::bytes normalize(py::str text, bool plain) const {
        std::string u = text;  // UTF-8
        std::vector<uint8_t> out;
        normalize_utf8(reinterpret_cast<const uint8_t *>(u.data()), u.size(), plain, out);
        return py::bytes(reinterpret_cast<const char *>(out.data()), out.size());
    }

private:
    // -------------------------------------------------------------------------- parsing

    void parse() {
        if (size_ >= 0xffffffffu) fail("larger than 4 GiB");
        // first pass: count the pieces, so the arrays are allocated once
        size_t n_pieces = 0;
        {
            Wire w(base_, 0, size_, "ModelProto");
            uint32_t f;
            int wt;
            while (w.next(f, wt)) {
                if (f == 1 && wt == 2) ++n_pieces;
                w.skip(wt);
            }
        }
        if (n_pieces == 0) fail("it has no pieces (is this a SentencePiece model?)");
        if (n_pieces >= 0x7fffffffu) fail("too many pieces");
        pieces_.reserve(n_pieces);
        flags_.reserve(n_pieces);
        Wire w(base_, 0, size_, "ModelProto");
        uint32_t f;
        int wt;
        while (w.next(f, wt)) {
            if (wt == 2 && (f == 1 || f == 2 || f == 3)) {
                Span s = w.bytes();
                if (f == 1)
                    parse_piece(s);
                else if (f == 2)
                    parse_trainer(s);
                else
                    parse_normalizer(s);
            } else {
                w.skip(wt);
            }
        }
    }

    void parse_piece(Span s) {
        Wire w(base_, s.off, s.off + s.len, "a SentencePiece message");
        Span piece;
        uint32_t score_bits = 0;
        uint8_t type = NORMAL;
        uint32_t f;
        int wt;
        while (w.next(f, wt)) {
            if (f == 1 && wt == 2) {
                piece = w.bytes();
            } else if (f == 2 && wt == 5) {
                score_bits = w.fixed32();
            } else if (f == 3 && wt == 0) {
                uint64_t t = w.varint();
                if (t >= 1 && t <= 6) type = static_cast<uint8_t>(t);  // unknown enum values are ignored, as protobuf does
            } else {
                w.skip(wt);
            }
        }
        float score;
        std::memcpy(&score, &score_bits, 4);
        pieces_.push_back(Piece{static_cast<uint32_t>(piece.off), static_cast<uint32_t>(piece.len), score});
        flags_.push_back(type);
    }

    void parse_trainer(Span s) {
        Wire w(base_, s.off, s.off + s.len, "trainer_spec");
        uint32_t f;
        int wt;
        while (w.next(f, wt)) {
            if (wt == 0 && (f == 3 || f == 24 || f == 35)) {
                uint64_t v = w.varint();
                if (f == 3)
                    model_type_ = static_cast<int32_t>(static_cast<uint32_t>(v));
                else if (f == 24)
                    ws_as_suffix_ = v != 0;
                else
                    byte_fallback_ = v != 0;
            } else if (wt == 2 && f == 30) {
                control_symbols_.push_back(w.bytes());
            } else if (wt == 2 && f == 45) {
                unk_piece_ = w.bytes();
                have_unk_piece_ = true;
            } else {
                w.skip(wt);
            }
        }
    }

    void parse_normalizer(Span s) {
        Wire w(base_, s.off, s.off + s.len, "normalizer_spec");
        uint32_t f;
        int wt;
        while (w.next(f, wt)) {
            if (wt == 0 && f >= 3 && f <= 5) {
                bool v = w.varint() != 0;
                (f == 3 ? add_dummy_prefix_ : f == 4 ? remove_extra_ws_ : escape_ws_) = v;
            } else if (wt == 2 && f == 2) {
                charsmap_len_ = w.bytes().len;
            } else {
                w.skip(wt);
            }
        }
    }

    // -------------------------------------------------------------------------- tables

    std::string piece_str(size_t i) const { return printable(base_ + pieces_[i].off, pieces_[i].len); }

    void build() {
        if (model_type_ != kModelTypeBPE)
            fail(std::string("model type ") +
                 (model_type_ == kModelTypeUnigram ? "UNIGRAM" : std::to_string(model_type_)) +
                 " is not supported (edgelm encodes BPE models)");
        if (charsmap_len_ != 0)
            fail("normalizer_spec.precompiled_charsmap is not empty; only identity normalization is supported");
        const size_t n = pieces_.size();
        size_t n_normal = 0, n_reserved = 0;
        for (size_t i = 0; i < n; ++i) {
            uint8_t t = flags_[i];
            (t == NORMAL || t == USER_DEFINED || t == UNUSED ? n_normal : n_reserved)++;
        }
        normal_.init(n_normal, n);
        reserved_.init(n_reserved, n);
        std::vector<bool> byte_found(256, false);
        std::vector<uint32_t> user;
        for (size_t i = 0; i < n; ++i) {
            const Piece &p = pieces_[i];
            if (p.len == 0) fail("piece " + std::to_string(i) + " is empty (pieces[" + std::to_string(i) + "].piece)");
            const uint8_t t = flags_[i];
            const uint8_t *b = base_ + p.off;
            const bool normal = t == NORMAL || t == USER_DEFINED || t == UNUSED;
            const uint64_t h = hash_bytes(b, p.len);
            // one spelling, one piece: sentencepiece 0.2 rejects a repeat even across the two maps
            int64_t dup = (normal ? reserved_ : normal_).find(b, p.len, h, base_, pieces_.data());
            if (dup < 0) dup = (normal ? normal_ : reserved_).insert(static_cast<uint32_t>(i), b, p.len, h, base_, pieces_.data());
            if (dup >= 0)
                fail("piece \"" + piece_str(i) + "\" is defined twice (ids " + std::to_string(dup) + " and " +
                     std::to_string(i) + ")");
            if (t == USER_DEFINED) {
                if (std::memchr(b, 0, p.len))
                    fail("user-defined piece " + std::to_string(i) + " contains a NUL byte");
                user.push_back(static_cast<uint32_t>(i));
            } else if (t == UNUSED) {
                has_unused_ = true;
            } else if (t == UNKNOWN) {
                if (unk_id_ >= 0) fail("two UNKNOWN pieces (ids " + std::to_string(unk_id_) + " and " + std::to_string(i) + ")");
                unk_id_ = static_cast<int32_t>(i);
            } else if (t == BYTE) {
                if (!byte_fallback_)
                    fail("byte piece \"" + piece_str(i) + "\" is present although trainer_spec.byte_fallback is false");
                int v = byte_of(b, p.len);
                if (v < 0) fail("byte piece \"" + piece_str(i) + "\" is not of the form <0xNN>");
                byte_found[v] = true;
            }
        }
        if (unk_id_ < 0) fail("it has no UNKNOWN piece");
        if (byte_fallback_) {
            for (int v = 0; v < 256; ++v) {
                if (!byte_found[v]) fail("trainer_spec.byte_fallback is set but byte piece <0x" + hex2(v) + "> is missing");
                char name[7];
                std::snprintf(name, sizeof name, "<0x%02X>", v);
                byte_ids_[v] = static_cast<int32_t>(piece_id(reinterpret_cast<const uint8_t *>(name), 6));
            }
        }
        // trainer_spec.unk_piece (default "<unk>") names the unknown piece SentencePieceProcessor::unk_id() reports
        {
            const uint8_t *up = reinterpret_cast<const uint8_t *>("<unk>");
            size_t ul = 5;
            if (have_unk_piece_ && unk_piece_.len) {
                up = base_ + unk_piece_.off;
                ul = unk_piece_.len;
            }
            int64_t id = piece_id(up, ul);
            if (id < 0) id = unk_id_;  // PieceToId's default
            unk_id_public_ = (flags_[id] & kTypeMask) == UNKNOWN ? static_cast<int32_t>(id) : -1;
        }
        // control symbols: matched in text as USER_DEFINED pieces, not in plain mode
        for (const Span &c : control_symbols_) {
            const uint8_t *b = base_ + c.off;
            int64_t id = piece_id(b, c.len);
            if (id < 0) continue;
            if (std::find(control_ids_.begin(), control_ids_.end(), id) == control_ids_.end())
                control_ids_.push_back(static_cast<int32_t>(id));
            if ((flags_[id] & kTypeMask) == USER_DEFINED) flags_[id] |= kPlainControl;
        }
        control_symbols_.clear();
        control_symbols_.shrink_to_fit();
        build_trie(user);
    }

    static std::string hex2(int v) {
        char b[3];
        std::snprintf(b, sizeof b, "%02X", v);
        return b;
    }
    static int byte_of(const uint8_t *b, size_t n) {  // "<0xNN>", upper-case hex, as ByteToPiece writes it
        if (n != 6 || std::memcmp(b, "<0x", 3) != 0 || b[5] != '>') return -1;
        auto hv = [](uint8_t c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
        int hi = hv(b[3]), lo = hv(b[4]);
        return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
    }

    void build_trie(std::vector<uint32_t> &user) {
        const uint8_t *base = base_;
        const Piece *pc = pieces_.data();
        std::sort(user.begin(), user.end(), [base, pc](uint32_t a, uint32_t b) {
            const Piece &x = pc[a], &y = pc[b];
            int c = std::memcmp(base + x.off, base + y.off, std::min(x.len, y.len));
            return c < 0 || (c == 0 && x.len < y.len);
        });
        std::fill(std::begin(root_), std::end(root_), -1);
        trie_.clear();
        if (user.empty()) return;
        trie_.push_back(TrieNode{0, -1, 0, 0});  // the root
        struct Job {
            uint32_t node;
            size_t lo, hi, depth;
        };
        std::vector<Job> queue{{0, 0, user.size(), 0}};
        for (size_t q = 0; q < queue.size(); ++q) {
            Job j = queue[q];
            size_t lo = j.lo;
            if (pc[user[lo]].len == j.depth) {  // the (unique) key that ends here sorts first
                trie_[j.node].piece = static_cast<int32_t>(user[lo]);
                ++lo;
            }
            const uint32_t first = static_cast<uint32_t>(trie_.size());
            uint32_t count = 0;
            for (size_t k = lo; k < j.hi;) {
                const uint8_t label = base[pc[user[k]].off + j.depth];
                size_t e = k + 1;
                while (e < j.hi && base[pc[user[e]].off + j.depth] == label) ++e;
                const uint32_t child = static_cast<uint32_t>(trie_.size());
                trie_.push_back(TrieNode{0, -1, 0, label});
                if (j.node == 0) root_[label] = static_cast<int32_t>(child);
                queue.push_back(Job{child, k, e, j.depth + 1});
                ++count;
                k = e;
            }
            trie_[j.node].first = first;
            trie_[j.node].nchild = static_cast<uint16_t>(count);  // <= 256
        }
        trie_.shrink_to_fit();
    }

    // -------------------------------------------------------------------------- lookups

    uint8_t type_of(int32_t id, bool plain) const {
        uint8_t f = flags_[id];
        return plain && (f & kPlainControl) ? CONTROL : (f & kTypeMask);
    }
    // PieceToId without the unk default: reserved pieces first, -1 if none
    int64_t piece_id(const uint8_t *p, size_t n) const {
        uint64_t h = hash_bytes(p, n);
        int64_t id = reserved_.find(p, n, h, base_, pieces_.data());
        if (id >= 0) return id;
        return normal_.find(p, n, h, base_, pieces_.data());
    }
    // a piece a merge may produce (SentencePiece's pieces_ map)
    int64_t merge_id(const uint8_t *p, size_t n, bool plain) const {
        int64_t id = normal_.find(p, n, hash_bytes(p, n), base_, pieces_.data());
        if (id >= 0 && plain && (flags_[id] & kPlainControl)) return -1;
        return id;
    }

    // longest active user-defined piece at the start of [p, p+n); 0 if none
    size_t prefix_match(const uint8_t *p, size_t n, bool plain) const {
        if (trie_.empty() || n == 0) return 0;
        int32_t node = root_[p[0]];
        size_t best = 0;
        size_t i = 0;
        while (node >= 0) {
            ++i;
            const TrieNode &t = trie_[node];
            if (t.piece >= 0 && !(plain && (flags_[t.piece] & kPlainControl))) best = i;
            if (i == n || t.nchild == 0) break;
            const uint8_t c = p[i];
            const TrieNode *lo = &trie_[t.first], *hi = lo + t.nchild;
            const TrieNode *it = std::lower_bound(lo, hi, c, [](const TrieNode &a, uint8_t v) { return a.label < v; });
            node = (it != hi && it->label == c) ? static_cast<int32_t>(it - trie_.data()) : -1;
        }
        return best;
    }

    // -------------------------------------------------------------------------- encoding

    void append_ws(std::vector<uint8_t> &out) const {
        if (escape_ws_)
            out.insert(out.end(), kWS, kWS + 3);
        else
            out.push_back(' ');
    }

    void normalize_utf8(const uint8_t *s, size_t n, bool plain, std::vector<uint8_t> &out) const {
        out.clear();
        if (n == 0) return;
        const bool dummy = add_dummy_prefix_;
        if (!remove_extra_ws_) {
            // with identity normalization every segment is copied as is: no need to segment
            size_t spaces = 0;
            if (escape_ws_)
                for (size_t i = 0; i < n; ++i) spaces += s[i] == ' ';
            out.reserve(n + 2 * spaces + (dummy ? 3 : 0));
            if (dummy && !ws_as_suffix_) append_ws(out);
            if (!escape_ws_ || spaces == 0) {
                out.insert(out.end(), s, s + n);
            } else {
                for (size_t i = 0; i < n; ++i) {
                    if (s[i] == ' ')
                        out.insert(out.end(), kWS, kWS + 3);
                    else
                        out.push_back(s[i]);
                }
            }
            if (dummy && ws_as_suffix_) append_ws(out);
            return;
        }
        // remove_extra_whitespaces: Normalizer::Normalize's rule over its segments (a
        // user-defined piece matched in the raw text, else one character)
        auto seg_len = [&](size_t pos) {
            size_t m = prefix_match(s + pos, n - pos, plain);
            return m ? m : std::min(one_char_len(s[pos]), n - pos);
        };
        size_t pos = 0;
        while (pos < n) {  // leading spaces
            size_t m = seg_len(pos);
            if (!(m == 1 && s[pos] == ' ')) break;
            pos += m;
        }
        if (pos == n) return;
        out.reserve((n - pos) * 3 + 3);
        if (dummy && !ws_as_suffix_) append_ws(out);
        bool prev_space = true;
        while (pos < n) {
            size_t m = seg_len(pos);
            const uint8_t *sp = s + pos;
            size_t len = m;
            while (prev_space && len && sp[0] == ' ') {
                ++sp;
                --len;
            }
            if (len) {
                for (size_t k = 0; k < len; ++k) {
                    if (escape_ws_ && sp[k] == ' ')
                        out.insert(out.end(), kWS, kWS + 3);
                    else
                        out.push_back(sp[k]);
                }
                prev_space = sp[len - 1] == ' ';
            }
            pos += m;
        }
        if (escape_ws_) {
            while (out.size() >= 3 && std::memcmp(out.data() + out.size() - 3, kWS, 3) == 0) out.resize(out.size() - 3);
        } else {
            while (!out.empty() && out.back() == ' ') out.pop_back();
        }
        if (dummy && ws_as_suffix_) append_ws(out);
    }

    void encode_utf8(const uint8_t *text, size_t n, bool plain, std::vector<int32_t> &ids) const {
        std::vector<uint8_t> norm;
        normalize_utf8(text, n, plain, norm);
        encode_normalized(norm.data(), norm.size(), plain, ids);
    }

    void encode_normalized(const uint8_t *s, size_t n, bool plain, std::vector<int32_t> &ids) const {
        ids.clear();
        if (n == 0) return;
        if (n >= 0x7fffffffu) throw std::length_error("text too long to tokenize (2 GiB or more)");
        std::vector<Sym> sym;
        sym.reserve(n / 2 + 16);
        for (size_t pos = 0; pos < n;) {
            size_t m = prefix_match(s + pos, n - pos, plain);
            bool freeze = m > 0;
            if (!freeze) m = std::min(one_char_len(s[pos]), n - pos);
            const int32_t idx = static_cast<int32_t>(sym.size());
            sym.push_back(Sym{idx - 1, pos + m < n ? idx + 1 : -1, static_cast<uint32_t>(pos), static_cast<uint32_t>(m), freeze});
            pos += m;
        }

        PairHeap heap;
        bool initial = false;  // collecting a run's first candidates (heapified at once)
        // UNUSED piece id -> length of the left half of the last pair pushed that spells it
        // (bpe_model.cc's rev_merge, keyed by the piece: the last push wins)
        std::unordered_map<int32_t, uint32_t> rev_merge;
        auto add_pair = [&](int32_t l, int32_t r) {
            if (l < 0 || r < 0 || sym[l].freeze || sym[r].freeze) return;
            const uint32_t len = sym[l].len + sym[r].len;
            int64_t id = merge_id(s + sym[l].start, len, plain);
            if (id < 0) return;
            const Pair p{pair_key(pieces_[id].score, l), r, len};
            if (initial)
                heap.push_unordered(p);
            else
                heap.push(p);
            if ((flags_[id] & kTypeMask) == UNUSED) rev_merge[static_cast<int32_t>(id)] = sym[l].len;
        };
        // Frozen symbols never take part in a pair, so the runs between them merge
        // independently and each can have its own (small, cache-resident) heap: the merges
        // of one run come out in the same order as from SentencePiece's single heap. With
        // UNUSED pieces the order of pushes across runs matters (rev_merge keeps the last),
        // so such models use one heap for the whole text, as SentencePiece does.
        const int32_t nsym = static_cast<int32_t>(sym.size());
        for (int32_t a = 0; a < nsym;) {
            int32_t b = a + 1;
            if (has_unused_)
                b = nsym;
            else if (!sym[a].freeze)
                while (b < nsym && !sym[b].freeze) ++b;
            heap.clear();
            initial = true;
            for (int32_t i = a + 1; i < b; ++i) add_pair(i - 1, i);
            initial = false;
            heap.heapify();
            while (!heap.empty()) {
                const Pair top = heap.pop();
                const int32_t left = top.left();
                Sym &L = sym[left];
                Sym &R = sym[top.right];
                if (L.len == 0 || R.len == 0 || L.len + R.len != top.size) continue;  // stale
                L.len += R.len;
                L.next = R.next;
                if (R.next >= 0) sym[R.next].prev = left;
                R.len = 0;
                add_pair(L.prev, left);
                add_pair(left, L.next);
            }
            a = b;
        }

        ids.reserve(sym.size());
        bool prev_unk = false;
        auto emit = [&](uint32_t start, uint32_t len, int32_t id) {
            uint8_t t = type_of(id, plain);
            // CONTROL: a one-character control symbol in plain mode (SentencePiece fails the
            // whole call there); read as text, i.e. like an unknown piece
            const bool unk = t == UNKNOWN || t == CONTROL;
            if (unk && byte_fallback_) {
                for (uint32_t k = 0; k < len; ++k) ids.push_back(byte_ids_[s[start + k]]);
            } else if (unk) {
                if (!prev_unk) ids.push_back(unk_id_);  // a run of unknown pieces is one unk
            } else {
                ids.push_back(id);
            }
            prev_unk = unk;
        };
        std::vector<std::pair<uint32_t, uint32_t>> stack;
        for (int32_t i = 0; i != -1; i = sym[i].next) {
            stack.assign(1, {sym[i].start, sym[i].len});
            while (!stack.empty()) {
                auto [start, len] = stack.back();
                stack.pop_back();
                int64_t id = piece_id(s + start, len);
                if (id < 0) id = unk_id_;
                if (type_of(static_cast<int32_t>(id), plain) == UNUSED) {
                    auto it = rev_merge.find(static_cast<int32_t>(id));
                    if (it != rev_merge.end()) {  // split where that pair did; left half first
                        const uint32_t ll = it->second;
                        stack.push_back({start + ll, len - ll});
                        stack.push_back({start, ll});
                        continue;
                    }
                }
                emit(start, len, static_cast<int32_t>(id));
            }
        }
    }

    void release() {
        if (have_view_) {
            PyBuffer_Release(&view_);
            have_view_ = false;
        }
    }

    Py_buffer view_{};
    bool have_view_ = false;
    py::object owner_;
    const uint8_t *base_ = nullptr;
    size_t size_ = 0;

    std::vector<Piece> pieces_;
    std::vector<uint8_t> flags_;  // type | kPlainControl
    Table normal_, reserved_;
    std::vector<TrieNode> trie_;
    int32_t root_[256];
    std::vector<int32_t> control_ids_;
    std::vector<Span> control_symbols_;
    int32_t byte_ids_[256] = {};
    int32_t unk_id_ = -1, unk_id_public_ = -1;
    bool has_unused_ = false;

    int32_t model_type_ = kModelTypeUnigram;
    bool byte_fallback_ = false, ws_as_suffix_ = false;
    Span unk_piece_;
    bool have_unk_piece_ = false;
    bool add_dummy_prefix_ = true, remove_extra_ws_ = true, escape_ws_ = true;
    size_t charsmap_len_ = 0;
};

}  // namespace

PYBIND11_MODULE(_tok, m) {
    m.doc() = "SentencePiece-compatible BPE encoder over a serialized ModelProto (edgelm/_native/tokenizer.cpp)";
    py::class_<Model>(m, "BPEModel")
        .def(py::init<py::object>(), py::arg("data"),
             "Parse a serialized sentencepiece ModelProto (any buffer: bytes, a memoryview of an mmap); "
             "the buffer is held, not copied. ValueError if it is malformed or not a supported BPE model.")
        .def_property_readonly("size", &Model::size)
        .def_property_readonly("unk_id", &Model::unk_id, "SentencePieceProcessor.unk_id(): the piece trainer_spec.unk_piece names, or -1")
        .def_property_readonly("model_unk_id", &Model::model_unk_id, "the UNKNOWN piece (what unknown text maps to)")
        .def_property_readonly("byte_fallback", &Model::byte_fallback)
        .def_property_readonly("add_dummy_prefix", &Model::add_dummy_prefix)
        .def_property_readonly("memory_bytes", &Model::memory_bytes, "bytes allocated for the tables (the pieces stay in the buffer)")
        .def("encode", &Model::encode, py::arg("text"), py::arg("plain") = false,
             "Token ids of `text` (str). plain=True: control symbols are not matched in text.")
        .def("normalize", &Model::normalize, py::arg("text"), py::arg("plain") = false)
        .def("id_to_piece", &Model::id_to_piece, py::arg("id"))
        .def("piece_type", &Model::piece_type, py::arg("id"), py::arg("plain") = false)
        .def("piece_score", &Model::piece_score, py::arg("id"))
        .def("piece_to_id", &Model::piece_to_id, py::arg("piece"), "the id of the piece spelled exactly so, -1 if none")
        .def("control_ids", &Model::control_ids, "ids of the pieces listed in trainer_spec.control_symbols");
}
