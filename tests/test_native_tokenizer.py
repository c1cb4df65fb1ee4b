"""edgelm._native._tok, the native BPE encoder behind ``sentencepiece-model`` tokenizers,
against the ``sentencepiece`` library (the test-only reference) on the same model bytes:
Gemma 3's real 262k vocabulary over wikitext-2 and generated text, random tiny
vocabularies (score ties, UNUSED, user-defined and control pieces, normalizer options),
malformed models, memory and the zero-copy path. No network."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelm._native import _tok
from edgelm.errors import FormatError
from edgelm.tokenizer import KIND_SENTENCEPIECE, Tokenizer
from edgelm.tokenizer.build import _build_spm_model, tokenizer_from_gguf
from edgelm.tokenizer.wire import _plain_text_model
from tests.test_tokenizer import PLAIN_TEXTS, TEXTS

spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parents[1]
# the corpus `eval ppl` and benchmarks/peers.py use, when this checkout has it
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"

LITERALS = ["<start_of_turn>", "<end_of_turn>", "<unk>", "<unused5>", "<bos>", "<eos>", "<pad>", "<mask>",
            "<b>", "</b>", "<table>", "<td>", "</td>", "[multimodal]", "<start_of_image>", "<0x41>", "<unused6241>",
            "\n", "\n\n\n", "\t\t", "\u2581", "\u2581\u2581", "  ", "<", ">", "<unk", "unk>", "<<unk>>"]


def _ref_encode(sp, text: str, unk_piece: str | None) -> list[int]:
    """What the sentencepiece-based backend returned: <unk> literals split out in Python."""
    if unk_piece and unk_piece in text:
        out: list[int] = []
        for k, part in enumerate(text.split(unk_piece)):
            if k:
                out.append(sp.unk_id())
            if part:
                out.extend(sp.encode(part))
        return out
    return sp.encode(text)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [
        (0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E),  # mostly ASCII
        (0x00, 0x1F), (0x7F, 0x9F),  # control characters
        (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
        (0x300, 0x36F),  # combining marks
        (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),  # kana, CJK, Hangul
        (0x2000, 0x206F), (0x2580, 0x259F), (0x3000, 0x3000),  # punctuation, blocks (U+2581), ideographic space
        (0xE000, 0xE0FF), (0xFFF0, 0xFFFF),  # private use, specials (U+FFFD, U+FFFE, U+FFFF)
        (0x1F300, 0x1FAFF), (0x1F1E6, 0x1F1FF), (0xFE00, 0xFE0F), (0x200B, 0x200D),  # emoji, flags, VS, ZW*
        (0x20000, 0x2A6DF), (0x10FFF0, 0x10FFFF),  # CJK ext. B, the last code points
    ]
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(LITERALS))
        elif r < 0.16:
            out.append(rng.choice(" \t\n\r") * rng.randint(1, 40))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _varied_texts(vocab_pieces: list[str], seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    texts = list(TEXTS) + list(PLAIN_TEXTS) + LITERALS + ["", " ", "x"]
    texts += [_random_unicode(rng, rng.randint(1, 300)) for _ in range(300)]
    for _ in range(300):  # vocabulary pieces glued together: merge order and tie-breaking
        texts.append("".join(rng.choice(vocab_pieces) for _ in range(rng.randint(1, 15))).replace("\u2581", " "))
    texts += ["".join(rng.choice(LITERALS) for _ in range(20)) for _ in range(20)]
    texts += [" " * k for k in (1, 2, 3, 31, 32, 33, 100)] + ["\n" * k for k in (1, 31, 32, 100)]
    return texts


# ------------------------------------------------------------------------------ real vocabulary


@pytest.fixture(scope="module")
def real_blob(real_gguf):
    return tokenizer_from_gguf(real_gguf)


@pytest.fixture(scope="module")
def real(real_blob):
    """(native model, sentencepiece, sentencepiece on the plain-text model, Tokenizer)."""
    kind, data, special = real_blob
    return (_tok.BPEModel(data), spm.SentencePieceProcessor(model_proto=data),
            spm.SentencePieceProcessor(model_proto=_plain_text_model(data)), Tokenizer.from_blob(kind, data, special))


def _kind(sp, i: int) -> str:
    return ("unknown" if sp.is_unknown(i) else "control" if sp.is_control(i) else "byte" if sp.is_byte(i) else
            "unused" if sp.is_unused(i) else "text")


NATIVE_KIND = {1: "text", 2: "unknown", 3: "control", 4: "text", 5: "unused", 6: "byte"}


def test_real_vocabulary_tables_match(real, real_blob):
    m, sp, psp, tok = real
    assert m.size == sp.get_piece_size() == tok.vocab_size == 262144
    assert m.unk_id == sp.unk_id() == 3 and m.byte_fallback and not m.add_dummy_prefix
    for i in range(m.size):
        piece = sp.id_to_piece(i)
        assert tok.id_to_piece(i) == piece
        assert tok.token_to_id(piece) == i
        assert m.piece_score(i) == sp.get_score(i)
        assert NATIVE_KIND[m.piece_type(i)] == _kind(sp, i), i
        assert NATIVE_KIND[m.piece_type(i, True)] == _kind(psp, i), i
    # what the sentencepiece backend gave: the control symbols that name a piece
    from edgelm.tokenizer.wire import _control_symbols

    controls = _control_symbols(real_blob[1])
    assert tok._b.special_ids() == {sp.piece_to_id(s) for s in controls if sp.id_to_piece(sp.piece_to_id(s)) == s}
    for bad in (-1, m.size, 2**40):
        with pytest.raises(IndexError):
            tok.id_to_piece(bad)
        with pytest.raises(IndexError):
            tok.token_bytes(bad)
    for bad in (-1, m.size):
        with pytest.raises(IndexError):
            m.id_to_piece(bad)
    assert tok.token_to_id("\ud800") is None and tok.token_to_id("") is None
    assert tok.token_bytes(238 + 0x41) == b"A" and tok.token_bytes(tok.token_to_id("\u2581the")) == b" the"


def test_real_vocabulary_varied_text(real):
    m, sp, psp, tok = real
    rng = random.Random(3)
    pieces = [sp.id_to_piece(i) for i in rng.sample(range(sp.get_piece_size()), 5000)]
    texts = _varied_texts(pieces)
    ref = sp.encode(texts)
    ref_plain = psp.encode(texts)
    for t, r, rp in zip(texts, ref, ref_plain):
        assert m.encode(t) == r, t
        assert m.encode(t, True) == rp, t
        assert tok.encode(t) == _ref_encode(sp, t, "<unk>"), t
        assert tok.encode(t, parse_special=False) == rp, t
        if "\u2581" not in t:  # a literal U+2581 decodes as a space, as it always did
            assert tok.decode(tok.encode(t)) == t and tok.decode(rp) == t, t


def test_real_vocabulary_long_inputs(real):
    m, sp, psp, tok = real
    rng = random.Random(11)
    long_texts = [
        _random_unicode(rng, 100_000),
        "a" * 100_000,
        " " * 100_000,
        "\n" * 100_000,
        "<unk>" * 20_000,
        ("The quick brown fox jumps over the lazy dog. " * 2300)[:100_000],  # one line, no frozen symbols
        "".join(rng.choice(["ab", "a b", "\u2581", "  ", "<b>", "x<unused5>y", "😀"]) for _ in range(40_000)),
    ]
    for t in long_texts:
        assert m.encode(t) == sp.encode(t)
        assert m.encode(t, True) == psp.encode(t)
        assert tok.encode(t) == _ref_encode(sp, t, "<unk>")


def test_real_vocabulary_wikitext(real):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is not in this checkout")
    m, sp, psp, tok = real
    text = WIKITEXT.read_text(encoding="utf-8")
    assert len(text) > 1_000_000 and "<unk>" in text
    t0 = time.perf_counter()
    plain = tok.encode(text, parse_special=False)  # what `eval ppl` does
    t1 = time.perf_counter()
    ref = psp.encode(text)
    t2 = time.perf_counter()
    assert plain == ref
    print(f"wikitext-2 test ({len(text)} chars, {len(ref)} tokens): native {t1 - t0:.2f} s, sentencepiece {t2 - t1:.2f} s")
    assert tok.encode(text) == _ref_encode(sp, text, "<unk>")
    lines = text.splitlines(keepends=True)[:3000]
    assert [m.encode(ln) for ln in lines] == sp.encode(lines)
    assert [m.encode(ln, True) for ln in lines] == psp.encode(lines)


def test_lone_surrogates_are_rejected(real):
    """As before (sentencepiece raised too), text that is not valid Unicode is an error."""
    m, sp, psp, tok = real
    for t in ("a\ud800b", "\udfff", "x" * 50 + "\ud83d"):
        with pytest.raises(UnicodeEncodeError):
            tok.encode(t)
        with pytest.raises(UnicodeEncodeError):
            tok.encode(t, parse_special=False)
        with pytest.raises(Exception):
            sp.encode(t)
    with pytest.raises(TypeError):
        m.encode(b"bytes")


def test_real_model_truncated_or_corrupt_is_a_format_error(real_blob):
    kind, data, special = real_blob
    for cut in (1, 2, 10, 100, len(data) // 3, len(data) // 2, len(data) - 7, len(data) - 1):
        try:
            Tokenizer.from_blob(kind, memoryview(data)[:cut], special)
        except FormatError as e:
            assert "sentencepiece tokenizer" in str(e)
        # a cut at a field boundary can leave a smaller valid model: then it must simply work
    with pytest.raises(FormatError, match="overruns|truncated"):
        Tokenizer.from_blob(kind, data[: len(data) // 2], special)


# --------------------------------------------------------------------------- tiny vocabularies

ALPHABET = ["a", "b", "c", "d", "e", "\u2581", "é", "中", "<", ">", "x"]


def _tiny_vocab(rng: random.Random, *, ties: bool, dummy: bool, unused: bool = True):
    """A random BPE vocabulary in edgelm's form: specials, 256 byte pieces, single characters
    (one left out, so byte fallback is exercised), random multi-character pieces of random
    type, and random scores (a few values when `ties`). Without UNUSED pieces the native
    encoder runs one heap per run of unfrozen symbols, with them one for the whole text."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    singles = [c for c in ALPHABET if c != rng.choice(["é", "中", "x"])]
    tokens += singles
    types += [1] * len(singles)
    seen = set(tokens)
    for _ in range(rng.randint(20, 120)):
        p = "".join(rng.choice(ALPHABET[:7]) for _ in range(rng.randint(2, 5)))
        if p in seen:
            continue
        seen.add(p)
        r = rng.random()
        tokens.append(p)
        types.append(5 if r < 0.2 and unused else 4 if r < 0.27 else 3 if r < 0.32 else 1)
    for lit, typ in (("<x>", 4), ("<xx>", 3), ("<x", 4), ("<c>", 3), ("c", 3), ("§", 3), ("ab<", 4)):
        if lit not in seen and rng.random() < 0.6:
            seen.add(lit)
            tokens.append(lit)
            types.append(typ)
    n = len(tokens)
    # ties: few distinct values, -0.0 and 0.0 among them (sentencepiece ranks -0.0 lower)
    scores = [rng.choice([-3.0, -1.0, -0.0, 0.0, 0.0, 2.5]) if ties else rng.uniform(-10, 10) for _ in range(n)]
    order = list(range(260, n))
    rng.shuffle(order)  # pieces in random order: ids and scores unrelated
    tokens = tokens[:260] + [tokens[i] for i in order]
    types = types[:260] + [types[i] for i in order]
    blob = _build_spm_model(tokens, scores, types, unk=3, bos=2, eos=1, pad=0, add_dummy_prefix=dummy)
    return blob, tokens


