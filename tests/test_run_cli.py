"""`edgelm run` on a tiny model: prompts from stdin and files, stop strings, penalties, the
default capacity, and what a GGUF or checkpoint dir passed where a bundle belongs gets."""

import json

import pytest

from .conftest import assert_clean_error, run_cli
from .test_cli import _tiny_gguf
from .tiny_bundle import tiny_bundle

GREEDY = ("--temperature", "0", "-q")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def test_default_capacity_fits_a_short_context(bundle):
    """The tiny model's context is 1024 tokens: the default capacity is min(4096, context)."""
    from edgelm.runtime.engine import Engine

    eng = Engine(bundle)
    assert eng.config.max_position_embeddings == 1024 and eng.max_tokens == 1024
    p = run_cli("run", "hello there", "-m", bundle, "-n", "3", *GREEDY)
    assert p.returncode == 0, p.stderr
    assert_clean_error(run_cli("run", "hi", "-m", bundle, "--max-tokens", "4096"), "exceeds the model's context of 1024")


def test_prompt_from_stdin_and_file(bundle, tmp_path):
    arg = run_cli("run", "The river town kept its records", "-m", bundle, "-n", "6", *GREEDY)
    assert arg.returncode == 0, arg.stderr and arg.stdout.strip()
    stdin = run_cli("run", "-", "-m", bundle, "-n", "6", *GREEDY, input="The river town kept its records")
    assert stdin.returncode == 0, stdin.stderr
    f = tmp_path / "prompt.txt"
    f.write_text("The river town kept its records", encoding="utf-8")
    fromfile = run_cli("run", "-f", f, "-m", bundle, "-n", "6", *GREEDY)
    assert fromfile.returncode == 0, fromfile.stderr
    assert arg.stdout == stdin.stdout == fromfile.stdout
    assert_clean_error(run_cli("run", "-f", tmp_path / "none.txt", "-m", bundle), "none.txt", "no such text file")
    assert_clean_error(run_cli("run", "x", "-f", f, "-m", bundle), "not both")
    assert_clean_error(run_cli("run", "-m", bundle), "no prompt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    assert_clean_error(run_cli("run", "-f", bad, "-m", bundle), "latin1.txt", "not UTF-8")


def test_stop_strings_and_penalties(bundle):
    full = run_cli("run", "one two three", "-m", bundle, "-n", "24", *GREEDY)
    assert full.returncode == 0, full.stderr
    text = full.stdout.rstrip("\n")
    assert len(text) > 4
    # stop at a piece of the greedy text: the output is what came before it
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text[:text.index(stop)]
    p = run_cli("run", "one two three", "-m", bundle, "-n", "24", "--stop", "never-seen-xyz", "--stop", stop, *GREEDY)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n") == cut
    # a strong penalty changes greedy text that repeats tokens; bad values are clean errors
    pen = run_cli("run", "one two three", "-m", bundle, "-n", "24", "--repetition-penalty", "5",
                  "--presence-penalty", "2", "--frequency-penalty", "2", *GREEDY)
    assert pen.returncode == 0, pen.stderr
    assert_clean_error(run_cli("run", "x", "-m", bundle, "--presence-penalty", "3"), "presence_penalty")
    assert_clean_error(run_cli("run", "x", "-m", bundle, "--repetition-penalty", "0"), "repetition_penalty")


def test_penalties_reach_the_sampler(bundle):
    """The penalties change what greedy decoding picks when the text repeats."""
    from edgelm.runtime.engine import Engine

    eng = Engine(bundle)
    ids = eng.tokenize("a a a a a a a a", add_bos=False)

    def greedy(**kw):
        s = eng.create_session({"temperature": 0.0, **kw})
        return [x for x in s.generate("a a a a a a a a", max_new_tokens=16) if isinstance(x, str)]

    plain = "".join(greedy())
    penal = "".join(greedy(repetition_penalty=5.0, presence_penalty=2.0, frequency_penalty=2.0))
    assert ids and plain != penal


def test_gguf_or_checkpoint_dir_where_a_bundle_belongs(tmp_path):
    g = tmp_path / "gemma-3-270m.gguf"
    _tiny_gguf(g, "gemma3")
    hf = tmp_path / "gemma-3-1b-it"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    for args in (("run", "hi", "-m", g), ("chat", "-m", g), ("inspect", g), ("serve", "-m", g, "--port", "0"),
                 ("bench", "-m", g), ("eval", "ppl", "-m", g, "--text", g)):
        p = run_cli(*args)
        assert_clean_error(p, "is a GGUF file, not an edgelm bundle", f"edgelm convert {g} -o {tmp_path}/gemma-3-270m.edgelm")
        assert p.returncode == 3
    for args in (("run", "hi", "-m", hf), ("chat", "-m", hf), ("inspect", hf), ("serve", "-m", hf, "--port", "0")):
        p = run_cli(*args)
        assert_clean_error(p, "is a Hugging Face checkpoint directory", f"edgelm convert {hf} -o {tmp_path}/gemma-3-1b-it.edgelm")


def test_chat_says_when_the_model_is_a_base_model():
    base = run_cli("chat", "-m", tiny_bundle("gemma-3-base"), "--temperature", "0", "-n", "2", "-q", input="hi\n")
    assert base.returncode == 0, base.stderr
    assert "note: This is a base model" in base.stderr
    tuned = run_cli("chat", "-m", tiny_bundle(), "--temperature", "0", "-n", "2", "-q", input="hi\n")
    assert tuned.returncode == 0, tuned.stderr
    assert "base model" not in tuned.stderr


def test_gguf_with_a_zero_head_count_is_a_format_error(tmp_path):
    path = tmp_path / "zero-heads.gguf"
    _tiny_gguf(path, "gemma3", embedding_length=32, feed_forward_length=64, head_count=0)
    p = run_cli("convert", path, "-o", tmp_path / "o.edgelm")
    assert_clean_error(p, "zero-heads.gguf", "gemma3.attention.head_count must be a positive integer, got 0")
    assert p.returncode == 3
