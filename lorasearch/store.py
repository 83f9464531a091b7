"""The durable store: SQLite (source of truth) + FAISS indexes per (family, view) derived from it.

Layout of a store directory ``DIR``::

    DIR/lorasearch.sqlite                     loras, sources, vectors, index_state, meta (WAL)
    DIR/sketches/<autov3[:2]>/<autov3>.safetensors   module sketches (M×k×k) + norms, memory-mapped on read
    DIR/blobs/<sha256[:2]>/<sha256>.safetensors      content-addressed copy of each indexed file (+ PEFT config)
    DIR/faiss/<family>/<view>.faiss + <view>.json     derived ANN index + sidecar {generation, count, ...}

Durability: every write is one SQLite transaction (``BEGIN IMMEDIATE``); the
row ids are never reused (AUTOINCREMENT) and a row's vectors never change, so
a FAISS index is exactly described by its id set. After each commit the
touched indexes are brought to the SQLite state and written atomically (temp
file in the same folder, fsync, ``os.replace``, fsync of the folder). On load
the sidecar's count, generation and the index's id set are checked against
SQLite; an index that is behind is caught up from the ``vectors`` table and
one that does not fit (torn pair, foreign ids, wrong dim) is rebuilt from it.
A kill -9 at any moment therefore leaves the last committed state.

Readers may be many (each process opens its own ``Store``, possibly
``readonly=True``); writers serialise on SQLite's write lock and on a file
lock around FAISS saves. A reader checks the generation counter on every
search and reloads the indexes that changed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import faiss
import numpy as np

from lorasearch.delta import Dense, Factored, Kronecker, LoraDelta, NeedsBase
from lorasearch.embed import Embedding
from lorasearch.errors import LoraSearchError
from lorasearch.report import info_dict

SCHEMA_VERSION = 1
DB_NAME = "lorasearch.sqlite"
BUSY_TIMEOUT_MS = 30_000
SKETCH_FILE_FORMAT = 1
SIDECAR_FORMAT = 1

# Index type by size, following autofaiss's index selection
# (criteo/autofaiss, autofaiss/external/optimize.py: get_optimal_index_keys_v2 and
# get_optimal_nb_clusters, themselves from the faiss wiki "Guidelines to choose an index"):
#   - a flat index below a size threshold (autofaiss: flat_threshold=1_000). We keep exact
#     flat search up to 20 000 vectors because its answers are exact and a 20k×1024 float32
#     scan costs ~5 ms on one busy core (measured here), cheap next to a query's re-ranking;
#   - HNSW (autofaiss: "HNSW{M}", M capped at 32) whenever the graph fits the memory budget,
#     i.e. 4·n·(d + 2M) bytes <= budget (autofaiss's m_hnsw formula), up to ivf_flat_threshold;
#   - beyond, IVF with nlist = 2^round(log2(4·sqrt(n))) below 1M vectors and 16 384 above
#     (get_optimal_nb_clusters), an HNSW32 coarse quantizer when nlist >= 1000, flat codes
#     when they fit the budget and PQ codes otherwise; candidates are then re-scored
#     exactly from the ``vectors`` table (the refine step).
FLAT_MAX = 20_000
HNSW_MAX = 1_000_000
MEMORY_BUDGET_BYTES = 2 * 2**30
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# efSearch: on 20k clustered 1024-d unit vectors (M=32, efConstruction=80, one core) recall@10
# against exact search was 0.90 at efSearch=128 and 0.98 at 256 (p50 0.6 ms / 1.1 ms); a planted
# near-duplicate (cosine 0.45 to the query) was found first in 99.5 % / 100 % of queries.
HNSW_EF_SEARCH = 256
IVF_REFINE_FACTOR = 10
TOMBSTONE_REBUILD_FRACTION = 0.10  # HNSW cannot remove: deleted ids are filtered until they pass 10 %
IVF_RETRAIN_GROWTH = 4.0  # an IVF trained on n vectors is retrained once it holds 4n

KINDS = ("flat", "hnsw", "ivf")
_RANK = {k: i for i, k in enumerate(KINDS)}


class StoreError(LoraSearchError):
    """A store that cannot be opened or written as asked."""


def _log(msg: str) -> None:
    print(f"lorasearch.store: {msg}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- fault hooks (tests)


def _fault(point: str) -> None:
    """Test hook: widen crash windows.

    ``LORASEARCH_FAULTS="faiss_rename=0.3,after_commit=0.1"`` sleeps at those
    points; ``LORASEARCH_FAULT_MARK=DIR`` touches ``DIR/<point>`` on arrival so
    a test can kill the process exactly there. Unset in normal runs.
    """
    spec = os.environ.get("LORASEARCH_FAULTS")
    if not spec:
        return
    delays = dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
    if point not in delays:
        return
    mark = os.environ.get("LORASEARCH_FAULT_MARK")
    if mark:
        Path(mark, point).touch()
    time.sleep(float(delays[point]))


# --------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path, tmp_dir: Path | None = None) -> Path:
    folder = tmp_dir if tmp_dir is not None else path.parent
    return folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def atomic_write(path: Path, write: Callable[[Path], None], point: str = "rename", tmp_dir: Path | None = None) -> None:
    """Write a file so that readers see the old or the new content, never a torn one.

    Args:
        path: the final path.
        write: writes the content to the temp path it is given.
        point: fault-hook name for the moment between the fsync and the rename.
        tmp_dir: where the temp file goes (same file system; default: beside ``path``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, tmp_dir)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fault(point)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, point: str = "rename", tmp_dir: Path | None = None) -> None:
    """``atomic_write`` of a bytes object."""
    atomic_write(path, lambda p: p.write_bytes(data), point, tmp_dir)


def atomic_write_many(files: Sequence[tuple[Path, bytes]], point: str = "rename", tmp_dir: Path | None = None) -> None:
    """``atomic_write_bytes`` for many small files: every file is fsynced, each folder once."""
    tmps: list[tuple[Path, Path]] = []
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_name(path, tmp_dir)
            tmps.append((tmp, path))
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in tmps:
            _fault(point)
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    for folder in {path.parent for _, path in tmps} | ({tmp_dir} if tmp_dir is not None and tmps else set()):
        fsync_dir(folder)


