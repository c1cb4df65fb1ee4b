"""The bundle: round trip, zero-copy loading, and clear errors for damaged files."""

import json
import struct

import numpy as np
import pytest

from edgelm.errors import FormatError
from edgelm.format.bundle import ALIGN, MAGIC, PAGE, Bundle, TensorPlan, write_bundle
from edgelm.quant.schemes import SCHEMES, quantize

from .conftest import assert_clean_error, run_cli

RNG = np.random.default_rng(7)


def _write(path, tensors: dict, meta=None, blobs=None):
    plans = [TensorPlan(n, t.scheme, t.shape) for n, t in tensors.items()]
    meta = meta or {"arch": "gemma3", "config": {"x": 1}}
    return write_bundle(path, meta, plans, lambda p: tensors[p.name], blobs or {"tokenizer": b"tok-data"})


@pytest.fixture
def small_bundle(tmp_path):
    tensors = {
        f"w.{name}": quantize(RNG.standard_normal((6, 256)).astype(np.float32), name) for name in SCHEMES
    }
    tensors["norm"] = quantize(RNG.standard_normal(256).astype(np.float32), "fp32")
    path = tmp_path / "small.edgelm"
    size = _write(path, tensors)
    return path, tensors, size


def test_round_trip_and_zero_copy(small_bundle):
    path, tensors, size = small_bundle
    assert path.stat().st_size == size
    with Bundle(path) as b:
        assert b.arch == "gemma3" and b.config == {"x": 1}
        assert b.blob("tokenizer") == b"tok-data"
        assert b.data_offset % PAGE == 0
        for name, t in tensors.items():
            got = b.tensor(name)
            assert got.scheme is t.scheme and got.shape == t.shape
            for k, arr in got.parts.items():
                assert np.array_equal(arr, t.parts[k])
                assert not arr.flags.owndata and not arr.flags.writeable  # a view of the mmap
                assert (b.data_offset + b.tensor_info(name)["parts"][k]["offset"]) % ALIGN == 0
            assert np.array_equal(got.dequantize(), t.dequantize())


def test_writer_is_atomic_and_leaves_no_temp_on_failure(tmp_path):
    path = tmp_path / "x.edgelm"
    t = quantize(np.ones((2, 32), np.float32), "fp32")

    def boom(plan):
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        write_bundle(path, {"arch": "gemma3", "config": {}}, [TensorPlan("a", t.scheme, t.shape)], boom)
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, offset, data):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


def _header(path):
    raw = path.read_bytes()
    _, _, _, hlen, _ = struct.unpack_from("<8sIIQQ", raw, 0)
    return json.loads(raw[32:32 + hlen]), hlen


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        Bundle(tmp_path / "nope.edgelm")
    assert_clean_error(run_cli("inspect", tmp_path / "nope.edgelm"), "nope.edgelm", "no such file")


def test_truncated(small_bundle, tmp_path):
    path, _, size = small_bundle
    for cut in (10, 100, size - 1000):
        p = tmp_path / f"cut{cut}.edgelm"
        p.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(FormatError, match="truncated|too small"):
            Bundle(p)
    assert_clean_error(run_cli("inspect", p), str(p.name), "truncated")


def test_wrong_magic(small_bundle):
    path, _, _ = small_bundle
    _corrupt(path, 0, b"GGUF\0\0\0\0")
    with pytest.raises(FormatError, match="not an edgelm bundle"):
        Bundle(path)
    assert_clean_error(run_cli("inspect", path), "not an edgelm bundle")


def test_wrong_version(small_bundle):
    path, _, _ = small_bundle
    _corrupt(path, 8, struct.pack("<I", 99))
    with pytest.raises(FormatError, match="version 99"):
        Bundle(path)
    assert_clean_error(run_cli("inspect", path), "version 99")


def test_corrupt_header_json(small_bundle):
    path, _, _ = small_bundle
    _corrupt(path, 32, b"}}}}")
    with pytest.raises(FormatError, match="corrupt header"):
        Bundle(path)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda h: h["tensors"][0]["parts"]["w"].update(offset=10**12), "outside the data section"),
        (lambda h: h["tensors"][0]["parts"]["w"].update(offset=3), "not aligned"),
        (lambda h: h["tensors"][0]["parts"]["w"].update(size=12), "does not match"),
        (lambda h: h["tensors"][0].update(scheme="int3"), "unknown scheme"),
        (lambda h: h["tensors"][0].update(shape=[6, -1]), "invalid shape"),
        (lambda h: h["tensors"][4].update(shape=[6, 250]), "multiple of block"),
        (lambda h: h.pop("arch"), "'arch' is missing"),
        (lambda h: h["blobs"]["tokenizer"].update(size=10**12), "blob tokenizer"),
    ],
)
def test_header_fields_are_checked(small_bundle, mutate, needle):
    """Every size and offset that comes from the file is checked before use."""
    path, _, _ = small_bundle
    header, hlen = _header(path)
    mutate(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= hlen + 64
    raw = bytearray(path.read_bytes())
    # rewrite the header in place (there is page padding after it)
    raw[16:24] = struct.pack("<Q", len(new))
    raw[32:32 + len(new)] = new
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=needle):
        Bundle(path)


def test_directory_and_garbage(tmp_path):
    with pytest.raises(FormatError, match="directory"):
        Bundle(tmp_path)
    p = tmp_path / "tiny.edgelm"
    p.write_bytes(MAGIC)
    with pytest.raises(FormatError, match="too small"):
        Bundle(p)
