"""Write lorasearch/data/families/*.json.gz (module tables of the supported base models): python scripts/gen_family_tables.py"""
# Every model is built on the meta device from a hand-written copy of its
# published config (nothing is downloaded), and its ``named_modules()`` are listed
# with their weight shapes. Besides the canonical (diffusers / transformers)
# module paths, each table lists *aliases*: the module names of the original
# implementation that LoRA trainers also write (kohya / LyCORIS on the ldm-style
# SDXL UNet, BFL Flux and Flux.2 names, XLabs, Wan, Krea 2, LTX-2 and SD3
# originals). An alias maps onto one canonical module (a rename) or onto several
# (a fused projection such as Flux's ``img_attn.qkv``, split by output rows).
# Where diffusers ships a converter for those names, the aliases are checked
# against it before anything is written.
#
# Output (one gzip JSON per family, deterministic bytes)::
#
#     {"family": name,
#      "sources": {component: "diffusers.X(...) / transformers.Y(...)"},
#      "components": {file component tag: canonical component},
#      "modules": [[canonical_name, [weight shape...], kind], ...],
#      "aliases": [[native_name, [native shape...], kind, [[canonical_name, row_start, row_stop], ...]], ...],
#      "fused": [[fused_name, [shape...], "fused", [[canonical_name, row_start, row_stop], ...]], ...]}
#
# ``kind`` is one of linear / conv / norm / embedding. An alias with an empty
# piece list has no diffusers counterpart (e.g. ``final_layer.adaLN_modulation.1``,
# whose halves diffusers swaps) and is its own canonical name.
#
# ``fused`` entries are canonical names for several modules stacked by output
# rows, used when an update cannot be cut into them exactly (a LoKr whose row
# blocks straddle the cuts, an OFT that needs the base weight). Flux only:
# diffusers' own fused projections (``attn.to_qkv``, ``attn.to_added_qkv``,
# ``FluxAttention.fuse_projections``, checked against it) and
# ``attn.to_qkv_mlp_proj`` for a single block's ``linear1`` (the Flux.2 name).
# They are not modules of the model: ``modules`` never lists them.
from __future__ import annotations

import gzip
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "lorasearch" / "data" / "families"

Module = list[Any]  # [name, shape, kind]
Alias = tuple[str, list[str] | None, tuple[int, ...] | None]  # native, canonical pieces, explicit shape
Fused = tuple[str, list[str]]  # fused canonical name, canonical pieces in row order

# ---------------------------------------------------------------------------
# Module listing
# ---------------------------------------------------------------------------


def module_kind(m: nn.Module) -> str | None:
    """linear / conv / norm / embedding, or None for modules without their own weight."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Embedding):
        return "embedding"
    w = m._parameters.get("weight")
    if w is not None and w.ndim == 1 and "norm" in type(m).__name__.lower():
        return "norm"
    return None


def list_modules(prefix: str, model: nn.Module) -> list[Module]:
    """``[[prefix + path, shape, kind], ...]`` in ``named_modules()`` order."""
    out: list[Module] = []
    for name, m in model.named_modules():
        kind = module_kind(m)
        if kind is None or not name:
            continue
        out.append([f"{prefix}.{name}", [int(s) for s in m.weight.shape], kind])
    return out


def describe(obj: nn.Module, kwargs: dict[str, Any]) -> str:
    cls = type(obj)
    lib = cls.__module__.split(".")[0]
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{lib}.{cls.__name__}({args})"


# ---------------------------------------------------------------------------
# Component builders (published configs, copied by hand)
# ---------------------------------------------------------------------------


def build(cls: type, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(**kwargs)
    return model, describe(model, kwargs)


def build_hf(model_cls: type, config_cls: type, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    config = config_cls(**kwargs)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config)
    return model, f"transformers.{model_cls.__name__}({config_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}))"


CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


class _TextModelWrapper(nn.Module):
    """transformers 5 dropped CLIPTextModel's ``text_model`` wrapper; files (and transformers 4) keep it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.text_model = inner


def clip_text(cfg: dict[str, Any], projection: bool = False) -> tuple[nn.Module, str]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model, desc = build_hf(CLIPTextModelWithProjection if projection else CLIPTextModel, CLIPTextConfig, cfg)
    if not hasattr(model, "text_model"):
        model, desc = _TextModelWrapper(model), desc + " under text_model. (transformers 4 layout, as LoRA files name it)"
    return model, desc


def t5_encoder() -> tuple[nn.Module, str]:
    from transformers import T5Config, T5EncoderModel

    return build_hf(T5EncoderModel, T5Config, T5_XXL)


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# FLUX.2 [klein]: block counts and widths checked against real LoRA files
# (li_flux2_klein4b_kohya: 5 double / 20 single blocks, width 3072, fused SwiGLU
# 18432; li_flux2_klein9b_aitoolkit: 8 / 24, width 4096). The text width is
# three stacked Qwen3 hidden states (Qwen3-4B: 3 x 2560; Qwen3-8B: 3 x 4096);
# klein is guidance-distilled, so it has no guidance embedder.
FLUX2_KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, guidance_embeds=False)
FLUX2_KLEIN_9B = dict(FLUX2_KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                      joint_attention_dim=12288)
# Wan 2.1 I2V-14B (a superset of T2V-14B and of Wan 2.2 A14B: adds the image
# cross-attention projections and image embedder) and Wan 2.2 TI2V-5B.
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120)
WAN_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
              text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# LTX-2.3 (gated attention + prompt-modulated cross attention); LTX-2.0 files
