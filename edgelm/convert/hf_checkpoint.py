"""Reading a Hugging Face checkpoint directory's files: safetensors headers and tensors, the
shard index, JSON files.

Tensors are read lazily with our own safetensors header parser (numpy has no bfloat16,
and `safe_open(framework="numpy")` refuses BF16): every read is one tensor's bytes,
widened from F16/BF16 to float32 exactly (BF16 by shifting into the high 16 bits). The
directory is only ever read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import FormatError

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
MAX_ST_HEADER = 100 * 1024 * 1024


class STEntry:
    __slots__ = ("file", "name", "dtype", "shape", "start", "nbytes")

    def __init__(self, file: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.file, self.name, self.dtype, self.shape, self.start, self.nbytes = file, name, dtype, shape, start, nbytes

    def read(self) -> np.ndarray:
        """The tensor as a float32 array (a fresh, writable copy)."""
        dt = ST_DTYPES[self.dtype]
        count = self.nbytes // dt.itemsize
        try:
            with open(self.file, "rb") as f:
                f.seek(self.start)
                raw = np.fromfile(f, dtype=dt, count=count)
        except OSError as e:
            raise FormatError(f"{self.file}: cannot read tensor {self.name} ({e.strerror})") from None
        if raw.size != count:
            raise FormatError(f"{self.file}: truncated: tensor {self.name} needs {self.nbytes} bytes, found {raw.size * dt.itemsize}")
        if self.dtype == "BF16":
            # bfloat16 is the high half of a float32: widening is exact (NaN payloads included)
            w = raw.astype(np.uint32)
            w <<= np.uint32(16)
            out = w.view(np.float32)
        elif raw.dtype == np.float32:
            out = raw  # "<f4" on a little-endian host: already a private float32 copy
        else:
            out = raw.astype(np.float32)  # F16 widens exactly; F64 narrows
        return out.reshape(self.shape)

    def read_raw(self, lo: int, hi: int) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.start + lo)
            return f.read(hi - lo)


def read_safetensors_header(file: Path) -> dict[str, STEntry]:
    """Parse and validate a safetensors file's header; tensor data is not read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{file}: corrupt safetensors file (only {size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen == 0 or hlen > MAX_ST_HEADER or 8 + hlen > size:
                raise FormatError(f"{file}: corrupt safetensors header (header length {hlen} does not fit in {size} bytes)")
            raw = f.read(hlen)
    except OSError as e:
        raise FormatError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{file}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    data_size = size - data_start
    entries: dict[str, STEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"{file}: corrupt safetensors header (entry {name!r} is not an object)")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid shape {shape!r})")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid data_offsets {offs!r})")
        if offs[1] > data_size:
            raise FormatError(f"{file}: truncated: tensor {name} ends at byte {offs[1]} of a {data_size}-byte data section")
        if not isinstance(dtype, str):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid dtype {dtype!r})")
        if dtype in ST_DTYPES:
            expect = ST_DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
            if offs[1] - offs[0] != expect:
                raise FormatError(
                    f"{file}: corrupt safetensors header (tensor {name}: {offs[1] - offs[0]} bytes for {dtype}{shape}, expected {expect})"
                )
        entries[name] = STEntry(file, name, dtype, tuple(shape), data_start + offs[0], offs[1] - offs[0])
    return entries


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return d


def weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index, "safetensors index")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise FormatError(f"{index}: field 'weight_map' is missing or invalid")
        files = []
        for fname in dict.fromkeys(wm.values()):
            p = d / fname
            if Path(fname).name != fname or not p.is_file():
                raise FormatError(f"{index}: shard {fname!r} is missing from {d}")
            files.append(p)
        return files, wm
    files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not files:
        if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
            raise FormatError(f"{d}: no *.safetensors files (only PyTorch pickles, which edgelm does not read; re-save with safe_serialization=True)")
        raise FormatError(f"{d}: no *.safetensors files in the checkpoint directory")
    return files, None


def read_entries(d: Path) -> tuple[list[Path], dict[str, str] | None, dict[str, STEntry]]:
    """The directory's safetensors files, index and every tensor's header entry."""
    files, weight_map = weight_files(d)
    entries: dict[str, STEntry] = {}
    for f in files:
        for name, e in read_safetensors_header(f).items():
            if name in entries:
                raise FormatError(f"{d}: tensor {name} appears in both {entries[name].file.name} and {f.name}")
            entries[name] = e
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in entries or entries[name].file.name != fname:
                raise FormatError(f"{d / 'model.safetensors.index.json'}: tensor {name} is not in its shard {fname}")
    return files, weight_map, entries


def same_tensor(a: STEntry, b: STEntry, chunk: int = 1 << 24) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        for lo in range(0, a.nbytes, chunk):
            hi = min(lo + chunk, a.nbytes)
            if a.read_raw(lo, hi) != b.read_raw(lo, hi):
                return False
        return True
    return bool(np.array_equal(a.read(), b.read()))
