"""Embedding shards: what distributed workers write and the single merge step folds into the store.

A shard is two files in ``DIR/shards/<job>/``, each written atomically (temp
file, fsync, rename):

- ``<id>.npz``: ``vectors`` (every record's view vectors, float32 rows),
  ``sketches`` (every record's M × k × k module sketches, concatenated) and
  ``norms`` (their M norms); each JSON row says where its rows start;
- ``<id>.json``: the rows (everything ``EntryRecord`` holds besides arrays,
  with ``header_json`` / ``info_json`` as the exact strings the store writes),
  the items the shard covers and the per-file failures.

The JSON is written last and is the shard's commit mark: a shard without it
does not exist (a worker killed mid-write leaves at most a temp file or an
orphan ``.npz``, redone on resume). Records are folded into the store by
``Store.add_records`` in one transaction, so a crash before that commit
leaves the store as it was and the shards on disk for the next run.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lorasearch.store import EntryRecord, atomic_write_bytes

SHARD_FORMAT = 1
SHARDS_DIR = "shards"
_ROW_FIELDS = ("autov3", "family", "format", "k", "dim", "sketch_version", "sketch_names", "norm", "file_sha256", "bytes",
               "dtype", "rank_min", "rank_max", "modules", "needs_base", "header_json", "info_json", "weights", "config",
               "source", "labels")


@dataclass
class Shard:
    """One shard in memory: records (each with the key of the item it came from), failures, covered item keys."""

    records: list[EntryRecord] = field(default_factory=list)
    record_items: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


def shard_id(item_keys: Sequence[str]) -> str:
    """A shard's name from the items it covers (the same batch always gets the same name)."""
    return hashlib.sha1(json.dumps(list(item_keys)).encode()).hexdigest()[:20]


def shard_dir(db: str | Path, job_id: int) -> Path:
    """``DB/shards/<job>``: where one job's shards wait for the merge."""
    return Path(db) / SHARDS_DIR / str(job_id)


def encode(shard: Shard) -> tuple[bytes, bytes]:
    """(npz bytes, json bytes) of a shard: all vectors in one array, all sketches in another (rows point into them)."""
    vecs: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    ns: list[np.ndarray] = []
    rows = []
    nv = nz = 0
    dim = shard.records[0].dim if shard.records else 0
    k = shard.records[0].k if shard.records else 0
    for key, r in zip(shard.record_items, shard.records):
        views = list(r.vectors)
        vecs += [np.asarray(r.vectors[v], dtype="<f4").reshape(1, -1) for v in views]
        row: dict[str, Any] = {f: getattr(r, f) for f in _ROW_FIELDS}
        row.update({"views": views, "item": key, "vec_start": nv, "sketch_start": None})
        nv += len(views)
        if r.sketches is not None and r.sketch_norms is not None:
            row["sketch_start"], row["sketch_count"] = nz, len(r.sketch_norms)
            zs.append(np.asarray(r.sketches, dtype="<f4").reshape(-1, r.k, r.k))
            ns.append(np.asarray(r.sketch_norms, dtype="<f4").reshape(-1))
            nz += len(r.sketch_norms)
        rows.append(row)
    arrays = {
        "vectors": np.concatenate(vecs) if vecs else np.zeros((0, dim), "<f4"),
        "sketches": np.concatenate(zs) if zs else np.zeros((0, k, k), "<f4"),
        "norms": np.concatenate(ns) if ns else np.zeros(0, "<f4"),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    meta = {"format": SHARD_FORMAT, "rows": rows, "failures": shard.failures, "items": shard.items}
    return buf.getvalue(), json.dumps(meta, sort_keys=True).encode()


def write_encoded(folder: Path, sid: str, npz: bytes, meta: bytes) -> Path:
    """Write a shard's two files atomically, the JSON (the commit mark) last. Returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{sid}.npz", npz, "shard_rename")
    path = folder / f"{sid}.json"
    atomic_write_bytes(path, meta, "shard_rename")
    return path


def write_shard(folder: Path, sid: str, shard: Shard) -> Path:
    """``encode`` + ``write_encoded``."""
    return write_encoded(folder, sid, *encode(shard))


def read_meta(path: Path) -> dict[str, Any]:
    """A shard's JSON (rows, failures, items)."""
    meta = json.loads(path.read_text())
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: shard format {meta.get('format')}, this lorasearch reads {SHARD_FORMAT}")
    return meta


def read_shard(path: Path) -> Shard:
    """Load a shard from its JSON path (its ``.npz`` beside it)."""
    meta = read_meta(path)
    out = Shard(failures=list(meta["failures"]), items=list(meta["items"]))
    with np.load(path.with_suffix(".npz")) as z:
        vecs, sk, norms = z["vectors"], z["sketches"], z["norms"]
    for row in meta["rows"]:
        row = dict(row)
        views, v0 = row.pop("views"), row.pop("vec_start")
        z0, zn = row.pop("sketch_start"), row.pop("sketch_count", 0)
        out.record_items.append(row.pop("item"))
        rec = EntryRecord(**row, vectors={v: vecs[v0 + j] for j, v in enumerate(views)})
        if z0 is not None:
            rec.sketches, rec.sketch_norms = sk[z0:z0 + zn], norms[z0:z0 + zn]
        out.records.append(rec)
    return out


def list_shards(folder: Path) -> list[Path]:
    """JSON paths of the complete shards in a folder."""
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def ordered(paths: Sequence[Path], order: dict[str, int]) -> list[Path]:
    """Shards by the position (in ``order``) of their first item."""
    def first(p: Path) -> int:
        return min((order.get(k, len(order)) for k in read_meta(p)["items"]), default=len(order))

    return sorted(paths, key=first)


def iter_rows(paths: Sequence[Path], order: dict[str, int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(item key, JSON row) of every shard in ``iter_records``'s order, without reading the arrays."""
    for p in ordered(paths, order):
        rows = read_meta(p)["rows"]
        yield from sorted(((r["item"], r) for r in rows), key=lambda kr: order.get(kr[0], len(order)))


def iter_records(paths: Sequence[Path], order: dict[str, int]) -> Iterator[tuple[str, EntryRecord]]:
    """(item key, record) of every shard, shard by shard (by their first item's position in ``order``), in item order."""
    for p in ordered(paths, order):
        s = read_shard(p)
        yield from sorted(zip(s.record_items, s.records), key=lambda kr: order.get(kr[0], len(order)))
