"""PEFT adapters: ``base_model.model.<module>.lora_A.weight`` and friends.

Covers LoRA (incl. rsLoRA, rank/alpha patterns, DoRA magnitudes, ``lora_B.bias``,
``lora_embedding_A/B``, GPT-2 ``fan_in_fan_out``), LoHa and LoKr (LyCORIS key
names under ``base_model.model.``), and full ``modules_to_save`` weights (kept
as ``NeedsBase("replace")``). The scale comes from ``adapter_config.json``
(``ReadContext.peft_config``) with peft's own rules; without a config it is 1
and the metadata says so.

This module also holds the decoding engine for dotted (PEFT-style) module
names that the diffusers reader shares: adapter-name stripping, peft's
pattern-key matching and the per-module scale.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from lorasearch.delta import Dense, Factored, Kronecker, NeedsBase
from lorasearch.errors import BadInput, UnsupportedLayout
from lorasearch.formats.algorithms import AlphaRule, DecodedModule, decode_module
from lorasearch.formats.base import ParsedLora, RawModule, ReadContext, TensorSource, emit, group_by_suffix, register_format

PEFT_PREFIX = "base_model.model."
NO_CONFIG_ALPHA = "unknown (no adapter_config.json): scale 1 assumed"

# Parameter names after which peft inserts the adapter name (``lora_A.default.weight``).
ADAPTER_TOKENS = frozenset({
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
})

LYCORIS_ROLES: dict[str, str] = {
    f".{t}": t for t in ADAPTER_TOKENS if t.startswith(("hada_", "lokr_"))
}

LORA_ROLES: dict[str, str] = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}

PEFT_SUFFIX_ROLES: dict[str, str] = {
    **LORA_ROLES,
    **LYCORIS_ROLES,
    # modules_to_save: the module's whole trained weight
    ".weight": "full_weight",
    ".bias": "full_bias",
}

# module name -> (its adapter config or None, the key rank/alpha patterns are matched against)
ConfigLookup = Callable[[str], tuple[dict[str, Any] | None, str]]

SUPPORTED_PEFT_TYPES = ("LORA", "LOHA", "LOKR")
# init methods that rewrite the base weights, so B@A is not the update to the original model
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")


# A key without any of these substrings holds no adapter token (checked before splitting it).
_ADAPTER_TOKEN_RX = re.compile(r"lora_[AB]|lora_embedding_|lora_magnitude_vector|hada_|lokr_")


@lru_cache(maxsize=1 << 15)
def strip_adapter_name(key: str) -> str:
    """Drop the adapter name peft puts after a parameter name.

    ``x.lora_A.default.weight`` -> ``x.lora_A.weight``;
    ``x.lora_embedding_A.my_adapter`` -> ``x.lora_embedding_A``.
    """
    if not _ADAPTER_TOKEN_RX.search(key):
        return key
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        out.append(parts[i])
        if parts[i] in ADAPTER_TOKENS and i + 1 < len(parts) and parts[i + 1] not in ("weight", "bias"):
            i += 2
            continue
        i += 1
    return ".".join(out)


def get_pattern_key(pattern_keys: list[str] | tuple[str, ...], key_to_match: str) -> str:
    """peft's ``utils.other.get_pattern_key``: the first pattern matching a suffix of the key.

    A pattern matches when ``(.*\\.)?(<pattern>)$`` matches the module key from
    the start, i.e. the pattern covers the whole key or a dot-separated tail.

    Returns:
        the matching pattern, or the key itself when none matches (so that
        ``pattern_dict.get(result, default)`` falls back to the default).

    Raises:
        BadInput: a pattern that is not a valid regular expression.
    """
    for key in pattern_keys:
        try:
            match = re.match(rf"(.*\.)?({key})$", key_to_match)
        except re.error as exc:
            raise BadInput(f"adapter config pattern {key!r} is not a valid regular expression ({exc})", code="bad_config") from None
        if match:
            return key
    return key_to_match


@dataclass(frozen=True)
class ModuleScale:
    """What a config says one module's scale is."""

    r: float
    alpha: float
    rslora: bool

    @property
    def value(self) -> float:
        if self.r <= 0:
            return 1.0
        return float(self.alpha) / (math.sqrt(self.r) if self.rslora else float(self.r))


