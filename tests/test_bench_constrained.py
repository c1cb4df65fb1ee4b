"""`edgelm bench --json-schema FILE` (and --json-object, --regex, --grammar): constrained
against unconstrained decode speed in one run, its report and its errors; the cheap paths it
led to (masked logits in the sampler, the mask's application); MaskTimings. No timing
assertions: speed is the report's business."""

import json

import numpy as np
import pytest

from .conftest import assert_clean_error, run_cli
from .tiny_bundle import tiny_bundle

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["engineer", "teacher", "doctor"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}
# the tiny model's context is 1024 (bench's default capacity is 1280)
BASE = ("--max-tokens", "512", "-n", "24")


@pytest.fixture()
def schema_file(tmp_path):
    p = tmp_path / "person.json"
    p.write_text(json.dumps(SCHEMA))
    return p


def test_table_prints_both_rates_and_the_ratio(schema_file):
    p = run_cli("bench", "-m", tiny_bundle(), "--json-schema", schema_file, "-r", "2", *BASE)
    assert p.returncode == 0, p.stderr
    for row in ("decode tok/s unconstrained", "decode tok/s constrained", "constrained / unconstrained",
                "vocabulary preparation s", "tokens per run", "mask per token ms", str(schema_file)):
        assert row in p.stdout, (row, p.stdout)
    ratio = next(ln for ln in p.stdout.splitlines() if ln.startswith("constrained / unconstrained"))
    assert "x (" in ratio and "per pair" in ratio


def test_json_report(schema_file):
    p = run_cli("bench", "-m", tiny_bundle(), "--json-schema", schema_file, "-r", "3", "--json", *BASE)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["mode"] == "constrained" and r["repeats"] == 3 and r["temperature"] == 0
    assert r["constraint"] == {"kind": "json_schema", "given": f"--json-schema {schema_file}"}
    assert r["vocabulary_s"] > 0 and r["compile_s"] > 0 and r["prompt_tokens"] > 0
    m = r["metrics"]
    con, unc, ratio = (m[k]["values"] for k in ("constrained_decode_tok_s", "unconstrained_decode_tok_s", "ratio"))
    assert len(con) == len(unc) == len(ratio) == 3 and min(con + unc) > 0
    for c, u, q in zip(con, unc, ratio):  # the ratio is per pair
        assert q == pytest.approx(c / u)
    assert m["ratio"]["min"] <= m["ratio"]["median"] <= m["ratio"]["max"]
    # greedy: every constrained run writes the same tokens, and its unconstrained partner as many
    toks = r["tokens"]
    assert toks["constrained"] == toks["unconstrained"] and len(set(toks["constrained"])) == 1
    assert 2 <= toks["constrained"][0] <= 24
    if r["stop_reasons"][0] == "grammar_complete":
        out = json.loads(r["output"])
        assert set(out) == set(SCHEMA["required"])
    # the mask timings cover the 3 measured constrained runs: one mask per token (the last
    # sampled token's run ends instead of asking for another), one application per token
    n = sum(toks["constrained"])
    assert m["tokens"] == n and 0 <= m["masked_tokens"] <= n
    assert n <= m["masks"] <= n + 3  # + a run's last mask, where -n stopped it
    for k in ("mask_compute_ms", "mask_wait_ms", "mask_apply_ms", "advance_ms"):
        assert m[k] is not None and m[k] >= 0, k


def test_other_constraint_kinds_and_temperature(tmp_path):
    g = tmp_path / "yn.lark"
    g.write_text('start: "yes" | "no" | "maybe"\n')
    for args in (("--regex", "[0-9]{4}"), ("--json-object",), ("--grammar", g),
                 ("--regex", "[a-z]{3,9}", "--temperature", "1", "--prompt", "Write a word:")):
        p = run_cli("bench", "-m", tiny_bundle(), *args, "-r", "2", "--json", *BASE)
        assert p.returncode == 0, (args, p.stderr)
        r = json.loads(p.stdout)
        assert len(r["metrics"]["ratio"]["values"]) == 2, args
        # each pair decodes the same number of tokens both ways, also when sampling
        assert r["tokens"]["constrained"] == r["tokens"]["unconstrained"], args
        if "--prompt" in args:
            assert r["prompt"] == "Write a word:" and r["temperature"] == 1.0


