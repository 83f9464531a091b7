"""``resolve(store, path)``: the indexed entry that is the same LoRA as a local file.

A renamed, re-saved, converted, cast or re-scaled file is linked back to the
entry it came from, and a further-trained / resized / pruned one to its
lineage, with that entry's metadata (source URL, trigger words, labels).
Strongest evidence first:

1. ``bytes``: the file's sha256 is an indexed file's;
2. ``tensors``: its AutoV3 (or, for a LoraDelta without a file, its content
   hash) is an indexed entry's — the store keeps one row per AutoV3;
3. ``update``: the exact ΔW cosine with an indexed entry is ≥ 0.999 over the
   same non-zero modules (``dedupe.same_update``; candidates from the ``delta``
   view, re-ranked exactly from the stored copies); the coefficient is given
   when only the scale differs;
4. ``lineage``: the attribution verdict is ``derived`` (``attribution.attribute``);
   a ``merged`` verdict is not the same LoRA and is reported as a note.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from lorasearch.delta import LoraDelta
from lorasearch.dedupe import same_update

HF_URL = "https://huggingface.co/{repo}/blob/{revision}/{path}"
MAX_TAGS = 10


def trigger_words(meta: Mapping[str, Any]) -> list[str]:
    """Trigger words from safetensors header metadata (``header_checks.training_info``:
    ``modelspec.trigger_phrase``, kohya dataset folder names, embedding tokens), plus
    ai-toolkit's ``trigger_word`` (top level or in ``training_info``)."""
    from lorasearch.header_checks import training_info

    words = list(training_info(LoraDelta("", "", {}, header_metadata=dict(meta)))["trigger_words"])
    info = _json(meta.get("training_info"))
    for w in (meta.get("trigger_word"), info.get("trigger_word") if isinstance(info, dict) else None):
        if isinstance(w, str) and w.strip() and w.strip() not in words:
            words.append(w.strip())
    return words


def top_tags(meta: Mapping[str, Any], n: int = MAX_TAGS) -> list[str]:
    """The most frequent training tags (kohya ``ss_tag_frequency``)."""
    from lorasearch.header_checks import top_tags as tags

    return [t for t, _ in tags(meta.get("ss_tag_frequency"), n)]


def _json(x: Any) -> Any:
    if not isinstance(x, str):
        return x
    try:
        return json.loads(x)
    except ValueError:
        return None


def source_url(src: Mapping[str, Any]) -> str | None:
    """A link to where an indexed file came from: the hub file page, or its local path."""
    if src.get("repo"):
        return HF_URL.format(repo=src["repo"], revision=src.get("revision") or "main", path=src.get("path") or "")
    return str(src.get("path") or src.get("source") or "") or None


def entry(store: Any, lora_id: int) -> dict[str, Any]:
    """One indexed entry with what a user wants to know about it."""
    row = store.get(int(lora_id)) or {}
    meta = row.get("header_metadata") or {}
    sources = [{**s, "url": source_url(s)} for s in row.get("sources", [])]
    return {
        "id": int(lora_id), "name": row.get("name"), "family": row.get("family"), "format": row.get("format"),
        "file_sha256": row.get("file_sha256"), "autov3": row.get("autov3"), "labels": row.get("labels", []),
        "source_url": sources[0]["url"] if sources else None, "sources": sources,
        "trigger_words": trigger_words(meta), "top_tags": top_tags(meta),
        "title": meta.get("modelspec.title") or meta.get("ss_output_name") or meta.get("name"),
        "base_model": meta.get("ss_base_model_version") or meta.get("modelspec.architecture"),
    }


def _by_hash(store: Any, column: str, value: str | None) -> int | None:
    if not value:
        return None
    rows = store.execute(f"SELECT id FROM loras WHERE {column}=? AND deleted=0 ORDER BY id LIMIT 1", (value,))
    return int(rows[0][0]) if rows else None


