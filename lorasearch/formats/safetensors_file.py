"""Strict, read-only access to a safetensors file.

The header is validated before any tensor is touched so that every malformed
file gets a specific one-line reason and a machine-readable ``code``:

=================  ============================================================
``not_found``      no such file
``unreadable``     the OS refused to open or read it
``too_large``      over the caller's size cap
``pickle_refused`` a pickled checkpoint (never unpickled)
``truncated``      empty, shorter than its header, or cut inside the tensor data
``bad_header``     not safetensors, header not a JSON object, bad shapes or metadata
``bad_dtype``      a dtype safetensors does not define
``bad_offsets``    overlapping / gapped / mis-sized tensor spans, trailing bytes
``non_finite``     NaN or Inf in a float tensor (raised when the tensor is read)
=================  ============================================================

Tensors are read by offset through one file handle held for the object's
lifetime (``close()`` or use it as a context manager); nothing is unpickled and
torch is never imported (float8 is decoded with a lookup table).
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Iterator

import numpy as np

from lorasearch.errors import BadInput, PickleRefused

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Size cap for one weights file; LORASEARCH_MAX_FILE_BYTES lowers it for a
# server or a test (read once, at import).
DEFAULT_MAX_FILE_BYTES = int(os.environ.get("LORASEARCH_MAX_FILE_BYTES") or 16 * 1024**3)

_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1,
}
_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _f8_table(exp_bits: int, man_bits: int, has_inf: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of a float8 format.

    Args:
        exp_bits: exponent width (4 for E4M3, 5 for E5M2).
        man_bits: mantissa width (3 or 2).
        has_inf: IEEE-style inf/NaN in the top exponent (E5M2) rather than the
            single NaN pattern of the ``fn`` variant (E4M3FN: S.1111.111).

    Returns:
        a (256,) float32 array.
    """
    bias = (1 << (exp_bits - 1)) - 1
    top = (1 << exp_bits) - 1
    out = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & top
        m = code & ((1 << man_bits) - 1)
        if has_inf and e == top:
            v = math.inf if m == 0 else math.nan
        elif not has_inf and e == top and m == (1 << man_bits) - 1:
            v = math.nan
        elif e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[code] = math.copysign(v, sign)  # keeps the sign of NaN codes, as torch does
    return out


_F8 = {"F8_E4M3": _f8_table(4, 3, has_inf=False), "F8_E5M2": _f8_table(5, 2, has_inf=True)}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file (offsets relative to the data start)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def refuse_pickle_path(path: Path) -> None:
    """Raise ``PickleRefused`` if ``path`` names a pickled checkpoint by its suffix (it is not opened)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(
            f"{path}: pickled weights ({path.suffix}) are refused: unpickling can run arbitrary "
            "code; convert the file to .safetensors first"
        )


def _pickle_kind(head: bytes) -> str | None:
    """What pickled container the first bytes show, if any."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch.save checkpoint)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a raw pickle (protocol {head[1]})"
    return None


