"""cloneofsimo ``lora`` / ``lora_pti`` files: ``unet:N:down``, ``text_encoder:N:up``, ``<s1>`` tokens.

The file numbers the injected Linear layers instead of naming them: N is the
position in cloneofsimo's ``_find_modules`` walk — for every module whose
class is a target (``metadata["unet"]``, default CrossAttention/Attention/GEGLU;
text encoder CLIPAttention), in ``model.modules()`` order, its ``nn.Linear``
children in ``named_modules()`` order. That order depends on the diffusers
version the file was trained with (old ``BasicTransformerBlock`` registered
``attn1, ff, attn2``; newer ones ``attn1, attn2, ff``; the UNet registers
``down_blocks, up_blocks`` before ``mid_block``), so every plausible order of
the SD1.x/SD2.x structure is laid out and the one whose layer shapes fit every
N is used; a file that fits none (or two different ones) is refused.

Scale is 1 (cloneofsimo applies ``up(down(x)) * scale`` with a runtime scale of 1).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import product
from typing import Any

from lorasearch.delta import Factored
from lorasearch.errors import BadInput, UnsupportedLayout
from lorasearch.formats.base import ParsedLora, RawModule, ReadContext, TensorSource, register_format

_KEY_RX = re.compile(r"^(?P<net>[A-Za-z_0-9]+):(?P<idx>\d+):(?P<half>up|down)$")
UNET_ATTENTION = frozenset({"CrossAttention", "Attention"})
UNET_CLASSES = UNET_ATTENTION | {"GEGLU"}
TE_CLASSES = frozenset({"CLIPAttention", "CLIPMLP"})
DEFAULT_TARGETS = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
SD_CHANNELS = (320, 640, 1280, 1280)
CONTEXT_DIMS = {768: "sd15", 1024: "sd2"}


@dataclass(frozen=True)
class Slot:
    """One injected Linear: its path and weight shape (out, in)."""

    path: str
    out_features: int
    in_features: int


def _transformer_slots(prefix: str, d: int, ctx: int, attn: bool, geglu: bool, ff_after_attn1: bool) -> list[Slot]:
    a1 = [Slot(f"{prefix}.attn1.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")]
    a2 = [Slot(f"{prefix}.attn2.to_q", d, d), Slot(f"{prefix}.attn2.to_k", d, ctx),
          Slot(f"{prefix}.attn2.to_v", d, ctx), Slot(f"{prefix}.attn2.to_out.0", d, d)]
    ff = [Slot(f"{prefix}.ff.net.0.proj", 8 * d, d)] if geglu else []
    if not attn:
        a1, a2 = [], []
    return a1 + ff + a2 if ff_after_attn1 else a1 + a2 + ff


def unet_slots(ctx: int, attn: bool, geglu: bool, ff_after_attn1: bool, mid_last: bool) -> list[Slot]:
    """The SD1.x/SD2.x UNet Linear layers in one candidate injection order.

    Args:
        ctx: cross-attention (text) width, 768 for SD1.x, 1024 for SD2.x.
        attn: attention modules are targets.
        geglu: GEGLU modules are targets.
        ff_after_attn1: the transformer block registers ``ff`` between ``attn1`` and ``attn2``.
        mid_last: the UNet registers ``mid_block`` after ``up_blocks``.
    """
    def block(name: str, d: int, n: int) -> list[Slot]:
        out: list[Slot] = []
        for j in range(n):
            out += _transformer_slots(f"{name}.attentions.{j}.transformer_blocks.0", d, ctx, attn, geglu, ff_after_attn1)
        return out

    down = [s for i in range(3) for s in block(f"down_blocks.{i}", SD_CHANNELS[i], 2)]
    up = [s for i in range(1, 4) for s in block(f"up_blocks.{i}", SD_CHANNELS[3 - i], 3)]
    mid = block("mid_block", SD_CHANNELS[-1], 1)
    return down + up + mid if mid_last else down + mid + up


def text_encoder_slots(hidden: int, intermediate: int, layers: int, attn: bool, mlp: bool) -> list[Slot]:
    """CLIP text-encoder Linear layers in injection order (CLIPAttention defines k, v, q, out)."""
    out: list[Slot] = []
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        if attn:
            out += [Slot(f"{p}.self_attn.{n}", hidden, hidden) for n in ("k_proj", "v_proj", "q_proj", "out_proj")]
        if mlp:
            out += [Slot(f"{p}.mlp.fc1", intermediate, hidden), Slot(f"{p}.mlp.fc2", hidden, intermediate)]
    return out


def _targets(metadata: dict[str, str], net: str) -> list[str]:
    raw = metadata.get(net)
    if not raw:
        return DEFAULT_TARGETS.get(net, [])
    try:
        v = json.loads(raw)
    except json.JSONDecodeError:
        raise BadInput(f"cloneofsimo metadata {net!r} is not a JSON list of classes: {raw[:60]!r}", code="bad_metadata") from None
    if not isinstance(v, list):
        raise BadInput(f"cloneofsimo metadata {net!r} is not a JSON list of classes: {raw[:60]!r}", code="bad_metadata")
    return [str(c) for c in v]


def _fits(slots: list[Slot], shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]) -> str | None:
    """None when every index's (down, up) shapes fit its slot, else the first misfit."""
    if len(slots) != len(shapes):
        return f"{len(shapes)} layers in the file, {len(slots)} in this layout"
    for i, s in enumerate(slots):
        down, up = shapes[i]
        if len(down) != 2 or len(up) != 2 or down[1] != s.in_features or up[0] != s.out_features or up[1] != down[0]:
            return f"index {i}: down {down} / up {up} do not fit {s.path} ({s.out_features}x{s.in_features})"
    return None


