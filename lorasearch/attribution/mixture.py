"""Mixture maths for attribution: Gram matrices, greedy selection, partial scores, projected fits.

The model: a target update ``T`` (one matrix per module) is ``Σ cᵢ·Xᵢ + E`` for a
few indexed updates ``Xᵢ`` and a remainder ``E`` the index does not explain.
Everything here works from inner products (a Gram matrix ``G = [<Xᵢ, Xⱼ>]``,
``b = [<T, Xᵢ>]`` and ``t2 = ‖T‖²``), so the same code serves the sketch stage
(inner products of module sketches) and the exact stage (Frobenius inner
products from the factors, ``lorasearch.frobenius``).

Pure: deltas and arrays in, arrays out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lorasearch.delta import Delta, Dense, Factored, Kronecker, NeedsBase
from lorasearch.frobenius import inner

# Relative size under which a residual direction counts as zero (the candidate lies in the
# span of those already chosen: an exact duplicate, or the same update in another file).
DEGENERATE = 1e-9
# Singular values below this fraction of the largest do not count towards a target module's rank
# (float32 factors: products carry ~1e-7 relative error, the margin covers fp16/bf16 round-off).
RANK_RTOL = 1e-4


# --------------------------------------------------------------------------- Gram matrices


def module_gram(deltas: Sequence[Delta | None]) -> np.ndarray:
    """Exact ``<dᵢ, dⱼ>_F`` of updates of one module (None: absent, row and column zero).

    Factored updates are done together: with ``U = [s₁U₁ … sₙUₙ]`` and
    ``V = [V₁; …; Vₙ]``, ``<UᵢVᵢ, UⱼVⱼ> = Σ_{a∈i, b∈j} (UᵀU)_{ab}(VVᵀ)_{ab}``,
    one pair of BLAS products for the whole block instead of n² small ones.

    Args:
        deltas: updates of equal matrix shape, or None.

    Returns:
        n×n float64 symmetric matrix.
    """
    n = len(deltas)
    g = np.zeros((n, n))
    fac = [i for i, d in enumerate(deltas) if isinstance(d, Factored)]
    if fac:
        fs: list[Factored] = [deltas[i] for i in fac]  # type: ignore[misc]
        u = np.concatenate([f.up.astype(np.float64) * f.scale for f in fs], axis=1)
        v = np.concatenate([f.down.astype(np.float64) for f in fs], axis=0)
        h = (u.T @ u) * (v @ v.T)
        e = np.zeros((u.shape[1], len(fs)))
        pos = 0
        for j, f in enumerate(fs):
            e[pos:pos + f.rank, j] = 1.0
            pos += f.rank
        g[np.ix_(fac, fac)] = e.T @ h @ e
    others = [i for i, d in enumerate(deltas) if d is not None and not isinstance(d, Factored)]
    present = [i for i, d in enumerate(deltas) if d is not None]
    for i in others:
        for j in present:
            if j in others and j < i:
                continue
            g[i, j] = g[j, i] = inner(deltas[i], deltas[j])  # type: ignore[arg-type]
    return g


def comparable(a: Delta | None, b: Delta | None) -> bool:
    """Both additive updates of the same matrix shape."""
    return (a is not None and b is not None and not isinstance(a, NeedsBase) and not isinstance(b, NeedsBase)
            and tuple(a.matrix_shape) == tuple(b.matrix_shape))


# --------------------------------------------------------------------------- selection from a Gram matrix


def _pinv(g: np.ndarray) -> np.ndarray:
    return np.linalg.pinv(g, rcond=1e-10, hermitian=True)


def partial_scores(g: np.ndarray, b: np.ndarray, t2: float, chosen: Sequence[int]) -> np.ndarray:
    """Partial cosine of every candidate with the target, given the chosen ones.

    For candidate i: the cosine between the target's residual after fitting the
    chosen set (least squares) and i's part orthogonal to the chosen set. With
    nothing chosen it is the plain cosine. Under the null (i unrelated to the
    target) it behaves like the cosine of an unrelated pair, which is what
    calibration measures.

    Args:
        g: n×n Gram matrix of the candidates.
        b: n inner products with the target.
        t2: the target's squared norm.
        chosen: indices already in the model.

    Returns:
        n scores; NaN for chosen candidates and for candidates (numerically) in
        the span of the chosen ones or with zero norm.
    """
    n = len(b)
    diag = np.diag(g).copy()
    s = list(chosen)
    if s:
        w = _pinv(g[np.ix_(s, s)])
        gs = g[:, s]
        num = b - gs @ (w @ b[s])
        perp = diag - np.einsum("ij,jk,ik->i", gs, w, gs)
        r2 = t2 - float(b[s] @ w @ b[s])
    else:
        num, perp, r2 = b.astype(np.float64), diag, t2
    out = np.full(n, np.nan)
    ok = (perp > DEGENERATE * np.maximum(diag, 1e-300)) & (diag > 0)
    if r2 > DEGENERATE * t2 and t2 > 0:
        out[ok] = num[ok] / np.sqrt(r2 * perp[ok])
    if s:
        out[s] = np.nan
    return out


def drop_one_scores(g: np.ndarray, b: np.ndarray, t2: float, chosen: Sequence[int]) -> dict[int, float]:
    """For each chosen candidate, its partial cosine given the other chosen ones."""
    out: dict[int, float] = {}
    for i in chosen:
        rest = [j for j in chosen if j != i]
        out[i] = float(partial_scores(g, b, t2, rest)[i])
    return out


def least_squares(g: np.ndarray, b: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
    """Least-squares coefficients of the chosen candidates (negative allowed)."""
    s = list(chosen)
    if not s:
        return np.zeros(0)
    return _pinv(g[np.ix_(s, s)]) @ b[s]


def explained_share(g: np.ndarray, b: np.ndarray, t2: float, chosen: Sequence[int], coef: np.ndarray) -> float:
    """``1 − ‖T − Σ cᵢXᵢ‖² / ‖T‖²`` for given coefficients (in [0, 1] at the least-squares optimum)."""
    s = list(chosen)
    if not s or t2 <= 0:
        return 0.0
    resid = t2 - 2.0 * float(coef @ b[s]) + float(coef @ g[np.ix_(s, s)] @ coef)
    return float(min(1.0, max(0.0, 1.0 - resid / t2)))


def greedy_select(g: np.ndarray, b: np.ndarray, t2: float, accept: Callable[[int, float, int], bool],
                  max_terms: int, first: np.ndarray | None = None) -> list[int]:
    """Forward selection (orthogonal matching pursuit on a Gram matrix).

    Args:
        g: Gram matrix of the candidates.
        b: inner products with the target.
        t2: the target's squared norm.
        accept: ``accept(candidate, score, position)`` says whether the best remaining
            candidate enters (the significance test).
        max_terms: most candidates chosen.
        first: scores to pick the first candidate by instead of the plain cosine
            (e.g. the cosine over shared modules); it is tested with that score too.

    Returns:
        chosen indices in order of entry.
    """
    chosen: list[int] = []
    while len(chosen) < max_terms:
        sc = first if (not chosen and first is not None) else partial_scores(g, b, t2, chosen)
        sc = np.where(np.isnan(sc), -np.inf, np.abs(sc))
        if chosen:
            sc[chosen] = -np.inf
        if not np.isfinite(sc).any():
            break
        i = int(np.argmax(sc))
        if not np.isfinite(sc[i]) or not accept(i, float(sc[i]), len(chosen)):
            break
        chosen.append(i)
    return chosen


def prune(g: np.ndarray, b: np.ndarray, t2: float, chosen: list[int], keep: Callable[[int, float, int], bool]) -> list[int]:
    """Backward elimination: drop the weakest chosen candidate while it fails ``keep`` given the others.

    ``keep(candidate, drop-one partial score, number chosen)``; a single survivor is
    not tested here (the caller tests it as a single source).
    """
    s = list(chosen)
    while len(s) > 1:
        scores = drop_one_scores(g, b, t2, s)
        worst = min(s, key=lambda i: abs(scores[i]) if np.isfinite(scores[i]) else -1.0)
        val = scores[worst]
        if np.isfinite(val) and keep(worst, abs(val), len(s)):
            break
        s.remove(worst)
    return s


# --------------------------------------------------------------------------- projection onto a low-rank target


@dataclass(frozen=True)
class Basis:
    """Orthonormal bases of a low-rank target module's column (p×r) and row (q×r) spaces."""

    left: np.ndarray
    right: np.ndarray
    singular: np.ndarray


