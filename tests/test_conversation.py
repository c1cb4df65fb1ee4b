"""Conversation API and session features on a tiny random model: chat template (sandboxed,
Gemma system folding, single BOS), KV reuse across turns (counted prefill tokens), rewinds,
clone, cancel, stop strings, penalties and the context-overflow policies."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

from edgelm import Engine  # noqa: E402
from edgelm.errors import BadInputError, CapacityError  # noqa: E402
from edgelm.runtime.conversation import ChatTemplate  # noqa: E402
from edgelm.backends.kvcache import KVCache  # noqa: E402
from edgelm.runtime.sampler import SamplerConfig, apply_penalties  # noqa: E402
from edgelm.runtime.session import GenerationStats, StopStrings  # noqa: E402

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def eng(bundle):
    e = Engine(bundle, max_tokens=512, prefill_chunk=8)
    yield e
    e.close()


def run(gen):
    """(text, stats) of a Session.generate() generator."""
    pieces, stats = [], None
    for p in gen:
        if isinstance(p, GenerationStats):
            stats = p
        else:
            pieces.append(p)
    return "".join(pieces), stats


def greedy_ids(eng, ids, n):
    s = eng.create_session(GREEDY)
    run(s.generate(list(ids), max_new_tokens=n))
    return list(s.generated_ids)


# ----------------------------------------------------------------------------- template


def test_template_folds_system_and_emits_one_bos(eng):
    conv = eng.create_conversation(system="Be brief.")
    text = conv.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    from edgelm.runtime.conversation import prompt_ids

    ids = prompt_ids(eng, text)
    bos = eng.tokenizer.bos_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1] == eng.tokenizer.start_of_turn_id


def test_template_is_sandboxed_and_raise_exception_is_clean():
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(BadInputError, match="chat template"):
        evil.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}x")
    with pytest.raises(BadInputError):
        mutate.render([{"role": "user", "content": "x"}])


def test_roles_must_alternate(eng):
    conv = eng.create_conversation()
    with pytest.raises(BadInputError, match="alternate"):
        conv.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ----------------------------------------------------------------------------- KV reuse


def test_each_turn_prefills_only_its_new_tokens(eng):
    conv = eng.create_conversation(system="Be brief.", sampler=GREEDY, max_new_tokens=6)
    tok = eng.tokenizer
    msgs = ["Hello world", "What is the capital of France?", "thanks please"]
    first = conv.render(conv.history + [{"role": "user", "content": msgs[0]}])
    conv.send(msgs[0])
    assert conv.last_prefill_tokens == len(tok.encode(first))  # the whole first prompt
    for m in msgs[1:]:
        held = conv.session.held_tokens
        prev_text = conv._held_text
        new_text = conv.render(conv.history + [{"role": "user", "content": m}])
        assert new_text.startswith(prev_text)
        n_new = len(tok.encode(new_text[len(prev_text):]))
        # The message's own tokens plus a handful of template tokens ("<end_of_turn>\n<start_of_turn>user\n"
        # ... "<start_of_turn>model\n"), plus the previous reply's last token, sampled but never fed.
        assert n_new <= len(tok.encode(m)) + 12
        conv.send(m)
        assert conv.last_prefill_tokens == n_new + 1, (conv.last_prefill_tokens, n_new)
        assert conv.session.tokens[:len(held)] == held
    # Nothing was ever fed twice: every forwarded token is one the cache still holds.
    assert conv.session.prefilled_tokens == conv.session.n_tokens
    # And the reused state is right: a fresh session given the last prompt replies the same.
    s = conv.session
    n_prompt = s.n_tokens - (len(s.generated_ids) - 1)
    assert greedy_ids(eng, s.tokens[:n_prompt], 6) == s.generated_ids


def test_reply_stops_at_end_of_turn_and_next_turn_reuses_it(eng, monkeypatch):
    conv = eng.create_conversation(sampler=GREEDY, max_new_tokens=20)
    eot = eng.tokenizer.end_of_turn_id
    real = conv.session.sample
    calls = {"n": 0}

    def forced(logits, generated=()):
        calls["n"] += 1
        return eot if calls["n"] == 4 else real(logits, generated)

    monkeypatch.setattr(conv.session, "sample", forced)
    reply = conv.send("Hello world")
    assert conv.last_stats.stop_reason == "stop_token" and conv.last_stats.generated_tokens == 4
    assert "<end_of_turn>" not in reply and conv.session.pending_token == eot
    monkeypatch.setattr(conv.session, "sample", real)
    prev = conv._held_text
    assert prev.endswith("<end_of_turn>")
    nxt = conv.render(conv.history + [{"role": "user", "content": "thanks"}])
    assert nxt.startswith(prev) and nxt[len(prev):].startswith("\n<start_of_turn>user\n")
    conv.send("thanks")
    assert conv.last_prefill_tokens == 1 + len(eng.tokenizer.encode(nxt[len(prev):]))
    assert conv.session.prefilled_tokens == conv.session.n_tokens


def test_edited_history_rewinds_to_the_common_prefix(eng):
    conv = eng.create_conversation(sampler=GREEDY, max_new_tokens=4)
    conv.send("Hello world")
    conv.send("Gemma is a family")
    before = conv.session.n_tokens
    conv.messages[-1]["content"] = "something else entirely"  # rewrite the last reply
    conv.send("thanks")
    text = conv.render(conv.history[:-1], add_generation_prompt=True)
    full = len(eng.tokenizer.encode(text))
    assert 0 < conv.last_prefill_tokens < full  # reused a prefix, re-fed the rest
    assert conv.session.prefilled_tokens < before + full
    s = conv.session
    n_prompt = s.n_tokens - (len(s.generated_ids) - 1)
    assert s.tokens[:n_prompt] == eng.tokenizer.encode(text)
    assert greedy_ids(eng, s.tokens[:n_prompt], 4) == s.generated_ids


def test_ring_buffer_rewind_checks_and_falls_back_to_reset(eng):
    # Window 8, chunk 8 -> local rings of 15 slots. Positions 0..39 held; rewinding to 35
    # still has the 7 positions the window needs; rewinding to 10 does not.
    c = KVCache(15, 1, 2)
    c.window = 8
    for p in range(40):
        c.update(np.ones((1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32), np.array([p]))
    assert c.can_truncate(35) and c.can_truncate(40) and c.can_truncate(33)
    assert not c.can_truncate(10) and not c.can_truncate(30)
    s = eng.create_session(GREEDY)
    ids = eng.tokenize("The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer")
    assert len(ids) > 30
    s.prefill(ids)
    assert s.can_rewind(len(ids) - 3) and not s.can_rewind(5)
    new = ids[:5] + [7, 8, 9]
    feed = s.sync(new)  # diverges at 5: too far back for the rings -> reset
    assert s.n_tokens == 0 and feed == new
    np.testing.assert_allclose(s.prefill(feed), eng.create_session().prefill(new), rtol=1e-5, atol=1e-5)
    s = eng.create_session(GREEDY)
    s.prefill(ids)
    new = ids[:-3] + [7, 8]
    feed = s.sync(new)  # a short rewind keeps the prefix
    assert feed == [7, 8] and s.n_tokens == len(ids) - 3
    np.testing.assert_allclose(s.prefill(feed), eng.create_session().prefill(new), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sessions


def test_clone_branches_continue_independently(eng):
    base = eng.tokenize("Hello world, this is")
    s = eng.create_session(GREEDY)
    run(s.generate(base, max_new_tokens=3))
    a = s.clone()
    b = s.clone()
    ta = eng.tokenize(" the lazy dog", add_bos=False)
    tb = eng.tokenize(" Gemma is", add_bos=False)
    run(a.generate(ta, max_new_tokens=5))
    run(b.generate(tb, max_new_tokens=5))
    run(s.generate(ta, max_new_tokens=5))  # the original is untouched by its clones
    for branch, extra in ((a, ta), (b, tb)):
        prompt = branch.tokens[: len(branch.tokens) - (len(branch.generated_ids) - 1)]
        assert prompt[-len(extra):] == extra
        assert greedy_ids(eng, prompt, 5) == branch.generated_ids
    assert s.generated_ids == a.generated_ids and s.tokens == a.tokens
    assert a.tokens != b.tokens


def test_cancel_from_another_thread_stops_within_one_step(eng):
    s = eng.create_session(GREEDY)
    gen = s.generate(eng.tokenize("Hello world"), max_new_tokens=50)
    got = []
    for p in gen:
        if isinstance(p, GenerationStats):
            stats = p
            break
        got.append(p)
        if len(got) == 3:
            t = threading.Thread(target=s.cancel)
            t.start()
            t.join()
    assert stats.stop_reason == "cancelled"
    assert stats.generated_tokens <= 4  # at most the step already under way
    # still usable, and its state is exactly the tokens it holds
    text, st = run(s.generate(eng.tokenize(" thanks", add_bos=False), max_new_tokens=5))
    assert st.stop_reason == "max_new_tokens" and st.generated_tokens == 5
    prompt = s.tokens[: len(s.tokens) - 4]
    assert greedy_ids(eng, prompt, 5) == s.generated_ids


def test_cancel_event_before_start_does_no_work(eng):
    s = eng.create_session(GREEDY)
    ev = threading.Event()
    ev.set()
    text, st = run(s.generate(eng.tokenize("Hello"), max_new_tokens=5, cancel=ev))
    assert text == "" and st.stop_reason == "cancelled" and s.n_tokens == 0


def test_cancel_during_prefill_stops_between_chunks(eng, monkeypatch):
    s = eng.create_session(GREEDY)
    ids = eng.tokenize("The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer")
    assert len(ids) > 24  # chunks of 8
    ev = threading.Event()
    real = s._forward
    calls = []

    def forward(part, mode, embeds=None, **kw):
        calls.append(len(part))
        if len(calls) == 2:
            ev.set()
        return real(part, mode, embeds, **kw)

    monkeypatch.setattr(s, "_forward", forward)
    text, st = run(s.generate(ids, max_new_tokens=5, cancel=ev))
    assert st.stop_reason == "cancelled" and st.generated_tokens == 0 and text == ""
    assert calls == [8, 8] and s.n_tokens == 16 and s.pending_token is None
    monkeypatch.setattr(s, "_forward", real)
    run(s.generate(ids[16:], max_new_tokens=5))  # picks up where it stopped
    assert s.generated_ids == greedy_ids(eng, ids, 5)


def test_conversation_cancel_keeps_partial_reply(eng):
    conv = eng.create_conversation(sampler=GREEDY, max_new_tokens=40)
    it = conv.stream("Hello world")
    first = next(it)
    conv.cancel()
    rest = "".join(it)
    assert conv.last_stats.stop_reason == "cancelled"
    assert conv.messages[-1] == {"role": "assistant", "content": first + rest}
    conv.send("thanks", max_new_tokens=3)  # usable afterwards
    assert conv.last_stats.generated_tokens == 3 and len(conv.messages) == 4


def test_stop_strings_split_across_pieces():
    st = StopStrings(["END", "xyz"])
    out = "".join(st.feed(p) for p in ["ab", "cE", "N", "Dz"]) + st.flush()
    assert out == "abc" and st.stopped == "END"
    st = StopStrings(["END"])
    out = "".join(st.feed(p) for p in ["ab", "EN", "x", "E"]) + st.flush()
    assert out == "abENxE" and st.stopped is None
    st = StopStrings([])
    assert st.feed("abc") == "abc"


def test_session_stop_string_and_max_new_tokens(eng):
    ids = eng.tokenize("Hello world")
    full, st = run(eng.create_session(GREEDY).generate(ids, max_new_tokens=12))
    assert st.generated_tokens == 12 and st.stop_reason == "max_new_tokens"
    stop = full[4:6]
    cut = full.find(stop)
    text, st = run(eng.create_session(GREEDY).generate(ids, max_new_tokens=12, stop=[stop, "\x00never"]))
    assert text == full[:cut] and st.stop_reason == "stop_string"
    with pytest.raises(BadInputError, match="stop"):
        eng.create_session().generate(ids, stop=[""])
    with pytest.raises(BadInputError, match="stop"):
        eng.create_session().generate(ids, stop=[1])


# ----------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("kw,needle", [
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"penalty_last_n": -1}, "penalty_last_n"),
])
def test_penalty_validation(kw, needle):
    with pytest.raises(BadInputError, match=needle):
        SamplerConfig(**kw)


def test_penalty_math():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 1.0])
    cfg = SamplerConfig(repetition_penalty=2.0, penalty_last_n=2)
    out = apply_penalties(logits, cfg, context=[0, 1, 3, 1], generated=[])
    np.testing.assert_allclose(out, [2.0, -2.0, 0.5, 1.5, 1.0])  # only the last 2 tokens (3, 1)
    cfg = SamplerConfig(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, cfg, context=[], generated=[2, 2, 4])
    np.testing.assert_allclose(out, [2.0, -1.0, 0.5 - 0.5 - 0.5, 3.0, 1.0 - 0.5 - 0.25])
    assert apply_penalties(logits, SamplerConfig(), [1], [1]) is logits
    assert SamplerConfig.coerce({"presence_penalty": 1.0}).presence_penalty == 1.0


def test_repetition_penalty_changes_generation(eng):
    ids = eng.tokenize("Hello world")
    s = eng.create_session(GREEDY)
    run(s.generate(ids, max_new_tokens=10))
    plain = s.generated_ids
    assert len(set(plain)) < len(plain)  # the tiny random model repeats itself
    s = eng.create_session({"temperature": 0.0, "repetition_penalty": 1e9, "penalty_last_n": 0})
    run(s.generate(ids, max_new_tokens=10))
    assert len(set(s.generated_ids)) == 10 and not set(s.generated_ids) & set(ids)
    s = eng.create_session({"temperature": 0.0, "frequency_penalty": 2.0, "presence_penalty": 2.0})
    run(s.generate(ids, max_new_tokens=10))
    assert len(set(s.generated_ids)) > len(set(plain))


# ----------------------------------------------------------------------------- overflow


@pytest.fixture(scope="module")
def small_eng(bundle):
    e = Engine(bundle, max_tokens=64, prefill_chunk=8)
    yield e
    e.close()


def test_overflow_error_is_clear_and_conversation_survives(small_eng):
    conv = small_eng.create_conversation(system="Be brief.", sampler=GREEDY, max_new_tokens=6)
    with pytest.raises(CapacityError, match="no longer fits") as ei:
        for _ in range(20):
            conv.send("Hello world, this is a test")
    assert "capacity is 64" in str(ei.value) and "truncate" in str(ei.value)
    n = len(conv.messages)
    assert n >= 2 and conv.messages[-1]["role"] == "assistant"
    conv.reset()
    assert conv.messages == [] and conv.n_tokens == 0 and conv.system == "Be brief."
    assert isinstance(conv.send("Hello"), str)


def test_overflow_truncate_drops_oldest_turns_keeps_system(small_eng):
    conv = small_eng.create_conversation(system="Be brief.", sampler=GREEDY, max_new_tokens=6, overflow="truncate")
    for i in range(12):
        conv.send(f"Hello world {i}")
        assert conv.n_tokens <= 64
    assert conv.dropped_messages > 0 and conv.messages[-2]["content"] == "Hello world 11"
    assert all(m["content"] != "Hello world 0" for m in conv.messages)
    assert conv.render().startswith("<bos><start_of_turn>user\nBe brief.\n\n")
    # The state after a truncating turn is right: a fresh session with that prompt agrees.
    s = conv.session
    n_prompt = s.n_tokens - (len(s.generated_ids) - 1)
    assert greedy_ids(small_eng, s.tokens[:n_prompt], 6) == s.generated_ids
    with pytest.raises(CapacityError, match="does not fit even on its own"):
        conv.send("Hello world " * 40)
    assert isinstance(conv.send("ok"), str)  # still fine afterwards


def test_bad_arguments(eng):
    with pytest.raises(BadInputError, match="overflow"):
        eng.create_conversation(overflow="drop")
    with pytest.raises(BadInputError, match="max_new_tokens"):
        eng.create_conversation(max_new_tokens=0)
    conv = eng.create_conversation()
    with pytest.raises(BadInputError, match="string"):
        conv.send(3)


def test_abandoned_replies_free_the_conversation(eng):
    conv = eng.create_conversation(sampler=GREEDY, max_new_tokens=8)
    it = conv.stream("Hello world")
    with pytest.raises(BadInputError, match="already generating"):
        conv.send("again")
    del it  # never iterated: no turn recorded, and the conversation is free again
    assert conv.messages == []
    it = conv.stream("Hello world")
    first = next(it)
    it.close()  # stopped early: the turn keeps what it got
    assert conv.messages[-1] == {"role": "assistant", "content": first}
    reply = conv.send("thanks")
    assert len(conv.messages) == 4 and conv.messages[-1]["content"] == reply
    # and the state is still exact
    s = conv.session
    n_prompt = s.n_tokens - (len(s.generated_ids) - 1)
    assert greedy_ids(eng, s.tokens[:n_prompt], 8) == s.generated_ids


@pytest.mark.slow
def test_real_model_chat_smoke(real_int8_bundle):
    """Gemma 3 270M (the pretrained model: its GGUF has no chat template, so the bundle has
    edgelm's Gemma default): the chat prompt tokenizes to Gemma's ids with one BOS, the second
    turn prefills only its own tokens, and the reused KV state equals a fresh prefill."""
    e = Engine(real_int8_bundle, max_tokens=1024)
    conv = e.create_conversation(system="Answer briefly.", sampler=GREEDY, max_new_tokens=12)
    r1 = conv.send("What is the capital of France?")
    assert r1.strip()
    prompt1 = conv.session.tokens[:conv.last_stats.prompt_tokens]
    assert prompt1[:4] == [2, 105, 2364, 107]  # <bos> <start_of_turn> user \n
    assert prompt1[-5:] == [106, 107, 105, 4368, 107]  # <end_of_turn> \n <start_of_turn> model \n
    assert prompt1.count(e.tokenizer.bos_id) == 1
    prev = conv._held_text
    nxt = conv.render(conv.history + [{"role": "user", "content": "And of Italy?"}])
    assert nxt.startswith(prev)
    conv.send("And of Italy?")
    assert conv.last_prefill_tokens == 1 + len(e.tokenizer.encode(nxt[len(prev):])) <= 16
    assert conv.session.prefilled_tokens == conv.session.n_tokens
    s = conv.session
    n_prompt = s.n_tokens - (len(s.generated_ids) - 1)
    assert greedy_ids(e, s.tokens[:n_prompt], 12) == s.generated_ids
    e.close()


def test_kv_cache_dtype_choice():
    """f16 on the native backend by default (half the memory), f32 on numpy; rewinds and
    clones keep the dtype; anything else is a clear error."""
    from edgelm.backends import cpu

    path = tiny_bundle()
    backends = ["numpy"] + (["cpu"] if cpu.available() else [])
    for backend in backends:
        e = Engine(path, backend=backend, max_tokens=64)
        want = "float16" if backend == "cpu" else "float32"
        s = e.create_session({"temperature": 0.0})
        s.prefill(e.tokenize("hello world"))
        assert all(c.k.dtype == want and c.v.dtype == want for c in s.caches)
        assert all(c.k.dtype == want for c in s.clone().caches)
        e32 = Engine(path, backend=backend, max_tokens=64, kv_dtype="f32")
        assert all(c.k.dtype == np.float32 for c in e32.create_session().caches)
    with pytest.raises(BadInputError, match="kv_dtype"):
        Engine(path, backend="numpy", max_tokens=64, kv_dtype="bf16")