def test_bad_input_is_one_line_and_exit_2(tmp_path, schema_file):
    m = tiny_bundle()
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": ')
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": "object", "if": {}}')
    for args, needles in [
        (("--json-schema", tmp_path / "none.json"), ("--json-schema", "none.json", "no such text file")),
        (("--json-schema", bad), ("--json-schema", "bad.json", "not valid JSON")),
        (("--json-schema", wrong), ("--json-schema", "wrong.json", "Unimplemented keys")),
        (("--grammar", tmp_path / "none.lark"), ("--grammar", "none.lark", "no such text file")),
        (("--regex", "a(b"), ("--regex", "unclosed group")),
        (("--regex", "a", "--json-object"), ("at most one of",)),
        (("--regex", "a"), ("--regex", "at least 2")),  # a one-token output has no decode steps
        (("--json-schema", schema_file, "-p", "16"), ("-p does not apply",)),
        (("--temperature", "1"), ("--temperature applies only with",)),
        (("--json-schema", schema_file, "--temperature", "-1"), ("temperature",)),
        (("--json-schema", schema_file, "-n", "1"), ("-n",)),
    ]:
        p = run_cli("bench", "-m", m, *args, "--max-tokens", "512")
        assert_clean_error(p, *needles)
        assert p.returncode == 2, (args, p.returncode)
    # a bad model file is the usual exit 3, also in this mode
    assert run_cli("bench", "-m", tmp_path / "no.edgelm", "--json-schema", schema_file).returncode == 3


# ------------------------------------------------------------- what the profile led to

def _reference_draw(logits, temp, rng):
    """numpy's choice over the softmax of the finite logits: the recipe sample() must match."""
    x = logits.astype(np.float64) / temp
    ok = np.flatnonzero(np.isfinite(x))
    p = np.exp(x[ok] - x[ok].max())
    return int(ok[rng.choice(len(ok), p=p / p.sum())])


@pytest.mark.parametrize("allowed", [1, 7, 300, 20000, 140000])
def test_sampler_on_masked_logits_draws_what_numpy_choice_draws(allowed):
    """Logits mostly at -inf (a grammar's mask) take the sampler's sparse path: the same
    tokens per seed, never a forbidden one."""
    from edgelm.runtime.sampler import SamplerConfig, _live, sample

    vocab = 262144 // 4
    for seed in range(6):
        g = np.random.default_rng(500 + seed)
        logits = np.full(vocab, -np.inf, np.float32)
        ids = g.choice(vocab, min(allowed, vocab), replace=False)
        logits[ids] = (g.standard_normal(len(ids)) * 2.5).astype(np.float32)
        temp = (1.0, 0.7, 1.6)[seed % 3]
        y = logits.astype(np.float64) / temp
        y -= y.max()
        assert (_live(y) is not None) == (2 * len(ids) < vocab)
        got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(4):
            got = sample(logits, SamplerConfig(temperature=temp), got_rng)
            assert np.isfinite(logits[got])
            assert got == _reference_draw(logits, temp, ref_rng)


def test_apply_masks_exactly_whether_few_or_most_tokens_are_allowed():
    """apply() copies the fewer of the allowed and the forbidden positions; the result is the
    naive mask either way, rows past the tokenizer's vocabulary included."""
    from edgelm.runtime.constrained import Constraint, ConstraintRun
    from edgelm.runtime.engine import Engine

    eng = Engine(tiny_bundle())
    n, rows = eng.tokenizer.vocab_size, eng.config.vocab_size
    rng = np.random.default_rng(3)
    seen = set()
    for regex, prefix in (("(the|a) [0-9]", ""), ("x[^\"]{0,40}", "x")):
        run = ConstraintRun(Constraint(eng, regex=regex))
        for t in eng.tokenizer.encode(prefix, add_bos=False) if prefix else ():
            run.advance(t)
        ok = run.allowed()
        seen.add(2 * int(ok.sum()) > n)
        logits = rng.standard_normal(rows).astype(np.float32)
        want = np.full(rows, -np.inf, np.float32)
        want[:n][ok] = logits[:n][ok]
        assert np.array_equal(run.apply(logits.copy()), want), regex
    assert seen == {False, True}  # both branches ran


def test_mask_timings_are_opt_in():
    from edgelm.runtime.constrained import Constraint, MaskTimings
    from edgelm.runtime.engine import Engine

    eng = Engine(tiny_bundle())
    c = Constraint(eng, regex="[0-9]{6}")
    assert c.timings is None
    s = eng.create_session({"temperature": 0})
    list(s.generate("hi", max_new_tokens=10, constraint=c))  # untimed: nothing to count
    c.timings = MaskTimings()
    st = list(s.generate("hi", max_new_tokens=10, constraint=c))[-1]
    assert st.stop_reason == "grammar_complete"
    d = c.timings.to_dict()
    # a mask for each sampled token: the run's first, then one per advance but the last
    n = st.generated_tokens
    assert d["tokens"] == n and d["masks"] == n and d["masked_tokens"] <= n
    assert d["mask_compute_ms"] > 0 and d["advance_ms"] > 0