def _num(cfg: dict[str, Any], name: str, default: float) -> float:
    v = cfg.get(name, default)
    if v is None:
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        raise BadInput(f"adapter config field {name!r} is not a number: {v!r}", code="bad_config") from None


def _patterns(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    v = cfg.get(name) or {}
    if not isinstance(v, dict):
        raise BadInput(f"adapter config field {name!r} is not a mapping", code="bad_config")
    return v


def config_scale(cfg: dict[str, Any], path: str, algorithm: str) -> ModuleScale:
    """peft's scale for one module: rank/alpha after ``rank_pattern``/``alpha_pattern``.

    Args:
        cfg: the adapter config (LoraConfig / LoHaConfig / LoKrConfig as a dict).
        path: the module's key relative to the model the config was applied to.
        algorithm: ``lora``/``dora`` (``lora_alpha``, rsLoRA) or ``loha``/``lokr`` (``alpha``).

    Returns:
        r, alpha and whether alpha/sqrt(r) applies.
    """
    alpha_field = "alpha" if algorithm in ("loha", "lokr") else "lora_alpha"
    if alpha_field not in cfg:  # a LoRA config read for a LyCORIS module, or the reverse
        alpha_field = "lora_alpha" if "lora_alpha" in cfg else "alpha"
    rank_pattern, alpha_pattern = _patterns(cfg, "rank_pattern"), _patterns(cfg, "alpha_pattern")
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), path), cfg.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), cfg.get(alpha_field, 8))
    try:
        r_f, a_f = float(r), float(alpha if alpha is not None else r)
    except (TypeError, ValueError):
        raise BadInput(f"adapter config rank/alpha for {path!r} are not numbers: r={r!r}, alpha={alpha!r}", code="bad_config") from None
    rslora = bool(cfg.get("use_rslora", False)) and algorithm in ("lora", "dora")
    return ModuleScale(r_f, a_f, rslora)


def describe_config_alpha(cfg: dict[str, Any], where: str) -> str:
    """A one-line ``alpha_source`` for a config-derived scale."""
    alpha_field = "lora_alpha" if "lora_alpha" in cfg else "alpha"
    bits = [f"{where}: {alpha_field}={cfg.get(alpha_field)} r={cfg.get('r')}"]
    if _patterns(cfg, "rank_pattern") or _patterns(cfg, "alpha_pattern"):
        bits.append("with rank_pattern/alpha_pattern")
    if cfg.get("use_rslora"):
        bits.append("rsLoRA (alpha/sqrt(r))")
    return ", ".join(bits)


@dataclass
class DecodeReport:
    """What the dotted-name decoder found besides the modules."""

    algorithms: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rank_mismatches: list[str] = field(default_factory=list)


def _embedding_delta(mod: str, get: Callable[[str], np.ndarray], roles: dict[str, str]) -> Factored:
    """peft's embedding update ``(B @ A).T`` in the embedding weight's layout [num_embeddings, dim]."""
    if "emb_A" not in roles or "emb_B" not in roles:
        half = "lora_embedding_A" if "emb_A" in roles else "lora_embedding_B"
        raise BadInput(f"module {mod!r}: has {half} but not its pair", code="bad_factors")
    a, b = get(roles["emb_A"]), get(roles["emb_B"])
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise BadInput(f"module {mod!r}: embedding factors do not chain: B {b.shape} x A {a.shape}", code="bad_factors")
    return Factored(a.T, b.T, 1.0, (a.shape[1], b.shape[0]))


def _with_scale(dec: DecodedModule, s: float) -> DecodedModule:
    """Apply a config scale to a module decoded with scale 1 (the bias scales like B)."""
    w = dec.weight
    if isinstance(w, (Factored, Kronecker)):
        w.scale = float(s)
    if isinstance(dec.bias, Dense):
        dec.bias = Dense(dec.bias.values * np.float32(s), dec.bias.shape)
    return dec


def _scale_stored_bias(dec: DecodedModule) -> DecodedModule:
    """A module scaled by its stored ``.alpha``: the ``lora_B.bias`` gets the same scale."""
    if isinstance(dec.bias, Dense) and isinstance(dec.weight, (Factored, Kronecker)):
        dec.bias = Dense(dec.bias.values * np.float32(dec.weight.scale), dec.bias.shape)
    return dec


