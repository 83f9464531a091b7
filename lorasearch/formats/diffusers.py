"""diffusers LoRA files: the legacy attention-processor layout and the current PEFT-based one.

Legacy (diffusers <= 0.20, ``save_attn_procs``):
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight``
(older files have no ``unet.`` prefix); ``to_out_lora`` is ``to_out.0``; the
text encoder's ``to_q_lora`` is ``q_proj`` and ``to_out_lora`` is ``out_proj``
(diffusers' ``UNET_TO_DIFFUSERS`` / ``DIFFUSERS_OLD_TO_PEFT`` tables).

Current (``save_lora_weights`` after ``convert_state_dict_to_diffusers``):
``unet.<path>.to_q.lora.down.weight``, ``text_encoder.<path>.q_proj.lora_linear_layer.down.weight``,
and PEFT names ``<prefix>.<path>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias`` /
``lora_magnitude_vector`` with prefixes ``unet.``, ``text_encoder(_2|_3).``,
``transformer.`` (DiT models), adapter names (``lora_A.default.weight``)
stripped. Dotted names with kohya/LyCORIS suffixes (``<path>.lora_down.weight``
+ ``.alpha``, ``<path>.lokr_w1``), as ai-toolkit and some DiT trainers write
them, are read here too; BFL ``double_blocks``/``single_blocks`` names are left
to the Flux reader.

Scale: a module's ``.alpha`` tensor (alpha/r) if stored, else the LoraConfig in
the safetensors metadata ``lora_adapter_metadata`` (per component, peft rules),
else a PEFT config given with the file, else 1 (diffusers applies B@A as is).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from lorasearch.formats.base import COMPONENTS, ParsedLora, ReadContext, TensorSource, group_by_suffix, register_format
from lorasearch.formats.lycoris_suffixes import KOHYA_SUFFIX_ROLES
from lorasearch.formats.peft import LORA_ROLES, ConfigLookup, decode_dotted, describe_config_alpha, strip_adapter_name

METADATA_KEY = "lora_adapter_metadata"

# Suffixes only diffusers/PEFT writers produce (after legacy keys are rewritten).
DIFFUSERS_ROLES: dict[str, str] = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora.up.bias": "up_bias",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    **LORA_ROLES,
}
# kohya/LyCORIS suffixes on dotted names; '.weight' (IA3) and '.on_input' would
# swallow ordinary full weights, so they are not taken here.
DOTTED_LYCORIS_ROLES: dict[str, str] = {
    k: v for k, v in KOHYA_SUFFIX_ROLES.items() if k not in (".weight", ".on_input")
}
SUFFIX_ROLES: dict[str, str] = {**DOTTED_LYCORIS_ROLES, **DIFFUSERS_ROLES}

_LEGACY_RX = re.compile(
    r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>[A-Za-z0-9_]+?)_lora\.(?:(?P<half>down|up)\.weight|(?P<alpha>alpha))$"
)
_TE_LEGACY = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_BFL_RX = re.compile(r"(^|[._])(double_blocks|single_blocks)[._]")
_KOHYA_RX = re.compile(r"^(lora_unet_|lora_te[123]?_|lora_transformer_|lycoris_)")
PREFIX_COMPONENTS = tuple(c for c in COMPONENTS if c is not None and c.startswith(("unet", "transformer", "text_encoder")))
# ComfyUI / ai-toolkit write original-model names under this prefix.
ROOT_PREFIXES = ("diffusion_model.",)


def _any_bfl(keys: list[str]) -> bool:
    """Some key has BFL block names (``double_blocks`` / ``single_blocks``)."""
    return any(("double_blocks" in k or "single_blocks" in k) and _BFL_RX.search(k) for k in keys)


def _is_text_encoder(first: str) -> bool:
    return first.startswith("text_encoder")


def rewrite_legacy(key: str) -> str | None:
    """A legacy attention-processor key in current naming, or None if it is not one.

    ``X.processor.to_q_lora.down.weight`` -> ``X.to_q.lora.down.weight``;
    ``to_out_lora`` -> ``to_out.0`` (or ``out_proj`` under a text encoder).
    """
    m = _LEGACY_RX.match(key)
    if not m:
        return None
    mod, proj, half = m.group("mod"), m.group("proj"), m.group("half")
    if _is_text_encoder(mod.split(".", 1)[0]):
        proj = _TE_LEGACY.get(proj, proj)
    elif proj == "to_out":
        proj = "to_out.0"
    return f"{mod}.{proj}.alpha" if m.group("alpha") else f"{mod}.{proj}.lora.{half}.weight"


@lru_cache(maxsize=1 << 15)  # keys repeat from file to file of one trainer
def normalise_key(key: str) -> tuple[str, bool]:
    """A key in current diffusers/PEFT naming, and whether it was a legacy key."""
    k = strip_adapter_name(key)
    legacy = rewrite_legacy(k)
    if legacy is not None:
        return legacy, True
    return k.replace(".processor.", "."), False


def split_module(mod: str) -> tuple[str | None, str]:
    """Module part of a key -> (component, dotted path inside it)."""
    first, _, rest = mod.partition(".")
    if first in PREFIX_COMPONENTS and rest:
        comp, path = first, rest
    else:
        comp, path = None, mod
        for p in ROOT_PREFIXES:
            if path.startswith(p):
                path = path[len(p):]
    head, _, leaf = path.rpartition(".")
    if (comp or "").startswith("text_encoder"):
        # old diffusers named CLIP projections like UNet ones (DoRA magnitudes kept that naming)
        if leaf in _TE_LEGACY:
            path = f"{head}.{_TE_LEGACY[leaf]}" if head else _TE_LEGACY[leaf]
    elif leaf == "to_out":
        path += ".0"  # diffusers' Attention.to_out is a ModuleList; its Linear is to_out.0
    return comp, path


def _role_of(key: str) -> str | None:
    for suf in sorted(SUFFIX_ROLES, key=len, reverse=True):
        if key.endswith(suf) and len(key) > len(suf):
            return SUFFIX_ROLES[suf]
    return None


@lru_cache(maxsize=1 << 15)
def is_diffusers_key(key: str) -> bool:
    """True for keys this reader decodes (not BFL, kohya or PEFT ``base_model.`` names)."""
    if _KOHYA_RX.match(key) or key.startswith("base_model.") or ":" in key:
        return False
    nk, legacy = normalise_key(key)
    if legacy:
        return True
    for suf in DIFFUSERS_ROLES:
        if nk.endswith(suf) and len(nk) > len(suf):
            return True
    for suf in DOTTED_LYCORIS_ROLES:
        if nk.endswith(suf) and "." in nk[: -len(suf)]:
            return True
    return False


def parse_adapter_metadata(metadata: dict[str, str]) -> tuple[dict[str | None, dict[str, Any]], list[str]]:
    """LoraConfigs stored by diffusers in ``lora_adapter_metadata``.

    Pipelines store one flat dict with component-prefixed fields
    (``unet.r``, ``unet.lora_alpha``, ``text_encoder.rank_pattern``...); a model's
    ``save_lora_adapter`` stores its LoraConfig as is (returned under None).

    Returns:
        component (or None for "all") -> config, and warnings.
    """
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}, []
    try:
        parsed = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        return {}, [f"{METADATA_KEY} is not valid JSON ({exc}); scale 1 assumed"]
    if not isinstance(parsed, dict):
        return {}, [f"{METADATA_KEY} is not a JSON object; scale 1 assumed"]
    per: dict[str | None, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for k, v in parsed.items():
        if isinstance(v, dict) and _looks_like_config(v):
            per[k] = dict(v)  # nested per component
        elif "." in k:
            comp, _, fieldname = k.partition(".")
            per.setdefault(comp, {})[fieldname] = v
        else:
            plain[k] = v
    if _looks_like_config(plain):
        per[None] = plain
    return per, []


def _looks_like_config(d: dict[str, Any]) -> bool:
    return any(k in d for k in ("r", "lora_alpha", "alpha"))


def _first_segment(mod: str) -> str:
    return mod.split(".", 1)[0]


def _sort_keys(keys: list[str]) -> tuple[dict[str, str], list[str], int]:
    """Keys this reader decodes, normalised -> original; the rest; how many were legacy keys."""
    normalised: dict[str, str] = {}
    ignored: list[str] = []
    legacy_count = 0
    for k in keys:
        if not is_diffusers_key(k):
            ignored.append(k)
            continue
        nk, legacy = normalise_key(k)
        legacy_count += legacy
        normalised.setdefault(nk, k)
    return normalised, ignored, legacy_count


def _config_lookup(configs: dict[str | None, dict[str, Any]], peft_cfg: dict[str, Any] | None) -> ConfigLookup:
    """Module name -> (the LoraConfig that scales it, its path inside the component)."""

    def config_for(mod: str) -> tuple[dict[str, Any] | None, str]:
        comp, path = split_module(mod)
        first = _first_segment(mod)
        if comp is not None and comp in configs:
            return configs[comp], path
        if first in configs:
            return configs[first], mod[len(first) + 1:]
        if None in configs:
            return configs[None], path
        return peft_cfg, path

    return config_for


class _DiffusersBase:
    """Shared reading for the legacy and current layouts."""

    name = "diffusers"
    priority = 30

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        """Decode every module; component from the key prefix (None without one).

        Raises:
            BadInput: factors that do not chain, a bad config pattern.
        """
        normalised, ignored, legacy_count = _sort_keys(src.keys())
        groups_n, rest = group_by_suffix(list(normalised), SUFFIX_ROLES)
        ignored += [normalised[nk] for nk in rest]
        groups = {m: {role: normalised[nk] for role, nk in roles.items()} for m, roles in groups_n.items()}
        configs, warnings = parse_adapter_metadata(src.metadata)
        mods, rep = decode_dotted(src, groups, _config_lookup(configs, ctx.peft_config), split_module)
        warnings += rep.warnings
        meta: dict[str, Any] = {
            "algorithms": rep.algorithms,
            "layout": "legacy attention-processor" if legacy_count else "current",
            "alpha_source": _alpha_source(groups, configs, ctx.peft_config),
        }
        if configs:
            meta["adapter_metadata_components"] = sorted(str(c) for c in configs)
        stripped = sorted({p for p in ROOT_PREFIXES for m in groups if m.startswith(p)})
        if stripped:
            meta["prefix_stripped"] = stripped
        if ignored:
            meta["ignored_keys"] = ignored[:20]
            meta["ignored_count"] = len(ignored)
        if warnings:
            meta["warnings"] = warnings
        return ParsedLora("diffusers_legacy" if legacy_count else "diffusers", mods, None, meta)


def _alpha_source(groups: dict[str, dict[str, str]], configs: dict[str | None, dict[str, Any]], peft_cfg: dict[str, Any] | None) -> str:
    """One line saying where the scales came from."""
    parts = []
    if any("alpha" in roles for roles in groups.values()):
        parts.append("per-module .alpha tensors (alpha/rank)")
    for comp, cfg in configs.items():
        parts.append(describe_config_alpha(cfg, f"{METADATA_KEY}" + (f"[{comp}]" if comp else "")))
    if not configs and peft_cfg is not None:
        parts.append(describe_config_alpha(peft_cfg, "adapter config"))
    if not parts:
        return "none stored: scale 1 (diffusers applies up @ down as is)"
    return "; ".join(parts)


@register_format
class DiffusersLegacyReader(_DiffusersBase):
    """``...processor.to_q_lora.down.weight`` files (attention processors, diffusers <= 0.20)."""

    name = "diffusers_legacy"
    priority = 32

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        if _any_bfl(keys):
            return False
        # '_lora.' is part of every legacy key (and adapter-name stripping cannot create it): a cheap prefilter
        return any("_lora." in k and not _KOHYA_RX.match(k) and normalise_key(k)[1] for k in keys)


@register_format
class DiffusersReader(_DiffusersBase):
    """Current diffusers / PEFT-named files with or without component prefixes."""

    name = "diffusers"
    priority = 30

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        if _any_bfl(keys):
            return False
        if any(k.startswith("base_model.") for k in keys):
            return False
        return any(is_diffusers_key(k) for k in keys)
