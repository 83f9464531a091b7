"""Calibration: the null distribution of attribution scores between unrelated indexed LoRAs.

For one family, a sample of its indexed LoRAs (at most ``MAX_LORAS``, seeded)
gives every pair's exact ΔW cosine over shared modules (the factor-space
Gram matrix, ``mixture.module_gram``). Pairs that may be related are left out:

- **lineage**: the two share a hub repository (any of their recorded sources),
  or a local training folder — the folder that holds the file, one level up
  when that folder is a ``checkpoint-N``/``step-N``/``epoch-N`` folder of a run;
  a folder that was itself the indexed SOURCE (a collection of downloads) is
  not a lineage. Repository-level lineage is deliberately coarse: files of one
  repo are usually checkpoints, variants or re-exports of each other, and a
  pair wrongly left out only makes the null a little smaller;
- **same update**: |exact cosine| > ``NULL_MAX_COSINE`` (0.9): a copy of one
  update whatever its metadata says (a re-upload elsewhere, a conversion, a
  cast: ≥ 0.99). Pairs below it stay in the null even when they look alike:
  LoRAs of one style trained from one base (zoo: up to 0.68) or with one seed
  and sampling stream (zoo paper setting: up to 0.85) are unrelated, and the
  null must know how high such pairs reach. (An earlier cut at 0.3 left them
  out, so the tail fitted below 0.3 called them significant.)

Two nulls are kept: ``cosine`` (|cosine| of unrelated pairs: the score of a
single-source match) and ``partial`` (the partial cosine of an unrelated LoRA
entering a two-term mixture next to another unrelated one: the score of a
merge component), from random unrelated triples.

``fpr(score)`` is the fraction of the null at or above the score inside the
bulk; above the threshold that the top ``m = max(EMPIRICAL_MIN, ⌈√n⌉)`` null
scores exceed (the usual peaks-over-threshold choice: ~1 % of 10,000 pairs), an
exponential tail fitted to those top scores (maximum-likelihood scale) in
Fisher's z = atanh(|cos|), never below the empirical fraction, so scores beyond
every null value still get a rate below ``1/n``. In z the bounded cosine's tail
near 1 is stretched out, so a score above the whole null (0.93 against a null
reaching 0.85) is not drowned by the bulk's decay; near 0, z ≈ cos. A family
with fewer than ``MIN_NULL`` unrelated pairs uses the prior tail
``exp(−s / PRIOR_SCALE)`` instead (fpr 1e-4 at |cos| ≈ 0.23), again never below
its own empirical fraction.

The result is cached in memory and in ``DIR/calibration/<family>.json``, keyed
by the family's index generation (bumped by every add or delete in the
family), so it is recomputed after index updates and only then.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable

import numpy as np

from lorasearch.attribution.mixture import module_gram
from lorasearch.delta import LoraDelta, NeedsBase

CALIBRATION_VERSION = 2
MAX_LORAS = 200
MAX_TRIPLES = 20_000
NULL_MAX_COSINE = 0.9
LINEAGE_COSINE = 0.3  # two real files of one repository above this are one lineage (benchmarks, dedupe)
MIN_NULL = 50
EMPIRICAL_MIN = 10
PRIOR_SCALE = 0.025
_Z_MAX = 1.0 - 1e-12
_RUN_DIR = re.compile(r"^(checkpoint|ckpt|step|steps|epoch|global[_-]?step|iter|iteration)s?[-_]?\d+$", re.I)


def _log(msg: str) -> None:
    print(f"lorasearch: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tails


def prior_fpr(score: float) -> float:
    """The prior tail used when a family has too few unrelated pairs."""
    return float(math.exp(-abs(score) / PRIOR_SCALE))


def tail_fpr(null: np.ndarray, score: float) -> float:
    """False-positive rate of |score| under a null sample (sorted ascending, absolute values).

    Args:
        null: sorted |scores| of unrelated pairs.
        score: the observed score (its absolute value is used).

    Returns:
        the empirical fraction at or above the score within the bulk (up to the
        threshold ``u`` that the top ``max(EMPIRICAL_MIN, ⌈√n⌉)`` null scores
        exceed), beyond it the exponential tail fitted to those top scores in
        z = atanh(score) (never below the empirical fraction; continuous at ``u``
        and decreasing); the prior when the null is smaller than ``MIN_NULL``.
    """
    s = abs(float(score))
    n = int(null.size)
    k = n - int(np.searchsorted(null, s, side="left")) if n else 0
    emp = k / n if n else 0.0
    if n < MIN_NULL:
        return max(prior_fpr(s), emp)
    m = min(n, max(EMPIRICAL_MIN, int(math.ceil(math.sqrt(n)))))
    if s <= float(null[n - m]):
        return emp
    top = np.arctanh(np.minimum(null[n - m:], _Z_MAX))
    u = float(top[0])
    beta = max(float((top - u).mean()), 1e-12)
    z = math.atanh(min(s, _Z_MAX))
    return float(max((m / n) * math.exp(-(z - u) / beta), emp))


# --------------------------------------------------------------------------- lineage


def _local_lineage(source: str, path: str) -> str | None:
    """The training folder of a locally indexed file, or None when it is a collection root."""
    p = PurePath(path)
    folder = p.parent
    if _RUN_DIR.match(folder.name):
        folder = folder.parent
    if not folder.name:
        return None
    src = PurePath(source) if source else None
    if src is not None and src != p and folder == src:  # files side by side at the root of an indexed folder
        return None
    return f"dir:{folder.as_posix()}"


def lineage_keys(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Lineage keys of one LoRA from its recorded sources (``repo:<id>``, ``dir:<folder>``)."""
    keys: set[str] = set()
    for r in rows:
        if r.get("repo"):
            keys.add(f"repo:{str(r['repo']).lower()}")
        else:
            k = _local_lineage(str(r.get("source") or ""), str(r.get("path") or ""))
            if k:
                keys.add(k)
    return keys