def target_basis(d: Delta, rtol: float = RANK_RTOL) -> Basis | None:
    """The column/row spaces of a factored target module, when it is rank deficient.

    Args:
        d: the target's update of one module.
        rtol: singular values below ``rtol·σ_max`` are dropped.

    Returns:
        the bases, or None when the module is not factored or has full rank
        (nothing to project on).
    """
    if not isinstance(d, Factored):
        return None
    p, q = d.matrix_shape
    qu, ru = np.linalg.qr(d.up.astype(np.float64))
    qv, rv = np.linalg.qr(d.down.T.astype(np.float64))
    a, s, bt = np.linalg.svd(d.scale * (ru @ rv.T))
    if not s.size or s[0] <= 0:
        return None
    keep = s > rtol * s[0]
    if int(keep.sum()) >= min(p, q):
        return None
    return Basis(qu @ a[:, keep], qv @ bt[keep].T, s[keep])


def project(d: Delta, basis: Basis) -> np.ndarray:
    """``Lᵀ·ΔW·R`` (r×r coordinates of the update projected on the target's spaces)."""
    if isinstance(d, Factored):
        return d.scale * (basis.left.T @ d.up.astype(np.float64)) @ (d.down.astype(np.float64) @ basis.right)
    if isinstance(d, (Dense, Kronecker)):
        m = d.matrix().astype(np.float64)
        return basis.left.T @ m.reshape(m.shape[0], -1) @ basis.right
    raise TypeError(f"cannot project a {type(d).__name__}")
