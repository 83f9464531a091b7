"""Module sketches ``Z_m = L_m · ΔW_m · R_mᵀ`` and the fixed-size vectors of the views.

``L_m`` (k×p) and ``R_m`` (k×q) are Gaussian with entries N(0, 1/k), seeded by
(family, module, shape), so ``E<Z_m(X), Z_m(Y)> = <X, Y>_F``: the sketch is
linear in ΔW and the same for every factorisation, rank, format and dtype of
one update. Factored deltas are sketched as ``s·(L·U)(V·Rᵀ)`` and never
densified; Kronecker deltas through their structure.

The FAISS vector of a view folds the concatenated module sketches into D
dimensions with a sparse sign projection (each sketch entry goes to ``s``
hashed buckets with random signs), which preserves inner products in
expectation and needs no per-family table, so it works for any family.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Callable, Iterable, Mapping

import numpy as np

from lorasearch.delta import Dense, Delta, Factored, Kronecker, LoraDelta, NeedsBase, side_matrix
from lorasearch.frobenius import sq_norm

Shape = tuple[int, ...]

# 2: the style views weight each module by its sketch norm, not its exact norm
# (the Gaussian test matrices are those of version 1: see _SEED_VERSION)
SKETCH_VERSION = 2
_SEED_VERSION = 1
DEFAULT_K = 8
DEFAULT_DIM = 1024
BUCKETS_PER_ENTRY = 4

MODULE_GROUPS: dict[str, re.Pattern[str]] = {
    "attention": re.compile(r"(attn|attention(?!s)|self_attn|to_[qkv]\b|to_out|q_proj|k_proj|v_proj|o_proj|out_proj|c_attn|query|key|value|qkv)"),
    # flattened names (kohya-style, unknown families) separate words with "_": ``..._ff_net_0_proj``
    "feed_forward": re.compile(r"((?:^|[._])(?:ff|mlp|ffn)(?:[._]|$)|\.ff\.|ff_context|\.mlp\.|\bmlp\b|fc1|fc2|proj_mlp|gate_proj|up_proj|down_proj|c_fc|c_proj|dense_h_to_4h|dense_4h_to_h|\.ffn|feed_forward|intermediate\.dense|output\.dense|lin1|lin2)"),
    "conv": re.compile(r"(conv|resnets|downsamplers|upsamplers|proj_in|proj_out)"),
    "text_encoder": re.compile(r"^text_encoder"),
}


def _seed(*parts: object) -> int:
    h = hashlib.sha256("\x1f".join(map(str, (_SEED_VERSION, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little")


@lru_cache(maxsize=8192)
def gaussian(family: str, module: str, shape: tuple[int, ...], side: str, dim: int, k: int) -> np.ndarray:
    """The seeded k×dim Gaussian test matrix of one side of one module (entries N(0, 1/k)).

    Args:
        family: base-model family.
        module: canonical module name.
        shape: the module's matrix shape (p, q), part of the seed.
        side: ``"L"`` (output side, dim = p) or ``"R"`` (input side, dim = q).
        dim: p or q.
        k: sketch size.

    Returns:
        a read-only float32 array.
    """
    rng = np.random.Generator(np.random.PCG64(_seed(family, module, shape, side, k)))
    m = rng.standard_normal((k, dim), dtype=np.float32)
    m *= np.float32(1.0 / np.sqrt(k))
    m.setflags(write=False)
    return m


def _kron_sketch(d: Kronecker, L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``L · kron(W1, W2) · Rᵀ`` without forming the product: O(k·(abc + bcd) + k²bc)."""
    w1 = side_matrix(d.w1).astype(np.float64)
    (a, c) = w1.shape
    k = L.shape[0]
    if isinstance(d.w2, Factored):
        b, dd = d.w2.matrix_shape
    else:
        b, dd = side_matrix(d.w2).shape
    L3 = L.reshape(k, a, b).astype(np.float64)
    R3 = R.reshape(k, c, dd).astype(np.float64)
    T = np.einsum("iab,ac->ibc", L3, w1)  # k×b×c
    if isinstance(d.w2, Factored):
        # R3 · W2ᵀ = (R3 · downᵀ) · upᵀ, W2 = scale·up·down
        U = (R3 @ d.w2.down.T.astype(np.float64)) @ d.w2.up.T.astype(np.float64) * d.w2.scale  # k×c×b
    else:
        U = R3 @ side_matrix(d.w2).T.astype(np.float64)  # k×c×b
    return d.scale * np.einsum("ibc,jcb->ij", T, U)