def _tiny_texts(rng: random.Random, tokens: list[str], k: int = 150) -> list[str]:
    chars = ALPHABET + [" ", " ", "z", "\n", "ü", "<unk>", "<x>", "<xx>", "<c>", "§", "😀"]
    pieces = [t for t in tokens[260:]]
    out = ["", " ", "  a", "a  ", "<unk>", "<x><xx><c>", "§§", "cc"]
    for _ in range(k):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 40))))
        else:
            out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).replace("\u2581", " "))
    return out


@pytest.mark.parametrize("seed", range(120))
def test_tiny_vocabularies_match_sentencepiece(seed):
    rng = random.Random(seed)
    blob, tokens = _tiny_vocab(rng, ties=seed % 2 == 0, dummy=seed % 3 == 0, unused=seed % 4 < 2)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    psp = spm.SentencePieceProcessor(model_proto=_plain_text_model(blob))
    m = _tok.BPEModel(blob)
    tok = Tokenizer.from_blob(KIND_SENTENCEPIECE, blob, {"bos": 2, "eos": 1, "unk": 3, "pad": 0})
    texts = _tiny_texts(rng, tokens)
    for t, r, rp in zip(texts, sp.encode(texts), psp.encode(texts)):
        assert m.encode(t) == r, (seed, t)
        assert m.encode(t, True) == rp, (seed, t)
        assert tok.encode(t) == _ref_encode(sp, t, "<unk>"), (seed, t)
        assert tok.encode(t, parse_special=False) == rp, (seed, t)
    for i in range(len(tokens)):
        assert tok.id_to_piece(i) == sp.id_to_piece(i)


