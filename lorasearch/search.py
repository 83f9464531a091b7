"""Queries: FAISS candidates, then re-ranking that is exact where it can be.

``delta`` view: candidates from FAISS (over-fetched) are scored from their full
stored module sketches, then the best 2k are re-ranked by the exact factor-space
Frobenius cosine (``lorasearch.frobenius.compare``) against the store's copy of
each file; where no copy is kept the sketch score stays and the answer says it
is not exact.
``style`` views: re-ranked from the full module sketches normalised per module
(never exact). ``paper``: the paper's baseline (``lorasearch.paper``).
Only the query's own family is searched.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lorasearch.delta import LoraDelta
from lorasearch.embed import GROUP_VIEWS, VIEW_DELTA, VIEW_STYLE, Embedding, embed, sketch_cosine, view_name
from lorasearch.errors import BadInput
from lorasearch.frobenius import compare
from lorasearch.store import Store

VIEW_PAPER = "paper"
QUERY_VIEWS = (VIEW_DELTA, VIEW_STYLE, VIEW_PAPER)
DEFAULT_CACHE_BYTES = 1 << 30


class DeltaCache:
    """LRU cache of LoraDeltas loaded from the store's blob copies, keyed by file sha256, bounded in file bytes.

    Args:
        max_bytes: total size of the cached files' on-disk bytes before the oldest is dropped.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[LoraDelta, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, sha256: str, path: Path) -> LoraDelta:
        """The LoraDelta of the blob at ``path`` (loaded once, then served from memory)."""
        hit = self._items.get(sha256)
        if hit is not None:
            self._items.move_to_end(sha256)
            self.hits += 1
            return hit[0]
        from lorasearch.formats import load_lora

        self.misses += 1
        ld = load_lora(path)
        size = path.stat().st_size
        self._items[sha256] = (ld, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, s) = self._items.popitem(last=False)
            self._bytes -= s
        return ld

    def __len__(self) -> int:
        return len(self._items)


_CACHE = DeltaCache()


def _message(family: str, view: str, msg: str) -> dict[str, Any]:
    return {"family": family, "view": view, "exact": False, "results": [], "message": msg}


def _sketch_tuple(emb: Embedding) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = sorted(emb.sketches)
    z = np.stack([emb.sketches[n] for n in names]) if names else np.zeros((0, emb.k, emb.k), np.float32)
    return names, z, np.asarray([emb.norms.get(n, 0.0) for n in names], dtype=np.float32)


def _candidate_views(view: str, groups: tuple[str, ...] | None) -> list[str]:
    if view == VIEW_STYLE and groups is not None and len(groups) > 1:
        return [GROUP_VIEWS[g] for g in groups]
    return [view_name(view, groups)]


def _candidates(store: Store, family: str, emb: Embedding, views: list[str], n: int) -> dict[int, float]:
    """Union of FAISS candidates over the views (best FAISS score kept per id)."""
    out: dict[int, float] = {}
    for v in views:
        vec = emb.vectors.get(v)
        if vec is None:
            continue
        for lid, s in store.search(family, v, vec, n):
            out[lid] = max(s, out.get(lid, -np.inf))
    return out


def _exact_score(store: Store, ld: LoraDelta, lid: int, sha: str | None, cache: DeltaCache) -> dict[str, Any] | None:
    """Exact cosine against the candidate's blob copy; None when there is no usable copy."""
    path = store.blob_path(lid)
    if path is None or not sha:
        return None
    try:
        other = cache.get(sha, path)
    except Exception:  # noqa: BLE001 - a damaged copy falls back to the sketch score
        return None
    cmp = compare(ld, other)
    return {"score": cmp.cosine, "exact": True, "shared_modules": cmp.shared_modules, "coefficient": cmp.coefficient}


def _sketch_score(store: Store, q: tuple[list[str], np.ndarray, np.ndarray], lid: int, view: str,
                  groups: tuple[str, ...] | None) -> dict[str, Any] | None:
    sf = store.sketch_file(lid)
    if sf is None:
        return None
    cos, shared = sketch_cosine(q, sf.as_tuple(), view, groups)
    return {"score": cos, "exact": False, "shared_modules": shared}


def _sketch_rank(store: Store, qs: tuple[list[str], np.ndarray, np.ndarray], cands: dict[int, float], view: str,
                 groups: tuple[str, ...] | None) -> list[tuple[float, dict[str, Any]]]:
    """Candidates scored from their full stored module sketches, best first."""
    rows = store.get_many(list(cands))
    scored: list[tuple[float, dict[str, Any]]] = []
    for lid, cscore in cands.items():
        row = rows.get(lid)
        s = None if row is None else _sketch_score(store, qs, lid, view, groups)
        if row is None or s is None or s["score"] is None:
            continue  # gone, or nothing comparable (no shared modules)
        scored.append((float(s["score"]), _result(row, s, cscore)))
    scored.sort(key=lambda t: (-t[0], t[1]["id"]))
    return scored


def _rescore_exact(store: Store, ld: LoraDelta, scored: list[tuple[float, dict[str, Any]]],
                   cache: DeltaCache) -> list[tuple[float, dict[str, Any]]]:
    """Replace sketch scores by exact cosines where the candidate's file copy is kept; re-sort."""
    out = []
    for score, r in scored:
        ex = _exact_score(store, ld, r["id"], r["file_sha256"], cache)
        if ex is not None and ex["score"] is not None:
            r = {**r, **ex, "score": float(ex["score"])}
            score = r["score"]
        out.append((score, r))
    out.sort(key=lambda t: (-t[0], t[1]["id"]))
    return out