class SafetensorsFile:
    """A validated safetensors file, read by offset.

    Args:
        path: the file.
        max_bytes: files larger than this are refused (``too_large``).

    Raises:
        BadInput: with one of the codes in the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.path = Path(path)
        refuse_pickle_path(self.path)
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "no such file"
            raise BadInput(f"{self.path}: {what}", code="not_found")
        self._fh: BinaryIO | None = None
        self._lock = threading.Lock()
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot open: {exc.strerror or exc}", code="unreadable") from None
        self._fh = fh
        # Closes the handle when the object is collected without close().
        self._finalizer = weakref.finalize(self, fh.close)
        try:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size > max_bytes:
                raise BadInput(
                    f"{self.path}: file is {self.size} bytes, over the {max_bytes}-byte cap", code="too_large"
                )
            self.header_len, raw = self._read_header()
            self.data_start = 8 + self.header_len
            self.tensors, self.metadata = self._parse_header(raw)
        except BaseException:
            self.close()
            raise

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle (idempotent)."""
        self._finalizer()
        self._fh = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- validation -----------------------------------------------------------
    def _bad(self, what: str, code: str) -> BadInput:
        return BadInput(f"{self.path}: {what}", code=code)

    def _read_header(self) -> tuple[int, bytes]:
        head = self._pread(8, 0)
        kind = _pickle_kind(head)
        if kind:
            raise PickleRefused(f"{self.path}: this is {kind}, not safetensors; it is never unpickled")
        if not head:
            raise self._bad("truncated: the file is empty", "truncated")
        if len(head) < 8:
            raise self._bad(f"truncated: {len(head)} bytes, shorter than the 8-byte header length", "truncated")
        (n,) = struct.unpack("<Q", head)
        first = self._pread(1, 8)
        if n > MAX_HEADER_BYTES or (8 + n > self.size and first != b"{"):
            # A length this far off means the file is something else, not a cut safetensors.
            raise self._bad(
                f"not a safetensors file: the first 8 bytes give a header length of {n} "
                f"for a {self.size}-byte file",
                "bad_header",
            )
        if 8 + n > self.size:
            raise self._bad(f"truncated: header length {n} runs past the end of the {self.size}-byte file", "truncated")
        return n, self._pread(n, 8)

    def _parse_header(self, raw: bytes) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _DuplicateKey as exc:
            raise self._bad(f"header has a duplicate key {exc.args[0]!r}", "bad_header") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"header is not valid JSON ({exc.__class__.__name__}: {exc})", "bad_header") from None
        if not isinstance(header, dict):
            raise self._bad(f"header is a JSON {_json_type(header)}, not an object", "bad_header")
        meta = self._check_metadata(header.pop("__metadata__", None))
        infos = {key: self._check_entry(key, entry) for key, entry in header.items()}
        self._check_spans(infos)
        return infos, meta

    def _check_metadata(self, meta: object) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise self._bad(f"__metadata__ is a JSON {_json_type(meta)}, not an object of strings", "bad_header")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise self._bad(
                    f"__metadata__ value of {k!r} is a JSON {_json_type(v)}, not a string", "bad_header"
                )
        return dict(meta)

    def _check_entry(self, key: str, entry: object) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._bad(f"header entry {key!r} is not an object", "bad_header")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise self._bad(f"tensor {key!r} has unknown dtype {dtype!r}", "bad_dtype")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise self._bad(f"tensor {key!r} has an invalid shape {shape!r} (need non-negative integers)", "bad_header")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs) or offs[1] < offs[0]:
            raise self._bad(f"tensor {key!r} has invalid data_offsets {offs!r}", "bad_offsets")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow on absurd shapes
        if offs[1] - offs[0] != nbytes:
            raise self._bad(
                f"tensor {key!r} spans {offs[1] - offs[0]} bytes but {dtype}{shape} needs {nbytes}", "bad_offsets"
            )
        return TensorInfo(dtype, tuple(shape), offs[0], offs[1])

    def _check_spans(self, infos: dict[str, TensorInfo]) -> None:
        """Tensors must tile the data section exactly, as the safetensors library requires."""
        pos = 0
        for key, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
            if info.start < pos:
                raise self._bad(f"tensor {key!r} overlaps the previous tensor (offset {info.start} < {pos})", "bad_offsets")
            if info.start > pos:
                raise self._bad(f"gap of {info.start - pos} bytes before tensor {key!r} (offset {info.start}, expected {pos})", "bad_offsets")
            pos = info.end
        data_len = self.size - self.data_start
        if pos > data_len:
            raise self._bad(f"truncated: the tensors need {pos} data bytes, the file has {data_len}", "truncated")
        if pos < data_len:
            raise self._bad(f"{data_len - pos} trailing bytes after the last tensor", "bad_offsets")

    # -- access ---------------------------------------------------------------
    def _pread(self, n: int, offset: int) -> bytes:
        fh = self._fh
        if fh is None:
            raise ValueError(f"{self.path}: SafetensorsFile is closed")
        try:
            if hasattr(os, "pread"):
                parts = []
                while n > 0:  # pread may return short reads on some systems
                    b = os.pread(fh.fileno(), n, offset)
                    if not b:
                        break
                    parts.append(b)
                    n -= len(b)
                    offset += len(b)
                return b"".join(parts)
            with self._lock:
                fh.seek(offset)
                return fh.read(n)
        except OSError as exc:
            raise self._bad(f"read failed: {exc.strerror or exc}", "unreadable") from None

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored, read-only (BF16 and F8 widened to float32; BOOL as numpy bool)."""
        info = self.tensors[key]
        buf = self._pread(info.nbytes, self.data_start + info.start)
        if len(buf) != info.nbytes:
            raise self._bad(f"truncated while reading {key!r} (the file changed after it was opened?)", "truncated")
        return _decode(buf, info.dtype, info.shape)

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32; NaN/Inf values (and F64 values beyond float32) are rejected.

        Returns:
            a float32 array of the stored shape.

        Raises:
            BadInput: code ``non_finite``.
        """
        info = self.tensors[key]
        arr = self.raw(key)
        if info.dtype not in FLOAT_DTYPES:
            return arr.astype(np.float32)
        if not np.isfinite(arr).all():
            bad = arr[~np.isfinite(arr)]
            what = "NaN" if np.isnan(bad).any() else "Inf"
            raise self._bad(
                f"tensor {key!r} ({info.dtype}) contains {bad.size} non-finite values ({what})", "non_finite"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, in words
            out = arr.astype(np.float32, copy=False)
        if info.dtype == "F64" and not np.isfinite(out).all():
            raise self._bad(f"tensor {key!r} (F64) holds values beyond the float32 range", "non_finite")
        return out

    def iter_data(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes after the header, in chunks."""
        pos = self.data_start
        while pos < self.size:
            block = self._pread(min(chunk, self.size - pos), pos)
            if not block:
                return
            yield block
            pos += len(block)



class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_type(x: object) -> str:
    """JSON's name for a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _decode(buf: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype in _NUMPY:
        return np.frombuffer(buf, dtype=np.dtype(_NUMPY[dtype])).reshape(shape)
    codes = np.frombuffer(buf, dtype=np.uint8)
    if dtype == "BF16":
        u16 = codes.view("<u2").astype(np.uint32)
        return (u16 << 16).view(np.float32).reshape(shape)
    return _F8[dtype][codes].reshape(shape)