def _variant(blob: bytes, edit) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    mp = pb.ModelProto()
    mp.ParseFromString(blob)
    edit(mp, pb)
    return mp.SerializeToString()


def _no_byte_fallback(mp, pb):
    mp.trainer_spec.byte_fallback = False
    keep = [p for p in mp.pieces if p.type != pb.ModelProto.SentencePiece.BYTE]
    del mp.pieces[:]
    mp.pieces.extend(keep)


def _extra_ws(mp, pb):
    mp.normalizer_spec.remove_extra_whitespaces = True
    mp.normalizer_spec.add_dummy_prefix = True
    p = mp.pieces.add()  # a user-defined piece with raw spaces: changes how the normalizer segments
    p.piece, p.type = "a  b", pb.ModelProto.SentencePiece.USER_DEFINED
    q = mp.pieces.add()
    q.piece, q.type = " c", pb.ModelProto.SentencePiece.USER_DEFINED


def _no_escape(mp, pb):
    mp.normalizer_spec.escape_whitespaces = False
    mp.normalizer_spec.add_dummy_prefix = True
    for piece in (" ", " a"):
        p = mp.pieces.add()
        p.piece, p.score = piece, 5.0


def _ws_suffix(mp, pb):
    mp.trainer_spec.treat_whitespace_as_suffix = True
    mp.normalizer_spec.add_dummy_prefix = True


