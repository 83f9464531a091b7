"""Queries: FAISS candidates, then re-ranking that is exact where it can be.

``delta`` view: candidates from FAISS (over-fetched) are scored from their full
stored module sketches, then the best k + 5 are re-ranked by the exact factor-space
Frobenius cosine (``lorasearch.frobenius.compare``) against the store's copy of
each file; where no copy is kept the sketch score stays and the answer says it
is not exact.
``style`` views: re-ranked from the full module sketches normalised per module
(never exact). ``paper``: the paper's baseline (``lorasearch.paper``).
The query's own family is searched, and any other indexed family whose module
table holds every module of the query (SD1.5 and SD2 share names and most
shapes: an SD2 LoRA without cross-attention k/v is detected as SD1.5); their
candidates are merged by score. Exact inner products are batched over
equally shaped modules (``FactorPack``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from lorasearch.delta import BIAS_SUFFIX, Delta, Factored, LoraDelta, NeedsBase
from lorasearch.embed import GROUP_VIEWS, VIEW_DELTA, VIEW_STYLE, Embedding, embed, sketch_cosine, view_name
from lorasearch.errors import BadInput
from lorasearch.families import known_families, load_table
from lorasearch.families import _fits as shape_fits  # the detector's own shape rule (update vs table weight)
from lorasearch.frobenius import comparable, inner, sq_norm
from lorasearch.store import Store

VIEW_PAPER = "paper"
QUERY_VIEWS = (VIEW_DELTA, VIEW_STYLE, VIEW_PAPER)
DEFAULT_CACHE_BYTES = 1 << 30


class DeltaCache:
    """LRU cache of LoraDeltas loaded from the store's blob copies, keyed by file sha256, bounded in bytes.

    An entry counts its file's on-disk bytes, plus the float64 factor stacks of the
    exact re-rank (``packed``) once they are built.

    Args:
        max_bytes: total bytes before the oldest entry is dropped.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[LoraDelta, int]] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.RLock()  # thread-safe on its own (the API's request threads share one)
        self.hits = 0
        self.misses = 0

    def get(self, sha256: str, path: Path) -> LoraDelta:
        """The LoraDelta of the blob at ``path`` (loaded once, then served from memory)."""
        with self._mutex:
            hit = self._items.get(sha256)
            if hit is not None:
                self._items.move_to_end(sha256)
                self.hits += 1
                return hit[0]
            from lorasearch.formats import load_lora

            self.misses += 1
            ld = load_lora(path, hashes=False)  # keyed by the row's sha256 already; the query needs no hashes
            size = path.stat().st_size
            self._items[sha256] = (ld, size)
            self._bytes += size
            self._evict()
            return ld

    def packed(self, sha256: str, path: Path) -> tuple[LoraDelta, FactorPack]:
        """``get`` plus the candidate's factor stacks for batched exact inner products (built once)."""
        ld = self.get(sha256, path)  # takes the mutex itself
        with self._mutex:
            pack = ld.cache.get(_PACK_KEY)
            if pack is None:
                pack = factor_pack(ld)
                item = self._items.get(sha256)
                if item is not None and item[0] is ld:
                    self._items[sha256] = (ld, item[1] + pack.nbytes)
                    self._bytes += pack.nbytes
                    self._evict()
        return ld, pack

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, s) = self._items.popitem(last=False)
            self._bytes -= s

    def __len__(self) -> int:
        return len(self._items)


_CACHE = DeltaCache()
_PACK_KEY = "search_factor_pack"
RERANK_EXTRA = 5  # exact re-rank of the best k + 5 by full-sketch score (sketch error std ~0.015)
SKETCH_CACHE_BYTES = 256 * 2**20  # ~8k SD1.5 LoRAs' sketches (k = 8), ~1k SDXL LoCons'


# --------------------------------------------------------------------------- exact inner products, batched


@dataclass(eq=False)
class _Group:
    """Factored modules of one LoRA with equal factor shapes: float64 stacks, up factors transposed."""

    names: list[str]
    up_t: np.ndarray  # (M, r, p) contiguous: U_mᵀ
    down: np.ndarray  # (M, r, q)
    scale: np.ndarray  # (M,)


