"""The canonical LoraDelta: module name -> weight update, whatever file it came from.

Every update is kept as a 2-D matrix ``p x q`` in linear-map orientation
(``out x in``; conv kernels flattened to ``q = c_in*kh*kw``); ``shape`` keeps the
weight's own shape so that it can be rebuilt. ``scale`` already holds
alpha/rank (or alpha/sqrt(rank) for rsLoRA), so two files that apply the same
update hold the same LoraDelta.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Union

import numpy as np


def _as2d(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


@dataclass(eq=False)
class Factored:
    """``scale * up @ down`` with up ``p x r`` and down ``r x q``."""

    up: np.ndarray
    down: np.ndarray
    scale: float = 1.0
    shape: tuple[int, ...] = ()
    kind: ClassVar[str] = "factored"

    def __post_init__(self) -> None:
        self.up = _as2d(np.asarray(self.up, dtype=np.float32))
        self.down = _as2d(np.asarray(self.down, dtype=np.float32))
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"factors do not chain: up {self.up.shape} @ down {self.down.shape}")
        if not self.shape:
            self.shape = (self.up.shape[0], self.down.shape[1])
        self.scale = float(self.scale)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1])  # numpy shapes hold Python ints

    def matrix(self) -> np.ndarray:
        """The dense ``p x q`` update (for tests and small layers only)."""
        return (self.scale * (self.up.astype(np.float64) @ self.down.astype(np.float64))).astype(np.float32)


Side = Union[np.ndarray, Factored]


def side_matrix(side: Side) -> np.ndarray:
    """A Kronecker side as a dense 2-D matrix."""
    return side.matrix() if isinstance(side, Factored) else _as2d(np.asarray(side, dtype=np.float32))


def side_shape(side: Side) -> tuple[int, int]:
    return side.matrix_shape if isinstance(side, Factored) else tuple(_as2d(np.asarray(side)).shape)  # type: ignore[return-value]


@dataclass(eq=False)
class Kronecker:
    """``scale * kron(w1, w2)`` (LyCORIS LoKr); either side may itself be factored."""

    w1: Side
    w2: Side
    scale: float = 1.0
    shape: tuple[int, ...] = ()
    kind: ClassVar[str] = "kronecker"

    def __post_init__(self) -> None:
        if not isinstance(self.w1, Factored):
            self.w1 = _as2d(np.asarray(self.w1, dtype=np.float32))
        if not isinstance(self.w2, Factored):
            self.w2 = _as2d(np.asarray(self.w2, dtype=np.float32))
        if not self.shape:
            self.shape = self.matrix_shape
        self.scale = float(self.scale)

    @property
    def rank(self) -> int:
        """Rank of the Kronecker product (product of the sides' ranks)."""
        r1 = self.w1.rank if isinstance(self.w1, Factored) else min(side_shape(self.w1))
        r2 = self.w2.rank if isinstance(self.w2, Factored) else min(side_shape(self.w2))
        return int(r1 * r2)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        (a, c), (b, d) = side_shape(self.w1), side_shape(self.w2)
        return (a * b, c * d)

    def matrix(self) -> np.ndarray:
        return (self.scale * np.kron(side_matrix(self.w1), side_matrix(self.w2))).astype(np.float32)


@dataclass(eq=False)
class Dense:
    """A full update: ``p x q`` matrix, or a vector for biases and norm weights."""

    values: np.ndarray
    shape: tuple[int, ...] = ()
    kind: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float32)
        if not self.shape:
            self.shape = tuple(v.shape)
        self.values = v if v.ndim == 1 else _as2d(v)

    @property
    def rank(self) -> int:
        return 0

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def matrix(self) -> np.ndarray:
        return self.values


@dataclass(eq=False)
class NeedsBase:
    """An update that cannot be formed without the base weight W0.

    Args:
        method: ``ia3``, ``oft``, ``boft``, ``glora``, ``replace`` (full weights
            saved as ``modules_to_save``) ...
        tensors: the method's own tensors, as stored.
        scale: alpha/rank or the method's constraint, where it has one.
        note: why it needs the base.
    """

    method: str
    tensors: dict[str, np.ndarray]
    shape: tuple[int, ...] = ()
    scale: float = 1.0
    note: str = ""
    kind: ClassVar[str] = "needs_base"

    @property
    def rank(self) -> int:
        return 0

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)