def store_lineage(store: Any, ids: list[int]) -> dict[int, set[str]]:
    """Lineage keys of stored LoRAs by id."""
    out: dict[int, set[str]] = {i: set() for i in ids}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        q = f"SELECT lora_id, source, repo, path FROM sources WHERE lora_id IN ({','.join('?' * len(chunk))})"
        by: dict[int, list[dict[str, Any]]] = {}
        for r in store.execute(q, chunk):
            by.setdefault(int(r["lora_id"]), []).append({"source": r["source"], "repo": r["repo"], "path": r["path"]})
        for i, rows in by.items():
            out[i] = lineage_keys(rows)
    return out


# --------------------------------------------------------------------------- the null


@dataclass
class Calibration:
    """Null distributions of one family.

    Attributes:
        family: the family.
        generation: the family's index generation it was computed at.
        cosine: sorted |cosine| of unrelated pairs.
        partial: sorted |partial cosine| of unrelated mixture terms.
        n_loras: LoRAs sampled.
        n_family: LoRAs of the family in the store.
        excluded_lineage: pairs left out for shared lineage.
        excluded_cosine: pairs left out for |cosine| > NULL_MAX_COSINE.
        exact: scores from the stored files (False: from sketches, noisier, so larger fpr).
    """

    family: str
    generation: int
    cosine: np.ndarray
    partial: np.ndarray
    n_loras: int = 0
    n_family: int = 0
    excluded_lineage: int = 0
    excluded_cosine: int = 0
    exact: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def fpr(self, score: float, kind: str = "cosine") -> float:
        """False-positive rate of a score: ``kind`` ``cosine`` (single source) or ``partial`` (mixture term)."""
        if self.cosine.size < MIN_NULL:  # the partials of a small family are as few pairs, re-used: prior
            return tail_fpr(self.cosine, score)
        null = self.partial if kind == "partial" and self.partial.size >= MIN_NULL else self.cosine
        return tail_fpr(null, score)

    @property
    def method(self) -> str:
        return "family" if self.cosine.size >= MIN_NULL else "prior"

    def summary(self) -> dict[str, Any]:
        """What the attribution answer reports about the calibration."""
        q = (lambda a, p: float(np.quantile(a, p)) if a.size else None)  # noqa: E731
        return {"family": self.family, "generation": self.generation, "method": self.method, "exact": self.exact,
                "loras": self.n_loras, "family_loras": self.n_family, "null_pairs": int(self.cosine.size),
                "null_partials": int(self.partial.size), "excluded_lineage": self.excluded_lineage,
                "excluded_cosine": self.excluded_cosine, "cosine_q99": q(self.cosine, 0.99),
                "cosine_max": float(self.cosine[-1]) if self.cosine.size else None}

    def to_json(self) -> dict[str, Any]:
        d = self.summary()
        d.update({"version": CALIBRATION_VERSION, "cosine": [round(float(x), 7) for x in self.cosine],
                  "partial": [round(float(x), 7) for x in self.partial], "extra": self.extra})
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        return cls(d["family"], int(d["generation"]), np.asarray(d["cosine"], dtype=np.float64),
                   np.asarray(d["partial"], dtype=np.float64), int(d["loras"]), int(d["family_loras"]),
                   int(d["excluded_lineage"]), int(d["excluded_cosine"]), bool(d["exact"]), dict(d.get("extra") or {}))


