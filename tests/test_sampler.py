"""Sampler: validation, greedy, seeded determinism, and the top-k / top-p supports."""

import numpy as np
import pytest

from edgelm.errors import BadInputError
from edgelm.runtime.sampler import SamplerConfig, sample, top_p_filter


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_values_are_rejected(kwargs, needle):
    with pytest.raises(BadInputError, match=needle):
        SamplerConfig(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(BadInputError, match="unknown sampler fields"):
        SamplerConfig.coerce({"temprature": 1.0})


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000)
    assert sample(logits, SamplerConfig(temperature=0), np.random.default_rng()) == int(np.argmax(logits))


def test_same_seed_same_tokens():
    logits = np.random.default_rng(1).standard_normal(5000)
    cfg = SamplerConfig(temperature=1.0, seed=42)
    r1, r2 = np.random.default_rng(42), np.random.default_rng(42)
    a = [sample(logits, cfg, r1) for _ in range(50)]
    b = [sample(logits, cfg, r2) for _ in range(50)]
    assert a == b and len(set(a)) > 5  # deterministic, and really sampling


def test_top_k_restricts_support():
    logits = np.random.default_rng(2).standard_normal(1000)
    top3 = set(np.argsort(-logits)[:3].tolist())
    rng = np.random.default_rng(0)
    cfg = SamplerConfig(temperature=5.0, top_k=3)
    got = {sample(logits, cfg, rng) for _ in range(300)}
    assert got == top3


def test_top_p_restricts_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = np.exp(logits)
    assert list(top_p_filter(probs, 0.79)) == [0, 1]
    assert list(top_p_filter(probs, 0.81)) == [0, 1, 2]
    rng = np.random.default_rng(0)
    got = {sample(logits, SamplerConfig(temperature=1.0, top_p=0.75), rng) for _ in range(300)}
    assert got == {0, 1}


def test_temperature_sharpens():
    logits = np.array([2.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    cold = [sample(logits, SamplerConfig(temperature=0.05), rng) for _ in range(200)]
    hot = [sample(logits, SamplerConfig(temperature=5.0), rng) for _ in range(200)]
    assert cold.count(0) == 200 and len(set(hot)) == 3


def test_non_finite_logits_are_a_clear_error():
    from edgelm.errors import EdgelmError

    logits = np.array([0.5, np.nan, 1.0], np.float32)
    rng = np.random.default_rng(0)
    with pytest.raises(EdgelmError, match="non-finite logits"):
        sample(logits, SamplerConfig(temperature=1.0), rng)
    with pytest.raises(EdgelmError, match="non-finite logits"):
        sample(np.full(4, np.inf, np.float32), SamplerConfig(temperature=0.7, top_k=2), rng)


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 1.0, 1.0), (0, 0.9, 0.7), (50, 1.0, 1.3), (50, 0.8, 0.9), (3, 0.5, 2.0)])
def test_sampling_draws_what_numpy_choice_draws(top_k, top_p, temp):
    """The sampler's inverse-CDF draw is numpy's Generator.choice(p=...) without its argument
    checks: for a seed, the same tokens as the plain top-k / softmax / top-p / choice recipe."""
    from edgelm.runtime.sampler import softmax, top_k_filter, top_p_filter

    cfg = SamplerConfig(temperature=temp, top_k=top_k, top_p=top_p)
    vocab = 5000
    for seed in range(20):
        logits = (np.random.default_rng(100 + seed).standard_normal(vocab) * 2.5).astype(np.float32)
        got_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(3):
            got = sample(logits, cfg, got_rng)
            x = logits.astype(np.float64)
            idx = top_k_filter(x, top_k)
            probs = softmax(x[idx] / temp)
            keep = top_p_filter(probs, top_p)
            idx, probs = idx[keep], probs[keep]
            want = int(idx[ref_rng.choice(len(idx), p=probs / probs.sum())])
            assert got == want, (seed, got, want)


def test_token_logprobs_are_log_softmax():
    from edgelm.runtime.sampler import token_logprobs

    x = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 4
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
    lp, top = token_logprobs(x, 17, 5)
    assert lp == pytest.approx(ref[17], abs=1e-5)
    order = np.argsort(-ref)[:5]
    assert [i for i, _ in top] == list(order)
    assert [v for _, v in top] == pytest.approx(list(ref[order]), abs=1e-5)
    assert token_logprobs(x, 3, 0)[1] == []


def test_generate_records_logprobs():
    from edgelm import Engine
    from edgelm.errors import BadInputError
    from edgelm.runtime.sampler import token_logprobs
    from tests.tiny_bundle import tiny_bundle

    eng = Engine(tiny_bundle())
    s = eng.create_session({"temperature": 1.0, "seed": 3})
    list(s.generate("Hello", max_new_tokens=6, logprobs=2))
    assert [e.token for e in s.generated_logprobs] == s.generated_ids
    assert all(len(e.top) == 2 and e.logprob <= 0 for e in s.generated_logprobs)
    ref = eng.create_session()
    logits = ref.prefill(eng.tokenize("Hello", add_bos=True))[:eng.tokenizer.vocab_size]
    assert s.generated_logprobs[0].logprob == pytest.approx(token_logprobs(logits, s.generated_ids[0])[0], abs=1e-5)
    list(s.generate("again", max_new_tokens=2))
    assert s.generated_logprobs == []  # not asked this time
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(BadInputError, match="logprobs"):
            s.generate("x", max_new_tokens=1, logprobs=bad)
