"""Indexing: sources (files, folders, Hugging Face Hub) -> workers (read + embed) -> the store, resumably.

- ``indexer.sources``: SOURCE strings -> ``WorkItem`` / ``Failure`` (``expand_source``, ``expand_sources``).
- ``indexer.pipeline``: ``run_index(sources, db, workers=1, ...)`` -> ``{"added", "duplicates", "failed", "job", ...}``.
- ``indexer.jobs``: the ``jobs`` / ``job_items`` tables that let an interrupted run resume.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Failure", "JobTable", "WorkItem", "expand_source", "expand_sources", "run_index"]

_WHERE = {"run_index": "indexer.pipeline", "JobTable": "indexer.jobs", "Failure": "indexer.sources",
          "WorkItem": "indexer.sources", "expand_source": "indexer.sources", "expand_sources": "indexer.sources"}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the sources does not load the store (faiss) too.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
