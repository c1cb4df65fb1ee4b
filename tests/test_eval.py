"""`edgelm eval ppl`: the method (chunks, BOS, second half scored), KL and top-1, errors."""

import json
import math

import numpy as np
import pytest

from edgelm.errors import BadInputError
from edgelm.eval.ppl import make_chunks, perplexity
from edgelm.runtime.engine import Engine

from . import hf_fixtures as fx
from .conftest import assert_clean_error, run_cli

# wikitext-style: "<unk>" is a literal in the corpus, read as text (as llama-perplexity does)
TEXT = " ".join(f"the quick brown fox {i} jumps over the <unk> dog and runs away" for i in range(60))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgelm.convert import convert, load_source

    root = tmp_path_factory.mktemp("eval")
    src = load_source(fx.make_tiny_gemma3(root / "hf", seed=3, layers=3, sliding_window=8, hidden_size=128,
                                          intermediate_size=256))
    paths = {}
    for scheme in ("fp32", "int4-b32"):
        paths[scheme] = root / f"{scheme}.edgelm"
        convert(src, paths[scheme], scheme=scheme, progress=False)
    return paths


def test_chunks_replace_first_token_with_bos():
    ids = list(range(10, 110))
    ch = make_chunks(ids, 32, bos=2)
    assert len(ch) == 3 and all(len(c) == 32 and c[0] == 2 for c in ch)
    assert ch[1][1:] == ids[33:64]
    assert len(make_chunks(ids, 32, 2, max_chunks=2)) == 2
    with pytest.raises(BadInputError, match="fewer than one chunk"):
        make_chunks(ids[:20], 32, 2)


def test_ppl_equals_direct_computation(tiny):
    eng = Engine(tiny["fp32"], backend="numpy", max_tokens=32)
    r = perplexity(eng, TEXT, ctx=32, max_chunks=3, progress=False)
    # independent computation from full teacher-forced logits
    ids = eng.tokenize(TEXT, add_bos=True, parse_special=False)
    assert eng.tokenizer.unk_id not in ids and ids != eng.tokenize(TEXT, add_bos=True)
    nll = []
    for c in make_chunks(ids, 32, eng.tokenizer.bos_id, 3):
        lg = eng.score(c).astype(np.float64)
        for j in range(16, 31):
            row = lg[j] - lg[j].max()
            nll.append(-(row[c[j + 1]] - math.log(np.exp(row).sum())))
    assert r.tokens_scored == len(nll) == 3 * 15
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    assert r.ppl_stderr > 0


def test_kl_and_top1(tiny):
    ref = Engine(tiny["fp32"], backend="numpy", max_tokens=32)
    same = perplexity(ref, TEXT, ctx=32, max_chunks=2, kl_base=ref, progress=False)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agree == 1.0
    q = Engine(tiny["int4-b32"], max_tokens=32)
    r = perplexity(q, TEXT, ctx=32, max_chunks=2, kl_base=ref, progress=False)
    assert 0 < r.kl_mean < 1.0 and 0 < r.top1_agree <= 1.0
    assert r.ppl != same.ppl


def test_cli_json_and_errors(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    p = run_cli("eval", "ppl", "--model", tiny["int4-b32"], "--text", text, "--ctx", "32", "--max-chunks", "2",
                "--kl-base", tiny["fp32"], "--json")
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["chunks"] == 2 and j["tokens_scored"] == 30 and j["ppl"] > 1 and j["kl_mean"] > 0
    assert_clean_error(run_cli("eval", "ppl", "--model", tiny["fp32"], "--text", tmp_path / "none.txt"), "none.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    assert_clean_error(run_cli("eval", "ppl", "--model", tiny["fp32"], "--text", bad), "not UTF-8")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_clean_error(run_cli("eval", "ppl", "--model", tiny["fp32"], "--text", short, "--ctx", "32"),
                       "fewer than one chunk")