# name a subset of the same modules with the same shapes.
LTX2 = dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128,
            cross_attention_dim=4096, gated_attn=True, cross_attn_mod=True, audio_in_channels=128,
            audio_out_channels=128, audio_num_attention_heads=32, audio_attention_head_dim=64,
            audio_cross_attention_dim=2048, audio_gated_attn=True, audio_cross_attn_mod=True, num_layers=48,
            use_prompt_embeddings=False)
KREA2 = dict(in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48, num_key_value_heads=12,
             intermediate_size=16384, timestep_embed_dim=256, text_hidden_dim=2560, num_text_layers=12,
             text_num_attention_heads=20, text_num_key_value_heads=20, text_intermediate_size=6912,
             num_layerwise_text_blocks=2, num_refiner_text_blocks=2)


def unet(cfg: dict[str, Any]) -> tuple[nn.Module, str]:
    from diffusers import UNet2DConditionModel

    return build(UNet2DConditionModel, cfg)


def dit(cls_name: str, cfg: dict[str, Any]) -> tuple[nn.Module, str]:
    import diffusers

    return build(getattr(diffusers, cls_name), cfg)


# ---------------------------------------------------------------------------
# Alias rules: original-implementation names -> canonical pieces
# ---------------------------------------------------------------------------


def unet_ldm_aliases(cfg: dict[str, Any], names: list[str]) -> list[Alias]:
    """ldm / sgm UNet names (``input_blocks.4.1...``) for a diffusers UNet's module paths."""
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    has_attn_up = ["CrossAttn" in t for t in cfg["up_block_types"]]
    out: list[Alias] = []
    for name in names:
        p = name
        if p in top:
            out.append((top[p], [name], None))
            continue
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", p)
        if m:
            i, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (lpb + 1) + j
            native = f"input_blocks.{idx}.0.{resnet[rest]}" if what == "resnets" else f"input_blocks.{idx}.1.{rest}"
            out.append((native, [name], None))
            continue
        m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", p)
        if m:
            out.append((f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op", [name], None))
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", p)
        if m:
            what, j, rest = m[1], int(m[2]), m[3]
            native = f"middle_block.{2 * j}.{resnet[rest]}" if what == "resnets" else f"middle_block.1.{rest}"
            out.append((native, [name], None))
            continue
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", p)
        if m:
            i, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (lpb + 1) + j
            native = f"output_blocks.{idx}.0.{resnet[rest]}" if what == "resnets" else f"output_blocks.{idx}.1.{rest}"
            out.append((native, [name], None))
            continue
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", p)
        if m:
            i = int(m[1])
            out.append((f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn_up[i] else 1}.conv", [name], None))
            continue
        raise ValueError(f"no ldm name for UNet module {name!r}")
    assert n == len(cfg["up_block_types"])
    return out


def flux_bfl_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """BFL reference names (kohya / ai-toolkit / ComfyUI / control LoRA) and XLabs names for FLUX.1."""
    out: list[Alias] = []
    for i in range(cfg["num_layers"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        img_qkv = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"]
        txt_qkv = [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"]
        out += [
            (f"{d}.img_attn.qkv", img_qkv, None), (f"{d}.txt_attn.qkv", txt_qkv, None),
            (f"{d}.img_attn.proj", [f"{b}.attn.to_out.0"], None), (f"{d}.txt_attn.proj", [f"{b}.attn.to_add_out"], None),
            (f"{d}.img_mlp.0", [f"{b}.ff.net.0.proj"], None), (f"{d}.img_mlp.2", [f"{b}.ff.net.2"], None),
            (f"{d}.txt_mlp.0", [f"{b}.ff_context.net.0.proj"], None), (f"{d}.txt_mlp.2", [f"{b}.ff_context.net.2"], None),
            (f"{d}.img_mod.lin", [f"{b}.norm1.linear"], None), (f"{d}.txt_mod.lin", [f"{b}.norm1_context.linear"], None),
            (f"{d}.img_attn.norm.query_norm", [f"{b}.attn.norm_q"], None),
            (f"{d}.img_attn.norm.key_norm", [f"{b}.attn.norm_k"], None),
            (f"{d}.txt_attn.norm.query_norm", [f"{b}.attn.norm_added_q"], None),
            (f"{d}.txt_attn.norm.key_norm", [f"{b}.attn.norm_added_k"], None),
            # XLabs
            (f"{d}.processor.qkv_lora1", img_qkv, None), (f"{d}.processor.qkv_lora2", txt_qkv, None),
            (f"{d}.processor.proj_lora1", [f"{b}.attn.to_out.0"], None),
            (f"{d}.processor.proj_lora2", [f"{b}.attn.to_add_out"], None),
        ]
    for i in range(cfg["num_single_layers"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"]
        out += [
            (f"{s}.linear1", qkv + [f"{b}.proj_mlp"], None), (f"{s}.linear2", [f"{b}.proj_out"], None),
            (f"{s}.modulation.lin", [f"{b}.norm.linear"], None),
            (f"{s}.norm.query_norm", [f"{b}.attn.norm_q"], None), (f"{s}.norm.key_norm", [f"{b}.attn.norm_k"], None),
            # XLabs (x-flux SingleStreamBlockLoraProcessor): qkv_lora is dim -> 3*dim onto the
            # q, k, v rows of linear1; proj_lora is 15360 -> dim, i.e. linear2 (diffusers: proj_out).
            (f"{s}.processor.qkv_lora", qkv, None), (f"{s}.processor.proj_lora", [f"{b}.proj_out"], None),
        ]
    out += [
        ("img_in", ["x_embedder"], None), ("txt_in", ["context_embedder"], None),
        ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], None),
        ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], None),
        ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], None),
        ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], None),
        ("final_layer.linear", ["proj_out"], None),
        # diffusers swaps the shift/scale halves of this one: not a plain rename.
        ("final_layer.adaLN_modulation.1", None, tuple(table["norm_out.linear"])),
    ]
    if cfg.get("guidance_embeds"):
        out += [("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], None),
                ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], None)]
    return out


