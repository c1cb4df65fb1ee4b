"""Mutated bundle headers: loading checks the config, the tensor table and the special tokens.

A tiny valid Gemma 3 and Gemma 3n bundle get one header field changed at a time (a fixed
list of zero / negative / huge / wrong-type / null values for every config field and special
token, then a seeded random set), and `edgelm inspect` plus a short greedy `edgelm run` must
each either work or exit with a clean error (2 or 3): never an internal error (70), a
traceback or a crash. Both commands run in-process through the CLI's entry point.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import struct
import sys
from pathlib import Path

import pytest

from edgelm.cli.main import entry
from edgelm.errors import FormatError
from edgelm.format.bundle import PAGE

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

_PREFIX = struct.Struct("<8sIIQQ")


def read_header(raw: bytes) -> dict:
    _, _, _, hlen, _ = _PREFIX.unpack_from(raw, 0)
    return json.loads(raw[_PREFIX.size:_PREFIX.size + hlen])


def with_header(raw: bytes, header: dict) -> bytes:
    """The bundle `raw` with its header replaced; the data section moves to the next page
    boundary after the new header if the old padding is too small."""
    magic, version, align, _, data_off = _PREFIX.unpack_from(raw, 0)
    h = json.dumps(header, separators=(",", ":")).encode()
    new_off = max(data_off, -(-(_PREFIX.size + len(h)) // PAGE) * PAGE)
    pad = b"\0" * (new_off - _PREFIX.size - len(h))
    return _PREFIX.pack(magic, version, align, len(h), new_off) + h + pad + raw[data_off:]


def run_entry(*args) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = entry([str(a) for a in args])
    return rc, err.getvalue()


def assert_works_or_clean_error(rc: int, err: str, what: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, (what, err)
    assert rc in (0, 2, 3), (what, rc, err)
    if rc:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("edgelm: error: "), (what, err)


def try_bundle(path: Path, what: str) -> tuple[int, str]:
    """inspect, then (if the reader accepts it) two greedy tokens of `run`."""
    rc, err = run_entry("inspect", path, "--no-tensors")
    assert_works_or_clean_error(rc, err, f"inspect {what}")
    rc2, err2 = run_entry("run", "hello", "--model", path, "-n", "2", "--temperature", "0", "-q",
                          "--max-tokens", "32")
    assert_works_or_clean_error(rc2, err2, f"run {what}")
    return rc2, err2


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{"gemma3": raw bytes, "gemma3n": raw bytes} of tiny valid bundles."""
    import gemma3n_fixtures as gx

    from edgelm.convert import convert, load_source

    root = tmp_path_factory.mktemp("fuzz")
    d = gx.make_tiny_gemma3n(root / "g3n-hf", seed=5)
    convert(load_source(d), root / "g3n.edgelm", scheme="fp32", progress=False)
    return {"gemma3": tiny_bundle().read_bytes(), "gemma3n": (root / "g3n.edgelm").read_bytes()}


SPECIAL_KEYS = ("bos", "eos", "unk", "pad", "start_of_turn", "end_of_turn", "stop", "add_bos")
# zero, negative, huge, float where an int belongs, non-finite, wrong types, null
FIXED_VALUES = (0, -1, 2**40, 1e300, 2.5, float("nan"), float("inf"), "7", True, None, [], {})


def _fixed_cases(header: dict) -> list[tuple[str, str, object]]:
    cases = [("config", k, v) for k in header["config"] for v in FIXED_VALUES]
    cases += [("special_tokens", k, v) for k in SPECIAL_KEYS for v in FIXED_VALUES]
    cases += [("", k, v) for k in ("tokenizer", "special_tokens", "sampler", "add_bos", "chat_template", "config")
              for v in (0, "x", None, [], True)]
    return cases


def _mutate(header: dict, section: str, key: str, value) -> dict:
    h = copy.deepcopy(header)
    (h[section] if section else h)[key] = value
    return h


@pytest.mark.parametrize("arch", ["gemma3", "gemma3n"])
def test_fixed_mutations_never_crash(bundles, tmp_path, arch):
    raw = bundles[arch]
    header = read_header(raw)
    assert header["arch"] == arch
    path = tmp_path / "m.edgelm"
    path.write_bytes(raw)
    assert try_bundle(path, "unchanged")[0] == 0
    outcomes = {0: 0, 2: 0, 3: 0}
    for section, key, value in _fixed_cases(header):
        path.write_bytes(with_header(raw, _mutate(header, section, key, value)))
        rc, _ = try_bundle(path, f"{arch} {section}.{key} = {value!r}")
        outcomes[rc] += 1
    assert outcomes[3] > outcomes[0] > 0, outcomes  # most are refused as malformed; some still work


