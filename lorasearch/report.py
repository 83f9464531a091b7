"""JSON-ready summaries of LoraDeltas and comparisons (the CLI/API contracts)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from lorasearch.delta import LoraDelta, NeedsBase
from lorasearch.frobenius import Comparison


def info_dict(ld: LoraDelta) -> dict[str, Any]:
    """``lorasearch info --json`` for one LoRA.

    Returns:
        the contract keys (path, format, family, modules, rank, dtype, needs_base,
        file_sha256, autov3, metadata) plus reader findings under ``reader``.
    """
    dtypes = ld.metadata.get("dtypes", [])
    needs = Counter(d.method for d in ld.modules.values() if isinstance(d, NeedsBase))
    kinds = Counter(d.kind for d in ld.modules.values())
    reader = {k: v for k, v in ld.metadata.items() if k not in ("dtypes",)}
    return {
        "path": ld.source.get("path"),
        "format": ld.format,
        "family": ld.family,
        "modules": len(ld.modules),
        "rank": ld.rank_range(),
        "dtype": ",".join(dtypes),
        "needs_base": ld.needs_base,
        "needs_base_reasons": dict(needs) | ({"dora": len(ld.magnitudes)} if ld.magnitudes else {}),
        "delta_kinds": dict(kinds),
        "file_sha256": ld.source.get("file_sha256"),
        "autov2": ld.source.get("autov2"),
        "autov3": ld.source.get("autov3"),
        "bytes": ld.source.get("bytes"),
        "config": ld.source.get("config"),
        "metadata": dict(ld.header_metadata),
        "reader": reader,
    }


def compare_dict(a: LoraDelta, b: LoraDelta, cmp: Comparison) -> dict[str, Any]:
    """``lorasearch compare --json``."""
    return {
        "family_a": a.family,
        "family_b": b.family,
        "shared_modules": cmp.shared_modules,
        "only_a": cmp.only_a,
        "only_b": cmp.only_b,
        "cosine": cmp.cosine,
        "coefficient": cmp.coefficient,
        "exact": True,
        "norm_a": cmp.norm_a,
        "norm_b": cmp.norm_b,
        "path_a": a.source.get("path"),
        "path_b": b.source.get("path"),
    }
