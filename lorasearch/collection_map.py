"""A 2-D map of each family's collection, computed at index time and served to the web page.

Each family's LoRAs are laid out from their ``style`` view vectors (every module
normalised first, so the map shows what a LoRA changes rather than how strongly):

- UMAP (umap-learn, cosine neighbours, fixed ``random_state``) from
  ``UMAP_MIN_POINTS`` LoRAs up. Below that UMAP's neighbour graph is
  meaningless and its numba start-up (~2 s import + ~5 s JIT per process on
  this machine) would dominate indexing, so small families use PCA;
- the k nearest neighbours are computed here exactly (one matrix product)
  while the family is small enough, which also skips UMAP's own slow-to-compile
  neighbour search;
- families over ``MAX_POINTS`` are mapped from a fixed random subsample (noted
  in the map); from ``LAZY_MIN_POINTS`` up a family is laid out again only
  once ``STALE_FRACTION`` of it changed (UMAP of 20k LoRAs: ~1 min here), the
  LoRAs added meanwhile are listed as not on the map yet.

A map is ``DIR/maps/<safe family>.json`` written atomically, with the store
generation it was computed at. ``update_maps`` recomputes only the families
whose set of live LoRAs changed (and rewrites names/labels in place when only
those changed), so calling it after every indexing run is cheap.

Cost measured on this 2-core machine (1024-d style vectors): UMAP of 1 000
LoRAs 1.4 s, 4 096: 6 s, 20 000: 64 s, plus ~7 s of import and JIT once per
process; PCA of a small family: milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorasearch.store import DB_NAME, Store, atomic_write_bytes, safe_name

MAP_FORMAT = 1
MAP_VIEW = "style"
MAPS_DIR = "maps"
UMAP_MIN_POINTS = 15
MAX_POINTS = 50_000
EXACT_KNN_MAX = 4096  # above this UMAP finds neighbours itself (NN-descent): n² products get slow
LAZY_MIN_POINTS = 5_000  # from here a family is laid out again only once STALE_FRACTION of it changed
STALE_FRACTION = 0.02
RANDOM_STATE = 42
N_NEIGHBORS = 15
MIN_DIST = 0.1


def _log(msg: str) -> None:
    print(f"lorasearch.collection_map: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure layout maths


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def normalise_layout(xy: np.ndarray) -> np.ndarray:
    """Centre a layout on the origin and scale it into [-1, 1] (UMAP's own units mean nothing).

    Args:
        xy: n×2 coordinates.

    Returns:
        n×2 float64 coordinates, max |coordinate| = 1 (all zeros when every point coincides).
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return xy
    xy = xy - (xy.max(axis=0) + xy.min(axis=0)) / 2
    span = float(np.abs(xy).max())
    return xy / span if span > 1e-12 else np.zeros_like(xy)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components of the rows (sign fixed: each axis's largest loading is positive).

    Args:
        x: n×d vectors.

    Returns:
        n×2 coordinates (a missing second component is zero).
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((len(x), 2))
    if len(x) < 2:
        return out
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    m = min(2, len(s))
    proj = u[:, :m] * s[:m]
    for j in range(m):
        if proj[np.argmax(np.abs(proj[:, j])), j] < 0:
            proj[:, j] = -proj[:, j]
    out[:, :m] = proj
    return out


def cosine_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by cosine distance, each point first in its own list (UMAP's convention).

    Args:
        x: n×d vectors.
        k: neighbours per point, the point itself included (k <= n).

    Returns:
        (indices n×k int64, cosine distances n×k float32), nearest first.
    """
    u = _unit_rows(x)
    d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    np.fill_diagonal(d, -1.0)  # self first even when another point is an exact duplicate
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, idx, axis=1)
    dist[:, 0] = 0.0
    return idx.astype(np.int64), dist.astype(np.float32)


def umap_2d(x: np.ndarray, random_state: int = RANDOM_STATE, n_neighbors: int = N_NEIGHBORS,
            min_dist: float = MIN_DIST) -> np.ndarray:
    """UMAP of the rows with cosine neighbours (deterministic for a fixed ``random_state``).

    Args:
        x: n×d vectors, n >= 3.
        random_state: UMAP's seed (fixing it also makes UMAP single-threaded).
        n_neighbors: neighbourhood size (capped at n - 1).
        min_dist: UMAP's minimum distance between embedded points.

    Returns:
        n×2 coordinates.
    """
    import umap  # heavy (numba): only imported when a family is big enough to need it

    x = np.asarray(x, dtype=np.float32)
    k = int(min(n_neighbors, len(x) - 1))
    knn = None
    if len(x) <= EXACT_KNN_MAX:
        idx, dist = cosine_knn(x, k)
        knn = (idx, dist, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", precomputed-knn notices
        reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, metric="cosine", random_state=random_state,
                            precomputed_knn=knn if knn is not None else (None, None, None), n_components=2)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def layout(x: np.ndarray, random_state: int = RANDOM_STATE) -> tuple[np.ndarray, str, str | None]:
    """2-D layout of n vectors: UMAP from ``UMAP_MIN_POINTS`` up, PCA below (or if UMAP fails).

    Args:
        x: n×d vectors.
        random_state: UMAP's seed.

    Returns:
        (n×2 coordinates in [-1, 1], method ``"umap"`` | ``"pca"``, a note or None).
    """
    if len(x) < UMAP_MIN_POINTS:
        return normalise_layout(pca_2d(x)), "pca", f"fewer than {UMAP_MIN_POINTS} LoRAs for UMAP"
    try:
        return normalise_layout(umap_2d(x, random_state)), "umap", None
    except Exception as exc:  # noqa: BLE001 - a map is a convenience: never fail indexing for it
        _log(f"UMAP failed ({exc.__class__.__name__}: {exc}); using PCA")
        return normalise_layout(pca_2d(x)), "pca", f"UMAP failed ({exc.__class__.__name__})"


# --------------------------------------------------------------------------- files


def map_path(store_root: str | Path, family: str) -> Path:
    """Where the map of ``family`` lives in a store directory."""
    return Path(store_root) / MAPS_DIR / f"{safe_name(family)}.json"


def load_map(store_root: str | Path, family: str) -> dict[str, Any] | None:
    """The saved map of a family.

    Args:
        store_root: the store directory.
        family: the family name.

    Returns:
        ``{"family", "view", "method", "generation", "count", "points": [{"id", "name", "x", "y",
        "labels", "format"}], ...}``, or None when there is none (or it is unreadable).
    """
    path = map_path(store_root, family)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("family") != family or not isinstance(data.get("points"), list):
        return None
    return data


def _write_map(store_root: Path, data: dict[str, Any]) -> None:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    atomic_write_bytes(map_path(store_root, data["family"]), body, point="map_rename")


# --------------------------------------------------------------------------- building maps from a store


def _family_rows(store: Store, family: str) -> list[dict[str, Any]]:
    """Live LoRAs of a family that have a style vector: id, name, format, labels (by id)."""
    rows = store.execute(
        "SELECT l.id, l.name, l.format, l.labels FROM loras l JOIN vectors v ON v.lora_id = l.id"
        " WHERE l.family=? AND l.deleted=0 AND v.view=? ORDER BY l.id", (family, MAP_VIEW))
    return [{"id": int(r[0]), "name": r[1], "format": r[2], "labels": json.loads(r[3] or "[]")} for r in rows]


def _ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def _subsample(rows: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """A fixed random subsample (same rows for the same collection)."""
    if len(rows) <= max_points:
        return rows
    pick = np.sort(np.random.default_rng(RANDOM_STATE).choice(len(rows), size=max_points, replace=False))
    return [rows[i] for i in pick]


def _point(row: dict[str, Any], xy: Sequence[float]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "x": round(float(xy[0]), 5), "y": round(float(xy[1]), 5),
            "labels": row["labels"], "format": row["format"]}


def compute_map(store: Store, family: str, max_points: int = MAX_POINTS) -> dict[str, Any] | None:
    """Lay out one family's live LoRAs (not saved).

    Args:
        store: an open store.
        family: the family.
        max_points: above this many LoRAs a fixed random subsample is mapped.

    Returns:
        the map dict (see ``load_map``), or None when the family has no LoRA with a style vector.
    """
    generation = store.generation()
    rows = _family_rows(store, family)
    if not rows:
        return None
    shown = _subsample(rows, max_points)
    vecs = store.vectors(MAP_VIEW, [r["id"] for r in shown])
    xy, method, note = layout(vecs)
    if len(shown) < len(rows):
        note = "; ".join(filter(None, [note, f"subsample of {len(shown)} out of {len(rows)} LoRAs"]))
    return {
        "map_format": MAP_FORMAT, "family": family, "view": MAP_VIEW, "method": method, "generation": generation,
        "count": len(rows), "layout_count": len(rows), "layout_points": len(shown),
        "ids_digest": _ids_digest([r["id"] for r in rows]), "note": note, "layout_note": note,
        "params": {"random_state": RANDOM_STATE, "n_neighbors": N_NEIGHBORS, "min_dist": MIN_DIST,
                   "umap_min_points": UMAP_MIN_POINTS, "max_points": max_points},
        "points": [_point(r, p) for r, p in zip(shown, xy)],
    }


def _refresh(old: dict[str, Any], rows: list[dict[str, Any]], generation: int) -> dict[str, Any] | None:
    """The old layout with current names/labels/formats and deleted LoRAs dropped; None when nothing changed."""
    by_id = {r["id"]: r for r in rows}
    points = [{**p, "name": r["name"], "labels": r["labels"], "format": r["format"]}
              for p in old["points"] if (r := by_id.get(p.get("id"))) is not None]
    ids = [r["id"] for r in rows]
    digest = _ids_digest(ids)
    if points == old["points"] and digest == old.get("ids_digest"):
        return None
    note = old.get("layout_note")
    subsampled = int(old.get("layout_count", 0)) > int((old.get("params") or {}).get("max_points", MAX_POINTS))
    unplaced = len(rows) - len(points)
    if unplaced > 0 and not subsampled:
        note = "; ".join(filter(None, [note, f"{unplaced} LoRAs indexed since this layout are not on it yet"]))
    return {**old, "points": points, "generation": generation, "count": len(rows), "ids_digest": digest,
            "note": note}


def _too_stale(old: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Whether a family's live set moved far enough from the saved layout to lay it out again.

    Small families are laid out again on any change; from ``LAZY_MIN_POINTS`` up (a UMAP
    of 20k LoRAs takes about a minute here) only once ``STALE_FRACTION`` of them changed.
    """
    n = len(rows)
    if n < LAZY_MIN_POINTS:
        return True
    laid_out, sampled = int(old["layout_count"]), int(old.get("layout_points") or len(old["points"]))
    live = {r["id"] for r in rows}
    still = sum(1 for p in old["points"] if p.get("id") in live)
    removed = (sampled - still) * laid_out / max(sampled, 1)  # scaled up when the layout was a subsample
    added = max(0.0, n - (laid_out - removed))
    return removed + added > STALE_FRACTION * n


def _usable(old: dict[str, Any] | None, max_points: int) -> bool:
    return (old is not None and old.get("map_format") == MAP_FORMAT and isinstance(old.get("layout_count"), int)
            and (old.get("params") or {}).get("max_points") == max_points)


def _update_family(store: Store, family: str, max_points: int, force: bool) -> str:
    rows = _family_rows(store, family)
    path = map_path(store.root, family)
    if not rows:
        if path.exists():
            path.unlink()
            return "removed"
        return "empty"
    old = None if force else load_map(store.root, family)
    if old is not None and _usable(old, max_points):
        same_set = old.get("ids_digest") == _ids_digest([r["id"] for r in rows])
        if same_set or not _too_stale(old, rows):
            refreshed = _refresh(old, rows, store.generation())
            if refreshed is None:
                return "ok"
            _write_map(store.root, refreshed)
            return "refreshed"
    data = compute_map(store, family, max_points)
    if data is None:
        return "empty"
    _write_map(store.root, data)
    return "computed"


def update_maps(store: Store, families: Sequence[str] | None = None, max_points: int = MAX_POINTS,
                force: bool = False) -> dict[str, str]:
    """Bring the saved maps up to date with the store (only changed families are laid out again).

    Args:
        store: an open, writable store.
        families: the families to check (default: every family with live LoRAs, and maps of
            families that have none left are removed).
        max_points: subsample families bigger than this.
        force: recompute even when a map looks current.

    Returns:
        family -> ``computed`` | ``refreshed`` (names/labels, deletions, or a big family's few
        additions: the layout is kept) | ``ok`` | ``removed`` | ``empty``
        | ``failed: <reason>`` (a failure is logged on stderr and never raised).
    """
    targets = list(store.families()) if families is None else list(families)
    out: dict[str, str] = {}
    for fam in targets:
        try:
            out[fam] = _update_family(store, fam, max_points, force)
        except Exception as exc:  # noqa: BLE001 - a map is a convenience: never fail indexing for it
            out[fam] = f"failed: {exc.__class__.__name__}: {exc}"
            _log(f"map of {fam} not updated ({out[fam][8:]})")
    if families is None:
        out.update(_remove_orphans(store.root, set(targets)))
    return out


def _remove_orphans(root: Path, live: set[str]) -> dict[str, str]:
    """Delete maps of families with no live LoRA left."""
    out: dict[str, str] = {}
    folder = root / MAPS_DIR
    if not folder.is_dir():
        return out
    for p in folder.glob("*.json"):
        try:
            fam = json.loads(p.read_text(encoding="utf-8")).get("family")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fam, str) and fam not in live and p == map_path(root, fam):
            p.unlink(missing_ok=True)
            out[fam] = "removed"
    return out


# --------------------------------------------------------------------------- a background refresh (the API's)

REFRESH_LOCK = ".refresh.lock"


def refresh_maps(db: str | Path, families: Sequence[str] | None = None) -> dict[str, str]:
    """``update_maps`` on a read-only store, one refresh per store at a time (across processes).

    The API's workers call this (in a child process) after they add or delete
    LoRAs; an indexing run updates the maps itself when it ends, so while one
    holds the store nothing is done here.

    Args:
        db: the store directory.
        families: the families to bring up to date (default: all).

    Returns:
        ``update_maps``'s answer, or ``{"*": "skipped: an indexing run holds the store"}``.
    """
    import fcntl

    from indexer.pipeline import IndexerBusy, exclusive

    root = Path(db)
    if not (root / DB_NAME).is_file():
        return {"*": f"failed: {root}: no lorasearch store here"}
    (root / MAPS_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(root / MAPS_DIR / REFRESH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # runs from several API workers: one after the other
        try:
            with exclusive(root):
                pass  # only a probe: holding it would make the API's own writes wait (409)
        except IndexerBusy:
            return {"*": "skipped: an indexing run holds the store (it updates the maps when it ends)"}
        store = Store(root, create=False, readonly=True)
        try:
            return update_maps(store, families)
        finally:
            store.close()
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorasearch.collection_map DB [FAMILY...]``: refresh the maps (the API runs this in the background).

    Returns:
        the exit status (0; failures are reported per family on stdout as JSON).
    """
    import argparse

    ap = argparse.ArgumentParser(description="Refresh a store's collection maps.")
    ap.add_argument("db", type=Path, help="store directory")
    ap.add_argument("families", nargs="*", help="families to refresh (default: all)")
    ap.add_argument("--nice", type=int, default=0, help="lower this process's priority by this much first")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    print(json.dumps(refresh_maps(args.db, args.families or None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
