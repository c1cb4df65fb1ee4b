"""edgelm/gguf_file.py: the GGUF reader the importer uses, against gguf-py's GGUFReader on
files gguf-py's writer makes, and on damaged files (a FormatError naming the file, never
another exception)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgelm.gguf_file import read_gguf
from edgelm.errors import FormatError

gguf = pytest.importorskip("gguf")


def _write(path, with_tensors=True):
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -5)
    w.add_float32("t.f32", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.floats", [0.5, -1.5])
    tensors = {}
    if with_tensors:
        from gguf.quants import quantize

        tensors["f32"] = rng.standard_normal((3, 40)).astype(np.float32)
        tensors["f16"] = rng.standard_normal((5, 8)).astype(np.float16)
        tensors["vec"] = rng.standard_normal(64).astype(np.float32)
        for name, q in (("q4", gguf.GGMLQuantizationType.Q4_0), ("q8", gguf.GGMLQuantizationType.Q8_0)):
            raw = quantize(rng.standard_normal((4, 64)).astype(np.float32), q)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
            tensors[name] = raw
        for name in ("f32", "f16", "vec"):
            w.add_tensor(name, tensors[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "a.gguf"
    _write(path)
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # (its header, as fields)
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        want, got = field.contents(), ours.metadata[key]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist()
        assert a.n_bytes == b.n_bytes and a.data_offset == b.data_offset
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        np.testing.assert_array_equal(a.data, b.data)


def test_metadata_only_leaves_no_mapping(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, with_tensors=False)
    f = read_gguf(path, tensors=False)
    assert f.tensors == [] and f.metadata["t.strs"] == ["a", "", "ü"]
    assert f.metadata["t.bool"] is True and f.metadata["t.str"] == "héllo"


def _must_fail(path, data, match=None):
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_damaged_files_are_format_errors(tmp_path):
    good = tmp_path / "g.gguf"
    _write(good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    _must_fail(bad, b"GGML" + raw[4:], "not a GGUF")
    _must_fail(bad, raw[:4] + struct.pack("<I", 9) + raw[8:], "version 9")
    _must_fail(bad, raw[:10], "truncated")
    _must_fail(bad, raw[:8] + struct.pack("<Q", 2**60) + raw[16:], "tensor count")
    _must_fail(bad, raw[:16] + struct.pack("<Q", 2**60) + raw[24:], "metadata count")
    for cut in (30, 200, len(raw) // 2, len(raw) - 10):  # every truncation: an error that names the file
        _must_fail(bad, raw[:cut])
    # a tensor's offset pointing past the end
    f = read_gguf(good)
    t = f.tensors[0]
    name = t.name.encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    nd = struct.unpack_from("<I", raw, at)[0]
    off_at = at + 4 + 8 * nd + 4
    _must_fail(bad, raw[:off_at] + struct.pack("<Q", 2**40) + raw[off_at + 8:], "outside the file")
    _must_fail(bad, raw[:off_at] + struct.pack("<Q", 3) + raw[off_at + 8:], "alignment")
    _must_fail(bad, raw[:at] + struct.pack("<I", 9) + raw[at + 4:], "dimensions")
    _must_fail(bad, raw[:off_at - 4] + struct.pack("<I", 999) + raw[off_at:], "unknown type")


def test_random_damage_never_escapes(tmp_path):
    good = tmp_path / "g.gguf"
    _write(good)
    raw = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    header_end = read_gguf(good).tensors[0].data_offset
    bad = tmp_path / "r.gguf"
    for _ in range(300):
        b = bytearray(raw)
        for i in rng.integers(0, header_end, size=rng.integers(1, 6)):
            b[i] = rng.integers(0, 256)
        bad.write_bytes(bytes(b))
        try:
            read_gguf(bad)
        except FormatError:
            pass
