"""Does an adapter fit a base model? Module names and shapes, before anything is loaded.

The base is described without its weights:

- a ``config.json`` (transformers: ``model_type``; diffusers: ``_class_name``): the
  model is built on the meta device, as ``scripts/gen_family_tables.py`` does;
- a diffusers pipeline folder (``model_index.json``): every component folder's
  config, under the component's name (``unet.``, ``text_encoder.``...);
- a ``.safetensors`` file or a ``model.safetensors.index.json``: shapes from the
  headers only (no tensor is read).

Every base module is kept as its update's matrix shape (``out x in``; conv
kernels flattened; transformers' GPT-2 ``Conv1D`` stores ``in x out`` and is
turned round). Adapter modules are matched by their canonical name, else by
the longest dotted suffix that names exactly one base module (so
``transformer.h.0.attn.c_attn`` finds ``h.0.attn.c_attn`` in a GPT-2 checkpoint,
and CLIP names with or without ``text_model.`` meet).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorasearch.delta import BIAS_SUFFIX, LoraDelta, NeedsBase
from lorasearch.errors import BadInput
from lorasearch.formats.load import read_json_object
from lorasearch.formats.safetensors_file import SafetensorsFile

Shape = tuple[int, ...]
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "prior")
INDEX_NAME = "model.safetensors.index.json"
# PEFT task_type -> the transformers Auto class whose heads the adapter was saved against.
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
}
MIN_SUFFIX_PARTS = 2
MAX_LISTED = 50


@dataclass
class BaseModules:
    """A base model's modules: name -> (matrix shape, full shape), and where they came from.

    ``either_way`` is True for shapes read from safetensors headers, whose
    orientation (``nn.Linear`` out x in, or GPT-2 ``Conv1D`` in x out) is not recorded.
    """

    kind: str
    shapes: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    either_way: bool = False


def _matrix(shape: Shape) -> Shape:
    return (shape[0], math.prod(shape[1:])) if len(shape) > 2 else tuple(shape)


# ---------------------------------------------------------------------------
# Reading the base
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "bad_base", "not a readable JSON file ({exc})", "not a JSON object")


def _from_headers(files: list[Path]) -> dict[str, tuple[Shape, Shape]]:
    out: dict[str, tuple[Shape, Shape]] = {}
    for f in files:
        with SafetensorsFile(f) as st:
            for key in st.keys():
                shape = tuple(int(x) for x in st.shape(key))
                if key.endswith(".weight"):
                    out[key[: -len(".weight")]] = (_matrix(shape), shape)
                elif key.endswith(".bias"):
                    out[key[: -len(".bias")] + BIAS_SUFFIX] = (shape, shape)
                elif shape:
                    out[key] = (_matrix(shape), shape)
    return out


def _index_files(index: Path) -> list[Path]:
    data = _read_json(index)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise BadInput(f"{index}: no weight_map: not a safetensors index", code="bad_base")
    files = [index.parent / str(f) for f in dict.fromkeys(wm.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BadInput(f"{index}: shard {missing[0]} is not beside the index ({len(missing)} missing)", code="bad_base")
    return files


def _module_shapes(model: Any, prefix: str = "") -> dict[str, tuple[Shape, Shape]]:
    """name -> (matrix shape, weight shape) of every module with a weight (and ``#bias`` entries)."""
    out: dict[str, tuple[Shape, Shape]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or not hasattr(w, "shape") or not name:
            continue
        shape = tuple(int(x) for x in w.shape)
        if type(mod).__name__ == "Conv1D" and len(shape) == 2:  # transformers GPT-2: weight is in x out
            mat: Shape = (shape[1], shape[0])
        else:
            mat = _matrix(shape)
        out[prefix + name] = (mat, shape)
        b = getattr(mod, "bias", None)
        if b is not None and hasattr(b, "shape"):
            out[prefix + name + BIAS_SUFFIX] = (tuple(int(x) for x in b.shape), tuple(int(x) for x in b.shape))
    return out


def _build_diffusers(cfg: dict[str, Any], where: Path) -> Any:
    import diffusers
    import torch

    cls = getattr(diffusers, str(cfg["_class_name"]), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise BadInput(f"{where}: diffusers has no model class {cfg['_class_name']!r}", code="bad_base")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(cfg)


def _build_transformers(cfg: dict[str, Any], where: Path, task: str | None) -> Any:
    import torch
    import transformers

    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    try:
        config = transformers.AutoConfig.for_model(str(cfg["model_type"]), **kwargs)
    except (ValueError, KeyError) as exc:
        raise BadInput(f"{where}: transformers cannot read this config ({exc})", code="bad_base") from None
    names = [_TASK_CLASSES[task]] if task in _TASK_CLASSES else []
    names += [a for a in (cfg.get("architectures") or []) if isinstance(a, str)] + ["AutoModelForCausalLM", "AutoModel"]
    last: Exception | None = None
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.from_config(config) if name.startswith("Auto") else cls(config)
        except (ValueError, TypeError, KeyError) as exc:  # e.g. an encoder config has no causal-LM head
            last = exc
    raise BadInput(f"{where}: no transformers model class builds from this config ({last})", code="bad_base")


def _from_config(cfg: dict[str, Any], where: Path, task: str | None, prefix: str = "") -> dict[str, tuple[Shape, Shape]]:
    if "_class_name" in cfg:
        model = _build_diffusers(cfg, where)
    elif "model_type" in cfg:
        model = _build_transformers(cfg, where, task)
    else:
        raise BadInput(f"{where}: neither a diffusers (_class_name) nor a transformers (model_type) config",
                       code="bad_base")
    return _module_shapes(model, prefix)


def _pipeline(folder: Path, task: str | None) -> dict[str, tuple[Shape, Shape]]:
    out: dict[str, tuple[Shape, Shape]] = {}
    index = _read_json(folder / "model_index.json")
    for comp in index:
        cfg_path = folder / comp / "config.json"
        if comp.startswith("_") or not cfg_path.is_file() or comp in ("vae", "scheduler"):
            continue
        out.update(_from_config(_read_json(cfg_path), cfg_path, task, prefix=f"{comp}."))
    if not out:
        raise BadInput(f"{folder}: pipeline folder without component configs", code="bad_base")
    return out


def read_base(base: str | Path, task: str | None = None) -> BaseModules:
    """A base model's module shapes from a config, pipeline folder, safetensors file or index.

    Args:
        base: ``config.json``, a folder holding one (or ``model_index.json``,
            ``model.safetensors.index.json``, ``*.safetensors``), a ``.safetensors``
            file or a ``model.safetensors.index.json``.
        task: PEFT ``task_type`` (picks the transformers head class).

    Raises:
        BadInput: missing or unreadable base, or one no library can build.
    """
    p = Path(base)
    if not p.exists():
        raise BadInput(f"{p}: no such file or folder", code="not_found")
    if p.is_dir():
        for name, kind in (("model_index.json", "pipeline"), ("config.json", "config"), (INDEX_NAME, "index")):
            if (p / name).is_file():
                if kind == "pipeline":
                    return BaseModules(kind, _pipeline(p, task))
                return read_base(p / name, task)
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise BadInput(f"{p}: no config.json, model_index.json, safetensors index or .safetensors here",
                           code="bad_base")
        return BaseModules("safetensors", _from_headers(files), either_way=True)
    if p.suffix == ".safetensors":
        return BaseModules("safetensors", _from_headers([p]), either_way=True)
    if p.suffix == ".json":
        data = _read_json(p)
        if "weight_map" in data:
            return BaseModules("index", _from_headers(_index_files(p)), either_way=True)
        return BaseModules("config", _from_config(data, p, task))
    raise BadInput(f"{p}: give a config.json, a .safetensors file or a {INDEX_NAME}", code="bad_base")


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - MIN_SUFFIX_PARTS + 1)] or [name]


def _suffix_map(names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        for s in _suffixes(n)[1:]:
            out.setdefault(s, []).append(n)
    return out


def _flat_map(names: list[str]) -> dict[str, list[str]]:
    """Base names with dots flattened to ``_``, with and without their pipeline component."""
    out: dict[str, list[str]] = {}
    for n in names:
        keys = {n.replace(".", "_")}
        comp = _component(n)
        if comp is not None:
            keys.add(n[len(comp) + 1:].replace(".", "_"))
        for k in keys:
            out.setdefault(k, []).append(n)
    return out


def match_name(name: str, shapes: dict[str, Any], suffix_map: dict[str, list[str]],
               flat_map: dict[str, list[str]] | None = None) -> str | None:
    """The base module an adapter module name refers to, or None.

    Canonical (dotted) names are looked up whole, then by their longest
    dotted suffix naming exactly one base module; names of an ``unknown:``
    family are flattened (``diffusion_model.down_blocks_0_...``) and are
    looked up flattened.
    """
    bias = name.endswith(BIAS_SUFFIX)
    core = name[: -len(BIAS_SUFFIX)] if bias else name
    for s in _suffixes(core):
        key = s + BIAS_SUFFIX if bias else s
        if key in shapes:
            return key
        hits = suffix_map.get(key)
        if hits and len(hits) == 1:
            return hits[0]
    if flat_map is not None:
        tail = core.split(".", 1)[-1]
        for key in (core.replace(".", "_"), tail.replace(".", "_")):
            hits = flat_map.get(key + BIAS_SUFFIX if bias else key)
            if hits and len(hits) == 1:
                return hits[0]
    return None


def _delta_shape(delta: Any) -> Shape:
    if isinstance(delta, NeedsBase):
        if delta.shape:
            return _matrix(tuple(int(x) for x in delta.shape))
        arrays = [np.shape(a) for a in delta.tensors.values()]
        return _matrix(tuple(int(x) for x in arrays[0])) if arrays and arrays[0] else ()
    return tuple(int(x) for x in delta.matrix_shape)


def _shape_fits(lora: Shape, base: Shape, either_way: bool) -> tuple[bool, bool]:
    """(fits, only when turned round)."""
    if not lora:
        return True, False
    if lora == base:
        return True, False
    if len(lora) == 1 and len(base) == 2:  # a per-row / per-column vector (IA3, norms stored 2-D)
        return lora[0] in base, False
    if len(lora) == 1 and len(base) == 1:
        return lora[0] == base[0], False
    if either_way and tuple(reversed(lora)) == base:
        return True, True
    return False, False


def _component(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS else None


def check_fit(ld: LoraDelta, base: BaseModules) -> dict[str, Any]:
    """Whether every adapter module exists in the base with the adapter's shape.

    Modules of a pipeline component none of whose modules is found (e.g. the
    text-encoder part of a LoRA checked against a UNet config) are listed under
    ``skipped_components``, not as missing.

    Returns:
        ``{"fits", "modules", "matched", "missing", "missing_count", "shape_mismatches",
        "mismatch_count", "skipped_components", "turned_round", "base_kind", "base_modules", "message"}``.
    """
    names = list(base.shapes)
    smap = _suffix_map(names)
    fmap = _flat_map(names) if ld.family.startswith("unknown:") else None
    found: dict[str, str | None] = {n: match_name(n, base.shapes, smap, fmap) for n in ld.modules}
    per_comp: dict[str | None, int] = {}
    for n, hit in found.items():
        c = _component(n)
        per_comp[c] = per_comp.get(c, 0) + (hit is not None)
    any_hit = any(per_comp.values())
    skipped = {str(c): sum(1 for n in found if _component(n) == c) for c, hits in per_comp.items()
               if c is not None and hits == 0 and any_hit}
    missing, mismatches, turned = [], [], 0
    for n, hit in found.items():
        if str(_component(n)) in skipped:
            continue
        if hit is None:
            missing.append(n)
            continue
        want = _delta_shape(ld.modules[n])
        ok, rev = _shape_fits(want, base.shapes[hit][0], base.either_way)
        turned += rev
        if not ok:
            mismatches.append({"module": n, "base_module": hit, "lora": list(want), "base": list(base.shapes[hit][0])})
    checked = len(found) - sum(skipped.values())
    fits = checked > 0 and not missing and not mismatches
    if fits:
        msg = f"all {checked} adapter modules exist in the base with matching shapes"
    elif checked == 0:
        msg = "no adapter module belongs to this base"
    else:
        msg = f"{len(missing)} of {checked} adapter modules missing from the base, {len(mismatches)} with other shapes"
    return {
        "fits": fits, "modules": len(found), "checked": checked, "matched": checked - len(missing),
        "missing": missing[:MAX_LISTED], "missing_count": len(missing),
        "shape_mismatches": mismatches[:MAX_LISTED], "mismatch_count": len(mismatches),
        "skipped_components": skipped, "turned_round": turned, "base_kind": base.kind,
        "base_modules": len(names), "message": msg,
    }


def compat(lora: str | Path, base: str | Path) -> dict[str, Any]:
    """``lorasearch compat LORA BASE``: read both and check the fit.

    Raises:
        BadInput: unreadable adapter or base.
    """
    from lorasearch.formats import load_lora

    ld = load_lora(lora, hashes=False)
    task = None
    cfg_path = ld.source.get("config")
    if cfg_path:
        try:
            task = json.loads(Path(cfg_path).read_text(encoding="utf-8")).get("task_type")
        except (OSError, ValueError, AttributeError):
            task = None
    res = check_fit(ld, read_base(base, task))
    return {"lora": str(lora), "base": str(base), "family": ld.family, **res}
