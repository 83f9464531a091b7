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

Tensors are read through one file handle held for the object's lifetime
(``close()`` or use it as a context manager). A data section of at most
``PRELOAD_MAX_BYTES`` is read whole on first access (one ``pread``, no
per-tensor syscalls) and tensors are sliced from that buffer; ``hashes()`` then
hashes the same bytes, so sha256 and AutoV3 cost no second read. The buffer is
a private copy, not an ``mmap``: a file cut or rewritten while mapped would
kill the process with SIGBUS instead of raising ``truncated``. Larger files
are read tensor by tensor.

``get_deferred``, ``fill``, ``widen_into`` and ``prefetch`` serve the streaming
reader (``lorasearch.read_embed``): factors widened to float32 module by
module as they are sketched, the data section read while the header is decoded
(only its first part when another process sketches the modules stored in the
rest: bytes past the prefetched part are read when something asks for them).

Nothing is unpickled and torch is never imported (float8 is decoded with a
lookup table); when the caller already has torch loaded, its vectorised
F16/BF16 -> float32 cast is used for large tensors (the values are the same:
the widening is exact either way).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import struct
import sys
import threading
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

import numpy as np

from lorasearch.errors import BadInput, PickleRefused
from lorasearch.formats import buffer_pool
from lorasearch.hashes import autov3_start, file_hashes

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Size cap for one weights file; LORASEARCH_MAX_FILE_BYTES lowers it for a
# server or a test (read once, at import).
DEFAULT_MAX_FILE_BYTES = int(os.environ.get("LORASEARCH_MAX_FILE_BYTES") or 16 * 1024**3)
# Data sections up to this size are read into memory in one go (a LoRA is
# rarely over a few hundred MiB); bigger ones are read tensor by tensor.
PRELOAD_MAX_BYTES = 1024**3
# Hashing threads load_lora uses (1: the indexer already runs one worker process per core).
HASH_THREADS = int(os.environ.get("LORASEARCH_HASH_THREADS") or 1)
_THREADED_HASH_MIN = 1 << 20  # below this a thread costs more than it saves
# Below this many elements numpy's own cast is cheaper than a table or torch call.
_FAST_CAST_MIN = 1 << 14

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
_NUMPY_DTYPES = {k: np.dtype(v) for k, v in _NUMPY.items()}
_F32 = _NUMPY_DTYPES["F32"]
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_HALF = frozenset({"F16", "BF16"})
_ONE_PASS_MAX = 64 << 20  # data bytes up to which a one-type 16-bit file is widened in one pass
_DIRECT_MAX = 64 << 10  # tensors up to this size are read on their own while a prefetch runs
_PREFETCH_MIN = 16 << 20  # smaller data sections are read in the caller's thread (a thread costs more)
_PAGE = 4096  # a partial prefetch ends on a page boundary
_SCALAR_MAX = 8  # 16-bit tensors up to this many bytes are decoded on their own
_F16_SCALAR = struct.Struct("<e")
_F32_SCALAR = struct.Struct("<f")
_SCALARS: dict[tuple[bytes, str, tuple[int, ...]], np.ndarray] = {}  # see _scalar16
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
# float32 value of every float16 code: numpy's float16 cast is scalar code
# (~1.7 ns/value here), a table lookup ~1 ns; built with that same cast, so equal.
_F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


