"""Constrained decoding (edgelm/runtime/constrained.py): outputs under JSON Schemas validate
(jsonschema) at temperature 0 and 1 on the tiny model and the real 270M; regex outputs match;
llguidance's masks equal masks built naively from each token's decoded bytes on small
vocabularies (one with byte-fallback pieces, `▁` pieces and pieces that straddle grammar
boundaries); bad schemas, regexes and grammars are clear errors; max_new_tokens bounds an
unfinished grammar; the `edgelm run` flags."""

from __future__ import annotations

import json
import random
import re

import pytest

from edgelm.errors import BadInputError
from edgelm.runtime.constrained import Constraint, ConstraintRun, Vocabulary
from edgelm.runtime.engine import Engine
from edgelm.runtime.session import GenerationStats
from edgelm.tokenizer import KIND_SENTENCEPIECE, Tokenizer
from edgelm.tokenizer.build import _build_spm_model

from .conftest import assert_clean_error, run_cli
from .tiny_bundle import tiny_bundle

jsonschema = pytest.importorskip("jsonschema")

# Every part bounded (string lengths, item counts, integer ranges), so even a random model
# finishes each document within max_new_tokens: every output must then be complete.
SCHEMAS = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "enum_number": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        # multipleOf bounds the digits: without it the 270M can write digits until max_new_tokens
        # (a binary fraction, so that jsonschema checks it exactly)
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25}},
        "required": ["color", "score"], "additionalProperties": False},
    "nested_array": {"type": "object", "properties": {
        "inner": {"type": "object", "properties": {
            "ok": {"type": "boolean"},
            "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}},
            "required": ["ok"], "additionalProperties": False},
        "items": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                  "minItems": 1, "maxItems": 3}},
        "required": ["inner", "items"], "additionalProperties": False},
    "pattern_optional": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
        "note": {"type": "string", "maxLength": 6}},
        "required": ["code"], "additionalProperties": False},
}
RUNS = [(0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)]


@pytest.fixture(scope="module")
def tiny():
    return Engine(tiny_bundle())


def _generate(eng, prompt, constraint, temperature=0.0, seed=None, n=160, **kw):
    s = eng.create_session({"temperature": temperature, "seed": seed})
    text, stats = [], None
    for p in s.generate(prompt, max_new_tokens=n, constraint=constraint, **kw):
        if isinstance(p, GenerationStats):
            stats = p
        else:
            text.append(p)
    return "".join(text), stats, s


def _check_schema_outputs(eng, prompt, n):
    for name, schema in SCHEMAS.items():
        c = Constraint(eng, json_schema=schema)
        for t, seed in RUNS:
            text, st, _ = _generate(eng, prompt, c, t, seed, n)
            assert st.stop_reason == "grammar_complete", (name, t, seed, text, st)
            jsonschema.validate(json.loads(text), schema)


# ----------------------------------------------------------------------------- tiny model

def test_tiny_schema_outputs_validate(tiny):
    _check_schema_outputs(tiny, "hello the", 160)