# A product over _LONG_K or more terms is summed from _PIECE_K-term pieces. OpenBLAS
# (0.3.x, SkylakeX kernels) multiplies a k×K by K×r (k = 8, r ≈ 32) at ~100 GFLOP/s up
# to K = 3840 and at 30-50 from K = 4096, where it packs the long operand first;
# 3072-term pieces stay fast (SDXL's feed-forward and 3×3 conv factors, K = 5120-23040:
# about 2× faster). The pieces' sums round differently from one call, but every sketch
# goes through here, so each file still gets one answer.
_LONG_K = 4096
_PIECE_K = 3072


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D float32 arrays, in pieces along a long inner dimension."""
    n = a.shape[1]
    if n < _LONG_K:
        return a @ b
    out = a[:, :_PIECE_K] @ b[:_PIECE_K]
    for s in range(_PIECE_K, n, _PIECE_K):
        out += a[:, s:s + _PIECE_K] @ b[s:s + _PIECE_K]
    return out


def module_sketch(d: Delta, L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """The k×k sketch ``L · ΔW · Rᵀ`` of one update (a vector update uses q = 1).

    Returns:
        float32 k×k.
    """
    if isinstance(d, Factored):
        z = _mm(L, d.up) @ _mm(d.down, R.T)
        if z.dtype != np.float32:
            return (z * np.float32(d.scale)).astype(np.float32)
        z *= np.float32(d.scale)  # the same product, in place (no second copy)
        return z
    if isinstance(d, Kronecker):
        return _kron_sketch(d, L, R).astype(np.float32)
    if isinstance(d, Dense):
        v = d.values if d.values.ndim == 2 else d.values[:, None]
        return (L @ v @ R.T).astype(np.float32)
    raise TypeError(f"cannot sketch a {type(d).__name__}")


def sketch_shape(d: Delta) -> tuple[int, int]:
    ms = d.matrix_shape
    return (int(ms[0]), int(ms[1]) if len(ms) == 2 else 1)


# Factors up to this many elements are stacked with others of the same shape and
# multiplied in one batched call: a small module's time is Python and call
# overhead, not arithmetic (an SD1.5 LoRA is ~130 modules of a few k elements).
# Bigger factors are not copied into a stack. The batched products run the same
# BLAS call per module (``np.matmul`` loops over the batch; ``A.T @ A`` is syrk
# either way), so both paths give the same bits for inner dimensions under
# _LONG_K; above it (a rank ≤ 4 factor) a module's bits depend on its path, which
# every caller decides alike (``is_stacked``).
_BATCH_MAX = 1 << 14


def is_stacked(d: Delta) -> bool:
    """Whether ``sketch_lora`` multiplies this module stacked with the others of its factor shapes."""
    if not isinstance(d, Factored):
        return False
    u, v = d.up, d.down
    return (u.size <= _BATCH_MAX and v.size <= _BATCH_MAX and u.flags.c_contiguous and v.flags.c_contiguous
            and u.flags.aligned and v.flags.aligned)


def _by_shape(modules: Mapping[str, Delta]) -> tuple[dict[str, Delta], dict[tuple[Shape, Shape], list[str]]]:
    """Additive modules split into those handled one by one and batches of equal factor shapes."""
    single: dict[str, Delta] = {}
    batches: dict[tuple[Shape, Shape], list[str]] = {}
    for name, d in modules.items():
        if isinstance(d, NeedsBase):
            continue
        if is_stacked(d):
            batches.setdefault((d.up.shape, d.down.shape), []).append(name)  # type: ignore[union-attr]
        else:
            single[name] = d
    return single, batches


def sketch_lora(ld: LoraDelta, k: int = DEFAULT_K, prepare: Callable[[Delta], None] | None = None) -> dict[str, np.ndarray]:
    """Sketch every additive module of a LoraDelta.

    Modules that need the base weights are skipped (they have no ΔW alone).

    Args:
        ld: the LoRA.
        k: sketch size.
        prepare: called with each module right before it is sketched (the
            streaming reader writes its factors then; see ``lorasearch.read_embed``).

    Returns:
        canonical module name -> k×k float32 sketch, in module order.
    """
    single, batches = _by_shape(ld.modules)
    out: dict[str, np.ndarray] = {}
    for (us, vs), names in batches.items():
        fs: list[Factored] = [ld.modules[n] for n in names]  # type: ignore[misc]
        if prepare is not None:
            for f in fs:
                prepare(f)
        L, R = _stacked_gaussians(ld.family, tuple(names), us[0], vs[1], k)
        z = np.matmul(L, np.stack([f.up for f in fs])) @ np.matmul(np.stack([f.down for f in fs]), R.transpose(0, 2, 1))
        z = (z * np.array([f.scale for f in fs], dtype=np.float32)[:, None, None]).astype(np.float32)
        out.update(zip(names, z))
    for name, d in single.items():
        if prepare is not None:
            prepare(d)
        p, q = sketch_shape(d)
        out[name] = module_sketch(d, gaussian(ld.family, name, (p, q), "L", p, k),
                                  gaussian(ld.family, name, (p, q), "R", q, k))
    return {n: out[n] for n in ld.modules if n in out}


def sketch_norms(sketches: Mapping[str, np.ndarray], stacked: np.ndarray | None = None) -> dict[str, float]:
    """``‖Z_m‖_F`` of every module sketch: the module norm the style views divide by.

    ``E‖Z_m‖² = ‖ΔW_m‖²``, so it estimates the exact norm; unlike it, it costs
    nothing (the exact norm of a rank-r factored update costs r/(2k) times its
    sketch: 2× at r = 32, k = 8) and it makes every module's sketch exactly unit
    length in the style views.

    Args:
        sketches: module -> sketch.
        stacked: ``stack_square(sketches)`` when the caller has it already.
    """
    if not sketches:
        return {}
    if stacked is None:
        zs = list(sketches.values())
        if any(z.shape != zs[0].shape for z in zs):
            return {n: float(np.sqrt(np.sum(np.square(z, dtype=np.float64)))) for n, z in sketches.items()}
        stacked = np.stack(zs)
    sq = np.square(stacked.reshape(len(stacked), -1), dtype=np.float64)
    return dict(zip(sketches, np.sqrt(np.sum(sq, axis=1)).tolist()))


@lru_cache(maxsize=64)  # one entry per batch shape of a family's usual module set (small modules only)
def _stacked_gaussians(family: str, names: tuple[str, ...], p: int, q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The L (M, k, p) and R (M, k, q) test matrices of equally shaped modules, stacked (read-only)."""
    L = np.stack([gaussian(family, n, (p, q), "L", p, k) for n in names])
    R = np.stack([gaussian(family, n, (p, q), "R", q, k) for n in names])
    L.setflags(write=False)
    R.setflags(write=False)
    return L, R