def _split_full(mod: str, roles: dict[str, str], rep: DecodeReport) -> tuple[dict[str, str], str | None]:
    """Separate whole ``.weight``/``.bias`` tensors from a module that also has adapter factors.

    Returns:
        the roles to decode, and the key of a whole bias kept beside the factors.
    """
    full = {"full_weight", "full_bias"}
    if not (full & roles.keys()) or not (roles.keys() - full):
        return roles, None
    if "full_weight" in roles:
        rep.warnings.append(f"{mod}: a whole weight is stored next to adapter factors; the whole weight is ignored")
    return {k: v for k, v in roles.items() if k not in full}, roles.get("full_bias")


_SCALED_ALGORITHMS = frozenset({"lora", "dora", "loha", "lokr", "lora_embedding"})


def tensor_rank(dec: DecodedModule) -> int | None:
    """The rank the tensors show, where it is the config's ``r`` (plain LoRA factors)."""
    w = dec.weight
    return w.rank if isinstance(w, Factored) and dec.algorithm != "loha" else None


def _decode_one(src: TensorSource, mod: str, roles: dict[str, str], rep: DecodeReport) -> DecodedModule:
    """One module's tensors decoded at scale 1 (a stored ``.alpha`` already applied)."""
    if "emb_A" in roles or "emb_B" in roles:
        dec = DecodedModule(_embedding_delta(mod, src.get, roles), algorithm="lora_embedding")
        if "magnitude" in roles:
            dec.magnitude = src.get(roles["magnitude"])
        return dec
    roles, full_bias = _split_full(mod, roles, rep)
    dec = decode_module(mod, src.get, roles, AlphaRule(alpha=None, missing="one"))
    if full_bias is not None and dec.bias is None:
        # peft bias="lora_only"/"all": the trained bias is saved whole next to the factors
        b = src.get(full_bias)
        dec.bias = NeedsBase("replace", {"full_bias": b}, shape=tuple(b.shape), note="full replacement bias")
    return dec


def _apply_scale(dec: DecodedModule, mod: str, roles: dict[str, str], config_for: ConfigLookup, rep: DecodeReport) -> DecodedModule:
    """A stored ``.alpha`` (already in the weight) also scales the bias; else the config's scale, if any."""
    if dec.algorithm not in _SCALED_ALGORITHMS:
        return dec  # full weights, norms, base-dependent methods: no alpha/rank scale
    if "alpha" in roles:
        return _scale_stored_bias(dec)
    cfg, pattern_key = config_for(mod)
    if cfg is None:
        return dec
    algo = "lora" if dec.algorithm in ("lora", "dora", "lora_embedding") else dec.algorithm
    ms = config_scale(cfg, pattern_key, algo)
    r = tensor_rank(dec)
    if r is not None and r != int(ms.r):
        rep.rank_mismatches.append(f"{mod}: config r={ms.r:g}, tensors rank {r}")
    return _with_scale(dec, ms.value)


def decode_dotted(
    src: TensorSource,
    groups: dict[str, dict[str, str]],
    config_for: ConfigLookup,
    locate: Callable[[str], tuple[str | None, str]],
) -> tuple[list[RawModule], DecodeReport]:
    """Decode ``module -> {role: key}`` groups of dotted (PEFT/diffusers) names.

    Scale per module: a stored ``.alpha`` tensor (alpha / tensor rank), else the
    config's (peft rules, pattern key = the module's path inside its model),
    else 1. ``lora_B.bias`` gets the module's scale, as peft merges it.

    Args:
        src: the tensors.
        groups: from ``group_by_suffix`` over normalised keys.
        config_for: module name -> (its adapter config or None, the key its
            patterns are matched against).
        locate: module name -> (component, dotted path).

    Returns:
        the raw modules and a report (algorithms, warnings).
    """
    rep = DecodeReport()
    mods: list[RawModule] = []
    for mod, roles in groups.items():
        dec = _decode_one(src, mod, roles, rep)
        if dec.weight is None and dec.bias is None:
            continue
        rep.algorithms[dec.algorithm] = rep.algorithms.get(dec.algorithm, 0) + 1
        dec = _apply_scale(dec, mod, roles, config_for, rep)
        comp, path = locate(mod)
        mods.extend(emit(dec, comp, path, False))
    if rep.rank_mismatches:
        rep.warnings.append(
            f"{len(rep.rank_mismatches)} modules have a tensor rank that differs from the config's r "
            f"(scale uses the config, as peft does), e.g. {rep.rank_mismatches[0]}"
        )
    return mods, rep