def _update_match(store: Any, ld: LoraDelta, k: int) -> tuple[int, dict[str, Any]] | None:
    """The best indexed entry with the same update, from the delta view re-ranked exactly."""
    from lorasearch.attribution.calibration import load_blobs
    from lorasearch.search import _CACHE, query

    res = query(store, ld, view="delta", k=k)
    ids = [int(r["id"]) for r in res.get("results", []) if (r.get("score") or 0) >= 0.99]
    if not ids:
        return None
    rows = store.get_many(ids)
    for i in ids:
        lds = load_blobs(store, [i], rows, _CACHE)
        if lds is None:
            continue
        ev = same_update(lds[0], ld)
        if ev is not None:
            return i, ev
    return None


def resolve(store: Any, target: str | Path | LoraDelta, k: int = 5) -> dict[str, Any]:
    """The indexed entry that is the same LoRA as ``target`` (same file, tensors, update or lineage).

    Args:
        store: an open ``Store``.
        target: a LoRA file or PEFT folder, or an already read LoraDelta.
        k: update-tier candidates re-ranked exactly.

    Returns:
        ``{"query", "family", "tier": bytes|tensors|update|lineage|None, "match": entry or None,
        "evidence": {...}, "note"?}``.

    Raises:
        BadInput: the file cannot be read.
    """
    from lorasearch.formats import load_lora
    from lorasearch.store import content_hash

    ld = target if isinstance(target, LoraDelta) else load_lora(target)
    label = str(target) if not isinstance(target, LoraDelta) else str(ld.source.get("path") or "<LoraDelta>")
    out: dict[str, Any] = {"query": label, "family": ld.family, "tier": None, "match": None, "evidence": {}}
    sha = ld.source.get("file_sha256")
    v3 = str(ld.source.get("autov3") or content_hash(ld)).upper()
    hit = _by_hash(store, "file_sha256", sha)
    if hit is not None:
        return {**out, "tier": "bytes", "match": entry(store, hit), "evidence": {"sha256": sha}}
    hit = _by_hash(store, "autov3", v3)
    if hit is not None:
        return {**out, "tier": "tensors", "match": entry(store, hit), "evidence": {"autov3": v3}}
    fams = store.families()
    if ld.family not in fams and not ld.family.startswith("unknown:"):
        out["note"] = f"no indexed LoRAs of family {ld.family}"
        return out
    # a module subset of an unrecognised model has another unknown: family: only lineage can match it
    upd = _update_match(store, ld, k) if ld.family in fams else None
    if upd is not None:
        return {**out, "tier": "update", "match": entry(store, upd[0]), "evidence": upd[1]}
    from lorasearch.attribution import attribute

    att = attribute(store, ld)
    if att["verdict"] == "derived" and att["matches"]:
        m = att["matches"][0]
        ev = {k2: m.get(k2) for k2 in ("cosine", "coefficient", "fpr", "shared_modules", "target_share", "module_share")}
        return {**out, "tier": "lineage", "match": entry(store, int(m["id"])), "evidence": {"verdict": "derived", **ev}}
    if att["verdict"] == "merged":
        out["note"] = "a merge of indexed LoRAs, not one of them: " + ", ".join(
            f"#{m['id']} {m.get('name')} ({m.get('coefficient', 0):+.3f})" for m in att["matches"])
        out["evidence"] = {"verdict": "merged", "components": [m["id"] for m in att["matches"]]}
    return out


def format_text(res: dict[str, Any]) -> str:
    """Readable output of ``resolve`` (the CLI without --json)."""
    if not res.get("match"):
        return f"{res['query']}: no indexed entry is the same LoRA" + (f" ({res['note']})" if res.get("note") else "")
    e = res["match"]
    ev = res.get("evidence", {})
    bits = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()
            if k in ("cosine", "coefficient", "fpr") and v is not None]
    lines = [f"{res['query']}: same LoRA as #{e['id']} {e['name']} ({res['tier']}{'; ' + ', '.join(bits) if bits else ''})"]
    if e.get("source_url"):
        lines.append(f"  source:   {e['source_url']}")
    if e.get("trigger_words"):
        lines.append(f"  triggers: {', '.join(e['trigger_words'])}")
    if e.get("labels"):
        lines.append(f"  labels:   {', '.join(e['labels'])}")
    return "\n".join(lines)
