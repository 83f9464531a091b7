"""The whole measurement: join labels to a store, gather views and baselines, score them, write the report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorasearch.cluster import baselines as B
from lorasearch.cluster import views as V
from lorasearch.cluster.evaluate import LEVELS, Labelled, Rep, agreement, evaluate, join
from lorasearch.errors import BadInput

DEFAULT_BASELINES: tuple[str, ...] = ("effnet", "pixel")


def gather(store: Any, labels_csv: Path, views: Sequence[str] | None = None,
           baselines: Sequence[str] = DEFAULT_BASELINES, scenarios: Sequence[str] = B.SCENARIOS,
           allow_download: bool = False, max_images: int = B.MAX_IMAGES,
           progress: bool = True) -> tuple[list[Labelled], list[Rep], dict[str, Any]]:
    """Every representation of the labelled LoRAs of a store.

    Args:
        store: an open Store.
        labels_csv: labels.csv (paths relative to its folder).
        views: LoRA views (None: every default view the store has).
        baselines: image baselines, ``name`` or ``name=hub-id-or-folder``.
        scenarios: ``train`` and/or ``gen``.
        allow_download: let clip/dino fetch weights from the hub.
        max_images: images per LoRA and scenario.
        progress: progress bars on stderr.

    Returns:
        (joined rows, representations, info ``{"joined", "missing", "notes"}``).

    Raises:
        BadInput: bad labels, no match, unknown view/baseline/scenario, missing weights.
    """
    bad = [s for s in scenarios if s not in B.SCENARIOS]
    if bad:
        raise BadInput(f"unknown image scenario {bad[0]!r} (expected {', '.join(B.SCENARIOS)})", code="bad_option")
    specs = [B.parse_spec(b) for b in baselines]  # validates names before any work
    extractors = [B.make_extractor(b, allow_download) for b in baselines]  # missing weights: fail before the views
    rows = V.all_rows(store)
    joined, missing = join(store, labels_csv, rows)
    try:
        names = V.available(store, views)
    except ValueError as exc:
        raise BadInput(str(exc), code="bad_option") from None
    by_id = {int(r["id"]): r for r in rows}
    jrows = [by_id[j.lora_id] for j in joined]
    reps: list[Rep] = []
    notes: dict[str, str] = {}
    for name in names:
        v = V.get_view(store, jrows, name)
        if not v.mask.any():
            notes[name] = v.note or "undefined for these LoRAs"
            continue
        reps.append(Rep(name, v.x, v.mask, v.note, v.centred, "view"))
    for (name, _), extract in zip(specs, extractors):
        for sc in scenarios:
            folders = [j.train_images if sc == "train" else j.generated_images for j in joined]
            label = f"{name}/{sc}"
            if not any(f is not None and f.is_dir() for f in folders):
                notes[label] = f"no {'training' if sc == 'train' else 'generated'} image folders in labels.csv"
                continue
            x, mask = B.lora_features(extract, folders, max_images, desc=label, progress=progress)
            note = "" if mask.all() else f"images for {int(mask.sum())}/{len(mask)} LoRAs"
            reps.append(Rep(label, x, mask, note, None, "baseline"))
    info = {"joined": len(joined), "missing": missing, "notes": notes}
    return joined, reps, info


def measure(joined: Sequence[Labelled], reps: Sequence[Rep], levels: Sequence[str] = LEVELS, centre: str = "both",
            n_boot: int = 500, seed: int = 0, subset: np.ndarray | None = None) -> dict[str, Any]:
    """Scores at each level plus view/baseline agreement.

    Returns:
        ``{"levels": {level: evaluate(...)}, "agreement": {...}, "n": ...}``.
    """
    labels = [j.row for j in joined]
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise BadInput(f"unknown level {bad[0]!r} (expected genre or style)", code="bad_option")
    keep = np.ones(len(labels), bool) if subset is None else np.asarray(subset, bool)
    sub = [Rep(r.name, r.x, r.mask & keep, r.note, r.centred, r.kind) for r in reps]
    return {"n": int(keep.sum()), "levels": {lv: evaluate(reps, labels, lv, centre, n_boot, seed, keep) for lv in levels},
            "agreement": agreement(sub)}
