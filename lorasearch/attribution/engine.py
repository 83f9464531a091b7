"""``attribute()``: is a target (a LoRA, a checkpoint, a hub repo) derived from indexed LoRAs, or a merge of them?

For each LoRA or checkpoint file of the target:

1. **ΔW of the target**: a LoRA is read with ``load_lora``; a full checkpoint
   is subtracted from its base module by module, streaming
   (``checkpoint.checkpoint_delta``); both end as canonical modules of a family.
2. **Candidates** (sketch space): the target's module sketches are seeded like
   the indexed ones (``sketch_lora`` with the candidate family), folded to the
   ``delta`` view and searched in FAISS (over-fetched, with both signs of the
   query: a component merged with a negative weight anti-correlates). A greedy mixture
   (orthogonal matching pursuit on the Gram matrix of the concatenated module
   sketches, over the target's modules) picks components one by one; after
   each pick the sketch residual is folded and searched again, so a small
   component hidden behind a large one still reaches the candidate pool.
   The picks, plus the best single candidates, form a short list.
3. **Exact verification**: the short-listed LoRAs are loaded from the store's
   file copies and the exact Frobenius Gram matrix of target and candidates is
   formed from the factors (``mixture.module_gram``, ``frobenius.inner``), over
   the target's modules. Components are chosen again, exactly: forward
   selection of up to ``max_components`` terms whose partial cosine reaches
   ``min_cosine``, then backward elimination of every term that is not
   significant given the others.
   A single component is scored by its cosine with the target over the
   modules both have; a mixture component by its partial cosine (the
   residual's cosine with the part of it no other component explains).
   Significance: the calibrated false-positive rate of that score
   (``calibration``) at most ``max_fpr`` and the score at least ``min_cosine``.
4. **Coefficients**: least squares of the target on the chosen components
   (negative weights allowed). Where a target module has lower rank than the
   chosen components together have there, it may be an SVD truncation (rank
   resize, SVD-compressed merge), and that module is fitted inside the
   target's own row/column spaces, which removes the truncation's bias; every
   other module (factor concatenation, further training, a checkpoint's
   full-rank ΔW) gets ordinary least squares. ``explained`` is the share of
   the target's ‖ΔW‖² that this fit accounts for.

Verdict: no significant component -> ``none``; one -> ``derived``; more ->
``merged``. Candidates whose ΔW is the same as a chosen one's (cosine ≥
0.9999, same norm: one update stored from two files) are listed as its
``equivalents``.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lorasearch.attribution import calibration as calib
from lorasearch.attribution.checkpoint import (
    COMPONENTS,
    CheckpointDelta,
    checkpoint_delta,
    file_is_checkpoint,
    is_diffusers_folder,
    read_model_card_base,
)
from lorasearch.attribution.mixture import (
    comparable,
    drop_one_scores,
    explained_share,
    greedy_select,
    least_squares,
    module_gram,
    partial_scores,
    project,
    prune,
    target_basis,
)
from lorasearch.delta import Delta, Factored, Kronecker, LoraDelta, NeedsBase
from lorasearch.errors import BadInput
from lorasearch.frobenius import inner, module_sq_norms, sq_norm
from lorasearch.search import DeltaCache
from lorasearch.sketch import delta_vector, sketch_lora

VIEW = "delta"
# Same update from two files: cosine and norm ratio this close to 1.
EQUIVALENT_COSINE = 0.9999
EQUIVALENT_NORM = 1e-3
# A candidate covering less than this share of the target's ΔW energy is not a single-source match.
MIN_TARGET_SHARE = 1e-3
# Sketch stage: a pick must beat max(SKETCH_TAU_MIN, SKETCH_TAU_SIGMAS·σ̂), σ̂ the robust spread of the pool's cosines.
SKETCH_TAU_MIN = 0.03
SKETCH_TAU_SIGMAS = 3.0
_CACHE = DeltaCache(512 * 2**20)
VERDICT_RANK = {"none": 0, "derived": 1, "merged": 2}


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds and search breadth.

    Attributes:
        max_fpr: a component counts when its calibrated false-positive rate is at most this.
        min_cosine: ... and its score (cosine or partial cosine) is at least this.
        max_components: most components of a mixture.
        overfetch: FAISS candidates per search.
        shortlist: candidates verified exactly.
    """

    # from bench/attribution.py: on the style zoo (unrelated LoRAs up to |cos| 0.85, fpr 2.6e-4)
    # the largest round value that no unrelated pair reaches, keeping further training (+25 %)
    max_fpr: float = 2e-4
    min_cosine: float = 0.1
    max_components: int = 6
    overfetch: int = 64
    shortlist: int = 12