def flux_fused(cfg: dict[str, Any]) -> list[Fused]:
    """Fused FLUX.1 projections: diffusers' ``fuse_projections`` names, and ``linear1`` as ``attn.to_qkv_mlp_proj``."""
    out: list[Fused] = []
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}"
        out += [(f"{b}.attn.to_qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"]),
                (f"{b}.attn.to_added_qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])]
    for i in range(cfg["num_single_layers"]):
        b = f"single_transformer_blocks.{i}"
        qkv = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"]
        out += [(f"{b}.attn.to_qkv", qkv), (f"{b}.attn.to_qkv_mlp_proj", qkv + [f"{b}.proj_mlp"])]
    return out


def flux2_bfl_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """BFL FLUX.2 reference names (kohya / ai-toolkit) -> diffusers Flux2Transformer2DModel."""
    out: list[Alias] = []
    for i in range(cfg["num_layers"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        out += [
            (f"{d}.img_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], None),
            (f"{d}.txt_attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], None),
            (f"{d}.img_attn.proj", [f"{b}.attn.to_out.0"], None), (f"{d}.txt_attn.proj", [f"{b}.attn.to_add_out"], None),
            (f"{d}.img_mlp.0", [f"{b}.ff.linear_in"], None), (f"{d}.img_mlp.2", [f"{b}.ff.linear_out"], None),
            (f"{d}.txt_mlp.0", [f"{b}.ff_context.linear_in"], None), (f"{d}.txt_mlp.2", [f"{b}.ff_context.linear_out"], None),
            (f"{d}.img_attn.norm.query_norm", [f"{b}.attn.norm_q"], None),
            (f"{d}.img_attn.norm.key_norm", [f"{b}.attn.norm_k"], None),
            (f"{d}.txt_attn.norm.query_norm", [f"{b}.attn.norm_added_q"], None),
            (f"{d}.txt_attn.norm.key_norm", [f"{b}.attn.norm_added_k"], None),
        ]
    for i in range(cfg["num_single_layers"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        out += [
            (f"{s}.linear1", [f"{b}.attn.to_qkv_mlp_proj"], None), (f"{s}.linear2", [f"{b}.attn.to_out"], None),
            (f"{s}.norm.query_norm", [f"{b}.attn.norm_q"], None), (f"{s}.norm.key_norm", [f"{b}.attn.norm_k"], None),
        ]
    out += [
        ("img_in", ["x_embedder"], None), ("txt_in", ["context_embedder"], None),
        ("time_in.in_layer", ["time_guidance_embed.timestep_embedder.linear_1"], None),
        ("time_in.out_layer", ["time_guidance_embed.timestep_embedder.linear_2"], None),
        ("final_layer.linear", ["proj_out"], None),
        ("final_layer.adaLN_modulation.1", None, tuple(table["norm_out.linear"])),
        ("single_stream_modulation.lin", ["single_stream_modulation.linear"], None),
        ("double_stream_modulation_img.lin", ["double_stream_modulation_img.linear"], None),
        ("double_stream_modulation_txt.lin", ["double_stream_modulation_txt.linear"], None),
    ]
    if cfg.get("guidance_embeds"):
        out += [("guidance_in.in_layer", ["time_guidance_embed.guidance_embedder.linear_1"], None),
                ("guidance_in.out_layer", ["time_guidance_embed.guidance_embedder.linear_2"], None)]
    return out


def wan_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """Wan reference names (kohya / musubi / ai-toolkit / ComfyUI) -> diffusers WanTransformer3DModel."""
    out: list[Alias] = []
    for i in range(cfg["num_layers"]):
        o, b = f"blocks.{i}", f"blocks.{i}"
        for orig, attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for x, y in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                         ("norm_k", "norm_k")):
                out.append((f"{o}.{orig}.{x}", [f"{b}.{attn}.{y}"], None))
        out += [(f"{o}.ffn.0", [f"{b}.ffn.net.0.proj"], None), (f"{o}.ffn.2", [f"{b}.ffn.net.2"], None),
                (f"{o}.norm3", [f"{b}.norm2"], None)]
        if cfg.get("added_kv_proj_dim"):
            out += [(f"{o}.cross_attn.k_img", [f"{b}.attn2.add_k_proj"], None),
                    (f"{o}.cross_attn.v_img", [f"{b}.attn2.add_v_proj"], None),
                    (f"{o}.cross_attn.norm_k_img", [f"{b}.attn2.norm_added_k"], None)]
    out += [
        ("time_projection.1", ["condition_embedder.time_proj"], None), ("head.head", ["proj_out"], None),
        ("text_embedding.0", ["condition_embedder.text_embedder.linear_1"], None),
        ("text_embedding.2", ["condition_embedder.text_embedder.linear_2"], None),
        ("time_embedding.0", ["condition_embedder.time_embedder.linear_1"], None),
        ("time_embedding.2", ["condition_embedder.time_embedder.linear_2"], None),
    ]
    if cfg.get("image_dim"):
        out += [("img_emb.proj.0", ["condition_embedder.image_embedder.norm1"], None),
                ("img_emb.proj.1", ["condition_embedder.image_embedder.ff.net.0.proj"], None),
                ("img_emb.proj.3", ["condition_embedder.image_embedder.ff.net.2"], None),
                ("img_emb.proj.4", ["condition_embedder.image_embedder.norm2"], None)]
    return [a for a in out if a[1] is None or a[1][0] in table]


def krea2_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """krea-ai/krea-2 reference names (kohya / ai-toolkit) -> diffusers Krea2Transformer2DModel."""
    attn = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out.0", "gate": "to_gate", "qknorm.qnorm": "norm_q",
            "qknorm.knorm": "norm_k"}
    ff = {"gate": "ff.gate", "up": "ff.up", "down": "ff.down"}
    out: list[Alias] = []

    def block(orig: str, new: str) -> None:
        for a, b in attn.items():
            out.append((f"{orig}.attn.{a}", [f"{new}.attn.{b}"], None))
        for a, b in ff.items():
            out.append((f"{orig}.mlp.{a}", [f"{new}.{b}"], None))
        out.extend([(f"{orig}.prenorm", [f"{new}.norm1"], None), (f"{orig}.postnorm", [f"{new}.norm2"], None)])

    for i in range(cfg["num_layers"]):
        block(f"blocks.{i}", f"transformer_blocks.{i}")
    for kind, count in (("layerwise_blocks", cfg["num_layerwise_text_blocks"]),
                        ("refiner_blocks", cfg["num_refiner_text_blocks"])):
        for i in range(count):
            block(f"txtfusion.{kind}.{i}", f"text_fusion.{kind}.{i}")
    out += [("first", ["img_in"], None), ("last.linear", ["final_layer.linear"], None),
            ("tmlp.0", ["time_embed.linear_1"], None), ("tmlp.2", ["time_embed.linear_2"], None),
            ("tproj.1", ["time_mod_proj"], None), ("txtmlp.1", ["txt_in.linear_1"], None),
            ("txtmlp.3", ["txt_in.linear_2"], None), ("txtfusion.projector", ["text_fusion.projector"], None),
            ("txtmlp.0", ["txt_in.norm"], None), ("last.norm", ["final_layer.norm"], None)]
    return [a for a in out if a[1] is None or a[1][0] in table]


LTX2_RENAMES = {  # diffusers name fragment -> LTX-2 reference fragment (inverse of diffusers' LoRA converter)
    "proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single", "prompt_adaln": "prompt_adaln_single",
    "time_embed": "adaln_single", "audio_time_embed": "audio_adaln_single",
}


def ltx2_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """LTX-2 reference names that differ from diffusers' (top-level embedders, q/k norms)."""
    out: list[Alias] = []
    for name in table:
        head, _, rest = name.partition(".")
        orig_head = LTX2_RENAMES.get(head, head)
        orig = f"{orig_head}.{rest}" if rest else orig_head
        orig = re.sub(r"\.norm_q$", ".q_norm", orig)
        orig = re.sub(r"\.norm_k$", ".k_norm", orig)
        if orig != name:
            out.append((orig, [name], None))
    return out


def sd3_aliases(cfg: dict[str, Any], table: dict[str, list[int]]) -> list[Alias]:
    """SD3 MMDiT reference names (sd-scripts ``lora_unet_joint_blocks_...``) -> diffusers SD3Transformer2DModel."""
    out: list[Alias] = []
    n = cfg["num_layers"]
    for i in range(n):
        j, b = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        out += [
            (f"{j}.x_block.attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], None),
            (f"{j}.x_block.attn.proj", [f"{b}.attn.to_out.0"], None),
            (f"{j}.x_block.mlp.fc1", [f"{b}.ff.net.0.proj"], None), (f"{j}.x_block.mlp.fc2", [f"{b}.ff.net.2"], None),
            (f"{j}.x_block.adaLN_modulation.1", [f"{b}.norm1.linear"], None),
            (f"{j}.context_block.attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], None),
        ]
        if i < n - 1:
            out += [
                (f"{j}.context_block.attn.proj", [f"{b}.attn.to_add_out"], None),
                (f"{j}.context_block.mlp.fc1", [f"{b}.ff_context.net.0.proj"], None),
                (f"{j}.context_block.mlp.fc2", [f"{b}.ff_context.net.2"], None),
                (f"{j}.context_block.adaLN_modulation.1", [f"{b}.norm1_context.linear"], None),
            ]
        else:  # the last context block only modulates (diffusers swaps its shift/scale halves)
            out.append((f"{j}.context_block.adaLN_modulation.1", None, tuple(table[f"{b}.norm1_context.linear"])))
    out += [
        ("x_embedder.proj", ["pos_embed.proj"], None), ("context_embedder", ["context_embedder"], None),
        ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], None),
        ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], None),
        ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], None),
        ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], None),
        ("final_layer.linear", ["proj_out"], None),
        ("final_layer.adaLN_modulation.1", None, tuple(table["norm_out.linear"])),
    ]
    return [a for a in out if a[0] != (a[1] or [""])[0]]


