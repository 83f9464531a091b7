"""Retrieval robustness: a transformed copy of each real SD file must find its original at rank 1.

Every file of ``../shared/loras`` is indexed (``indexer.run_index`` into a
temporary store, blob copies on). Then, for each SD1.x/SD2.x file, transformed
copies are written as real safetensors files (plus the PEFT sidecar config
where the original has one) and each copy is a query
(``lorasearch.search.query``, k = 10) in the ``delta``, ``style`` and
``paper`` views.

Transforms, applied to the original file's own tensors (same keys, same
format, same dtype and metadata) unless said otherwise:

- ``reparam``: every module's factors re-parameterised, ``up·G``, ``G⁻¹·down``
  with a random well-conditioned r×r G (cond ≤ 4);
- ``format``: converted to another format. diffusers / diffusers-legacy files:
  diffusers' ``convert_unet_state_dict_to_peft`` then ``convert_state_dict_to_kohya``
  (``lora_unet_…`` + ``.alpha``; our rewrite only adds the ``unet.`` prefix
  old files lack); PEFT files: our key rewrite ``base_model.model.`` ->
  ``unet.``, then ``convert_state_dict_to_kohya`` with ``.alpha`` set to
  ``lora_alpha/r·rank`` from the config (diffusers writes alpha = rank);
  cloneofsimo files: our rewrite of the decoded modules to PEFT names, then
  ``convert_state_dict_to_kohya``; kohya files: written by diffusers'
  ``StableDiffusionPipeline.save_lora_weights`` (PEFT names with ``unet.``),
  scale folded into the up factors;
- ``fp16`` / ``bf16``: every float tensor cast;
- ``scale0.5``: ΔW × 0.5 (up factors halved);
- ``rank/2``: each module's ΔW truncated to rank r/2 (QR of both factors and
  an r×r SVD), alpha / PEFT ``r``+``lora_alpha`` / cloneofsimo rank metadata
  adjusted so the scale is unchanged; rank-1 files have no rank/2 and are
  left out of that row;
- ``no-attn2``: the cross-attention modules (``attn2``) removed; cloneofsimo
  files number their modules and cannot drop some, so theirs is written with
  PEFT names under ``unet.`` / ``text_encoder.`` (diffusers layout);
- ``noise30``: Gaussian noise of 30 % of each up factor's Frobenius norm added
  to it.

A query counts as a hit when its first result is the original or a tie of it:
the store keeps one row per content (AutoV3), so files with identical tensors
(``timohavdk…2100-lora`` and ``…new``) are one row; rows whose ΔW is exactly
the original's (exact cosine 1 and norm ratio 1) would also count.

Run: ``python bench/retrieval.py [--quick] [--write]``.
"""
from __future__ import annotations

import common  # noqa: F401,I001  (first: sets the BLAS thread count before numpy loads)

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import SHARED_LORAS, command_line, machine, md_table, median, set_torch_threads, today, work_dir, write_section

from lorasearch.delta import Factored, LoraDelta
from lorasearch.errors import LoraSearchError
from lorasearch.formats import load_lora
from lorasearch.frobenius import compare
from lorasearch.search import query
from lorasearch.store import Store

SD_FAMILIES = ("sd15", "sd2")
VIEWS = ("delta", "style", "paper")
TRANSFORMS = ("reparam", "format", "fp16", "bf16", "scale0.5", "rank/2", "no-attn2", "noise30")
NOISE = 0.30
K = 10
# (down token, up token) pairs of the factor key names of the formats in the set
_PAIR_TOKENS = (("lora_down", "lora_up"), ("lora_A", "lora_B"), (".down.", ".up."), (":down", ":up"))


# --------------------------------------------------------------------------- raw files


@dataclass
class RawLora:
    """A safetensors LoRA as stored: tensors by key, header metadata, PEFT config (sidecar) if any."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any] | None = None
    note: str = ""


def read_raw(path: Path) -> RawLora:
    """Tensors, metadata and sidecar config of one file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg_path = path.with_name(path.stem + ".adapter_config.json")
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    return RawLora(tensors, meta, cfg)