def _result(row: dict[str, Any], scored: dict[str, Any], candidate_score: float) -> dict[str, Any]:
    out = {
        "id": row["id"], "name": row["name"], "source": row.get("source"), "path": row.get("path"),
        "repo": row.get("repo"), "revision": row.get("revision"), "file_sha256": row["file_sha256"],
        "autov3": row["autov3"], "family": row["family"], "format": row["format"],
        "score": float(scored["score"]), "exact": scored["exact"], "shared_modules": scored["shared_modules"],
        "labels": row["labels"], "candidate_score": float(candidate_score),
    }
    if "coefficient" in scored:
        out["coefficient"] = scored["coefficient"]
    return out


def query(store: Store, ld: LoraDelta, view: str = VIEW_DELTA, k: int = 10, groups: Iterable[str] | None = None,
          overfetch: int = 5, exact: bool = True, cache: DeltaCache | None = None) -> dict[str, Any]:
    """The indexed LoRAs closest to ``ld`` within its family.

    Args:
        store: an open store.
        ld: the query LoRA.
        view: ``delta``, ``style`` or ``paper``.
        k: how many results.
        groups: module groups for the style view (``attention``, ``feed_forward``, ``conv``, ``text_encoder``).
        overfetch: FAISS candidates per result before re-ranking.
        exact: re-rank ``delta`` exactly from the stored file copies (False: from sketches only).
        cache: loaded-candidate cache (a module-wide one by default).

    Returns:
        ``{"family", "view", "exact", "results": [{"id", "name", "source", "path", "file_sha256",
        "autov3", "family", "format", "score", "exact", "labels", ...}]}`` best first; ``exact`` is
        true only when every returned score is exact. A family with nothing indexed gives no
        results and a ``message``.

    Raises:
        BadInput: unknown view or module group.
    """
    family = ld.family
    if view not in QUERY_VIEWS:
        raise BadInput(f"unknown view {view!r} (expected one of {', '.join(QUERY_VIEWS)})", code="bad_view")
    try:
        gs = None if groups is None else tuple(groups) or None
        label = view if view == VIEW_PAPER else view_name(view, gs)
    except ValueError as exc:
        raise BadInput(str(exc), code="bad_view") from None
    if view == VIEW_PAPER:
        return _paper(store, ld, k)
    if family not in store.families():
        return _message(family, label, f"no indexed LoRAs of family {family}")
    emb = embed(ld, k=int(store.k or 0), dim=int(store.dim or 0))
    views = _candidate_views(view, gs)
    if not any(v in emb.vectors for v in views):
        return _message(family, label, f"the query has no modules in view {label}")
    cands = _candidates(store, family, emb, views, max(k * overfetch, k))
    if not cands:
        return _message(family, label, f"no indexed LoRAs of family {family} in view {label}")
    scored = _sketch_rank(store, _sketch_tuple(emb), cands, VIEW_DELTA if view == VIEW_DELTA else VIEW_STYLE, gs)
    if view == VIEW_DELTA and exact:
        # exact scores for the best 2k by full-sketch score (sketch error is ~0.02, so the top k
        # by exact score lies inside them); loading every candidate file would cost far more
        scored = _rescore_exact(store, ld, scored[: 2 * k], cache if cache is not None else _CACHE)
    results = [r for _, r in scored[:k]]
    return {"family": family, "view": label, "exact": bool(results) and all(r["exact"] for r in results), "results": results}


def paper_query(store: Store, ld: LoraDelta, k: int, cache: DeltaCache | None = None) -> list[tuple[int, float]]:
    """The paper's method over the store: PCA fitted on the indexed LoRAs with the query's factor shapes.

    Loads the stored file copies of the query's family (LRU-cached); LoRAs whose
    factor shapes differ are not comparable under this method and get no score.

    Returns:
        (id, cosine in PCA space), best first, at most ``k``.
    """
    from lorasearch.paper import paper_rank, paper_signature

    cache = cache if cache is not None else _CACHE
    sig = paper_signature(ld)
    ids: list[int] = []
    corpus: list[LoraDelta] = []
    offset, page = 0, 1000
    while True:
        rows = store.list(family=ld.family, limit=page, offset=offset)
        for row in rows:
            path = store.blob_path(row["id"])
            if path is None:
                continue
            cand = cache.get(row["file_sha256"], path)
            if paper_signature(cand) == sig:
                ids.append(int(row["id"]))
                corpus.append(cand)
        if len(rows) < page:
            break
        offset += page
    return [(ids[i], s) for i, s in paper_rank(ld, corpus)[:k]]


def _paper(store: Store, ld: LoraDelta, k: int) -> dict[str, Any]:
    """The paper's baseline (flattened factors + PCA) over the stored file copies."""
    if ld.family not in store.families():
        return _message(ld.family, VIEW_PAPER, f"no indexed LoRAs of family {ld.family}")
    hits = paper_query(store, ld, k)
    if not hits:
        return _message(ld.family, VIEW_PAPER, "no indexed LoRA has the query's factor shapes (the paper view compares only those)")
    rows = store.get_many([i for i, _ in hits])
    results = [_result(rows[i], {"score": s, "exact": False, "shared_modules": None}, s) for i, s in hits if i in rows]
    return {"family": ld.family, "view": VIEW_PAPER, "exact": False, "results": results}
