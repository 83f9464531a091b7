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
import dataclasses
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
from dataclasses import dataclass, field
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
DEFAULT_MAX_QUERY_MS = 10.0
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# efSearch: on 20k clustered 1024-d unit vectors (M=32, efConstruction=80, one core) recall@10
# against exact search was 0.90 at efSearch=128 and 0.98 at 256 (p50 0.6 ms / 1.1 ms); a planted
# near-duplicate (cosine 0.45 to the query) was found first in 99.5 % / 100 % of queries.
HNSW_EF_SEARCH = 256
# IVF candidates re-scored exactly per result, by code type (bench/query_latency.py, 1M clustered vectors,
# IVF4096, 2026-11-23): PQ128x8 codes order candidates coarsely (nprobe 128: recall@10 0.939 with ×10,
# 0.951 with ×20); SQ8 codes almost exactly (0.9558 with ×5, ×10 and ×20 alike at nprobe 128; the same at
# 32, 64 and 256), so ×5 reads a quarter of the vectors from SQLite for the same answers.
IVF_REFINE_FACTOR = 20
SQ_REFINE_FACTOR = 5
TOMBSTONE_REBUILD_FRACTION = 0.10  # HNSW cannot remove: deleted ids are filtered until they pass 10 %
IVF_RETRAIN_GROWTH = 4.0  # an IVF trained on n vectors is retrained once it holds 4n
# IVF sizing from the memory budget (the setting measured at 1M × 1024 in the 2026-11-23 query_latency
# run: nlist 4096 trained on 131 072 vectors, peak RSS 1.12 GiB): the k-means training sample is capped
# at budget / (16·dim) vectors (131 072 at 2 GiB: 512 MiB of float32 plus k-means' copies and
# assignment buffers), and nlist at sample / 32 so every list gets ≥ 32 training points (faiss warns
# under 39). autofaiss trains on the whole set up to 1M, which at 1M × 1024 is 4 GiB of training data
# and hours of k-means on 2 cores.
IVF_TRAIN_BYTES_FACTOR = 16
IVF_POINTS_PER_LIST = 32
# faiss' default is 25 k-means iterations; 10 cost 2.5× less training time (the 1M build is on 2 cores) and the
# recall at 1M recorded in bench/BENCHMARKS.md (scale, query_latency) was measured with 10 (25 not compared).
IVF_KMEANS_ITERATIONS = 10
CODE_MEMORY_SHARE = 0.6  # of the budget the IVF codes may take (the rest: quantizer, ids, the process itself)
# Per-query cost model, one core of this machine (AMD EPYC, AVX-512; bench/query_latency.py and the IVF
# experiment of 2026-11-23): ns per scanned vector per dimension (flat, SQ8) or per PQ sub-quantizer;
# exact re-score of one candidate from SQLite; the HNSW coarse quantizer's fixed cost.
FLAT_NS_PER_DIM = 0.27
SQ8_NS_PER_DIM = 0.13
PQ_NS_PER_SUBQUANTIZER = 0.65
REFINE_MS_PER_ROW = 0.008
QUANTIZER_MS = 0.3
# Of max_query_ms the estimate may use (the rest is head-room for a busy machine): at 1M × 1024 SQ8 this
# gives nprobe 132 of 4096, next to the measured nprobe 128 (recall@10 0.956); the constants above match a
# quiet moment (200k head-to-head: SQ8 0.128 ns/dim, PQ128 0.56 ns/sub-quantizer), and a load of ~8 on the
# 2 cores made the same scans ~3× slower (bench/BENCHMARKS.md, scale and query_latency).
LATENCY_SHARE = 0.5

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


def tmp_dir_of(root: Path) -> Path:
    """A store's folder for temp files of sketches and blobs (same file system as what they
    become; one place to clean after a crash)."""
    return root / "tmp"