@dataclass(eq=False)
class FactorPack:
    """One LoRA's additive modules arranged for batched exact Frobenius inner products.

    Attributes:
        groups: (p, r, q) -> stacked factored modules.
        where: module name -> (group key, index in the group).
        other: additive modules that are not plain factored (Kronecker, dense), by name.
        sq_norms: exact ``‖ΔW_m‖²`` of every additive module.
        nbytes: memory of the stacks.
    """

    groups: dict[tuple[int, int, int], _Group]
    where: dict[str, tuple[tuple[int, int, int], int]]
    other: dict[str, Delta]
    sq_norms: dict[str, float]
    nbytes: int


def factor_pack(ld: LoraDelta) -> FactorPack:
    """Float64 factor stacks of ``ld`` grouped by shape (cached on ``ld.cache``).

    float64 as in ``frobenius``: re-parameterised factors cancel heavily in the trace.
    """
    cached = ld.cache.get(_PACK_KEY)
    if cached is not None:
        return cached
    names: dict[tuple[int, int, int], list[str]] = {}
    other: dict[str, Delta] = {}
    for n, d in ld.modules.items():
        if isinstance(d, NeedsBase):
            continue
        if isinstance(d, Factored):
            names.setdefault((d.up.shape[0], d.rank, d.down.shape[1]), []).append(n)
        else:
            other[n] = d
    groups: dict[tuple[int, int, int], _Group] = {}
    where: dict[str, tuple[tuple[int, int, int], int]] = {}
    sq: dict[str, float] = {n: sq_norm(d) for n, d in other.items()}
    nbytes = 0
    for key, ns in names.items():
        ns = sorted(ns)  # two LoRAs with the same modules pair whole groups in order (no gather)
        fs: list[Factored] = [ld.modules[n] for n in ns]  # type: ignore[misc]
        g = _Group(ns, np.stack([f.up.T for f in fs], dtype=np.float64), np.stack([f.down for f in fs], dtype=np.float64),
                   np.array([f.scale for f in fs], dtype=np.float64))
        groups[key] = g
        nbytes += g.up_t.nbytes + g.down.nbytes
        where.update((n, (key, i)) for i, n in enumerate(ns))
        sq.update(zip(ns, (_pair_traces(g, g) * g.scale * g.scale).tolist()))
    pack = FactorPack(groups, where, other, sq, nbytes)
    ld.cache[_PACK_KEY] = pack
    return pack


def _pair_traces(a: _Group, b: _Group) -> np.ndarray:
    """``tr((U_aᵀU_b)(V_b V_aᵀ))`` per paired module (rows of ``a`` and ``b`` already paired)."""
    uu = np.matmul(a.up_t, b.up_t.transpose(0, 2, 1))
    vv = np.matmul(a.down, b.down.transpose(0, 2, 1))
    return np.einsum("mij,mij->m", uu, vv)


def _rows(g: _Group, idx: list[int]) -> _Group:
    """The group restricted to ``idx`` (no copy when it is the whole group in order)."""
    if len(idx) == len(g.names) and idx == list(range(len(idx))):
        return g
    return _Group([g.names[i] for i in idx], g.up_t[idx], g.down[idx], g.scale[idx])


def _group_dot(a: _Group, ia: list[int], b: _Group, ib: list[int]) -> float:
    """Σ over paired modules of ``s_a s_b tr((U_aᵀU_b)(V_b V_aᵀ))``: one batched product per side."""
    ga, gb = _rows(a, ia), _rows(b, ib)
    return float(np.dot(_pair_traces(ga, gb), ga.scale * gb.scale))


