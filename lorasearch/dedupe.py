"""Duplicate and lineage groups in a LoRA collection (``lorasearch dedupe``).

Four tiers, strongest first; each is only asked of what the stronger ones left
distinct, so most of a large collection costs one sha256 pass:

1. ``bytes``: the same file (its bytes, plus the PEFT sidecar config's bytes
   when there is one). Every file is read once, in threads, and every byte
   hashed once with sha256, as two parts: the length and JSON header, and the
   rest, whose hash is AutoV3 (``split_hashes``); equal parts are equal files.
   The file's own sha256 is computed only where it is shown (a group's keep).
2. ``tensors``: the same tensors under another header (the same AutoV3, from
   the same pass), or the same decoded modules under other keys or in another
   order (``store.content_hash`` of the canonical modules: names, factor
   values, scales; same dtypes; computed only for files whose cheap
   ``content_prekey`` another file shares). A PEFT sidecar's update fields
   (``r``, ``lora_alpha``, patterns, rsLoRA, DoRA) are part of the identity.
3. ``update``: the same ΔW in another format, dtype, factorisation or alpha:
   exact ΔW cosine ≥ ``UPDATE_COSINE`` over the same set of non-zero modules
   (``frobenius.compare``); the coefficient is reported when only the scale
   differs. One file per tensors group is read and embedded; candidates come
   from a kNN search of the ``delta`` view vectors within each family (FAISS
   flat inner product), so only near pairs are compared exactly.
4. ``lineage``: further trained, rank-resized, module subsets: the attribution
   engine's verdict ``derived`` for one update group against its kNN
   candidates (``attribution.engine.exact_stats`` + ``decide``), calibrated on
   the collection's own null of unrelated pairs (or on the store's, with
   ``--db``). A file whose verdict is ``merged`` links to nothing, so a merge
   never chains two unrelated LoRAs together. Files that share only a training
   script and seed have unrelated updates (exact ΔW cosine ~0.01), so they are
   not grouped.

Groups nest (bytes ⊆ tensors ⊆ update ⊆ lineage). A file is listed in the
group of its strongest tier; the ``keep`` file of a group also stands for that
group in the next weaker group that contains it (``evidence.stands_for``).
Nothing is ever deleted or modified.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence, TypeVar

import numpy as np

from lorasearch.delta import LoraDelta, NeedsBase
from lorasearch.errors import BadInput, LoraSearchError
from lorasearch.hashes import autov3_start

TIERS = ("bytes", "tensors", "update", "lineage")
UPDATE_COSINE = 0.999
# |coefficient − 1| above this: the update differs only by its scale (alpha / weight).
SCALE_TOLERANCE = 1e-3
# kNN candidates per update group, and the delta-view (sketch) cosine a candidate needs.
NEIGHBOURS = 16
CANDIDATE_COSINE = 0.08
CANDIDATE_SIGMAS = 3.0
# A pair is compared exactly for the update tier only when its sketch cosine is this close to 1
# (sketch error has σ ≈ 0.02 at k = 8, DESIGN.md).
UPDATE_SKETCH_COSINE = 0.85
# A module whose ‖ΔW‖² is below this share of the file's total counts as absent (untrained, all-zero).
ZERO_MODULE_SHARE = 1e-12
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
FAMILY_BUCKETS = {"sd15": "sd1-2", "sd2": "sd1-2"}
CACHE_BYTES = 1 << 30  # the least file bytes of LoraDeltas kept in memory (``cache_budget``)

_PRECISION = {"F64": 4, "F32": 3, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                  "fan_in_fan_out", "init_lora_weights")

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
WHOLE_READ_BYTES = 64 << 20
HASH_CHUNK = 64  # files per hashing task: one task per file costs more than hashing a small file

Progress = Callable[[str, int, int], None]
KEEP_RULES = {
    "bytes": "identical files: the shortest path, then alphabetical",
    "tensors": "identical tensors: the smallest file, then the first by path",
    "update": "the same update: the smallest lossless file (highest-precision dtype of the group), then by path",
    "lineage": "related models, not copies: the most complete one (most modules, highest rank, precision), then smallest",
}


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One input LoRA (a file, or a PEFT folder / file with its sidecar config)."""

    path: str
    weights: Path
    config: Path | None
    size: int = 0
    sha256: str = ""  # the file's sha256: computed in the pass only for files without a safetensors header
    config_key: str = ""
    error: str | None = None
    head: str = ""  # sha256 of the bytes before the AutoV3 region
    autov3: str | None = None  # sha256 of the AutoV3 region (None: no valid header)

    @property
    def byte_key(self) -> str:
        key = f"h:{self.head}:{self.autov3}" if self.autov3 is not None else f"s:{self.sha256}"
        return key + (f":{self.config_key}" if self.config is not None else "")


def item_sha256(item: Item) -> str:
    """The file's sha256 (hashed again on first use: the pass hashes the file as two parts)."""
    if not item.sha256:
        item.sha256 = sha256_file(item.weights)[0]
    return item.sha256


def enumerate_inputs(paths: Sequence[str | Path]) -> tuple[list[Item], list[dict[str, str]]]:
    """Every LoRA under the given files and folders (PEFT folders once), each path once.

    Folders are walked with ``os.scandir`` (one listing per folder, no per-file
    ``stat``): on 10,000 small files the walk would otherwise cost about as much
    as hashing them. What is found matches ``formats.load.find_loras``.

    Returns:
        (items, skipped ``{"path", "error"}`` for pickled or unreadable inputs).

    Raises:
        BadInput: a path that does not exist, or nothing to read at all.
    """
    from lorasearch.formats.load import resolve_path

    items: list[Item] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(item: Item) -> None:
        key = os.path.abspath(item.weights)
        if key not in seen:
            seen.add(key)
            items.append(item)

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise BadInput(f"{p}: no such file or folder", code="not_found")
        if p.is_dir() and not (p / PEFT_WEIGHTS).is_file():
            for item in _walk(str(p), skipped):
                add(item)
            continue
        try:
            weights, config = resolve_path(p)
        except BadInput as exc:
            skipped.append({"path": str(p), "error": str(exc)})
            continue
        add(Item(str(p), weights, config))
    if not items and not skipped:
        raise BadInput(f"no LoRA .safetensors files under {', '.join(str(p) for p in paths)}", code="not_a_lora")
    return items, skipped