def blob_rel(sha256: str) -> str:
    """Where a store keeps the copy of a weights file with this sha256 (relative to its root)."""
    return f"blobs/{sha256[:2]}/{sha256}.safetensors"


def copy_blob(root: Path, weights: str | None, sha: str | None, cfg: str | None) -> str | None:
    """Copy a LoRA's weights file (and PEFT config) into the store at ``root``, content-addressed
    by its sha256 and verified on the way; a copy already there is kept.

    Indexing workers call this before their results reach the store's writer (which then finds
    the copy in place): the copies are then made in parallel instead of one by one in the writer.
    A copy whose row never commits is a harmless orphan, like the writer's own copies that are
    made before its transaction.

    Returns:
        the copy's path relative to ``root``, or None when there is no weights file or sha256.

    Raises:
        StoreError: the file's content no longer has this sha256 (it changed while indexed).
    """
    if not weights or not sha or not Path(weights).is_file():
        return None
    rel = blob_rel(sha)
    dest = root / rel
    tmp_dir = tmp_dir_of(root)
    if not dest.is_file():
        def write(tmp: Path) -> None:
            h = hashlib.sha256()
            with open(weights, "rb") as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
            if h.hexdigest() != sha:
                raise StoreError(f"{weights}: file changed while it was being indexed (sha256 differs)")

        atomic_write(dest, write, "blob_rename", tmp_dir)
    cdest = dest.with_name(f"{sha}.adapter_config.json")
    if cfg and Path(cfg).is_file() and not cdest.is_file():
        atomic_write_bytes(cdest, Path(cfg).read_bytes(), "blob_rename", tmp_dir)
    return rel


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


