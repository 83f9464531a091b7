"""kohya sd-scripts / LyCORIS naming: ``lora_unet_<module path with '_'>.<suffix>``.

Covers LoRA, LoCon (+Tucker), LoHa, LoKr, full/diff, norms, DoRA, (IA)^3, OFT,
GLoRA under the prefixes ``lora_unet_``, ``lora_te_``/``lora_te1_``/``lora_te2_``/
``lora_te3_``, ``lora_transformer_`` (OneTrainer DiT files) and ``lycoris_``
(lycoris-lora applied to a plain module). Paths are flattened, so the
family's module table recovers the dots.
"""
from __future__ import annotations

import json
import re

from lorasearch.formats.algorithms import AlphaRule
from lorasearch.formats.base import ParsedLora, ReadContext, TensorSource, decode_groups, group_by_suffix, register_format
from lorasearch.formats.lycoris_suffixes import KOHYA_SUFFIX_ROLES

PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te"),
    ("lora_transformer_", "transformer"),
    ("lycoris_", None),
)
_PREFIX_RX = re.compile(r"^(lora_unet_|lora_te[123]?_|lora_transformer_|lycoris_)")
_PREFIXES = tuple(p for p, _ in PREFIXES)  # the same prefixes for str.startswith: no regex call per key
# A malformed writer seen in the wild: '..._to_k_lora_down.weight' (underscore
# instead of dot) and a doubled 'lora_unet_unet_' prefix.
_MALFORMED_SUFFIXES = {"_lora_down.weight": "down", "_lora_up.weight": "up"}
_MALFORMED_ENDS = tuple(_MALFORMED_SUFFIXES)


def locate(mod: str) -> tuple[str | None, str, bool]:
    """Module part of a kohya key -> (component, flat path, flat=True)."""
    for prefix, comp in PREFIXES:
        if mod.startswith(prefix):
            path = mod[len(prefix):]
            if comp == "unet" and path.startswith("unet_"):
                path = path[len("unet_"):]
            return comp, path, True
    return None, mod, True


@register_format
class KohyaReader:
    """kohya / LyCORIS flattened names."""

    name = "kohya"
    priority = 50
    defers = True  # plain factors may be left unwritten (decode_groups: SafetensorsFile.get_deferred)

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(k.startswith(_PREFIXES) for k in keys)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        all_keys = src.keys()
        keys = [k for k in all_keys if k.startswith(_PREFIXES)]
        bad = [k for k in keys if k.endswith(_MALFORMED_ENDS)]
        bad_set = set(bad)
        groups, rest = group_by_suffix([k for k in keys if k not in bad_set] if bad else keys, KOHYA_SUFFIX_ROLES)
        warnings: list[str] = []
        if bad:
            malformed, _ = group_by_suffix(bad, _MALFORMED_SUFFIXES)
            groups.update(malformed)
            warnings.append(f"malformed kohya keys ('_lora_down.weight', {len(bad)} tensors) read as LoRA without alpha")
        # Plain alpha/r even when ``ss_network_args`` says rs_lora: LyCORIS then
        # stores alpha*sqrt(r) in ``.alpha`` so that alpha/r is its scale.
        rule = AlphaRule(missing="rank")
        modules, algos = decode_groups(src, groups, rule, locate)
        ignored = (sorted(set(all_keys) - set(keys)) if len(keys) < len(all_keys) else []) + rest
        meta = {"algorithms": algos, "alpha_source": "per-module .alpha tensors (missing: alpha = rank)"}
        if ignored:
            meta["ignored_keys"] = ignored[:20]
            meta["ignored_count"] = len(ignored)
        if warnings:
            meta["warnings"] = warnings
        hint = None
        if src.metadata.get("ss_network_module"):
            meta["network_module"] = src.metadata["ss_network_module"]
        if _network_arg(src.metadata, "rs_lora"):
            meta["rs_lora"] = "stored .alpha already holds alpha*sqrt(r) (LyCORIS); scale = alpha/r"
        return ParsedLora("kohya", modules, hint, meta)


def _network_arg(metadata: dict[str, str], name: str) -> bool:
    """A truthy flag in sd-scripts' ``ss_network_args`` JSON (values are strings there)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (json.JSONDecodeError, TypeError):
        return False
    value = args.get(name) if isinstance(args, dict) else None
    return str(value).strip().lower() in {"true", "1", "yes"}