def write_raw(raw: RawLora, path: Path) -> Path:
    """Write ``path`` (+ ``<stem>.adapter_config.json`` when the LoRA has a config)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in raw.tensors.items()}, str(path), metadata=raw.metadata or None)
    if raw.config is not None:
        path.with_name(path.stem + ".adapter_config.json").write_text(json.dumps(raw.config, indent=1))
    return path


def factor_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(down key, up key) of every factored module, matched by swapping the format's down/up token."""
    ks = set(keys)
    out = []
    for k in sorted(ks):
        for down, up in _PAIR_TOKENS:
            if down in k:
                u = k.replace(down, up)
                if u in ks:
                    out.append((k, u))
                    break
    return out


def _alpha_key(down_key: str, keys: dict[str, torch.Tensor]) -> str | None:
    """The kohya/LyCORIS per-module ``.alpha`` key of a factor pair, if the file has one."""
    for tok in (".lora_down.weight", ".lora_down"):
        if tok in down_key:
            a = down_key.split(tok, 1)[0] + ".alpha"
            return a if a in keys else None
    return None


PairFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def map_pairs(raw: RawLora, fn: PairFn, rng: np.random.Generator) -> RawLora:
    """Apply ``fn(up p×r, down r×q) -> (up', down')`` to every factor pair, keeping keys, dtypes and layout.

    Conv factors are flattened to 2-D for ``fn`` and reshaped back with the new rank.
    """
    out = dict(raw.tensors)
    for dk, uk in factor_pairs(list(raw.tensors)):
        d, u = raw.tensors[dk], raw.tensors[uk]
        up = u.double().reshape(u.shape[0], -1).numpy()
        down = d.double().reshape(d.shape[0], -1).numpy()
        up2, down2 = fn(up, down, rng)
        r2 = down2.shape[0]
        out[uk] = torch.from_numpy(np.ascontiguousarray(up2)).reshape(u.shape[0], r2, *u.shape[2:]).to(u.dtype)
        out[dk] = torch.from_numpy(np.ascontiguousarray(down2)).reshape(r2, *d.shape[1:]).to(d.dtype)
        ak = _alpha_key(dk, raw.tensors)
        if ak is not None and r2 != d.shape[0]:
            a = raw.tensors[ak]
            out[ak] = (a.double() * r2 / d.shape[0]).to(a.dtype)  # keep scale = alpha / rank
    return replace(raw, tensors=out)


# --------------------------------------------------------------------------- factor maths (pure)


def well_conditioned(r: int, rng: np.random.Generator, cond: float = 4.0) -> np.ndarray:
    """A random r×r matrix with condition number ≤ ``cond``: Q₁·diag(s)·Q₂, s in [1/√cond, √cond]."""
    q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
    q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
    s = np.exp(rng.uniform(-0.5, 0.5, r) * np.log(cond))
    return (q1 * s) @ q2


