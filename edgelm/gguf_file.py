"""A GGUF file's metadata and tensor table, read straight from its mapping.

`gguf.GGUFReader` builds a Python object per metadata item, which for a 262k-token
vocabulary (three arrays of 262k items) takes 15-27 s; this reader takes the numeric arrays
with one `np.frombuffer` each and decodes the strings in one pass (~0.3 s), then lists the
tensors with views of the file (no copy), in the layout `GGUFReader` gives them: fp32 / fp16
tensors as float arrays, every other type as bytes, shape [rows, row bytes]. Every size and
offset read from the file is checked against the file before it is used; a damaged file is a
FormatError naming the file and what is wrong.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError

# GGUF metadata value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
             12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_U64 = struct.Struct("<Q")


@dataclass
class GGUFTensor:
    name: str
    shape: np.ndarray  # ne0 (the row length) first, as GGUF lists them
    tensor_type: Any  # gguf.GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray  # a view of the mapping


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars as Python values, strings as str, arrays as np arrays / lists of str
    tensors: list[GGUFTensor]


def read_gguf(path: str | os.PathLike, tensors: bool = True) -> GGUFFile:
    """The metadata (and, with `tensors`, the tensor table and views) of a GGUF file. The
    views keep the file's mapping open for as long as they live."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read GGUF file {path}: {e}") from None
    try:
        return _parse(path, buf, tensors)
    except struct.error:
        raise FormatError(f"{path}: GGUF header is truncated") from None
    finally:
        if not tensors:
            buf.close()


def _parse(path: Path, buf: mmap.mmap, want_tensors: bool) -> GGUFFile:
    size = len(buf)
    if buf[:4] != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    pos = 24

    def need(p: int, n: int, what: str) -> None:
        if n < 0 or p + n > size:
            raise FormatError(f"{path}: {what} runs past the end of the file (offset {p}, {n} bytes, file {size})")

    def read_str(p: int, what: str) -> tuple[bytes, int]:
        need(p, 8, what)
        (n,) = _U64.unpack_from(buf, p)
        need(p + 8, n, what)
        return buf[p + 8 : p + 8 + n], p + 8 + n

    # every item takes at least 8 bytes: counts beyond the file's size are damage
    for count, what in ((n_kv, "metadata count"), (n_tensors, "tensor count")):
        if count > size // 8:
            raise FormatError(f"{path}: {what} {count} is impossible for a {size}-byte file")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        kb, pos = read_str(pos, "a metadata key")
        try:
            key = kb.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: a metadata key at offset {pos - len(kb)} is not UTF-8") from None
        need(pos, 4, f"metadata {key}")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            need(pos, struct.calcsize(fmt), f"metadata {key}")
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            meta[key] = v
        elif vtype == _STRING:
            v, pos = read_str(pos, f"metadata {key}")
            meta[key] = v.decode("utf-8", errors="replace")
        elif vtype == _ARRAY:
            need(pos, 12, f"metadata {key}")
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _ARRAY_NP:
                dt = np.dtype(_ARRAY_NP[etype])
                need(pos, dt.itemsize * count, f"metadata {key}")
                arr = np.frombuffer(buf, dtype=dt, count=count, offset=pos).copy()
                meta[key] = arr.astype(bool) if etype == 7 else arr
                pos += dt.itemsize * count
            elif etype == _STRING:
                if count > (size - pos) // 8:
                    raise FormatError(f"{path}: metadata {key} claims {count} strings, more than the file holds")
                vals = []
                unpack = _U64.unpack_from
                for _ in range(count):
                    need(pos, 8, f"metadata {key}")
                    (n,) = unpack(buf, pos)
                    need(pos + 8, n, f"metadata {key}")
                    vals.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                    pos += 8 + n
                meta[key] = vals
            else:
                raise FormatError(f"{path}: metadata {key} holds an array of unsupported type {etype}")
        else:
            raise FormatError(f"{path}: metadata {key} has unsupported value type {vtype}")
    if not want_tensors:
        return GGUFFile(path, version, meta, [])

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    infos = []
    for _ in range(n_tensors):
        nb, pos = read_str(pos, "a tensor name")
        name = nb.decode("utf-8", errors="replace")
        need(pos, 4, f"tensor {name}")
        (nd,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if not 1 <= nd <= _MAX_DIMS:
            raise FormatError(f"{path}: tensor {name} has {nd} dimensions (1 to {_MAX_DIMS} allowed)")
        need(pos, 8 * nd + 12, f"tensor {name}")
        ne = np.frombuffer(buf, dtype="<u8", count=nd, offset=pos).copy()
        pos += 8 * nd
        ttype, off = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append((name, ne, ttype, off))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise FormatError(f"{path}: general.alignment {align!r} is not a power of two")
    data_start = (pos + align - 1) // align * align
    out = []
    for name, ne, ttype, off in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise FormatError(f"{path}: tensor {name} has unknown type {ttype}") from None
        if np.any(ne == 0) or np.any(ne > 2**40) or int(ne[0]) % block:
            raise FormatError(f"{path}: tensor {name} has bad dimensions {ne.tolist()} for type {qtype.name}")
        n_el = int(np.prod(ne, dtype=object))
        n_bytes = n_el // block * type_size
        start = data_start + off
        if off % align or start + n_bytes > size:
            raise FormatError(f"{path}: tensor {name}'s data (offset {off}, {n_bytes} bytes) lies outside the file "
                              f"or off its {align}-byte alignment")
        dims = [int(x) for x in reversed(ne.tolist())]
        if qtype == GGMLQuantizationType.F32:
            data = np.frombuffer(buf, dtype="<f4", count=n_el, offset=start).reshape(dims)
        elif qtype == GGMLQuantizationType.F16:
            data = np.frombuffer(buf, dtype="<f2", count=n_el, offset=start).reshape(dims)
        else:  # bytes, [..., row bytes] as GGUFReader gives them (what gguf.quants.dequantize takes)
            data = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=start).reshape(
                dims[:-1] + [dims[-1] // block * type_size])
        out.append(GGUFTensor(name, ne, qtype, n_el, n_bytes, start, data))
    return GGUFFile(path, version, meta, out)