def family_gram(lds: list[LoraDelta]) -> tuple[np.ndarray, np.ndarray]:
    """Exact pairwise inner products and cosines over shared modules.

    Returns:
        (G n×n inner products summed over shared modules, C n×n cosines over shared
        modules, NaN where two LoRAs share nothing).
    """
    n = len(lds)
    names = sorted({m for ld in lds for m, d in ld.modules.items() if not isinstance(d, NeedsBase)})
    g = np.zeros((n, n))
    shared_sq = np.zeros((n, n))  # [i, j]: ‖X_i‖² over the modules j also has
    for name in names:
        ds = [ld.modules.get(name) for ld in lds]
        shapes = [tuple(d.matrix_shape) if d is not None and not isinstance(d, NeedsBase) else None for d in ds]
        for shape in {s for s in shapes if s is not None}:
            sel = [d if s == shape else None for d, s in zip(ds, shapes)]
            gm = module_gram(sel)
            g += gm
            pres = np.array([d is not None for d in sel], dtype=np.float64)
            shared_sq += np.outer(np.diag(gm), pres)
    den = np.sqrt(shared_sq * shared_sq.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, g / np.where(den > 0, den, 1.0), np.nan)
    return g, cos


def null_from_gram(g: np.ndarray, cos: np.ndarray, related: np.ndarray, rng: np.random.Generator,
                   max_triples: int = MAX_TRIPLES) -> tuple[np.ndarray, np.ndarray]:
    """Null scores from a Gram matrix and a relatedness mask.

    Returns:
        (sorted |cosine| of unrelated pairs, sorted |partial cosine| of unrelated triples).
    """
    n = g.shape[0]
    iu = np.triu_indices(n, 1)
    ok = ~related[iu] & np.isfinite(cos[iu])
    cos_null = np.sort(np.abs(cos[iu][ok]))
    free = ~related & np.isfinite(cos)
    np.fill_diagonal(free, False)
    parts = np.zeros(0)
    if n >= 3 and cos_null.size:
        tri = rng.integers(0, n, size=(10 * max_triples, 3))
        t, a, c = tri.T
        ok = (t != a) & (t != c) & (a != c) & free[t, a] & free[t, c] & free[a, c]
        t, a, c = t[ok][:max_triples], a[ok][:max_triples], c[ok][:max_triples]
        parts = np.concatenate([_two_term_partial(g, t, a, c), _two_term_partial(g, t, c, a)])
        parts = np.abs(parts[np.isfinite(parts)])
    return cos_null, np.sort(parts)


