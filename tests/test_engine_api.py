"""The public Engine API answers bad input with BadInputError naming the bad value."""

import numpy as np
import pytest

from edgelm.errors import BadInputError
from edgelm.runtime.engine import Engine

from .tiny_bundle import tiny_bundle


@pytest.fixture(scope="module")
def eng():
    return Engine(tiny_bundle(), max_tokens=64)


def test_detokenize_rejects_ids_outside_the_vocabulary(eng):
    n = eng.tokenizer.vocab_size
    with pytest.raises(BadInputError, match=rf"token id {n} at position 0 is outside the vocabulary \(0..{n - 1}\)"):
        eng.detokenize([n])
    with pytest.raises(BadInputError, match="token id -1 at position 2 is outside"):
        eng.detokenize([2, 3, -1])
    with pytest.raises(BadInputError, match="position 1 is not an integer: 'x'"):
        eng.detokenize([2, "x"])
    with pytest.raises(BadInputError, match="not an integer: True"):
        eng.detokenize([True])
    with pytest.raises(BadInputError, match="sequence of integers"):
        eng.detokenize(5)
    # valid ids still decode, numpy integers included
    ids = eng.tokenize("hello world", add_bos=False)
    assert eng.detokenize(np.asarray(ids, dtype=np.int64)) == eng.detokenize(ids) == "hello world"


def test_tokenize_rejects_lone_surrogates(eng):
    with pytest.raises(BadInputError, match=r"lone surrogate U\+D800 at position 0"):
        eng.tokenize("\ud800")
    with pytest.raises(BadInputError, match=r"lone surrogate U\+DFFF at position 3"):
        eng.tokenize("abc\udfffdef")
    assert eng.tokenize("abc\U0001F600def")  # a real astral character is fine


def test_generate_and_score_reject_bad_ids_before_any_work(eng):
    s = eng.create_session({"temperature": 0.0})
    with pytest.raises(BadInputError, match="lone surrogate"):
        s.generate("a\ud800", max_new_tokens=2)
    with pytest.raises(BadInputError, match="outside the vocabulary"):
        eng.score([2, eng.config.vocab_size])
    with pytest.raises(BadInputError, match="not an integer"):
        eng.score([2, 3.5])
    assert s.n_tokens == 0


def test_the_engine_is_not_modified_by_what_uses_it(eng):
    """Conversations, the importance recorder and sessions keep their state beside the
    engine: its attributes are the same objects before and after."""
    from edgelm.runtime import imatrix as im

    before = dict(vars(eng))
    conv = eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=3)
    conv.send("hello")
    im.collect(eng, [[eng.tokenizer.bos_id, *eng.tokenize("one two three", add_bos=False)]])
    s = eng.create_session()
    list(s.generate("x", max_new_tokens=2))
    after = dict(vars(eng))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), [k for k in before if after[k] is not before[k]]