def exact_compare(a: LoraDelta, pa: FactorPack, b: LoraDelta, pb: FactorPack) -> dict[str, Any]:
    """``frobenius.compare(a, b)``'s cosine and coefficient from factor packs (same definition, batched).

    Returns:
        ``{"score", "exact", "shared_modules", "coefficient"}`` (score None when nothing is comparable).
    """
    if a.family != b.family:
        return {"score": None, "exact": True, "shared_modules": 0, "coefficient": None}
    pairs: dict[tuple[tuple[int, int, int], tuple[int, int, int]], tuple[list[int], list[int]]] = {}
    loose: list[str] = []
    for name, (ka, i) in pa.where.items():
        hit = pb.where.get(name)
        if hit is None:
            if name in pb.other:
                loose.append(name)
            continue
        kb, j = hit
        if ka[0] != kb[0] or ka[2] != kb[2]:
            continue  # other matrix shape: not comparable
        ia, ib = pairs.setdefault((ka, kb), ([], []))
        ia.append(i)
        ib.append(j)
    loose += [n for n in pa.other if n in pb.where or n in pb.other]
    dot = sum(_group_dot(pa.groups[ka], ia, pb.groups[kb], ib) for (ka, kb), (ia, ib) in pairs.items())
    shared = [n for (ka, _), (ia, _) in pairs.items() for n in (pa.groups[ka].names[i] for i in ia)]
    for n in loose:
        da, db = a.modules[n], b.modules[n]
        if comparable(da, db):
            dot += inner(da, db)
            shared.append(n)
    na = float(sum(pa.sq_norms[n] for n in shared))
    nb = float(sum(pb.sq_norms[n] for n in shared))
    cos = dot / float(np.sqrt(na * nb)) if na > 0 and nb > 0 else None
    return {"score": cos, "exact": True, "shared_modules": len(shared), "coefficient": dot / na if na > 0 else None}


# --------------------------------------------------------------------------- stored sketches


class _SketchCache:
    """Stored module sketches by content (store, AutoV3, k): immutable, so kept in memory (LRU, bounded in bytes)."""

    def __init__(self, max_bytes: int = SKETCH_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, int], tuple[list[str], np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, store: Store, row: dict[str, Any], k: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """The row's (names, sketches, norms), read from the store's sketch file once."""
        key = (str(store.root), str(row["autov3"]), k)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        sf = store.sketch_file(int(row["id"]))
        if sf is None:
            return None
        names, z, norms = sf.as_tuple()
        val = (list(names), np.array(z, dtype=np.float32), np.array(norms, dtype=np.float32))
        with self._lock:
            if key not in self._items:
                self._items[key] = val
                self._bytes += val[1].nbytes + val[2].nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, oz, on) = self._items.popitem(last=False)
                self._bytes -= oz.nbytes + on.nbytes
        return val


_SKETCHES = _SketchCache()


def _message(family: str, view: str, msg: str, searched: list[str] | None = None) -> dict[str, Any]:
    return {"family": family, "view": view, "exact": False, "results": [], "message": msg,
            "families_searched": searched if searched is not None else []}


def _sketch_tuple(emb: Embedding) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = sorted(emb.sketches)
    z = np.stack([emb.sketches[n] for n in names]) if names else np.zeros((0, emb.k, emb.k), np.float32)
    return names, z, np.asarray([emb.norms.get(n, 0.0) for n in names], dtype=np.float32)


def _candidate_views(view: str, groups: tuple[str, ...] | None) -> list[str]:
    if view == VIEW_STYLE and groups is not None and len(groups) > 1:
        return [GROUP_VIEWS[g] for g in groups]
    return [view_name(view, groups)]


@contextlib.contextmanager
def one_faiss_thread() -> Iterator[None]:
    """FAISS (OpenMP) on one thread in the calling thread, restored after.

    One query vector gains nothing from OpenMP, but its team start-up and barrier
    spin cost up to ~40 ms when the other cores are busy (measured: a flat search of
    24 vectors, 40 ms with 2 threads on a loaded 2-core machine, 0.06 ms with 1).
    OpenMP keeps the thread count per calling thread, so other threads (index
    builds) keep theirs.
    """
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


