"""labels.csv, joining it to a store, and the evaluation of every representation.

A representation (a LoRA view or an image baseline in one scenario) is scored
on the labelled LoRAs where it is defined:

- clustering (k-means with k = number of labels, plus agglomerative and
  HDBSCAN): ARI, NMI, AMI, purity against the labels;
- the embedding itself: cosine silhouette of the labels, retrieval
  precision@k and mAP (each LoRA querying the others);
- 95 % bootstrap intervals over LoRAs (the clustering is fitted once; the
  intervals cover which LoRAs were sampled, not clustering randomness);
- each variant raw and with corpus centering (``+centred``).
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lorasearch.cluster import metrics as M
from lorasearch.cluster.algorithms import METHODS, cluster, prepare
from lorasearch.errors import BadInput

LABEL_COLUMNS = ("file", "genre", "style", "seed", "rank", "alpha", "steps", "lr", "format", "subset",
                 "train_images", "generated_images")
REQUIRED = ("file", "genre", "style")
LEVELS = ("genre", "style")
CENTRED = "+centred"
SCORES = ("ari", "nmi", "ami", "purity", "silhouette", "p_at_k", "map")


@dataclass
class Labelled:
    """One labels.csv row joined to a store row.

    Attributes:
        lora_id: store row id.
        row: the CSV row (strings).
        file: absolute path of the LoRA.
        train_images: absolute folder or None.
        generated_images: absolute folder or None.
    """

    lora_id: int
    row: dict[str, str]
    file: Path
    train_images: Path | None = None
    generated_images: Path | None = None
    store_row: dict[str, Any] = field(default_factory=dict)


def read_labels(path: Path) -> list[dict[str, str]]:
    """labels.csv rows.

    Raises:
        BadInput: missing file, or a required column missing, or no rows.
    """
    if not path.is_file():
        raise BadInput(f"{path}: labels file not found", code="not_found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise BadInput(f"{path}: not a labels.csv (missing column {missing[0]!r}; expected {','.join(LABEL_COLUMNS)})",
                           code="bad_labels")
        rows = [dict(r) for r in reader]
    if not rows:
        raise BadInput(f"{path}: no rows", code="bad_labels")
    return rows


def _sha256(path: Path) -> str | None:
    from lorasearch.formats.load import PEFT_WEIGHTS

    w = path / PEFT_WEIGHTS if path.is_dir() else path
    if not w.is_file():
        return None
    h = hashlib.sha256()
    with open(w, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _norm_path(p: str | Path) -> Path:
    p = Path(p).expanduser().resolve()
    return p.parent if p.name == "adapter_model.safetensors" else p


def _folder(base: Path, value: str | None) -> Path | None:
    return (base / value).resolve() if value else None


def join(store: Any, labels_csv: Path, store_rows: Sequence[dict[str, Any]]) -> tuple[list[Labelled], list[str]]:
    """Match labels.csv rows to store rows by resolved path (file or PEFT folder), else by file sha256.

    Args:
        store: an open Store (its sources give every path a LoRA was indexed from).
        labels_csv: the CSV.
        store_rows: live store rows.

    Returns:
        (joined rows in CSV order, CSV files not found in the store).

    Raises:
        BadInput: no row matches.
    """
    rows = read_labels(labels_csv)
    base = labels_csv.resolve().parent
    by_path: dict[Path, int] = {}
    live = {int(r["id"]) for r in store_rows}
    for r in store.execute("SELECT lora_id, path FROM sources"):
        if int(r[0]) in live and r[1]:
            by_path.setdefault(_norm_path(r[1]), int(r[0]))
    by_sha = {r["file_sha256"]: int(r["id"]) for r in store_rows if r.get("file_sha256")}
    srow = {int(r["id"]): r for r in store_rows}
    out: list[Labelled] = []
    missing: list[str] = []
    for r in rows:
        f = _norm_path(base / r["file"])
        lid = by_path.get(f)
        if lid is None and by_sha:
            sha = _sha256(f)
            lid = by_sha.get(sha) if sha else None
        if lid is None:
            missing.append(r["file"])
            continue
        out.append(Labelled(lid, r, f, _folder(base, r.get("train_images")), _folder(base, r.get("generated_images")),
                            srow.get(lid, {})))
    if not out:
        raise BadInput(f"{labels_csv}: none of its {len(rows)} LoRAs is in the store (index them first:"
                       f" `lorasearch index {base} --db DIR`)", code="no_match")
    return out, missing


def default_k(truth: np.ndarray) -> int:
    """precision@k's k: the typical number of other LoRAs sharing a label, at most 10."""
    _, counts = np.unique(truth, return_counts=True)
    return int(max(1, min(10, int(np.median(counts)) - 1)))


