"""Per-LoRA vectors of each LoRA view, read from a store.

- ``delta``, ``style``, ``style:<group>``: the stored FAISS view vectors (the
  ``vectors`` table), as queries see them;
- ``delta:sketch``, ``style:sketch``: the same views from the full module
  sketches, before folding to D dims (defined among LoRAs of one family);
- ``paper``: the paper's flattened A/B factors (``lorasearch.paper``). It is
  only defined among LoRAs of one factor-shape signature (same modules and
  ranks, factored formats only), so it is computed on the largest such group
  and the view's mask and note say so. Uncentred it is the cosine of raw A/B;
  centred it is the paper's PCA (``paper.paper_vectors``).

Each view is a ``View``: an n×d matrix over the requested LoRA ids, a mask of
the rows where the view is defined, and a note.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lorasearch.errors import LoraSearchError

PAPER = "paper"
SKETCH_SUFFIX = ":sketch"
DEFAULT_VIEWS: tuple[str, ...] = ("delta", "style", "style:attention", "style:feed_forward", "style:conv",
                                  "style:text_encoder", "delta:sketch", "style:sketch", PAPER)


@dataclass
class View:
    """One representation of the LoRAs.

    Attributes:
        name: view name.
        x: n×d vectors (rows outside ``mask`` are zeros).
        mask: n bools, True where the view is defined.
        note: how it was made / where it is undefined.
        centred: optional replacement for the centred variant (the paper's PCA).
    """

    name: str
    x: np.ndarray
    mask: np.ndarray
    note: str = ""
    centred: np.ndarray | None = field(default=None, repr=False)


def all_rows(store: Any) -> list[dict[str, Any]]:
    """Every live LoRA row of a store (with its first source), oldest first."""
    out: list[dict[str, Any]] = []
    while True:
        page = store.list(limit=1000, offset=len(out))
        out.extend(page)
        if len(page) < 1000:
            return out


def stored_views(store: Any) -> list[str]:
    """Names of the view vectors the store holds."""
    return sorted(r[0] for r in store.execute("SELECT DISTINCT view FROM vectors"))


def stored_view(store: Any, ids: Sequence[int], name: str) -> View:
    """A view from the store's vectors table.

    Args:
        store: an open Store.
        ids: LoRA row ids.
        name: a stored view name.

    Returns:
        the View (LoRAs without that view, e.g. no module in the group, are masked out).
    """
    x = store.vectors(name, list(ids)).astype(np.float64)
    mask = np.linalg.norm(x, axis=1) > 0
    note = "" if mask.all() else f"defined for {int(mask.sum())}/{len(ids)} LoRAs (others have no module in the group)"
    return View(name, x, mask, note)


def sketch_view(store: Any, ids: Sequence[int], name: str) -> View:
    """``delta:sketch`` / ``style:sketch``: the concatenated full module sketches, unfolded.

    Modules absent from a LoRA contribute zeros; ``style`` scales every module
    sketch by its stored norm first (its sketch norm: every module counts alike).

    Args:
        store: an open Store.
        ids: LoRA row ids.
        name: ``delta:sketch`` or ``style:sketch``.

    Returns:
        the View.
    """
    style = name.startswith("style")
    files = [store.sketch_file(int(i)) for i in ids]
    names = sorted({n for sf in files if sf is not None for n in sf.names})
    if not names:
        return View(name, np.zeros((len(ids), 1)), np.zeros(len(ids), bool), "no sketches stored")
    shapes: dict[str, tuple[int, ...]] = {}
    for sf in files:
        if sf is None:
            continue
        for n, z in zip(sf.names, sf.sketches):
            shapes.setdefault(n, z.shape)
    offs = np.cumsum([0] + [int(np.prod(shapes[n])) for n in names])
    pos = {n: j for j, n in enumerate(names)}
    x = np.zeros((len(ids), int(offs[-1])))
    for r, sf in enumerate(files):
        if sf is None:
            continue
        for n, z, nm in zip(sf.names, sf.sketches, sf.norms):
            z = np.asarray(z, dtype=np.float64).ravel()
            if style:
                if nm <= 0:
                    continue
                z = z / float(nm)
            if z.size == offs[pos[n] + 1] - offs[pos[n]]:
                x[r, offs[pos[n]]:offs[pos[n] + 1]] = z
    mask = np.linalg.norm(x, axis=1) > 0
    return View(name, x, mask, f"{len(names)} module sketches concatenated, not folded")


def _load(store: Any, row: dict[str, Any]) -> Any:
    from lorasearch.formats import load_lora

    blob = store.blob_path(int(row["id"]))
    path = blob if blob is not None else row.get("path")
    if not path:
        raise LoraSearchError(f"LoRA {row['id']}: neither a stored copy nor a local source path")
    return load_lora(path)


def paper_view(store: Any, rows: Sequence[dict[str, Any]]) -> View:
    """The paper's view on the largest group of LoRAs sharing one factor signature.

    Args:
        store: an open Store (LoRAs are read from their stored copies, else their source path).
        rows: store rows (``id``, ``path``), in the order of the result.

    Returns:
        the View; ``x`` holds raw A/B vectors, ``centred`` the paper's PCA coordinates.
    """
    from lorasearch.paper import PaperModel, paper_raw_vector, paper_signature

    n = len(rows)
    sigs: list[str | None] = []
    raws: list[np.ndarray | None] = []
    unreadable = 0
    for row in rows:
        try:
            ld = _load(store, row)
        except LoraSearchError:
            unreadable += 1
            sigs.append(None)
            raws.append(None)
            continue
        raw = paper_raw_vector(ld)
        sigs.append(paper_signature(ld) if raw.size else None)
        raws.append(raw if raw.size else None)
    counts = Counter(s for s in sigs if s is not None)
    if not counts:
        return View(PAPER, np.zeros((n, 1)), np.zeros(n, bool), "undefined: no LoRA with plain A/B factors")
    sig, size = counts.most_common(1)[0]
    idx = [i for i, s in enumerate(sigs) if s == sig]
    raw = np.stack([raws[i] for i in idx]).astype(np.float64)
    x = np.zeros((n, raw.shape[1]))
    x[idx] = raw
    model = PaperModel.fit(raw)
    pca = model.transform(raw)
    c = np.zeros((n, pca.shape[1]))
    c[idx] = pca
    mask = np.zeros(n, bool)
    mask[idx] = True
    note = (f"defined on {size}/{n} LoRAs: the largest group sharing one factor-shape signature"
            f" ({len(counts)} signature(s) among the factored LoRAs; LoHa/LoKr/other ranks have none)")
    if unreadable:
        note += f"; {unreadable} unreadable"
    return View(PAPER, x, mask, note, centred=c)


def get_view(store: Any, rows: Sequence[dict[str, Any]], name: str) -> View:
    """Any LoRA view by name.

    Args:
        store: an open Store.
        rows: store rows in result order.
        name: a stored view, ``*:sketch`` or ``paper``.

    Returns:
        the View.
    """
    ids = [int(r["id"]) for r in rows]
    if name == PAPER:
        return paper_view(store, rows)
    if name.endswith(SKETCH_SUFFIX):
        return sketch_view(store, ids, name)
    return stored_view(store, ids, name)


def available(store: Any, wanted: Sequence[str] | None = None) -> list[str]:
    """The views to evaluate: ``wanted`` (checked), else the defaults the store can give.

    Raises:
        ValueError: a wanted view the store cannot give.
    """
    have = set(stored_views(store)) | {PAPER, f"delta{SKETCH_SUFFIX}", f"style{SKETCH_SUFFIX}"}
    if wanted:
        bad = [v for v in wanted if v not in have]
        if bad:
            raise ValueError(f"unknown view {bad[0]!r} (this store has: {', '.join(sorted(have))})")
        return list(wanted)
    return [v for v in DEFAULT_VIEWS if v in have]
