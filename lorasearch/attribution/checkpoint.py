"""ΔW of a full checkpoint against its base, module by module, streaming.

A checkpoint is a single ``.safetensors`` file or a diffusers folder (``unet/``,
``transformer/``, ``text_encoder*/`` with ``diffusion_pytorch_model*.safetensors``
or ``model*.safetensors``, shards included). ``W_ft − W_base`` is formed one
tensor at a time: both files are opened with ``SafetensorsFile`` with no
preloading, so each tensor is read on its own (``pread``) and at most one
module of each model is in memory, never both models.

Which tensors become modules: floating tensors of two or more dimensions
(linear and conv weights, the ones LoRAs adapt), present in both with the same
shape, whose difference is not round-off: ``‖ΔW‖_F > 2u·‖W_base‖_F`` with ``u``
the unit round-off of the coarser of the two dtypes (F32 2⁻²⁴, F16 2⁻¹¹,
BF16 2⁻⁸). Round-off of a cast has relative norm ≈ u/√3, so a checkpoint saved
in fp16 over an fp32 base does not turn every layer into a "module". Biases
and norm vectors are left out: LoRAs do not adapt them, and counting them
would only dilute the explained share.

Names: every kept tensor becomes a ``RawModule`` (component from the diffusers
sub-folder, ``None`` for a single file) and goes through ``families.resolve``
like any LoRA, so a checkpoint's modules get the same canonical names and
family as LoRAs of that base (``unet.down_blocks.0....to_q``), fused
projections included.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lorasearch import families
from lorasearch.delta import Dense
from lorasearch.errors import BadInput
from lorasearch.formats.base import ParsedLora, RawModule
from lorasearch.formats.safetensors_file import SafetensorsFile

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8,
                 "F8_E4M3": 2.0 ** -4, "F8_E5M2": 2.0 ** -3}
FLOAT_DTYPES = tuple(UNIT_ROUNDOFF)
ROUNDOFF_FACTOR = 2.0
# Adapter-file key tokens: a file holding any of these is a LoRA, not a checkpoint.
_ADAPTER_TOKENS = ("lora", "hada_", "lokr_", ".alpha", "oft_", "ia3", "dora_scale", "w_a_", "w_b_", ".diff",
                   "glora", "boft", "lora_magnitude", "unilora")
# ΔW held in memory between passes when the kept modules fit this budget; beyond it every pass re-reads the files.
DEFAULT_CACHE_BYTES = 512 * 2**20


def _weight_files(folder: Path) -> list[Path]:
    pats = ("diffusion_pytorch_model*.safetensors", "model*.safetensors")
    return sorted({p for pat in pats for p in folder.glob(pat)})


def is_diffusers_folder(path: Path) -> bool:
    """A folder with at least one known component sub-folder holding weights."""
    return path.is_dir() and any(_weight_files(path / c) for c in COMPONENTS)


def looks_like_checkpoint(keys: list[str]) -> bool:
    """Model weights rather than an adapter: no adapter tokens, mostly ``.weight``/``.bias`` keys."""
    if not keys:
        return False
    low = [k.lower() for k in keys]
    if any(t in k for k in low for t in _ADAPTER_TOKENS):
        return False
    return sum(k.endswith((".weight", ".bias")) for k in low) >= 0.8 * len(low)


def file_is_checkpoint(path: Path) -> bool:
    """Read only the header of a safetensors file and say whether it is a full checkpoint."""
    with SafetensorsFile(path, preload_max=0) as st:
        return looks_like_checkpoint(st.keys())


@dataclass
class Weights:
    """A checkpoint's tensors by (component, key), with the file that holds each.

    Args:
        path: a ``.safetensors`` file (component None) or a diffusers folder.
    """

    path: Path
    where: dict[tuple[str | None, str], Path] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Weights:
        p = Path(path)
        w = cls(p)
        if p.is_dir():
            files = [(c, f) for c in COMPONENTS for f in _weight_files(p / c)]
            if not files and _weight_files(p):  # a component folder given on its own (e.g. .../unet)
                comp = p.name if p.name in COMPONENTS else None
                files = [(comp, f) for f in _weight_files(p)]
            if not files:
                raise BadInput(f"{p}: not a checkpoint folder (no {'/, '.join(COMPONENTS)}/ with .safetensors weights)",
                               code="not_a_checkpoint")
        elif p.is_file():
            files = [(None, p)]
        else:
            raise BadInput(f"{p}: no such file or folder", code="not_found")
        for comp, f in files:
            with SafetensorsFile(f, preload_max=0) as st:
                for k in st.keys():
                    w.where.setdefault((comp, k), f)
        return w

    def components(self) -> list[str | None]:
        return sorted({c for c, _ in self.where}, key=lambda c: (c is not None, c or ""))

    def keys(self, component: str | None) -> list[str]:
        return [k for c, k in self.where if c == component]


def pair_components(ft: Weights, base: Weights) -> list[tuple[str | None, str | None]]:
    """(fine-tuned component, base component) pairs to subtract.

    Same-named components pair up; a single file pairs with the base component
    (or file) sharing most of its keys (e.g. a UNet saved as one file against a
    diffusers base folder).

    Raises:
        BadInput: nothing in the base has the checkpoint's keys.
    """
    pairs: list[tuple[str | None, str | None]] = []
    for c in ft.components():
        keys = set(ft.keys(c))
        if c is not None and c in base.components():
            pairs.append((c, c))
            continue
        comps = base.components()
        if not comps:
            continue
        best = max(comps, key=lambda bc: len(keys & set(base.keys(bc))))
        if len(keys & set(base.keys(best))) >= 0.5 * len(keys):
            pairs.append((c, best))
    if not pairs:
        raise BadInput(f"{ft.path}: no tensor names in common with the base {base.path} "
                       "(a different model, or a different key layout: ldm vs diffusers)", code="base_mismatch")
    return pairs


@dataclass(frozen=True)
class _Entry:
    component: str | None
    key: str
    base_component: str | None
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # a row slice of a fused tensor


class _Files:
    """Open ``SafetensorsFile`` handles, one per file, closed together."""

    def __init__(self) -> None:
        self._open: dict[Path, SafetensorsFile] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, path: Path) -> SafetensorsFile:
        f = self._open.get(path)
        if f is None:
            f = self._stack.enter_context(SafetensorsFile(path, preload_max=0))
            self._open[path] = f
        return f


def _as_matrix(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float32, copy=False)


@dataclass
class CheckpointDelta:
    """``W_ft − W_base`` of a checkpoint, by canonical module, read on demand.

    Attributes:
        family: the base-model family the modules resolve to.
        shapes: canonical module name -> matrix shape (p, q).
        weight_shapes: canonical module name -> the weight's own shape.
        skipped: counts of tensors left out, by reason.
        path: the fine-tuned checkpoint.
        base_path: the base.
    """

    family: str
    shapes: dict[str, tuple[int, int]]
    weight_shapes: dict[str, tuple[int, ...]]
    skipped: dict[str, int]
    path: Path
    base_path: Path
    _ft: Weights = field(repr=False, default=None)  # type: ignore[assignment]
    _base: Weights = field(repr=False, default=None)  # type: ignore[assignment]
    _entries: dict[str, _Entry] = field(repr=False, default_factory=dict)
    _cache: dict[str, Dense] | None = field(repr=False, default=None)

    def iter_modules(self) -> Iterator[tuple[str, Dense]]:
        """(canonical name, Dense ΔW) for every kept module, one at a time."""
        if self._cache is not None:
            yield from self._cache.items()
            return
        with _Files() as files:
            for name, e in self._entries.items():
                yield name, self._delta(files, e)

    def _delta(self, files: _Files, e: _Entry) -> Dense:
        ft = files.get(self._ft.where[(e.component, e.key)]).get(e.key)
        base = files.get(self._base.where[(e.base_component, e.key)]).get(e.key)
        d = _as_matrix(np.subtract(ft, base, dtype=np.float32))
        if e.rows is not None:
            d = d[e.rows[0]:e.rows[1]]
            return Dense(np.ascontiguousarray(d), (e.rows[1] - e.rows[0], *e.shape[1:]))
        return Dense(d, e.shape)


def _norm(x: np.ndarray) -> float:
    v = x.reshape(-1)
    return float(np.sqrt(np.dot(v.astype(np.float64), v.astype(np.float64)))) if v.size < (1 << 22) else float(np.linalg.norm(v))


def _negligible(dft: str, dbase: str, dnorm: float, bnorm: float) -> bool:
    u = max(UNIT_ROUNDOFF.get(dft, 2.0 ** -24), UNIT_ROUNDOFF.get(dbase, 2.0 ** -24))
    return dnorm <= ROUNDOFF_FACTOR * u * bnorm


def checkpoint_delta(path: str | Path, base: str | Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> CheckpointDelta:
    """Stream a checkpoint against its base and name the changed modules canonically.

    Args:
        path: the fine-tuned checkpoint (file or diffusers folder).
        base: the base checkpoint (file or diffusers folder).
        cache_bytes: keep the ΔW of the kept modules in memory when they fit
            (one read of the files instead of one per pass).

    Returns:
        the CheckpointDelta (family, module shapes, on-demand ΔW).

    Raises:
        BadInput: unreadable files, no shared tensors, nothing changed.
    """
    ft_w, base_w = Weights.open(path), Weights.open(base)
    pairs = pair_components(ft_w, base_w)
    skipped = {"not_float_or_1d": 0, "missing_in_base": 0, "shape_differs": 0, "unchanged": 0}
    raws: list[RawModule] = []
    entries: list[_Entry] = []
    cached: list[np.ndarray] = []
    budget = cache_bytes
    with _Files() as files:
        for comp, bcomp in pairs:
            for key in ft_w.keys(comp):
                fst = files.get(ft_w.where[(comp, key)])
                if fst.dtype(key) not in FLOAT_DTYPES or len(fst.shape(key)) < 2 or not key.endswith(".weight"):
                    skipped["not_float_or_1d"] += 1
                    continue
                bfile = base_w.where.get((bcomp, key))
                if bfile is None:
                    skipped["missing_in_base"] += 1
                    continue
                bst = files.get(bfile)
                if tuple(bst.shape(key)) != tuple(fst.shape(key)) or bst.dtype(key) not in FLOAT_DTYPES:
                    skipped["shape_differs"] += 1
                    continue
                w0 = bst.get(key)
                d = np.subtract(fst.get(key), w0, dtype=np.float32)
                dn, bn = _norm(d), _norm(w0)
                if _negligible(fst.dtype(key), bst.dtype(key), dn, bn):
                    skipped["unchanged"] += 1
                    continue
                shape = tuple(fst.shape(key))
                m = _as_matrix(d)
                raws.append(RawModule(comp, key[: -len(".weight")], False,
                                      Dense(np.broadcast_to(np.float32(0), m.shape), shape)))
                entries.append(_Entry(comp, key, bcomp, shape))
                budget -= m.nbytes
                cached.append(m if budget >= 0 else None)  # type: ignore[arg-type]
    if not raws:
        raise BadInput(f"{path}: no weight differs from the base {base} beyond round-off", code="no_difference")
    res = families.resolve(ParsedLora("checkpoint", raws), None, None)
    named, cache = _canonical(res, entries, cached if budget >= 0 else None)
    shapes = {n: (int(e.shape[0]) if e.rows is None else e.rows[1] - e.rows[0], int(np.prod(e.shape[1:])))
              for n, e in named.items()}
    wshapes = {n: (e.shape if e.rows is None else (e.rows[1] - e.rows[0], *e.shape[1:])) for n, e in named.items()}
    return CheckpointDelta(res.family, shapes, wshapes, skipped, Path(path), Path(base), ft_w, base_w, named, cache)


def _canonical(res: families.Resolution, entries: list[_Entry], cached: list[np.ndarray] | None
               ) -> tuple[dict[str, _Entry], dict[str, Dense] | None]:
    """Canonical name -> entry (fused tensors cut by rows, as ``families.canonical_modules`` does)."""
    named: dict[str, _Entry] = {}
    cache: dict[str, Dense] | None = {} if cached is not None else None
    for i, e in enumerate(entries):
        pieces = res.splits.get(i) or [(res.names[i], None, None)]
        for cname, a, b in pieces:
            if cname in named:
                continue
            rows = None if a is None else (int(a), int(b))
            named[cname] = _Entry(e.component, e.key, e.base_component, e.shape, rows)
            if cache is not None and cached is not None:
                m = cached[i] if rows is None else np.ascontiguousarray(cached[i][rows[0]:rows[1]])
                cache[cname] = Dense(m, e.shape if rows is None else (rows[1] - rows[0], *e.shape[1:]))
    return named, cache


def read_model_card_base(readme: Path) -> list[str]:
    """``base_model`` from a model card's YAML front matter (a string or a list), without a YAML library.

    Returns:
        the base model ids in order (empty when there is none).
    """
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    front = text[3:end if end >= 0 else len(text)].splitlines()
    out: list[str] = []
    for i, line in enumerate(front):
        if not line.startswith("base_model:"):
            continue
        val = line.split(":", 1)[1].strip()
        if val.startswith("["):
            with contextlib.suppress(json.JSONDecodeError):
                out += [str(x) for x in json.loads(val.replace("'", '"'))]
        elif val:
            out.append(val.strip("'\""))
        else:
            for nxt in front[i + 1:]:
                s = nxt.strip()
                if not s.startswith("- "):
                    break
                out.append(s[2:].strip().strip("'\""))
        break
    return [b for b in out if b]