_BLAS: Any = None  # threadpoolctl controller, made once (a fresh threadpool_limits scans the libraries: ~2 ms)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread while a query runs (every product is rank-sized; restored on exit).

    A second OpenBLAS thread only adds hand-offs to these small products, and on a busy
    2-core machine it multiplied a query's wall time several-fold. The BLAS thread count is
    process-wide: concurrent queries all want 1, so they do not disturb each other.
    """
    global _BLAS
    try:
        if _BLAS is None:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        limiter = _BLAS.limit(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - no threadpoolctl, or a library it cannot drive: run as is
        yield
        return
    with limiter:
        yield


def _candidates(store: Store, family: str, emb: Embedding, views: list[str], n: int) -> dict[int, float]:
    """Union of FAISS candidates over the views (best FAISS score kept per id)."""
    out: dict[int, float] = {}
    with one_faiss_thread():
        for v in views:
            vec = emb.vectors.get(v)
            if vec is None:
                continue
            for lid, s in store.search(family, v, vec, n):
                out[lid] = max(s, out.get(lid, -np.inf))
    return out


def _sketch_rank(store: Store, qs: tuple[list[str], np.ndarray, np.ndarray], cands: dict[int, float], view: str,
                 groups: tuple[str, ...] | None) -> list[tuple[float, dict[str, Any]]]:
    """Candidates scored from their full stored module sketches, best first."""
    rows = store.get_many(list(cands))
    scored: list[tuple[float, dict[str, Any]]] = []
    k = int(qs[1].shape[-1]) if qs[1].ndim == 3 else 0
    for lid, cscore in cands.items():
        row = rows.get(lid)
        st = None if row is None else _SKETCHES.get(store, row, k)
        if row is None or st is None:
            continue  # gone, or no sketch file
        cos, shared = sketch_cosine(qs, st, view, groups)
        if cos is None:
            continue  # nothing comparable (no shared modules)
        scored.append((float(cos), _result(row, {"score": cos, "exact": False, "shared_modules": shared}, cscore)))
    scored.sort(key=lambda t: (-t[0], t[1]["id"]))
    return scored


def _rescore_exact(store: Store, queries: dict[str, LoraDelta], scored: list[tuple[float, dict[str, Any]]],
                   cache: DeltaCache) -> list[tuple[float, dict[str, Any]]]:
    """Replace sketch scores by exact cosines where the candidate's file copy is kept; re-sort.

    ``queries`` holds the query LoraDelta as read under each searched family.
    """
    packs = {f: factor_pack(q) for f, q in queries.items()}
    out = []
    for score, r in scored:
        ex = _exact_score(store, queries, packs, r, cache)
        if ex is not None and ex["score"] is not None:
            r = {**r, **ex, "score": float(ex["score"])}
            score = r["score"]
        out.append((score, r))
    out.sort(key=lambda t: (-t[0], t[1]["id"]))
    return out


def _exact_score(store: Store, queries: dict[str, LoraDelta], packs: dict[str, FactorPack], r: dict[str, Any],
                 cache: DeltaCache) -> dict[str, Any] | None:
    """Exact cosine against the candidate's blob copy; None when there is no usable copy."""
    q = queries.get(r["family"])
    path = store.blob_path(r["id"])
    if q is None or path is None or not r["file_sha256"]:
        return None
    try:
        other, pack = cache.packed(r["file_sha256"], path)
    except Exception:  # noqa: BLE001 - a damaged copy falls back to the sketch score
        return None
    if other.family != q.family:  # the copy reads as another family now: compare under the row's family
        other = dataclasses.replace(other, family=q.family)
    return exact_compare(q, packs[r["family"]], other, pack)


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


def _table_fits(shapes: Mapping[str, tuple[int, ...]], family: str) -> bool:
    """Whether every additive module (canonical name -> matrix shape) is in ``family``'s table with a fitting shape."""
    try:
        table = load_table(family)
    except KeyError:
        return False
    if not shapes:
        return False
    for name, shape in shapes.items():
        base = name[: -len(BIAS_SUFFIX)] if name.endswith(BIAS_SUFFIX) else name
        entry = table.get(base)
        if entry is None or not shape_fits(tuple(int(x) for x in shape), name.endswith(BIAS_SUFFIX), *entry):
            return False
    return True


