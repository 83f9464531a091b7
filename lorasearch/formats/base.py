"""The reader registry: one reader per key-naming scheme, found by key pattern.

A reader splits each tensor key into (module, role), groups the roles of one
module and hands them to an algorithm decoder (``algorithms.py``: LoRA, LoHa,
LoKr...) which returns the module's delta. The result is a ``ParsedLora`` whose
module names are still in the file's own naming (``RawModule``);
``families.resolve`` then detects the base-model family from names and shapes
and turns them into canonical diffusers / PEFT module paths.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from lorasearch.delta import Delta
from lorasearch.errors import UnsupportedLayout

if TYPE_CHECKING:
    from lorasearch.formats.algorithms import AlphaRule, DecodedModule


class TensorSource(Protocol):
    """What readers read from: a validated safetensors file or an in-memory dict."""

    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> np.ndarray: ...
    def dtype(self, key: str) -> str: ...


@dataclass
class DictSource:
    """A TensorSource over arrays held in memory (tests, converted state dicts)."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self.tensors[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.tensors[key], dtype=np.float32)

    def dtype(self, key: str) -> str:
        return {"float32": "F32", "float16": "F16", "float64": "F64"}.get(str(np.asarray(self.tensors[key]).dtype), "F32")


# Components a raw module can belong to. ``te``/``te1``/``te2``/``te3`` are
# kohya's text-encoder tags, whose meaning depends on the family (te3 is T5 in
# both SD3 and Flux; te2 is CLIP-G in SDXL but T5 in OneTrainer Flux files).
COMPONENTS = (
    "unet", "transformer", "te", "te1", "te2", "te3",
    "text_encoder", "text_encoder_2", "text_encoder_3", None,
)


@dataclass
class RawModule:
    """One module's delta under the file's own name.

    Attributes:
        component: which network it belongs to (see ``COMPONENTS``); None when
            the file names the module from the model root (PEFT on an LLM).
        path: module path inside the component, e.g.
            ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.
        flat: True when dots were replaced by underscores (kohya), so the path
            can only be recovered from the family's module table.
        delta: the update.
        magnitude: DoRA magnitude (``dora_scale`` / ``lora_magnitude_vector``).
        is_bias: the delta is the module's bias update.
    """

    component: str | None
    path: str
    flat: bool
    delta: Delta
    magnitude: np.ndarray | None = None
    is_bias: bool = False


@dataclass
class ParsedLora:
    """A reader's output before family detection.

    Attributes:
        format: reader name, e.g. ``kohya``.
        modules: raw modules.
        family_hint: a family the layout implies by itself (e.g. ``flux`` for
            BFL block names), checked against shapes like any other guess.
        metadata: reader findings: ``algorithms`` used, ``alpha_source``,
            ``warnings``, ``ignored_keys``, PEFT config fields...
    """

    format: str
    modules: list[RawModule]
    family_hint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadContext:
    """Side information a reader may use."""

    path: str = ""
    peft_config: dict[str, Any] | None = None


class FormatReader(Protocol):
    name: str
    priority: int

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool: ...
    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora: ...


_READERS: list[FormatReader] = []


def register_format(cls: type) -> type:
    """Class decorator: register a reader (higher ``priority`` is tried first)."""
    _READERS.append(cls())
    _READERS.sort(key=lambda r: -r.priority)
    return cls


def readers() -> list[FormatReader]:
    return list(_READERS)


def pick_reader(keys: list[str], metadata: dict[str, str], path: str = "") -> FormatReader:
    """The first registered reader whose key patterns match.

    Raises:
        UnsupportedLayout: with an example key when none matches.
    """
    for r in _READERS:
        if r.matches(keys, metadata):
            return r
    example = keys[0] if keys else "(no tensors)"
    where = f"{path}: " if path else ""
    raise UnsupportedLayout(
        f"{where}unsupported LoRA layout: no reader knows keys like {example!r} ({len(keys)} tensors)"
    )


def any_key(keys: list[str], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in keys)