def score(x: np.ndarray, truth: np.ndarray, k: int, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Every score of one representation against labels, with bootstrap intervals.

    Args:
        x: n×d prepared vectors (unit rows) of the LoRAs where it is defined.
        truth: n labels.
        k: precision@k's k.
        n_boot: bootstrap resamples (0: no intervals).
        seed: clustering and bootstrap seed.

    Returns:
        ``{"n", "ari", "nmi", "ami", "purity", "silhouette", "p_at_k", "map", "k", "ci": {score: [lo, hi]},
        "algorithms": {method: {"ari", "nmi", "ami", "purity", "clusters"}}}``.
    """
    truth = np.asarray(truth)
    n_labels = len(np.unique(truth))
    preds = {m: cluster(x, n_labels, m, seed) for m in METHODS}
    pred = preds["kmeans"]
    sil = M.silhouette_samples(x, truth)
    pk = M.precision_at_k_samples(x, truth, k)
    ap = M.average_precision_samples(x, truth)
    out: dict[str, Any] = {
        "n": int(len(truth)), "ari": M.ari(truth, pred), "nmi": M.nmi(truth, pred), "ami": M.ami(truth, pred),
        "purity": M.purity(truth, pred), "silhouette": float(sil.mean()), "p_at_k": float(pk.mean()),
        "map": float(ap.mean()), "k": int(k),
    }
    out["algorithms"] = {m: {"ari": M.ari(truth, p), "nmi": M.nmi(truth, p), "ami": M.ami(truth, p),
                             "purity": M.purity(truth, p), "clusters": int(len(np.unique(p)))}
                         for m, p in preds.items()}
    if n_boot > 0:
        # pair-counting scores see a repeated LoRA as a free agreeing pair, which biases a
        # with-replacement bootstrap upwards: they use the distinct LoRAs of each resample
        # (~63 % subsample: a conservative, wider interval); per-LoRA scores resample normally
        u = np.unique
        stats: dict[str, Callable[[np.ndarray], float]] = {
            "ari": lambda i: M.ari(truth[u(i)], pred[u(i)]), "nmi": lambda i: M.nmi(truth[u(i)], pred[u(i)]),
            "ami": lambda i: M.ami(truth[u(i)], pred[u(i)]), "purity": lambda i: M.purity(truth[u(i)], pred[u(i)]),
            "silhouette": lambda i: float(sil[i].mean()), "p_at_k": lambda i: float(pk[i].mean()),
            "map": lambda i: float(ap[i].mean()),
        }
        out["ci"] = {s: list(M.bootstrap_ci(fn, len(truth), n_boot, seed)) for s, fn in stats.items()}
    return out


@dataclass
class Rep:
    """A representation to score: vectors over all joined LoRAs and where it is defined."""

    name: str
    x: np.ndarray
    mask: np.ndarray
    note: str = ""
    centred: np.ndarray | None = None
    kind: str = "view"  # view | baseline


def variants(rep: Rep, centre: str) -> list[tuple[str, np.ndarray]]:
    """(name, prepared vectors on the masked rows) for the raw and/or centred variant.

    Args:
        rep: the representation.
        centre: ``none`` | ``yes`` | ``both``.
    """
    xs = rep.x[rep.mask]
    out = []
    if centre in ("none", "both"):
        out.append((rep.name, prepare(xs, centre=False)))
    if centre in ("yes", "both"):
        c = rep.centred[rep.mask] if rep.centred is not None else xs
        out.append((rep.name + CENTRED, prepare(c, centre=rep.centred is None)))
    return out


def evaluate(reps: Sequence[Rep], labels: Sequence[dict[str, str]], level: str, centre: str = "both",
             n_boot: int = 500, seed: int = 0, subset: np.ndarray | None = None) -> dict[str, Any]:
    """Score every representation at one label level.

    Args:
        reps: representations over the same joined LoRAs, in the same order as ``labels``.
        labels: the joined CSV rows.
        level: ``genre`` | ``style``.
        centre: ``none`` | ``yes`` | ``both``.
        n_boot: bootstrap resamples.
        seed: seed.
        subset: optional bool mask restricting every representation to some LoRAs.

    Returns:
        ``{"level", "n", "views": {...}, "baselines": {...}, "notes": {name: note}}``.
    """
    truth_all = np.asarray([r[level] for r in labels])
    keep = np.ones(len(labels), bool) if subset is None else np.asarray(subset, bool)
    out: dict[str, Any] = {"level": level, "n": int(keep.sum()), "views": {}, "baselines": {}, "notes": {}}
    for rep in reps:
        m = rep.mask & keep
        _, counts = np.unique(truth_all[m], return_counts=True)
        if m.sum() < 3 or len(counts) < 2 or counts.max() < 2:
            why = f"defined on {int(m.sum())} LoRAs" if m.sum() < 3 else f"{len(counts)} {level} label(s), at most {counts.max()} LoRA(s) each"
            out["notes"][f"{rep.name} ({level})"] = (rep.note + "; " if rep.note else "") + f"not scored: {why}"
            continue
        sub = Rep(rep.name, rep.x, m, rep.note, rep.centred, rep.kind)
        truth = truth_all[m]
        k = default_k(truth)
        for name, xs in variants(sub, centre):
            res = score(xs, truth, k, n_boot, seed)
            res["note"] = rep.note
            out["views" if rep.kind == "view" else "baselines"][name] = res
        if rep.note:
            out["notes"][rep.name] = rep.note
    return out


def agreement(reps: Sequence[Rep], k: int = 10) -> dict[str, dict[str, float]]:
    """Linear CKA and kNN overlap between every LoRA view and every baseline (raw variants, shared LoRAs).

    Returns:
        ``{"<view> vs <baseline>": {"cka", "knn_overlap", "n"}}``.
    """
    views = [r for r in reps if r.kind == "view"]
    bases = [r for r in reps if r.kind == "baseline"]
    out: dict[str, dict[str, float]] = {}
    for v in views:
        for b in bases:
            m = v.mask & b.mask
            if m.sum() < 4:
                continue
            xv, xb = prepare(v.x[m]), prepare(b.x[m])
            out[f"{v.name} vs {b.name}"] = {"cka": M.linear_cka(xv, xb), "knn_overlap": M.knn_overlap(xv, xb, k),
                                         "n": int(m.sum())}
    return out