def _walk(folder: str, skipped: list[dict[str, str]]) -> Iterable[Item]:
    """LoRA items under a folder, depth first in name order (PEFT folders as one item)."""
    from lorasearch.formats.safetensors_file import PICKLE_SUFFIXES

    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        skipped.append({"path": folder, "error": f"{folder}: cannot list: {exc.strerror or exc}"})
        return
    names = {e.name for e in entries}
    peft = PEFT_WEIGHTS in names and PEFT_CONFIG in names
    if peft:
        yield Item(folder, Path(folder, PEFT_WEIGHTS), Path(folder, PEFT_CONFIG))
    for e in entries:
        if e.is_dir():
            yield from _walk(e.path, skipped)
            continue
        if e.name.endswith(".safetensors") and not (peft and e.name == PEFT_WEIGHTS):
            side = e.name[: -len(".safetensors")] + ".adapter_config.json"
            cfg = Path(folder, side) if side in names else None
            yield Item(e.path, Path(e.path), cfg)
        elif Path(e.name).suffix.lower() in PICKLE_SUFFIXES:
            skipped.append({"path": e.path, "error": f"{e.path}: pickled weights are never unpickled"})


def _config_key(path: Path) -> str:
    """The update-relevant fields of a PEFT config, as a short hash (another base model name is the same update)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "bad:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
    if not isinstance(cfg, dict):
        return "bad"
    sub = {k: cfg.get(k) for k in _CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]


_T = TypeVar("_T")


def _hash_file(path: str | Path, whole: Callable[[bytes, int], _T], chunked: Callable[[BinaryIO, int], _T]) -> _T:
    """``whole(data, size)`` after one ``read`` for files up to ``WHOLE_READ_BYTES`` (no per-chunk
    Python loop: most LoRAs are a few MiB), else ``chunked(fh, size)`` on the file from its start."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size <= WHOLE_READ_BYTES:
            data = os.read(fd, size)
            if len(data) == size:
                return whole(data, size)
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return chunked(fh, size)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(lower-case hex sha256, size) of a file, read once."""
    return _hash_file(path, lambda data, size: (hashlib.sha256(data).hexdigest(), size),
                      lambda fh, size: (hashlib.file_digest(fh, "sha256").hexdigest(), size))


def split_hashes(path: str | Path) -> tuple[str, str | None, str, int]:
    """One read of a file, every byte hashed once with sha256, in two parts: the bytes before the
    AutoV3 region (length and JSON header) and the region itself, whose hash is AutoV3.

    Equal files have equal parts (the first 8 bytes fix where the split is) and the converse
    holds, so the pair identifies the bytes as the file's sha256 would, and the tensors tier gets
    every AutoV3 without a second pass over the data.

    Returns:
        (head hash, AutoV3 upper-case, "", size), or for a file without a valid safetensors header
        ("", None, sha256 of the whole file, size).
    """
    def whole(data: bytes, size: int) -> tuple[str, str | None, str, int]:
        split = _split_at(data[:8], size)
        if split is None:
            return "", None, hashlib.sha256(data).hexdigest(), size
        view = memoryview(data)
        return hashlib.sha256(view[:split]).hexdigest(), hashlib.sha256(view[split:]).hexdigest().upper(), "", size

    def chunked(fh: BinaryIO, size: int) -> tuple[str, str | None, str, int]:
        split = _split_at(fh.read(8), size)
        fh.seek(0)
        if split is None:
            return "", None, hashlib.file_digest(fh, "sha256").hexdigest(), size
        head = hashlib.sha256(fh.read(split)).hexdigest()
        return head, hashlib.file_digest(fh, "sha256").hexdigest().upper(), "", size

    return _hash_file(path, whole, chunked)


def _split_at(first8: bytes, size: int) -> int | None:
    """Where the AutoV3 region starts, or None without a valid header length."""
    if len(first8) < 8:
        return None
    (n,) = struct.unpack("<Q", first8)
    return autov3_start(n) if 8 + n <= size else None


def hash_item(item: Item) -> Item:
    """The weights file hashed (one read: ``split_hashes``) and the config key; errors are recorded, not raised."""
    try:
        item.head, item.autov3, item.sha256, item.size = split_hashes(item.weights)
        if item.config is not None:
            item.config_key = _config_key(item.config)
            item.size += item.config.stat().st_size
    except OSError as exc:
        item.error = f"{item.path}: cannot read: {exc.strerror or exc}"
    return item


def _hash_chunk(chunk: list[Item]) -> list[Item]:
    return [hash_item(it) for it in chunk]


def autov3_of(path: Path) -> str:
    """AutoV3 of a safetensors file (the bytes after the header), with a one-line error for non-safetensors."""
    from lorasearch.hashes import autov3

    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
    if len(head) < 8:
        raise BadInput(f"{path}: truncated: shorter than the 8-byte safetensors header length", code="truncated")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise BadInput(f"{path}: not a safetensors file (header length {n} for {size} bytes)", code="bad_header")
    return autov3(path, n)


# --------------------------------------------------------------------------- clusters


class UnionFind:
    """Disjoint sets over 0..n-1 (the smaller root wins, so the result does not depend on edge order)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


@dataclass
class Node:
    """One tensors group that was read: its representative file, update and delta-view vector."""

    members: list[int]  # byte-group indices
    path: str
    family: str  # the comparison bucket (``family_bucket``)
    vector: np.ndarray | None
    modules: int
    max_rank: int
    precision: int
    autov3: str
    content: str
    style: np.ndarray | None = None
    detected_family: str = ""  # the family read from the file (``read_lora`` keeps it in metadata)