def _random_value(rng: random.Random, old):
    pick = rng.randrange(9)
    if pick == 0:
        return rng.randint(-3, 3)
    if pick == 1:
        return rng.choice([2**31, 2**63, -(2**31), 10**30])
    if pick == 2 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return type(old)(old + rng.choice([-64, -1, 1, 64]))
    if pick == 3 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return old * rng.choice([0.5, 2, -1])
    if pick == 4 and isinstance(old, list) and old:
        new = list(old)
        how = rng.randrange(3)
        if how == 0:
            new.pop(rng.randrange(len(new)))
        elif how == 1:
            new[rng.randrange(len(new))] = rng.choice([0, -1, "global", "x", None, 10**9, 0.5])
        else:
            new.append(rng.choice(new))
        return new
    if pick == 5:
        return rng.uniform(-1e6, 1e6)
    if pick == 6:
        return rng.choice(["", "local", "12", "nan", [1, 2], {"a": 1}, [[]]])
    if pick == 7:
        return rng.choice([None, True, False])
    return rng.random()


def test_random_mutations_never_crash(bundles, tmp_path):
    rng = random.Random(20240607)
    path = tmp_path / "m.edgelm"
    parsed = {arch: read_header(raw) for arch, raw in bundles.items()}
    for i in range(300):
        arch = rng.choice(sorted(bundles))
        header = parsed[arch]
        section = rng.choice(["config", "config", "config", "special_tokens"])
        key = rng.choice(sorted(header[section]))
        value = _random_value(rng, header[section][key])
        path.write_bytes(with_header(bundles[arch], _mutate(header, section, key, value)))
        try_bundle(path, f"#{i} {arch} {section}.{key} = {value!r}")


@pytest.mark.parametrize("section, key, value, needles", [
    ("special_tokens", "bos", 1_000_000, ["special token 'bos'", "1000000", "outside the vocabulary"]),
    ("special_tokens", "stop", [1, 5, -3], ["special token 'stop'", "-3"]),
    ("special_tokens", "eos", "1", ["special token 'eos'", "token id"]),
    ("config", "num_kv_heads", 0, ["config field 'num_kv_heads' must be positive, got 0"]),
    ("config", "num_heads", 3, ["config field 'num_kv_heads' must divide num_heads"]),
    ("config", "head_dim", 16, ["tensor blk.0.attn_q.weight", "shape", "the config implies"]),
    ("config", "vocab_size", 100_000, ["tensor token_embd.weight", "the config implies [100000,"]),
    ("config", "sliding_window", 0, ["config field 'sliding_window' must be positive, got 0"]),
    ("config", "rope_theta", 0, ["config field 'rope_theta' must be positive, got 0"]),
    ("config", "rope_local_theta", float("inf"), ["config field 'rope_local_theta' must be a finite number"]),
    ("config", "rms_norm_eps", -1e-6, ["config field 'rms_norm_eps' must be positive"]),
    ("config", "hidden_size", "64", ["config field 'hidden_size' must be an integer, got '64'"]),
    ("config", "num_layers", True, ["config field 'num_layers' must be an integer, got True"]),
    ("config", "intermediate_size", None, ["config field 'intermediate_size' must be an integer, got None"]),
    ("config", "layer_types", ["local", "sideways", "global"], ["config field 'layer_types'", "'sideways'"]),
    ("config", "final_logit_softcap", "30", ["config field 'final_logit_softcap' must be a number or null"]),
    ("", "tokenizer", {"kind": "hf-tokenizers-json", "blob": "nope"}, ["'tokenizer.blob'", "'nope'"]),
    ("", "sampler", {"temperature": -1}, ["header field 'sampler'", "temperature"]),
])
def test_inconsistent_header_is_a_format_error(bundles, tmp_path, section, key, value, needles):
    raw = bundles["gemma3"]
    path = tmp_path / "m.edgelm"
    path.write_bytes(with_header(raw, _mutate(read_header(raw), section, key, value)))
    rc, err = try_bundle(path, f"{section}.{key}")
    assert rc == 3, err
    assert err.startswith(f"edgelm: error: {path}: "), err
    for n in needles:
        assert n in err, (n, err)


def test_gemma3n_config_and_tensors_are_checked(bundles, tmp_path):
    from edgelm.format.bundle import Bundle
    from edgelm.models import gemma3n, load_config

    raw = bundles["gemma3n"]
    header = read_header(raw)
    path = tmp_path / "m.edgelm"
    for key, value, needle in [
        ("altup_active_idx", 4, "config field 'altup_active_idx' must be at most 3, got 4"),
        ("altup_correct_scale", 1, "config field 'altup_correct_scale' must be true or false, got 1"),
        ("activation_sparsity", [1.0] * 10, "config field 'activation_sparsity' must list targets in [0, 1)"),
        ("intermediate_size", [128] * 9, "config field 'intermediate_size' has 9 entries for 10 layers"),
        ("intermediate_size", ["128"] * 10, "config field 'intermediate_size' must list positive integers"),
        ("num_kv_shared_layers", 10, "config field 'num_kv_shared_layers' must be at most 9, got 10"),
        ("laurel_rank", 4, "tensor blk.0.laurel_l.weight has shape [8, 64], the config implies [4, 64]"),
        ("vocab_size_per_layer_input", 299, "tensor per_layer_token_embd.weight"),
    ]:
        path.write_bytes(with_header(raw, _mutate(header, "config", key, value)))
        with Bundle(path) as b, pytest.raises(FormatError) as ei:
            load_config(gemma3n, b)
        assert str(ei.value).startswith(f"{path}: ") and needle in str(ei.value), (key, str(ei.value))