def _defaults(mp, pb):
    mp.ClearField("normalizer_spec")  # proto2 defaults: dummy prefix, extra-whitespace removal, escaping


def _odd_scores(mp, pb):  # infinities and NaN rank as in sentencepiece too
    for k, p in enumerate(mp.pieces):
        if k % 7 == 3:
            p.score = (float("nan"), float("inf"), -float("inf"))[k % 3]


def _control_kept(mp, pb):  # a foreign model: control pieces typed CONTROL (not matched in text)
    for p in mp.pieces:
        if p.type == pb.ModelProto.SentencePiece.USER_DEFINED and p.piece.startswith("<"):
            p.type = pb.ModelProto.SentencePiece.CONTROL


VARIANTS = [_no_byte_fallback, _extra_ws, _no_escape, _ws_suffix, _defaults, _odd_scores, _control_kept]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.__name__.strip("_") for v in VARIANTS])
@pytest.mark.parametrize("seed", range(6))
def test_model_variants_match_sentencepiece(variant, seed):
    rng = random.Random(1000 + seed)
    blob, tokens = _tiny_vocab(rng, ties=seed % 2 == 1, dummy=False, unused=seed < 3)
    blob = _variant(blob, variant)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    m = _tok.BPEModel(blob)
    texts = _tiny_texts(rng, tokens) + ["  a  b  ", "a  b", " c c  c", "x a  b y", "   ", " \n ", "<0x41>", "<0x41><0x4"]
    for t, r in zip(texts, sp.encode(texts)):
        assert m.encode(t) == r, (variant.__name__, seed, t)


def test_one_character_control_symbols_in_plain_text():
    """A control symbol of one character, read as text (plain mode): sentencepiece treats it as
    unknown (byte fallback), and so does the native encoder."""
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "§", "\u2581"]
    types = [3, 3, 3, 2] + [6] * 256 + [1, 1, 3, 1]
    blob = _build_spm_model(toks, [0.0] * len(toks), types, unk=3, bos=2, eos=1, pad=0, add_dummy_prefix=False)
    m = _tok.BPEModel(blob)
    psp = spm.SentencePieceProcessor(model_proto=_plain_text_model(blob))
    assert m.encode("a§b") == [260, 262, 261]
    assert m.encode("a§b", True) == psp.encode("a§b") == [260, 4 + 0xC2, 4 + 0xA7, 261]


# ------------------------------------------------------------------------------ bad models


def _tiny_blob() -> bytes:
    return _tiny_vocab(random.Random(5), ties=True, dummy=False)[0]