# ---------------------------------------------------------------------------
# Checks against diffusers' own converters
# ---------------------------------------------------------------------------


def _lora_sd(aliases: list[list[Any]], prefix: str, down: str, up: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for native, shape, kind, pieces in aliases:
        if kind != "linear" or not keep(native):
            continue
        sd[f"{prefix}{native}.{down}"] = torch.zeros(1, math.prod(shape[1:]))
        sd[f"{prefix}{native}.{up}"] = torch.zeros(shape[0], 1)
    return sd


def _expected(aliases: list[list[Any]], keep: Callable[[str], bool]) -> dict[str, int]:
    exp: dict[str, int] = {}
    for native, shape, kind, pieces in aliases:
        if kind == "linear" and keep(native) and pieces:
            for canon, a, b in pieces:
                exp[canon] = b - a
    return exp


def _converted(sd: dict[str, torch.Tensor], up_suffix: str = ".lora_B.weight") -> dict[str, int]:
    return {k[: -len(up_suffix)]: int(v.shape[0]) for k, v in sd.items() if k.endswith(up_suffix)}


def _compare(family: str, got: dict[str, int], exp: dict[str, int]) -> None:
    if got != exp:
        missing = sorted(set(exp) - set(got))[:5]
        extra = sorted(set(got) - set(exp))[:5]
        wrong = sorted(k for k in set(got) & set(exp) if got[k] != exp[k])[:5]
        raise SystemExit(f"{family}: aliases disagree with diffusers' converter: missing {missing} extra {extra} rows {wrong}")


def check_flux(family: str, aliases: list[list[Any]]) -> int:
    from diffusers.loaders import lora_conversion_utils as lcu

    keep = lambda n: "processor" not in n and "adaLN" not in n  # noqa: E731
    sd = {}
    for native, shape, kind, pieces in aliases:
        if kind == "linear" and keep(native):
            flat = "lora_unet_" + native.replace(".", "_")
            sd[f"{flat}.lora_down.weight"] = torch.zeros(3, math.prod(shape[1:]))
            sd[f"{flat}.lora_up.weight"] = torch.ones(shape[0], 3)
            sd[f"{flat}.alpha"] = torch.tensor(3.0)
    # diffusers leaves the top-level modules without the "transformer." prefix here
    got = {k.removeprefix("transformer."): v for k, v in _converted(lcu._convert_kohya_flux_lora_to_diffusers(sd)).items()}
    _compare(family, got, _expected(aliases, keep))
    keep_x = lambda n: "processor" in n  # noqa: E731
    sd = {}
    for native, shape, kind, pieces in aliases:
        if keep_x(native):
            sd[f"{native}.down.weight"] = torch.zeros(1, math.prod(shape[1:]))
            sd[f"{native}.up.weight"] = torch.zeros(shape[0], 1)
    got = _converted(lcu._convert_xlabs_flux_lora_to_diffusers(sd))
    _compare(family + " (xlabs)", got, {f"transformer.{k}": v for k, v in _expected(aliases, keep_x).items()})
    return len(got)


def check_flux_fused(family: str, fused: list[list[Any]], aliases: list[list[Any]], cfg: dict[str, Any]) -> int:
    """Fused names against diffusers' ``fuse_qkv_projections`` (names, shapes and row order) and the BFL aliases.

    Args:
        fused: the family's fused entries, names without the component prefix.
        aliases: the family's aliases, same.
        cfg: the transformer config (the full-size model is built on the meta device).
    """
    from diffusers import FluxTransformer2DModel

    def fused_model(kwargs: dict[str, Any], device: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model after ``fuse_qkv_projections``, and its Linear weights from before."""
        torch.manual_seed(0)
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FluxTransformer2DModel(**kwargs)
            before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            model.fuse_qkv_projections()
        return model, before

    big, _ = fused_model(cfg, "meta")
    shapes = {n: [int(x) for x in m.weight.shape] for n, m in big.named_modules() if n and isinstance(m, nn.Linear)}
    ours = {n: s for n, s, _, _ in fused}
    native = {n for n in ours if n in shapes}
    if native != {n for n in shapes if re.search(r"\.attn\.to_(added_)?qkv$", n)}:
        raise SystemExit(f"{family}: fused names differ from diffusers' fuse_qkv_projections")
    if any(ours[n] != shapes[n] for n in native):
        raise SystemExit(f"{family}: fused shapes differ from diffusers' fuse_qkv_projections")
    # row order: in a tiny model, the fused weight is its pieces' weights stacked in table order
    tiny = dict(cfg, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=8,
                axes_dims_rope=(2, 2, 4), joint_attention_dim=16, pooled_projection_dim=8, in_channels=4)
    small, before = fused_model(tiny, "cpu")
    after = dict(small.named_modules())
    for name, shape, kind, pieces in fused:
        if name.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")) and name in after:
            if not torch.equal(after[name].weight, torch.cat([before[c] for c, _, _ in pieces])):
                raise SystemExit(f"{family}: fused {name!r} rows are not its pieces in table order")
    # every fused alias (img_attn.qkv, linear1, XLabs qkv_lora...) has a fused name with the same pieces
    by_pieces = {tuple(c for c, _, _ in p): n for n, _, _, p in fused}
    for a, shape, kind, pieces in aliases:
        if len(pieces) > 1 and tuple(c for c, _, _ in pieces) not in by_pieces:
            raise SystemExit(f"{family}: fused alias {a!r} has no fused canonical name")
    return len(fused)


def check_flux2(family: str, aliases: list[list[Any]]) -> int:
    from diffusers.loaders import lora_conversion_utils as lcu

    keep = lambda n: "adaLN" not in n  # noqa: E731
    got = _converted(lcu._convert_non_diffusers_flux2_lora_to_diffusers(
        _lora_sd(aliases, "diffusion_model.", "lora_A.weight", "lora_B.weight", keep)))
    _compare(family, got, {f"transformer.{k}": v for k, v in _expected(aliases, keep).items()})
    return len(got)


def check_wan(family: str, aliases: list[list[Any]]) -> int:
    from diffusers.loaders import lora_conversion_utils as lcu

    keep = lambda n: True  # noqa: E731
    got = _converted(lcu._convert_non_diffusers_wan_lora_to_diffusers(
        _lora_sd(aliases, "diffusion_model.", "lora_A.weight", "lora_B.weight", keep)))
    _compare(family, got, {f"transformer.{k}": v for k, v in _expected(aliases, keep).items()})
    return len(got)


def check_krea2(family: str, aliases: list[list[Any]]) -> int:
    from diffusers.loaders import lora_conversion_utils as lcu

    keep = lambda n: True  # noqa: E731
    got = _converted(lcu._convert_non_diffusers_krea2_lora_to_diffusers(
        _lora_sd(aliases, "diffusion_model.", "lora_A.weight", "lora_B.weight", keep)))
    _compare(family, got, {f"transformer.{k}": v for k, v in _expected(aliases, keep).items()})
    return len(got)


def check_ltx2(family: str, aliases: list[list[Any]]) -> int:
    from diffusers.loaders import lora_conversion_utils as lcu

    keep = lambda n: True  # noqa: E731
    got = _converted(lcu._convert_non_diffusers_ltx2_lora_to_diffusers(
        _lora_sd(aliases, "diffusion_model.", "lora_A.weight", "lora_B.weight", keep)))
    _compare(family, got, {f"transformer.{k}": v for k, v in _expected(aliases, keep).items()})
    return len(got)


def check_unet_ldm(family: str, aliases: list[list[Any]], model: nn.Module, cfg: dict[str, Any]) -> int:
    """Rebuild a full ldm checkpoint from the aliases and run diffusers' single-file converter on it."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    by_canon = {pieces[0][0]: native for native, shape, kind, pieces in aliases}
    ckpt: dict[str, torch.Tensor] = {}
    for pname, p in model.named_parameters():
        mod, _, leaf = pname.rpartition(".")
        ckpt[f"model.diffusion_model.{by_canon[f'unet.{mod}'][len('unet.'):]}.{leaf}"] = torch.empty(p.shape, device="meta")
    config = dict(model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = convert_ldm_unet_checkpoint(ckpt, config)
    got = {k: tuple(v.shape) for k, v in new.items()}
    exp = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != exp:
        raise SystemExit(f"{family}: ldm aliases disagree with convert_ldm_unet_checkpoint: "
                         f"missing {sorted(set(exp) - set(got))[:5]} extra {sorted(set(got) - set(exp))[:5]}")
    return len(got)


def check_full(family: str, aliases: list[list[Any]], model: nn.Module, convert: Callable[..., dict[str, Any]],
               swapped: dict[str, str], leaf_names: dict[str, str] | None = None,
               param_renames: dict[str, str] | None = None) -> int:
    """Rebuild a full reference checkpoint from the aliases (meta tensors) and run diffusers' single-file converter.

    Args:
        aliases: the family's transformer aliases, names without the component prefix.
        swapped: native-only aliases -> the canonical module diffusers fills from them.
        leaf_names: kind -> parameter name the reference uses for ``weight`` (BFL norms use ``scale``).
        param_renames: canonical parameter name -> reference name for loose parameters.
    """
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for native, shape, kind, pieces in aliases:
        targets = [c for c, _, _ in pieces] or ([swapped[native]] if native in swapped else [])
        for leaf in ("weight", "bias"):
            shapes = [state.get(f"{t}.{leaf}") for t in targets]
            if not targets or any(x is None for x in shapes):
                continue
            nleaf = (leaf_names or {}).get(kind, leaf) if leaf == "weight" else leaf
            ckpt[f"{native}.{nleaf}"] = torch.empty((sum(x[0] for x in shapes), *shapes[0][1:]), device="meta")
        covered.update(targets)
    for k, shp in state.items():
        if k.rpartition(".")[0] not in covered:
            ckpt[(param_renames or {}).get(k, k)] = torch.empty(shp, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = convert(ckpt)
    got = {k: tuple(v.shape) for k, v in new.items()}
    if got != state:
        raise SystemExit(f"{family}: aliases disagree with diffusers' single-file converter: "
                         f"missing {sorted(set(state) - set(got))[:5]} extra {sorted(set(got) - set(state))[:5]} "
                         f"shape {[k for k in set(got) & set(state) if got[k] != state[k]][:5]}")
    return len(got)


def check_sd3_full(family: str, aliases: list[list[Any]], model: nn.Module) -> int:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as convert

    n = model.config.num_layers
    swapped = {"final_layer.adaLN_modulation.1": "norm_out.linear",
               f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1": f"transformer_blocks.{n - 1}.norm1_context.linear"}
    return check_full(family, aliases, model, convert, swapped, param_renames={"pos_embed.pos_embed": "pos_embed"})


def check_flux_full(family: str, aliases: list[list[Any]], model: nn.Module) -> int:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    bfl = [a for a in aliases if "processor" not in a[0]]
    return check_full(family, bfl, model, convert, {"final_layer.adaLN_modulation.1": "norm_out.linear"},
                      leaf_names={"norm": "scale"})


def check_flux2_full(family: str, aliases: list[list[Any]], model: nn.Module) -> int:
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers as convert

    return check_full(family, aliases, model, convert, {"final_layer.adaLN_modulation.1": "norm_out.linear"},
                      leaf_names={"norm": "scale"})


def check_wan_full(family: str, aliases: list[list[Any]], model: nn.Module) -> int:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers as convert

    return check_full(family, aliases, model, convert, {})


def check_krea2_full(family: str, aliases: list[list[Any]], model: nn.Module) -> int:
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers as convert

    return check_full(family, aliases, model, convert, {}, leaf_names={"norm": "scale"})


# ---------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------

UNET_COMPONENTS = {"unet": "unet", "transformer": "unet", "te": "text_encoder", "te1": "text_encoder",
                   "text_encoder": "text_encoder"}
DIT_COMPONENTS = {"unet": "transformer", "transformer": "transformer"}


@dataclass
class Family:
    name: str
    components: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[Alias] = field(default_factory=list)
    fused: list[Fused] = field(default_factory=list)
    checks: list[Callable[[list[list[Any]]], int]] = field(default_factory=list)
    fused_checks: list[Callable[[list[list[Any]], list[list[Any]]], int]] = field(default_factory=list)


def fam_unet(name: str, ucfg: dict[str, Any], te: dict[str, Any], te2: dict[str, Any] | None = None) -> Family:
    u = unet(ucfg)
    f = Family(name, {"unet": u, "text_encoder": clip_text(te)}, dict(UNET_COMPONENTS))
    if te2 is not None:
        f.components["text_encoder_2"] = clip_text(te2, projection=True)
        f.tags.update(te2="text_encoder_2", text_encoder_2="text_encoder_2")
    names = [n for n, m in u[0].named_modules() if n and module_kind(m)]
    f.aliases = [(f"unet.{a}", [f"unet.{p}" for p in ps], s) for a, ps, s in unet_ldm_aliases(ucfg, names)]
    f.checks.append(lambda al, m=u[0], c=ucfg: check_unet_ldm(name, al, m, c))
    return f


def fam_dit(name: str, cls_name: str, cfg: dict[str, Any],
            alias_fn: Callable[[dict[str, Any], dict[str, list[int]]], list[Alias]] | None,
            check: Callable[[str, list[list[Any]]], int] | None,
            full_check: Callable[[str, list[list[Any]], nn.Module], int] | None = None,
            fused_fn: Callable[[dict[str, Any]], list[Fused]] | None = None,
            fused_check: Callable[[str, list[list[Any]], list[list[Any]], dict[str, Any]], int] | None = None,
            **encoders: tuple[nn.Module, str]) -> Family:
    t = dit(cls_name, cfg)
    f = Family(name, {"transformer": t, **encoders}, dict(DIT_COMPONENTS))
    if alias_fn is not None:
        table = {n: list(m.weight.shape) for n, m in t[0].named_modules() if n and module_kind(m)}
        f.aliases = [(f"transformer.{a}", None if ps is None else [f"transformer.{p}" for p in ps], s)
                     for a, ps, s in alias_fn(cfg, table)]

    def strip(al: list[list[Any]]) -> list[list[Any]]:
        return [[n[len("transformer."):], s, k, [[c[len("transformer."):], a, b] for c, a, b in p]]
                for n, s, k, p in al if n.startswith("transformer.")]

    if fused_fn is not None:
        f.fused = [(f"transformer.{n}", [f"transformer.{p}" for p in ps]) for n, ps in fused_fn(cfg)]
    if fused_check is not None:
        f.fused_checks.append(lambda fu, al: fused_check(name, strip(fu), strip(al), cfg))

    if check is not None:
        f.checks.append(lambda al: check(name, strip(al)))
    if full_check is not None:
        f.checks.append(lambda al: full_check(name, strip(al), t[0]))
    return f


def families() -> list[Callable[[], Family]]:
    def sd15() -> Family:
        return fam_unet("sd15", SD15_UNET, CLIP_L)

    def sd2() -> Family:
        return fam_unet("sd2", SD2_UNET, OPENCLIP_H)

    def sdxl() -> Family:
        return fam_unet("sdxl", SDXL_UNET, CLIP_L, CLIP_BIGG)

    def sd3() -> Family:
        f = fam_dit("sd3", "SD3Transformer2DModel", SD3_MEDIUM, sd3_aliases, None, check_sd3_full,
                    text_encoder=clip_text(CLIP_L, projection=True), text_encoder_2=clip_text(CLIP_BIGG, projection=True),
                    text_encoder_3=t5_encoder())
        f.tags.update(te="text_encoder", te1="text_encoder", te2="text_encoder_2", te3="text_encoder_3",
                      text_encoder="text_encoder", text_encoder_2="text_encoder_2", text_encoder_3="text_encoder_3")
        return f

    def flux() -> Family:
        f = fam_dit("flux", "FluxTransformer2DModel", FLUX_DEV, flux_bfl_aliases, check_flux, check_flux_full,
                    flux_fused, check_flux_fused, text_encoder=clip_text(CLIP_L), text_encoder_2=t5_encoder())
        # kohya Flux files call T5 te3; OneTrainer Flux files call it te2.
        f.tags.update(te="text_encoder", te1="text_encoder", te2="text_encoder_2", te3="text_encoder_2",
                      text_encoder="text_encoder", text_encoder_2="text_encoder_2", text_encoder_3="text_encoder_2")
        return f

    def flux2_klein_4b() -> Family:
        return fam_dit("flux2-klein-4b", "Flux2Transformer2DModel", FLUX2_KLEIN_4B, flux2_bfl_aliases, check_flux2, check_flux2_full)

    def flux2_klein_9b() -> Family:
        return fam_dit("flux2-klein-9b", "Flux2Transformer2DModel", FLUX2_KLEIN_9B, flux2_bfl_aliases, check_flux2, check_flux2_full)

    def wan_14b() -> Family:
        return fam_dit("wan-14b", "WanTransformer3DModel", WAN_14B, wan_aliases, check_wan, check_wan_full)

    def wan_5b() -> Family:
        return fam_dit("wan-5b", "WanTransformer3DModel", WAN_5B, wan_aliases, check_wan, check_wan_full)

    def qwen_image() -> Family:
        return fam_dit("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE, None, None)

    def ltx2() -> Family:
        return fam_dit("ltx2", "LTX2VideoTransformer3DModel", LTX2, ltx2_aliases, check_ltx2)

    def krea2() -> Family:
        return fam_dit("krea2", "Krea2Transformer2DModel", KREA2, krea2_aliases, check_krea2, check_krea2_full)

    return [sd15, sd2, sdxl, sd3, flux, flux2_klein_4b, flux2_klein_9b, wan_14b, wan_5b, qwen_image, ltx2, krea2]


# ---------------------------------------------------------------------------
# Table assembly
# ---------------------------------------------------------------------------


def flat(name: str) -> str:
    return name.replace(".", "_")


def assemble(f: Family) -> dict[str, Any]:
    modules: list[Module] = []
    sources: dict[str, str] = {}
    for comp, (model, desc) in f.components.items():
        modules += list_modules(comp, model)
        sources[comp] = desc
    table = {n: (s, k) for n, s, k in modules}
    if len(table) != len(modules):
        raise SystemExit(f"{f.name}: duplicate module names")
    for comp in f.components:  # dotted paths must stay unique once flattened (kohya)
        flats = [flat(n) for n in table if n.startswith(comp + ".")]
        if len(set(flats)) != len(flats):
            raise SystemExit(f"{f.name}: flattened names collide in {comp}")
    aliases: list[list[Any]] = []
    seen: set[str] = set()
    for native, pieces, shape in f.aliases:
        if native in table or native in seen:
            if pieces == [native]:
                continue
            raise SystemExit(f"{f.name}: alias {native!r} collides with a module name")
        seen.add(native)
        if pieces is None:
            aliases.append([native, list(shape or ()), "linear", []])
            continue
        shape, kind, spans = stack(f.name, native, pieces, table)
        aliases.append([native, shape, kind, spans])
    flat_all = {flat(n) for n in table}
    for a in aliases:
        if flat(a[0]) in flat_all:
            raise SystemExit(f"{f.name}: flattened alias {a[0]!r} collides with a module")
    fused: list[list[Any]] = []
    for name, pieces in f.fused:
        if flat(name) in flat_all or flat(name) in {flat(a[0]) for a in aliases} or name in {x[0] for x in fused}:
            raise SystemExit(f"{f.name}: fused name {name!r} collides with a module or alias")
        if len(pieces) < 2:
            raise SystemExit(f"{f.name}: fused name {name!r} needs two pieces or more")
        shape, _, spans = stack(f.name, name, pieces, table)
        fused.append([name, shape, "fused", spans])
    tags = {k: v for k, v in f.tags.items() if v in f.components}
    return {"family": f.name, "sources": sources, "components": tags, "modules": modules, "aliases": aliases,
            "fused": fused}


def stack(family: str, name: str, pieces: list[str], table: dict[str, tuple[list[int], str]]
          ) -> tuple[list[int], str, list[list[Any]]]:
    """Shape, kind and row spans of modules stacked by output rows (all must share input shape and kind)."""
    rows, spans, ins, kinds = 0, [], set(), set()
    for p in pieces:
        if p not in table:
            raise SystemExit(f"{family}: {name!r} -> unknown module {p!r}")
        pshape, pkind = table[p]
        spans.append([p, rows, rows + pshape[0]])
        rows += pshape[0]
        ins.add(tuple(pshape[1:]))
        kinds.add(pkind)
    if len(ins) != 1 or len(kinds) != 1:
        raise SystemExit(f"{family}: {name!r} joins modules of different input shapes")
    return [rows, *next(iter(ins))], kinds.pop(), spans


def write(data: dict[str, Any], path: Path) -> int:
    raw = json.dumps(data, separators=(",", ":")).encode()
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    return path.stat().st_size


def main(argv: list[str]) -> int:
    only = set(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    total = 0
    for make in families():
        f = make()
        if only and f.name not in only:
            continue
        data = assemble(f)
        checked = sum(check(data["aliases"]) for check in f.checks)
        checked += sum(check(data["fused"], data["aliases"]) for check in f.fused_checks)
        size = write(data, OUT_DIR / f"{f.name}.json.gz")
        total += size
        per = {c: sum(1 for m in data["modules"] if m[0].startswith(c + ".")) for c in f.components}
        print(f"{f.name:16s} {len(data['modules']):5d} modules {per} {len(data['aliases']):5d} aliases "
              f"{len(data['fused']):4d} fused "
              f"({checked} checked against diffusers) {size / 1024:7.1f} KiB")
    print(f"total {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
