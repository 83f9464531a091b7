"""Clustering of LoRA views and image baselines against style labels (issue 7).

- ``metrics``: clustering and retrieval scores, bootstrap intervals, agreement (CKA, kNN overlap);
- ``algorithms``: k-means / agglomerative / HDBSCAN over any vectors, optional corpus centering;
- ``views``: per-LoRA vectors of each LoRA view from a store (``delta``, ``style``, ``style:<group>``, ``paper``);
- ``baselines``: image features (``clip``, ``dino``, ``effnet``, ``pixel``) of training or generated images;
- ``evaluate``: labels.csv join and the whole evaluation;
- ``report``: ``report.md``, ``report.html``, scatter PNGs and ``metrics.json``.
"""
from __future__ import annotations
