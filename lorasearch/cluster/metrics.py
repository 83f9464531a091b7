"""Scores of an embedding against labels: clustering agreement, retrieval, bootstrap intervals, CKA.

Pure array maths: arrays in, numbers or arrays out. Labels may be any
hashable values (strings are fine); vectors are compared by cosine.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn import metrics as skm

NOISE = -1  # HDBSCAN's label for points in no cluster


def _codes(labels: np.ndarray | list) -> np.ndarray:
    """Labels of any type as integer codes 0..c-1."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].ravel()


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
        x: n×d array.

    Returns:
        float64 n×d array.
    """
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def contingency(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Counts of (cluster, label) pairs: clusters × labels.

    Args:
        truth: n labels.
        pred: n cluster ids.

    Returns:
        int64 matrix.
    """
    t, p = _codes(truth), _codes(pred)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def _comb2(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(x * (x - 1) / 2))


def ari(truth: np.ndarray, pred: np.ndarray) -> float:
    """Adjusted Rand index (1 perfect, ~0 chance), from the contingency table (Hubert & Arabie)."""
    c = contingency(truth, pred)
    n = c.sum()
    index, a, b = _comb2(c), _comb2(c.sum(axis=1)), _comb2(c.sum(axis=0))
    total = n * (n - 1) / 2
    expected = a * b / total if total > 0 else 0.0
    top = (a + b) / 2
    if top == expected:  # one cluster and one label, or all singletons: sklearn's convention
        return 1.0
    return float((index - expected) / (top - expected))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def _mi(c: np.ndarray) -> float:
    n = c.sum()
    pij = c / n
    outer = np.outer(c.sum(axis=1), c.sum(axis=0)) / (n * n)
    nz = pij > 0
    return max(float(np.sum(pij[nz] * np.log(pij[nz] / outer[nz]))), 0.0)


def nmi(truth: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mutual information (arithmetic-mean normalisation, as scikit-learn's default)."""
    c = contingency(truth, pred).astype(np.float64)
    ht, hp = _entropy(c.sum(axis=0)), _entropy(c.sum(axis=1))
    if ht == 0 or hp == 0:
        return 1.0 if ht == hp else 0.0
    return float(_mi(c) / ((ht + hp) / 2))


def ami(truth: np.ndarray, pred: np.ndarray) -> float:
    """Adjusted mutual information (1 perfect, ~0 chance), arithmetic normalisation as scikit-learn.

    Uses scikit-learn's expected-MI kernel on our contingency table (its public
    function re-validates the inputs, ~10x slower inside a bootstrap).
    """
    from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information

    c = contingency(truth, pred)
    if c.shape[0] == c.shape[1] == 1 or c.shape[0] == c.shape[1] == int(c.sum()):
        return 1.0
    ht, hp = _entropy(c.sum(axis=0).astype(np.float64)), _entropy(c.sum(axis=1).astype(np.float64))
    emi = float(expected_mutual_information(c, int(c.sum())))
    denom = (ht + hp) / 2 - emi
    eps = np.finfo(np.float64).eps
    denom = min(denom, -eps) if denom < 0 else max(denom, eps)
    return float((_mi(c.astype(np.float64)) - emi) / denom)


def purity(truth: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of points whose cluster's majority label is their own label.

    Args:
        truth: n true labels.
        pred: n cluster ids.

    Returns:
        purity in (0, 1].
    """
    table = contingency(truth, pred)
    return float(table.max(axis=1).sum() / table.sum())


def silhouette_samples(x: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-point cosine silhouette of the true labels in the embedding (NaN-free; zeros if undefined).

    Args:
        x: n×d vectors.
        truth: n labels.

    Returns:
        n values in [-1, 1].
    """
    t = _codes(truth)
    if len(np.unique(t)) < 2 or len(np.unique(t)) >= len(t):
        return np.zeros(len(t))
    return skm.silhouette_samples(unit_rows(x), t, metric="cosine")


def silhouette(x: np.ndarray, truth: np.ndarray) -> float:
    """Mean cosine silhouette of the true labels (how well the labels are separated in the space)."""
    return float(np.mean(silhouette_samples(x, truth)))


def _sim_excluding_self(x: np.ndarray) -> np.ndarray:
    u = unit_rows(x)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return s


def precision_at_k_samples(x: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Per-query precision@k of cosine retrieval, each point querying all others.

    Args:
        x: n×d vectors.
        truth: n labels.
        k: neighbours per query (capped at n - 1).

    Returns:
        n values in [0, 1].
    """
    t = _codes(truth)
    k = int(max(1, min(k, len(t) - 1)))
    s = _sim_excluding_self(x)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return (t[top] == t[:, None]).mean(axis=1)


def average_precision_samples(x: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-query average precision of cosine retrieval over all other points.

    Queries with no other point of their label get 0 (they cannot be retrieved correctly).

    Args:
        x: n×d vectors.
        truth: n labels.

    Returns:
        n values in [0, 1].
    """
    t = _codes(truth)
    n = len(t)
    s = _sim_excluding_self(x)
    order = np.argsort(-s, axis=1, kind="stable")[:, : n - 1]  # self (at -inf) is last
    rel = (t[order] == t[:, None]).astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, n)[None, :]
    n_rel = rel.sum(axis=1)
    return np.divide((prec * rel).sum(axis=1), n_rel, out=np.zeros(n), where=n_rel > 0)


def precision_at_k(x: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean precision@k of cosine retrieval (leave-one-out)."""
    return float(np.mean(precision_at_k_samples(x, truth, k)))


def mean_average_precision(x: np.ndarray, truth: np.ndarray) -> float:
    """Mean average precision of cosine retrieval (leave-one-out)."""
    return float(np.mean(average_precision_samples(x, truth)))


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 500, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over n items resampled with replacement.

    Args:
        stat: maps an index array (length n, with repeats) to the statistic.
        n: number of items.
        n_boot: resamples.
        seed: RNG seed (intervals are reproducible).
        level: coverage.

    Returns:
        (low, high).
    """
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))


def _centre_gram(k: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return h @ k @ h


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same n items.

    Invariant to orthogonal transforms and isotropic scaling of either side; 1 for
    identical (up to those) representations. Computed from n×n Gram matrices, so
    wide features cost nothing extra.

    Args:
        x: n×d1.
        y: n×d2.

    Returns:
        CKA in [0, 1] (NaN when either side is constant).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError("CKA needs the same items on both sides")
    kx, ky = _centre_gram(x @ x.T), _centre_gram(y @ y.T)
    den = np.sqrt(np.sum(kx * kx) * np.sum(ky * ky))
    return float(np.sum(kx * ky) / den) if den > 0 else float("nan")


def knn_overlap(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean fraction of shared cosine k-nearest neighbours between two representations.

    Args:
        x: n×d1.
        y: n×d2 (same items, same order).
        k: neighbours (capped at n - 1).

    Returns:
        overlap in [0, 1] (chance ≈ k / (n - 1)).
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError("kNN overlap needs the same items on both sides")
    k = int(max(1, min(k, n - 1)))
    a = np.argsort(-_sim_excluding_self(x), axis=1, kind="stable")[:, :k]
    b = np.argsort(-_sim_excluding_self(y), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))
