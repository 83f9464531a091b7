"""The paper's method, kept as the baseline to beat.

*A LoRA is Worth a Thousand Pictures* (Liu, Takikawa, Jacobson, arXiv
2412.12048) describes a LoRA by its raw factors: the stored down (A) and up (B)
matrices of every adapted module are flattened into one long vector, PCA is
fitted over a collection of LoRAs (centred), and LoRAs are compared by cosine
in PCA space.

That vector is only defined among LoRAs whose factors have the same shapes
(same family, modules and ranks), so ``paper_signature`` names that class and
LoRAs of another signature simply get no score. It also depends on the
factorisation, not on the update: ``(U·G)(G⁻¹·V)`` is the same ΔW as ``U·V`` but
a different paper vector, and alpha/scale is ignored (the paper uses the raw
factors). Those are the weaknesses the ``delta``/``style`` views remove.

Pure maths: LoraDeltas and arrays in, arrays out.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA

from lorasearch.delta import Factored, LoraDelta

MAX_COMPONENTS = 128


def _factored(ld: LoraDelta) -> list[tuple[str, Factored]]:
    """The Factored modules of a LoraDelta in sorted canonical-module order."""
    return [(n, ld.modules[n]) for n in sorted(ld.modules) if isinstance(ld.modules[n], Factored)]


def paper_signature(ld: LoraDelta) -> str:
    """The factor-shape class within which the paper's vector is defined.

    Args:
        ld: a LoraDelta.

    Returns:
        a hex digest of the family and the sorted (module, up shape, down shape)
        of every Factored module; two LoRAs are comparable iff these are equal.
    """
    h = hashlib.sha256(ld.family.encode())
    for name, d in _factored(ld):
        h.update(f"\x1f{name}\x1e{tuple(d.up.shape)}\x1e{tuple(d.down.shape)}".encode())
    return h.hexdigest()[:32]


def paper_raw_vector(ld: LoraDelta) -> np.ndarray:
    """The paper's raw vector: down (A) then up (B) of every Factored module, flattened.

    No alpha/scale is applied: the paper uses the stored factors as they are.

    Args:
        ld: a LoraDelta.

    Returns:
        float32 vector; empty when the LoRA has no Factored module.
    """
    parts: list[np.ndarray] = []
    for _, d in _factored(ld):
        parts.append(d.down.ravel())
        parts.append(d.up.ravel())
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@dataclass
class PaperModel:
    """Centred PCA over raw vectors of one signature.

    The paper's vectors are very wide (d ≈ 800 000 for an SD1.5 rank-4 LoRA)
    and few (n LoRAs), so for d > n the exact PCA is taken from the n×n Gram
    matrix of the centred data (O(n²d), the same components as a full SVD up
    to sign); otherwise scikit-learn's ``PCA(svd_solver="full")``. scikit-learn's
    full solver on an n×d matrix with d ≫ n is ~10× slower for the same result.

    With fewer than two vectors no PCA can be fitted; the model then is the
    identity (no centring), i.e. cosine of the raw vectors.

    Attributes:
        n_components: min(n - 1, 128, d), 0 for the identity model.
        mean: the centre (d,), or None for the identity model.
        components: (n_components, d) orthonormal rows, or None.
    """

    n_components: int = 0
    mean: np.ndarray | None = field(default=None, repr=False)
    components: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, vectors: list[np.ndarray] | np.ndarray) -> PaperModel:
        """Fit the PCA over raw vectors of one signature.

        Args:
            vectors: n raw vectors of equal length (``paper_raw_vector``).

        Returns:
            the fitted model.

        Raises:
            ValueError: no vectors, or vectors of different lengths.
        """
        x = _stack(vectors).astype(np.float64)
        n, d = x.shape
        c = min(n - 1, MAX_COMPONENTS, d)
        if c < 1:
            return cls(0, None, None)
        if d <= n:
            pca = PCA(n_components=c, svd_solver="full").fit(x)
            return cls(c, pca.mean_, pca.components_)
        mean = x.mean(axis=0)
        x -= mean
        evals, evecs = np.linalg.eigh(x @ x.T)  # ascending
        top = np.argsort(evals)[::-1][:c]
        lam = np.clip(evals[top], np.finfo(np.float64).tiny, None)
        comps = (evecs[:, top].T @ x) / np.sqrt(lam)[:, None]
        return cls(c, mean, comps)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project raw vectors into PCA space.

        Args:
            x: one raw vector (d,) or a matrix (n, d).

        Returns:
            PCA coordinates, (c,) or (n, c) float64; the raw vectors for the identity model.
        """
        one = x.ndim == 1
        x2 = np.atleast_2d(x).astype(np.float64)
        y = x2 if self.components is None else (x2 - self.mean) @ self.components.T
        return y[0] if one else y


def _stack(vectors: list[np.ndarray] | np.ndarray) -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        x = np.atleast_2d(vectors)
    else:
        if not vectors:
            raise ValueError("no vectors to fit")
        if len({v.shape for v in vectors}) != 1:
            raise ValueError("raw vectors of different lengths: they come from different factor signatures")
        x = np.stack(vectors)
    if x.shape[0] == 0:
        raise ValueError("no vectors to fit")
    return x


def paper_vectors(lds: list[LoraDelta]) -> np.ndarray:
    """PCA coordinates of LoRAs that share one signature, PCA fitted over them.

    Args:
        lds: LoraDeltas of one signature.

    Returns:
        (n, c) unit rows (cosine = dot product).

    Raises:
        ValueError: the signatures differ.
    """
    if len({paper_signature(ld) for ld in lds}) > 1:
        raise ValueError("the paper's vectors are only defined among LoRAs of one factor signature")
    raw = [paper_raw_vector(ld) for ld in lds]
    return _unit_rows(PaperModel.fit(raw).transform(np.stack(raw)))


def paper_rank(query: LoraDelta, corpus: list[LoraDelta]) -> list[tuple[int, float]]:
    """Rank a corpus against a query by the paper's method.

    The PCA is fitted over the corpus LoRAs that share the query's signature;
    the others are not comparable and get no score.

    Args:
        query: the query LoRA.
        corpus: the LoRAs to rank.

    Returns:
        (corpus index, cosine in PCA space), best first; empty when no corpus
        LoRA shares the query's signature.
    """
    sig = paper_signature(query)
    idx = [i for i, ld in enumerate(corpus) if paper_signature(ld) == sig]
    if not idx:
        return []
    raw = np.stack([paper_raw_vector(corpus[i]) for i in idx])
    model = PaperModel.fit(raw)
    c = _unit_rows(model.transform(raw))
    q = _unit_rows(model.transform(paper_raw_vector(query))[None, :])[0]
    scores = c @ q
    order = np.argsort(-scores, kind="stable")
    return [(idx[j], float(scores[j])) for j in order]