def test_json_object_regex_and_lark(tiny):
    text, st, _ = _generate(tiny, "hi", {"json_object": True}, 1.0, 3, n=400)
    if st.stop_reason == "grammar_complete":  # an open object may run on; a closed one parses
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{") and st.generated_tokens == 400
    for seed in range(3):
        text, st, _ = _generate(tiny, "hi", {"regex": r"(the|a) [0-9]{2,3}( is)?"}, 1.0, seed)
        assert re.fullmatch(r"(the|a) [0-9]{2,3}( is)?", text), text
        assert st.stop_reason in ("grammar_complete", "stop_token")
    lark = 'start: word (", " word)*\nword: "hello" | "world" | /[0-9]/'
    text, st, _ = _generate(tiny, "hi", {"lark": lark}, 1.0, 5, n=40)
    assert re.fullmatch(r"(hello|world|[0-9])(, (hello|world|[0-9]))*", text), text


def test_max_new_tokens_bounds_an_unfinished_grammar(tiny):
    c = Constraint(tiny, regex="a{200}")
    text, st, s = _generate(tiny, "hi", c, n=7)
    assert st.stop_reason == "max_new_tokens" and st.generated_tokens == 7
    assert text == "a" * len(text) and 0 < len(text) <= 7 * 4
    # the session goes on as after any reply; the next constrained one starts afresh
    text, st, _ = _generate(tiny, "hi", Constraint(tiny, regex="ab"))
    assert text == "ab" and st.stop_reason == "grammar_complete"


def test_stop_token_once_the_grammar_accepts(tiny):
    """An accepting grammar that could go on lets the model stop with its stop tokens; the
    mask allows them only then."""
    c = Constraint(tiny, regex="[a-z]*")
    run = ConstraintRun(c)
    assert run.allowed()[sorted(tiny.stop_ids)].all() and run.accepting
    run = ConstraintRun(Constraint(tiny, regex="[a-z]+"))
    assert not run.allowed()[sorted(tiny.stop_ids)].any()


def test_bad_constraints_are_clear_errors(tiny):
    cases = [
        (dict(json_schema={"type": "foo"}), "json_schema: Invalid type: foo"),
        (dict(json_schema={"type": "object", "if": {}, "then": {}}), "Unimplemented keys"),
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), "Unsatisfiable"),
        (dict(json_schema='{"type": '), "json_schema is not valid JSON"),
        (dict(json_schema=[1, 2]), "json_schema must be an object"),
        (dict(json_schema=False), "json_schema: the schema false matches nothing"),
        (dict(json_schema={"type": "string", "pattern": "a(b"}), "unclosed group"),
        (dict(regex="a(b"), "regex"),
        (dict(regex=5), "regex must be a string"),
        (dict(lark="start: foo"), 'unknown name: "foo"'),
        (dict(lark='start: "a" <nope>'), "unknown special token"),
        (dict(lark='start: "a" <[99999]>'), "99999"),
        (dict(regex="a", lark="start: a"), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(json_object="yes"), "json_object must be true or false"),
        # the tiny vocabulary has no byte fallback: it cannot spell "ü"
        (dict(regex="ü+"), "no token of this model's vocabulary can continue"),
        (dict(regex="[a&&b]"), "regex: the grammar matches no text"),
    ]
    for kw, needle in cases:
        with pytest.raises(BadInputError) as e:
            Constraint(tiny, **kw)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg and len(msg) < 400, (kw, msg)
    s = tiny.create_session()
    for bad, needle in (({"json": {}}, "unknown constraint fields"), ("x", "must be a Constraint or a dict")):
        with pytest.raises(BadInputError, match=needle):
            s.generate("hi", constraint=bad)
    other = Engine(tiny_bundle())
    with pytest.raises(BadInputError, match="another engine"):
        s.generate("hi", constraint=Constraint(other, regex="a"))


# ------------------------------------------------------------------ masks against naive ones