# --------------------------------------------------------------------------- PEFT reader

_MODULES_TO_SAVE_RX = re.compile(r"\.modules_to_save\.(default\.)?")


def normalise_peft_key(key: str) -> tuple[str | None, str]:
    """A PEFT key without its adapter name and wrapper segments.

    Returns:
        (normalised key or None when the key is to be ignored, reason when ignored).
    """
    if ".original_module." in key:
        return None, "original_module copy (the untrained original of a modules_to_save module)"
    if "lora_monteclora_sampler" in key:
        return None, "MonteCLoRA sampler state (not part of the merged update)"
    if "trainable_tokens_delta" in key or "token_adapter." in key:
        return None, "trainable-token rows (needs the base embedding; not read)"
    # bias="lora_only"/"all" saves the trained bias of a LoRA-wrapped layer as base_layer.bias
    k = _MODULES_TO_SAVE_RX.sub(".", key).replace(".base_layer.", ".")
    return strip_adapter_name(k), ""


def _unsupported(msg: str, example: str) -> UnsupportedLayout:
    """The project-wide refusal message: what the layout is, and one key of it."""
    return UnsupportedLayout(f"unsupported LoRA layout: {msg} (e.g. {example!r})")


def _check_peft_type(cfg: dict[str, Any] | None, keys: list[str]) -> str | None:
    peft_type = str(cfg.get("peft_type")).upper() if cfg and cfg.get("peft_type") else None
    if peft_type is not None and peft_type not in SUPPORTED_PEFT_TYPES:
        raise _unsupported(
            f"PEFT {peft_type} adapters do not store a LoRA delta per module (supported: {', '.join(SUPPORTED_PEFT_TYPES)})",
            keys[0],
        )
    return peft_type


def _init_warning(cfg: dict[str, Any] | None) -> str | None:
    init = str((cfg or {}).get("init_lora_weights", "")).lower()
    for name in _BASE_REWRITING_INITS:
        if init.startswith(name):
            return (
                f"init_lora_weights={init!r} rewrites the base weights at initialisation; unless the adapter was "
                "converted on save, B@A is the update to that rewritten base, not to the original model"
            )
    return None


CONFIG_FIELDS = (
    "peft_type", "base_model_name_or_path", "task_type", "r", "lora_alpha", "alpha", "use_rslora", "use_dora",
    "fan_in_fan_out", "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "lora_bias", "revision",
)


def config_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config fields worth keeping in the reader metadata (sets become sorted lists)."""
    out: dict[str, Any] = {}
    for k in CONFIG_FIELDS:
        if k in cfg and cfg[k] not in (None, {}, []):
            v = cfg[k]
            out[k] = sorted(v) if isinstance(v, (set, tuple)) else v
    return out


@dataclass
class _Keys:
    """A PEFT file's keys after normalisation: normalised -> original, and what was set aside."""

    normalised: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    duplicates: int = 0


def _sort_keys(keys: list[str]) -> _Keys:
    out = _Keys()
    for k in keys:
        if not k.startswith(PEFT_PREFIX):
            out.ignored.setdefault("outside base_model.model.", []).append(k)
            continue
        nk, why = normalise_peft_key(k[len(PEFT_PREFIX):])
        if nk is None:
            out.ignored.setdefault(why, []).append(k)
        elif nk in out.normalised:
            out.duplicates += 1
        else:
            out.normalised[nk] = k
    return out


def _refuse_non_lora(keys: list[str], cfg: dict[str, Any] | None) -> str | None:
    """Raise UnsupportedLayout for PEFT files that hold no per-module LoRA delta; returns the config's peft_type."""
    outside = [k for k in keys if not k.startswith(PEFT_PREFIX)]
    if outside and len(outside) == len(keys):
        what = "UniLoRA's single shared vector" if any("unilora" in k for k in outside) else "no per-module adapter tensors"
        raise _unsupported(f"PEFT file with {what}, not LoRA factors of named modules", outside[0])
    peft_type = _check_peft_type(cfg, keys)
    lora_e = [k for k in keys if k.endswith(".lora_E") or ".lora_E." in k]
    if lora_e:
        raise _unsupported("PEFT AdaLoRA (lora_E singular values) is not read", lora_e[0])
    return peft_type