def families_for(store: Store, family: str, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """``family`` when indexed, then every other indexed known family whose module table holds all ``shapes``.

    Families whose tables share names and shapes cannot be told apart by a subset of
    modules (an SD2 LoRA without its cross-attention k/v fits SD1.5 too), so such a
    query looks in each of them.

    Args:
        store: an open store.
        family: the query's family.
        shapes: its additive modules, canonical name -> matrix shape.

    Returns:
        family names, the query's own first.
    """
    indexed = set(store.families())
    out = [family] if family in indexed else []
    if family not in known_families():
        return out
    for f in known_families():
        if f != family and f in indexed and _table_fits(shapes, f):
            out.append(f)
    return out


def families_to_search(store: Store, ld: LoraDelta) -> list[str]:
    """``families_for`` of a LoRA's family and additive modules."""
    return families_for(store, ld.family, {n: tuple(d.matrix_shape) for n, d in ld.weight_modules().items()})


def query(store: Store, ld: LoraDelta, view: str = VIEW_DELTA, k: int = 10, groups: Iterable[str] | None = None,
          overfetch: int = 5, exact: bool = True, cache: DeltaCache | None = None,
          embedding: Embedding | None = None) -> dict[str, Any]:
    """The indexed LoRAs closest to ``ld`` within its family (and families it cannot be told from).

    Args:
        store: an open store.
        ld: the query LoRA.
        view: ``delta``, ``style`` or ``paper``.
        k: how many results.
        groups: module groups for the style view (``attention``, ``feed_forward``, ``conv``, ``text_encoder``).
        overfetch: FAISS candidates per result before re-ranking.
        exact: re-rank ``delta`` exactly from the stored file copies (False: from sketches only).
        cache: loaded-candidate cache (a module-wide one by default).
        embedding: ``ld``'s embedding if the caller has it already (``read_embed.load_and_embed``);
            used when its k and D are the store's.

    Returns:
        ``{"family", "view", "exact", "families_searched", "results": [{"id", "name", "source", "path",
        "file_sha256", "autov3", "family", "format", "score", "exact", "labels", ...}]}`` best first;
        ``exact`` is true only when every returned score is exact. ``families_searched`` lists the
        query's family and any other indexed family whose module table holds all the query's
        modules (scores of all of them are merged). A family with nothing indexed gives no
        results and a ``message``.

    Raises:
        BadInput: unknown view or module group.
    """
    if view not in QUERY_VIEWS:
        raise BadInput(f"unknown view {view!r} (expected one of {', '.join(QUERY_VIEWS)})", code="bad_view")
    try:
        gs = None if groups is None else tuple(groups) or None
        label = view if view == VIEW_PAPER else view_name(view, gs)
    except ValueError as exc:
        raise BadInput(str(exc), code="bad_view") from None
    if view == VIEW_PAPER:
        return _paper(store, ld, k)
    with one_blas_thread():
        return _query(store, ld, view, label, k, gs, overfetch, exact, cache, embedding)


def _query(store: Store, ld: LoraDelta, view: str, label: str, k: int, gs: tuple[str, ...] | None, overfetch: int,
           exact: bool, cache: DeltaCache | None, embedding: Embedding | None = None) -> dict[str, Any]:
    """``query`` for the delta and style views, once the arguments are checked."""
    family = ld.family
    fams = families_to_search(store, ld)
    if not fams:
        return _message(family, label, f"no indexed LoRAs of family {family}")
    views = _candidate_views(view, gs)
    queries: dict[str, LoraDelta] = {}
    scored: list[tuple[float, dict[str, Any]]] = []
    has_view = False
    for f in fams:
        qf = ld if f == family else dataclasses.replace(ld, family=f)
        if (embedding is not None and f == family and embedding.family == family and embedding.k == store.k
                and embedding.dim == store.dim):
            emb = embedding
        else:
            emb = embed(qf, k=int(store.k or 0), dim=int(store.dim or 0))
        if not any(v in emb.vectors for v in views):
            continue
        has_view = True
        queries[f] = qf
        cands = _candidates(store, f, emb, views, max(k * overfetch, k))
        scored += _sketch_rank(store, _sketch_tuple(emb), cands, VIEW_DELTA if view == VIEW_DELTA else VIEW_STYLE, gs)
    if not has_view:
        return _message(family, label, f"the query has no modules in view {label}", fams)
    if not scored:
        return _message(family, label, f"no indexed LoRAs of family {family} in view {label}", fams)
    scored.sort(key=lambda t: (-t[0], t[1]["id"]))
    if view == VIEW_DELTA and exact:
        # exact scores for the best k + RERANK_EXTRA by full-sketch score (sketch error std ~0.015,
        # so the true top k lies inside them); loading every candidate file would cost far more
        scored = _rescore_exact(store, queries, scored[: k + RERANK_EXTRA], cache if cache is not None else _CACHE)
    results = [r for _, r in scored[:k]]
    return {"family": family, "view": label, "exact": bool(results) and all(r["exact"] for r in results),
            "families_searched": fams, "results": results}


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
