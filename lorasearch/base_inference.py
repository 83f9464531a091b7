"""Which base model a LoRA was trained on: family from shapes, fine-tune from its neighbours.

Shapes fix the architecture (``families.resolve``), but several base models
share one: SDXL 1.0 and its large fine-tunes (Pony Diffusion, Illustrious,
NoobAI, Animagine) have identical module tables, and a partial LoRA (a few
attention blocks, only CLIP-L) may fit several families. Here:

- ``family_candidates(ld)``: the detected family, whether it was a tie, and every
  family that fits as well, with reasons.
- ``suggest_base(store, ld, k)``: a vote among the labels and header fields
  (``ss_sd_model_name``, ``ss_base_model_version``, ``modelspec.architecture``)
  of the ``k`` nearest indexed LoRAs; the confidence is the winner's vote share.
  It also proposes a Hugging Face model-card ``base_model`` value.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import PurePath
from typing import Any

from lorasearch.delta import LoraDelta
from lorasearch.families import hinted_family

# (pattern on lower-case alphanumerics, base-model name); most specific first.
FINETUNES: tuple[tuple[str, str], ...] = (
    ("noobai|noob", "NoobAI XL"),
    ("illustrious|illust", "Illustrious XL"),
    ("ponydiffusion|ponyxl|pony", "Pony Diffusion V6 XL"),
    ("animagine", "Animagine XL"),
    ("juggernaut", "Juggernaut XL"),
    ("flux1schnell|schnell", "FLUX.1 schnell"),
    ("flux1dev|fluxdev", "FLUX.1 dev"),
)
# Generic name of each family's reference base model.
FAMILY_BASE: dict[str, str] = {
    "sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL 1.0", "sd3": "SD 3", "flux": "FLUX.1 dev",
    "flux2-klein-4b": "FLUX.2 klein 4B", "flux2-klein-9b": "FLUX.2 klein 9B", "wan-14b": "Wan 2.x 14B",
    "wan-5b": "Wan 2.2 TI2V 5B", "qwen-image": "Qwen-Image", "ltx2": "LTX-2", "krea2": "Krea 2",
}
# Model-card ``base_model`` values for the names above (hub repos of the published weights).
HUB_BASE_MODEL: dict[str, str] = {
    "SD 1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "SD 2.x": "stabilityai/stable-diffusion-2-1",
    "SDXL 1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "SD 3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "FLUX.1 dev": "black-forest-labs/FLUX.1-dev",
    "FLUX.1 schnell": "black-forest-labs/FLUX.1-schnell",
    "Qwen-Image": "Qwen/Qwen-Image",
    "Illustrious XL": "OnomaAIResearch/Illustrious-xl-early-release-v0",
    "NoobAI XL": "Laxhar/noobai-XL-1.1",
    "Animagine XL": "cagliostrolab/animagine-xl-3.1",
}
_LABEL_PREFIXES = ("base_model:", "base_model=", "base:", "base=")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HEADER_FIELDS = ("ss_sd_model_name", "ss_base_model_version", "modelspec.architecture")


def family_candidates(ld: LoraDelta) -> dict[str, Any]:
    """The detected family and every family the module names and shapes fit as well.

    Returns:
        ``{"family", "decided_by", "ambiguous", "candidates": [{"family", "names",
        "shapes", "tied", "reason"}]}``; ``ambiguous`` is true when several
        families fit equally well (a partial LoRA) and a tie-break chose.
    """
    hints = (ld.metadata.get("family_detection") or {}).get("hints") or {}
    cands = list(hints.get("candidates") or [])
    tied = [c["family"] for c in cands if c.get("tied")]
    return {
        "family": ld.family,
        "decided_by": hints.get("decided_by"),
        "ambiguous": len(tied) > 1,
        "tied": tied,
        "candidates": cands,
    }


def _alnum(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def finetune_name(text: str) -> str | None:
    """The fine-tune a free-text value names (``ponyDiffusionV6XL.safetensors`` -> ``Pony Diffusion V6 XL``)."""
    norm = _alnum(text)
    for pattern, name in FINETUNES:
        if re.search(pattern, norm):
            return name
    return None


def base_of(labels: list[str], header: dict[str, Any]) -> tuple[str, str] | None:
    """One indexed LoRA's base model from its labels, else its header.

    Args:
        labels: the store's labels (``base:<name>`` / ``base_model:<id>`` win; a label naming a fine-tune next).
        header: its safetensors metadata.

    Returns:
        (base-model name or hub id, where it came from), or None.
    """
    for lab in labels:
        low = lab.lower()
        for p in _LABEL_PREFIXES:
            if low.startswith(p) and lab[len(p):].strip():
                value = lab[len(p):].strip()
                return finetune_name(value) or value, f"label {lab}"
    for lab in labels:
        name = finetune_name(lab)
        if name:
            return name, f"label {lab}"
    for field in HEADER_FIELDS:
        value = header.get(field)
        if not isinstance(value, str) or not value.strip():
            continue
        name = finetune_name(PurePath(value).stem if field == "ss_sd_model_name" else value)
        if name:
            return name, f"{field}={value}"
    for field in HEADER_FIELDS[1:] + HEADER_FIELDS[:1]:
        value = header.get(field)
        fam = hinted_family(value) if isinstance(value, str) and value.strip() else None
        if fam in FAMILY_BASE:
            return FAMILY_BASE[fam], f"{field}={value}"
    return None


def hub_base_model(name: str | None) -> str | None:
    """A model-card ``base_model`` value for a base-model name (a hub id passes through)."""
    if not name:
        return None
    if _HUB_ID.match(name):
        return name
    return HUB_BASE_MODEL.get(name)


def vote(neighbours: list[dict[str, Any]]) -> dict[str, Any]:
    """The base model most neighbours name, with its vote share.

    Args:
        neighbours: ``[{"base": name or None, "score": float, ...}]``.

    Returns:
        ``{"base", "confidence", "votes", "voters"}``; ties go to the larger summed score.
    """
    counts: Counter[str] = Counter()
    weight: defaultdict[str, float] = defaultdict(float)
    for n in neighbours:
        if n.get("base"):
            counts[n["base"]] += 1
            weight[n["base"]] += float(n.get("score") or 0.0)
    voters = sum(counts.values())
    if not voters:
        return {"base": None, "confidence": 0.0, "votes": {}, "voters": 0}
    best = max(counts, key=lambda b: (counts[b], weight[b]))
    return {"base": best, "confidence": round(counts[best] / voters, 4), "votes": dict(counts.most_common()),
            "voters": voters}


def suggest_base(store: Any, ld: LoraDelta, k: int = 10, view: str = "style") -> dict[str, Any]:
    """Suggest a LoRA's base model from the labels and headers of its nearest indexed LoRAs.

    Args:
        store: an open ``lorasearch.store.Store``.
        ld: the LoRA.
        k: neighbours asked.
        view: the search view (``style``: per-module normalised, so a LoRA's
            strength does not decide who its neighbours are).

    Returns:
        ``{"family", "base", "confidence", "votes", "voters", "k", "view", "hub_base_model",
        "hub_base_model_from" ("vote", or "family": the family's reference model when the
        winner has no known hub repo), "own_header", "neighbours": [{"id", "name", "score",
        "base", "evidence"}], "message"?}``.
        ``base`` is None when no neighbour names one; ``own_header`` is what the
        LoRA's own header says (kept apart: headers are often wrong).
    """
    from lorasearch.search import query

    res = query(store, ld, view=view, k=k)
    neighbours = []
    for r in res.get("results", []):
        row = store.get(int(r["id"])) or {}
        found = base_of(list(row.get("labels") or r.get("labels") or []), row.get("header_metadata") or {})
        neighbours.append({"id": r["id"], "name": r.get("name"), "score": r.get("score"),
                           "base": found[0] if found else None, "evidence": found[1] if found else None})
    v = vote(neighbours)
    own = base_of([], ld.header_metadata)
    voted = hub_base_model(v["base"])
    out: dict[str, Any] = {"family": ld.family, **v, "k": k, "view": view,
                           "hub_base_model": voted or hub_base_model(FAMILY_BASE.get(ld.family)),
                           "hub_base_model_from": "vote" if voted else ("family" if FAMILY_BASE.get(ld.family) else None),
                           "own_header": own[0] if own else None, "neighbours": neighbours}
    if res.get("message"):
        out["message"] = res["message"]
    elif not v["voters"]:
        out["message"] = "no neighbour carries a base-model label or header field"
    return out
