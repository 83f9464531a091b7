"""Clustering of any view's vectors: k-means, agglomerative, HDBSCAN, with optional corpus centering.

Vectors are compared by cosine: rows are scaled to unit norm before clustering
(Euclidean distance between unit rows is a monotone function of cosine), so
k-means is spherical-like and Ward linkage works on cosine geometry.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans
from threadpoolctl import threadpool_limits

from lorasearch.cluster.metrics import unit_rows

METHODS: tuple[str, ...] = ("kmeans", "agglomerative", "hdbscan")


def prepare(x: np.ndarray, centre: bool = False) -> np.ndarray:
    """The vectors as clustered: optionally minus the corpus mean, then unit rows.

    Centering removes what every LoRA of the collection shares (the paper's PCA
    centres its data); whether that helps is measured per view.

    Args:
        x: n×d vectors.
        centre: subtract the mean row first.

    Returns:
        float64 n×d unit rows.
    """
    x = np.asarray(x, dtype=np.float64)
    if centre:
        x = unit_rows(x)
        x = x - x.mean(axis=0, keepdims=True)
    return unit_rows(x)


def cluster(x: np.ndarray, n_clusters: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster ids of the rows.

    Args:
        x: n×d vectors (prepared: unit rows).
        n_clusters: clusters wanted (k-means, agglomerative); HDBSCAN finds its own.
        method: ``kmeans`` | ``agglomerative`` | ``hdbscan``.
        seed: k-means seed.

    Returns:
        n int cluster ids (HDBSCAN noise points are all -1, i.e. one extra cluster).

    Raises:
        ValueError: unknown method.
    """
    # one thread: these are small problems, and OpenMP threads spinning on busy cores cost 100x
    with threadpool_limits(1):
        return _cluster(np.asarray(x, dtype=np.float64), n_clusters, method, seed)


def _cluster(x: np.ndarray, n_clusters: int, method: str, seed: int) -> np.ndarray:
    n = len(x)
    k = int(max(1, min(n_clusters, n)))
    if method == "kmeans":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate points -> fewer distinct clusters warning
            return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)
    if method == "agglomerative":
        if n < 2:
            return np.zeros(n, dtype=np.int64)
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x).astype(np.int64)
    if method == "hdbscan":
        if n < 3:
            return np.zeros(n, dtype=np.int64)
        size = int(max(2, min(n // max(k, 1) // 2 or 2, n - 1)))
        return HDBSCAN(min_cluster_size=size, min_samples=1, copy=True).fit_predict(x).astype(np.int64)
    raise ValueError(f"unknown clustering method {method!r} (expected one of {', '.join(METHODS)})")