class TensorInfo(NamedTuple):
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
        preload_max: data sections up to this many bytes are read whole on
            first access; larger ones tensor by tensor.
        prefetch: start ``prefetch`` as soon as the header's length is known, so
            the data section is read while the header is parsed.
        prefetch_upto: the share of the data section (from its start) that ``prefetch`` reads.

    Raises:
        BadInput: with one of the codes in the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 preload_max: int = PRELOAD_MAX_BYTES, prefetch: bool = False, prefetch_upto: float = 1.0) -> None:
        self.path = Path(path)
        refuse_pickle_path(self.path)
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "no such file"
            raise BadInput(f"{self.path}: {what}", code="not_found")
        self._fh: BinaryIO | None = None
        self._lock = threading.Lock()
        self._data_lock = threading.Lock()  # one reader of the data section at a time
        self._data: memoryview | None = None  # the data section, once read whole
        self._section: np.ndarray | None = None  # its buffer (uint8), filled from the start (see _read_span)
        self._valid = 0  # bytes of _section read in from its start (set by the prefetch thread as it ends)
        self._ahead = 0  # bytes of the section read in one piece when any is needed (less after a partial prefetch)
        self._widened: np.ndarray | None = None  # float32 values of F16/BF16 tensors, by data offset / 2
        self._clean: bool | None = None  # see _f32_clean
        self._half_ok: bool | None = None  # see _half_clean
        self._one_pass: bool | None = None  # see _one_pass_candidate
        self._dtypes: set[str] | None = None  # see dtypes
        self._pending: dict[int, tuple[str, TensorInfo]] = {}  # see get_deferred: first float32 index -> tensor
        self._pending_starts: list[int] = []
        self._handed: dict[int, tuple[np.ndarray, int]] = {}  # id -> (array get_deferred returned, its first index)
        self._casts = SpanCaster()  # widen_pair_into's casts
        self._consumed: dict[int, tuple[str, TensorInfo]] = {}  # see widen_into
        self._widened_ptr = 0  # address of _widened's first value
        self._widened_view: np.ndarray | None = None  # _widened, read-only (what get_deferred hands out)
        self._data_u16: np.ndarray | None = None  # the data section as uint16 codes (widen_into)
        self._prefetch: tuple[threading.Thread, dict[str, Any]] | None = None  # see prefetch
        self._prefetch_lock = threading.Lock()  # _ahead against the prefetch thread's decision to stop
        self._head = b""  # the 8 length bytes and the JSON header, as stored
        self.defer = False  # readers may use get_deferred for plain factors (lorasearch.read_embed)
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
            self._head = struct.pack("<Q", self.header_len) + raw
            self._preload = self.size - self.data_start <= preload_max
            self._ahead = self.size - self.data_start
            if prefetch and raw[:1] == b"{":  # read the data while the header is parsed
                self.prefetch(prefetch_upto)
            self.tensors, self.metadata = self._parse_header(raw)
        except BaseException:
            self.close()
            raise

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Release the file handle (idempotent)."""
        if self._prefetch is not None:
            with self._prefetch_lock:
                self._ahead = 0  # a prefetch_rest extension is not read any more
            self._prefetch[0].join()  # it reads through the handle
            self._prefetch = None
        self._finalizer()
        self._fh = None
        self._data = self._section = self._widened = self._widened_view = self._data_u16 = None  # arrays sliced from them keep their own reference
        self._valid = 0
        self._handed = {}
        self._casts = SpanCaster()

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
        infos: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            # the common, valid entry in one expression; anything else gets _check_entry's verdict
            try:
                dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                ok = (type(shape) is list and type(start) is int and type(end) is int and 0 <= start <= end
                      and not [d for d in shape if type(d) is not int or d < 0]
                      and end - start == math.prod(shape) * _ITEMSIZE[dtype])
            except (TypeError, KeyError, ValueError):
                ok = False
            infos[key] = TensorInfo(dtype, tuple(shape), start, end) if ok else self._check_entry(key, entry)
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
        if type(entry) is not dict:
            raise self._bad(f"header entry {key!r} is not an object", "bad_header")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        itemsize = _ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if itemsize is None:
            raise self._bad(f"tensor {key!r} has unknown dtype {dtype!r}", "bad_dtype")
        # plain ints (not bools, not floats) first, the slower general check only when that fails
        if type(shape) is not list or [d for d in shape if type(d) is not int or d < 0]:
            if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
                raise self._bad(f"tensor {key!r} has an invalid shape {shape!r} (need non-negative integers)", "bad_header")
        if (type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int
                or offs[0] < 0):
            if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs):
                raise self._bad(f"tensor {key!r} has invalid data_offsets {offs!r}", "bad_offsets")
        start, end = offs
        if end < start:
            raise self._bad(f"tensor {key!r} has invalid data_offsets {offs!r}", "bad_offsets")
        nbytes = math.prod(shape) * itemsize  # Python ints: no overflow on absurd shapes
        if end - start != nbytes:
            raise self._bad(
                f"tensor {key!r} spans {end - start} bytes but {dtype}{shape} needs {nbytes}", "bad_offsets"
            )
        return TensorInfo(dtype, tuple(shape), start, end)

    def _check_spans(self, infos: dict[str, TensorInfo]) -> None:
        """Tensors must tile the data section exactly, as the safetensors library requires."""
        pos = 0
        for info in infos.values():  # writers list the tensors in data order: no sort then
            if info.start != pos:
                break
            pos = info.end
        else:
            self._check_data_length(pos)
            return
        pos = 0
        # tuples sort in C; a key function per tensor was a quarter of parsing an SDXL header
        for start, end, key in sorted([(i.start, i.end, k) for k, i in infos.items()]):
            if start < pos:
                raise self._bad(f"tensor {key!r} overlaps the previous tensor (offset {start} < {pos})", "bad_offsets")
            if start > pos:
                raise self._bad(f"gap of {start - pos} bytes before tensor {key!r} (offset {start}, expected {pos})", "bad_offsets")
            pos = end
        self._check_data_length(pos)

    def _check_data_length(self, pos: int) -> None:
        """The tensors end at ``pos``: exactly where the file does."""
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
                first = os.pread(fh.fileno(), n, offset)
                if len(first) == n or not first:  # the usual case: one call (an alpha: 2 bytes)
                    return first
                parts = [first]
                n -= len(first)
                offset += len(first)
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

    def fileno(self) -> int:
        """The open file's descriptor."""
        if self._fh is None:
            raise ValueError(f"{self.path}: SafetensorsFile is closed")
        return self._fh.fileno()

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    def prefetch(self, upto: float = 1.0) -> None:
        """Start reading the data section in a background thread (``preadv`` releases the GIL),
        so the caller can decode the header meanwhile; tensors up to ``_DIRECT_MAX`` bytes
        asked for before it finishes are read on their own instead of waiting.

        Args:
            upto: the share of the section read, from its start (rounded down to whole
                pages); the rest is read when something asks for it (``prefetched``), or
                ahead after all once ``prefetch_rest`` is called.
        """
        n = self.size - self.data_start
        if self._data is not None or not self._preload or self._prefetch is not None or n < _PREFETCH_MIN:
            return
        self._ahead = read_ahead(n, upto)
        buf = self._section_buffer()
        out: dict[str, Any] = {}

        def run() -> None:
            pos = 0
            try:
                while True:
                    with self._prefetch_lock:
                        stop = self._ahead
                        if pos >= stop:  # a later prefetch_rest leaves the rest to _read_span
                            return
                    # one read to the end (in pieces, the caller's casts ran beside the copy and
                    # the thread waited for the GIL between pieces: the query's call ~15 % slower)
                    got = self._pread_into(memoryview(buf)[pos:stop], self.data_start + pos)
                    pos += got
                    self._valid = pos
                    if pos < stop:  # the file was cut: whoever needs more reads it and says so
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the reader in _read_span
                out["error"] = exc

        t = threading.Thread(target=run, name="safetensors-prefetch", daemon=True)
        t.start()
        self._prefetch = (t, out)

    def prefetch_rest(self) -> None:
        """After a partial ``prefetch``: read the rest of the data section ahead too (when the
        thread is still running; otherwise the rest is read when asked for)."""
        with self._prefetch_lock:
            self._ahead = self.size - self.data_start

    @property
    def prefetched(self) -> int:
        """Bytes of the data section, from its start, read in one piece (the whole section
        unless ``prefetch`` was asked for less); later bytes are read only when asked for."""
        return self._ahead

    def _section_buffer(self) -> np.ndarray:
        if self._section is None:
            # not bytearray(n): no zero-fill pass; numpy asks for huge pages; the pool
            # lends an SDXL-size worker the pages it already faulted in for the last file
            self._section = buffer_pool.empty(self.size - self.data_start)
        return self._section

    def _data_section(self) -> memoryview | None:
        """The whole data section, read on first use (None when too large to hold).

        Thread-safe: the streaming reader hashes in one thread while it sketches in another.
        """
        if self._data is not None or not self._preload:
            return self._data
        return self._read_span(0, self.size - self.data_start)

    def _read_span(self, start: int, end: int) -> memoryview:
        """The data section's buffer with at least bytes ``[start, end)`` read in (a file held
        in memory only): waits for the prefetch, then reads what is missing of the first
        ``prefetched`` bytes (all of them at once), or of a span past them (that span alone)."""
        if self._data is not None:
            return self._data
        section = self._section
        if section is not None and end <= self._valid:
            return memoryview(section)
        with self._data_lock:
            if self._prefetch is not None:
                t, out = self._prefetch
                t.join()
                self._prefetch = None
                if "error" in out:
                    raise out["error"]
            buf = self._section_buffer()
            if end > self._valid:
                lo = self._valid
                if end > self._ahead:
                    lo = max(start, lo)
                else:
                    end = self._ahead
                got = self._pread_into(memoryview(buf)[lo:end], self.data_start + lo)
                if got != end - lo:
                    raise self._bad(f"truncated: read {lo + got} of {end} data bytes "
                                    "(the file changed after it was opened?)", "truncated")
                if lo == self._valid:
                    self._valid = end
            if self._valid == len(buf):
                self._data = memoryview(buf)
            return memoryview(buf)

    def _pread_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; returns the bytes read (short at end of file)."""
        fh = self._fh
        if fh is None:
            raise ValueError(f"{self.path}: SafetensorsFile is closed")
        done = 0
        try:
            if hasattr(os, "preadv"):
                return preadv_into(fh.fileno(), view, offset)
            with self._lock:
                fh.seek(offset)
                while done < len(view):
                    got = fh.readinto(view[done:])
                    if not got:
                        break
                    done += got
                return done
        except OSError as exc:
            raise self._bad(f"read failed: {exc.strerror or exc}", "unreadable") from None

    def _bytes(self, key: str, info: TensorInfo) -> memoryview:
        """One tensor's bytes (writable memory: arrays over it are flagged read-only by the callers)."""
        if self._data is not None:
            return self._data[info.start:info.end]
        if self._preload and (self._prefetch is None or info.nbytes > _DIRECT_MAX or info.end <= self._valid):
            return self._read_span(info.start, info.end)[info.start:info.end]
        # an alpha or other small tensor while the data section is being read, or a large file
        buf = memoryview(np.empty(info.nbytes, dtype=np.uint8))
        if self._pread_into(buf, self.data_start + info.start) != info.nbytes:
            raise self._bad(f"truncated while reading {key!r} (the file changed after it was opened?)", "truncated")
        return buf

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored, read-only (BF16 and F8 widened to float32; BOOL as numpy bool)."""
        info = self.tensors[key]
        arr = _decode(self._bytes(key, info), info.dtype, info.shape)
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32; NaN/Inf values (and F64 values beyond float32) are rejected.

        Returns:
            a float32 array of the stored shape.

        Raises:
            BadInput: code ``non_finite``.
        """
        info = self.tensors[key]
        if info.nbytes == 2 and info.dtype in _HALF:  # an alpha (one per module): plain Python is cheapest
            one = self._scalar16(key, info)
            if one is not None:
                return one
        if info.dtype == "F32":
            arr = np.frombuffer(self._bytes(key, info), dtype=_F32).reshape(info.shape)
            arr.flags.writeable = False
            if not self._f32_clean():
                self._check_finite(key, info, arr)
            return arr
        if info.dtype in _HALF:
            if self._half_clean():
                first = info.start // 2
                out = self._widened_buffer()[first:first + info.nbytes // 2].reshape(info.shape)
                out.flags.writeable = False
                return out
            if info.nbytes <= _SCALAR_MAX:  # an alpha (one per module): no slot, no BLAS check
                u16 = np.frombuffer(self._bytes(key, info), dtype="<u2")
                out = np.empty(u16.size, dtype=np.float32)
                _widen_into(u16, out, info.dtype)
                out = out.reshape(info.shape)
                if not np.isfinite(out).all():
                    self._check_finite(key, info, out)
                out.flags.writeable = False
                return out
            out = self._widen(key, info)
            self._check_finite(key, info, out)
            return out
        arr = self.raw(key)
        if info.dtype not in FLOAT_DTYPES:
            return arr.astype(np.float32)
        if info.dtype != "F64":
            self._check_finite(key, info, arr)
            return arr
        self._check_finite(key, info, arr)
        with np.errstate(over="ignore"):  # overflow is reported below, in words
            out = arr.astype(np.float32)
        if not _all_finite(out):
            raise self._bad(f"tensor {key!r} (F64) holds values beyond the float32 range", "non_finite")
        return out

    def _scalar16(self, key: str, info: TensorInfo) -> np.ndarray | None:
        """A one-value F16/BF16 tensor as float32, decoded with ``struct`` (exact); None when it
        is not finite (``get``'s general path then raises with the usual message)."""
        section = self._section  # read before _valid: a closing file drops both
        if info.end <= self._valid and section is not None:  # in memory already (the prefetch may be over)
            raw = section[info.start:info.end].tobytes()
        elif self._prefetch is not None or info.start >= self._ahead:
            # the section is still being read, or this part of it is not read ahead: these bytes alone
            raw = self._pread(info.end - info.start, self.data_start + info.start)
            if len(raw) != info.end - info.start:
                raise self._bad(f"truncated while reading {key!r} (the file changed after it was opened?)", "truncated")
        else:
            raw = bytes(self._bytes(key, info))
        cache_key = (raw, info.dtype, info.shape)
        out = _SCALARS.get(cache_key)  # most files repeat one alpha: one read-only array for all
        if out is not None:
            return out
        if info.dtype == "F16":
            value = _F16_SCALAR.unpack(raw)[0]
        else:
            value = _F32_SCALAR.unpack(b"\0\0" + raw)[0]  # bfloat16 is the high half of a float32
        if not math.isfinite(value):
            return None
        out = np.array(value, dtype=np.float32)
        if info.shape:
            out = out.reshape(info.shape)
        out.flags.writeable = False
        if len(_SCALARS) < 4096:
            _SCALARS[cache_key] = out
        return out

    def get_deferred(self, key: str) -> np.ndarray:
        """``get`` for code that only reshapes, transposes or slices the array: a large
        F16/BF16 tensor comes back as its (still unwritten) place in the float32 buffer.

        Its values are written, and checked for NaN/Inf, by ``fill`` or ``fill_all``
        (or widened elsewhere by ``widen_into``); until then they are garbage. ``lorasearch.read_embed`` fills each module right
        before sketching it, so the widened factors are used while still in cache
        instead of being written to memory in one pass and read back later.
        Other tensors, and files read tensor by tensor, are read as ``get`` reads them.
        """
        info = self.tensors[key]
        dtype, shape, start, end = info
        if dtype not in _HALF or end - start < 2 * _FAST_CAST_MIN or start % 2 or not self._preload:
            return self.get(key)
        one_pass = self._one_pass
        if one_pass is None:
            one_pass = self._one_pass_candidate()
        if one_pass:
            return self.get(key)
        first = start // 2
        if first not in self._pending:
            self._pending[first] = (key, info)
            starts = self._pending_starts
            if not starts or starts[-1] < first:  # readers mostly go in file order
                starts.append(first)
            else:
                bisect.insort(starts, first)
        view = self._widened_view
        if view is None:
            self._widened_buffer()
            view = self._widened_view
        out = view[first:first + (end - start) // 2].reshape(shape)  # read-only: a view of a read-only view
        self._handed[id(out)] = (out, first)  # kept alive: the id stays its own
        return out

    def fill(self, arr: np.ndarray) -> None:
        """Write the values of every deferred tensor ``arr`` views (see ``get_deferred``).

        Raises:
            BadInput: ``non_finite``, naming the tensor.
        """
        if not (self._pending or self._consumed) or self._widened is None or not arr.size:
            return
        base = self._widened_ptr
        low, high = _byte_bounds(arr)
        if high <= base or low >= base + self._widened.nbytes:
            return
        lo, hi = (low - base) // 4, (high - base + 3) // 4
        starts = self._pending_starts
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(starts) and starts[i] < hi:
            first = starts[i]
            # a tensor widened elsewhere (widen_into, consume) for another module that shares it
            # is still unwritten here
            entry = self._pending.get(first) or self._consumed.get(first)
            if entry is not None and first + entry[1].nbytes // 2 > lo:
                self._fill_one(first, *entry)
            i += 1

    def widen_into(self, arr: np.ndarray, scratch: np.ndarray) -> np.ndarray | None:
        """``arr``'s values in ``scratch`` instead of the file's float32 buffer, for one-off use.

        ``arr`` must lie inside one deferred tensor (as a LoRA factor, reshaped or
        row-sliced, does); that tensor is widened into the start of ``scratch`` and
        the same view of it is returned. The tensor is then no longer pending and
        ``arr`` itself stays unwritten. Its NaN/Inf check is left to the caller
        (``check_consumed``): a sketch of the values is finite only if they are.

        Args:
            arr: a view ``get_deferred`` handed out.
            scratch: a float32 buffer at least as large as the tensor.

        Returns:
            the view over ``scratch``, or None when ``arr`` is not such a view.
        """
        got = self.widen_pair_into(arr, None, scratch)
        return None if got is None else got[0]

    def widen_pair_into(self, a: np.ndarray, b: np.ndarray | None,
                        scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``widen_into`` for two arrays of two deferred tensors that lie side by side in
        the file (a kohya module's down and up factors): one cast for both.

        Returns:
            the two views over ``scratch`` (the second is None when ``b`` is), or None when
            they are not two such views of one 16-bit type next to each other, or ``scratch``
            is too small.
        """
        fa = self._deferred_tensor(a)
        if fa is None:
            return None
        ea = self._pending[fa[0]]
        lo, hi = fa[0], fa[0] + ea[1].nbytes // 2
        fb = eb = None
        if b is not None:
            fb = self._deferred_tensor(b)
            if fb is None or fb[0] == fa[0]:
                return None
            eb = self._pending[fb[0]]
            if eb[1].dtype != ea[1].dtype:
                return None
            b_hi = fb[0] + eb[1].nbytes // 2
            if b_hi == lo:
                lo = fb[0]
            elif fb[0] == hi:
                hi = b_hi
            else:
                return None
        if scratch.size < hi - lo:
            return None
        data = self._read_span(2 * lo, 2 * hi)  # deferred tensors exist only for files held in memory
        if self._data_u16 is None:
            self._data_u16 = np.frombuffer(data, dtype="<u2", count=len(data) // 2)
        self._casts.widen(self._data_u16, lo, hi, scratch, ea[1].dtype)
        origin = self._widened_ptr + 4 * lo
        out = []
        for arr, found, entry in ((a, fa, ea), (b, fb, eb)):
            if arr is None or found is None or entry is None:
                out.append(None)
                continue
            del self._pending[found[0]]
            self._consumed[found[0]] = entry
            offset = found[1] - origin
            if arr.flags.c_contiguous:
                out.append(scratch[offset // 4:offset // 4 + arr.size].reshape(arr.shape))
            else:
                out.append(np.ndarray(arr.shape, dtype=np.float32, buffer=scratch, offset=offset, strides=arr.strides))
        return out[0], out[1]  # type: ignore[return-value]

    def _deferred_tensor(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(first float32 index, address of ``arr``'s first value) of the one pending tensor
        ``arr`` lies inside, or None (not a view of one deferred tensor, or already written)."""
        if not self._pending or self._widened is None or arr.dtype is not _F32 or not arr.size:
            return None
        base = self._widened_ptr
        hit = self._handed.get(id(arr))
        if hit is not None and hit[0] is arr:  # an array get_deferred handed out, as it is
            return (hit[1], base + 4 * hit[1]) if hit[1] in self._pending else None
        ptr = arr.__array_interface__["data"][0]
        first = (ptr - base) >> 2
        entry = self._pending.get(first) if arr.flags.c_contiguous else None
        if entry is not None:  # the usual case: the whole tensor, reshaped
            low, high = ptr, ptr + arr.nbytes
        else:
            low, high = _byte_bounds(arr)
            i = bisect.bisect_right(self._pending_starts, (low - base) // 4) - 1
            first = self._pending_starts[i] if i >= 0 else -1
            entry = self._pending.get(first)
        if entry is None or low < base + 4 * first or high > base + 4 * first + 2 * entry[1].nbytes:
            return None
        return first, ptr

    def deferred_spec(self, arr: np.ndarray) -> tuple[str, int, int, int, tuple[int, ...], tuple[int, ...]] | None:
        """Where ``arr``'s values are in the file, for another process that reads them itself
        (``lorasearch.sketch_helper``); None when ``arr`` is not inside one pending deferred tensor.

        Returns:
            (dtype, byte offset of the tensor in the data section, its element count,
            ``arr``'s offset into it in elements, ``arr``'s shape, its strides in elements).
        """
        found = self._deferred_tensor(arr)
        if found is None:
            return None
        first, ptr = found
        info = self._pending[first][1]
        offset = (ptr - (self._widened_ptr + 4 * first)) // 4
        return (info.dtype, info.start, (info.end - info.start) // 2, offset, arr.shape, _steps(arr.strides))

    def consume(self, starts: Iterable[int]) -> None:
        """Mark deferred tensors as used elsewhere (another process sketched them): no longer
        pending, and checked by ``check_consumed`` like the tensors ``widen_into`` widened.

        Args:
            starts: their byte offsets in the data section (``deferred_spec``'s second value).
        """
        for start in starts:
            entry = self._pending.pop(start // 2, None)
            if entry is not None:
                self._consumed[start // 2] = entry

    def check_consumed(self) -> None:
        """Check every tensor ``widen_into`` used for NaN/Inf (raises ``non_finite`` naming it)."""
        for first, (key, info) in list(self._consumed.items()):
            self._check_finite(key, info, self._widen(key, info))

    def fill_all(self) -> None:
        """Write every deferred tensor still unwritten."""
        for first, entry in list(self._pending.items()):
            self._fill_one(first, *entry)

    @property
    def unfilled(self) -> int:
        """Deferred tensors whose values are not written yet."""
        return len(self._pending)

    def _fill_one(self, first: int, key: str, info: TensorInfo) -> None:
        self._pending.pop(first, None)
        self._consumed.pop(first, None)  # written and checked here
        self._check_finite(key, info, self._widen(key, info))

    def _f32_clean(self) -> bool:
        """Whether every tensor is F32 and the whole data section, held in memory, is finite.

        Then one check over the section replaces one per tensor (an SD1.5
        LoRA has ~260 small ones); otherwise tensors are checked one by one.
        """
        if self._clean is None:
            # the types first: a file of other types too is not read whole for its F32 tensors
            data = self._data_section() if self.dtypes() == {"F32"} else None
            self._clean = bool(data is not None and len(data) % 4 == 0 and _all_finite(np.frombuffer(data, dtype=_F32)))
        return self._clean

    def _widened_buffer(self) -> np.ndarray:
        """The float32 buffer 16-bit tensors are widened into, indexed by data offset / 2 (made once)."""
        if self._widened is None:
            self._widened = buffer_pool.empty((self.size - self.data_start + 1) // 2 * 4).view(np.float32)
            self._widened_ptr = self._widened.__array_interface__["data"][0]
            self._widened_view = self._widened.view()
            self._widened_view.flags.writeable = False
        return self._widened

    def dtypes(self) -> set[str]:
        """The dtypes of the file's tensors."""
        if self._dtypes is None:
            self._dtypes = {i.dtype for i in self.tensors.values()}
        return set(self._dtypes)

    def _one_pass_candidate(self) -> bool:
        """Whether ``_half_clean`` may widen this file in one pass (from the header alone)."""
        if self._one_pass is None:
            dtypes = self.dtypes()
            self._one_pass = (self.size - self.data_start <= _ONE_PASS_MAX and len(dtypes) == 1
                              and dtypes <= _HALF and all(i.start % 2 == 0 for i in self.tensors.values()))
        return self._one_pass

    def _half_clean(self) -> bool:
        """Whether every tensor is of one 16-bit float type at an even offset and the whole data
        section, held in memory, widened to float32 in one pass, is finite.

        Then ``get`` slices that one buffer: one cast and one finiteness check
        per file instead of one each per tensor (a small LoRA's read is mostly
        such per-tensor calls). Otherwise, and for files over ``_ONE_PASS_MAX``
        (where the calls are a small share and one huge pass measured no faster),
        tensors are widened one by one.
        """
        if self._half_ok is None:
            ok = False
            data = self._data_section() if self._one_pass_candidate() else None
            if data is not None:
                u16 = np.frombuffer(data, dtype="<u2", count=len(data) // 2)
                whole = self._widened_buffer()[:u16.size]
                _widen_into(u16, whole, next(iter(self.tensors.values())).dtype)
                ok = _all_finite(whole)
            self._half_ok = ok
        return self._half_ok

    def _widen(self, key: str, info: TensorInfo) -> np.ndarray:
        """A 16-bit float tensor as float32, written into this file's shared float32 buffer (read-only view).

        One buffer for all tensors instead of one allocation each: numpy maps
        a large buffer with huge pages, where hundreds of separate multi-MiB
        arrays would each be faulted in 4 KiB at a time (~40 % of the decode
        time of an SDXL-size fp16 file).
        """
        u16 = np.frombuffer(self._bytes(key, info), dtype="<u2")
        first = (info.start + 1) // 2  # byte spans do not overlap, so neither do these
        out = self._widened_buffer()[first:first + u16.size]
        _widen_into(u16, out, info.dtype)
        out = out.reshape(info.shape)
        out.flags.writeable = False
        return out

    def _check_finite(self, key: str, info: TensorInfo, arr: np.ndarray) -> None:
        if _all_finite(arr):
            return
        bad = arr[~np.isfinite(arr)]
        what = "NaN" if np.isnan(bad).any() else "Inf"
        raise self._bad(f"tensor {key!r} ({info.dtype}) contains {bad.size} non-finite values ({what})", "non_finite")

    def hashes(self, threads: int = 1) -> tuple[str, str]:
        """sha256 of the whole file and AutoV3, from the bytes the tensors are read from.

        The two digests cover the same data bytes but cannot share a pass
        (SHA-256 state depends on everything before), so they cost two passes
        of CPU; with ``threads >= 2`` they run side by side (hashlib releases
        the GIL), halving the wall time when a core is free.

        Args:
            threads: 1 or 2 hashing threads.

        Returns:
            (lower-case sha256, upper-case AutoV3); see ``lorasearch.hashes``.
        """
        data = self._data_section()
        if data is None:  # too large to hold: one streaming pass over the file
            return file_hashes(self.path, self.header_len)
        full = hashlib.sha256(self._head)
        start = autov3_start(self.header_len)
        tail = hashlib.sha256(self._head[start:]) if start < len(self._head) else hashlib.sha256()
        if threads >= 2 and len(data) >= _THREADED_HASH_MIN:
            helper = threading.Thread(target=full.update, args=(data,), name="sha256")
            helper.start()
            tail.update(data)
            helper.join()
        else:
            full.update(data)
            tail.update(data)
        return full.hexdigest(), tail.hexdigest().upper()

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
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the first repeated key for the message
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _json_type(x: object) -> str:
    """JSON's name for a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _decode(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype in _NUMPY:
        return np.frombuffer(buf, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
    codes = np.frombuffer(buf, dtype=np.uint8)
    if dtype == "BF16":
        out = np.empty(codes.size // 2, dtype=np.float32)
        _widen_into(codes.view("<u2"), out, dtype)
        return out.reshape(shape)
    return _F8[dtype][codes].reshape(shape)


def _torch() -> Any:
    """torch if the process has already imported it (never imported here: it costs ~1 s)."""
    return sys.modules.get("torch")


def _widen_into(u16: np.ndarray, out: np.ndarray, dtype: str) -> None:
    """F16 or BF16 codes (uint16) widened exactly into a float32 array of the same size."""
    torch = _torch() if u16.size >= _FAST_CAST_MIN else None
    if torch is not None and u16.flags.writeable:  # torch warns on read-only memory
        half = torch.float16 if dtype == "F16" else torch.bfloat16
        torch.from_numpy(out).copy_(torch.from_numpy(u16).view(half))
    elif dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, u16)
        bits <<= 16
    elif u16.size >= _FAST_CAST_MIN:
        np.take(_F16_TABLE, u16, out=out, mode="clip")  # "clip": no bounds-check buffering; codes are all in range
    else:
        np.copyto(out, u16.view(np.float16))


class SpanCaster:
    """``_widen_into`` of spans of one code buffer into the start of one scratch buffer, cast
    after cast: torch's views of both buffers are made once, not once per cast (a module's
    cast is a few microseconds of Python besides its copy)."""

    def __init__(self) -> None:
        self._src: tuple[np.ndarray, str, Any] | None = None
        self._dst: tuple[np.ndarray, Any] | None = None

    def widen(self, codes: np.ndarray, lo: int, hi: int, out: np.ndarray, dtype: str) -> None:
        """``out[:hi - lo] = float32(codes[lo:hi])`` for F16/BF16 codes (uint16), exactly."""
        torch = _torch() if hi - lo >= _FAST_CAST_MIN else None
        if torch is None or not codes.flags.writeable or not out.flags.writeable:
            _widen_into(codes[lo:hi], out[:hi - lo], dtype)
            return
        if self._src is None or self._src[0] is not codes or self._src[1] != dtype:
            self._src = (codes, dtype, torch.from_numpy(codes).view(torch.float16 if dtype == "F16" else torch.bfloat16))
        if self._dst is None or self._dst[0] is not out:
            self._dst = (out, torch.from_numpy(out))
        self._dst[1][:hi - lo].copy_(self._src[2][lo:hi])


def read_ahead(n: int, upto: float) -> int:
    """The bytes of an ``n``-byte data section that ``prefetch(upto)`` reads ahead: the share
    ``upto`` of it, rounded down to whole pages (all of it from 1.0 on)."""
    return n if upto >= 1.0 else int(n * max(upto, 0.0)) & -_PAGE


def _steps(strides: tuple[int, ...]) -> tuple[int, ...]:
    """float32 byte strides in elements."""
    return (strides[0] >> 2, strides[1] >> 2) if len(strides) == 2 else tuple(s >> 2 for s in strides)


def preadv_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from byte ``offset`` of ``fd`` (``preadv`` may return short reads);
    returns the bytes read, fewer only at the end of the file."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


def _byte_bounds(arr: np.ndarray) -> tuple[int, int]:
    """First and one-past-last byte address an array's elements occupy (any strides)."""
    low = high = arr.__array_interface__["data"][0]
    for n, st in zip(arr.shape, arr.strides):
        if st < 0:
            low += (n - 1) * st
        else:
            high += (n - 1) * st
    return low, high + arr.itemsize


def _all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf: ``x·x`` (one BLAS pass, no temporary) is finite unless some value is not
    or the sum overflows; only then are the values checked one by one."""
    flat = arr.reshape(-1)
    if flat.dtype == np.float32 and flat.size:
        with np.errstate(all="ignore"):  # a NaN/Inf/overflow is the answer, not a warning
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return bool(np.isfinite(flat).all())