def cache_budget(floor: int = CACHE_BYTES) -> int:
    """File bytes of LoraDeltas to keep in memory: a quarter of the available memory, at least ``floor``.

    The update, lineage and evidence steps visit nodes in kNN order, not read order: a cache
    smaller than the read set re-reads files over and over (measured: with 1 GiB for 1,000 SD1.5 files
    of 3 MB, the update step took nearly as long as reading them all). Decoded fp16 files take twice their bytes.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return floor
    return max(floor, avail // 4)


class LoraCache:
    """LoraDeltas by node, re-read from their file when evicted (bounded in file bytes)."""

    def __init__(self, loader: Callable[[int], LoraDelta], sizes: Callable[[int], int], max_bytes: int | None = None) -> None:
        self.loader, self.sizes = loader, sizes
        self.max_bytes = cache_budget() if max_bytes is None else max_bytes
        self._items: OrderedDict[int, LoraDelta] = OrderedDict()
        self._bytes = 0

    def put(self, i: int, ld: LoraDelta) -> None:
        if i in self._items:
            return
        self._items[i] = ld
        self._bytes += self.sizes(i)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            j, _ = self._items.popitem(last=False)
            self._bytes -= self.sizes(j)

    def get(self, i: int) -> LoraDelta:
        ld = self._items.get(i)
        if ld is not None:
            self._items.move_to_end(i)
            return ld
        ld = self.loader(i)
        self.put(i, ld)
        return ld


def view_vectors(ld: LoraDelta) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ``delta`` and ``style`` view vectors of one LoRA, or None.

    ``delta`` finds the same update and most lineage; ``style`` (every module at
    unit norm) finds module subsets whose kept modules hold little of the energy
    (a LoRA without its attn2 modules can keep 5 % of it: a delta cosine of 0.2).
    Unlike ``embed``, modules are weighted by their exact norms: dedupe needs the
    exact norms anyway (``live_modules``), and only compares files among themselves.
    """
    from lorasearch.sketch import DEFAULT_DIM, delta_vector, sketch_and_norms, style_vector

    sketches, norms = sketch_and_norms(ld)
    live = {n: z for n, z in sketches.items() if norms.get(n, 0.0) > 0}
    if not live:
        return None, None
    return _unit(delta_vector(live, DEFAULT_DIM)), _unit(style_vector(live, norms, DEFAULT_DIM))


def _unit(v: np.ndarray) -> np.ndarray | None:
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else None


@dataclass
class ReadOut:
    """One file read for the update and lineage tiers (or the reason it could not be)."""

    ld: LoraDelta | None = None
    error: str | None = None
    vector: np.ndarray | None = None
    style: np.ndarray | None = None
    content: str = ""
    modules: int = 0
    max_rank: int = 0
    precision: int = 0


def read_node(path: str, config_key: str) -> ReadOut:
    """Read one LoRA and compute what the tiers need: view vectors, content pre-key, completeness."""
    try:
        ld = read_lora(path)
    except LoraSearchError as exc:
        return ReadOut(error=_one_line(exc))
    vec, style = view_vectors(ld)
    dtypes = ld.metadata.get("dtypes", [])
    content = content_prekey(ld, config_key)
    ranks = ld.ranks()
    return ReadOut(ld, None, vec, style, content, len(ld.weight_modules()), max(ranks) if ranks else 0, precision(dtypes))


def _arrays(d: Any) -> list[Any]:
    """The arrays ``store.content_hash`` hashes for one module (same choice, same order)."""
    from lorasearch.delta import Dense, Factored, Kronecker

    if isinstance(d, Factored):
        return [d.up, d.down]
    if isinstance(d, Kronecker):
        return [getattr(d.w1, "up", d.w1), getattr(d.w1, "down", d.w1), getattr(d.w2, "up", d.w2),
                getattr(d.w2, "down", d.w2)]
    if isinstance(d, Dense):
        return [d.values]
    return [d.tensors[t] for t in sorted(d.tensors)]


