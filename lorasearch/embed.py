"""From a LoraDelta to what the store keeps: module sketches, module norms and one unit vector per view.

Views stored in FAISS:

- ``delta``: the raw sketches folded to D dims (identity, lineage, attribution);
- ``style``: every module normalised to unit norm first, so no layer dominates;
- ``style:<group>``: the style view restricted to one module group
  (``attention``, ``feed_forward``, ``conv``, ``text_encoder``), present only
  when the LoRA has modules in that group.

Pure: no I/O. The sketch maths lives in ``lorasearch.sketch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from lorasearch.delta import LoraDelta
from lorasearch.sketch import (
    DEFAULT_DIM,
    DEFAULT_K,
    MODULE_GROUPS,
    SKETCH_VERSION,
    delta_vector,
    in_group,
    module_norms,
    sketch_lora,
    style_vector,
)

VIEW_DELTA = "delta"
VIEW_STYLE = "style"
GROUPS: tuple[str, ...] = tuple(MODULE_GROUPS)
GROUP_VIEWS: dict[str, str] = {g: f"{VIEW_STYLE}:{g}" for g in GROUPS}
VIEWS: tuple[str, ...] = (VIEW_DELTA, VIEW_STYLE, *GROUP_VIEWS.values())


@dataclass(eq=False)
class Embedding:
    """Everything the store keeps about one LoRA's weights.

    Attributes:
        family: base-model family the sketches were seeded with.
        k: sketch size (each module sketch is k×k).
        dim: length of every view vector.
        sketches: canonical module name -> k×k float32 sketch.
        norms: canonical module name -> exact Frobenius norm of its update.
        vectors: view name -> float32 unit vector of length ``dim``.
        sketch_version: ``lorasearch.sketch.SKETCH_VERSION`` at embedding time.
    """

    family: str
    k: int
    dim: int
    sketches: dict[str, np.ndarray]
    norms: dict[str, float]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    sketch_version: int = SKETCH_VERSION


def view_name(view: str, groups: Iterable[str] | None = None) -> str:
    """The FAISS view that answers ``view`` restricted to ``groups``.

    Args:
        view: ``delta`` or ``style``.
        groups: module groups for the style view (one group maps to its own
            view; several or none map to ``style``).

    Returns:
        a name from ``VIEWS``.

    Raises:
        ValueError: unknown view or group.
    """
    gs = _check_groups(groups)
    if view == VIEW_DELTA:
        return VIEW_DELTA
    if view != VIEW_STYLE:
        raise ValueError(f"unknown view {view!r} (expected one of {', '.join((VIEW_DELTA, VIEW_STYLE))})")
    return GROUP_VIEWS[gs[0]] if gs is not None and len(gs) == 1 else VIEW_STYLE


def _check_groups(groups: Iterable[str] | None) -> tuple[str, ...] | None:
    if groups is None:
        return None
    gs = tuple(groups)
    bad = [g for g in gs if g not in MODULE_GROUPS]
    if bad:
        raise ValueError(f"unknown module group {bad[0]!r} (expected one of {', '.join(GROUPS)})")
    return gs or None


def view_vectors(sketches: Mapping[str, np.ndarray], norms: Mapping[str, float], dim: int) -> dict[str, np.ndarray]:
    """All view vectors of one LoRA; views with no non-zero module are left out.

    Args:
        sketches: module -> k×k sketch.
        norms: module -> exact Frobenius norm.
        dim: vector length.

    Returns:
        view name -> float32 unit vector.
    """
    out: dict[str, np.ndarray] = {}
    live = {n: z for n, z in sketches.items() if norms.get(n, 0.0) > 0}
    if not live:
        return out
    out[VIEW_DELTA] = delta_vector(live, dim)
    out[VIEW_STYLE] = style_vector(live, norms, dim)
    for g, name in GROUP_VIEWS.items():
        if any(in_group(n, (g,)) for n in live):
            out[name] = style_vector(live, norms, dim, (g,))
    return {v: x.astype(np.float32) for v, x in out.items() if float(np.linalg.norm(x)) > 0}


def embed(ld: LoraDelta, k: int = DEFAULT_K, dim: int = DEFAULT_DIM) -> Embedding:
    """Sketch every additive module of a LoRA and build its view vectors.

    Args:
        ld: the LoRA.
        k: sketch size.
        dim: view vector length.

    Returns:
        the Embedding (modules that need the base weights are not sketched).
    """
    sketches = sketch_lora(ld, k)
    norms = module_norms(ld)
    norms = {n: norms.get(n, 0.0) for n in sketches}
    return Embedding(ld.family, k, dim, sketches, norms, view_vectors(sketches, norms, dim))


def sketch_cosine(
    a: tuple[Sequence[str], np.ndarray, np.ndarray],
    b: tuple[Sequence[str], np.ndarray, np.ndarray],
    view: str = VIEW_DELTA,
    groups: Iterable[str] | None = None,
) -> tuple[float | None, int]:
    """Cosine of two LoRAs from their full module sketches (no folding), as a re-ranking score.

    ``delta`` mirrors ``lorasearch.frobenius.compare``: over the modules both
    have, sketches as they are. ``style`` normalises every module by its exact
    norm and counts all modules of either side in the norms, like the folded
    style vector.

    Args:
        a: (module names, sketches M×k×k, norms M) of the first LoRA.
        b: the same for the second.
        view: ``delta`` or ``style``.
        groups: module groups kept (style only; None keeps all).

    Returns:
        (cosine or None when nothing is comparable, shared module count).
    """
    gs = _check_groups(groups)
    ia = {n: i for i, n in enumerate(a[0]) if view == VIEW_DELTA or in_group(n, gs)}
    ib = {n: i for i, n in enumerate(b[0]) if view == VIEW_DELTA or in_group(n, gs)}
    shared = [n for n in ia if n in ib and a[1][ia[n]].shape == b[1][ib[n]].shape]
    if view == VIEW_DELTA:
        za = np.stack([a[1][ia[n]] for n in shared]).astype(np.float64) if shared else np.zeros(0)
        zb = np.stack([b[1][ib[n]] for n in shared]).astype(np.float64) if shared else np.zeros(0)
        return _cos(float(np.sum(za * zb)), float(np.sum(za * za)), float(np.sum(zb * zb))), len(shared)
    wa = _unit_modules(a, ia)
    wb = _unit_modules(b, ib)
    dot = sum(float(np.sum(wa[n] * wb[n])) for n in shared)
    na = sum(float(np.sum(z * z)) for z in wa.values())
    nb = sum(float(np.sum(z * z)) for z in wb.values())
    return _cos(dot, na, nb), len(shared)


def _unit_modules(s: tuple[Sequence[str], np.ndarray, np.ndarray], idx: Mapping[str, int]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for n, i in idx.items():
        norm = float(s[2][i])
        if norm > 0:
            out[n] = np.asarray(s[1][i], dtype=np.float64) / norm
    return out


def _cos(dot: float, na: float, nb: float) -> float | None:
    return dot / float(np.sqrt(na * nb)) if na > 0 and nb > 0 else None