def _choose(net: str, candidates: dict[Any, list[Slot]], shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[Any, list[Slot]]:
    """The candidate order that fits; refuse none or several different ones."""
    fitting = {k: v for k, v in candidates.items() if _fits(v, shapes) is None}
    distinct = {tuple(s.path for s in v) for v in fitting.values()}
    if not fitting:
        first = next(iter(candidates.values()), [])
        why = _fits(first, shapes) if first else "no candidate layout"
        raise UnsupportedLayout(
            f"unsupported LoRA layout: cloneofsimo {net!r} factors fit no SD1.x/SD2.x injection order ({why}; "
            f"e.g. '{net}:0:down')"
        )
    if len(distinct) > 1:
        raise UnsupportedLayout(
            f"unsupported LoRA layout: cloneofsimo {net!r} factors fit {len(distinct)} different module orders; "
            f"refusing to guess (e.g. '{net}:0:down')"
        )
    key = next(iter(fitting))
    return key, fitting[key]


def _unet_assignment(targets: list[str], shapes: dict[int, Any]) -> tuple[list[Slot], str, str]:
    unknown = sorted(set(targets) - UNET_CLASSES)
    if unknown:
        raise UnsupportedLayout(
            f"unsupported LoRA layout: cloneofsimo UNet targets {unknown} (only {sorted(UNET_CLASSES)} are laid out); "
            "e.g. 'unet:0:down'"
        )
    attn, geglu = bool(UNET_ATTENTION & set(targets)), "GEGLU" in targets
    cands = {
        (ctx, ff1, mid_last): unet_slots(ctx, attn, geglu, ff1, mid_last)
        for ctx, ff1, mid_last in product(CONTEXT_DIMS, (True, False), (True, False))
    }
    (ctx, ff1, mid_last), slots = _choose("unet", cands, shapes)
    order = ("attn1, ff, attn2" if ff1 else "attn1, attn2, ff") + ("; down, up, mid" if mid_last else "; down, mid, up")
    return slots, CONTEXT_DIMS[ctx], order


def _te_assignment(targets: list[str], shapes: dict[int, Any]) -> list[Slot]:
    unknown = sorted(set(targets) - TE_CLASSES)
    if unknown:
        raise UnsupportedLayout(
            f"unsupported LoRA layout: cloneofsimo text-encoder targets {unknown} (only {sorted(TE_CLASSES)} are laid out); "
            "e.g. 'text_encoder:0:down'"
        )
    attn, mlp = "CLIPAttention" in targets, "CLIPMLP" in targets
    per_layer = 4 * attn + 2 * mlp
    hidden = shapes[0][0][1] if shapes else 0
    if per_layer == 0 or len(shapes) % per_layer:
        raise UnsupportedLayout(
            f"unsupported LoRA layout: cloneofsimo text encoder has {len(shapes)} layers, not a multiple of "
            f"{per_layer} per CLIP layer (e.g. 'text_encoder:0:down')"
        )
    intermediate = shapes[4][1][0] if mlp and attn and len(shapes) > 4 else (shapes[0][1][0] if mlp else 4 * hidden)
    cands = {0: text_encoder_slots(hidden, intermediate, len(shapes) // per_layer, attn, mlp)}
    return _choose("text_encoder", cands, shapes)[1]


@register_format
class CloneofsimoReader:
    """cloneofsimo ``lora`` safetensors (``save_safeloras`` / ``save_safeloras_with_embeds``)."""

    name = "cloneofsimo"
    priority = 55

    def matches(self, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(":" in k and _KEY_RX.match(k) for k in keys)  # ':' first: no regex call for other files

    def read(self, src: TensorSource, ctx: ReadContext) -> ParsedLora:
        nets: dict[str, dict[int, dict[str, str]]] = {}
        tokens: list[str] = []
        ignored: list[str] = []
        for k in src.keys():
            m = _KEY_RX.match(k)
            if m:
                nets.setdefault(m.group("net"), {}).setdefault(int(m.group("idx")), {})[m.group("half")] = k
            elif src.metadata.get(k) == "<embed>" or re.fullmatch(r"<[^<>]+>", k):
                tokens.append(k)
            else:
                ignored.append(k)
        modules: list[RawModule] = []
        meta: dict[str, Any] = {"alpha_source": "none: scale 1 (cloneofsimo applies up @ down at runtime scale 1)"}
        hint = None
        for net, entries in sorted(nets.items()):
            if net not in DEFAULT_TARGETS:
                raise UnsupportedLayout(f"unsupported LoRA layout: cloneofsimo network {net!r} is not unet/text_encoder (e.g. '{net}:0:down')")
            missing = [i for i in range(max(entries) + 1) if set(entries.get(i, {})) != {"up", "down"}]
            if missing:
                raise BadInput(f"cloneofsimo {net!r}: index {missing[0]} lacks its up or down factor", code="bad_factors")
            shapes = {i: (tuple(src.shape(e["down"])), tuple(src.shape(e["up"]))) for i, e in entries.items()}
            targets = _targets(src.metadata, net)
            if net == "unet":
                slots, hint, order = _unet_assignment(targets, shapes)
                meta["unet_order"] = order
            else:
                slots = _te_assignment(targets, shapes)
            meta[f"{net}_targets"] = targets
            modules += self._decode(src, net, entries, slots, meta)
        meta["token_embeddings"] = tokens
        if ignored:
            meta["ignored_keys"] = ignored[:20]
            meta["ignored_count"] = len(ignored)
        meta["algorithms"] = {"lora": len(modules)}
        return ParsedLora("cloneofsimo", modules, hint, meta)

    @staticmethod
    def _decode(src: TensorSource, net: str, entries: dict[int, dict[str, str]], slots: list[Slot], meta: dict[str, Any]) -> list[RawModule]:
        out: list[RawModule] = []
        rank_mismatch = 0
        for i, s in enumerate(slots):
            down, up = src.get(entries[i]["down"]), src.get(entries[i]["up"])
            stored = src.metadata.get(f"{net}:{i}:rank")
            if stored is not None and stored.isdigit() and int(stored) != down.shape[0]:
                rank_mismatch += 1
            out.append(RawModule(net, s.path, False, Factored(up, down, 1.0, (s.out_features, s.in_features))))
        if rank_mismatch:
            meta.setdefault("warnings", []).append(f"{net}: {rank_mismatch} ranks in the metadata differ from the tensors")
        return out
