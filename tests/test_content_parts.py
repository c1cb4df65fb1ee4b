"""Embeddings as input: soft rows spliced into a prompt (content parts) equal transformers'
`inputs_embeds`, survive chunked prefill, and bad parts are clear errors."""

import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm.backends import cpu
from edgelm.errors import BadInputError
from edgelm.runtime.content import Audio, Embeddings, Image, Text, Tokens, resolve
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


def test_tokens_parts_are_fed_as_they_are_and_dicts_read_as_parts():
    eng = Engine(tiny_bundle(), max_tokens=64)
    h = eng.config.hidden_size
    ids = eng.tokenize("Hello")  # with its BOS
    rows = np.ones((2, h), np.float32)
    got, soft = resolve(eng, [Tokens(ids), Embeddings(rows, 5), Tokens([7])], add_bos=True)
    assert got == ids + [5, 5, 7] and soft.rows.tolist() == [len(ids), len(ids) + 1]  # no second BOS
    assert resolve(eng, ["Hello", {"type": "text", "text": " world"}], add_bos=True)[0] == eng.tokenize("Hello world")
    with pytest.raises(BadInputError, match=r"content part 1: token id 999 at position 0 is outside"):
        resolve(eng, ["x", Tokens([999])], add_bos=True)


# ----------------------------------------------------------------------------- conversations

from edgelm.errors import CapacityError  # noqa: E402
from edgelm.runtime.conversation import SOFT_MARK, ChatTemplate  # noqa: E402