Delta = Union[Factored, Kronecker, Dense, NeedsBase]

BIAS_SUFFIX = "#bias"


@dataclass(eq=False)
class LoraDelta:
    """The canonical form of one LoRA file.

    Attributes:
        family: base-model family (``sd15``, ``sdxl``, ``flux``, ``llm:llama:2048``,
            ``unknown:<hash>``...).
        format: the reader that produced it (``kohya``, ``peft``, ``lycoris``...).
        modules: canonical module name -> delta. Bias updates are keyed
            ``<module>#bias``.
        magnitudes: DoRA magnitude vectors by module (the update then also
            needs the base weights to apply).
        metadata: what the reader learned (dtypes, alpha source, warnings...).
        source: path and hashes of the file(s) read.
        header_metadata: the safetensors ``__metadata__`` exactly as stored.
    """

    family: str
    format: str
    modules: dict[str, Delta]
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    header_metadata: dict[str, str] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # derived values (e.g. module norms)

    @property
    def needs_base(self) -> bool:
        """True when some module's real update depends on the base weights."""
        return bool(self.magnitudes) or any(isinstance(d, NeedsBase) for d in self.modules.values())

    def ranks(self) -> list[int]:
        return [d.rank for d in self.modules.values() if isinstance(d, (Factored, Kronecker))]

    def rank_range(self) -> dict[str, int | None]:
        r = self.ranks()
        return {"min": min(r) if r else None, "max": max(r) if r else None}

    def weight_modules(self) -> dict[str, Delta]:
        """Modules whose update is additive and known without the base."""
        return {k: v for k, v in self.modules.items() if not isinstance(v, NeedsBase)}


def _rank_stub(r: int) -> Factored:
    """A factored delta of rank ``r`` holding no values (0×r and r×0 factors)."""
    return Factored(np.zeros((0, r), np.float32), np.zeros((r, 0), np.float32))


def _stub(d: Delta) -> Delta:
    """A delta with the same kind, rank, scale and shape, and no values."""
    if isinstance(d, Factored):
        return Factored(*_no_factors(d.rank), d.scale, d.shape)
    if isinstance(d, Kronecker):
        r1 = d.w1.rank if isinstance(d.w1, Factored) else min(side_shape(d.w1))
        r2 = d.w2.rank if isinstance(d.w2, Factored) else min(side_shape(d.w2))
        return Kronecker(_rank_stub(r1), _rank_stub(r2), d.scale, d.shape)
    if isinstance(d, Dense):
        return Dense(_EMPTY, d.shape)
    return NeedsBase(d.method, {}, d.shape, d.scale, d.note)


_EMPTY = np.zeros(0, np.float32)


@lru_cache(maxsize=256)
def _no_factors(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty ``0 x r`` and ``r x 0`` factors, shared by every stub of that rank (read-only)."""
    up, down = np.zeros((0, rank), np.float32), np.zeros((rank, 0), np.float32)
    up.flags.writeable = down.flags.writeable = False
    return up, down


def without_values(ld: LoraDelta, reuse: bool = False) -> LoraDelta:
    """``ld`` with every module kept by kind, rank, scale and shape but no factor values.

    What the store's writer needs besides the embedding (family, format, module
    kinds, ranks, metadata, source and hashes), a few bytes per module.

    Args:
        ld: the LoRA.
        reuse: empty ``ld``'s own factored modules in place instead of making new
            ones (for a caller that drops ``ld``: it loses its values too).
    """
    if reuse:
        modules = {n: _emptied(d) if type(d) is Factored else _stub(d) for n, d in ld.modules.items()}
    else:
        modules = {n: _stub(d) for n, d in ld.modules.items()}
    return LoraDelta(ld.family, ld.format, modules, {n: _EMPTY for n in ld.magnitudes}, ld.metadata, ld.source,
                     ld.header_metadata)


def _emptied(d: Factored) -> Factored:
    d.up, d.down = _no_factors(d.up.shape[1])
    return d
