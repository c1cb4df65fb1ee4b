"""The .edgelm bundle: one self-contained, mmap-able file. Layout in docs/bundle-format.md.

    0   8  magic  b"\\x89EDGELM\\n"
    8   4  u32    format version
   12   4  u32    alignment of every data part (bytes, power of two)
   16   8  u64    header length H
   24   8  u64    data offset D (multiple of 4096, >= 32 + H)
   32   H  header (UTF-8 JSON)
    D      data: every tensor part and blob at D + its offset, zero padded between
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import FormatError, OutputError
from ..quant.schemes import SCHEMES, QTensor, Scheme

MAGIC = b"\x89EDGELM\n"
VERSION = 1
ALIGN = 64
PAGE = 4096
_PREFIX = struct.Struct("<8sIIQQ")  # magic, version, align, header_len, data_offset
_DTYPES = {"float32", "float16", "int8", "uint8", "int32", "uint32"}
_MAX_HEADER = 1 << 30


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorPlan:
    """What the writer needs to know about a tensor before its data exists."""

    name: str
    scheme: Scheme
    shape: tuple[int, ...]

    def part_specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        if len(self.shape) == 1:
            return {"w": (np.dtype(np.float32), tuple(self.shape))}
        rows, cols = self.shape[0], int(np.prod(self.shape[1:]))
        return self.scheme.part_specs(rows, cols)


# ----------------------------------------------------------------------------- writing

# The writer fills ".NAME.edgelm-tmp.PID.RANDOM" next to NAME, then renames it over NAME. A
# writer that is killed leaves its temp file behind; the next write of NAME removes those of
# dead processes (and of this process that no thread is writing: a container reuses pids).
_TMP_TAG = ".edgelm-tmp."
_active_temps: set[str] = set()
_active_lock = threading.Lock()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}.{os.urandom(4).hex()}")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless liveness probe (os.kill would terminate it): keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: alive, another user's
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed writers of `path` left; returns those removed.
    Best effort: a file that cannot be removed is left alone."""
    path = Path(path)
    prefix = f".{path.name}{_TMP_TAG}"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        pid_text = e.name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) <= 0:
            continue
        pid = int(pid_text)
        with _active_lock:
            if os.path.abspath(e.path) in _active_temps:
                continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                continue
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def _output_error(path: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    return OutputError(f"{path}: cannot write the bundle: {reason}")


def write_bundle(
    path: str | os.PathLike,
    meta: dict,
    plans: list[TensorPlan],
    produce: Callable[[TensorPlan], QTensor],
    blobs: dict[str, bytes] | None = None,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> int:
    """Write a bundle atomically (temp file + rename). Tensors are produced one at a time,
    so memory stays at one tensor. Returns the file size."""
    blobs = blobs or {}
    off = 0
    tensors_hdr = []
    for p in plans:
        parts = {}
        for pname, (dt, shape) in p.part_specs().items():
            size = int(dt.itemsize * int(np.prod(shape)))
            parts[pname] = {"dtype": dt.name, "shape": list(shape), "offset": off, "size": size}
            off = _align(off + size, ALIGN)
        tensors_hdr.append({"name": p.name, "scheme": p.scheme.name, "shape": list(p.shape), "parts": parts})
    blobs_hdr = {}
    for bname, data in blobs.items():
        blobs_hdr[bname] = {"offset": off, "size": len(data)}
        off = _align(off + len(data), ALIGN)
    data_size = off
    header = dict(meta)
    header["tensors"] = tensors_hdr
    header["blobs"] = blobs_hdr
    header["data_size"] = data_size
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    data_off = _align(_PREFIX.size + len(hjson), PAGE)

    path = Path(path)
    parent = path.parent
    try:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a directory")
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(path, e) from None
    remove_stale_temps(path)
    tmp = _temp_path(path)
    with _active_lock:
        _active_temps.add(os.path.abspath(tmp))
    f = None
    try:
        try:  # 0o666 as any new file: the umask decides (mkstemp would force 0600)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            f = os.fdopen(fd, "wb")
        except OSError as e:
            raise _output_error(path, e) from None

        def io(fn, *args):
            """A write-side file operation; its OSError (ENOSPC, EIO, EROFS...) becomes OutputError."""
            try:
                return fn(*args)
            except OSError as e:
                raise _output_error(path, e) from None

        def put(offset: int, data) -> None:
            io(f.seek, offset)
            io(f.write, data)

        put(0, _PREFIX.pack(MAGIC, VERSION, ALIGN, len(hjson), data_off) + hjson)
        io(f.write, b"\0" * (data_off - _PREFIX.size - len(hjson)))
        it = progress(list(zip(plans, tensors_hdr))) if progress else zip(plans, tensors_hdr)
        for plan, th in it:
            qt = produce(plan)
            if qt.scheme.name != plan.scheme.name or tuple(qt.shape) != tuple(plan.shape):
                raise RuntimeError(f"tensor {plan.name}: produced {qt.scheme.name}{qt.shape}, planned {plan.scheme.name}{plan.shape}")
            for pname, ph in th["parts"].items():
                arr = np.ascontiguousarray(qt.parts[pname])
                if arr.dtype.name != ph["dtype"] or list(arr.shape) != ph["shape"]:
                    raise RuntimeError(f"tensor {plan.name} part {pname}: got {arr.dtype}{arr.shape}, planned {ph['dtype']}{ph['shape']}")
                put(data_off + ph["offset"], memoryview(arr.reshape(-1)).cast("B"))  # no copy of the tensor
        for bname, data in blobs.items():
            put(data_off + blobs_hdr[bname]["offset"], data)
        io(f.truncate, data_off + data_size)
        io(f.flush)
        io(os.fsync, f.fileno())
        io(f.close)
        io(os.replace, tmp, path)
    except BaseException:
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        with _active_lock:
            _active_temps.discard(os.path.abspath(tmp))
    return data_off + data_size


def _convert_hint(src: Path) -> str:
    import shlex

    stem = src.name[:-5] if src.name.endswith(".gguf") else src.name
    out = src.with_name(f"{stem or 'model'}.edgelm")
    return f"edgelm convert {shlex.quote(str(src))} -o {shlex.quote(str(out))}"


class Bundle:
    """A read-only view of a bundle file. Tensors are numpy views into the mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            if (self.path / "config.json").is_file():
                raise FormatError(f"{self.path}: is a Hugging Face checkpoint directory, not an edgelm bundle; "
                                  f"convert it first: {_convert_hint(self.path)}")
            raise FormatError(f"{self.path}: is a directory, not a bundle file")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a bundle file") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.file_size = os.fstat(fd).st_size
            if self.file_size < _PREFIX.size:
                raise FormatError(f"{self.path}: too small to be an edgelm bundle ({self.file_size} bytes)")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot map the file ({e.strerror})") from None
        finally:
            os.close(fd)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _fail(self, msg: str):
        raise FormatError(f"{self.path}: {msg}")

    def _parse(self) -> None:
        magic, version, align, hlen, data_off = _PREFIX.unpack_from(self._mm, 0)
        if magic != MAGIC:
            if magic[:4] == b"GGUF":
                self._fail(f"is a GGUF file, not an edgelm bundle; convert it first: {_convert_hint(self.path)}")
            self._fail(f"not an edgelm bundle (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            self._fail(f"bundle format version {version} is not supported (this edgelm reads version {VERSION})")
        if align == 0 or align & (align - 1) or align > PAGE:
            self._fail(f"invalid alignment {align}")
        if hlen > _MAX_HEADER or _PREFIX.size + hlen > self.file_size:
            self._fail(f"truncated: header of {hlen} bytes does not fit in {self.file_size} bytes")
        if data_off < _PREFIX.size + hlen or data_off % PAGE:
            self._fail(f"invalid data offset {data_off}")
        try:
            header = json.loads(bytes(self._mm[_PREFIX.size:_PREFIX.size + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"corrupt header ({e})")
        if not isinstance(header, dict):
            self._fail("corrupt header (not an object)")
        self.version = version
        self.header = header
        self.data_offset = data_off
        data_size = header.get("data_size")
        if not isinstance(data_size, int) or data_size < 0:
            self._fail("header field 'data_size' is missing or invalid")
        if data_off + data_size > self.file_size:
            self._fail(f"truncated: data needs {data_off + data_size} bytes, file has {self.file_size}")
        for field in ("arch", "config", "tensors"):
            if field not in header:
                self._fail(f"header field {field!r} is missing")
        self._tensors: dict[str, dict] = {}
        if not isinstance(header["tensors"], list):
            self._fail("header field 'tensors' is not a list")
        for t in header["tensors"]:
            self._check_tensor(t, align, data_size)
            self._tensors[t["name"]] = t
        blobs = header.get("blobs", {})
        if not isinstance(blobs, dict):
            self._fail("header field 'blobs' is not an object")
        for bname, b in blobs.items():
            self._check_extent(f"blob {bname}", b, data_size)
        self.blobs_meta = blobs
        self._check_meta(header)

    # the documented header fields (docs/bundle-format.md) that readers use: their JSON types
    _META_TYPES = {
        "arch": (str,), "config": (dict,), "tokenizer": (dict,), "chat_template": (str, type(None)),
        "chat_template_origin": (str,), "special_tokens": (dict,), "add_bos": (bool,), "sampler": (dict,),
        "quantization": (dict,), "source": (dict,), "notes": (list,), "created_by": (str,),
    }
    _JSON_NAMES = {str: "a string", dict: "an object", bool: "true or false", list: "a list", type(None): "null"}

    def _check_meta(self, header: dict) -> None:
        for field, types in self._META_TYPES.items():
            if field in header and not isinstance(header[field], types):
                want = " or ".join(self._JSON_NAMES[t] for t in types)
                self._fail(f"header field {field!r} must be {want}, got {header[field]!r:.80}")
        tok = header.get("tokenizer")
        if tok is not None:
            for key in ("kind", "blob"):
                if not isinstance(tok.get(key), str):
                    self._fail(f"header field 'tokenizer.{key}' must be a string, got {tok.get(key)!r:.80}")
            if tok["blob"] not in self.blobs_meta:
                self._fail(f"header field 'tokenizer.blob' names blob {tok['blob']!r}, which the bundle does not have")
        lt = header["config"].get("layer_types")
        if lt is not None and not isinstance(lt, list):
            self._fail(f"config field 'layer_types' must be a list, got {lt!r:.80}")

    def _check_extent(self, what: str, e, data_size: int) -> None:
        if not isinstance(e, dict):
            self._fail(f"{what}: invalid entry")
        off, size = e.get("offset"), e.get("size")
        if not (isinstance(off, int) and isinstance(size, int)) or off < 0 or size < 0 or off + size > data_size:
            self._fail(f"{what}: offset {off} + size {size} lies outside the data section ({data_size} bytes)")

    def _check_tensor(self, t, align: int, data_size: int) -> None:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            self._fail("tensor entry without a name")
        name = t["name"]
        if t.get("scheme") not in SCHEMES:
            self._fail(f"tensor {name}: unknown scheme {t.get('scheme')!r}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            self._fail(f"tensor {name}: invalid shape {shape!r}")
        parts = t.get("parts")
        if not isinstance(parts, dict) or not parts:
            self._fail(f"tensor {name}: no parts")
        if len(shape) == 1:
            expected = {"w": (np.dtype(np.float32), tuple(shape))}
        else:
            scheme = SCHEMES[t["scheme"]]
            rows, cols = shape[0], int(np.prod(shape[1:]))
            if scheme.block > 0 and cols % scheme.block:
                self._fail(f"tensor {name}: row length {cols} is not a multiple of block {scheme.block}")
            expected = scheme.part_specs(rows, cols)
        if set(parts) != set(expected):
            self._fail(f"tensor {name}: parts {sorted(parts)} do not match scheme {t['scheme']} ({sorted(expected)})")
        for pname, p in parts.items():
            what = f"tensor {name} part {pname}"
            self._check_extent(what, p, data_size)
            dt, shp = expected[pname]
            if p.get("dtype") != dt.name or tuple(p.get("shape", ())) != tuple(shp):
                self._fail(f"{what}: {p.get('dtype')}{p.get('shape')} does not match scheme ({dt.name}{list(shp)})")
            if p["size"] != dt.itemsize * int(np.prod(shp)):
                self._fail(f"{what}: size {p['size']} does not match its shape")
            if p["offset"] % align:
                self._fail(f"{what}: offset {p['offset']} is not aligned to {align}")

    # ------------------------------------------------------------------ access

    @property
    def arch(self) -> str:
        return self.header["arch"]

    @property
    def config(self) -> dict:
        return self.header["config"]

    @property
    def meta(self) -> dict:
        return {k: v for k, v in self.header.items() if k not in ("tensors", "blobs")}

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self, name: str) -> dict:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _view(self, dtype: str, shape, offset: int, size: int) -> np.ndarray:
        count = size // np.dtype(dtype).itemsize
        arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self.data_offset + offset)
        return arr.reshape(shape)

    def tensor(self, name: str) -> QTensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor {name!r} is missing") from None
        parts = {p: self._view(d["dtype"], d["shape"], d["offset"], d["size"]) for p, d in t["parts"].items()}
        return QTensor(SCHEMES[t["scheme"]], tuple(t["shape"]), parts)

    def blob(self, name: str) -> bytes:
        """A copy of blob `name`."""
        return bytes(self.blob_view(name))

    def blob_view(self, name: str) -> memoryview:
        """Blob `name` as a read-only memoryview of the mapped file: no copy, and its pages are
        file-backed (shared, reclaimable). The mapping stays alive while the view does."""
        if name not in self.blobs_meta:
            raise FormatError(f"{self.path}: blob {name!r} is missing")
        b = self.blobs_meta[name]
        start = self.data_offset + b["offset"]
        return memoryview(self._mm)[start:start + b["size"]]

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes when they do
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