def test_every_truncation_and_random_corruption_is_safe():
    """No cut or flipped byte crashes: it is a ValueError, or (a cut at a field boundary, a
    byte inside a piece or score) a model that loads and encodes."""
    blob = _tiny_blob()
    assert _tok.BPEModel(blob).size > 260
    for cut in range(len(blob)):
        try:
            m = _tok.BPEModel(blob[:cut])
        except ValueError as e:
            assert str(e).startswith("tokenizer model: ")
        else:
            m.encode("abc de <x> z", False), m.encode("abc", True)
    rng = random.Random(0)
    for k in range(3000):
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        b = bytes(b)
        if k % 10 == 0:  # the Python path too (a foreign-looking blob is rewritten first)
            try:
                Tokenizer.from_blob(KIND_SENTENCEPIECE, b, {}).encode("abc <x>")
            except FormatError:
                pass
        try:
            m = _tok.BPEModel(b)
        except ValueError:
            continue
        m.encode("abc de <x> z \u2581 <unk>"), m.encode("a b", True)
        for i in range(m.size):
            m.id_to_piece(i)


def _pieces(*items) -> bytes:
    from edgelm.tokenizer.wire import _ld, _piece_msg, _vi

    return b"".join(_piece_msg(p, 0.0, t) for p, t in items) + _ld(2, _vi(3, 2))


@pytest.mark.parametrize("blob, message", [
    (b"", "no pieces"),
    (b"\x00\x01garbage", "invalid field number"),
    (b"\x0a\xff\x01", "overruns"),
    (b"\x0a", "truncated|overruns"),
    (b"\x0b", "groups"),
    (b"\x0e", "wire type"),
    (b"\x0a\x02\x08\xff", "malformed varint|truncated"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "malformed varint"),
    ("unigram", "UNIGRAM"),
    ("charsmap", "precompiled_charsmap"),
    ("dup", "defined twice"),
    ("dup-reserved", "defined twice"),
    ("nounk", "no UNKNOWN"),
    ("twounk", "two UNKNOWN"),
    ("empty", "is empty"),
    ("byte-no-fallback", "byte_fallback is false"),
    ("bad-byte", "<0xNN>"),
    ("missing-byte", "<0x41> is missing"),
    ("nul", "NUL byte"),
])
def test_bad_models_are_clear_errors(blob, message):
    from edgelm.tokenizer.wire import _ld, _piece_msg, _vi

    unk = ("<unk>", 2)
    base = _ld(2, _vi(3, 2))
    if blob == "unigram":
        blob = _piece_msg("<unk>", 0, 2)
    elif blob == "charsmap":
        blob = _pieces(unk) + _ld(3, _ld(2, b"\x01\x02\x03\x04\x05"))
    elif blob == "dup":
        blob = _pieces(unk, ("a", 1), ("a", 4))
    elif blob == "dup-reserved":  # a NORMAL twin of a BYTE piece: sentencepiece rejects it too
        blob = _pieces(unk, *((f"<0x{b:02X}>", 6) for b in range(256)), ("<0x41>", 1)) + _ld(2, _vi(35, 1))
        with pytest.raises(RuntimeError, match="already defined"):
            spm.SentencePieceProcessor(model_proto=blob)
    elif blob == "nounk":
        blob = _pieces(("a", 1))
    elif blob == "twounk":
        blob = _pieces(unk, ("<unk2>", 2))
    elif blob == "empty":
        blob = _pieces(unk, ("", 1))
    elif blob == "byte-no-fallback":
        blob = _pieces(unk, ("<0x41>", 6))
    elif blob == "bad-byte":
        blob = _pieces(unk, ("<0x4g>", 6)) + _ld(2, _vi(35, 1))
    elif blob == "missing-byte":
        blob = _pieces(unk, *((f"<0x{b:02X}>", 6) for b in range(256) if b != 0x41)) + _ld(2, _vi(35, 1))
    elif blob == "nul":
        blob = _pieces(unk, ("a\x00b", 4))
    else:
        blob = blob + (base if blob else b"")
    with pytest.raises(ValueError, match=message):
        _tok.BPEModel(blob)
    with pytest.raises(FormatError):  # a foreign model is rewritten in Python first, which may fail first
        Tokenizer.from_blob(KIND_SENTENCEPIECE, blob, {})