def content_prekey(ld: LoraDelta, config_key: str = "") -> str:
    """A cheap key that equal decoded contents always share: dtypes, config, names, kinds, shapes, scales
    and three values of every array (``content_key`` of the whole values is computed only on a collision).

    ``store.content_hash`` hashes every factor byte (a fifth of a 3 MB file's read); most files of a
    collection have no other file with the same modules, and this key tells them apart.
    """
    parts: list[Any] = [ld.metadata.get("dtypes", []), config_key]
    for name in sorted(ld.modules):
        d = ld.modules[name]
        parts.append((name, d.kind, getattr(d, "scale", None)))
        for a in _arrays(d):
            a = np.asarray(a)
            parts.append((a.shape, a.dtype.str) + ((a.item(0), a.item(a.size // 2), a.item(-1)) if a.size else ()))
    return "pre:" + hashlib.sha256(repr(parts).encode()).hexdigest()


def content_key(ld: LoraDelta, config_key: str = "") -> str:
    """The exact content identity: dtypes, ``store.content_hash`` (names and every value), config."""
    from lorasearch.store import content_hash

    dtypes = ld.metadata.get("dtypes", [])
    return hashlib.sha256(f"{','.join(dtypes)}|{content_hash(ld)}|{config_key}".encode()).hexdigest()


def precision(dtypes: Iterable[str]) -> int:
    """Lowest precision among a file's float dtypes (higher keeps more of the update)."""
    ps = [_PRECISION[d] for d in dtypes if d in _PRECISION]
    return min(ps) if ps else 0


def live_modules(ld: LoraDelta) -> set[str]:
    """Modules with a non-zero additive update (an all-zero module applies nothing)."""
    from lorasearch.frobenius import module_sq_norms

    norms = module_sq_norms(ld)
    total = sum(norms.values())
    return {n for n, v in norms.items() if v > ZERO_MODULE_SHARE * total}


def same_update(a: LoraDelta, b: LoraDelta, min_cosine: float = UPDATE_COSINE) -> dict[str, Any] | None:
    """Evidence that two LoRAs apply the same ΔW up to scale, or None.

    The same non-zero modules, no module needing the base, and exact cosine ≥
    ``min_cosine``; ``coefficient`` (``ΔW_b ≈ c·ΔW_a``) when c is not 1.
    """
    from lorasearch.frobenius import compare

    if a.family != b.family or any(isinstance(d, NeedsBase) for d in (*a.modules.values(), *b.modules.values())):
        return None
    if live_modules(a) != live_modules(b):
        return None
    cmp = compare(a, b)
    if cmp.cosine is None or cmp.cosine < min_cosine:
        return None
    ev: dict[str, Any] = {"cosine": round(float(cmp.cosine), 6), "shared_modules": cmp.shared_modules}
    if cmp.coefficient is not None and abs(cmp.coefficient - 1.0) > SCALE_TOLERANCE:
        ev["coefficient"] = round(float(cmp.coefficient), 6)
    return ev


def candidate_floor(vectors: np.ndarray, floor: float = CANDIDATE_COSINE, sigmas: float = CANDIDATE_SIGMAS,
                    samples: int = 4000) -> float:
    """The sketch cosine a lineage candidate needs: ``max(floor, sigmas·σ̂)``.

    σ̂ = 1.4826 × median |cosine| of random pairs (robust to the few related
    ones): the spread of unrelated pairs' sketch cosines, which is larger for
    LoRAs with few or small modules (0.05 for the tiny UNet's 40 modules).
    """
    n = vectors.shape[0]
    if n < 3:
        return floor
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, n, size=(2, samples))
    ok = a != b
    sims = np.einsum("ij,ij->i", vectors[a[ok]], vectors[b[ok]])
    return max(floor, sigmas * 1.4826 * float(np.median(np.abs(sims)))) if sims.size else floor


def knn_pairs(vectors: np.ndarray, k: int = NEIGHBOURS, min_cosine: float = CANDIDATE_COSINE) -> list[tuple[int, int, float]]:
    """Pairs (i < j, cosine) among unit vectors that are within each other's ``k`` nearest and above ``min_cosine``.

    FAISS flat inner-product search (blocked BLAS): O(n²·D) flops but no n×n matrix in memory.
    """
    import faiss

    n = vectors.shape[0]
    if n < 2:
        return []
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, min(n, k + 1))
    out: dict[tuple[int, int], float] = {}
    for i in range(n):
        for s, j in zip(sims[i], nbrs[i]):
            if j < 0 or j == i or s < min_cosine:
                continue
            key = (min(i, int(j)), max(i, int(j)))
            out[key] = max(float(s), out.get(key, -1.0))
    return [(a, b, s) for (a, b), s in sorted(out.items())]


# --------------------------------------------------------------------------- lineage


CROWD_NEIGHBOURS = 12
# Grouping files says they are one LoRA's lineage, on weights alone and often without an index
# whose lineage metadata cleans the null: dedupe asks for half attribute's default fpr.
LINEAGE_MAX_FPR = 1e-4


def lineage_thresholds() -> Any:
    """The attribution thresholds dedupe's lineage verdicts use (``LINEAGE_MAX_FPR``)."""
    from lorasearch.attribution.engine import Thresholds

    return Thresholds(max_fpr=LINEAGE_MAX_FPR)


def collection_calibration(family: str, lds: Sequence[LoraDelta], related: np.ndarray | None = None) -> Any:
    """The null of unrelated pairs within the collection (``attribution.calibration``), without a store.

    A collection has no repository lineage, so a pair above ``LINEAGE_COSINE`` may be one
    lineage (checkpoints of one run, a resize, a subset) and is left out, unless both files
    are in a crowd: more than ``CROWD_NEIGHBOURS`` files above that cosine each. A lineage
    is a handful of files; a crowd is a population of look-alike LoRAs (one tiny base, one
    seed and sampling stream: the zoo's paper setting reaches 0.85 between unrelated
    LoRAs), whose pairs the null must hold to know how high unrelated pairs reach. Pairs
    above ``NULL_MAX_COSINE`` (copies of one update) and those marked ``related`` are left out.
    """
    from lorasearch.attribution.calibration import (
        LINEAGE_COSINE,
        NULL_MAX_COSINE,
        Calibration,
        family_gram,
        null_from_gram,
    )

    n = len(lds)
    if n < 2:
        return Calibration(family, 0, np.zeros(0), np.zeros(0), n, n)
    g, cos = family_gram(list(lds))
    a = np.abs(np.nan_to_num(cos))
    np.fill_diagonal(a, -1.0)
    above = a > LINEAGE_COSINE
    crowd = above.sum(axis=1) > CROWD_NEIGHBOURS
    rel = (a > NULL_MAX_COSINE) | (above & ~(crowd[:, None] & crowd[None, :]))
    if related is not None:
        rel |= related
    np.fill_diagonal(rel, True)
    seed = int.from_bytes(hashlib.sha256(f"dedupe\x1f{family}".encode()).digest()[:8], "little")
    cos_null, part_null = null_from_gram(g, cos, rel, np.random.default_rng(seed))
    ex = int(np.triu(rel, 1).sum())
    return Calibration(family, 0, cos_null, part_null, n, n, 0, ex, True, {"source": "collection"})


def lineage_verdict(target: LoraDelta, cands: Sequence[LoraDelta], cal: Any, th: Any = None) -> dict[str, Any]:
    """The attribution engine's decision for one target against candidate LoRAs (no store).

    Returns:
        ``{"verdict": none|derived|merged, "chosen": [candidate index], "explained",
        "links": [{"cosine", "fpr", "coefficient", "shared_modules", "explained"}]}`` (one per chosen).
    """
    from lorasearch.attribution.engine import Target, decide, exact_stats
    from lorasearch.frobenius import module_sq_norms

    th = th or lineage_thresholds()
    t = Target.from_lora(target, str(target.source.get("path") or "target"))
    stats = exact_stats(t, list(range(len(cands))), list(cands))
    norms2 = np.array([sum(module_sq_norms(c).values()) for c in cands])
    dec = decide(stats, [cal] * len(cands), norms2, th)
    chosen = list(dec["chosen"])
    verdict = "none" if not chosen else ("derived" if len(chosen) == 1 else "merged")
    out: dict[str, Any] = {"verdict": verdict, "chosen": chosen, "explained": round(float(dec["explained"]), 4),
                           "links": []}
    for j, i in enumerate(chosen):
        out["links"].append({"cosine": round(float(dec["cosine"][i]), 6), "fpr": float(dec["fpr"][i]),
                             "coefficient": round(float(dec["coef"][j]), 6), "shared_modules": int(stats.shared[i]),
                             "explained": out["explained"]})
    return out


def one_lineage(lds: Sequence[LoraDelta], cal: Any, th: Any = None) -> bool:
    """Whether LoRAs are all related: connected by significant pairwise ΔW cosines (calibrated like attribution).

    A target "explained" by several of them is then their common source (a
    full LoRA next to its own subsets, resizes and continuations), not a merge
    of unrelated LoRAs.
    """
    from lorasearch.attribution.calibration import family_gram

    th = th or lineage_thresholds()
    _, cos = family_gram(list(lds))
    n = len(lds)
    uf = UnionFind(n)
    for a in range(n):
        for b in range(a + 1, n):
            c = abs(float(cos[a, b])) if np.isfinite(cos[a, b]) else 0.0
            if c >= th.min_cosine and cal.fpr(c, "cosine") <= th.max_fpr:
                uf.union(a, b)
    return len(uf.groups()) == 1


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    """What ``dedupe`` found.

    Attributes:
        items: every hashed input, by index.
        cluster: item index -> tier -> cluster id (clusters nest: bytes ⊆ tensors ⊆ update ⊆ lineage;
            a file that could not be read as a LoRA has its own negative id beyond the bytes tier).
        groups: the JSON groups (see the module docstring).
        skipped: ``{"path", "error"}`` for inputs that could not be read.
        indexed: with a store, the indexed entry of each update group (``resolve``).
        merges: files whose ΔW is a merge of several unrelated ones here (grouped with none of them).
        timings: seconds per stage.
    """

    items: list[Item]
    cluster: list[dict[str, int]]
    groups: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    indexed: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    merges: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"files": self.counts.get("inputs", len(self.items)), "groups": self.groups}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.indexed:
            out["indexed"] = self.indexed
        if self.merges:
            out["merges"] = self.merges
        out["read"] = self.counts
        return out

    def pair_tier(self, a: int, b: int) -> str | None:
        """The strongest tier at which items ``a`` and ``b`` fall in one group (None: not grouped)."""
        for t in TIERS:
            if self.cluster[a][t] == self.cluster[b][t]:
                return t
        return None


def _noop(stage: str, done: int, total: int) -> None:
    pass


def dedupe(paths: Sequence[str | Path], store: Any = None, progress: Progress | None = None,
           threads: int = HASH_THREADS, lineage: bool = True) -> Result:
    """Group a collection of LoRA files by identity and lineage (see the module docstring).

    Args:
        paths: files, PEFT folders and folders (searched recursively).
        store: an open ``Store``: its calibration is used for the lineage tier of
            its families, and each update group is matched against its entries.
        progress: ``(stage, done, total)`` callback.
        threads: hashing threads.
        lineage: run the lineage tier.

    Returns:
        the Result (``to_json()`` for the CLI).

    Raises:
        BadInput: a path that does not exist, or no LoRA at all.
    """
    from lorasearch.search import one_blas_thread

    with one_blas_thread():  # every product here is rank-sized: a second BLAS thread only adds contention
        return _dedupe(paths, store, progress, threads, lineage)


def _dedupe(paths: Sequence[str | Path], store: Any, progress: Progress | None, threads: int, lineage: bool) -> Result:
    """``dedupe`` under one BLAS thread."""
    import time

    prog = progress or _noop
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    items, skipped = enumerate_inputs(paths)
    n_inputs = len(items) + len(skipped)

    # 1. bytes: every file hashed once
    done = 0
    chunks = [items[i:i + HASH_CHUNK] for i in range(0, len(items), HASH_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for chunk in pool.map(_hash_chunk, chunks):
            done += len(chunk)
            prog("hashing", done, len(items))
    skipped += [{"path": it.path, "error": it.error or ""} for it in items if it.error]
    items = [it for it in items if not it.error]  # unreadable from here on: reported, never grouped
    byte_groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        byte_groups.setdefault(it.byte_key, []).append(i)
    bgroups = [sorted(v, key=lambda i: _path_order(items[i].path)) for v in byte_groups.values()]
    timings["hash"] = time.perf_counter() - t0

    # 2. tensors: AutoV3 from the hashing pass; files without a valid header are reported here
    t1 = time.perf_counter()
    tensor_key: dict[int, str] = {}
    bad_b: set[int] = set()
    autov3s: dict[int, str] = {}
    for b, members in enumerate(bgroups):
        rep = items[members[0]]
        if rep.autov3 is None:  # no valid header when hashed: autov3_of says why (or hashes a file changed since)
            try:
                rep.autov3 = autov3_of(rep.weights)
            except (BadInput, OSError) as exc:
                bad_b.add(b)
                skipped += [{"path": items[i].path, "error": _one_line(exc)} for i in members]
                continue
        autov3s[b] = rep.autov3
        tensor_key[b] = rep.autov3 + (f":{rep.config_key}" if rep.config is not None else "")
    tgroups_map: dict[str, list[int]] = {}
    for b in range(len(bgroups)):
        if b not in bad_b:
            tgroups_map.setdefault(tensor_key[b], []).append(b)
    tgroups = list(tgroups_map.values())
    timings["tensor_hash"] = time.perf_counter() - t1

    # 3. read and embed one file per tensors group
    t2 = time.perf_counter()
    nodes: list[Node] = []
    # LoraDeltas stay in memory up to cache_budget() bytes of files, and are re-read beyond that
    cache = LoraCache(lambda i: _reload(nodes[i], items, bgroups), lambda i: items[bgroups[nodes[i].members[0]][0]].size)
    # one thread: parsing and decoding hold the GIL (a 2-thread pool measured no faster), and a
    # forked process pool hung in processes that had loaded torch
    for g, bs in enumerate(tgroups):
        rep = items[bgroups[bs[0]][0]]
        out = read_node(rep.path, rep.config_key)
        prog("reading", g + 1, len(tgroups))
        if out.error is not None or out.ld is None:
            skipped += [{"path": items[i].path, "error": out.error or ""} for b in bs for i in bgroups[b]]
            continue
        out.ld.source["autov3"] = autov3s[bs[0]]
        nodes.append(Node(list(bs), rep.path, out.ld.family, out.vector, out.modules, out.max_rank, out.precision,
                          autov3s[bs[0]], out.content, out.style, str(out.ld.metadata.get("family", ""))))
        cache.put(len(nodes) - 1, out.ld)
    timings["read_embed"] = time.perf_counter() - t2
    counts = {"files": len(items), "hashed": len(items), "byte_groups": len(bgroups), "read": len(nodes)}

    # tensors tier, second key: the same decoded modules in another key order (the exact key only
    # where the cheap pre-key collides: equal contents always share the pre-key)
    t3 = time.perf_counter()
    _confirm_contents(nodes, items, bgroups, cache)
    uf_t = UnionFind(len(nodes))
    by_content: dict[str, int] = {}
    for i, nd in enumerate(nodes):
        j = by_content.setdefault(nd.content, i)
        uf_t.union(i, j)
    tensor_clusters = uf_t.groups()  # root -> node indices

    # 4. update tier over tensor clusters (root node = representative)
    roots = sorted(tensor_clusters)
    uf_u = UnionFind(len(nodes))
    for r, ms in tensor_clusters.items():
        for m in ms:
            uf_u.union(r, m)
    by_family = _by_family(nodes, roots)
    checked = 0
    for f_i, ids in enumerate(by_family.values()):
        vecs = np.stack([nodes[i].vector for i in ids])
        for a, b, s in ((ids[a], ids[b], s) for a, b, s in knn_pairs(vecs)):
            if s < UPDATE_SKETCH_COSINE or uf_u.find(a) == uf_u.find(b):
                continue
            checked += 1
            if same_update(cache.get(a), cache.get(b)) is not None:
                uf_u.union(a, b)
        prog("updates", f_i + 1, len(by_family))
    counts["update_pairs_checked"] = checked
    timings["update"] = time.perf_counter() - t3

    # 5. lineage tier over update clusters
    t4 = time.perf_counter()
    update_clusters = uf_u.groups()
    uf_l = UnionFind(len(nodes))
    for r, ms in update_clusters.items():
        for m in ms:
            uf_l.union(r, m)
    lineage_links: list[dict[str, Any]] = []
    merged: dict[int, dict[str, Any]] = {}
    if lineage:
        lineage_links, merged, n_verdicts = _lineage(nodes, update_clusters, cache, store, uf_l, prog)
        counts["lineage_targets"] = n_verdicts
    timings["lineage"] = time.perf_counter() - t4

    # 6. clusters per item (unreadable files stay alone beyond the bytes tier), groups
    cluster: list[dict[str, int]] = [{t: -(i + 1) for t in TIERS} for i in range(len(items))]
    for b, members in enumerate(bgroups):
        for i in members:
            cluster[i]["bytes"] = b
    readable: set[int] = set()
    for n_i, nd in enumerate(nodes):
        for b in nd.members:
            for i in bgroups[b]:
                readable.add(i)
                cluster[i]["tensors"] = uf_t.find(n_i)
                cluster[i]["update"] = uf_u.find(n_i)
                cluster[i]["lineage"] = uf_l.find(n_i)
    groups = _build_groups(items, bgroups, nodes, cluster, readable, cache, lineage_links)
    merges = [{"file": nodes[t].path, "components": [nodes[v["cands"][c]].path for c in v["chosen"]],
               "explained": v["explained"]} for t, v in sorted(merged.items())]
    indexed = _match_store(store, nodes, uf_u, cache, items, bgroups) if store is not None else []
    timings["total"] = time.perf_counter() - t0
    counts["inputs"] = n_inputs
    return Result(items, cluster, groups, skipped, indexed, timings, counts, merges)


def _confirm_contents(nodes: list[Node], items: list[Item], bgroups: list[list[int]], cache: LoraCache) -> None:
    """Replace the pre-key by the exact content key on nodes whose pre-key another node has."""
    by_pre: dict[str, list[int]] = {}
    for i, nd in enumerate(nodes):
        by_pre.setdefault(nd.content, []).append(i)
    for ids in by_pre.values():
        if len(ids) > 1:
            for i in ids:
                nodes[i].content = content_key(cache.get(i), items[bgroups[nodes[i].members[0]][0]].config_key)


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


def _path_order(path: str) -> tuple[int, str]:
    return (len(path), path)


def _reload(nd: Node, items: list[Item], bgroups: list[list[int]]) -> LoraDelta:
    rep = items[bgroups[nd.members[0]][0]]
    ld = read_lora(rep.path)
    ld.source["autov3"] = nd.autov3
    return ld


def family_bucket(family: str) -> str:
    """The family LoRAs are compared within: every ``unknown:<hash of the module set>`` is one bucket.

    A module subset of an unrecognised model gets another ``unknown:`` hash, but its
    canonical names are the same flattened paths, so it still compares (as in
    ``attribution.engine.candidate_families``). SD1.x and SD2.x share module names
    and every shape but attn2's to_k/to_v: an SD2 LoRA without its attn2 modules
    is detected as SD1.5, so the two are one bucket (only same-shaped modules compare).
    """
    if family.startswith("unknown:"):
        return "unknown"
    return FAMILY_BUCKETS.get(family, family)


def read_lora(path: str | Path) -> LoraDelta:
    """``load_lora`` without hashes, its family replaced by its comparison bucket (the real one kept in metadata)."""
    from lorasearch.formats import load_lora

    ld = load_lora(path, hashes=False)
    ld.metadata["family"] = ld.family
    ld.family = family_bucket(ld.family)
    return ld


def _by_family(nodes: list[Node], ids: Iterable[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in ids:
        if nodes[i].vector is not None:
            out.setdefault(nodes[i].family, []).append(i)
    return out


def _rep_of(ms: list[int], nodes: list[Node]) -> int:
    """The update group's representative for lineage: the most complete, highest-precision member."""
    return min(ms, key=lambda i: (-nodes[i].modules, -nodes[i].precision, -nodes[i].max_rank, i))


def _lineage(nodes: list[Node], update_clusters: dict[int, list[int]], cache: LoraCache, store: Any,
             uf_l: UnionFind, prog: Progress) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], int]:
    """Derived links between update groups (attribution verdicts); merged targets link to nothing."""
    reps = {root: _rep_of(ms, nodes) for root, ms in update_clusters.items()}
    rep_ids = sorted(reps.values())
    by_family = _by_family(nodes, rep_ids)
    verdicts: dict[int, dict[str, Any]] = {}
    cands_of: dict[int, list[int]] = {}
    for fam, ids in by_family.items():
        found: set[tuple[int, int]] = set()
        for view in ("vector", "style"):
            sel = [i for i in ids if getattr(nodes[i], view) is not None]
            if len(sel) < 2:
                continue
            vecs = np.stack([getattr(nodes[i], view) for i in sel])
            found.update((sel[a], sel[b]) for a, b, _ in knn_pairs(vecs, min_cosine=candidate_floor(vecs)))
        for a, b in sorted(found):
            cands_of.setdefault(a, []).append(b)
            cands_of.setdefault(b, []).append(a)
    cals: dict[str, Any] = {}
    done = 0
    from lorasearch.frobenius import compare

    min_cos = lineage_thresholds().min_cosine
    for t, cs in sorted(cands_of.items()):
        fam = nodes[t].family
        done += 1
        prog("lineage", done, len(cands_of))
        # no candidate reaches the verdict's minimum cosine: no verdict can be 'derived' (cheap exact screen
        # before the full decision, which factorises every target module)
        tl = cache.get(t)
        if max((abs(c.cosine or 0.0) for c in (compare(tl, cache.get(x)) for x in cs)), default=0.0) < min_cos:
            continue
        if fam not in cals:
            cals[fam] = _calibration(fam, by_family[fam], [nodes[i].detected_family for i in by_family[fam]],
                                     cache, store)
        verdicts[t] = {**lineage_verdict(tl, [cache.get(c) for c in cs], cals[fam]), "cands": cs}
    merged: dict[int, dict[str, Any]] = {}
    for t, v in verdicts.items():
        if v["verdict"] == "merged":
            comps = [v["cands"][i] for i in v["chosen"]]
            if one_lineage([cache.get(c) for c in comps], cals[nodes[t].family]):
                v["verdict"] = "source"  # explained by its own derivatives together
            else:
                merged[t] = v
    links = []
    seen_pairs: set[tuple[int, int]] = set()
    for t, v in sorted(verdicts.items()):
        if v["verdict"] not in ("derived", "source") or t in merged:
            continue
        for i, ln in zip(v["chosen"], v["links"]):
            src = v["cands"][i]
            if src in merged or (src, t) in seen_pairs:
                continue
            seen_pairs.add((t, src))
            uf_l.union(t, src)
            links.append({"a": t, "b": src, **ln})
    return links, merged, len(verdicts)


def _calibration(family: str, ids: list[int], detected: list[str], cache: LoraCache, store: Any) -> Any:
    """The store's calibration for its families, else the collection's own null (a seeded sample).

    ``family`` is a comparison bucket; ``detected`` the families of its files, of which the
    store calibrates the most common one it holds.
    """
    from lorasearch.attribution.calibration import MAX_LORAS, get_calibration

    if store is not None:
        indexed = set(store.families())
        found = [f for f, _ in Counter(detected).most_common() if f in indexed]
        if found:
            return get_calibration(store, found[0])
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(family.encode()).digest()[:8], "little"))
    sample = sorted(rng.choice(ids, size=min(len(ids), MAX_LORAS), replace=False).tolist())
    return collection_calibration(family, [cache.get(i) for i in sample])


# --------------------------------------------------------------------------- output


def _keep(tier: str, files: list[int], items: list[Item], info: Callable[[int], Node | None]) -> int:
    if tier == "bytes":
        return min(files, key=lambda i: _path_order(items[i].path))
    if tier == "tensors":
        return min(files, key=lambda i: (items[i].size, _path_order(items[i].path)))
    if tier == "update":
        best = max((info(i).precision if info(i) else 0) for i in files)
        ok = [i for i in files if (info(i).precision if info(i) else 0) == best]
        return min(ok, key=lambda i: (items[i].size, _path_order(items[i].path)))

    def score(i: int) -> tuple[Any, ...]:
        nd = info(i)
        return (-(nd.modules if nd else 0), -(nd.max_rank if nd else 0), -(nd.precision if nd else 0), items[i].size,
                _path_order(items[i].path))
    return min(files, key=score)


def _build_groups(items: list[Item], bgroups: list[list[int]], nodes: list[Node], cluster: list[dict[str, int]],
                  readable: set[int], cache: LoraCache, links: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nested groups, strongest first; a stronger group's keep stands for it in the next weaker group."""
    node_of: dict[int, int] = {}
    for n_i, nd in enumerate(nodes):
        for b in nd.members:
            for i in bgroups[b]:
                node_of[i] = n_i

    def info(i: int) -> Node | None:
        return nodes[node_of[i]] if i in node_of else None

    node_path = {n: nd.path for n, nd in enumerate(nodes)}
    lineage_root = {n: cluster[i]["lineage"] for i, n in node_of.items()}

    groups: list[dict[str, Any]] = []
    rep: dict[int, int] = {i: i for i in range(len(items))}  # item -> the file that stands for it now
    stands: dict[int, int] = {i: 1 for i in range(len(items))}
    for tier in TIERS:
        by: dict[int, list[int]] = {}
        for i in range(len(items)):
            if tier != "bytes" and i not in readable:
                continue
            by.setdefault(cluster[i][tier], []).append(i)
        for cid, members in sorted(by.items(), key=lambda kv: min(kv[1])):
            files = sorted({rep[i] for i in members}, key=lambda i: _path_order(items[i].path))
            if len(files) < 2:
                continue
            keep = _keep(tier, files, items, info)
            ev = _evidence(tier, files, keep, items, info, node_of, cache, links, node_path, lineage_root)
            ev["keep_rule"] = KEEP_RULES[tier]
            ev["stands_for"] = {items[f].path: stands[f] for f in files if stands[f] > 1}
            if not ev["stands_for"]:
                del ev["stands_for"]
            groups.append({"tier": tier, "files": [items[f].path for f in files], "keep": items[keep].path,
                           "evidence": ev})
            for i in members:
                rep[i] = keep
            stands[keep] = len(members)
    return groups


def _evidence(tier: str, files: list[int], keep: int, items: list[Item], info: Callable[[int], Node | None],
              node_of: dict[int, int], cache: LoraCache, links: list[dict[str, Any]],
              node_path: dict[int, str], lineage_root: dict[int, int]) -> dict[str, Any]:
    if tier == "bytes":
        return {"sha256": item_sha256(items[keep]), "bytes": items[keep].size}
    if tier == "tensors":
        v3 = {info(f).autov3 for f in files if info(f)}  # type: ignore[union-attr]
        if len(v3) == 1:
            return {"autov3": next(iter(v3))}
        return {"content_hash": True, "autov3": {items[f].path: info(f).autov3 for f in files if info(f)}}  # type: ignore[union-attr]
    if tier == "update":
        base = cache.get(node_of[keep])
        rows = []
        for f in files:
            if f == keep:
                continue
            ev = same_update(base, cache.get(node_of[f]), min_cosine=-1.0) or {}
            rows.append({"file": items[f].path, **ev})
        cosines = [r["cosine"] for r in rows if "cosine" in r]
        return {"min_cosine": min(cosines) if cosines else None, "versus_keep": rows}
    root = lineage_root[node_of[keep]]
    out = []
    for ln in links:
        if lineage_root[ln["a"]] == root:
            out.append({"files": [node_path[ln["a"]], node_path[ln["b"]]],
                        **{k: ln[k] for k in ("cosine", "fpr", "coefficient", "shared_modules", "explained")}})
    return {"verdict": "derived", "links": out}


def _match_store(store: Any, nodes: list[Node], uf_u: UnionFind, cache: LoraCache, items: list[Item],
                 bgroups: list[list[int]]) -> list[dict[str, Any]]:
    """Each update group's indexed entry (``resolve``), for groups and single files alike."""
    from lorasearch.resolve import resolve

    out = []
    seen: set[int] = set()
    for i, nd in enumerate(nodes):
        r = uf_u.find(i)
        if r in seen:
            continue
        seen.add(r)
        ld = cache.get(i)
        ld.source["file_sha256"] = item_sha256(items[bgroups[nd.members[0]][0]])
        res = resolve(store, replace(ld, family=ld.metadata.get("family", ld.family), cache={}))
        if res.get("match"):
            out.append({"file": nd.path, "tier": res["tier"], "entry": res["match"], "evidence": res.get("evidence", {})})
    return out


# --------------------------------------------------------------------------- text output


def format_table(res: dict[str, Any]) -> str:
    """A readable table of the groups (the CLI's output without --json)."""
    lines = [f"{res['files']} files, {len(res['groups'])} groups"]
    for n, g in enumerate(res["groups"], 1):
        ev = g["evidence"]
        note = ""
        if g["tier"] == "update" and ev.get("min_cosine") is not None:
            coefs = [r["coefficient"] for r in ev.get("versus_keep", []) if "coefficient" in r]
            note = f"  min cosine {ev['min_cosine']:.4f}" + (f", scale ×{', ×'.join(f'{c:.3g}' for c in coefs)}" if coefs else "")
        elif g["tier"] == "lineage" and ev.get("links"):
            note = f"  min cosine {min(ln['cosine'] for ln in ev['links']):.3f}"
        lines.append(f"[{n}] {g['tier']}{note}")
        for f in g["files"]:
            lines.append(f"  {'keep' if f == g['keep'] else '    '}  {f}")
    for s in res.get("skipped", []):
        lines.append(f"skipped {s['path']}: {s['error']}")
    for m in res.get("indexed", []):
        e = m["entry"]
        lines.append(f"indexed: {m['file']} -> #{e.get('id')} {e.get('name')} ({m['tier']})")
    return "\n".join(lines)


def resave_with_metadata(src: str | Path, dst: str | Path, metadata: dict[str, str] | None) -> Path:
    """A header-edited re-save: ``src``'s tensor bytes unchanged, its ``__metadata__`` replaced.

    What metadata editors do (the data section is copied as is, so AutoV3 is
    unchanged while sha256 / AutoV2 change). For tests and the benchmark.

    Args:
        src: a safetensors file.
        dst: the new file.
        metadata: the new ``__metadata__`` (None: none).

    Returns:
        ``dst``.
    """
    raw = Path(src).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return out