def _log(msg: str) -> None:
    print(f"lorasearch: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One file's ΔW, by canonical module.

    Attributes:
        label: where it came from (path, or ``hf:repo@sha/path``).
        kind: ``lora`` or ``checkpoint``.
        family: its base-model family.
        shapes: canonical module -> matrix shape, for every additive module.
        info: extra facts for the answer (format, base, skipped tensors...).
    """

    label: str
    kind: str
    family: str
    shapes: dict[str, tuple[int, ...]]
    info: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, Delta] | None = None
    ckpt: CheckpointDelta | None = None

    @classmethod
    def from_lora(cls, ld: LoraDelta, label: str) -> Target:
        mods = {n: d for n, d in ld.modules.items() if not isinstance(d, NeedsBase)}
        info = {"format": ld.format, "modules_needing_base": len(ld.modules) - len(mods)}
        return cls(label, "lora", ld.family, {n: tuple(d.matrix_shape) for n, d in mods.items()}, info, mods)

    @classmethod
    def from_checkpoint(cls, cd: CheckpointDelta, label: str) -> Target:
        info = {"base": str(cd.base_path), "skipped_tensors": cd.skipped}
        return cls(label, "checkpoint", cd.family, dict(cd.shapes), info, None, cd)

    def iter_modules(self) -> Iterator[tuple[str, Delta]]:
        """(canonical name, ΔW), one module at a time (a checkpoint is re-read unless cached)."""
        if self.modules is not None:
            yield from self.modules.items()
        elif self.ckpt is not None:
            yield from self.ckpt.iter_modules()

    def sketches(self, family: str, k: int) -> dict[str, np.ndarray]:
        """Module sketches seeded as ``family``'s (those of the indexed LoRAs of that family)."""
        if self.modules is not None:
            return sketch_lora(LoraDelta(family, "target", self.modules), k)
        out: dict[str, np.ndarray] = {}
        for name, d in self.iter_modules():
            out.update(sketch_lora(LoraDelta(family, "target", {name: d}), k))
        return out


# --------------------------------------------------------------------------- statistics of a candidate set


@dataclass
class Projected:
    """One low-rank target module's inner products inside its own row/column spaces."""

    g: np.ndarray
    b: np.ndarray
    g_plain: np.ndarray
    b_plain: np.ndarray
    rank: int
    ranks: np.ndarray


@dataclass
class Stats:
    """Inner products of a target and candidates over the target's modules.

    ``g``/``b``: plain Gram matrix and products with the target; ``projected``:
    the low-rank target modules' products inside the target's row/column spaces,
    used for the coefficients where the target has fewer dimensions than the
    chosen components together (it may have been truncated; see ``fit_arrays``).
    """

    ids: list[int]
    g: np.ndarray
    b: np.ndarray
    t2: float
    t2_shared: np.ndarray
    shared: np.ndarray
    exact: bool
    projected: list[Projected] = field(default_factory=list)

    def fit_arrays(self, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(G, b) over ``chosen`` for the coefficients.

        A module is taken in the target's own spaces when its rank is below the
        chosen components' summed rank there: an SVD-truncated target (rank
        resize, SVD-compressed merge) is then fitted without bias, while a target
        that kept every direction (factor concatenation, further training,
        a checkpoint's full-rank ΔW) gets ordinary least squares.
        """
        s = list(chosen)
        g = self.g[np.ix_(s, s)].copy()
        b = self.b[s].copy()
        for pm in self.projected:
            if pm.rank < int(pm.ranks[s].sum()):
                g += pm.g[np.ix_(s, s)] - pm.g_plain[np.ix_(s, s)]
                b += pm.b[s] - pm.b_plain[s]
        return g, b


def _rank(d: Delta) -> int:
    if isinstance(d, (Factored, Kronecker)):
        return int(d.rank)
    return int(min(d.matrix_shape)) if len(d.matrix_shape) == 2 else 1


def exact_stats(target: Target, ids: list[int], lds: list[LoraDelta]) -> Stats:
    """Exact Frobenius statistics, one target module at a time (a checkpoint is streamed)."""
    n = len(lds)
    g, b = np.zeros((n, n)), np.zeros(n)
    t2 = 0.0
    t2_shared, shared = np.zeros(n), np.zeros(n, dtype=int)
    projected: list[Projected] = []
    for name, td in target.iter_modules():
        tt = sq_norm(td)
        t2 += tt
        ds = [ld.modules.get(name) for ld in lds]
        ds = [d if comparable(td, d) else None for d in ds]
        present = [i for i, d in enumerate(ds) if d is not None]
        if not present:
            continue
        gm = module_gram(ds)
        bm = np.array([inner(td, d) if d is not None else 0.0 for d in ds])
        g += gm
        b += bm
        t2_shared[present] += tt
        shared[present] += 1
        basis = target_basis(td)
        if basis is None:
            continue
        proj = np.zeros((n, basis.singular.size ** 2))
        for i in present:
            proj[i] = project(ds[i], basis).ravel()  # type: ignore[arg-type]
        ranks = np.array([_rank(d) if d is not None else 0 for d in ds])
        projected.append(Projected(proj @ proj.T, proj @ np.diag(basis.singular).ravel(), gm, bm,
                                   int(basis.singular.size), ranks))
    return Stats(ids, g, b, t2, t2_shared, shared, True, projected)


def _sketch_columns(store: Any, ids: Iterable[int], pos: dict[str, int], k2: int, dim: int
                    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Candidate sketches laid out on the target's modules: id -> (column, module presence)."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in ids:
        sf = store.sketch_file(i)
        if sf is None:
            continue
        col = np.zeros(dim)
        pres = np.zeros(len(pos), dtype=bool)
        for j, name in enumerate(sf.names):
            m = pos.get(name)
            if m is not None and sf.sketches[j].size == k2:
                col[m * k2:(m + 1) * k2] = np.asarray(sf.sketches[j], dtype=np.float64).ravel()
                pres[m] = True
        if pres.any():
            out[i] = (col, pres)
    return out


@dataclass
class SketchResult:
    """The sketch stage's short list and its sketch-space statistics."""

    family: str
    shortlist: list[int]
    stats: Stats
    pool: int


def sketch_stage(store: Any, target: Target, family: str, th: Thresholds, exclude: set[int]) -> SketchResult | None:
    """FAISS candidates and a greedy sketch-space mixture with residual re-search (see the module docstring)."""
    k = int(store.k or 0)
    tz = target.sketches(family, k)
    tz = {n: z for n, z in tz.items() if float(np.abs(z).sum()) > 0}
    if not tz or not k:
        return None
    names = list(tz)
    pos = {n: i for i, n in enumerate(names)}
    k2 = k * k
    y = np.concatenate([tz[n].astype(np.float64).ravel() for n in names])
    energy = np.array([float(np.sum(tz[n].astype(np.float64) ** 2)) for n in names])
    t2 = float(y @ y)
    dim = int(store.dim or 0)
    pool: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def search(z: dict[str, np.ndarray]) -> None:
        vec = delta_vector(z, dim)
        # both signs: FAISS ranks by inner product, and a component merged with a negative weight
        # anti-correlates with the target
        hits = [h for v in (vec, -vec) for h in store.search(family, VIEW, v, th.overfetch + len(exclude))]
        new = list(dict.fromkeys(i for i, _ in hits if i not in exclude and i not in pool))
        pool.update(_sketch_columns(store, new, pos, k2, y.size))

    search(tz)
    if not pool:
        return None
    chosen_ids: list[int] = []
    tau = SKETCH_TAU_MIN
    for step in range(th.max_components):
        ids = list(pool)
        x = np.stack([pool[i][0] for i in ids], axis=1)
        g, b = x.T @ x, x.T @ y
        chosen = [ids.index(i) for i in chosen_ids]
        sc = partial_scores(g, b, t2, chosen)
        if step == 0:
            tau = max(SKETCH_TAU_MIN, SKETCH_TAU_SIGMAS * _robust_sigma(sc))
        sc = np.where(np.isnan(sc), -np.inf, np.abs(sc))
        j = int(np.argmax(sc))
        if not np.isfinite(sc[j]) or sc[j] < tau:
            break
        chosen_ids.append(ids[j])
        sel = [ids.index(i) for i in chosen_ids]
        coef = least_squares(g, b, sel)
        r = y - x[:, sel] @ coef
        search({n: r[m * k2:(m + 1) * k2].reshape(k, k) for n, m in pos.items()})
    ids = list(pool)
    x = np.stack([pool[i][0] for i in ids], axis=1)
    pres = np.stack([pool[i][1] for i in ids])
    g, b = x.T @ x, x.T @ y
    t2s = pres.astype(np.float64) @ energy
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.abs(b) / np.sqrt(t2s * np.diag(g))
    cos = np.where((t2s >= MIN_TARGET_SHARE * t2) & np.isfinite(cos), cos, -1.0)
    order = [ids[j] for j in np.argsort(-cos, kind="stable") if ids[j] not in chosen_ids]
    shortlist = chosen_ids + order[: max(0, th.shortlist - len(chosen_ids))]
    sel = [ids.index(i) for i in shortlist]
    stats = Stats(shortlist, g[np.ix_(sel, sel)], b[sel], t2, t2s[sel], pres[sel].sum(axis=1), False)
    return SketchResult(family, shortlist, stats, len(pool))


def _robust_sigma(scores: np.ndarray) -> float:
    """1.4826 × median |score|: the spread of the (mostly unrelated) pool, robust to the few real matches."""
    s = np.abs(scores[np.isfinite(scores)])
    return float(1.4826 * np.median(s)) if s.size else 0.0


# --------------------------------------------------------------------------- decision


def decide(stats: Stats, cals: list[calib.Calibration], norms2: np.ndarray, th: Thresholds) -> dict[str, Any]:
    """Choose the significant components and estimate their weights.

    Args:
        stats: statistics of the short list.
        cals: each candidate's family calibration.
        norms2: each candidate's ‖ΔW‖² over all its modules.
        th: thresholds.

    Returns:
        ``{"chosen", "coef", "explained", "cosine", "score", "fpr", "equivalents"}``
        (per-candidate arrays indexed like ``stats.ids``).
    """
    g, b, t2 = stats.g, stats.b, stats.t2
    diag = np.diag(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = b / np.sqrt(stats.t2_shared * diag)
    cos = np.where(np.isfinite(cos), cos, np.nan)
    first = np.where(stats.t2_shared >= MIN_TARGET_SHARE * t2, cos, np.nan)

    def significant(i: int, score: float, kind: str) -> bool:
        return abs(score) >= th.min_cosine and cals[i].fpr(abs(score), kind) <= th.max_fpr

    # Terms enter on size alone and are judged once the model is complete (drop-one partial
    # scores): a merge component's plain cosine with the target is small (one of four equal
    # parts: ~0.5), which in a family of look-alike LoRAs is not significant on its own, while
    # given the other components it explains its part of the target almost exactly.
    chosen = greedy_select(g, b, t2, lambda i, s, p: abs(s) >= th.min_cosine, th.max_components, first=first)
    chosen = prune(g, b, t2, chosen, lambda i, s, n: significant(i, s, "partial"))
    if len(chosen) == 1 and not (np.isfinite(cos[chosen[0]]) and significant(chosen[0], abs(cos[chosen[0]]), "cosine")):
        chosen = []
    n = len(stats.ids)
    score = np.where(np.isfinite(cos), np.abs(cos), 0.0)
    kind = ["cosine"] * n
    if len(chosen) > 1:
        for i, v in drop_one_scores(g, b, t2, chosen).items():
            score[i] = abs(v) if np.isfinite(v) else 0.0
            kind[i] = "partial"
    fpr = np.array([cals[i].fpr(score[i], kind[i]) for i in range(n)])
    gf, bf = stats.fit_arrays(chosen)
    sub = list(range(len(chosen)))
    coef = least_squares(gf, bf, sub)
    explained = explained_share(gf, bf, t2, sub, coef) if chosen else 0.0
    eq: dict[int, list[int]] = {}
    for i in chosen:
        for j in range(n):
            if j == i or j in chosen or diag[i] <= 0 or diag[j] <= 0:
                continue
            if g[i, j] / math.sqrt(diag[i] * diag[j]) >= EQUIVALENT_COSINE and abs(diag[j] / diag[i] - 1) <= 2 * EQUIVALENT_NORM:
                eq.setdefault(i, []).append(j)
    return {"chosen": chosen, "coef": coef, "explained": explained, "cosine": cos, "score": score, "kind": kind,
            "fpr": fpr, "equivalents": eq, "norms2": norms2}


# --------------------------------------------------------------------------- one target file


def candidate_families(store: Any, target: Target) -> list[str]:
    """The families a query of the target looks in (``search.families_for``: its own, and known
    families whose tables hold all its modules), plus, for ``unknown:`` families, stored unknown
    families sharing module names.

    An ``unknown:`` family is a hash of the module set, so a module subset (or a
    checkpoint that changed more modules) of the same model lands in another
    one; their canonical names are the same flattened paths, so they compare.
    """
    from lorasearch.search import families_for

    out = families_for(store, target.family, target.shapes)
    if target.family.startswith("unknown:"):
        names = set(target.shapes)
        for f in store.families():
            if not f.startswith("unknown:") or f == target.family:
                continue
            rows = store.list(family=f, limit=1)
            sf = store.sketch_file(rows[0]["id"]) if rows else None
            if sf is not None and names & set(sf.names):
                out.append(f)
    return out


def _sq_total(store: Any, i: int) -> float:
    """``‖ΔW‖²`` of a stored LoRA estimated from its stored sketch norms (no file copy to be exact with)."""
    sf = store.sketch_file(i)
    return float(np.sum(np.asarray(sf.norms, dtype=np.float64) ** 2)) if sf is not None else 0.0


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """One BLAS thread while attributing.

    Every product here is rank-sized (r×p by p×r); a second OpenBLAS thread only adds
    synchronisation, and on a busy 2-core machine a query took 5.0 s instead of 0.14 s
    (measured, real SD1.5 target against 57 stored LoRAs). The limit is restored on exit.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def attribute_target(store: Any, target: Target, th: Thresholds | None = None, exclude: Iterable[int] = (),
                     cache: DeltaCache | None = None) -> dict[str, Any]:
    """Attribute one target file (see the module docstring).

    Returns:
        ``{"path", "kind", "family", "verdict", "explained", "matches", "nearest", "candidates",
        "exact", "calibration", ...}``.
    """
    with _one_blas_thread():
        return _attribute_target(store, target, th, exclude, cache)


def _attribute_target(store: Any, target: Target, th: Thresholds | None, exclude: Iterable[int],
                      cache: DeltaCache | None) -> dict[str, Any]:
    th = th or Thresholds()
    cache = cache if cache is not None else _CACHE
    ex = {int(i) for i in exclude}
    out: dict[str, Any] = {"path": target.label, "kind": target.kind, "family": target.family, "verdict": "none",
                           "explained": 0.0, "matches": [], "nearest": None, "modules": len(target.shapes),
                           "candidates": 0, "exact": False, **target.info}
    fams = candidate_families(store, target)
    if not fams:
        out["message"] = f"no indexed LoRAs of family {target.family}"
        return out
    results = [r for r in (sketch_stage(store, target, f, th, ex) for f in fams) if r is not None]
    if not results:
        out["message"] = f"no indexed LoRA of family {target.family} shares a module with the target"
        return out
    out["candidates"] = sum(r.pool for r in results)
    ids = list(dict.fromkeys(i for r in results for i in r.shortlist))
    rows = store.get_many(ids)
    lds = calib.load_blobs(store, ids, rows, cache)
    if lds is not None:
        stats = exact_stats(target, ids, lds)
    else:  # no file copies: decide in sketch space, within the best family only (sketch seeds differ by family)
        best = max(results, key=lambda r: float(np.nanmax(np.abs(r.stats.b) / np.sqrt(np.maximum(np.diag(r.stats.g), 1e-300)))))
        stats, ids = best.stats, best.shortlist
    cal_by_family = {f: calib.get_calibration(store, f, cache) for f in {rows[i]["family"] for i in ids if i in rows}}
    cals = [cal_by_family[rows[i]["family"]] for i in ids]
    if lds is not None:  # exact, from the factors (cached on each LoraDelta)
        norms2 = np.array([sum(module_sq_norms(ld).values()) for ld in lds])
    else:
        norms2 = np.array([_sq_total(store, i) for i in ids])
    dec = decide(stats, cals, norms2, th)
    out["exact"] = stats.exact
    out["calibration"] = {f: c.summary() for f, c in cal_by_family.items()}
    chosen = dec["chosen"]
    out["verdict"] = "none" if not chosen else ("derived" if len(chosen) == 1 else "merged")
    out["explained"] = float(dec["explained"])
    coef = dict(zip(chosen, dec["coef"].tolist()))
    order = sorted(chosen, key=lambda i: -abs(coef[i]) * math.sqrt(max(stats.g[i, i], 0.0)))
    out["matches"] = [_match(rows, ids, stats, dec, i, coef[i]) for i in order]
    rest = [i for i in range(len(ids)) if i not in chosen and np.isfinite(dec["cosine"][i])]
    if rest:
        j = max(rest, key=lambda i: dec["score"][i])
        out["nearest"] = _match(rows, ids, stats, dec, j, None)
    return out


def _match(rows: dict[int, dict[str, Any]], ids: list[int], stats: Stats, dec: dict[str, Any], i: int,
           coef: float | None) -> dict[str, Any]:
    lid = ids[i]
    row = rows.get(lid, {})
    n2_in = float(stats.g[i, i])
    cos = dec["cosine"][i]
    m = {
        "id": lid, "name": row.get("name"), "source": row.get("source"), "path": row.get("path"),
        "repo": row.get("repo"), "family": row.get("family"),
        "cosine": None if not np.isfinite(cos) else float(cos),
        "coefficient": None if coef is None else float(coef),
        "fpr": float(dec["fpr"][i]), "score": float(dec["score"][i]), "score_kind": dec["kind"][i],
        "shared_modules": int(stats.shared[i]),
        "target_share": float(stats.t2_shared[i] / stats.t2) if stats.t2 > 0 else 0.0,
        "module_share": float(min(1.0, n2_in / dec["norms2"][i])) if dec["norms2"][i] > 0 else None,
        "exact": stats.exact,
    }
    if i in dec["equivalents"]:
        m["equivalents"] = [ids[j] for j in dec["equivalents"][i]]
    return m


# --------------------------------------------------------------------------- what a TARGET is


@dataclass
class TargetFile:
    """One file (or PEFT / diffusers folder) of a target, before it is read."""

    label: str
    path: Path
    kind: str  # lora | checkpoint | refused


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def enumerate_folder(folder: Path, label_root: str | None = None) -> list[TargetFile]:
    """Every LoRA (file or PEFT folder) and checkpoint (file or diffusers folder) under a folder."""
    from lorasearch.formats.load import find_loras
    from lorasearch.formats.safetensors_file import PICKLE_SUFFIXES

    def label(p: Path) -> str:
        rel = p.relative_to(folder).as_posix()
        return f"{label_root}/{rel}" if label_root else str(p)

    pipelines = [d for d in [folder, *sorted(x for x in folder.rglob("*") if x.is_dir())]
                 if not _hidden(d, folder) and is_diffusers_folder(d)]
    out = [TargetFile(label(d) if d != folder else (label_root or str(d)), d, "checkpoint") for d in pipelines]
    for p in find_loras(folder):
        if _hidden(p, folder) or any(p == d or d in p.parents for d in pipelines):
            continue
        if p.suffix.lower() in PICKLE_SUFFIXES:
            out.append(TargetFile(label(p), p, "refused"))
        elif p.is_dir():
            out.append(TargetFile(label(p), p, "lora"))
        else:
            out.append(TargetFile(label(p), p, _file_kind(p)))
    return out


def _file_kind(p: Path) -> str:
    try:
        return "checkpoint" if file_is_checkpoint(p) else "lora"
    except BadInput:
        return "lora"  # load_lora gives the precise reason


def local_files(path: Path) -> list[TargetFile]:
    """A local TARGET: a LoRA file, PEFT folder, checkpoint file or diffusers folder, or a folder of them."""
    from lorasearch.formats.load import PEFT_WEIGHTS
    from lorasearch.formats.safetensors_file import refuse_pickle_path

    if not path.exists():
        raise BadInput(f"{path}: no such file or folder", code="not_found")
    if path.is_file():
        refuse_pickle_path(path)
        return [TargetFile(str(path), path, _file_kind(path))]
    if (path / PEFT_WEIGHTS).is_file():
        return [TargetFile(str(path), path, "lora")]
    if is_diffusers_folder(path) or any(path.glob("diffusion_pytorch_model*.safetensors")):
        return [TargetFile(str(path), path, "checkpoint")]
    files = enumerate_folder(path)
    if not files:
        raise BadInput(f"{path}: no LoRA or checkpoint .safetensors under this folder", code="not_a_lora")
    return files


def hub_files(spec: str, endpoint: str | None, cache_dir: str | Path | None) -> tuple[str, list[TargetFile], list[str]]:
    """An ``hf:owner/name[@rev]`` TARGET fetched through huggingface_hub (indexer.sources), pinned to its commit.

    Returns:
        (``hf:repo@sha``, the files, the model card's ``base_model`` ids).
    """
    from indexer.sources import download_repo, hub_error, oversized_files, parse_hf, resolve_endpoint
    from lorasearch.formats.safetensors_file import DEFAULT_MAX_FILE_BYTES

    ep = resolve_endpoint(endpoint)
    try:
        repo, rev = parse_hf(spec)
    except ValueError as exc:
        raise BadInput(str(exc), code="bad_source") from None
    try:
        big = oversized_files(repo, rev, ep, DEFAULT_MAX_FILE_BYTES)
        folder, sha = download_repo(repo, rev, ep, cache_dir, sorted(big))
    except Exception as exc:  # noqa: BLE001 - every hub failure is one line
        raise BadInput(hub_error(spec, repo, rev, ep, exc), code="hub_error") from None
    root = f"hf:{repo}@{sha}"
    files = enumerate_folder(folder, root)
    if big:
        _log(f"{root}: not downloaded (over the size cap): {', '.join(sorted(big))}")
    if not files:
        raise BadInput(f"{root}: no LoRA or checkpoint .safetensors files in the repository", code="not_a_lora")
    return root, files, read_model_card_base(folder / "README.md")


def fetch_base(spec: str, endpoint: str | None, cache_dir: str | Path | None) -> Path:
    """A base model given as a hub id (``owner/name[@rev]`` or ``hf:...``): its component weights, or its single file.

    Only what ΔW needs is fetched: the diffusers component weights
    (``unet/``, ``transformer/``, ``text_encoder*/``), or, for a single-file
    repo, its one top-level ``.safetensors``.
    """
    from huggingface_hub import HfApi, snapshot_download

    from indexer.sources import hub_error, parse_hf, quiet_hub, resolve_endpoint

    ep = resolve_endpoint(endpoint)
    try:
        repo, rev = parse_hf(spec)
    except ValueError as exc:
        raise BadInput(f"--base {spec!r}: not a local path and not a hub id ({exc})", code="bad_base") from None
    try:
        info = HfApi(endpoint=ep).model_info(repo, revision=rev)
        names = [s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
        comps = [n for n in names if n.split("/")[0] in COMPONENTS and n.count("/") == 1]
        top = [n for n in names if "/" not in n]
        want = comps or top
        if not want:
            raise BadInput(f"--base {spec}: the repository holds no .safetensors weights", code="bad_base")
        if not comps and len(top) > 1:
            raise BadInput(f"--base {spec}: several single-file checkpoints ({', '.join(top)}); "
                           "download the right one and give its path", code="bad_base")
        with quiet_hub():
            folder = Path(snapshot_download(repo, revision=info.sha or rev, allow_patterns=want, endpoint=ep,
                                            cache_dir=str(cache_dir) if cache_dir is not None else None))
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"--base: {hub_error(spec, repo, rev, ep, exc)}", code="hub_error") from None
    return folder if comps else folder / top[0]


def load_target(tf: TargetFile, base: str | None, endpoint: str | None, cache_dir: str | Path | None) -> Target:
    """Read one target file into a Target (a checkpoint needs a base)."""
    from lorasearch.formats import load_lora

    if tf.kind == "refused":
        raise BadInput(f"{tf.label}: refused: pickled weights are never unpickled", code="pickle_refused")
    if tf.kind == "lora":
        return Target.from_lora(load_lora(tf.path), tf.label)
    if not base:
        raise BadInput(f"{tf.label}: a full checkpoint: give --base (the model it was fine-tuned from) to form ΔW",
                       code="needs_base")
    bpath = Path(base).expanduser()
    if not bpath.exists():
        bpath = fetch_base(base, endpoint, cache_dir)
    t = Target.from_checkpoint(checkpoint_delta(tf.path, bpath), tf.label)
    t.info["base"] = base
    return t


# --------------------------------------------------------------------------- the entry point


def attribute(store: Any, target: str | Path | LoraDelta, base: str | None = None, *,
              thresholds: Thresholds | None = None, endpoint: str | None = None,
              cache_dir: str | Path | None = None, exclude_ids: Iterable[int] = (),
              cache: DeltaCache | None = None) -> dict[str, Any]:
    """Does a target derive from indexed LoRAs, which, at what weight, how sure?

    Args:
        store: an open ``Store``.
        target: a LoRA file, PEFT folder, checkpoint file, diffusers folder, a
            folder of those, ``hf:owner/name[@rev]``, or an already read LoraDelta.
        base: the base model of a full checkpoint (local path or hub id); a hub
            target's model card ``base_model`` is used when not given.
        thresholds: verdict thresholds (defaults: ``Thresholds()``).
        endpoint: hub endpoint (default ``HF_ENDPOINT`` or huggingface.co).
        cache_dir: huggingface_hub cache folder.
        exclude_ids: stored LoRAs not to consider (leave-one-out benchmarks).
        cache: loaded-candidate cache.

    Returns:
        ``{"target", "family", "verdict", "explained", "matches": [{"id", "name", "source", "path",
        "cosine", "coefficient", "fpr", ...}], "per_file": [...], "base_model", "thresholds"}``.

    Raises:
        BadInput: unreadable target, checkpoint without a base, hub failure.
    """
    th = thresholds or Thresholds()
    card: list[str] = []
    if isinstance(target, LoraDelta):
        label = str(target.source.get("path") or "<LoraDelta>")
        loaded = [(TargetFile(label, Path(label), "lora"), Target.from_lora(target, label))]
        files: list[TargetFile] = []
    else:
        spec = str(target)
        if spec.startswith("hf:"):
            label, files, card = hub_files(spec, endpoint, cache_dir)
        else:
            label, files = spec, local_files(Path(spec).expanduser())
        loaded = []
    use_base = base or (card[0] if card else None)
    per_file: list[dict[str, Any]] = []
    for tf, t in loaded:
        per_file.append(attribute_target(store, t, th, exclude_ids, cache))
    for tf in files:
        try:
            t = load_target(tf, use_base, endpoint, cache_dir)
        except BadInput as exc:
            if len(files) == 1:
                raise
            per_file.append({"path": tf.label, "kind": tf.kind, "family": None, "verdict": "none", "explained": 0.0,
                             "matches": [], "error": {"code": exc.code, "message": str(exc)}})
            continue
        per_file.append(attribute_target(store, t, th, exclude_ids, cache))
    return summarise(label, per_file, card, use_base, th)


def summarise(label: str, per_file: list[dict[str, Any]], card: list[str], base: str | None,
              th: Thresholds) -> dict[str, Any]:
    """The answer for a whole target: the strongest file's verdict, every file's matches."""
    ok = [f for f in per_file if "error" not in f]
    primary = max(ok or per_file, key=lambda f: (VERDICT_RANK[f["verdict"]], f.get("explained", 0.0)))
    matches: dict[int, dict[str, Any]] = {}
    for f in [primary, *[x for x in per_file if x is not primary]]:
        for m in f.get("matches", []):
            if m["id"] not in matches or m["fpr"] < matches[m["id"]]["fpr"]:
                matches[m["id"]] = {**m, "file": f["path"]}
    return {"target": label, "family": primary.get("family"), "verdict": primary["verdict"],
            "explained": float(primary.get("explained", 0.0)), "matches": list(matches.values()),
            "per_file": per_file, "base_model": card, "base": base, "thresholds": asdict(th)}