def test_minimal_models_load():
    from edgelm.tokenizer.wire import _ld, _vi

    blob = _pieces(("<unk>", 2), ("a", 1), ("b", 1), ("ab", 1))
    m = _tok.BPEModel(blob)
    # no normalizer spec: proto2 defaults ("▁abz▁a"); no byte fallback: "z▁" is one <unk>
    assert m.size == 4 and m.encode("abz a") == spm.SentencePieceProcessor(model_proto=blob).encode("abz a") == [0, 3, 0, 1]
    # fields in any order, unknown fields and enum values skipped, a trainer spec in two parts merged
    blob = (_ld(2, _vi(35, 0) + _vi(99, 7)) + _pieces(("<unk>", 2), ("a", 1)) + _ld(2, _vi(3, 2)) + _vi(77, 1)
            + _ld(3, _vi(3, 0)))
    assert _tok.BPEModel(blob).encode("aa") == spm.SentencePieceProcessor(model_proto=blob).encode("aa") == [1, 1]


# ------------------------------------------------------------------- zero copy, memory, imports


def _write_tokenizer_bundle(path: Path, blob: bytes) -> Path:
    from edgelm.format.bundle import write_bundle

    write_bundle(path, {"arch": "gemma3", "config": {}}, [], None, blobs={"tokenizer": blob})
    return path


def test_bundle_blob_view_is_zero_copy(tmp_path):
    from edgelm.format.bundle import Bundle

    blob = _tiny_blob()
    b = Bundle(_write_tokenizer_bundle(tmp_path / "t.edgelm", blob))
    view = b.blob_view("tokenizer")
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == blob == b.blob("tokenizer")
    tok = Tokenizer.from_blob(KIND_SENTENCEPIECE, view, {"bos": 2, "eos": 1, "unk": 3})
    ref = Tokenizer.from_blob(KIND_SENTENCEPIECE, blob, {"bos": 2, "eos": 1, "unk": 3})
    del view
    b.close()  # the tokenizer still holds the mapping
    for t in ("abc <x> de", "<unk> z", ""):
        assert tok.encode(t) == ref.encode(t) and tok.encode(t, parse_special=False) == ref.encode(t, parse_special=False)
    assert tok._b.m.memory_bytes < 200_000


_RSS_SCRIPT = r"""
import gc, json, mmap, sys, time
import numpy
from edgelm.tokenizer import KIND_SENTENCEPIECE, Tokenizer
from edgelm._native import _tok

def rss_kib():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k in ("VmRSS", "RssAnon", "RssFile")}

f = open(sys.argv[1], "rb")
view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
gc.collect()
before = rss_kib()
t0 = time.perf_counter()
tok = Tokenizer.from_blob(KIND_SENTENCEPIECE, view, {"bos": 2, "eos": 1, "unk": 3})
load_s = time.perf_counter() - t0
tok.encode("<start_of_turn>user\nHello there<end_of_turn>"), tok.encode("<unk> plain", parse_special=False)
tok.special_ids
after = rss_kib()
print(json.dumps({"before": before, "after": after, "load_s": load_s, "tables": tok._b.m.memory_bytes,
                  "sentencepiece": any(m.startswith("sentencepiece") for m in sys.modules)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_real_vocabulary_memory_and_imports(real_blob, tmp_path):
    """In a fresh process: loading Gemma's vocabulary from a mapped file adds a few MiB (the
    sentencepiece library took ~45 MiB, plus as much again for the plain-text model) and
    never imports sentencepiece."""
    _, data, _ = real_blob
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    grown_mib = (r["after"]["VmRSS"] - r["before"]["VmRSS"]) / 1024
    print(f"native tokenizer: +{grown_mib:.1f} MiB RSS (+{(r['after']['RssAnon'] - r['before']['RssAnon']) / 1024:.1f} "
          f"anonymous), tables {r['tables'] / 2**20:.1f} MiB, load {r['load_s'] * 1000:.0f} ms")
    assert r["sentencepiece"] is False
    assert r["tables"] < 8 * 2**20
    assert grown_mib < 16


@pytest.mark.slow
def test_engine_does_not_import_sentencepiece(real_int8_bundle):
    code = ("import sys; from edgelm.runtime.engine import Engine; "
            f"e = Engine({str(real_int8_bundle)!r}, backend='cpu', threads=1, max_tokens=64); "
            "assert e.tokenizer.encode('<start_of_turn>') == [105]; "
            "print(sorted(m for m in sys.modules if m.startswith('sentencepiece')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