def _remove_stale_tmp(folder: Path) -> None:
    """Remove temp files left by processes that no longer run (a kill -9 mid-write)."""
    if not folder.is_dir():
        return
    for p in folder.glob("**/.*.tmp"):
        m = re.match(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$", p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            p.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- sketch files


@dataclass(eq=False)
class SketchFile:
    """Module sketches of one LoRA as stored: names, (M, k, k) sketches and (M,) norms (memory-mapped)."""

    names: list[str]
    sketches: np.ndarray
    norms: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {n: self.sketches[i] for i, n in enumerate(self.names)}

    def as_tuple(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        return self.names, self.sketches, self.norms


def sketch_bytes(emb: Embedding) -> bytes:
    """A safetensors file holding ``sketches`` (M×k×k), ``norms`` (M) and the module names in its metadata."""
    from safetensors.numpy import save

    names = sorted(emb.sketches)
    k = emb.k
    z = np.stack([np.asarray(emb.sketches[n], dtype=np.float32) for n in names]) if names else np.zeros((0, k, k), np.float32)
    norms = np.asarray([emb.norms.get(n, 0.0) for n in names], dtype=np.float32)
    meta = {"format": str(SKETCH_FILE_FORMAT), "names": json.dumps(names), "family": emb.family,
            "k": str(k), "sketch_version": str(emb.sketch_version)}
    return save({"sketches": np.ascontiguousarray(z), "norms": norms}, metadata=meta)


def read_sketch_file(path: Path) -> SketchFile:
    """Read a sketch file with the arrays memory-mapped (the layout is plain safetensors)."""
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(hlen))
    names = json.loads(header["__metadata__"]["names"])
    base = 8 + hlen

    def arr(key: str) -> np.ndarray:
        info = header[key]
        shape = tuple(info["shape"])
        if math.prod(shape) == 0:
            return np.zeros(shape, np.float32)
        return np.memmap(path, dtype="<f4", mode="r", offset=base + info["data_offsets"][0], shape=shape)

    return SketchFile(names, arr("sketches"), arr("norms"))


# --------------------------------------------------------------------------- index policy and FAISS wrapper


@dataclass(frozen=True)
class IndexPolicy:
    """How big an index must be before it changes type (see the comment on ``FLAT_MAX``)."""

    flat_max: int = FLAT_MAX
    hnsw_max: int = HNSW_MAX
    memory_bytes: int = MEMORY_BUDGET_BYTES
    hnsw_m: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH
    refine_factor: int = IVF_REFINE_FACTOR
    tombstone_fraction: float = TOMBSTONE_REBUILD_FRACTION

    def _want(self, n: int, dim: int) -> str:
        if n < self.flat_max:
            return "flat"
        if n < self.hnsw_max and 4 * n * (dim + 2 * self.hnsw_m) <= self.memory_bytes:
            return "hnsw"
        return "ivf"

    def choose(self, n: int, dim: int, current: str | None = None) -> str:
        """Index type for n vectors; a bigger current type is kept until n halves (no flip-flopping)."""
        want = self._want(n, dim)
        if current in _RANK and _RANK[current] > _RANK[want] and _RANK[self._want(2 * n, dim)] >= _RANK[current]:
            return current  # type: ignore[return-value]
        return want

    @staticmethod
    def nlist(n: int) -> int:
        """autofaiss's first choice of IVF list count, capped so every list gets ~39 training points."""
        x = 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))) if n < 1_000_000 else 16_384
        return int(max(1, min(x, n // 39)))

    @staticmethod
    def nprobe(nlist: int) -> int:
        return int(min(nlist, max(8, nlist // 32)))

    def ivf_codec(self, n: int, dim: int) -> str:
        """``Flat`` codes when they fit the budget, else PQ with ~8 dims per sub-quantizer."""
        if 4 * n * (dim + 2) <= self.memory_bytes:
            return "Flat"
        m = max(d for d in range(1, max(dim // 8, 1) + 1) if dim % d == 0)
        nbits = 8 if n >= 256 * 39 else 4
        return f"PQ{m}x{nbits}"


ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


class VectorIndex:
    """One FAISS index with SQLite row ids (inner product on unit vectors).

    Args:
        kind: ``flat`` (IndexIDMap2 over IndexFlatIP), ``hnsw`` (IndexIDMap2 over
            IndexHNSWFlat) or ``ivf`` (IndexIVF with its own ids).
        index: the faiss index.
        dim: vector length.
        codec: IVF code type (``Flat`` or ``PQ{m}x{nbits}``).
        trained_n: how many vectors the IVF was built for.
    """

    def __init__(self, kind: str, index: faiss.Index, dim: int, codec: str = "", trained_n: int = 0,
                 policy: IndexPolicy | None = None) -> None:
        self.kind = kind
        self.index = index
        self.dim = dim
        self.codec = codec
        self.trained_n = trained_n
        self.policy = policy or IndexPolicy()
        self.tombstones: set[int] = set()
        self.generation = 0
        self.dirty = True  # content differs from the saved file (tombstones and generation are not content)
        self._selector: Any = None

    # ---- building

    @classmethod
    def build(cls, kind: str, dim: int, n: int, chunks: ChunkSource, sample: Callable[[int], np.ndarray],
              policy: IndexPolicy) -> VectorIndex:
        """Build an index of ``kind`` over n vectors streamed from ``chunks``.

        Args:
            kind: index type.
            dim: vector length.
            n: how many vectors ``chunks`` yields (sizes the IVF).
            chunks: returns an iterator of (ids int64, vectors float32 n×dim).
            sample: returns up to m training vectors (IVF only).
            policy: thresholds and search parameters.
        """
        codec, trained_n = "", 0
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            h = faiss.IndexHNSWFlat(dim, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = policy.ef_construction
            index = faiss.IndexIDMap2(h)
        elif kind == "ivf":
            nlist = policy.nlist(n)
            codec = policy.ivf_codec(n, dim)
            coarse = f"IVF{nlist}_HNSW32" if nlist >= 1000 else f"IVF{nlist}"
            index = faiss.index_factory(dim, f"{coarse},{codec}", faiss.METRIC_INNER_PRODUCT)
            train = sample(min(n, max(100 * nlist, 10_000)))
            index.train(np.ascontiguousarray(train, dtype=np.float32))
            trained_n = n
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        vi = cls(kind, index, dim, codec, trained_n, policy)
        for ids, vecs in chunks():
            vi.add(ids, vecs)
        return vi

    # ---- contents

    def ids(self) -> np.ndarray:
        """Every id stored in the index (tombstoned ones included), int64."""
        if self.kind in ("flat", "hnsw"):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self.index)
        inv = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(inv.get_ids(lst), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def live_count(self) -> int:
        return self.ntotal - len(self.tombstones)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.dirty = True
        self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: Iterable[int]) -> None:
        """Remove ids: physically for flat and IVF, as tombstones for HNSW (which cannot remove)."""
        arr = np.fromiter((int(i) for i in ids), dtype=np.int64)
        if arr.size == 0:
            return
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in arr)
            self._selector = None
        else:
            self.index.remove_ids(arr)
            self.dirty = True

    def revive(self, ids: Iterable[int]) -> None:
        """Un-tombstone ids whose rows came back (their vectors are still in the graph)."""
        self.tombstones.difference_update(int(i) for i in ids)
        self._selector = None

    def needs_rebuild(self, live: int) -> bool:
        """Too many tombstones, or an IVF that has outgrown its training."""
        if self.kind == "hnsw" and self.tombstones and len(self.tombstones) > self.policy.tombstone_fraction * max(self.ntotal, 1):
            return True
        return self.kind == "ivf" and live > IVF_RETRAIN_GROWTH * max(self.trained_n, 1)

    # ---- searching

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by inner product, tombstones excluded.

        Returns:
            (ids int64, scores float32), best first, without the -1 padding.
        """
        k = int(min(k, max(self.live_count, 0)))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        x = np.ascontiguousarray(q.reshape(1, -1), dtype=np.float32)
        params = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.policy.ef_search, k))
            if self.tombstones:
                if self._selector is None:
                    batch = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64))
                    self._selector = (batch, faiss.IDSelectorNot(batch))
                params.sel = self._selector[1]
        elif self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = self.policy.nprobe(ivf.nlist)
            quant = faiss.downcast_index(ivf.quantizer)
            if isinstance(quant, faiss.IndexHNSW):
                quant.hnsw.efSearch = max(64, 2 * ivf.nprobe)
        scores, ids = self.index.search(x, k, params=params) if params is not None else self.index.search(x, k)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep]

    # ---- persistence

    def sidecar(self, family: str, view: str) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "family": family, "view": view, "generation": self.generation,
                "count": self.ntotal, "live": self.live_count, "index_type": self.kind, "dim": self.dim,
                "codec": self.codec, "trained_n": self.trained_n}

    def save(self, path: Path, family: str, view: str) -> None:
        """Write ``<view>.faiss`` (when its content changed) then ``<view>.json``, each atomically."""
        if self.dirty or not path.is_file():
            atomic_write(path, lambda p: faiss.write_index(self.index, str(p)), "faiss_rename")
            self.dirty = False
        side = json.dumps(self.sidecar(family, view), sort_keys=True).encode()
        atomic_write_bytes(path.with_suffix(".json"), side, "json_rename")

    @classmethod
    def load(cls, path: Path, policy: IndexPolicy) -> tuple[VectorIndex, dict[str, Any]]:
        """Read an index and its sidecar (raises on anything unreadable)."""
        side = json.loads(path.with_suffix(".json").read_text())
        index = faiss.read_index(str(path))
        vi = cls(side["index_type"], index, int(side["dim"]), side.get("codec", ""), int(side.get("trained_n", 0)), policy)
        if vi.kind not in KINDS or index.d != vi.dim:
            raise ValueError(f"sidecar says {vi.kind}/{vi.dim}, file holds d={index.d}")
        vi.generation = int(side["generation"])
        vi.dirty = False
        return vi, side


# --------------------------------------------------------------------------- SQLite schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loras (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL DEFAULT '',
    family TEXT NOT NULL,
    format TEXT NOT NULL DEFAULT '',
    file_sha256 TEXT,
    autov3 TEXT NOT NULL UNIQUE,
    bytes INTEGER,
    dtype TEXT,
    rank_min INTEGER,
    rank_max INTEGER,
    modules INTEGER NOT NULL DEFAULT 0,
    norm REAL,
    needs_base INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '[]',
    header_metadata TEXT NOT NULL DEFAULT '{}',
    info TEXT NOT NULL DEFAULT '{}',
    blob TEXT,
    k INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    sketch_version INTEGER NOT NULL,
    added_at TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS loras_family ON loras(family, deleted);
CREATE INDEX IF NOT EXISTS loras_sha256 ON loras(file_sha256);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lora_id INTEGER NOT NULL REFERENCES loras(id),
    source TEXT NOT NULL DEFAULT '',
    repo TEXT,
    revision TEXT,
    path TEXT NOT NULL DEFAULT '',
    added_at TEXT NOT NULL,
    UNIQUE(lora_id, source, path)
);
CREATE INDEX IF NOT EXISTS sources_source ON sources(source);
CREATE INDEX IF NOT EXISTS sources_path ON sources(path);
CREATE TABLE IF NOT EXISTS vectors (
    lora_id INTEGER NOT NULL REFERENCES loras(id),
    view TEXT NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY(lora_id, view)
);
CREATE TABLE IF NOT EXISTS index_state (
    family TEXT NOT NULL,
    view TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY(family, view)
);
"""

_LIGHT_COLUMNS = ("id", "name", "family", "format", "file_sha256", "autov3", "bytes", "dtype", "rank_min", "rank_max",
                  "modules", "norm", "needs_base", "labels", "blob", "k", "dim", "sketch_version", "added_at", "deleted")


def safe_name(name: str) -> str:
    """A file-system-safe folder/file name; a short hash keeps altered names distinct."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if clean == name and not name.startswith("."):
        return name
    return f"{clean.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def content_hash(ld: LoraDelta) -> str:
    """A stand-in AutoV3 for LoraDeltas that did not come from a file: sha256 of module names and values."""
    h = hashlib.sha256()
    for name in sorted(ld.modules):
        d = ld.modules[name]
        h.update(name.encode() + b"\0" + d.kind.encode())
        if isinstance(d, Factored):
            arrays: list[Any] = [d.up, d.down, np.float64(d.scale)]
        elif isinstance(d, Kronecker):
            arrays = [getattr(d.w1, "up", d.w1), getattr(d.w1, "down", d.w1), getattr(d.w2, "up", d.w2),
                      getattr(d.w2, "down", d.w2), np.float64(d.scale)]
        elif isinstance(d, Dense):
            arrays = [d.values]
        else:
            assert isinstance(d, NeedsBase)
            arrays = [d.tensors[t] for t in sorted(d.tensors)]
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest().upper()


def _default_name(source: Mapping[str, Any]) -> str:
    path = str(source.get("path") or "")
    if source.get("repo"):
        return f"{source['repo']}/{path}" if path else str(source["repo"])
    if not path:
        return str(source.get("source") or "")
    p = Path(path)
    # a PEFT folder's weights file is always adapter_model.safetensors: the folder names it
    return p.parent.name if p.name == "adapter_model.safetensors" and p.parent.name else p.name


@dataclass(eq=False)
class _Prepared:
    ld: LoraDelta
    emb: Embedding
    source: dict[str, Any]
    labels: list[str]
    autov3: str
    blob: str | None


# --------------------------------------------------------------------------- the store


class Store:
    """LoRA metadata, vectors and sketches in SQLite + files, FAISS indexes derived from them.

    Args:
        root: the store directory.
        create: create it when missing (else raise StoreError).
        keep_files: keep a content-addressed copy of each indexed file (for exact re-ranking).
        readonly: never write (many readers may run beside one writer).
        policy: index-type thresholds (tests inject small ones).
    """

    def __init__(self, root: str | Path, create: bool = True, keep_files: bool = True, readonly: bool = False,
                 policy: IndexPolicy | None = None) -> None:
        self.root = Path(root)
        self.keep_files = keep_files
        self.readonly = readonly
        self.policy = policy or IndexPolicy()
        self.db_path = self.root / DB_NAME
        if not self.db_path.is_file():
            if readonly or not create:
                raise StoreError(f"{self.root}: no lorasearch store here (missing {DB_NAME})")
            self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._in_tx = False
        self._indexes: dict[tuple[str, str], VectorIndex] = {}
        self._conn = sqlite3.connect(str(self.db_path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._init_schema()
            for sub in ("faiss", "tmp"):
                _remove_stale_tmp(self.root / sub)
        else:
            self._check_schema()
            self._conn.execute("PRAGMA query_only=ON")
        self._gen_seen = self.generation()

    # ---- schema and transactions

    def _init_schema(self) -> None:
        with self.transaction() as c:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?), ('generation', '0')", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.root}: store schema version {row[0]}, this lorasearch reads {SCHEMA_VERSION}")

    def _check_schema(self) -> None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.root}: not a lorasearch store ({exc})") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.root}: store schema version {row and row[0]}, this lorasearch reads {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, waits up to busy_timeout).

        Also for the indexer's own tables in the same database file.
        """
        self._writable()
        with self._lock:
            if self._in_tx:
                raise StoreError("nested store transactions are not supported")
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._in_tx = False

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot (a deferred transaction)."""
        with self._lock:
            if self._in_tx:
                yield self._conn
                return
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def ensure_tables(self, sql: str) -> None:
        """Create extra tables (e.g. the indexer's jobs) in the store's database, in one transaction.

        Args:
            sql: ``CREATE TABLE IF NOT EXISTS ...`` statements separated by ``;``.
        """
        with self.transaction() as c:
            for stmt in sql.split(";"):
                if stmt.strip():
                    c.execute(stmt)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        """A read query on the store's database (for tools beside the store)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.root}: store opened read-only")

    @staticmethod
    def _bump(c: sqlite3.Connection) -> int:
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def generation(self) -> int:
        """The counter bumped by every committed change."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def k(self) -> int | None:
        """Sketch size of the stored LoRAs (None while empty)."""
        v = self._meta("k")
        return None if v is None else int(v)

    @property
    def dim(self) -> int | None:
        """View vector length of the stored LoRAs (None while empty)."""
        v = self._meta("dim")
        return None if v is None else int(v)

    # ---- files

    @property
    def _tmp_dir(self) -> Path:
        """Temp files of sketches and blobs (same file system; one place to clean after a crash)."""
        return self.root / "tmp"

    def _sketch_path(self, autov3: str) -> Path:
        return self.root / "sketches" / autov3[:2] / f"{autov3}.safetensors"

    def _blob_rel(self, sha256: str) -> str:
        return f"blobs/{sha256[:2]}/{sha256}.safetensors"

    def _copy_blob(self, ld: LoraDelta) -> str | None:
        """Copy the LoRA's weights file (and PEFT config) into ``blobs/``, verifying its sha256 on the way."""
        weights, sha = ld.source.get("weights"), ld.source.get("file_sha256")
        if not weights or not sha or not Path(weights).is_file():
            return None
        rel = self._blob_rel(sha)
        dest = self.root / rel
        if not dest.is_file():
            def write(tmp: Path) -> None:
                h = hashlib.sha256()
                with open(weights, "rb") as src, open(tmp, "wb") as out:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
                if h.hexdigest() != sha:
                    raise StoreError(f"{weights}: file changed while it was being indexed (sha256 differs)")

            atomic_write(dest, write, "blob_rename", self._tmp_dir)
        cfg = ld.source.get("config")
        cdest = dest.with_name(f"{sha}.adapter_config.json")
        if cfg and Path(cfg).is_file() and not cdest.is_file():
            atomic_write_bytes(cdest, Path(cfg).read_bytes(), "blob_rename", self._tmp_dir)
        return rel

    # ---- writing

    def add(self, ld: LoraDelta, emb: Embedding, source: Mapping[str, Any], labels: list[str] | None = None) -> tuple[int, bool]:
        """Index one LoRA (see ``add_many``).

        Returns:
            (row id, newly added).
        """
        return self.add_many([(ld, emb, source, labels)])[0]

    def add_many(self, items: Iterable[Sequence[Any]]) -> list[tuple[int, bool]]:
        """Index LoRAs in one transaction and one FAISS save per touched (family, view).

        Args:
            items: ``(ld, emb, source)`` or ``(ld, emb, source, labels)``; ``source`` holds
                ``source`` (what the user asked to index), ``repo``, ``revision``, ``path``
                and optionally ``name``.

        Returns:
            per item (row id, newly added). Content (AutoV3) already present adds
            no row: the extra source is recorded and (existing id, False) returned;
            a deleted row with that content comes back as (id, True).

        Raises:
            StoreError: read-only store, or k/dim/sketch version differ from the store's.
        """
        self._writable()
        prepared = [self._prepare(*it) for it in items]
        if not prepared:
            return []
        sketches = {self._sketch_path(p.autov3): p.emb for p in prepared}
        atomic_write_many([(path, sketch_bytes(emb)) for path, emb in sketches.items() if not path.is_file()],
                          "sketch_rename", self._tmp_dir)
        out: list[tuple[int, bool]] = []
        touched: set[tuple[str, str]] = set()
        changed = False
        with self.transaction() as c:
            self._check_params(c, prepared)
            for p in prepared:
                lid, new, views, any_change = self._insert(c, p)
                out.append((lid, new))
                touched.update((p.ld.family, v) for v in views)
                changed = changed or any_change
            if changed:
                gen = self._bump(c)
                for fam, view in touched:
                    c.execute("INSERT INTO index_state(family, view, generation) VALUES (?, ?, ?) "
                              "ON CONFLICT(family, view) DO UPDATE SET generation=excluded.generation", (fam, view, gen))
        if changed:
            _fault("after_commit")
        self._after_commit(touched)
        return out

    def _prepare(self, ld: LoraDelta, emb: Embedding, source: Mapping[str, Any], labels: list[str] | None = None) -> _Prepared:
        """File work before the transaction: the blob copy (content-addressed, so an orphan is harmless)."""
        if emb.family != ld.family:
            raise StoreError(f"embedding family {emb.family!r} differs from the LoRA's {ld.family!r}")
        autov3 = str(ld.source.get("autov3") or content_hash(ld)).upper()
        blob = self._copy_blob(ld) if self.keep_files else None
        labs = [str(x) for x in (labels or [])]
        return _Prepared(ld, emb, dict(source), labs, autov3, blob)

    def _check_params(self, c: sqlite3.Connection, prepared: list[_Prepared]) -> None:
        e0 = prepared[0].emb
        want = {"k": e0.k, "dim": e0.dim, "sketch_version": e0.sketch_version}
        for p in prepared:
            got = {"k": p.emb.k, "dim": p.emb.dim, "sketch_version": p.emb.sketch_version}
            if got != want:
                raise StoreError(f"embeddings in one batch differ: {got} vs {want}")
        for key, val in want.items():
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, str(val)))
            elif int(row[0]) != val:
                raise StoreError(f"{self.root}: store holds {key}={row[0]}, embedding has {key}={val}; re-embed with the store's settings")

    def _insert(self, c: sqlite3.Connection, p: _Prepared) -> tuple[int, bool, list[str], bool]:
        """Insert or merge one LoRA. Returns (id, newly added, views touched, anything changed)."""
        src = p.source
        now = _now()
        row = c.execute("SELECT id, deleted, blob FROM loras WHERE autov3=?", (p.autov3,)).fetchone()
        if row is not None:
            lid = int(row["id"])
            cur = c.execute("INSERT OR IGNORE INTO sources(lora_id, source, repo, revision, path, added_at) VALUES (?,?,?,?,?,?)",
                            (lid, str(src.get("source") or ""), src.get("repo"), src.get("revision"), str(src.get("path") or ""), now))
            changed = cur.rowcount > 0
            if row["blob"] is None and p.blob is not None:
                c.execute("UPDATE loras SET blob=? WHERE id=?", (p.blob, lid))
                changed = True
            if row["deleted"]:
                c.execute("UPDATE loras SET deleted=0 WHERE id=?", (lid,))
                views = [r[0] for r in c.execute("SELECT view FROM vectors WHERE lora_id=?", (lid,))]
                return lid, True, views, True
            return lid, False, [], changed
        ld, emb = p.ld, p.emb
        rr = ld.rank_range()
        norm = float(np.sqrt(sum(v * v for v in emb.norms.values())))
        info = info_dict(ld)
        cur = c.execute(
            "INSERT INTO loras(name, family, format, file_sha256, autov3, bytes, dtype, rank_min, rank_max, modules, norm,"
            " needs_base, labels, header_metadata, info, blob, k, dim, sketch_version, added_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (str(src.get("name") or _default_name(src)), ld.family, ld.format, ld.source.get("file_sha256"), p.autov3,
             ld.source.get("bytes"), ",".join(ld.metadata.get("dtypes", [])), rr["min"], rr["max"], len(ld.modules), norm,
             int(ld.needs_base), json.dumps(p.labels), json.dumps(ld.header_metadata, default=str),
             json.dumps(info, default=str), p.blob, emb.k, emb.dim, emb.sketch_version, now),
        )
        lid = int(cur.lastrowid)
        c.execute("INSERT INTO sources(lora_id, source, repo, revision, path, added_at) VALUES (?,?,?,?,?,?)",
                  (lid, str(src.get("source") or ""), src.get("repo"), src.get("revision"), str(src.get("path") or ""), now))
        for view, vec in emb.vectors.items():
            v = np.ascontiguousarray(vec, dtype="<f4")
            if v.shape != (emb.dim,):
                raise StoreError(f"view {view!r} vector has shape {v.shape}, expected ({emb.dim},)")
            c.execute("INSERT INTO vectors(lora_id, view, vec) VALUES (?,?,?)", (lid, view, v.tobytes()))
        return lid, True, list(emb.vectors), True

    def delete(self, lora_id: int) -> bool:
        """Hide a LoRA from search and listings (row, vectors and files are kept, so re-adding revives it).

        Returns:
            True when a live row was deleted.
        """
        self._writable()
        with self.transaction() as c:
            row = c.execute("SELECT family FROM loras WHERE id=? AND deleted=0", (int(lora_id),)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE loras SET deleted=1 WHERE id=?", (int(lora_id),))
            gen = self._bump(c)
            views = [r[0] for r in c.execute("SELECT view FROM vectors WHERE lora_id=?", (int(lora_id),))]
            for v in views:
                c.execute("INSERT INTO index_state(family, view, generation) VALUES (?, ?, ?) "
                          "ON CONFLICT(family, view) DO UPDATE SET generation=excluded.generation", (row["family"], v, gen))
        self._after_commit({(row["family"], v) for v in views})
        return True

    def relabel(self, lora_id: int, labels: list[str]) -> None:
        """Replace a LoRA's labels (FAISS is not touched).

        Raises:
            KeyError: no live LoRA with that id.
        """
        self._writable()
        with self.transaction() as c:
            cur = c.execute("UPDATE loras SET labels=? WHERE id=? AND deleted=0", (json.dumps([str(x) for x in labels]), int(lora_id)))
            if cur.rowcount == 0:
                raise KeyError(lora_id)
            self._bump(c)

    def _after_commit(self, touched: Iterable[tuple[str, str]]) -> None:
        """Bring the touched FAISS indexes to the committed state and save them; failures only log (SQLite is the truth)."""
        for fam, view in sorted(touched):
            try:
                self._sync(fam, view, save=True)
            except Exception as exc:  # noqa: BLE001 - the commit stands; the next load repairs the index
                _log(f"could not update FAISS index {fam}/{view}: {exc.__class__.__name__}: {exc}; it is rebuilt on next load")
                self._indexes.pop((fam, view), None)

    # ---- FAISS maintenance

    def _faiss_path(self, family: str, view: str) -> Path:
        return self.root / "faiss" / safe_name(family) / f"{safe_name(view)}.faiss"

    @contextlib.contextmanager
    def _faiss_lock(self) -> Iterator[None]:
        """Serialise FAISS saves of concurrent writers (each saves the SQLite state it reads under the lock)."""
        lock = self.root / "faiss" / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _state(self, family: str, view: str) -> tuple[int, np.ndarray, set[int]]:
        """(index generation, live ids sorted, deleted ids) of one (family, view), from one snapshot."""
        with self._read() as c:
            row = c.execute("SELECT generation FROM index_state WHERE family=? AND view=?", (family, view)).fetchone()
            ids = [r[0] for r in c.execute(
                "SELECT v.lora_id FROM loras l JOIN vectors v ON v.lora_id = l.id"
                " WHERE l.family=? AND l.deleted=0 AND v.view=? ORDER BY v.lora_id", (family, view))]
            dead = {r[0] for r in c.execute(
                "SELECT v.lora_id FROM loras l JOIN vectors v ON v.lora_id = l.id"
                " WHERE l.family=? AND l.deleted=1 AND v.view=?", (family, view))}
        return (int(row[0]) if row else 0), np.asarray(ids, dtype=np.int64), dead

    def vectors(self, view: str, ids: Sequence[int]) -> np.ndarray:
        """The stored (authoritative) vectors of ``view`` for ``ids``, in that order (zeros where missing)."""
        dim = self.dim or 0
        out = np.zeros((len(ids), dim), dtype=np.float32)
        pos = {int(i): j for j, i in enumerate(ids)}
        with self._read() as c:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                q = f"SELECT lora_id, vec FROM vectors WHERE view=? AND lora_id IN ({','.join('?' * len(chunk))})"
                for lid, blob in c.execute(q, (view, *chunk)):
                    out[pos[int(lid)]] = np.frombuffer(blob, dtype="<f4")
        return out

    def _build(self, family: str, view: str, kind: str, live: np.ndarray) -> VectorIndex:
        dim = int(self.dim or 0)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for s in range(0, len(live), 20_000):
                ids = live[s:s + 20_000]
                yield ids, self.vectors(view, ids)

        def sample(m: int) -> np.ndarray:
            rng = np.random.default_rng(len(live))
            pick = np.sort(rng.choice(live, size=min(m, len(live)), replace=False))
            return self.vectors(view, pick)

        return VectorIndex.build(kind, dim, len(live), chunks, sample, self.policy)

    def _load_file(self, family: str, view: str, state_gen: int) -> VectorIndex | None:
        """The saved index if it is self-consistent and not ahead of SQLite, else None (then it is rebuilt)."""
        path = self._faiss_path(family, view)
        if not path.is_file():
            return None
        try:
            vi, side = VectorIndex.load(path, self.policy)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
            _log(f"FAISS index {family}/{view} unreadable ({exc.__class__.__name__}: {exc}); rebuilding from SQLite")
            return None
        problems = []
        if int(side.get("count", -1)) != vi.ntotal:
            problems.append(f"sidecar count {side.get('count')} != index count {vi.ntotal}")
        if vi.generation > state_gen:
            problems.append(f"sidecar generation {vi.generation} is ahead of SQLite's {state_gen}")
        if (side.get("family"), side.get("view")) != (family, view):
            problems.append(f"sidecar names {side.get('family')}/{side.get('view')}")
        if self.dim is not None and vi.dim != self.dim:
            problems.append(f"dim {vi.dim} != store dim {self.dim}")
        if problems:
            _log(f"FAISS index {family}/{view} does not match SQLite ({'; '.join(problems)}); rebuilding from SQLite")
            return None
        return vi

    def _sync(self, family: str, view: str, save: bool, reload: bool = False) -> str:
        """Make the (family, view) index agree with SQLite; save it when ``save``.

        Returns:
            ``ok`` (nothing to do), ``updated`` (caught up by ids), ``rebuilt``, or ``empty``.
        """
        key = (family, view)
        lock = self._faiss_lock() if save else contextlib.nullcontext()
        with self._lock, lock:
            state_gen, live, dead = self._state(family, view)
            path = self._faiss_path(family, view)
            if len(live) == 0:
                self._indexes.pop(key, None)
                if save:
                    for p in (path, path.with_suffix(".json")):
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                return "empty"
            cur = None if reload else self._indexes.get(key)
            from_file = cur is None and path.is_file()
            if cur is None:
                cur = self._load_file(family, view, state_gen)
            status = "ok"
            if cur is not None:
                status = self._catch_up(cur, family, view, live, dead)
            if cur is None or status == "rebuild":
                kind = self.policy.choose(len(live), int(self.dim or 0), cur.kind if cur is not None else None)
                cur = self._build(family, view, kind, live)
                status = "rebuilt"
                cur.generation = state_gen
            elif cur.generation != state_gen:
                status = "updated" if status == "ok" else status
                cur.generation = state_gen
            if status != "ok" and from_file:
                _log(f"FAISS index {family}/{view} {status} to match SQLite generation {state_gen}")
            self._indexes[key] = cur
            if save and (status != "ok" or not path.is_file()):
                cur.save(path, family, view)
            return status

    def _catch_up(self, cur: VectorIndex, family: str, view: str, live: np.ndarray, dead: set[int]) -> str:
        """Add missing ids, remove deleted ones; ``rebuild`` when the index cannot be trusted or has the wrong type."""
        live_set = set(live.tolist())
        if cur.kind != self.policy.choose(len(live_set), cur.dim, cur.kind):
            return "rebuild"
        present = cur.ids()
        pset = set(present.tolist())
        foreign = pset - live_set - dead
        if foreign or len(pset) != len(present):
            if foreign:
                _log(f"FAISS index {family}/{view} holds {len(foreign)} ids unknown to SQLite; rebuilding")
            return "rebuild"
        cur.tombstones &= pset
        visible = pset - cur.tombstones
        revive = (live_set - visible) & cur.tombstones
        missing = np.asarray(sorted(live_set - pset), dtype=np.int64)
        extra = visible - live_set
        if revive:
            cur.revive(revive)
        if len(missing):
            cur.add(missing, self.vectors(view, missing))
        if extra:
            cur.remove(extra)
        if cur.needs_rebuild(len(live_set)):
            return "rebuild"
        # HNSW tombstones live in memory only: tombstoning alone leaves the saved file as it is
        content_changed = bool(len(missing)) or (bool(extra) and cur.kind != "hnsw")
        return "updated" if content_changed else "ok"

    def _index(self, family: str, view: str) -> VectorIndex | None:
        """The in-memory index for (family, view), reloaded when another process changed it."""
        g = self.generation()
        with self._lock:
            if g != self._gen_seen:
                self._gen_seen = g
                for key in list(self._indexes):
                    with self._read() as c:
                        row = c.execute("SELECT generation FROM index_state WHERE family=? AND view=?", key).fetchone()
                    if row is None or int(row[0]) != self._indexes[key].generation:
                        del self._indexes[key]
            if (family, view) not in self._indexes:
                self._sync(family, view, save=not self.readonly, reload=True)
            return self._indexes.get((family, view))

    def verify(self, repair: bool = True) -> dict[str, str]:
        """Load every index from disk and check it against SQLite (repairing and saving unless read-only).

        Returns:
            ``"family/view"`` -> ``ok`` | ``updated`` | ``rebuilt`` | ``empty``.
        """
        save = repair and not self.readonly
        with self._lock:
            keys = [(r[0], r[1]) for r in self._conn.execute("SELECT family, view FROM index_state ORDER BY family, view")]
            self._indexes.clear()
            self._gen_seen = self.generation()
            out = {f"{f}/{v}": self._sync(f, v, save=save, reload=True) for f, v in keys}
        return out

    def index_info(self, family: str, view: str) -> dict[str, Any] | None:
        """Type, size and generation of one loaded index (loads it)."""
        vi = self._index(family, view)
        if vi is None:
            return None
        return {"index_type": vi.kind, "count": vi.ntotal, "live": vi.live_count, "tombstones": len(vi.tombstones),
                "generation": vi.generation, "dim": vi.dim, "codec": vi.codec, "ids": sorted(set(vi.ids().tolist()) - vi.tombstones)}

    # ---- searching and reading

    def search(self, family: str, view: str, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Nearest stored LoRAs of one family and view by inner product of unit vectors.

        IVF candidates (k × refine factor) are re-scored exactly from the stored vectors.

        Returns:
            (id, score) best first, deleted LoRAs skipped.
        """
        vi = self._index(family, view)
        if vi is None or k <= 0:
            return []
        q = np.asarray(vec, dtype=np.float32).reshape(-1)
        nq = float(np.linalg.norm(q))
        if q.shape[0] != vi.dim or nq == 0:
            return []
        q = q / nq
        fetch = k * self.policy.refine_factor if vi.kind == "ivf" else k + 8
        with self._lock:
            ids, scores = vi.search(q, fetch)
        if vi.kind == "ivf" and vi.codec != "Flat" and len(ids):
            scores = self.vectors(view, ids.tolist()) @ q
            order = np.argsort(-scores, kind="stable")
            ids, scores = ids[order], scores[order]
        live = self._live(ids.tolist())
        return [(int(i), float(s)) for i, s in zip(ids, scores) if int(i) in live][:k]

    def _live(self, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        with self._lock:
            q = f"SELECT id FROM loras WHERE deleted=0 AND id IN ({','.join('?' * len(ids))})"
            return {int(r[0]) for r in self._conn.execute(q, list(ids))}

    def _row_dict(self, row: sqlite3.Row, full: bool) -> dict[str, Any]:
        d = {k: row[k] for k in row.keys()}
        d["labels"] = json.loads(d.get("labels") or "[]")
        d["needs_base"] = bool(d.get("needs_base"))
        d["deleted"] = bool(d.get("deleted"))
        if full:
            d["header_metadata"] = json.loads(d.get("header_metadata") or "{}")
            d["info"] = json.loads(d.get("info") or "{}")
        return d

    def _attach_sources(self, rows: dict[int, dict[str, Any]], all_sources: bool) -> None:
        if not rows:
            return
        ids = list(rows)
        q = (f"SELECT lora_id, source, repo, revision, path, added_at FROM sources"
             f" WHERE lora_id IN ({','.join('?' * len(ids))}) ORDER BY id")
        with self._lock:
            for r in self._conn.execute(q, ids):
                d = rows[int(r["lora_id"])]
                s = {"source": r["source"], "repo": r["repo"], "revision": r["revision"], "path": r["path"], "added_at": r["added_at"]}
                if "source" not in d:
                    d.update({"source": s["source"], "repo": s["repo"], "revision": s["revision"], "path": s["path"]})
                if all_sources:
                    d.setdefault("sources", []).append(s)

    def get(self, lora_id: int) -> dict[str, Any] | None:
        """Everything about one LoRA (deleted ones too, flagged), with its first source and all sources."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM loras WHERE id=?", (int(lora_id),)).fetchone()
        if row is None:
            return None
        d = {int(lora_id): self._row_dict(row, full=True)}
        self._attach_sources(d, all_sources=True)
        return d[int(lora_id)]

    def get_many(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Light rows (no header metadata / info) with their first source, by id."""
        if not ids:
            return {}
        cols = ", ".join(_LIGHT_COLUMNS)
        with self._lock:
            rows = self._conn.execute(f"SELECT {cols} FROM loras WHERE id IN ({','.join('?' * len(ids))})", [int(i) for i in ids]).fetchall()
        out = {int(r["id"]): self._row_dict(r, full=False) for r in rows}
        self._attach_sources(out, all_sources=False)
        return out

    def list(self, family: str | None = None, source: str | None = None, label: str | None = None,
             limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Live LoRAs, oldest first, optionally of one family, seen in one source (source string or path), or with a label."""
        where: list[str] = ["l.deleted=0"]
        params: list[Any] = []
        if family is not None:
            where.append("l.family=?")
            params.append(family)
        if source is not None:
            where.append("EXISTS (SELECT 1 FROM sources s WHERE s.lora_id=l.id AND (s.source=? OR s.path=?))")
            params += [source, source]
        if label is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(l.labels) WHERE json_each.value=?)")
            params.append(label)
        cols = ", ".join(f"l.{c}" for c in _LIGHT_COLUMNS)
        q = f"SELECT {cols} FROM loras l WHERE {' AND '.join(where)} ORDER BY l.id LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._conn.execute(q, [*params, int(limit), int(offset)]).fetchall()
        out = {int(r["id"]): self._row_dict(r, full=False) for r in rows}
        self._attach_sources(out, all_sources=False)
        return list(out.values())

    def sketch_file(self, lora_id: int) -> SketchFile | None:
        """The stored module sketches and norms of a LoRA (memory-mapped), or None."""
        with self._lock:
            row = self._conn.execute("SELECT autov3 FROM loras WHERE id=?", (int(lora_id),)).fetchone()
        if row is None:
            return None
        path = self._sketch_path(row[0])
        return read_sketch_file(path) if path.is_file() else None

    def sketches(self, lora_id: int) -> dict[str, np.ndarray]:
        """Module name -> k×k sketch (memory-mapped); empty when unknown."""
        sf = self.sketch_file(lora_id)
        return {} if sf is None else sf.as_dict()

    def blob_path(self, lora_id: int) -> Path | None:
        """The content-addressed copy of the indexed file, when kept and present."""
        with self._lock:
            row = self._conn.execute("SELECT blob FROM loras WHERE id=?", (int(lora_id),)).fetchone()
        if row is None or not row[0]:
            return None
        p = self.root / row[0]
        return p if p.is_file() else None

    def families(self) -> list[str]:
        """Families with at least one live LoRA."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT family FROM loras WHERE deleted=0 ORDER BY family")]

    def stats(self) -> dict[str, Any]:
        """Counts for ``lorasearch stats``.

        Returns:
            ``loras``, ``deleted``, ``families`` {family: n}, ``views`` {family: {view: n}},
            ``indexes`` (type, count and generation of each saved FAISS index), ``sources``,
            ``bytes`` (indexed file sizes), ``generation``, ``path``, ``k``, ``dim``.
        """
        with self._read() as c:
            loras = c.execute("SELECT COUNT(*) FROM loras WHERE deleted=0").fetchone()[0]
            deleted = c.execute("SELECT COUNT(*) FROM loras WHERE deleted=1").fetchone()[0]
            fams = {r[0]: r[1] for r in c.execute("SELECT family, COUNT(*) FROM loras WHERE deleted=0 GROUP BY family ORDER BY family")}
            views: dict[str, dict[str, int]] = {}
            for f, v, n in c.execute("SELECT l.family, v.view, COUNT(*) FROM loras l JOIN vectors v ON v.lora_id=l.id"
                                     " WHERE l.deleted=0 GROUP BY l.family, v.view ORDER BY l.family, v.view"):
                views.setdefault(f, {})[v] = n
            sources = c.execute("SELECT COUNT(*) FROM sources s JOIN loras l ON l.id=s.lora_id WHERE l.deleted=0").fetchone()[0]
            nbytes = c.execute("SELECT COALESCE(SUM(bytes), 0) FROM loras WHERE deleted=0").fetchone()[0]
            gen = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
        indexes = []
        for f, vs in views.items():
            for v in vs:
                side = self._faiss_path(f, v).with_suffix(".json")
                with contextlib.suppress(OSError, ValueError):
                    s = json.loads(side.read_text())
                    indexes.append({"family": f, "view": v, "index_type": s["index_type"], "count": s["count"],
                                    "live": s.get("live"), "generation": s["generation"]})
        return {"loras": loras, "deleted": deleted, "families": fams, "views": views, "indexes": indexes,
                "sources": sources, "bytes": int(nbytes), "generation": gen, "path": str(self.root),
                "k": self.k, "dim": self.dim}

    def close(self) -> None:
        """Close the database; the store object is unusable afterwards."""
        with self._lock:
            self._indexes.clear()
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