def _sq_norm(d: Delta) -> float:
    """``‖ΔW‖²``; for factored deltas from float32 Gram matrices (BLAS syrk) and a float64 trace.

    ~2.6× faster than ``frobenius.sq_norm``'s float64 products on an SDXL rank-32
    LoRA (the largest compute cost of embedding at r > k), relative error ≤ 2e-6
    on the real files (bench/embed_cost.py).
    """
    if isinstance(d, Factored):
        uu = d.up.T @ d.up
        vv = d.down @ d.down.T
        return d.scale * d.scale * float(np.sum(uu.astype(np.float64) * vv))
    return sq_norm(d)


def module_norms(ld: LoraDelta) -> dict[str, float]:
    """Exact Frobenius norm of every additive module (from factors), in module order."""
    single, batches = _by_shape(ld.modules)
    sq: dict[str, float] = {n: _sq_norm(d) for n, d in single.items()}
    for names in batches.values():
        fs: list[Factored] = [ld.modules[n] for n in names]  # type: ignore[misc]
        u = np.stack([f.up for f in fs])
        v = np.stack([f.down for f in fs])
        uu = np.matmul(u.transpose(0, 2, 1), u)
        vv = np.matmul(v, v.transpose(0, 2, 1))
        # each row summed on its own, like np.sum over one module's r×r products
        tr = np.sum((uu.astype(np.float64) * vv).reshape(len(fs), -1), axis=1)
        sq.update((n, f.scale * f.scale * float(t)) for n, f, t in zip(names, fs, tr))
    return {n: float(np.sqrt(max(sq[n], 0.0))) for n in ld.modules if n in sq}