GREEDY = {"temperature": 0.0}
# Gemma 3's own template (abridged from its tokenizer_config.json), which reads typed content.
TYPED_GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = "" -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
  {%- if message['content'] is string -%}
    {{ message['content'] | trim }}
  {%- elif message['content'] is iterable -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'image' -%}
        {{ '<start_of_image>' }}
      {%- elif item['type'] == 'text' -%}
        {{ item['text'] | trim }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}"""


@pytest.fixture(scope="module")
def ref_eng():
    # numpy: the exact reference; chunks of 64 make the sliding-window rings long enough to
    # rewind a few dozen tokens instead of resetting.
    e = Engine(tiny_bundle(), backend="numpy", max_tokens=256, prefill_chunk=64, kv_dtype="f32")
    yield e
    e.close()


def _conv(eng, typed=False, **kw):
    conv = eng.create_conversation(sampler=GREEDY, max_new_tokens=kw.pop("max_new_tokens", 6), **kw)
    if typed:
        conv.template = ChatTemplate(TYPED_GEMMA, "<bos>", "<eos>")
    return conv


def _next_logits(conv):
    """The logits after feeding the pending token: they depend on the whole KV state."""
    s = conv.session.clone()
    return s.decode_step(s.pending_token)


@pytest.mark.parametrize("typed", [False, True])
def test_conversation_soft_words_equal_the_words_as_text(ref_eng, typed):
    eng = ref_eng
    words = eng.tokenize(" river town", add_bos=False)
    rows = _scaled_rows(eng, words)
    text = _conv(eng, typed)
    soft = _conv(eng, typed)
    first = ({"type": "text", "text": "The"} if typed else "The")
    assert soft.template.typed_content is typed
    reply = soft.send([first, Embeddings(rows, 0), Text(", kept its records")])
    assert text.send("The river town, kept its records") == reply
    a, b = text.session, soft.session
    assert a.generated_ids == b.generated_ids
    # the same sequence, but for the placeholder ids where the rows went in
    i = b.tokens.index(0)
    assert b.tokens[i:i + len(words)] == [0] * len(words)
    assert a.tokens == b.tokens[:i] + words + b.tokens[i + len(words):]
    ref = _next_logits(text)
    np.testing.assert_allclose(_next_logits(soft), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the rows are what the model saw: other rows, other state (the tiny model's greedy
    # replies alone are too repetitive to tell)
    zero = _conv(eng, typed)
    zero.send(["The", Embeddings(np.zeros_like(rows), 0), ", kept its records"])
    assert np.abs(_next_logits(zero) - ref).max() > 1e-3
    # a next turn reuses everything held (the same part, by identity) and stays exact
    assert text.send("thanks") == soft.send("thanks")
    assert soft.last_prefill_tokens == text.last_prefill_tokens < 20
    assert b.prefilled_tokens == b.n_tokens  # nothing fed twice
    ref = _next_logits(text)
    np.testing.assert_allclose(_next_logits(soft), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert SOFT_MARK not in soft.render() and "<pad>" * len(words) in soft.render()


def test_conversation_cache_reuse_compares_the_soft_rows(ref_eng):
    eng = ref_eng
    h = eng.config.hidden_size
    rng = np.random.default_rng(5)
    a = rng.normal(0, 1, (3, h)).astype(np.float32)

    def msg(rows):
        return ["Look at", Embeddings(rows, 0), " and say what it is"]

    conv = _conv(eng, max_new_tokens=4)
    conv.send(msg(a))
    n_prompt = conv.last_stats.prompt_tokens
    start = conv.session.tokens.index(0)
    prompt = conv.session.tokens[:n_prompt]

    def again(rows):
        """Send the same message again in place of the last turn (a regenerate)."""
        conv.messages = conv.messages[:-2]
        conv.send(msg(rows))
        assert conv.session.tokens[:n_prompt] == prompt  # the ids alone never differ
        fresh = _conv(eng, max_new_tokens=4)
        fresh.send(msg(rows))
        assert fresh.session.generated_ids == conv.session.generated_ids
        ref = _next_logits(fresh)
        np.testing.assert_allclose(_next_logits(conv), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        return conv.last_prefill_tokens

    # equal rows (other arrays): the whole prompt is reused; its last token is fed again for logits
    assert again(a.copy()) == 1
    # the second row differs: reuse stops there
    b = a.copy()
    b[1] += 0.5
    assert again(b) == n_prompt - (start + 1)
    # the first row differs: reuse stops at the placeholders
    c = b.copy()
    c[0] = -c[0]
    assert again(c) == n_prompt - start
    # an earlier message's rows edited in the history: its text (hence the rendered prompt's
    # text) is unchanged, yet the next turn re-feeds from the edited row
    e = c.copy()
    e[2] *= 2
    conv.messages[-2]["content"] = msg(e)
    conv.send("thanks")
    n_ids = conv.session.n_tokens - (len(conv.session.generated_ids) - 1)
    assert conv.last_prefill_tokens == n_ids - (start + 2)
    fresh = _conv(eng, max_new_tokens=4)
    fresh.messages = [dict(m) for m in conv.messages[:-2]]
    fresh.send("thanks")
    assert fresh.session.tokens == conv.session.tokens
    ref = _next_logits(fresh)
    np.testing.assert_allclose(_next_logits(conv), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the caller's array changing afterwards cannot reach the history (it keeps a copy)
    d = c.copy()
    conv.messages = conv.messages[:-2]
    conv.send(msg(d))
    d[:] = 0
    assert np.abs(conv.messages[-2]["content"][1].values).max() > 0
    with pytest.raises(ValueError):
        conv.messages[-2]["content"][1].values[0, 0] = 1.0


def test_conversation_typed_template_places_images_and_string_templates_join_text(ref_eng):
    typed = _conv(ref_eng, typed=True)
    flat = _conv(ref_eng)
    assert typed.template.typed_content and not flat.template.typed_content
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is "}, Image("cat.png"),
                                         {"type": "text", "text": " this?"}]}]
    assert typed.render(msgs) == ("<bos><start_of_turn>user\nWhat is<start_of_image>this?<end_of_turn>\n"
                                  "<start_of_turn>model\n")
    with pytest.raises(BadInputError, match=r"messages\[0\].content\[1\]: the chat template reads string content only"):
        flat.render(msgs)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is "}, "this?"]}]
    assert flat.render(msgs) == flat.render([{"role": "user", "content": "What is this?"}])


def test_conversation_bad_parts_are_clear_errors_and_change_nothing(ref_eng):
    eng = ref_eng
    h = eng.config.hidden_size
    conv = _conv(eng)
    conv.send(["Hello", Embeddings(np.ones((2, h), np.float32), 0)])

    def snapshot():
        s = conv.session
        return (list(conv.messages), [dict(m) for m in conv.messages], list(s.tokens), s.pending_token,
                conv._held_text, list(conv._held_soft), conv.dropped_messages)

    before = snapshot()
    cases = [
        ([Image("cat.png")], r"message\[0\]: this bundle .* has no image encoder", BadInputError),
        (["hi", Audio(b"RIFF")], r"message\[1\]: .* has no audio encoder", BadInputError),
        ([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}], "has no image encoder", BadInputError),
        ([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}], "has no audio encoder",
         BadInputError),
        ([{"type": "video", "video": "x.mp4"}], r"message\[0\]: part type must be text, image or audio, got 'video'",
         BadInputError),
        ([{"type": "text", "text": 5}], r"message\[0\]: a text part needs 'text'", BadInputError),
        (["x", Embeddings(np.ones((2, h + 1), np.float32))], rf"message\[1\]: embeddings must be \[m, {h}\]",
         BadInputError),
        ([Embeddings(np.full((1, h), np.nan, np.float32))], r"message\[0\]: embeddings must be finite.*row 0",
         BadInputError),
        ([Embeddings(np.full((1, h), 1e300))], "finite", BadInputError),  # float64 past float32's range
        ([Embeddings(np.ones((1, h), np.float32), token_id=10**9)], "token_id 1000000000 is outside the vocabulary",
         BadInputError),
        ([Embeddings(np.ones((300, h), np.float32))], "300 embedding rows exceed the KV-cache capacity of 256",
         BadInputError),
        # fits on its own, not with the history
        ([Embeddings(np.ones((250, h), np.float32))], "no longer fits", CapacityError),
        (["ok", 3.5], r"message\[1\]: expected text, Embeddings", BadInputError),
        ([Tokens([1, 2])], "token ids cannot go through the chat template", BadInputError),
        (["a" + SOFT_MARK], "reserved embeddings marker", BadInputError),
        (42, "must be a string or a list of content parts", BadInputError),
    ]
    for bad, needle, err in cases:
        with pytest.raises(err, match=needle):
            conv.send(bad)
        assert snapshot() == before, bad
    # a template that drops a part is caught before anything changes
    conv.template = ChatTemplate("{% for m in messages %}{{ m.content if m.content is string else m.content[0].text }}"
                                 "{% endfor %}")
    assert conv.template.typed_content
    with pytest.raises(BadInputError, match="placed 0 of the 2 embeddings parts"):
        conv.send(["Hi", Embeddings(np.ones((1, h), np.float32))])
    assert snapshot() == before
    conv.template = _conv(eng).template
    assert isinstance(conv.send("ok"), str) and len(conv.messages) == 4  # still usable
