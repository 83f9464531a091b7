"""Exact Frobenius inner products of weight updates, from their factors.

``<s1 U1 V1, s2 U2 V2>_F = s1 s2 tr((U1^T U2)(V2 V1^T))`` costs O(r1 r2 (p+q));
the dense update is only built where a delta has no factors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorasearch.delta import Delta, Factored, Kronecker, LoraDelta, NeedsBase, Side, side_matrix, side_shape


def _f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64, copy=False)


def _factored_inner(a: Factored, b: Factored) -> float:
    # float64 throughout: re-parameterised factors (U·G, G⁻¹·V with an
    # ill-conditioned G) cancel heavily in the trace, and float32 Gram products
    # then lose the third decimal of the cosine
    uu = _f64(a.up).T @ _f64(b.up)
    vv = _f64(a.down) @ _f64(b.down).T
    return float(a.scale * b.scale * np.sum(uu * vv))


def _dense_factored_inner(d: np.ndarray, f: Factored) -> float:
    return float(f.scale * np.sum((_f64(f.up).T @ _f64(d)) * _f64(f.down)))


def _side_inner(a: Side, b: Side) -> float:
    if isinstance(a, Factored) and isinstance(b, Factored):
        return _factored_inner(a, b)
    if isinstance(a, Factored):
        return _dense_factored_inner(side_matrix(b), a)
    if isinstance(b, Factored):
        return _dense_factored_inner(side_matrix(a), b)
    return float(np.sum(_f64(a) * _f64(b)))


def dense_matrix(d: Delta) -> np.ndarray:
    """The update as a dense array (vectors stay vectors)."""
    if isinstance(d, NeedsBase):
        raise ValueError(f"a {d.method} update needs the base weights")
    return d.matrix()


def inner(a: Delta, b: Delta) -> float:
    """Exact ``<a, b>_F`` of two updates of the same shape.

    Raises:
        ValueError: if either needs the base weights or the shapes differ.
    """
    if isinstance(a, NeedsBase) or isinstance(b, NeedsBase):
        raise ValueError("updates that need the base weights have no inner product on their own")
    if tuple(a.matrix_shape) != tuple(b.matrix_shape):
        raise ValueError(f"shape mismatch {a.matrix_shape} vs {b.matrix_shape}")
    if isinstance(a, Factored) and isinstance(b, Factored):
        return _factored_inner(a, b)
    if (
        isinstance(a, Kronecker) and isinstance(b, Kronecker)
        and side_shape(a.w1) == side_shape(b.w1) and side_shape(a.w2) == side_shape(b.w2)
    ):
        return a.scale * b.scale * _side_inner(a.w1, b.w1) * _side_inner(a.w2, b.w2)
    if isinstance(a, Factored):
        a, b = b, a
    if isinstance(b, Factored):
        return _dense_factored_inner(dense_matrix(a), b)
    return float(np.sum(_f64(dense_matrix(a)) * _f64(dense_matrix(b))))


def sq_norm(a: Delta) -> float:
    """``||a||_F^2``."""
    return inner(a, a)


def module_sq_norms(ld: LoraDelta) -> dict[str, float]:
    """``‖ΔW_m‖²`` of every additive module, computed once per LoraDelta and kept on it.

    A query is compared with many candidates and a cached candidate with many
    queries: the norms are the same each time.
    """
    cached = ld.cache.get("sq_norms")
    if cached is None:
        cached = {n: sq_norm(d) for n, d in ld.modules.items() if not isinstance(d, NeedsBase)}
        ld.cache["sq_norms"] = cached
    return cached


@dataclass
class Comparison:
    """How two LoraDeltas relate over the modules they share."""

    shared_modules: int
    only_a: int
    only_b: int
    cosine: float | None
    coefficient: float | None
    dot: float
    norm_a: float
    norm_b: float


def comparable(a: Delta, b: Delta) -> bool:
    return (
        not isinstance(a, NeedsBase) and not isinstance(b, NeedsBase)
        and tuple(a.matrix_shape) == tuple(b.matrix_shape)
    )


def compare(a: LoraDelta, b: LoraDelta) -> Comparison:
    """Exact cosine and least-squares coefficient c (``dW_b ~ c dW_a``) over shared modules.

    Only modules present in both with the same shape and an additive update
    count; LoRAs of different families share nothing.
    """
    same_family = a.family == b.family
    shared = [k for k in a.modules if k in b.modules and same_family and comparable(a.modules[k], b.modules[k])]
    dot = na = nb = 0.0
    norms_a, norms_b = module_sq_norms(a), module_sq_norms(b)
    for k in shared:
        dot += inner(a.modules[k], b.modules[k])
        na += norms_a[k]
        nb += norms_b[k]
    cos = dot / np.sqrt(na * nb) if na > 0 and nb > 0 else None
    coef = dot / na if na > 0 else None
    only_a = len([k for k in a.modules if k not in shared])
    only_b = len([k for k in b.modules if k not in shared])
    return Comparison(len(shared), only_a, only_b, None if cos is None else float(cos),
                      None if coef is None else float(coef), float(dot), float(np.sqrt(na)), float(np.sqrt(nb)))