def _peft_metadata(cfg: dict[str, Any] | None, rep: DecodeReport, sorted_keys: _Keys, peft_type: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"algorithms": rep.algorithms, "peft_type": peft_type or _infer_type(rep.algorithms)}
    warnings = list(rep.warnings)
    if cfg is None:
        meta["alpha_source"] = NO_CONFIG_ALPHA
    else:
        meta["alpha_source"] = describe_config_alpha(cfg, "adapter_config.json")
        meta["config"] = config_summary(cfg)
        if cfg.get("fan_in_fan_out"):
            meta["fan_in_fan_out"] = "true: the base layers are Conv1D (weight stored in x out); deltas are kept out x in = B@A"
        if cfg.get("monteclora_config"):
            meta["monteclora"] = "variational sampler ignored; peft merges the plain LoRA B@A"
        init_warn = _init_warning(cfg)
        if init_warn:
            warnings.append(init_warn)
    if sorted_keys.duplicates:
        warnings.append(f"{sorted_keys.duplicates} tensors duplicate another after removing adapter/wrapper names; first kept")
    if sorted_keys.ignored:
        flat = [k for ks in sorted_keys.ignored.values() for k in ks]
        meta["ignored_keys"] = flat[:20]
        meta["ignored_count"] = len(flat)
        meta["ignored_reasons"] = {why: len(ks) for why, ks in sorted_keys.ignored.items()}
    if warnings:
        meta["warnings"] = warnings
    return meta


@register_format
class PeftReader:
    """PEFT ``save_pretrained`` / ``get_peft_model_state_dict`` files."""

    name = "peft"
    priority = 60

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(k.startswith("base_model.") for k in keys)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        """Decode every adapter module; names are paths from the model root (component None).

        Raises:
            UnsupportedLayout: UniLoRA, AdaLoRA, non-LoRA peft types, files with no factors.
            BadInput: factors that do not chain, a bad config.
        """
        keys, cfg = src.keys(), ctx.peft_config
        peft_type = _refuse_non_lora(keys, cfg)
        sk = _sort_keys(keys)
        groups_n, rest = group_by_suffix(list(sk.normalised), PEFT_SUFFIX_ROLES)
        groups = {m: {role: sk.normalised[nk] for role, nk in roles.items()} for m, roles in groups_n.items()}
        for nk in rest:
            sk.ignored.setdefault("unknown parameter name", []).append(sk.normalised[nk])
        # peft matches rank/alpha patterns against the module path inside the wrapped model
        mods, rep = decode_dotted(src, groups, lambda m: (cfg, m), lambda m: (None, m))
        if all(isinstance(rm.delta, NeedsBase) for rm in mods):
            example = next(iter(sk.normalised.values()), keys[0])
            raise _unsupported("PEFT file without any adapter factors (only full weights or unknown tensors)", example)
        return ParsedLora("peft", mods, None, _peft_metadata(cfg, rep, sk, peft_type))


def _infer_type(algorithms: dict[str, int]) -> str:
    if "loha" in algorithms:
        return "LOHA"
    if "lokr" in algorithms:
        return "LOKR"
    return "LORA"


# --------------------------------------------------------------------------- refusals

_INDEXED_RX = re.compile(r"^w_[ab]_\d+$")


@register_format
class IndexedFactorsRefusal:
    """Custom LoRA-ViT / SAM-LoRA files (``w_a_000``, ``w_b_000``): refused, never guessed.

    Their factors are numbered in the order a script injected them, with no
    module names and no stored order, so no base-model module can be named.
    """

    name = "indexed_factors"
    priority = 1

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return bool(keys) and sum(bool(_INDEXED_RX.match(k)) for k in keys) * 2 >= len(keys)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        example = next(k for k in src.keys() if _INDEXED_RX.match(k))
        raise _unsupported(
            "custom numbered factors (w_a_NNN / w_b_NNN, e.g. LoRA-ViT or SAM-LoRA scripts) name no module of a "
            "known model, so the update cannot be placed",
            example,
        )
