"""From a LoraDelta to what the store keeps: module sketches, module norms and one unit vector per view.

Views stored in FAISS:

- ``delta``: the raw sketches folded to D dims (identity, lineage, attribution);
- ``style``: every module sketch normalised to unit norm first, so no layer dominates;
- ``style:<group>``: the style view restricted to one module group
  (``attention``, ``feed_forward``, ``conv``, ``text_encoder``), present only
  when the LoRA has modules in that group.

Pure: no I/O. The sketch maths lives in ``lorasearch.sketch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from lorasearch.delta import Delta, LoraDelta
from lorasearch.sketch import (
    DEFAULT_DIM,
    DEFAULT_K,
    MODULE_GROUPS,
    SKETCH_VERSION,
    fold_many,
    in_group,
    module_groups,
    normalise,
    sketch_lora,
    sketch_norms,
    stack_square,
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
        norms: canonical module name -> norm of its sketch, ``‖Z_m‖_F`` (an estimate of
            ``‖ΔW_m‖_F``; exact norms come from the factors where a score must be exact,
            ``lorasearch.frobenius``).
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


def view_vectors(sketches: Mapping[str, np.ndarray], norms: Mapping[str, float], dim: int,
                 stacked: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All view vectors of one LoRA; views with no non-zero module are left out.

    Args:
        sketches: module -> k×k sketch.
        norms: module -> norm to divide the module by in the style views (``sketch_norms``).
        dim: vector length.
        stacked: ``stack_square(sketches)`` when the caller has it already.

    Returns:
        view name -> float32 unit vector.
    """
    live = {n: z for n, z in sketches.items() if norms.get(n, 0.0) > 0}
    if not live:
        return {}
    if len(live) < len(sketches):
        stacked = None
    # one fold_many for every view: the signed products and buckets are formed once
    # (each vector is bit for bit what its own delta_vector / style_vector call gives)
    inv = 1.0 / np.array([norms[n] for n in live], dtype=np.float64)
    weights: dict[str, np.ndarray | None] = {VIEW_DELTA: None, VIEW_STYLE: inv}
    member = _group_members(tuple(live))
    for j, name in enumerate(GROUP_VIEWS.values()):
        if member[:, j].any():
            weights[name] = np.where(member[:, j], inv, 0.0)
    folded = fold_many(live, list(weights.values()), dim, stacked=stacked)
    out = {v: normalise(x) for v, x in zip(weights, folded)}
    return {v: x.astype(np.float32) for v, x in out.items() if float(np.linalg.norm(x)) > 0}


@lru_cache(maxsize=8)  # the same module set file after file
def _group_members(names: tuple[str, ...]) -> np.ndarray:
    """(modules × GROUPS) booleans: which module belongs to which group (read-only)."""
    out = np.array([[g in module_groups(n) for g in GROUPS] for n in names], dtype=bool).reshape(len(names), len(GROUPS))
    out.setflags(write=False)
    return out


def embed(ld: LoraDelta, k: int = DEFAULT_K, dim: int = DEFAULT_DIM,
          prepare: Callable[[Delta], None] | None = None) -> Embedding:
    """Sketch every additive module of a LoRA and build its view vectors.

    Args:
        ld: the LoRA.
        k: sketch size.
        dim: view vector length.
        prepare: passed to ``sketch_lora`` (the streaming reader's hook).

    Returns:
        the Embedding (modules that need the base weights are not sketched).
    """
    return embedding_of(ld.family, k, dim, sketch_lora(ld, k, prepare))


def embedding_of(family: str, k: int, dim: int, sketches: dict[str, np.ndarray]) -> Embedding:
    """The Embedding of ready module sketches (their norms and view vectors added).

    Args:
        family: the family the sketches were seeded with.
        k: sketch size.
        dim: view vector length.
        sketches: canonical module name -> k×k sketch, in module order.

    Returns:
        the Embedding.
    """
    stacked = stack_square(sketches)  # one stack for the norms and the views
    norms = sketch_norms(sketches, stacked)
    return Embedding(family, k, dim, sketches, norms, view_vectors(sketches, norms, dim, stacked))


def sketch_cosine(
    a: tuple[Sequence[str], np.ndarray, np.ndarray],
    b: tuple[Sequence[str], np.ndarray, np.ndarray],
    view: str = VIEW_DELTA,
    groups: Iterable[str] | None = None,
) -> tuple[float | None, int]:
    """Cosine of two LoRAs from their full module sketches (no folding), as a re-ranking score.

    ``delta`` mirrors ``lorasearch.frobenius.compare``: over the modules both
    have, sketches as they are. ``style`` normalises every module by its stored
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
    keep = (lambda n: True) if view == VIEW_DELTA or gs is None else (lambda n: in_group(n, gs))
    ia = {n: i for i, n in enumerate(a[0]) if keep(n)}
    ib = {n: i for i, n in enumerate(b[0]) if keep(n)}
    pa, pb = [], []
    for n, i in ia.items():
        j = ib.get(n)
        if j is not None:
            pa.append(i)
            pb.append(j)
    if pa and a[1].shape[1:] != b[1].shape[1:]:  # sketches of another k: nothing comparable
        pa, pb = [], []
    if view == VIEW_DELTA:
        if not pa:
            return None, 0
        za = np.asarray(a[1][pa], dtype=np.float64).reshape(len(pa), -1)
        zb = np.asarray(b[1][pb], dtype=np.float64).reshape(len(pb), -1)
        return _cos(float(np.sum(za * zb)), float(np.sum(za * za)), float(np.sum(zb * zb))), len(pa)
    wa = _unit_rows(a, list(ia.values()))
    wb = _unit_rows(b, list(ib.values()))
    pos_a = {i: r for r, i in enumerate(ia.values())}
    pos_b = {j: r for r, j in enumerate(ib.values())}
    ra = [pos_a[i] for i in pa]
    rb = [pos_b[j] for j in pb]
    dot = float(np.sum(wa[ra] * wb[rb])) if pa else 0.0
    return _cos(dot, float(np.sum(wa * wa)), float(np.sum(wb * wb))), len(pa)


def _unit_rows(s: tuple[Sequence[str], np.ndarray, np.ndarray], rows: list[int]) -> np.ndarray:
    """Sketches ``rows`` flattened and divided by their module's stored norm (zero-norm modules stay zero)."""
    if not rows:
        return np.zeros((0, 0))
    z = np.asarray(s[1][rows], dtype=np.float64).reshape(len(rows), -1)
    norms = np.asarray(s[2], dtype=np.float64)[rows]
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return z * inv[:, None]


def _cos(dot: float, na: float, nb: float) -> float | None:
    return dot / float(np.sqrt(na * nb)) if na > 0 and nb > 0 else None
