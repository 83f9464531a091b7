"""Flux.1 module names: BFL (Black Forest Labs) originals -> diffusers ``FluxTransformer2DModel``.

The BFL model fuses projections that diffusers keeps apart: a double block's
``img_attn.qkv`` is diffusers' ``attn.to_q/to_k/to_v`` stacked row-wise, and a
single block's ``linear1`` is ``attn.to_q/to_k/to_v`` plus ``proj_mlp``. A
``Target`` says which diffusers module(s) a BFL module becomes and how its
output rows are cut. The table follows diffusers'
``_convert_kohya_flux_lora_to_diffusers`` and
``_convert_bfl_flux_control_lora_to_diffusers`` (diffusers 0.42).

Fused names (used only when an update cannot be cut row-wise exactly, see
``flux.py``) follow diffusers' own fused projections: ``attn.to_qkv`` and
``attn.to_added_qkv`` (``Attention.fuse_projections``) and, for a single
block's ``linear1``, ``attn.to_qkv_mlp_proj`` (the Flux.2 single-block name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Flux.1 widths: every Flux.1 variant (dev, schnell, Fill, Kontext, Chroma) has these.
FLUX1_HIDDEN = 3072
FLUX1_MLP = 4 * FLUX1_HIDDEN


@dataclass(frozen=True)
class Target:
    """Where one BFL module's update goes.

    Attributes:
        names: diffusers module paths (inside the transformer), one per output slice.
        split: ``none`` (one module), ``equal`` (rows cut into ``len(names)`` equal
            parts), ``linear1`` (rows cut as ``[h, h, h, rest]`` with ``h`` the
            input width), or ``swap`` (one module whose two row halves are
            exchanged: BFL's ``(shift, scale)`` is diffusers' ``(scale, shift)``).
        fused: the name used when the rows cannot be cut exactly.
        replace: the file stores a full replacement weight (a norm scale), not an update.
    """

    names: tuple[str, ...]
    split: str = "none"
    fused: str | None = None
    replace: bool = False


def _one(name: str) -> Target:
    return Target((name,))


# Inside ``double_blocks.{i}.`` -> inside ``transformer_blocks.{i}.``
DOUBLE: dict[str, Target] = {
    "img_attn.qkv": Target(("attn.to_q", "attn.to_k", "attn.to_v"), "equal", "attn.to_qkv"),
    "img_attn.proj": _one("attn.to_out.0"),
    "img_mlp.0": _one("ff.net.0.proj"),
    "img_mlp.2": _one("ff.net.2"),
    "img_mod.lin": _one("norm1.linear"),
    "txt_attn.qkv": Target(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "equal", "attn.to_added_qkv"),
    "txt_attn.proj": _one("attn.to_add_out"),
    "txt_mlp.0": _one("ff_context.net.0.proj"),
    "txt_mlp.2": _one("ff_context.net.2"),
    "txt_mod.lin": _one("norm1_context.linear"),
    "img_attn.norm.query_norm": Target(("attn.norm_q",), replace=True),
    "img_attn.norm.key_norm": Target(("attn.norm_k",), replace=True),
    "txt_attn.norm.query_norm": Target(("attn.norm_added_q",), replace=True),
    "txt_attn.norm.key_norm": Target(("attn.norm_added_k",), replace=True),
}

# Inside ``single_blocks.{i}.`` -> inside ``single_transformer_blocks.{i}.``
SINGLE: dict[str, Target] = {
    "linear1": Target(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1", "attn.to_qkv_mlp_proj"),
    "linear2": _one("proj_out"),
    "modulation.lin": _one("norm.linear"),
    "norm.query_norm": Target(("attn.norm_q",), replace=True),
    "norm.key_norm": Target(("attn.norm_k",), replace=True),
}

TOP: dict[str, Target] = {
    "img_in": _one("x_embedder"),
    "txt_in": _one("context_embedder"),
    "time_in.in_layer": _one("time_text_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": _one("time_text_embed.timestep_embedder.linear_2"),
    "vector_in.in_layer": _one("time_text_embed.text_embedder.linear_1"),
    "vector_in.out_layer": _one("time_text_embed.text_embedder.linear_2"),
    "guidance_in.in_layer": _one("time_text_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": _one("time_text_embed.guidance_embedder.linear_2"),
    "final_layer.linear": _one("proj_out"),
    "final_layer.adaLN_modulation.1": Target(("norm_out.linear",), "swap"),
}

# XLabs attention processors: ``double_blocks.{i}.processor.<name>`` and
# ``single_blocks.{i}.processor.<name>``. In x-flux the single-block qkv_lora
# (dim -> 3*dim) adds to the q,k,v rows of linear1 only, and proj_lora
# (15360 -> dim) is linear2 (diffusers maps them the same way).
XLABS_DOUBLE: dict[str, str] = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
}
XLABS_SINGLE: dict[str, Target] = {
    "qkv_lora": Target(("attn.to_q", "attn.to_k", "attn.to_v"), "equal", "attn.to_qkv"),
    "proj_lora": _one("proj_out"),
}

_BLOCK_RX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_FLAT_BLOCK_RX = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_BLOCK_PREFIX = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_TABLES = {"double_blocks": DOUBLE, "single_blocks": SINGLE}
_FLAT = {kind: {k.replace(".", "_"): k for k in table} for kind, table in _TABLES.items()}
_FLAT_TOP = {k.replace(".", "_"): k for k in TOP}


def _prefixed(target: Target, prefix: str) -> Target:
    fused = f"{prefix}{target.fused}" if target.fused else None
    return Target(tuple(prefix + n for n in target.names), target.split, fused, target.replace)


def bfl_target(path: str) -> Target | None:
    """The diffusers target of a dotted BFL module path (``double_blocks.0.img_attn.qkv``).

    Returns:
        the target with full transformer paths, or None if the name is not a Flux.1 module.
    """
    if path in TOP:
        return TOP[path]
    m = _BLOCK_RX.match(path)
    if not m:
        return None
    kind, idx, rest = m.groups()
    target = _TABLES[kind].get(rest)
    return _prefixed(target, f"{_BLOCK_PREFIX[kind]}.{idx}.") if target else None


def unflatten(flat: str) -> str | None:
    """A kohya flattened BFL path (``double_blocks_0_img_attn_qkv``) -> dotted, or None if unknown."""
    if flat in _FLAT_TOP:
        return _FLAT_TOP[flat]
    m = _FLAT_BLOCK_RX.match(flat)
    if not m:
        return None
    kind, idx, rest = m.groups()
    dotted = _FLAT[kind].get(rest)
    return f"{kind}.{idx}.{dotted}" if dotted else None


def xlabs_target(path: str) -> Target | None:
    """The diffusers target of an XLabs processor path (``double_blocks.0.processor.qkv_lora1``)."""
    m = _BLOCK_RX.match(path)
    if not m:
        return None
    kind, idx, rest = m.groups()
    if not rest.startswith("processor."):
        return None
    name = rest[len("processor."):]
    if kind == "double_blocks":
        bfl = XLABS_DOUBLE.get(name)
        return bfl_target(f"double_blocks.{idx}.{bfl}") if bfl else None
    target = XLABS_SINGLE.get(name)
    return _prefixed(target, f"single_transformer_blocks.{idx}.") if target else None
