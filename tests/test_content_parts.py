"""Embeddings as input: soft rows spliced into a prompt (content parts) equal transformers'
`inputs_embeds`, survive chunked prefill, and bad parts are clear errors."""

import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm.backends import cpu
from edgelm.errors import BadInputError
from edgelm.runtime.content import Audio, Embeddings, Image, Text, resolve
from edgelm.runtime.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402
from tiny_bundle import tiny_bundle  # noqa: E402

BACKENDS = ["numpy"] + (["cpu"] if cpu.available() else [])


def _scaled_rows(eng, ids):
    from edgelm.backends.numpy_ops import NumpyOps

    return NumpyOps().embed(np.asarray(ids, np.int32), eng.weights.embed) * np.float32(eng.config.hidden_size ** 0.5)


def _prefill_logits(eng, prompt):
    s = eng.create_session({"temperature": 0.0})
    ids, embeds = resolve(eng, prompt, add_bos=True) if isinstance(prompt, list) else (eng.tokenize(prompt), None)
    out = []
    for c in range(0, len(ids), eng.prefill_chunk):
        part = None if embeds is None else embeds.window(c, c + eng.prefill_chunk)
        out.append(s._forward(ids[c:c + eng.prefill_chunk], "all", part))
    return ids, np.concatenate(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tokens_own_rows_as_embeddings_change_nothing(backend):
    eng = Engine(tiny_bundle(), backend=backend, max_tokens=128, kv_dtype="f32", prefill_chunk=5)
    words = eng.tokenize(" river town", add_bos=False)
    plain_ids, plain = _prefill_logits(eng, "The" + " river town" + " kept its records")
    parts = ["The", Embeddings(_scaled_rows(eng, words), token_id=words[0]), " kept its records"]
    ids, soft = _prefill_logits(eng, parts)
    assert len(ids) == len(plain_ids)
    np.testing.assert_allclose(soft, plain, rtol=0, atol=1e-5 * np.abs(plain).max())


def test_soft_rows_match_transformers_inputs_embeds(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    d = fx.make_tiny_gemma3(tmp_path / "hf", seed=3, layers=3, sliding_window=8)
    from edgelm.convert import convert, load_source

    out = tmp_path / "m.edgelm"
    convert(load_source(d), out, scheme="fp32", progress=False)
    eng = Engine(out, backend="numpy", max_tokens=64, kv_dtype="f32", prefill_chunk=4)
    rng = np.random.default_rng(0)
    soft = rng.normal(0, 1.0, (6, eng.config.hidden_size)).astype(np.float32)
    parts = ["Describe", Embeddings(soft, token_id=0), Text(" in a few words.")]
    ids, ours = _prefill_logits(eng, parts)
    ref_model = fx.load_reference(d)
    with torch.no_grad():
        emb = ref_model.model.embed_tokens(torch.tensor([ids]))  # scaled, as Gemma's embedding is
        start = len(eng.tokenize("Describe"))
        emb[0, start:start + 6] = torch.from_numpy(soft)
        ref = ref_model(inputs_embeds=emb).logits[0].float().numpy()
    assert ours.shape == ref.shape
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() < 1e-3
    # and the soft rows matter: zero rows give other logits after them
    _, zeros = _prefill_logits(eng, ["Describe", Embeddings(np.zeros_like(soft)), Text(" in a few words.")])
    assert np.abs(zeros[start:] - ours[start:]).max() > 1e-3


def test_generate_takes_content_parts_and_rejects_bad_ones():
    eng = Engine(tiny_bundle(), max_tokens=64)
    h = eng.config.hidden_size
    s = eng.create_session({"temperature": 0.0})
    pieces = list(s.generate(["Hello", Embeddings(np.ones((3, h), np.float32) * 0.1)], max_new_tokens=3))
    stats = pieces.pop()
    assert stats.prompt_tokens == len(eng.tokenize("Hello")) + 3 and stats.generated_tokens == 3
    for bad, needle in [
        ([Image("cat.png")], "has no image encoder"),
        ([Audio(b"RIFF")], "has no audio encoder"),
        (["x", Embeddings(np.ones((2, h + 1), np.float32))], f"must be [m, {h}]"),
        ([Embeddings(np.full((1, h), np.nan, np.float32))], "finite"),
        ([Embeddings(np.ones((1, h), np.float32), token_id=10**9)], "outside the vocabulary"),
        (["ok", 3.5], "expected text, Embeddings"),
    ]:
        s2 = eng.create_session()
        with pytest.raises(BadInputError, match=needle.replace("[", r"\[")):
            s2.generate(bad, max_new_tokens=2)
        assert s2.n_tokens == 0