def reparam(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(up·G, G⁻¹·down): the same ΔW, other factors."""
    g = well_conditioned(down.shape[0], rng)
    return up @ g, np.linalg.solve(g, down)


def halve_scale(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return 0.5 * up, down


def add_noise(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """up + E with ‖E‖ = 30 % of ‖up‖ (Gaussian E)."""
    e = rng.standard_normal(up.shape)
    nu, ne = np.linalg.norm(up), np.linalg.norm(e)
    return up + e * (NOISE * nu / ne if ne > 0 else 0.0), down


def truncate_rank(up: np.ndarray, down: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` approximation of up·down from the factors: QR of both, SVD of the r×r core.

    Returns:
        (up' p×rank, down' rank×q) with up'·down' the truncated SVD of up·down.
    """
    qu, ru = np.linalg.qr(up)
    qv, rv = np.linalg.qr(down.T)
    a, s, bt = np.linalg.svd(ru @ rv.T)
    root = np.sqrt(s[:rank])
    return (qu @ a[:, :rank]) * root, (root[:, None] * bt[:rank]) @ qv.T


def halve_rank(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return truncate_rank(up, down, max(1, down.shape[0] // 2))


# --------------------------------------------------------------------------- transforms (files)


def _fix_rank_metadata(raw: RawLora, old: RawLora) -> RawLora:
    """After rank/2: PEFT config r/lora_alpha, diffusers lora_adapter_metadata, cloneofsimo N:rank entries."""
    meta = dict(raw.metadata)
    for k, v in old.metadata.items():
        if k.endswith(":rank") and v.isdigit():
            meta[k] = str(max(1, int(v) // 2))
    if "lora_adapter_metadata" in meta:
        meta["lora_adapter_metadata"] = json.dumps(_halve_config(json.loads(meta["lora_adapter_metadata"])))
    cfg = _halve_config(raw.config) if raw.config is not None else None
    return replace(raw, metadata=meta, config=cfg)


def _halve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A LoraConfig for rank r/2 with the same scale (alpha/r, or alpha/√r with rsLoRA)."""
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError("rank/alpha patterns: per-module ranks not handled by this bench")
    r = int(cfg["r"])
    r2 = max(1, r // 2)
    ratio = np.sqrt(r2 / r) if cfg.get("use_rslora") else r2 / r
    return {**cfg, "r": r2, "lora_alpha": float(cfg.get("lora_alpha", r)) * float(ratio)}


def _cast(raw: RawLora, dtype: torch.dtype) -> RawLora:
    return replace(raw, tensors={k: (v.to(dtype) if v.is_floating_point() and v.ndim > 0 else v)
                                 for k, v in raw.tensors.items()})


def _peft_named(ld: LoraDelta, fold_scale: bool, drop: Callable[[str], bool] = lambda n: False,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The decoded modules as a PEFT-named state dict (``unet.<path>.lora_A.weight``...).

    Returns:
        (state dict, module name -> scale left to apply).
    """
    sd: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name, d in sorted(ld.modules.items()):
        if not isinstance(d, Factored) or drop(name):
            continue
        up = d.up * d.scale if fold_scale else d.up
        sd[f"{name}.lora_A.weight"] = torch.from_numpy(np.array(d.down)).to(dtype)
        sd[f"{name}.lora_B.weight"] = torch.from_numpy(np.array(up)).to(dtype)
        scales[name] = 1.0 if fold_scale else float(d.scale)
    return sd, scales


def _float_dtype(raw: RawLora) -> torch.dtype:
    return next((v.dtype for v in raw.tensors.values() if v.is_floating_point() and v.ndim >= 2), torch.float32)


def to_other_format(raw: RawLora, ld: LoraDelta) -> RawLora:
    """Convert to another format with diffusers' converters (see the module docstring for which path)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_kohya,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    dtype = _float_dtype(raw)
    if ld.format == "kohya":
        return _diffusers_written(ld, dtype)
    if ld.format in ("diffusers", "diffusers_legacy"):
        sd = {(k if k.startswith(("unet.", "text_encoder")) else f"unet.{k}"): v for k, v in raw.tensors.items()}
        te = {k: v for k, v in sd.items() if k.startswith("text_encoder")}
        peft_sd = convert_unet_state_dict_to_peft({k: v for k, v in sd.items() if k not in te})
        if te:
            peft_sd.update(convert_state_dict_to_peft(te))
        scale = 1.0  # these files carry no alpha: scale 1
        note = "diffusers convert_unet_state_dict_to_peft + convert_state_dict_to_kohya"
    elif ld.format == "peft":
        peft_sd = {("unet." + k[len("base_model.model."):] if k.startswith("base_model.model.") else k): v
                   for k, v in raw.tensors.items()}
        scales = {round(d.scale, 9) for d in ld.modules.values()}
        if len(scales) != 1:
            raise ValueError("per-module PEFT scales: not handled by this bench")
        scale = float(scales.pop())
        note = "rewrite base_model.model.->unet., diffusers convert_state_dict_to_kohya, alpha from the config"
    else:
        peft_sd, _ = _peft_named(ld, fold_scale=True, dtype=dtype)
        scale = 1.0
        note = "rewrite of the decoded modules to PEFT names, diffusers convert_state_dict_to_kohya"
    kohya = convert_state_dict_to_kohya(peft_sd)
    for k in list(kohya):
        if k.endswith(".alpha"):
            down = kohya[k.rsplit(".", 1)[0] + ".lora_down.weight"]
            kohya[k] = torch.tensor(float(down.shape[0]) * scale)  # alpha = scale·rank (diffusers writes rank)
    return RawLora(kohya, {}, None, note)


def _diffusers_written(ld: LoraDelta, dtype: torch.dtype, drop: Callable[[str], bool] = lambda n: False) -> RawLora:
    """The decoded modules written by diffusers' ``save_lora_weights`` (scale folded into up)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    sd, _ = _peft_named(ld, fold_scale=True, drop=drop, dtype=dtype)
    unet = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    te = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet, text_encoder_lora_layers=te or None,
                                                  weight_name="w.safetensors", safe_serialization=True)
        tensors = load_file(str(Path(tmp) / "w.safetensors"))
    return RawLora(tensors, {"format": "pt"}, None, "diffusers save_lora_weights (PEFT names under unet./text_encoder.)")


def drop_attn2(raw: RawLora, ld: LoraDelta) -> RawLora:
    """Remove the cross-attention modules (keys containing ``attn2``; cloneofsimo: rewritten, see docstring)."""
    if ld.format == "cloneofsimo":
        return _diffusers_written(ld, _float_dtype(raw), drop=lambda n: ".attn2." in n)
    keep = {k: v for k, v in raw.tensors.items() if "attn2" not in k}
    if len(keep) == len(raw.tensors):
        raise ValueError("no attn2 keys")
    return replace(raw, tensors=keep)


def make_transform(name: str, raw: RawLora, ld: LoraDelta, rng: np.random.Generator) -> RawLora:
    """One transformed copy of a file.

    Raises:
        ValueError: the transform does not apply to this file (reason in the message).
    """
    if name == "reparam":
        return map_pairs(raw, reparam, rng)
    if name == "format":
        return to_other_format(raw, ld)
    if name == "fp16":
        return _cast(raw, torch.float16)
    if name == "bf16":
        return _cast(raw, torch.bfloat16)
    if name == "scale0.5":
        return map_pairs(raw, halve_scale, rng)
    if name == "rank/2":
        if max(d.rank for d in ld.modules.values() if isinstance(d, Factored)) < 2:
            raise ValueError("rank 1: no rank/2")
        return _fix_rank_metadata(map_pairs(raw, halve_rank, rng), raw)
    if name == "no-attn2":
        return drop_attn2(raw, ld)
    if name == "noise30":
        return map_pairs(raw, add_noise, rng)
    raise ValueError(f"unknown transform {name}")


# --------------------------------------------------------------------------- measuring


@dataclass
class Original:
    path: Path
    ld: LoraDelta
    row: int
    ties: set[int]


def index_all(folder: Path, db: Path, files: list[Path] | None) -> tuple[dict[str, Any], float]:
    """``run_index`` of the whole folder (or of ``files``) into ``db``."""
    from indexer.pipeline import run_index

    t0 = time.perf_counter()
    out = run_index([str(p) for p in files] if files is not None else [str(folder)], db, workers=1, progress=False)
    return out, time.perf_counter() - t0


def originals(store: Store, paths: list[Path]) -> list[Original]:
    """The SD files, their store rows and tie sets (rows with the same content, or exactly the same ΔW)."""
    lds = []
    for p in paths:
        try:
            ld = load_lora(p)
        except LoraSearchError:
            continue
        if ld.family in SD_FAMILIES:
            lds.append((p, ld))
    rows = {r["autov3"]: int(r["id"]) for f in SD_FAMILIES for r in store.list(family=f, limit=100_000)}
    out = []
    for p, ld in lds:
        row = rows[str(ld.source["autov3"]).upper()]
        ties = {row}
        for q, other in lds:
            c = compare(ld, other) if other.family == ld.family else None
            if c is not None and c.cosine is not None and c.cosine > 1 - 1e-6 and abs((c.coefficient or 0) - 1) < 1e-6:
                ties.add(rows[str(other.source["autov3"]).upper()])
        out.append(Original(p, ld, row, ties))
    return out


def exact_cosines(q: LoraDelta, orig: LoraDelta) -> dict[str, float | None]:
    """Exact ΔW cosine of a copy to its original: over shared modules (what ``compare`` and the
    delta re-ranking score) and over all modules of both (a missing module counts as zero).

    Properties of the file's content: computed under the original's family even where the
    copy's family was detected otherwise (compare() shares nothing across families)."""
    q = q if q.family == orig.family else replace(q, family=orig.family)
    c = compare(q, orig)
    nq, no = compare(q, q).norm_a, compare(orig, orig).norm_a
    full = c.dot / (nq * no) if nq > 0 and no > 0 else None
    return {"exact_cosine": c.cosine, "full_cosine": full, "coefficient": c.coefficient}


def run_query(store: Store, ld: LoraDelta, orig: Original, view: str) -> dict[str, Any]:
    """One query; hit/rank of the original (or a tie) and the margin over the best other result."""
    t0, c0 = time.perf_counter(), time.thread_time()
    res = query(store, ld, view=view, k=K)
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    results = res.get("results", [])
    rank = next((i + 1 for i, r in enumerate(results) if r["id"] in orig.ties), None)
    top_tie = next((r["score"] for r in results if r["id"] in orig.ties), None)
    other = next((r["score"] for r in results if r["id"] not in orig.ties), None)
    margin = None if top_tie is None else top_tie - (other if other is not None else -1.0)
    return {"hit": rank == 1, "rank": rank, "margin": margin, "seconds": dt, "cpu": cpu, "comparable": bool(results),
            "message": res.get("message"), "families_searched": res.get("families_searched")}


def measure(tmp: Path, quick: bool, seed: int) -> dict[str, Any]:
    """Index, transform, query; the per-query records."""
    all_files = sorted(SHARED_LORAS.glob("*.safetensors"))
    if not all_files:
        raise SystemExit(f"{SHARED_LORAS}: no files (set LORASEARCH_SHARED)")
    subset = None
    if quick:
        sd = [p for p in all_files if _family_of(p) in SD_FAMILIES]
        subset = _quick_pick(sd)
    db = tmp / "store"
    summary, t_index = index_all(SHARED_LORAS, db, subset)
    store = Store(db)
    origs = originals(store, subset if subset is not None else all_files)
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    out_dir = tmp / "transformed"
    out_dir.mkdir()
    for o in origs:
        raw = read_raw(o.path)
        for t in TRANSFORMS:
            rec: dict[str, Any] = {"file": o.path.name, "format": o.ld.format, "transform": t}
            try:
                tr = make_transform(t, raw, o.ld, rng)
            except ValueError as exc:
                rec["skipped"] = str(exc)
                records.append(rec)
                continue
            path = write_raw(tr, out_dir / f"{o.path.stem}.{t.replace('/', '_')}.safetensors")
            q = load_lora(path)
            rec.update({"note": tr.note, "query_format": q.format, **exact_cosines(q, o.ld)})
            for v in VIEWS:
                rec[v] = run_query(store, q, o, v)
            rec["query_family"] = q.family
            if q.family != o.ld.family:  # what the rest of the pipeline does once the family is right
                forced = replace(q, family=o.ld.family)
                rec["forced_family"] = {v: run_query(store, forced, o, v) for v in ("delta", "style")}
            records.append(rec)
    stats = store.stats()
    store.close()
    return {"records": records, "index": summary, "t_index": t_index, "stats": stats, "originals": origs}


def _family_of(p: Path) -> str | None:
    try:
        return load_lora(p, hashes=False).family
    except Exception:  # noqa: BLE001 - an unreadable file is simply not an SD file
        return None


def _quick_pick(sd: list[Path]) -> list[Path]:
    """A few SD files of different formats for --quick (one per format, at most 4)."""
    seen: dict[str, Path] = {}
    for p in sd:
        fmt = load_lora(p).format
        seen.setdefault(fmt, p)
    return sorted(seen.values())[:4]


# --------------------------------------------------------------------------- report


def per_transform(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for t in TRANSFORMS:
        rs = [r for r in records if r["transform"] == t and "skipped" not in r]
        skipped = [r for r in records if r["transform"] == t and "skipped" in r]
        if not rs:
            rows.append([t, 0, *["-"] * 9, len(skipped)])
            continue
        cells: list[Any] = [t, len(rs)]
        for v in VIEWS:
            hits = sum(r[v]["hit"] for r in rs)
            cells.append(f"{hits / len(rs):.3f}" + ("" if v != "paper" else f" ({sum(r[v]['comparable'] for r in rs)} comparable)"))
        margins = [r["delta"]["margin"] for r in rs if r["delta"]["margin"] is not None]
        cos = [r["exact_cosine"] for r in rs if r["exact_cosine"] is not None]
        full = [r["full_cosine"] for r in rs if r["full_cosine"] is not None]
        coef = [r["coefficient"] for r in rs if r["coefficient"] is not None]
        cells += [f"{min(margins):.3f}" if margins else "-", f"{min(cos):.3f}" if cos else "-",
                  f"{min(full):.3f} / {median(full):.3f}" if full else "-",
                  f"{min(coef):.3f} – {max(coef):.3f}" if coef else "-",
                  f"{median(r['delta']['seconds'] for r in rs) * 1e3:.0f}",
                  f"{median(r['delta']['cpu'] for r in rs) * 1e3:.0f}",
                  f"{median(r['paper']['seconds'] for r in rs) * 1e3:.0f}", len(skipped)]
        rows.append(cells)
    return rows


HEADERS = ["transform", "queries", "delta recall@1", "style recall@1", "paper recall@1", "delta min margin",
           "min exact cos (shared modules)", "exact cos, all modules (min / median)", "ΔW ratio original ÷ copy",
           "delta ms (median)", "delta CPU ms (median)",
           "paper ms (median)", "not applicable"]


def misses(records: list[dict[str, Any]], origs: list[Original]) -> list[list[Any]]:
    fam = {o.path.name: o.ld.family for o in origs}
    rows = []
    for r in records:
        if "skipped" in r:
            continue
        for v in ("delta", "style"):
            if not r[v]["hit"]:
                forced = r.get("forced_family", {}).get(v)
                rows.append([r["transform"], v, r["file"][:60], f"{fam[r['file']]} / {r['query_family']}",
                             r[v]["rank"] or "not in top 10",
                             "-" if forced is None else (forced["rank"] or "not in top 10"),
                             f"{r['full_cosine']:.3f}" if r["full_cosine"] is not None else "-"])
    return rows


MISS_HEADERS = ["transform", "view", "file", "family: original / copy read as", "rank of the original",
                "rank with the original's family forced", "exact cos, all modules"]


def tie_groups(origs: list[Original]) -> list[list[str]]:
    """File names that share one store row (same AutoV3) or exactly the same ΔW."""
    groups: dict[frozenset[int], list[str]] = {}
    for o in origs:
        groups.setdefault(frozenset(o.ties), []).append(o.path.name)
    by_row: dict[int, list[str]] = {}
    for o in origs:
        by_row.setdefault(o.row, []).append(o.path.name)
    out = [sorted(g) for g in by_row.values() if len(g) > 1]
    out += [sorted(g) for ids, g in groups.items() if len(ids) > 1 and sorted(g) not in out]
    return out


def family_note(records: list[dict[str, Any]], origs: list[Original]) -> str:
    """Queries read as another family than their original's, and the families the delta query searched."""
    fam = {o.path.name: o.ld.family for o in origs}
    odd = [r for r in records if "skipped" not in r and r["query_family"] != fam[r["file"]]]
    multi = [r for r in records if "skipped" not in r and len(r["delta"].get("families_searched") or []) > 1]
    if not odd and not multi:
        return "Every copy was read as its original's family and searched only there."
    parts = sorted({f"{r['transform']}: {fam[r['file']]} read as {r['query_family']}, searched "
                    f"{'+'.join(r['delta'].get('families_searched') or [])}" for r in odd})
    return (f"{len(odd)} copies were read as another family than their original's ({'; '.join(parts)}); "
            f"{len(multi)} delta queries searched more than one family (`families_searched`: every indexed "
            "family whose module table holds all the query's modules).")


def min_margin_file(records: list[dict[str, Any]]) -> str:
    rs = [r for r in records if "skipped" not in r and r["delta"]["margin"] is not None]
    if not rs:
        return "-"
    r = min(rs, key=lambda r: r["delta"]["margin"])
    return f"`{r['file']}` ({r['transform']}, margin {r['delta']['margin']:.3f})"


def format_notes(records: list[dict[str, Any]]) -> list[list[Any]]:
    seen: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r["transform"] in ("format", "no-attn2") and "skipped" not in r:
            key = (r["transform"], r["format"], f"{r['note'] or 'same format, keys removed'} -> read as `{r['query_format']}`")
            seen[key] = seen.get(key, 0) + 1
    return [[t, f, n, c] for (t, f, n), c in sorted(seen.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few SD files only (seconds; smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/BENCHMARKS.md")
    args = ap.parse_args()
    set_torch_threads()
    t0 = time.perf_counter()
    with work_dir("lorasearch-retrieval-", args.keep) as tmp:
        res = measure(tmp, args.quick, args.seed)
    recs = res["records"]
    done = [r for r in recs if "skipped" not in r]
    origs = res["originals"]
    idx = res["index"]
    st = res["stats"]
    overall = {v: sum(r[v]["hit"] for r in done) / max(len(done), 1) for v in VIEWS}
    delta_ok = all(r["delta"]["hit"] for r in done)
    body = "\n\n".join([
        "## Retrieval robustness (`bench/retrieval.py`)",
        f"Command: `{command_line()}`  \nMachine: {machine()}  \nDate: {today()}",
        f"Store: every file of `../shared/loras`{' (quick: a subset)' if args.quick else ''} indexed by "
        f"`run_index` (workers = 1, blob copies kept) in {res['t_index']:.1f} s: {idx['added']} added, "
        f"{idx['duplicates']} duplicate content, {len(idx['failed'])} refused; {st['loras']} LoRAs in "
        f"{len(st['families'])} families ({', '.join(f'{f} {n}' for f, n in st['families'].items() if f in SD_FAMILIES)}). "
        f"{len(origs)} SD files queried × {len(TRANSFORMS)} transforms = {len(done)} queries per view "
        f"({len(recs) - len(done)} not applicable), `query(store, copy, view, k={K})`; the copy itself is not indexed.",
        f"**Target: delta recall@1 = 1.0 for every transform — {'met' if delta_ok else 'NOT met'}** "
        f"(overall delta {overall['delta']:.3f}, style {overall['style']:.3f}, paper {overall['paper']:.3f}).",
        md_table(HEADERS, per_transform(recs)),
        "*margin* = score of the original − best other score in the delta results (exact Frobenius cosines "
        "over shared modules, as `search.query` scores them); *exact cos* = exact ΔW cosine of the copy to its "
        "original, over the modules both have and over all modules (a missing module counts as zero); *ΔW ratio* = "
        "least-squares c in ΔW_original ≈ c·ΔW_copy over shared modules (checks that each writer kept the scale: "
        "2 for scale0.5, 1 elsewhere); *delta ms* = wall time of `query` (load_lora of the copy not included), "
        "*CPU ms* = the querying thread's CPU time (what other jobs on a shared machine do not inflate). "
        "`paper` = the paper's flattened factors + "
        "PCA over the indexed LoRAs with the copy's factor shapes (`search.query(view=\"paper\")`): a copy whose "
        "factor shapes differ from every indexed LoRA (rank/2, no-attn2) is not comparable and counts as a miss.",
        "Ties: " + ("; ".join(" = ".join(f"`{n}`" for n in g) for g in tie_groups(origs)) or "none")
        + " (one store row: same AutoV3, identical tensors; a query of either is a hit when that row comes first). "
        "A hit is the original's row (or a row with exactly its ΔW) first. The filip131311 and reddinft groups are "
        "related checkpoints (exact cosines 0.71 and 0.79), not copies, and count as different LoRAs; timohavdk's "
        f"`pytorch_lora_weights` is 0.963 to its siblings. Smallest delta margin: {min_margin_file(recs)}.",
        family_note(recs, origs),
        "How each format conversion / attn2 removal was written:",
        md_table(["transform", "original format", "writer -> reader", "files"], format_notes(recs)),
        "Misses in the delta/style views:",
        md_table(MISS_HEADERS, misses(recs, origs) or [["none"] + [""] * 6]),
        f"Total run time {time.perf_counter() - t0:.0f} s.",
    ])
    print(body)
    if args.write:
        write_section("retrieval", body)


if __name__ == "__main__":
    main()