def _spm_vocabulary():
    """A sentencepiece vocabulary with byte fallback: specials, the 256 byte pieces, single
    characters (no "é" or "中": those take byte pieces), `▁` pieces, pieces that straddle the
    grammar's boundaries ("c▁a", "b}", '":'), a user-defined piece and a turn marker."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = list("abcdxyz{}\":,0123456789") + ["▁", "▁a", "▁ab", "ab", "bc", "abc", "b▁", "c▁a", "▁▁", "b}",
                                                 '":', '{"', "xy", "yz▁", "<b>", "▁é"]
    tokens += pieces
    types += [4 if p == "<b>" else 1 for p in pieces]
    blob = _build_spm_model(tokens, [-float(i) for i in range(len(tokens))], types, unk=3, bos=2, eos=1, pad=0,
                            add_dummy_prefix=False)
    special = {"bos": 2, "eos": 1, "unk": 3, "pad": 0, "start_of_turn": 4, "end_of_turn": 5, "stop": [1, 5]}
    return Tokenizer.from_blob(KIND_SENTENCEPIECE, blob, special)


def _naive_mask(tok, texts: list[bytes], prefix: bytes, stops) -> set[int]:
    """Tokens whose bytes keep `prefix` a prefix of one of `texts` (the whole finite
    language); stop tokens where prefix is a whole text. From decoded strings alone."""
    special = tok.special_ids
    out = set()
    for i in range(tok.vocab_size):
        if i in special:
            if i in stops and prefix in texts:
                out.add(i)
            continue
        b = tok.token_bytes(i)
        if b and any(t.startswith(prefix + b) for t in texts):
            out.add(i)
    return out


def _alternation(texts) -> str:
    return "|".join(re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", t) for t in texts)


# Finite languages, so the naive mask is exact: spaces, "é" and "中" (byte pieces only in
# the spm vocabulary), and texts that are prefixes of others.
REGEX_TEXTS = ["ab c", "ab cab", "a b", "yz abc", "xyz abc", "é中 a", *(f'{{"a":{d}}}' for d in range(10))]
ENUM = ["ab", "ab c", "a  bc", "xé", 12, "中"]
LANGUAGES = [
    ("regex", _alternation(REGEX_TEXTS), REGEX_TEXTS),
    ("json_schema", {"enum": ENUM}, [json.dumps(v, ensure_ascii=False) for v in ENUM]),
    ("lark", 'start: ("ab" | "c a") (" " "xy" | "z")?', [a + b for a in ("ab", "c a") for b in ("", " xy", "z")]),
]


def _no_forcing(kind, src) -> str:
    """The same language as a Lark grammar with llguidance's forcing off: where the grammar
    forces bytes, llguidance otherwise allows only the first token of their canonical
    tokenization (what the model would have seen in training)."""
    body = {"regex": lambda: f"start: /{src}/", "json_schema": lambda: f"start: %json {json.dumps(src)}",
            "lark": lambda: src}[kind]()
    return '%llguidance {"no_forcing": true}\n' + body


@pytest.mark.parametrize("vocab_name", ["spm_byte_fallback", "tiny_bundle"])
def test_masks_equal_naive_masks(vocab_name, tiny):
    """Without forcing, the mask is exactly the naive one; with it (the default), a subset
    that differs only where the grammar forces bytes, and never empty."""
    if vocab_name == "tiny_bundle":
        tok, stops = tiny.tokenizer, set(tiny.stop_ids)
    else:
        tok = _spm_vocabulary()
        stops = set(tok.stop_ids)
    vocab = Vocabulary(tok, stops)
    rng = random.Random(0)
    chosen = set()
    for kind, src, texts in LANGUAGES:
        texts = [t.encode() for t in texts]
        spellable = [t for t in texts if vocab_name != "tiny_bundle" or t.isascii()]
        for forcing in (False, True):
            c = Constraint(vocab, **({kind: src} if forcing else {"lark": _no_forcing(kind, src)}))
            for _ in range(12):
                run, prefix = ConstraintRun(c), b""
                for _ in range(40):
                    naive = _naive_mask(tok, texts, prefix, stops)
                    got = set(run.allowed().nonzero()[0].tolist())
                    if forcing and run.m.compute_ff_bytes():
                        assert got and got <= naive, (kind, prefix, sorted(got - naive))
                    else:
                        assert got == naive, (kind, forcing, prefix, sorted(got ^ naive)[:20])
                    steps = sorted(i for i in got if i not in stops and any(
                        t.startswith(prefix + tok.token_bytes(i)) for t in spellable))
                    if not steps:
                        break
                    i = rng.choice(steps)
                    chosen.add(tok.id_to_piece(i))
                    prefix += tok.token_bytes(i)
                    if run.advance(i):
                        break
                assert prefix in spellable, (kind, prefix)
    if vocab_name == "spm_byte_fallback":  # the walks went through the pieces this is about
        assert {"<0xC3>", "<0xA9>", "<0xE4>", "▁a", "b▁"} <= chosen, sorted(chosen)


def test_spm_vocabulary_bytes_and_specials():
    tok = _spm_vocabulary()
    vocab = Vocabulary(tok, tok.stop_ids)
    ll = vocab.ll
    assert ll.vocab_size == tok.vocab_size and sorted(ll.eos_tokens) == [1, 5]
    assert ll.is_special_token(5) and not ll.is_special_token(tok.token_to_id("<b>"))
    ids = [tok.token_to_id(p) for p in ("c▁a", "<0xC3>", "<0xA9>")]
    assert ll.decode_bytes(ids) == "c aé".encode()
    # a Lark grammar reaches a turn marker only by name
    c = Constraint(vocab, lark='start: "ab" <end_of_turn>')
    run = ConstraintRun(c)
    run.advance(tok.token_to_id("ab"))
    assert set(run.allowed().nonzero()[0].tolist()) == {5}


# ------------------------------------------------------------------------------ real 270M

@pytest.mark.slow
def test_real_model_schema_outputs_validate(real_int8_bundle):
    eng = Engine(real_int8_bundle, max_tokens=512)
    prompt = ("<start_of_turn>user\nDescribe a made-up person as a JSON object.<end_of_turn>\n"
              "<start_of_turn>model\n")
    _check_schema_outputs(eng, prompt, 120)
    # byte-fallback territory: text outside ASCII, and a regex on the real vocabulary
    word = "[a-zàâçéèêëîïôûùüÿ]{3,9}"
    for seed in range(2):
        text, st, _ = _generate(eng, "Un mot en français:", {"regex": word}, 1.0, seed)
        assert re.fullmatch(word, text), text


# ------------------------------------------------------------------------------ CLI

def test_cli_flags(tmp_path):
    b = tiny_bundle()
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["flat"]))
    p = run_cli("run", "hello", "-m", b, "--json-schema", schema, "--temperature", "1", "--seed", "4", "-q")
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout), SCHEMAS["flat"])
    p = run_cli("run", "hello", "-m", b, "--regex", "[0-9]{4}", "-q")
    assert p.returncode == 0 and re.fullmatch("[0-9]{4}", p.stdout.rstrip("\n")), p
    g = tmp_path / "g.lark"
    g.write_text('start: "yes" | "no"\n')
    p = run_cli("run", "hello", "-m", b, "--grammar", g, "-q")
    assert p.returncode == 0 and p.stdout.rstrip("\n") in ("yes", "no"), p
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": ')
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": "object", "if": {}}')
    for args, needles in [
        (("--json-schema", tmp_path / "none.json"), ("none.json", "no such text file")),
        (("--json-schema", bad), ("bad.json", "not valid JSON")),
        (("--json-schema", wrong), ("--json-schema", "wrong.json", "Unimplemented keys")),
        (("--regex", "a(b"), ("--regex", "unclosed group")),
        (("--grammar", g, "--regex", "a"), ("at most one of",)),
    ]:
        p = run_cli("run", "hello", "-m", b, *args)
        assert_clean_error(p, *needles)
        assert p.returncode == 2


def test_greedy_shortcut_picks_what_the_full_mask_picks(tiny):
    """A greedy sampler whose argmax is allowed skips the mask; the pick is the same."""
    import numpy as np

    from edgelm.runtime.sampler import SamplerConfig

    greedy = SamplerConfig(temperature=0.0)
    rng = np.random.default_rng(0)
    c = Constraint(tiny, regex="(the|a|[0-9]+) (is|at)?")
    for _ in range(50):
        run = ConstraintRun(c)
        for _ in range(4):
            logits = rng.standard_normal(tiny.config.vocab_size).astype(np.float32)
            pick = int(np.argmax(run.apply(logits, greedy)[:tiny.tokenizer.vocab_size]))
            assert pick == int(np.argmax(run.apply(logits.copy())))
            if run.advance(pick):
                break


def test_triggered_constraint_starts_at_its_trigger(tiny):
    """Free until the output holds the trigger; from there the grammar holds (and ends it).
    Text that the trigger's token carries past the trigger counts toward the grammar."""
    from edgelm.runtime.constrained import Triggered

    free, _, sess = _generate(tiny, "Hello", None, n=12)
    out = sess.generated_ids
    trig = tiny.tokenizer.decode(out[:3])
    assert free.startswith(trig) and len(free) > len(trig)
    digits = Triggered(trig, Constraint(tiny, regex="[0-9]{3}!"))
    text, stats, _ = _generate(tiny, "Hello", digits, n=12)
    assert re.fullmatch(re.escape(trig) + "[0-9]{3}!", text), text
    assert stats.stop_reason == "grammar_complete"
    # a trigger that ends inside a token: the token's remaining text must fit the grammar
    k = next(k for k in range(1, len(out)) if len(tiny.tokenizer.decode(out[k:k + 1])) >= 2)
    trig, piece = tiny.tokenizer.decode(out[:k]), tiny.tokenizer.decode(out[k:k + 1])
    inside = Triggered(trig + piece[:-1], Constraint(tiny, regex=re.escape(piece[-1]) + "[0-9]{2}"))
    text, stats, _ = _generate(tiny, "Hello", inside, n=12)
    assert text.startswith(trig + piece) and re.fullmatch("[0-9]{2}", text[len(trig + piece):]), text
    # ... and where it does not, the run stays free: the output is the unconstrained one
    broken = Triggered(trig + piece[:-1], Constraint(tiny, regex="#[0-9]{2}"))
    assert _generate(tiny, "Hello", broken, n=12)[0] == free
    with pytest.raises(BadInputError, match="trigger"):
        Triggered("", Constraint(tiny, regex="a"))


def test_conversation_reply_under_a_constraint(tiny):
    conv = tiny.create_conversation(sampler={"temperature": 1.0, "seed": 4})
    yes_no = Constraint(tiny, regex="(yes|no)")
    assert conv.send("Is it?", constraint=yes_no, max_new_tokens=8) in ("yes", "no")
    assert conv.last_stats.stop_reason in ("grammar_complete", "stop_token")
    reply = conv.send("Again, as JSON", constraint={"json_schema": SCHEMAS["flat"]}, max_new_tokens=60)
    jsonschema.validate(json.loads(reply), SCHEMAS["flat"])
    assert conv.history[-1] == {"role": "assistant", "content": reply}