def _two_term_partial(g: np.ndarray, t: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Partial cosine of ``a`` with target ``t`` given ``c`` (``mixture.partial_scores`` for one
    other term, in closed form, for arrays of triples)."""
    gaa, gcc, gac = g[a, a], g[c, c], g[a, c]
    bta, btc, tt = g[t, a], g[t, c], g[t, t]
    with np.errstate(invalid="ignore", divide="ignore"):
        num = bta - gac * btc / gcc
        perp = gaa - gac * gac / gcc
        r2 = tt - btc * btc / gcc
        return num / np.sqrt(r2 * perp)


# --------------------------------------------------------------------------- store-level cache


_MEMO: dict[tuple[str, str], Calibration] = {}
_LOCK = threading.Lock()


def family_generation(store: Any, family: str) -> int:
    """The generation at which the family's delta index last changed (store generation if unknown)."""
    rows = store.execute("SELECT generation FROM index_state WHERE family=? AND view='delta'", (family,))
    return int(rows[0][0]) if rows else int(store.generation())


def calibration_path(store: Any, family: str) -> Path:
    from lorasearch.store import safe_name

    return Path(store.root) / "calibration" / f"{safe_name(family)}.json"


def get_calibration(store: Any, family: str, cache: Any = None, max_loras: int = MAX_LORAS) -> Calibration:
    """The family's calibration at the store's current state (memory, then file, else computed and saved).

    Args:
        store: an open ``lorasearch.store.Store``.
        family: the family.
        cache: a ``lorasearch.search.DeltaCache`` for the stored file copies.
        max_loras: LoRAs sampled for the null.
    """
    gen = family_generation(store, family)
    key = (str(Path(store.root).resolve()), family)
    with _LOCK:
        hit = _MEMO.get(key)
    if hit is not None and hit.generation == gen:
        return hit
    path = calibration_path(store, family)
    cal = _read(path, gen)
    if cal is None:
        cal = compute_calibration(store, family, gen, cache, max_loras)
        _write(path, cal)
    with _LOCK:
        _MEMO[key] = cal
    return cal


def _read(path: Path, gen: int) -> Calibration | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if int(d.get("version", 0)) != CALIBRATION_VERSION or int(d["generation"]) != gen:
            return None
        return Calibration.from_json(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, cal: Calibration) -> None:
    from lorasearch.store import atomic_write_bytes

    try:
        atomic_write_bytes(path, json.dumps(cal.to_json(), separators=(",", ":")).encode(), "calibration_rename")
    except OSError as exc:  # a read-only store folder: keep it in memory only
        _log(f"could not save calibration to {path}: {exc.strerror or exc}; kept in memory")


def _family_ids(store: Any, family: str) -> list[int]:
    ids: list[int] = []
    offset, page = 0, 1000
    while True:
        rows = store.list(family=family, limit=page, offset=offset)
        ids += [int(r["id"]) for r in rows]
        if len(rows) < page:
            return ids
        offset += page


def _load_many(store: Any, ids: list[int], cache: Any) -> list[LoraDelta] | None:
    """Stored file copies of the LoRAs, or None when any is missing (then sketches are used)."""
    from lorasearch.search import DeltaCache

    cache = cache if cache is not None else DeltaCache()
    return load_blobs(store, ids, store.get_many(ids), cache)


def load_blobs(store: Any, ids: list[int], rows: dict[int, dict[str, Any]], cache: Any) -> list[LoraDelta] | None:
    """The LoRAs ``ids`` loaded from their stored file copies, or None when any copy is missing or damaged.

    Args:
        store: an open store.
        ids: LoRA row ids.
        rows: ``store.get_many(ids)`` (for the sha256 cache keys).
        cache: a ``search.DeltaCache``.
    """
    out = []
    for i in ids:
        path = store.blob_path(i)
        sha = rows.get(i, {}).get("file_sha256")
        if path is None or not sha:
            return None
        try:
            out.append(cache.get(sha, path))
        except Exception:  # noqa: BLE001 - a damaged copy: the caller falls back to sketches
            return None
    return out


def _sketch_gram(store: Any, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise inner products and shared-module cosines from the stored module sketches."""
    sfs = [store.sketch_file(i) for i in ids]
    names = sorted({n for sf in sfs if sf is not None for n in sf.names})
    col = {n: j for j, n in enumerate(names)}
    k = next((sf.sketches.shape[-1] for sf in sfs if sf is not None and sf.sketches.size), 1)
    z = np.zeros((len(ids), len(names), k * k))
    pres = np.zeros((len(ids), len(names)))
    for i, sf in enumerate(sfs):
        if sf is None:
            continue
        for j, n in enumerate(sf.names):
            z[i, col[n]] = np.asarray(sf.sketches[j], dtype=np.float64).ravel()
            pres[i, col[n]] = 1.0
    flat = z.reshape(len(ids), -1)
    g = flat @ flat.T
    sq = (z ** 2).sum(axis=2)
    shared = sq @ pres.T
    den = np.sqrt(shared * shared.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, g / np.where(den > 0, den, 1.0), np.nan)
    return g, cos


def compute_calibration(store: Any, family: str, generation: int, cache: Any = None,
                        max_loras: int = MAX_LORAS) -> Calibration:
    """Compute a family's null from the store (see the module docstring)."""
    ids = _family_ids(store, family)
    seed = int.from_bytes(hashlib.sha256(f"calibration\x1f{family}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(ids, size=min(len(ids), max_loras), replace=False).tolist()) if ids else []
    lds = _load_many(store, sample, cache) if sample else []
    exact = lds is not None
    if sample:
        g, cos = family_gram(lds) if lds is not None else _sketch_gram(store, sample)
    else:
        g = cos = np.zeros((0, 0))
    lin = store_lineage(store, sample)
    n = len(sample)
    related = np.zeros((n, n), dtype=bool)
    ex_lin = ex_cos = 0
    for i in range(n):
        for j in range(i + 1, n):
            if lin[sample[i]] & lin[sample[j]]:
                related[i, j] = related[j, i] = True
                ex_lin += 1
            elif np.isfinite(cos[i, j]) and abs(cos[i, j]) > NULL_MAX_COSINE:
                related[i, j] = related[j, i] = True
                ex_cos += 1
    cos_null, part_null = null_from_gram(g, cos, related, rng)
    return Calibration(family, generation, cos_null, part_null, n, len(ids), ex_lin, ex_cos, exact)


def clear_memo() -> None:
    """Forget in-memory calibrations (tests)."""
    with _LOCK:
        _MEMO.clear()