def sketch_arrays(emb: Embedding) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sorted module names, M×k×k float32 sketches, M float32 norms) as the sketch file stores them."""
    names = sorted(emb.sketches)
    k = emb.k
    z = np.stack([np.asarray(emb.sketches[n], dtype=np.float32) for n in names]) if names else np.zeros((0, k, k), np.float32)
    norms = np.asarray([emb.norms.get(n, 0.0) for n in names], dtype=np.float32)
    return names, np.ascontiguousarray(z), norms


def sketch_bytes_of(names: list[str], z: np.ndarray, norms: np.ndarray, family: str, k: int, sketch_version: int) -> bytes:
    """A safetensors file holding ``norms`` (M) and ``sketches`` (M×k×k) and the module names in its metadata.

    Written here rather than by ``safetensors.numpy.save``, whose metadata order changes from
    process to process: the same sketches give the same bytes in every worker and engine.
    """
    meta = {"format": str(SKETCH_FILE_FORMAT), "names": json.dumps(list(names)), "family": family,
            "k": str(k), "sketch_version": str(sketch_version)}
    nb = np.ascontiguousarray(norms, dtype="<f4").tobytes()
    zb = np.ascontiguousarray(z, dtype="<f4").tobytes()
    header = {"__metadata__": meta,
              "norms": {"dtype": "F32", "shape": [int(np.shape(norms)[0])], "data_offsets": [0, len(nb)]},
              "sketches": {"dtype": "F32", "shape": [int(d) for d in np.shape(z)], "data_offsets": [len(nb), len(nb) + len(zb)]}}
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + nb + zb


def sketch_bytes(emb: Embedding) -> bytes:
    """The sketch file of an embedding (see ``sketch_bytes_of``)."""
    return sketch_bytes_of(*sketch_arrays(emb), emb.family, emb.k, emb.sketch_version)


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


def _pq_shape(train: int, dim: int) -> tuple[int, int]:
    """PQ sub-quantizers (~8 dims each, a divisor of dim) and bits (8, or 4 when too few training vectors for 256 centroids)."""
    m = max(d for d in range(1, max(dim // 8, 1) + 1) if dim % d == 0)
    return m, (8 if train >= 256 * 39 else 4)


@dataclass(frozen=True)
class IndexPolicy:
    """Index type and parameters from the size and a memory and latency budget (see the comment on ``FLAT_MAX``).

    Args:
        memory_bytes: what one (family, view) index may hold in RAM (codes, graph, training).
        max_query_ms: the latency one search may take (``nprobe`` and the flat/IVF border follow it).
        train_max: cap on IVF training vectors (0: from ``memory_bytes``).
        nprobe_value: fixed IVF nprobe (0: from ``max_query_ms``).
        codec_value: fixed IVF code type, ``Flat``, ``SQ8`` or ``PQ{m}x{bits}`` (empty: from ``memory_bytes``).
        kmeans_iterations: k-means iterations of IVF training.
        refine_factor: IVF candidates per result re-scored exactly (0: by code type, see ``refine_for``).
    """

    flat_max: int = FLAT_MAX
    hnsw_max: int = HNSW_MAX
    memory_bytes: int = MEMORY_BUDGET_BYTES
    hnsw_m: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH
    refine_factor: int = 0
    tombstone_fraction: float = TOMBSTONE_REBUILD_FRACTION
    max_query_ms: float = DEFAULT_MAX_QUERY_MS
    train_max: int = 0
    nprobe_value: int = 0
    codec_value: str = ""
    kmeans_iterations: int = IVF_KMEANS_ITERATIONS

    @classmethod
    def from_budget(cls, max_memory_bytes: int | None = None, max_query_ms: float | None = None, **kw: Any) -> IndexPolicy:
        """The policy for a memory budget (bytes) and a latency budget (ms); None keeps the defaults."""
        if max_memory_bytes is not None:
            kw["memory_bytes"] = int(max_memory_bytes)
        if max_query_ms is not None:
            kw["max_query_ms"] = float(max_query_ms)
        return cls(**kw)

    # ---- type

    def flat_ms(self, n: int, dim: int) -> float:
        """Estimated exhaustive-scan time of n vectors (one core)."""
        return n * dim * FLAT_NS_PER_DIM * 1e-6

    def _want(self, n: int, dim: int) -> str:
        if n < self.flat_max and self.flat_ms(n, dim) <= LATENCY_SHARE * self.max_query_ms:
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

    # ---- IVF parameters

    def train_size(self, n: int, dim: int) -> int:
        """IVF training sample: at most ``memory_bytes / (16·dim)`` vectors (or ``train_max``)."""
        cap = self.train_max or max(self.memory_bytes // (IVF_TRAIN_BYTES_FACTOR * max(dim, 1)), 1)
        return int(max(1, min(n, cap)))

    def nlist(self, n: int, dim: int) -> int:
        """autofaiss's IVF list count 2^round(log2(4·√n)), capped so every list gets 32 training points."""
        x = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
        return int(max(1, min(x, self.train_size(n, dim) // IVF_POINTS_PER_LIST)))

    def ivf_codec(self, n: int, dim: int) -> str:
        """Codes that fit ``CODE_MEMORY_SHARE`` of the budget: ``Flat``, else ``SQ8`` (1 byte/dim), else PQ."""
        if self.codec_value:
            return self.codec_value
        room = CODE_MEMORY_SHARE * self.memory_bytes
        if n * (4 * dim + 8) <= room:
            return "Flat"
        if n * (dim + 8) <= room:
            return "SQ8"
        m, nbits = _pq_shape(self.train_size(n, dim), dim)
        return f"PQ{m}x{nbits}"

    @staticmethod
    def scan_ns(codec: str, dim: int) -> float:
        """Estimated ns to score one IVF code of this type (one core)."""
        if codec.startswith("PQ"):
            return PQ_NS_PER_SUBQUANTIZER * int(re.match(r"PQ(\d+)", codec).group(1))  # type: ignore[union-attr]
        return (SQ8_NS_PER_DIM if codec.startswith("SQ") else FLAT_NS_PER_DIM) * dim

    def refine_for(self, codec: str) -> int:
        """Candidates per result an IVF search fetches: ``refine_factor`` if set, else ×20 for PQ, ×5 for SQ,
        ×1 for exact ``Flat`` codes (whose scores need no re-score)."""
        if self.refine_factor:
            return int(self.refine_factor)
        return 1 if codec in ("", "Flat") else SQ_REFINE_FACTOR if codec.startswith("SQ") else IVF_REFINE_FACTOR

    def refine_ms(self, k: int, codec: str) -> float:
        """Estimated exact re-score of k × refine factor candidates (compressed codes only)."""
        return 0.0 if codec == "Flat" else k * self.refine_for(codec) * REFINE_MS_PER_ROW

    def nprobe(self, nlist: int, n: int = 0, dim: int = 0, codec: str = "Flat", k: int = 10) -> int:
        """Lists to scan: as many as ``LATENCY_SHARE · max_query_ms`` allows by the cost model (≥ 8)."""
        if self.nprobe_value:
            return int(min(nlist, self.nprobe_value))
        if n <= 0 or dim <= 0:
            return int(min(nlist, max(8, nlist // 32)))
        per_list_ms = (n / max(nlist, 1)) * self.scan_ns(codec, dim) * 1e-6
        room = LATENCY_SHARE * self.max_query_ms - self.refine_ms(k, codec) - (QUANTIZER_MS if nlist >= 1000 else 0.0)
        p = int(room / per_list_ms) if per_list_ms > 0 else nlist
        return int(min(nlist, max(min(8, nlist), p)))

    def ivf_plan(self, n: int, dim: int) -> dict[str, Any]:
        """What an IVF over n vectors would be: nlist, codec, training size, nprobe, memory and query estimates."""
        nlist, codec = self.nlist(n, dim), self.ivf_codec(n, dim)
        nprobe = self.nprobe(nlist, n, dim, codec)
        code_bytes = 4 * dim if codec == "Flat" else dim if codec == "SQ8" else _pq_bytes(codec)
        return {"nlist": nlist, "codec": codec, "train": self.train_size(n, dim), "nprobe": nprobe,
                "code_bytes": n * (code_bytes + 8), "quantizer_bytes": nlist * dim * 4 + (nlist * 2 * HNSW_M * 4 if nlist >= 1000 else 0),
                "est_query_ms": nprobe * (n / max(nlist, 1)) * self.scan_ns(codec, dim) * 1e-6 + self.refine_ms(10, codec)}


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5g"``, ``"1000000"`` -> bytes.

    Raises:
        BadInput: not a size.
    """
    from lorasearch.errors import BadInput

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise BadInput(f"not a memory size: {text!r} (e.g. 2GiB, 512MiB)", code="bad_parameter")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])




def _pq_bytes(codec: str) -> int:
    m = re.fullmatch(r"PQ(\d+)x(\d+)", codec)
    return int(m.group(1)) * int(m.group(2)) // 8 if m else 0


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
        self.mmapped = False  # inverted lists mapped from the file (IVF loaded read-only); see ``materialise``
        self.path: Path | None = None

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
            nlist = policy.nlist(n, dim)
            codec = policy.ivf_codec(n, dim)
            coarse = f"IVF{nlist}_HNSW32" if nlist >= 1000 else f"IVF{nlist}"
            index = faiss.index_factory(dim, f"{coarse},{codec}", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.niter = policy.kmeans_iterations
            train = sample(policy.train_size(n, dim))
            index.train(np.ascontiguousarray(train, dtype=np.float32))
            del train
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

    def materialise(self) -> None:
        """Replace a memory-mapped (read-only) index by an in-memory copy before it is changed."""
        if self.mmapped and self.path is not None:
            self.index = faiss.read_index(str(self.path))
            self.mmapped = False

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.materialise()
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
            self.materialise()
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
            ivf.nprobe = self.policy.nprobe(ivf.nlist, self.ntotal, self.dim, self.codec or "Flat")
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
    def load(cls, path: Path, policy: IndexPolicy, mmap: bool = True) -> tuple[VectorIndex, dict[str, Any]]:
        """Read an index and its sidecar (raises on anything unreadable).

        An IVF index is memory-mapped (``IO_FLAG_MMAP``: its codes stay in the page cache, outside
        the process's private memory, and only the lists searched are read); the first change
        reads it fully (``materialise``).
        """
        side = json.loads(path.with_suffix(".json").read_text())
        mapped = bool(mmap and side.get("index_type") == "ivf")
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mapped else faiss.read_index(str(path))
        vi = cls(side["index_type"], index, int(side["dim"]), side.get("codec", ""), int(side.get("trained_n", 0)), policy)
        if vi.kind not in KINDS or index.d != vi.dim:
            raise ValueError(f"sidecar says {vi.kind}/{vi.dim}, file holds d={index.d}")
        vi.generation = int(side["generation"])
        vi.dirty = False
        vi.mmapped, vi.path = mapped, path
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
    norm REAL,  -- ‖ΔW‖_F over all modules as the sketches measure it (from sketch_version 2, exact before)
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
class EntryRecord:
    """One LoRA as the store writes it, without its factors: what an embedding shard carries.

    ``record_from(ld, emb, source, labels)`` makes one from a read LoRA; ``Store.add_records``
    writes them (``Store.add_many`` goes through it too, so both paths write the same rows).
    ``header_json`` / ``info_json`` are the exact strings stored; ``sketch_*`` the sketch file's
    arrays (empty: no sketch file); ``weights`` / ``config`` the files a blob copy is made from.
    """

    autov3: str
    family: str
    format: str
    k: int
    dim: int
    sketch_version: int
    vectors: dict[str, np.ndarray]
    sketch_names: list[str] = field(default_factory=list)
    sketches: np.ndarray | None = None
    sketch_norms: np.ndarray | None = None
    norm: float | None = None
    file_sha256: str | None = None
    bytes: int | None = None
    dtype: str = ""
    rank_min: int | None = None
    rank_max: int | None = None
    modules: int = 0
    needs_base: bool = False
    header_json: str = "{}"
    info_json: str = "{}"
    weights: str | None = None
    config: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    def sketch_file_bytes(self) -> bytes | None:
        if self.sketches is None or self.sketch_norms is None:
            return None
        return sketch_bytes_of(self.sketch_names, self.sketches, self.sketch_norms, self.family, self.k, self.sketch_version)


def record_from(ld: LoraDelta, emb: Embedding, source: Mapping[str, Any], labels: Sequence[str] | None = None) -> EntryRecord:
    """The store's row, vectors and sketch arrays of one read and embedded LoRA.

    Raises:
        StoreError: the embedding's family differs from the LoRA's.
    """
    if emb.family != ld.family:
        raise StoreError(f"embedding family {emb.family!r} differs from the LoRA's {ld.family!r}")
    rr = ld.rank_range()
    names, z, norms = sketch_arrays(emb)
    return EntryRecord(
        autov3=str(ld.source.get("autov3") or content_hash(ld)).upper(), family=ld.family, format=ld.format,
        k=emb.k, dim=emb.dim, sketch_version=emb.sketch_version,
        vectors={v: np.ascontiguousarray(x, dtype="<f4") for v, x in emb.vectors.items()},
        sketch_names=names, sketches=z, sketch_norms=norms,
        norm=float(np.sqrt(sum(v * v for v in emb.norms.values()))),
        file_sha256=ld.source.get("file_sha256"), bytes=ld.source.get("bytes"),
        dtype=",".join(ld.metadata.get("dtypes", [])), rank_min=rr["min"], rank_max=rr["max"], modules=len(ld.modules),
        needs_base=bool(ld.needs_base), header_json=json.dumps(ld.header_metadata, default=str),
        info_json=json.dumps(info_dict(ld), default=str), weights=ld.source.get("weights"), config=ld.source.get("config"),
        source=dict(source), labels=[str(x) for x in (labels or [])],
    )


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
        self._policy_given = policy is not None
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
        if not self._policy_given:
            self.policy = self._stored_policy()

    def _stored_policy(self) -> IndexPolicy:
        """The policy ``set_policy`` recorded in the store (so indexer and server size indexes alike), else defaults."""
        raw = self._meta("index_policy")
        if raw is None:
            return IndexPolicy()
        try:
            names = {f.name for f in dataclasses.fields(IndexPolicy)}
            return IndexPolicy(**{k: v for k, v in json.loads(raw).items() if k in names})
        except (ValueError, TypeError) as exc:
            _log(f"ignoring unreadable index policy {raw!r} ({exc})")
            return IndexPolicy()

    def set_policy(self, policy: IndexPolicy) -> None:
        """Record ``policy`` (budget and thresholds) in the store and use it from now on.

        Every process that opens the store without a policy of its own (the server, the
        indexers) then sizes and searches indexes alike; an index whose type no longer fits is
        rebuilt at the next write or load.
        """
        self._writable()
        budget = {f.name: getattr(policy, f.name) for f in dataclasses.fields(IndexPolicy)}
        with self.transaction() as c:
            c.execute("INSERT INTO meta(key, value) VALUES ('index_policy', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (json.dumps(budget),))
        self.policy = policy
        self._indexes.clear()

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
        return tmp_dir_of(self.root)

    def _sketch_path(self, autov3: str) -> Path:
        return self.root / "sketches" / autov3[:2] / f"{autov3}.safetensors"

    def _copy_blob(self, weights: str | None, sha: str | None, cfg: str | None) -> str | None:
        """Copy a LoRA's weights file (and PEFT config) into ``blobs/``, verifying its sha256 on the way."""
        return copy_blob(self.root, weights, sha, cfg)

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
        return self.add_records([record_from(*it) for it in items])

    def add_records(self, records: Iterable[EntryRecord], chunk: int = 512) -> list[tuple[int, bool]]:
        """Write LoRA records in ONE transaction and one FAISS save per touched (family, view).

        ``records`` may be a lazy iterator (e.g. read shard by shard): it is consumed
        ``chunk`` records at a time, each chunk's sketch files and blob copies written
        (content-addressed: harmless orphans if the transaction does not commit) and its
        rows inserted, so a merge of millions never holds them all. The FAISS indexes are
        then brought up to date from SQLite (streamed, see ``_build``).

        Returns:
            per record (row id, newly added), as ``add_many``.
        """
        self._writable()
        out: list[tuple[int, bool]] = []
        touched: set[tuple[str, str]] = set()
        changed = False
        it = iter(records)

        def next_part() -> tuple[list[EntryRecord], list[str | None]]:
            part = [r for _, r in zip(range(chunk), it)]
            atomic_write_many([(p, b) for p, b in self._record_files(part) if b is not None], "sketch_rename", self._tmp_dir)
            return part, [self._copy_blob(r.weights, r.file_sha256, r.config) if self.keep_files else None for r in part]

        # the first chunk's files are written before the write lock is taken (add_many's batches: all of it)
        part, blobs = next_part()
        if not part:
            return []
        with self.transaction() as c:
            while part:
                self._check_params(c, part)
                for r, blob in zip(part, blobs):
                    lid, new, views, any_change = self._insert(c, r, blob)
                    out.append((lid, new))
                    touched.update((r.family, v) for v in views)
                    changed = changed or any_change
                part, blobs = next_part()
            if changed:
                gen = self._bump(c)
                for fam, view in touched:
                    c.execute("INSERT INTO index_state(family, view, generation) VALUES (?, ?, ?) "
                              "ON CONFLICT(family, view) DO UPDATE SET generation=excluded.generation", (fam, view, gen))
        if changed:
            _fault("after_commit")
        self._after_commit(touched)
        return out

    def _record_files(self, part: list[EntryRecord]) -> list[tuple[Path, bytes | None]]:
        """Sketch files not yet on disk (one per content)."""
        seen: dict[Path, EntryRecord] = {}
        for r in part:
            path = self._sketch_path(r.autov3)
            if r.sketches is not None and path not in seen and not path.is_file():
                seen[path] = r
        return [(p, r.sketch_file_bytes()) for p, r in seen.items()]

    def _check_params(self, c: sqlite3.Connection, part: list[EntryRecord]) -> None:
        r0 = part[0]
        want = {"k": r0.k, "dim": r0.dim, "sketch_version": r0.sketch_version}
        for r in part:
            got = {"k": r.k, "dim": r.dim, "sketch_version": r.sketch_version}
            if got != want:
                raise StoreError(f"embeddings in one batch differ: {got} vs {want}")
        for key, val in want.items():
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, str(val)))
            elif int(row[0]) != val and key == "sketch_version":
                raise StoreError(f"{self.root}: store was built with sketch_version {row[0]}, this lorasearch embeds "
                                 f"with {val} (its style views differ); index the store's sources into a new --db")
            elif int(row[0]) != val:
                raise StoreError(f"{self.root}: store holds {key}={row[0]}, embedding has {key}={val}; re-embed with the store's settings")

    def _insert(self, c: sqlite3.Connection, r: EntryRecord, blob: str | None) -> tuple[int, bool, list[str], bool]:
        """Insert or merge one LoRA. Returns (id, newly added, views touched, anything changed)."""
        src = r.source
        now = _now()
        row = c.execute("SELECT id, deleted, blob FROM loras WHERE autov3=?", (r.autov3,)).fetchone()
        if row is not None:
            lid = int(row["id"])
            cur = c.execute("INSERT OR IGNORE INTO sources(lora_id, source, repo, revision, path, added_at) VALUES (?,?,?,?,?,?)",
                            (lid, str(src.get("source") or ""), src.get("repo"), src.get("revision"), str(src.get("path") or ""), now))
            changed = cur.rowcount > 0
            if row["blob"] is None and blob is not None:
                c.execute("UPDATE loras SET blob=? WHERE id=?", (blob, lid))
                changed = True
            if row["deleted"]:
                c.execute("UPDATE loras SET deleted=0 WHERE id=?", (lid,))
                views = [v[0] for v in c.execute("SELECT view FROM vectors WHERE lora_id=?", (lid,))]
                return lid, True, views, True
            return lid, False, [], changed
        cur = c.execute(
            "INSERT INTO loras(name, family, format, file_sha256, autov3, bytes, dtype, rank_min, rank_max, modules, norm,"
            " needs_base, labels, header_metadata, info, blob, k, dim, sketch_version, added_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (str(src.get("name") or _default_name(src)), r.family, r.format, r.file_sha256, r.autov3,
             r.bytes, r.dtype, r.rank_min, r.rank_max, r.modules, r.norm,
             int(r.needs_base), json.dumps(r.labels), r.header_json, r.info_json, blob, r.k, r.dim, r.sketch_version, now),
        )
        lid = int(cur.lastrowid)
        c.execute("INSERT INTO sources(lora_id, source, repo, revision, path, added_at) VALUES (?,?,?,?,?,?)",
                  (lid, str(src.get("source") or ""), src.get("repo"), src.get("revision"), str(src.get("path") or ""), now))
        for view, vec in r.vectors.items():
            v = np.ascontiguousarray(vec, dtype="<f4")
            if v.shape != (r.dim,):
                raise StoreError(f"view {view!r} vector has shape {v.shape}, expected ({r.dim},)")
            c.execute("INSERT INTO vectors(lora_id, view, vec) VALUES (?,?,?)", (lid, view, v.tobytes()))
        return lid, True, list(r.vectors), True

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
        fetch = max(k * self.policy.refine_for(vi.codec), k + 8) if vi.kind == "ivf" else k + 8
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