_TAIL = 3  # suffixes are bucketed by their last characters: a key is only tried against its bucket


@lru_cache(maxsize=64)
def _suffix_buckets(suffixes: tuple[str, ...]) -> tuple[dict[str, list[str]], list[str]]:
    """Suffixes longest first, grouped by their last ``_TAIL`` characters.

    Returns:
        tail -> the suffixes a key ending in that tail can end with (longest
        first, the shorter-than-tail ones last), and the short ones alone.
    """
    ordered = sorted(suffixes, key=len, reverse=True)  # stable: ties keep the caller's order
    short = [s for s in ordered if len(s) < _TAIL]
    buckets: dict[str, list[str]] = {}
    for suf in ordered:
        if len(suf) >= _TAIL:
            buckets.setdefault(suf[-_TAIL:], []).append(suf)
    return {t: b + short for t, b in buckets.items()}, short


def group_by_suffix(
    keys: list[str], suffix_roles: dict[str, str], name_of: Callable[[str], str | None] | None = None
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split keys into ``module -> {role: key}`` by their longest known suffix.

    Args:
        keys: tensor names.
        suffix_roles: suffix (with its leading separator) -> role name.
        name_of: optional rewrite of the module part (return None to drop).

    Returns:
        the groups, and the keys no suffix matched.
    """
    buckets, short = _suffix_buckets(tuple(suffix_roles))
    # When every suffix starts with a dot, a key's tail from its first dot is the
    # longest suffix it can have: one dict lookup settles most keys (kohya names
    # hold no other dot).
    dotted = all(s.startswith(".") for s in suffix_roles)
    groups: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for k in keys:
        if dotted:
            i = k.find(".")
            role = suffix_roles.get(k[i:]) if i > 0 else None
            if role is not None:
                mod = k[:i] if name_of is None else name_of(k[:i])
                if mod is not None:
                    groups.setdefault(mod, {})[role] = k
                continue
        for suf in buckets.get(k[-_TAIL:], short) if len(k) >= _TAIL else short:
            if k.endswith(suf) and len(k) > len(suf):
                mod = k[: -len(suf)]
                if name_of is not None:
                    mod = name_of(mod)
                    if mod is None:
                        break
                groups.setdefault(mod, {})[suffix_roles[suf]] = k
                break
        else:
            rest.append(k)
    return groups, rest


def emit(decoded: "DecodedModule", component: str | None, path: str, flat: bool) -> list[RawModule]:
    """RawModules for one decoded module: its weight part and its bias part."""
    out: list[RawModule] = []
    if decoded.weight is not None:
        out.append(RawModule(component, path, flat, decoded.weight, decoded.magnitude))
    if decoded.bias is not None:
        out.append(RawModule(component, path, flat, decoded.bias, is_bias=True))
    return out


def decode_groups(
    src: TensorSource,
    groups: dict[str, dict[str, str]],
    rule: "AlphaRule",
    locate: Callable[[str], tuple[str | None, str, bool]],
) -> tuple[list[RawModule], dict[str, int]]:
    """Decode every ``module -> {role: key}`` group.

    Args:
        src: where tensors are read from.
        groups: from ``group_by_suffix``.
        rule: alpha rule of the format.
        locate: module part of the key -> (component, path, flat).

    Returns:
        raw modules, and a count of algorithms seen.
    """
    from lorasearch.formats.algorithms import decode_module

    mods: list[RawModule] = []
    algos: dict[str, int] = {}
    # plain factors may be left unwritten until the sketch needs them (kohya names are
    # only renamed and sliced from here on; see SafetensorsFile.get_deferred)
    view = getattr(src, "get_deferred", None) if getattr(src, "defer", False) else None
    get = src.get
    for mod, roles in groups.items():
        dec = decode_module(mod, get, roles, rule, view)
        if dec.weight is None and dec.bias is None:
            continue
        algos[dec.algorithm] = algos.get(dec.algorithm, 0) + 1
        comp, path, flat = locate(mod)
        mods.extend(emit(dec, comp, path, flat))
    return mods, algos