def sketch_and_norms(ld: LoraDelta, k: int = DEFAULT_K) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``sketch_lora(ld, k)`` and ``module_norms(ld)`` in one pass over the modules (same bits).

    Both read every factor; doing a module's norm right after its sketch finds the
    factor still in cache instead of streaming all factors from memory a second time
    (an SDXL rank-32 LoRA holds ~0.5 GB of float32 factors). Measured gain is small
    (~7 % of ``embed`` on the SDXL-size file): the products are compute-bound.

    Returns:
        (module -> k×k float32 sketch, module -> exact Frobenius norm), both in module order.
    """
    single, batches = _by_shape(ld.modules)
    z_out: dict[str, np.ndarray] = {}
    sq: dict[str, float] = {}
    for name, d in single.items():
        p, q = sketch_shape(d)
        z_out[name] = module_sketch(d, gaussian(ld.family, name, (p, q), "L", p, k),
                                    gaussian(ld.family, name, (p, q), "R", q, k))
        sq[name] = _sq_norm(d)
    for (us, vs), names in batches.items():
        fs: list[Factored] = [ld.modules[n] for n in names]  # type: ignore[misc]
        L, R = _stacked_gaussians(ld.family, tuple(names), us[0], vs[1], k)
        u = np.stack([f.up for f in fs])
        v = np.stack([f.down for f in fs])
        z = np.matmul(L, u) @ np.matmul(v, R.transpose(0, 2, 1))
        z = (z * np.array([f.scale for f in fs], dtype=np.float32)[:, None, None]).astype(np.float32)
        z_out.update(zip(names, z))
        uu = np.matmul(u.transpose(0, 2, 1), u)
        vv = np.matmul(v, v.transpose(0, 2, 1))
        tr = np.sum((uu.astype(np.float64) * vv).reshape(len(fs), -1), axis=1)
        sq.update((n, f.scale * f.scale * float(t)) for n, f, t in zip(names, fs, tr))
    order = [n for n in ld.modules if n in z_out]
    return {n: z_out[n] for n in order}, {n: float(np.sqrt(max(sq[n], 0.0))) for n in order}


def in_group(name: str, groups: Iterable[str] | None) -> bool:
    """Whether a canonical module name belongs to any of the named module groups (None: all)."""
    if groups is None:
        return True
    if not isinstance(groups, tuple):
        groups = tuple(groups)
    return _in_groups(name, groups)


@lru_cache(maxsize=1 << 16)  # called per module and view; names repeat across files
def _in_groups(name: str, groups: tuple[str, ...]) -> bool:
    return any(MODULE_GROUPS[g].search(name) for g in groups)


@lru_cache(maxsize=1 << 16)
def module_groups(name: str) -> frozenset[str]:
    """Every module group a canonical module name belongs to (one lookup per module for all groups)."""
    return frozenset(g for g, pat in MODULE_GROUPS.items() if pat.search(name))


@lru_cache(maxsize=65536)
def _buckets(module: str, k: int, dim: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(_seed("buckets", module, k, dim, s)))
    idx = rng.integers(0, dim, size=(k * k, s), dtype=np.int64)
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(k * k, s)) / np.float32(np.sqrt(s))
    idx.setflags(write=False)
    sign.setflags(write=False)
    return idx, sign


def fold(sketches: Mapping[str, np.ndarray], dim: int = DEFAULT_DIM, weights: Mapping[str, float] | None = None,
         s: int = BUCKETS_PER_ENTRY) -> np.ndarray:
    """Fold module sketches into one D-dim vector with a sparse sign projection.

    Args:
        sketches: module -> k×k sketch.
        dim: output dimension D.
        weights: optional per-module multipliers (the style view's normalisation).
        s: buckets per sketch entry.

    Returns:
        float32 vector of length ``dim`` (not normalised).
    """
    return fold_many(sketches, [weights], dim, s)[0]


def stack_square(sketches: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The sketches as one (M, k, k) array; None when they are not all k×k of one size."""
    zs = list(sketches.values())
    shape = zs[0].shape if zs else None
    if not zs or len(shape) != 2 or shape[0] != shape[1] or any(z.shape != shape for z in zs):
        return None
    return np.stack(zs)


def _signed(sketches: Mapping[str, np.ndarray], dim: int, s: int,
            stacked: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Every sketch entry times its bucket signs (M, k², s) float64, and the buckets; None for mixed sizes."""
    z = stack_square(sketches) if stacked is None else stacked
    if z is None:
        return None
    idx, sign = _stacked_buckets(tuple(sketches), z.shape[1], dim, s)
    return z.reshape(len(z), -1, 1).astype(np.float64) * sign, idx


def _fold_signed(signed: np.ndarray, idx: np.ndarray, w: np.ndarray, dim: int) -> np.ndarray:
    """One weighting of ``_signed``'s products, folded.

    Bit for bit what ``_fold_loop`` computes: the same float64 products
    ``(z·sign)·w``, added into their buckets one by one in module order by one
    ``bincount`` (a D-long output: no per-module rows to allocate and reduce).
    """
    keep = np.flatnonzero(w != 0.0)
    if not keep.size:
        return np.zeros(dim, dtype=np.float32)
    if keep.size == len(w):
        # a weight of 1 changes no product (the delta view's): no multiply, no copy
        vals, cells = (signed if (w == 1.0).all() else signed * w[:, None, None]), idx
    else:
        vals, cells = signed[keep] * w[keep, None, None], _rows(idx, keep)
    return np.bincount(cells.ravel(), weights=vals.ravel(), minlength=dim).astype(np.float32)


_ROWS: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}  # (rows, the idx they came from: kept alive)


def _rows(idx: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``idx[keep]``, kept for the next LoRA of the same module set (the group views
    take the same rows of the same cached buckets file after file)."""
    key = (id(idx), keep.tobytes())
    got = _ROWS.get(key)
    if got is None or got[1] is not idx:
        if len(_ROWS) >= 16:
            _ROWS.clear()
        got = _ROWS[key] = (idx[keep], idx)
    return got[0]


def _fold_loop(sketches: Mapping[str, np.ndarray], dim: int, weights: Mapping[str, float] | None, s: int) -> np.ndarray:
    """``fold`` of sketches of mixed sizes: every module's products, in module order, into one ``bincount``."""
    cells: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for name, z in sketches.items():
        w = 1.0 if weights is None else weights.get(name, 0.0)
        if w == 0.0:
            continue
        idx, sign = _buckets(name, z.shape[0], dim, s)
        cells.append(idx.ravel())
        vals.append(((z.reshape(-1, 1).astype(np.float64) * sign) * w).ravel())
    if not cells:
        return np.zeros(dim, dtype=np.float32)
    return np.bincount(np.concatenate(cells), weights=np.concatenate(vals), minlength=dim).astype(np.float32)


@lru_cache(maxsize=4)  # the views of one LoRA fold the same modules; ~3 MiB per SDXL-size entry
def _stacked_buckets(names: tuple[str, ...], k: int, dim: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Every module's buckets and signs, stacked.

    Returns:
        bucket indices (M, k², s) int64 and signs (M, k², s) float32, read-only.
    """
    parts = [_buckets(n, k, dim, s) for n in names]
    idx = np.stack([p[0] for p in parts])
    sign = np.stack([p[1] for p in parts])
    idx.setflags(write=False)
    sign.setflags(write=False)
    return idx, sign


def clear_caches() -> None:
    """Drop the cached Gaussian test matrices and fold buckets (a fresh worker's state)."""
    gaussian.cache_clear()
    _stacked_gaussians.cache_clear()
    module_groups.cache_clear()
    _buckets.cache_clear()
    _stacked_buckets.cache_clear()
    _ROWS.clear()


def normalise(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def delta_vector(sketches: Mapping[str, np.ndarray], dim: int = DEFAULT_DIM) -> np.ndarray:
    """The ``delta`` view: the whole update's geometry (identity, attribution), unit length."""
    return normalise(fold(sketches, dim))


def style_vector(sketches: Mapping[str, np.ndarray], norms: Mapping[str, float], dim: int = DEFAULT_DIM,
                 groups: Iterable[str] | None = None) -> np.ndarray:
    """The ``style`` view: every module scaled to unit norm so no layer dominates, optionally one module group.

    Args:
        sketches: module -> sketch.
        norms: the norm each module is divided by (``sketch_norms``; ``module_norms`` for exact ones).
        groups: module groups to keep (``attention``, ``feed_forward``, ``conv``, ``text_encoder``), None for all.
    """
    g = None if groups is None else tuple(groups)
    weights = {n: (1.0 / norms[n] if norms.get(n, 0.0) > 0 and in_group(n, g) else 0.0) for n in sketches}
    return normalise(fold(sketches, dim, weights))


def fold_many(sketches: Mapping[str, np.ndarray], weights: Iterable[Mapping[str, float] | np.ndarray | None],
              dim: int = DEFAULT_DIM,
              s: int = BUCKETS_PER_ENTRY, stacked: np.ndarray | None = None) -> list[np.ndarray]:
    """``fold`` for several per-module weightings at once (the views of one LoRA).

    The sketch-times-sign products and the bucket layout are formed once and
    shared by every weighting; each vector is the same, bit for bit, as a
    ``fold`` call of its own.

    Args:
        sketches: module -> k×k sketch.
        weights: one per wanted vector: a mapping module -> weight (missing: 0), an array of
            weights in the order of ``sketches``, or None (every module weight 1).
        dim: output dimension D.
        s: buckets per sketch entry.
        stacked: ``stack_square(sketches)`` when the caller has it already.

    Returns:
        one float32 vector per weighting (not normalised).
    """
    names = list(sketches)
    ws = [np.asarray(m, dtype=np.float64) if isinstance(m, np.ndarray)
          else np.array([1.0 if m is None else m.get(n, 0.0) for n in names], dtype=np.float64) for m in weights]
    if not names:
        return [np.zeros(dim, dtype=np.float32) for _ in ws]
    signed = _signed(sketches, dim, s, stacked)
    if signed is None:
        return [_fold_loop(sketches, dim, dict(zip(names, w.tolist())), s) for w in ws]
    return [_fold_signed(signed[0], signed[1], w, dim) for w in ws]
