"""Flux.1 files that use BFL (Black Forest Labs) module names.

Readers (all priority 80, family hint ``flux``):

- ``kohya-flux``: sd-scripts ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``
  (+ ``.alpha``, ``.dora_scale``, LyCORIS suffixes), with ``lora_te1_`` (CLIP-L)
  and ``lora_te3_`` (T5) left as kohya flat text-encoder modules.
- ``xlabs-flux``: ``double_blocks.0.processor.qkv_lora1.down.weight`` (no alpha).
- ``bfl-flux``: ComfyUI / ai-toolkit ``diffusion_model.double_blocks.0.img_attn.qkv``
  with ``lora_A/lora_B``, ``lora_down/lora_up`` + ``.alpha`` or LyCORIS suffixes.
- ``bfl-control-flux``: the BFL Canny/Depth control LoRAs (bare BFL names with
  ``lora_B.bias`` deltas and full ``norm.*_norm.scale`` replacements).

Every module is renamed to the diffusers ``FluxTransformer2DModel`` path
(component ``transformer``, dotted), and fused projections are cut row-wise so
a Flux update reads to the same modules whatever file it came in:
``img_attn.qkv`` -> ``attn.to_q/to_k/to_v`` (the down factor is shared; diffusers'
block-sparse "split qkv" files get their rank blocks back),
``single_blocks.N.linear1`` -> ``attn.to_q/to_k/to_v`` + ``proj_mlp``, and
``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its two row
halves exchanged (BFL orders ``shift, scale``, diffusers ``scale, shift``).

A LoKr update ``kron(w1, w2)`` can be cut exactly when every cut falls on a
multiple of w2's row count (rows ``[s, e)`` are then ``kron(w1[s/b:e/b], w2)``),
which holds for the usual factorisations of 9216 = 96*96. Otherwise the whole
update is kept as one Kronecker delta under a fused name (``attn.to_qkv``,
``attn.to_added_qkv`` or ``attn.to_qkv_mlp_proj``, see ``bfl_names``) and the
reader says so in ``metadata["fused_kept"]``: splitting it would need the dense
matrix. Base-dependent updates (OFT, IA3...) on fused modules are kept fused too.

Flux.2 reuses the BFL block names with other widths (a SwiGLU MLP, no per-block
modulation); such files are handed to the next reader that matches (the generic
kohya / diffusion_model readers) rather than mapped onto Flux.1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lorasearch.delta import Delta, Dense, Factored, Kronecker, NeedsBase, Side, side_shape
from lorasearch.formats import kohya
from lorasearch.formats.algorithms import AlphaRule, DecodedModule, decode_module
from lorasearch.formats.base import (
    ParsedLora, RawModule, ReadContext, TensorSource, emit, group_by_suffix, readers, register_format,
)
from lorasearch.formats.bfl_names import FLUX1_HIDDEN, Target, bfl_target, unflatten, xlabs_target
from lorasearch.formats.lycoris_suffixes import KOHYA_SUFFIX_ROLES

FAMILY = "flux"
FORMATS = ("kohya-flux", "xlabs-flux", "bfl-flux", "bfl-control-flux")
PRIORITY = 80

# Names that share the double_blocks/single_blocks layout but belong to
# HunyuanVideo (musubi-tuner / ComfyUI): never read those as Flux.
_HUNYUAN_FLAT_RX = re.compile(r"(_mod_linear|_modulation_linear|_mlp_fc[12])\.|token_refiner")
_HUNYUAN_DOTTED_RX = re.compile(r"(mod\.linear|modulation\.linear|mlp\.fc[12]|_attn_(qkv|proj)\b|token_refiner)")

_KOHYA_FLUX_RX = re.compile(r"^lora_unet_(double_blocks|single_blocks)_\d+_")
_KOHYA_FLUX_STARTS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")  # cheap prefilter for the above
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_BFL_DOTTED_RX = re.compile(r"^(?:model\.diffusion_model\.|diffusion_model\.)?(double_blocks|single_blocks)\.\d+\.")
_XLABS_RX = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.\d+\.processor\.")
# ComfyUI text-encoder prefixes -> kohya tags (te1 = CLIP-L, te3 = T5 for Flux).
_COMFY_TE = (("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.t5xxl.transformer.", "te3"))

BFL_SUFFIX_ROLES: dict[str, str] = {
    **{k: v for k, v in KOHYA_SUFFIX_ROLES.items() if k != ".weight"},
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".scale": "full_weight",  # BFL control LoRA: RMSNorm scales stored whole
}
XLABS_SUFFIX_ROLES: dict[str, str] = {".down.weight": "down", ".up.weight": "up"}
_BFL_ALPHA = "per-module .alpha tensors where stored (missing: scale 1)"


# --------------------------------------------------------------------------- row maths


def _side_rows(side: Side, start: int, stop: int) -> Side:
    if isinstance(side, Factored):
        return Factored(side.up[start:stop], side.down, side.scale)
    return side[start:stop]


def row_slice(d: Delta, start: int, stop: int) -> Delta | None:
    """Rows ``[start, stop)`` of an update, or None when the form cannot be cut exactly.

    Args:
        d: a weight update (2-D) or a bias vector (Dense 1-D).
        start, stop: the output rows to keep.

    Returns:
        the update of those rows in the same form, or None (a LoKr cut that does
        not fall on w2's row blocks, or a base-dependent update).
    """
    if isinstance(d, Factored):
        return Factored(d.up[start:stop], d.down, d.scale, (stop - start, *d.shape[1:]))
    if isinstance(d, Dense):
        shape = (stop - start, *d.shape[1:]) if len(d.shape) > 1 else (stop - start,)
        return Dense(d.values[start:stop], shape)
    if isinstance(d, Kronecker):
        b = side_shape(d.w2)[0]
        if start % b or stop % b:
            return None
        return Kronecker(_side_rows(d.w1, start // b, stop // b), d.w2, d.scale)
    return None


def split_rows(d: Delta, dims: list[int]) -> list[Delta] | None:
    """Cut an update into consecutive row blocks of the given heights (None if not exact)."""
    if sum(dims) != d.matrix_shape[0]:
        return None
    parts: list[Delta] = []
    start = 0
    for h in dims:
        part = row_slice(d, start, start + h)
        if part is None:
            return None
        parts.append(part)
        start += h
    return parts


def block_sparse_parts(f: Factored, dims: list[int]) -> list[Factored] | None:
    """diffusers' "sparse" split: rank block j feeds only row block j.

    sd-scripts' ``split_qkv`` saves separate q/k/v LoRAs as one fused LoRA whose
    up factor is block-diagonal; cutting it back gives each part its own rank
    ``r/n`` instead of ``r`` (same update, same factors as diffusers' converter).
    """
    n, r = len(dims), f.rank
    if r % n or sum(dims) != f.up.shape[0]:
        return None
    k = r // n
    starts = np.cumsum([0, *dims])
    for j in range(n):
        rows = f.up[starts[j]:starts[j + 1]]
        if any(np.any(rows[:, i * k:(i + 1) * k]) for i in range(n) if i != j):
            return None
    return [
        Factored(f.up[starts[j]:starts[j + 1], j * k:(j + 1) * k], f.down[j * k:(j + 1) * k], f.scale,
                 (dims[j], *f.shape[1:]))
        for j in range(n)
    ]


def _swap_rows(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]], axis=0)


def swap_halves(d: Delta) -> Delta | None:
    """Exchange the two row halves of an update (BFL ``shift, scale`` -> diffusers ``scale, shift``)."""
    if isinstance(d, NeedsBase):
        return None
    p = d.matrix_shape[0]
    if p % 2:
        return None
    if isinstance(d, Factored):
        return Factored(_swap_rows(d.up), d.down, d.scale, d.shape)
    if isinstance(d, Dense):
        return Dense(_swap_rows(d.values), d.shape)
    if isinstance(d, Kronecker):
        if (p // 2) % side_shape(d.w2)[0]:
            # the halves cut through w2's row blocks: exact as a dense matrix, and
            # this is one module (6144 x 3072 in Flux.1), not one per block
            return Dense(_swap_rows(d.matrix()))
        w1 = d.w1
        swapped: Side = Factored(_swap_rows(w1.up), w1.down, w1.scale) if isinstance(w1, Factored) else _swap_rows(w1)
        return Kronecker(swapped, d.w2, d.scale)
    return None


# --------------------------------------------------------------------------- targets


@dataclass
class Notes:
    """What a read found worth saying."""

    fused_kept: list[str]
    warnings: list[str]
    unmapped: list[str]
    split: int = 0
    sparse: int = 0


def _dims(target: Target, shape: tuple[int, ...]) -> list[int] | None:
    p = int(shape[0])
    n = len(target.names)
    if target.split == "equal":
        return [p // n] * n if p % n == 0 else None
    h = int(shape[1]) if len(shape) > 1 else FLUX1_HIDDEN  # linear1: q, k, v are as wide as its input
    return [h, h, h, p - 3 * h] if p > 3 * h else None


def _cut_magnitude(mag: np.ndarray | None, rows: int, dims: list[int] | None, swap: bool, notes: Notes, where: str
                   ) -> list[np.ndarray | None]:
    """DoRA magnitudes follow the output rows when they are per row ([out, 1] or [out])."""
    n = len(dims) if dims else 1
    if mag is None:
        return [None] * n
    per_row = mag.shape[0] == rows and int(np.prod(mag.shape[1:], dtype=np.int64)) == 1
    if not per_row:
        if dims:  # a column norm of the fused weight is not the column norm of its parts
            notes.warnings.append(f"{where}: DoRA magnitude {tuple(mag.shape)} is per input column; copied unchanged")
        return [mag] * n
    if swap:
        return [_swap_rows(mag)]
    if not dims:
        return [mag]
    starts = np.cumsum([0, *dims])
    return [mag[starts[j]:starts[j + 1]] for j in range(n)]


def _replacement(dec: DecodedModule) -> Delta | None:
    w = dec.weight
    if isinstance(w, NeedsBase) and w.method == "replace" and not w.shape:
        values = next(iter(w.tensors.values()))
        w.shape = tuple(values.shape)
        w.note = "full replacement of a Flux RMSNorm scale (BFL control LoRA)"
    return w


def place(dec: DecodedModule, target: Target, where: str, notes: Notes) -> list[RawModule]:
    """RawModules for one decoded BFL module, renamed and cut per its target.

    Args:
        dec: the decoded module (weight, bias, magnitude).
        target: from ``bfl_names``.
        where: the module's name in the file (for notes).
        notes: collects fused/unswapped modules and warnings.
    """
    comp = "transformer"
    if target.replace or target.split == "none":
        w = _replacement(dec) if target.replace else dec.weight
        return emit(DecodedModule(w, dec.bias, dec.magnitude, dec.algorithm), comp, target.names[0], False)
    if target.split == "swap":
        return _place_swapped(dec, target, where, notes)
    ref = dec.weight if dec.weight is not None else dec.bias
    if ref is None or isinstance(ref, NeedsBase) or isinstance(dec.bias, NeedsBase):
        notes.fused_kept.append(f"{where} -> {target.fused} (needs the base weight)")
        return emit(dec, comp, target.fused or target.names[0], False)
    rows = int(ref.matrix_shape[0])
    dims = _dims(target, tuple(ref.matrix_shape))
    w_parts = split_rows(dec.weight, dims) if dec.weight is not None and dims else None
    b_parts = split_rows(dec.bias, dims) if dec.bias is not None and dims else None
    if dims is None or (dec.weight is not None and w_parts is None) or (dec.bias is not None and b_parts is None):
        notes.fused_kept.append(f"{where} -> {target.fused}")
        return emit(dec, comp, target.fused or target.names[0], False)
    if isinstance(dec.weight, Factored):
        sparse = block_sparse_parts(dec.weight, dims)
        if sparse is not None:
            w_parts = list(sparse)
            notes.sparse += 1
    mags = _cut_magnitude(dec.magnitude, rows, dims, False, notes, where)
    notes.split += 1
    out: list[RawModule] = []
    for j, name in enumerate(target.names):
        w = w_parts[j] if w_parts else None
        b = b_parts[j] if b_parts else None
        out.extend(emit(DecodedModule(w, b, mags[j], dec.algorithm), comp, name, False))
    return out


def _place_swapped(dec: DecodedModule, target: Target, where: str, notes: Notes) -> list[RawModule]:
    w = swap_halves(dec.weight) if dec.weight is not None else None
    b = swap_halves(dec.bias) if dec.bias is not None else None
    if (dec.weight is not None and w is None) or (dec.bias is not None and b is None):
        notes.warnings.append(f"{where}: shift/scale halves could not be exchanged; kept in BFL row order")
        return emit(dec, "transformer", target.names[0], False)
    rows = int((w if w is not None else b).matrix_shape[0])  # type: ignore[union-attr]
    mag = _cut_magnitude(dec.magnitude, rows, None, True, notes, where)[0]
    return emit(DecodedModule(w, b, mag, dec.algorithm), "transformer", target.names[0], False)


# --------------------------------------------------------------------------- shared reading


@dataclass
class Place:
    """Where a group of keys goes: a Flux target, or a plain (text-encoder/unknown) module."""

    target: Target | None
    component: str | None
    path: str
    flat: bool


Locator = Callable[[str], Place]


def _shape_verdict(p: int, q: int, tail: str) -> bool | None:
    """Whether a LoRA's (out, in) fits Flux.1 for the modules whose widths tell Flux.1 from Flux.2."""
    if tail.endswith("attn.qkv"):
        return None if q == FLUX1_HIDDEN else False  # Flux.2 klein 4B shares this width
    if tail.endswith("mlp.0"):
        return p == 4 * q  # Flux.2: SwiGLU, 6 * hidden
    if tail == "linear1":
        return p == 7 * q  # Flux.2: 3 + 6 hidden
    if tail == "linear2":
        return q == 5 * p  # Flux.2: 1 + 3 hidden
    return None


def _not_flux1(src: TensorSource, groups: dict[str, dict[str, str]], bfl_of: Callable[[str], str | None]) -> str | None:
    """Why these BFL-named modules are not Flux.1 (Flux.2 or another width), or None.

    LoRA factor shapes decide; metadata (``flux2`` in ``ss_base_model_version``,
    ``modelspec.architecture`` or ``ss_network_module``) only when no shape
    tells. LoKr shapes are not used: hand-written fixtures need not multiply
    out to the real layer.
    """
    confirmed = False
    for mod, roles in groups.items():
        bfl = bfl_of(mod) if "down" in roles and "up" in roles else None
        if bfl is None:
            continue
        q = int(np.prod(src.shape(roles["down"])[1:], dtype=np.int64))
        p = int(src.shape(roles["up"])[0])
        tail = bfl.split(".", 2)[-1] if bfl.startswith(("double_blocks.", "single_blocks.")) else bfl
        verdict = _shape_verdict(p, q, tail)
        if verdict is False:
            return f"{mod}: {p}x{q} is not a Flux.1 shape"
        confirmed = confirmed or bool(verdict)
    if confirmed:
        return None
    md = src.metadata
    for field in ("ss_base_model_version", "modelspec.architecture", "ss_network_module"):
        if "flux2" in re.sub(r"[^a-z0-9]", "", md.get(field, "").lower()):
            return f"{field}={md[field]!r}"
    return None


def _delegate(src: TensorSource, ctx: ReadContext, reason: str) -> ParsedLora | None:
    """Read with the next matching non-Flux reader (Flux.2 and other BFL-named models)."""
    keys, md = src.keys(), src.metadata
    for r in readers():
        if r.name in FORMATS or not r.matches(keys, md):
            continue
        parsed = r.read(src, ctx)
        note = f"BFL block names but not Flux.1 ({reason}); read as {r.name}"
        parsed.metadata.setdefault("warnings", []).append(note)
        return parsed
    return None


def read_groups(
    src: TensorSource, groups: dict[str, dict[str, str]], locate: Locator, rule: AlphaRule
) -> tuple[list[RawModule], dict[str, int], Notes]:
    """Decode every group and place it (Flux targets renamed and cut, the rest as given)."""
    notes = Notes([], [], [])
    mods: list[RawModule] = []
    algos: dict[str, int] = {}
    for mod, roles in groups.items():
        dec = decode_module(mod, src.get, roles, rule)
        if dec.weight is None and dec.bias is None:
            continue
        algos[dec.algorithm] = algos.get(dec.algorithm, 0) + 1
        where = locate(mod)
        if where.target is not None:
            mods.extend(place(dec, where.target, mod, notes))
            continue
        if where.component == "transformer":
            notes.unmapped.append(mod)
        mods.extend(emit(dec, where.component, where.path, where.flat))
    return mods, algos, notes


def finish(fmt: str, src: TensorSource, modules: list[RawModule], algos: dict[str, int], notes: Notes,
           ignored: list[str], alpha_source: str) -> ParsedLora:
    """The ParsedLora with the reader's findings in its metadata."""
    meta: dict[str, object] = {"algorithms": algos, "alpha_source": alpha_source, "bfl_variant": "flux1",
                               "fused_split": notes.split}
    if notes.sparse:
        meta["block_sparse_split"] = notes.sparse
    if notes.fused_kept:
        meta["fused_kept"] = notes.fused_kept
        notes.warnings.append(f"{len(notes.fused_kept)} fused modules kept whole (e.g. {notes.fused_kept[0]})")
    if notes.unmapped:
        meta["unmapped_modules"] = notes.unmapped[:20]
        notes.warnings.append(f"{len(notes.unmapped)} BFL modules have no diffusers name (e.g. {notes.unmapped[0]!r})")
    if ignored:
        meta["ignored_keys"] = ignored[:20]
        meta["ignored_count"] = len(ignored)
    if notes.warnings:
        meta["warnings"] = notes.warnings
    if src.metadata.get("ss_network_module"):
        meta["network_module"] = src.metadata["ss_network_module"]
    return ParsedLora(fmt, modules, FAMILY, meta)


def _not_hunyuan(keys: list[str], rx: re.Pattern[str]) -> bool:
    return not any(rx.search(k) for k in keys)


# --------------------------------------------------------------------------- readers


def _kohya_locate(mod: str) -> Place:
    comp, path, flat = kohya.locate(mod)
    if comp == "unet":
        bfl = unflatten(path)
        target = bfl_target(bfl) if bfl else None
        return Place(target, "transformer", path, True)
    return Place(None, comp, path, flat)


def _kohya_bfl(mod: str) -> str | None:
    return unflatten(mod[len("lora_unet_"):]) if mod.startswith("lora_unet_") else None


@register_format
class KohyaFluxReader:
    """sd-scripts ``networks.lora_flux`` files (and LyCORIS on the BFL model)."""

    name = "kohya-flux"
    priority = PRIORITY

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        if not any(k.startswith(_KOHYA_FLUX_STARTS) and _KOHYA_FLUX_RX.match(k) for k in keys):
            return False
        return _not_hunyuan([k for k in keys if k.startswith("lora_unet_")], _HUNYUAN_FLAT_RX)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        keys = [k for k in src.keys() if kohya._PREFIX_RX.match(k)]
        groups, rest = group_by_suffix(keys, KOHYA_SUFFIX_ROLES)
        reason = _not_flux1(src, groups, _kohya_bfl)
        if reason:
            return _delegate(src, ctx, reason) or _read_unmapped(src, groups, rest, reason)
        modules, algos, notes = read_groups(src, groups, _kohya_locate, AlphaRule(missing="rank"))
        ignored = sorted(set(src.keys()) - set(keys)) + rest
        alpha = "per-module .alpha tensors (missing: alpha = rank)"
        return finish(self.name, src, modules, algos, notes, ignored, alpha)


def _strip_bfl(mod: str) -> str | None:
    for prefix in _BFL_PREFIXES:
        if mod.startswith(prefix):
            return mod[len(prefix):]
    return mod if bfl_target(mod) is not None or _BFL_DOTTED_RX.match(mod) else None


def _bfl_locate(mod: str) -> Place:
    for prefix, comp in _COMFY_TE:
        if mod.startswith(prefix):
            return Place(None, comp, mod[len(prefix):], False)
    if kohya._PREFIX_RX.match(mod):
        comp, path, flat = kohya.locate(mod)
        return Place(None, comp, path, flat)
    bfl = _strip_bfl(mod)
    if bfl is None:
        return Place(None, "transformer", mod, False)
    return Place(bfl_target(bfl), "transformer", bfl, False)


@register_format
class BflFluxReader:
    """BFL names: ComfyUI / ai-toolkit ``diffusion_model.``, and the bare BFL control LoRAs."""

    name = "bfl-flux"
    priority = PRIORITY

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        bfl = [k for k in keys if "_blocks." in k and _BFL_DOTTED_RX.match(k) and not _XLABS_RX.match(k)]
        return bool(bfl) and _not_hunyuan(bfl, _HUNYUAN_DOTTED_RX)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        keys = src.keys()
        groups, rest = group_by_suffix(keys, BFL_SUFFIX_ROLES)
        reason = _not_flux1(src, groups, _strip_bfl)
        if reason:
            return _delegate(src, ctx, reason) or _read_unmapped(src, groups, rest, reason)
        modules, algos, notes = read_groups(src, groups, _bfl_locate, AlphaRule(missing="rank"))
        fmt = "bfl-control-flux" if _is_control(keys) else "bfl-flux"
        return finish(fmt, src, modules, algos, notes, rest, _BFL_ALPHA)


def _read_unmapped(src: TensorSource, groups: dict[str, dict[str, str]], rest: list[str], reason: str) -> ParsedLora:
    """BFL names of another model (Flux.2...) when no generic reader takes them: kept as named, not cut."""
    def locate(mod: str) -> Place:
        where = _bfl_locate(mod)
        return Place(None, where.component, where.path, where.flat)

    modules, algos, notes = read_groups(src, groups, locate, AlphaRule(missing="rank"))
    meta: dict[str, object] = {
        "algorithms": algos, "alpha_source": _BFL_ALPHA, "bfl_variant": "not-flux1",
        "warnings": [f"BFL block names but not Flux.1 ({reason}); module names kept as stored"],
    }
    if rest:
        meta["ignored_keys"], meta["ignored_count"] = rest[:20], len(rest)
    return ParsedLora("bfl", modules, None, meta)


def _is_control(keys: list[str]) -> bool:
    """BFL's own control LoRAs: unprefixed names with bias deltas or norm scales."""
    bare = [k for k in keys if not k.startswith(_BFL_PREFIXES)]
    return bool(bare) and any(k.endswith((".lora_B.bias", "_norm.scale")) for k in bare)


def _xlabs_locate(mod: str) -> Place:
    path = mod[len("diffusion_model."):] if mod.startswith("diffusion_model.") else mod
    target = xlabs_target(path)
    return Place(target, "transformer", path, False)


@register_format
class XLabsFluxReader:
    """XLabs (x-flux) attention-processor LoRAs."""

    name = "xlabs-flux"
    priority = PRIORITY

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return any("_blocks." in k and _XLABS_RX.match(k) for k in keys)

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        keys = src.keys()
        groups, rest = group_by_suffix(keys, XLABS_SUFFIX_ROLES)
        modules, algos, notes = read_groups(src, groups, _xlabs_locate, AlphaRule(missing="one"))
        return finish(self.name, src, modules, algos, notes, rest, "none stored (scale 1)")
