"""Family detection and canonical module names (lorasearch.families)."""
from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorasearch import families
from lorasearch.delta import Dense, Factored, Kronecker, NeedsBase
from lorasearch.formats.base import ParsedLora, RawModule

LORA_KEYS = Path(__file__).resolve().parents[2] / "shared" / "lora-keys"
TABLE_DIR = Path(families.__file__).parent / "data" / "families"


def zeros(*shape: int) -> np.ndarray:
    """A read-only zero array that takes no memory whatever its shape."""
    return np.broadcast_to(np.float32(0.0), shape)


def fac(out: int, inn: int, rank: int = 1) -> Factored:
    return Factored(zeros(out, rank), zeros(rank, inn))


def mod(component: str | None, path: str, out: int, inn: int, flat: bool = False, **kw: Any) -> RawModule:
    return RawModule(component, path, flat, fac(out, inn), **kw)


def parsed(*modules: RawModule, hint: str | None = None) -> ParsedLora:
    return ParsedLora("test", list(modules), family_hint=hint)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def test_required_tables_exist_and_are_small() -> None:
    known = families.known_families()
    for fam in ("sd15", "sd2", "sdxl", "sd3", "flux"):
        assert fam in known
    assert known[:5] == ["sd15", "sd2", "sdxl", "sd3", "flux"]
    total = sum(p.stat().st_size for p in TABLE_DIR.glob("*.json.gz"))
    assert total < 2 * 1024 * 1024


def test_table_contents() -> None:
    sd15, sd2, sdxl, flux = (families.load_table(f) for f in ("sd15", "sd2", "sdxl", "flux"))
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert sd15[k] == ((320, 768), "linear")
    assert sd2[k] == ((320, 1024), "linear")
    assert sd15["unet.down_blocks.0.attentions.0.proj_in"] == ((320, 320, 1, 1), "conv")
    assert sd2["unet.down_blocks.0.attentions.0.proj_in"] == ((320, 320), "linear")
    assert sd15["unet.down_blocks.0.resnets.0.norm1"] == ((320,), "norm")
    assert sd15["text_encoder.text_model.encoder.layers.11.mlp.fc1"] == ((3072, 768), "linear")
    assert "text_encoder.text_model.encoder.layers.22.self_attn.q_proj" in sd2
    assert "text_encoder.text_model.encoder.layers.23.self_attn.q_proj" not in sd2
    assert sdxl["text_encoder_2.text_model.encoder.layers.31.mlp.fc1"] == ((5120, 1280), "linear")
    assert sdxl["text_encoder_2.text_projection"] == ((1280, 1280), "linear")
    assert "unet.down_blocks.0.attentions.0.proj_in" not in sdxl  # SDXL's first block has no attention
    assert flux["transformer.x_embedder"] == ((3072, 64), "linear")
    assert flux["transformer.time_text_embed.guidance_embedder.linear_1"] == ((3072, 256), "linear")
    assert flux["text_encoder_2.encoder.block.23.layer.1.DenseReluDense.wi_0"] == ((10240, 4096), "linear")
    assert flux["text_encoder.text_model.embeddings.token_embedding"] == ((49408, 768), "embedding")
    sd3 = families.load_table("sd3")
    assert sd3["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"] == ((4096, 4096), "linear")
    assert sd3["transformer.transformer_blocks.0.attn.to_q"] == ((1536, 1536), "linear")
    with pytest.raises(KeyError):
        families.load_table("nope")


def test_tables_have_documented_layout() -> None:
    for path in TABLE_DIR.glob("*.json.gz"):
        data = json.loads(gzip.decompress(path.read_bytes()))
        assert data["family"] == path.name[: -len(".json.gz")]
        assert set(data) == {"family", "sources", "components", "modules", "aliases", "fused"}
        comps = set(data["sources"])
        modules = {name: shape for name, shape, _ in data["modules"]}
        for name, shape, kind in data["modules"]:
            assert name.split(".", 1)[0] in comps
            assert kind in {"linear", "conv", "norm", "embedding"} and all(isinstance(s, int) for s in shape)
        for native, shape, kind, pieces in data["aliases"] + data["fused"]:
            assert native.split(".", 1)[0] in comps
            if pieces:
                assert pieces[0][1] == 0 and pieces[-1][2] == shape[0]
                assert all(modules[c][0] == b - a and modules[c][1:] == shape[1:] for c, a, b in pieces)
        for name, shape, kind, pieces in data["fused"]:
            assert kind == "fused" and len(pieces) > 1 and name not in modules
        assert bool(data["fused"]) == (data["family"] == "flux")


def test_aliases() -> None:
    al = families.load_aliases("flux")
    shape, kind, pieces = al["transformer.single_blocks.3.linear1"]
    assert shape == (21504, 3072) and kind == "linear"
    assert [p[0].rsplit(".", 1)[-1] for p in pieces] == ["to_q", "to_k", "to_v", "proj_mlp"]
    assert pieces[-1] == ("transformer.single_transformer_blocks.3.proj_mlp", 9216, 21504)
    ldm = families.load_aliases("sdxl")["unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    assert ldm[2] == (("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 0, 640),)
    # XLabs single-block proj_lora is 15360 -> 3072, i.e. linear2 (diffusers' _convert_xlabs_flux_lora_to_diffusers)
    assert al["transformer.single_blocks.5.processor.proj_lora"] == (
        (3072, 15360), "linear", (("transformer.single_transformer_blocks.5.proj_out", 0, 3072),))


FLUX_FUSED = [  # (fused canonical name, shape, last piece)
    ("transformer.transformer_blocks.18.attn.to_qkv", (9216, 3072), ("transformer.transformer_blocks.18.attn.to_v", 6144, 9216)),
    ("transformer.transformer_blocks.0.attn.to_added_qkv", (9216, 3072),
     ("transformer.transformer_blocks.0.attn.add_v_proj", 6144, 9216)),
    ("transformer.single_transformer_blocks.37.attn.to_qkv", (9216, 3072),
     ("transformer.single_transformer_blocks.37.attn.to_v", 6144, 9216)),
    ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", (21504, 3072),
     ("transformer.single_transformer_blocks.0.proj_mlp", 9216, 21504)),
]


@pytest.mark.parametrize("name,shape,last", FLUX_FUSED, ids=[f[0].rsplit(".", 1)[-1] for f in FLUX_FUSED])
def test_flux_fused_names(name: str, shape: tuple[int, int], last: tuple[str, int, int]) -> None:
    fused = families.load_fused("flux")
    assert len(fused) == 2 * 19 + 2 * 38
    assert fused[name][0] == shape and fused[name][1][-1] == last
    assert name not in families.load_table("flux")  # not a module of the model
    assert families.load_table("flux", fused=True)[name] == (shape, "fused")
    assert families.load_fused("sd3") == {} and families.load_table("sd3", fused=True) == families.load_table("sd3")


# ---------------------------------------------------------------------------
# Stable Diffusion
# ---------------------------------------------------------------------------


def sd_unet_modules(ctx: int, flat: bool = True) -> list[RawModule]:
    sep = "_" if flat else "."
    base = sep.join(["down_blocks", "0", "attentions", "0", "transformer_blocks", "0"])
    mods = []
    for attn, kdim in (("attn1", 320), ("attn2", ctx)):
        for proj, inn in (("to_q", 320), ("to_k", kdim), ("to_v", kdim)):
            mods.append(mod("unet", f"{base}{sep}{attn}{sep}{proj}", 320, inn, flat=flat))
        mods.append(mod("unet", f"{base}{sep}{attn}{sep}to_out{sep}0", 320, 320, flat=flat))
    return mods


def test_kohya_flat_sd15_with_text_encoder_and_conv() -> None:
    mods = sd_unet_modules(768)
    mods.append(RawModule("unet", "down_blocks_0_resnets_0_conv1", True, Factored(zeros(320, 4, 1, 1), zeros(4, 320, 3, 3), shape=(320, 320, 3, 3))))
    mods.append(RawModule("unet", "down_blocks_0_attentions_0_proj_in", True, Factored(zeros(320, 4, 1, 1), zeros(4, 320, 1, 1))))
    mods.append(mod("te", "text_model_encoder_layers_0_self_attn_q_proj", 768, 768, flat=True))
    mods.append(mod("te", "text_model_encoder_layers_11_mlp_fc2", 768, 3072, flat=True))
    res = families.resolve(parsed(*mods))
    assert res.family == "sd15"
    assert res.matched == len(mods) and not res.unmatched and not res.shape_mismatches
    assert res.names[0] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert res.names[7] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert res.names[8] == "unet.down_blocks.0.resnets.0.conv1"
    assert res.names[-2] == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert res.names[-1] == "text_encoder.text_model.encoder.layers.11.mlp.fc2"


def test_sd2_and_sd15_differ_by_cross_attention_width() -> None:
    assert families.resolve(parsed(*sd_unet_modules(768))).family == "sd15"
    res = families.resolve(parsed(*sd_unet_modules(1024)))
    assert res.family == "sd2"
    assert res.hints["decided_by"] == "shapes"
    assert res.names[5] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    te = [mod("te", f"text_model_encoder_layers_{i}_self_attn_q_proj", 1024, 1024, flat=True) for i in range(23)]
    assert families.resolve(parsed(*te)).family == "sd2"


def test_sdxl_te1_te2_and_ldm_names() -> None:
    mods = [
        mod("unet", "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k", 640, 2048, flat=True),
        mod("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, flat=True),  # ldm / sgm naming
        mod("unet", "output_blocks_2_2_conv", 1280, 1280 * 9, flat=True),  # upsampler after an attention
        mod("te1", "text_model_encoder_layers_0_self_attn_q_proj", 768, 768, flat=True),
        mod("te2", "text_model_encoder_layers_31_mlp_fc1", 5120, 1280, flat=True),
    ]
    res = families.resolve(parsed(*mods))
    assert res.family == "sdxl"
    assert res.names == [
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.up_blocks.0.upsamplers.0.conv",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1",
    ]


def test_legacy_component_none_unet_names() -> None:
    base = "down_blocks.0.attentions.0.transformer_blocks.0"
    mods = [mod(None, f"{base}.attn2.processor.to_k_lora", 320, 768),
            mod(None, f"{base}.attn1.processor.to_out_lora", 320, 320),
            mod(None, f"{base}.attn1.to_q", 320, 320),  # PEFT on the UNet, base_model.model. stripped
            mod(None, f"unet.{base}.attn1.to_v", 320, 320)]
    res = families.resolve(parsed(*mods))
    assert res.family == "sd15"
    assert res.names == [f"unet.{base}.attn2.to_k", f"unet.{base}.attn1.to_out.0", f"unet.{base}.attn1.to_q",
                         f"unet.{base}.attn1.to_v"]


# ---------------------------------------------------------------------------
# DiTs
# ---------------------------------------------------------------------------


def test_flux_diffusers_names_and_bias_suffix() -> None:
    mods = [mod("transformer", "transformer_blocks.0.attn.to_q", 3072, 3072),
            mod("transformer", "single_transformer_blocks.37.proj_out", 3072, 15360),
            RawModule("transformer", "single_transformer_blocks.37.proj_out", False, Dense(zeros(3072)), is_bias=True)]
    res = families.resolve(parsed(*mods))
    assert res.family == "flux"
    assert res.names == ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.37.proj_out",
                         "transformer.single_transformer_blocks.37.proj_out#bias"]


def test_flux_kohya_fused_modules_split() -> None:
    rng = np.random.default_rng(0)
    up = rng.standard_normal((9216, 2)).astype(np.float32)
    qkv = RawModule("unet", "double_blocks_0_img_attn_qkv", True, Factored(up, np.ones((2, 3072), np.float32), 0.5))
    mods = [qkv, mod("unet", "single_blocks_0_linear1", 21504, 3072, flat=True),
            mod("unet", "double_blocks_0_img_mlp_2", 3072, 12288, flat=True),
            mod("te1", "text_model_encoder_layers_0_mlp_fc1", 3072, 768, flat=True),
            mod("te3", "encoder_block_0_layer_0_SelfAttention_q", 4096, 4096, flat=True)]
    p = parsed(*mods)
    res = families.resolve(p)
    assert res.family == "flux"
    assert res.names[0] == "transformer.transformer_blocks.0.attn.to_qkv"  # Flux's fused canonical name
    assert res.names[1] == "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"
    assert res.names[2] == "transformer.transformer_blocks.0.ff.net.2"
    assert not res.fused_kept
    assert res.names[4] == "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"
    assert res.splits[0] == [("transformer.transformer_blocks.0.attn.to_q", 0, 3072),
                             ("transformer.transformer_blocks.0.attn.to_k", 3072, 6144),
                             ("transformer.transformer_blocks.0.attn.to_v", 6144, 9216)]
    out, mags, dups = families.canonical_modules(p, res)
    assert not dups and not mags
    k = out["transformer.transformer_blocks.0.attn.to_k"]
    assert isinstance(k, Factored) and k.matrix_shape == (3072, 3072) and k.scale == 0.5
    np.testing.assert_array_equal(k.up, up[3072:6144])
    assert out["transformer.single_transformer_blocks.0.proj_mlp"].matrix_shape == (12288, 3072)
    assert "transformer.double_blocks.0.img_attn.qkv" not in out
    assert "transformer.transformer_blocks.0.attn.to_qkv" not in out


def test_onetrainer_te2_is_t5_in_flux() -> None:
    mods = [mod("transformer", "transformer_blocks_0_attn_to_q", 3072, 3072, flat=True),
            mod("transformer", "single_transformer_blocks_3_attn_to_k", 3072, 3072, flat=True),
            mod("te2", "encoder_block_0_layer_1_DenseReluDense_wi_0", 10240, 4096, flat=True)]
    res = families.resolve(parsed(*mods))
    assert res.family == "flux"
    assert res.names[2] == "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0"


def test_flux_control_lora_widened_x_embedder() -> None:
    mods = [mod(None, "img_in", 3072, 128), mod(None, "double_blocks.0.img_attn.proj", 3072, 3072),
            mod(None, "double_blocks.0.img_mod.lin", 18432, 3072),
            RawModule(None, "double_blocks.0.img_attn.norm.query_norm", False, Dense(zeros(128)))]
    res = families.resolve(parsed(*mods))
    assert res.family == "flux"
    assert res.names == ["transformer.x_embedder", "transformer.transformer_blocks.0.attn.to_out.0",
                         "transformer.transformer_blocks.0.norm1.linear", "transformer.transformer_blocks.0.attn.norm_q"]
    assert res.shape_mismatches == ["transformer.x_embedder"]
    assert res.matched == 4 and not res.unmatched


def test_flux2_klein_sizes() -> None:
    def klein(width: int, mlp: int) -> ParsedLora:
        return parsed(mod("unet", "double_blocks_0_img_attn_qkv", 3 * width, width, flat=True),
                      mod("unet", "double_blocks_0_img_mlp_0", 2 * mlp, width, flat=True),
                      mod("unet", "single_blocks_0_linear1", 3 * width + 2 * mlp, width, flat=True),
                      mod("unet", "single_blocks_0_linear2", width, width + mlp, flat=True), hint="flux")
    res = families.resolve(klein(3072, 9216))
    assert res.family == "flux2-klein-4b"
    assert res.names[2] == "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"
    assert res.hints["family_hint"] == "flux" and res.hints["family_hint_agrees"] is False
    assert families.resolve(klein(4096, 12288)).family == "flux2-klein-9b"


def test_wan_original_names_by_size() -> None:
    def wan(dim: int, ffn: int) -> ParsedLora:
        return parsed(mod("transformer", "blocks.0.self_attn.q", dim, dim), mod("transformer", "blocks.0.cross_attn.o", dim, dim),
                      mod("transformer", "blocks.1.ffn.0", ffn, dim))
    res = families.resolve(wan(5120, 13824))
    assert res.family == "wan-14b"
    assert res.names == ["transformer.blocks.0.attn1.to_q", "transformer.blocks.0.attn2.to_out.0",
                         "transformer.blocks.1.ffn.net.0.proj"]
    assert families.resolve(wan(3072, 14336)).family == "wan-5b"


def test_same_names_other_shapes_is_not_that_family() -> None:
    """h3 (5376 wide) shares diffusers block names with Qwen-Image (3072): names alone must not decide."""
    mods = [mod(None, f"transformer_blocks.{i}.attn.to_q", 5376, 5376) for i in range(4)]
    res = families.resolve(parsed(*mods))
    assert res.family.startswith("unknown:")
    assert res.names[0] == "diffusion_model.transformer_blocks_0_attn_to_q"


# ---------------------------------------------------------------------------
# LLMs and encoders (PEFT, names from the model root)
# ---------------------------------------------------------------------------

LLM_CASES = [  # (layout from /work/shared/loras/inventory.tsv, [(path, out, in)], expected family)
    ("gpt2", [("transformer.h.0.attn.c_attn", 2304, 768), ("transformer.h.0.attn.c_proj", 768, 768),
              ("transformer.h.0.mlp.c_proj", 768, 3072)], "llm:gpt2:768"),
    ("distilgpt2", [("transformer.h.5.attn.c_attn", 2304, 768)], "llm:gpt2:768"),
    ("tiny-gpt2", [("transformer.h.0.attn.c_attn", 6, 2), ("transformer.h.0.mlp.c_proj", 2, 8)], "llm:gpt2:2"),
    ("bloom-560m", [("transformer.h.0.self_attention.query_key_value", 3072, 1024)], "llm:bloom:1024"),
    ("bloomz-1b1", [("transformer.h.0.self_attention.query_key_value", 4608, 1536)], "llm:bloom:1536"),
    ("gpt-neo-125M", [("transformer.h.0.attn.attention.q_proj", 768, 768),
                      ("transformer.h.0.attn.attention.v_proj", 768, 768)], "llm:gptneo:768"),
    ("Qwen2.5-0.5B", [("model.layers.0.self_attn.q_proj", 896, 896), ("model.layers.0.self_attn.v_proj", 128, 896)],
     "llm:llama:896"),
    ("Llama-3.2-1B", [("model.layers.0.self_attn.q_proj", 2048, 2048), ("model.layers.0.self_attn.v_proj", 512, 2048)],
     "llm:llama:2048"),
    ("TinyLlama-1.1B", [("model.layers.21.self_attn.q_proj", 2048, 2048),
                        ("model.layers.21.self_attn.v_proj", 256, 2048)], "llm:llama:2048"),
    ("bert-base", [("bert.encoder.layer.0.attention.self.query", 768, 768),
                   ("bert.encoder.layer.0.attention.self.value", 768, 768), ("classifier", 2, 768)], "llm:bert:768"),
    ("roberta-base", [("roberta.encoder.layer.0.attention.self.query", 768, 768)], "llm:roberta:768"),
    ("distilbert", [("distilbert.transformer.layer.0.attention.q_lin", 768, 768), ("pre_classifier", 768, 768)],
     "llm:distilbert:768"),
    ("vit", [("vit.encoder.layer.0.attention.attention.query", 768, 768)], "llm:vit:768"),
    ("stella_en_400M_v5", [("encoder.layer.0.attention.o_proj", 1024, 1024),
                           ("encoder.layer.1.attention.o_proj", 1024, 1024)], "llm:encoder-layer:1024"),
]


@pytest.mark.parametrize("label,layout,expected", LLM_CASES, ids=[c[0] for c in LLM_CASES])
def test_peft_llm_families(label: str, layout: list[tuple[str, int, int]], expected: str) -> None:
    mods = [mod(None, path, out, inn) for path, out, inn in layout]
    res = families.resolve(parsed(*mods), peft_config={"base_model_name_or_path": label})
    assert res.family == expected
    assert res.names == [path for path, _, _ in layout]
    assert res.hints["decided_by"] == "llm"
    if label != "stella_en_400M_v5":
        assert res.hints["agrees"] is True


# ---------------------------------------------------------------------------
# Unknown families and hints
# ---------------------------------------------------------------------------


def test_unknown_family_stable_across_spellings() -> None:
    kohya = parsed(mod("unet", "blocks_0_cross_attn_k_proj", 2048, 2048, flat=True),
                   mod("unet", "blocks_0_mlp_layer1", 8192, 2048, flat=True),
                   mod("te", "layers_0_self_attn_q_proj", 1024, 1024, flat=True))
    dotted = parsed(mod("transformer", "blocks.0.mlp.layer1", 8192, 2048),
                    mod("text_encoder", "layers.0.self_attn.q_proj", 1024, 1024),
                    mod("transformer", "blocks.0.cross_attn.k_proj", 2048, 2048))
    a, b = families.resolve(kohya), families.resolve(dotted)
    assert re.fullmatch(r"unknown:[0-9a-f]{12}", a.family)
    assert a.family == b.family
    assert sorted(a.names) == sorted(b.names)
    assert a.names[0] == "diffusion_model.blocks_0_cross_attn_k_proj"
    assert len(a.unmatched) == 3 and a.matched == 0
    other = parsed(mod("unet", "blocks_0_cross_attn_k_proj", 2048, 1024, flat=True))
    assert families.resolve(other).family != a.family


UNKNOWN_DENOISER = [  # one unknown denoiser as each trainer names it: (component, flat, path prefix, separator)
    ("kohya", "unet", True, "", "_"),
    ("onetrainer", "transformer", True, "", "_"),
    ("diffusers", "transformer", False, "", "."),
    ("lycoris", None, True, "", "_"),
    ("peft", None, False, "", "."),
    ("comfyui", None, False, "diffusion_model.", "."),
    ("peft-unstripped", None, False, "base_model.model.", "."),
]


def test_unknown_denoiser_spellings_coincide() -> None:
    layout = [("blocks.0.cross_attn.k_proj", 2048, 2048), ("blocks.0.mlp.layer1", 8192, 2048),
              ("blocks.1.self_attn.qkv", 6144, 2048)]
    results = {}
    for label, comp, flat, prefix, sep in UNKNOWN_DENOISER:
        mods = [mod(comp, prefix + path.replace(".", sep), out, inn, flat=flat) for path, out, inn in layout]
        results[label] = families.resolve(parsed(*mods))
    fams = {r.family for r in results.values()}
    assert len(fams) == 1 and next(iter(fams)).startswith("unknown:"), {k: r.family for k, r in results.items()}
    for r in results.values():
        assert r.names == ["diffusion_model.blocks_0_cross_attn_k_proj", "diffusion_model.blocks_0_mlp_layer1",
                           "diffusion_model.blocks_1_self_attn_qkv"]


def test_metadata_hint_disagreement_is_reported_not_obeyed() -> None:
    mods = [mod("transformer", f"single_transformer_blocks.{i}.proj_out", 3072, 15360) for i in range(4)]
    res = families.resolve(parsed(*mods), {"ss_base_model_version": "sd_1.5", "software": "ai-toolkit"})
    assert res.family == "flux"
    assert res.hints["ss_base_model_version"] == "sd_1.5"
    assert res.hints["hinted_families"] == {"ss_base_model_version": "sd15"}
    assert res.hints["agrees"] is False
    ok = families.resolve(parsed(*mods), {"modelspec.architecture": "flux-1-dev/lora"})
    assert ok.hints["agrees"] is True


def test_metadata_breaks_ties_only() -> None:
    te = [mod("te", f"text_model_encoder_layers_{i}_self_attn_q_proj", 768, 768, flat=True) for i in range(12)]
    plain = families.resolve(parsed(*te))
    assert plain.family == "sd15" and plain.hints["decided_by"] == "te_tags"  # kohya "te": a one-encoder model
    xl = families.resolve(parsed(*te), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    assert xl.family == "sdxl" and xl.hints["decided_by"] == "metadata" and xl.hints["agrees"] is True
    hinted = families.resolve(parsed(*te, hint="flux"), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert hinted.family == "flux" and hinted.hints["decided_by"] == "family_hint"
    # metadata never overrides shapes
    sd2 = families.resolve(parsed(*sd_unet_modules(1024)), {"ss_base_model_version": "sd_v1"})
    assert sd2.family == "sd2" and sd2.hints["agrees"] is False


@pytest.mark.parametrize("text,family", [
    ("sd_1.5", "sd15"), ("sd_v1", "sd15"), ("runwayml/stable-diffusion-v1-5", "sd15"), ("sd_v2_768_v", "sd2"),
    ("stabilityai/stable-diffusion-2-1", "sd2"), ("sdxl_base_v1-0", "sdxl"), ("stable-diffusion-xl-v1-base/lora", "sdxl"),
    ("stable-diffusion-3-medium/lora", "sd3"), ("flux1", "flux"), ("black-forest-labs/FLUX.1-dev", "flux"),
    ("flux_2_klein_4b", "flux2-klein-4b"), ("flux2_klein_9b", "flux2-klein-9b"), ("Flux.2-klein-4b/lora", "flux2-klein-4b"),
    ("wan2.1/lora", "wan"), ("krea2", "krea2"), ("Qwen/Qwen-Image", "qwen-image"), ("Qwen/Qwen2.5-0.5B-Instruct", "llm:llama"),
    ("distilgpt2", "llm:gpt2"), ("EleutherAI/gpt-neo-125M", "llm:gptneo"), ("distilbert-base-uncased", "llm:distilbert"),
    ("klue/roberta-base", "llm:roberta"), ("chroma", None),
])
def test_hinted_family(text: str, family: str | None) -> None:
    assert families.hinted_family(text) == family


# ---------------------------------------------------------------------------
# Splitting fused updates
# ---------------------------------------------------------------------------


def test_split_delta_forms() -> None:
    rng = np.random.default_rng(1)
    dense = Dense(rng.standard_normal((6, 4)).astype(np.float32))
    np.testing.assert_array_equal(families.split_delta(dense, 2, 4).matrix(), dense.matrix()[2:4])
    kron = Kronecker(rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32), 2.0)
    part = families.split_delta(kron, 2, 4)
    assert isinstance(part, Kronecker)
    np.testing.assert_allclose(part.matrix(), kron.matrix()[2:4], rtol=1e-6)
    assert np.shares_memory(part.w1, kron.w1)  # a view: never densified
    assert families.split_delta(kron, 1, 3) is None  # inside a w2 block: the caller keeps it fused
    assert families.split_delta(kron, 2, 5) is None
    fk = Kronecker(Factored(rng.standard_normal((3, 1)), rng.standard_normal((1, 2))), rng.standard_normal((2, 2)))
    np.testing.assert_allclose(families.split_delta(fk, 4, 6).matrix(), fk.matrix()[4:6], rtol=1e-6)
    fac_part = families.split_delta(Factored(rng.standard_normal((6, 2)), rng.standard_normal((2, 4)), 0.5), 0, 3)
    assert isinstance(fac_part, Factored) and fac_part.shape == (3, 4) and fac_part.scale == 0.5
    bias = families.split_delta(Dense(np.arange(6, dtype=np.float32)), 3, 6)
    np.testing.assert_array_equal(bias.matrix(), [3, 4, 5])
    assert families.split_delta(NeedsBase("oft", {}, (6, 4)), 0, 3) is None


def _kron_delta(rows2: int, out: int = 21504, inn: int = 3072) -> Kronecker:
    """A zero-memory LoKr update of ``out x inn`` whose w2 has ``rows2`` rows."""
    return Kronecker(zeros(out // rows2, 48), Factored(zeros(rows2, 2), zeros(2, inn // 48)))


def _bfl_linear1(delta: Any, **kw: Any) -> RawModule:
    return RawModule(None, "single_blocks.0.linear1", False, delta, **kw)


FUSED_CASES = [
    # (what, module, split?, name kept when fused, reason fragment)
    ("lokr on block boundaries", _bfl_linear1(_kron_delta(3072)), True, None, None),
    ("lokr w2 168 rows", _bfl_linear1(_kron_delta(168)), False,
     "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "blocks of 168; the cut at row 3072 falls inside one"),
    ("oft needs base", _bfl_linear1(NeedsBase("oft", {}, (21504, 3072))), False,
     "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "oft needs the base weight"),
    ("dense cut by rows", RawModule(None, "double_blocks.0.txt_attn.qkv", False, Dense(zeros(9216, 3072))), True, None, None),
    ("per-column dora magnitude", RawModule(None, "double_blocks.0.img_attn.qkv", False, fac(9216, 3072),
                                            magnitude=np.ones((1, 3072), np.float32)), False,
     "transformer.transformer_blocks.0.attn.to_qkv", "per input column"),
    ("per-row dora magnitude", RawModule(None, "double_blocks.0.img_attn.qkv", False, fac(9216, 3072),
                                         magnitude=np.ones((9216, 1), np.float32)), True, None, None),
    ("xlabs single qkv lokr", RawModule(None, "single_blocks.2.processor.qkv_lora", False, _kron_delta(1152, 9216)),
     False, "transformer.single_transformer_blocks.2.attn.to_qkv", "blocks of 1152"),
    ("kohya flat img qkv lokr", RawModule("unet", "double_blocks_1_img_attn_qkv", True, _kron_delta(9216 // 4, 9216)),
     False, "transformer.transformer_blocks.1.attn.to_qkv", "blocks of 2304"),
]


@pytest.mark.parametrize("what,rm,split,kept,why", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_flux_fused_kept_or_split(what: str, rm: RawModule, split: bool, kept: str | None, why: str | None) -> None:
    p = parsed(rm, mod("transformer", "transformer_blocks.0.attn.to_out.0", 3072, 3072))
    res = families.resolve(p)
    assert res.family == "flux" and res.matched == 2 and not res.unmatched and not res.shape_mismatches
    out, mags, dups = families.canonical_modules(p, res)
    if split:
        assert 0 in res.splits and not res.fused_kept
        pieces = res.splits[0]
        assert set(out) == {c for c, _, _ in pieces} | {"transformer.transformer_blocks.0.attn.to_out.0"}
        for c, a, b in pieces:
            assert out[c].matrix_shape[0] == b - a and type(out[c]) is type(rm.delta)
        if rm.magnitude is not None:
            assert all(mags[c].shape == (b - a, 1) for c, a, b in pieces)
    else:
        assert 0 not in res.splits and res.names[0] == kept
        assert out[kept] is rm.delta  # kept whole: nothing densified
        assert len(res.fused_kept) == 1 and kept in res.fused_kept[0] and why in res.fused_kept[0]
        if rm.magnitude is not None:
            assert mags[kept] is rm.magnitude


def test_flux_reader_fused_names_resolve() -> None:
    """The Flux readers keep uncuttable updates under the fused names; those are matched, never cut wrongly."""
    mods = [RawModule("transformer", "single_transformer_blocks.0.attn.to_qkv_mlp_proj", False, _kron_delta(168)),
            RawModule("transformer", "transformer_blocks.3.attn.to_added_qkv", False, NeedsBase("oft", {}, (9216, 3072))),
            RawModule("transformer", "transformer_blocks.3.attn.to_qkv", False, _kron_delta(9216 // 4, 9216)),
            RawModule("transformer", "single_transformer_blocks.1.attn.to_qkv", False, _kron_delta(9216 // 4, 9216)),
            mod("transformer", "transformer_blocks.3.attn.to_out.0", 3072, 3072)]
    p = parsed(*mods, hint="flux")
    res = families.resolve(p)
    assert res.family == "flux" and res.matched == 5 and not res.unmatched and not res.shape_mismatches
    assert res.names[:4] == [f"transformer.{m.path}" for m in mods[:4]]
    assert not res.splits and len(res.fused_kept) == 4
    assert res.fused_kept[0].startswith("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj (LoKr rows")
    out, _, _ = families.canonical_modules(p, res)
    assert list(out) == res.names
    # a fused module that can be cut (PEFT on a model after fuse_qkv_projections) is cut
    fused_peft = parsed(mod("transformer", "transformer_blocks.2.attn.to_qkv", 9216, 3072),
                        mod("transformer", "transformer_blocks.2.attn.to_out.0", 3072, 3072))
    res = families.resolve(fused_peft)
    assert res.splits[0][1] == ("transformer.transformer_blocks.2.attn.to_k", 3072, 6144)
    assert "transformer.transformer_blocks.2.attn.to_v" in families.canonical_modules(fused_peft, res)[0]


def test_flux_lokr_file_keeps_fused_kronecker() -> None:
    """Through a reader: a BFL LoKr whose linear1 cannot be cut stays one Kronecker, matched, never densified."""
    formats = pytest.importorskip("lorasearch.formats")
    from lorasearch.formats.base import DictSource

    rng = np.random.default_rng(3)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    src = DictSource({
        "diffusion_model.single_blocks.0.linear1.lokr_w1": f32(128, 48),
        "diffusion_model.single_blocks.0.linear1.lokr_w2": f32(168, 64),  # 21504 = 128 x 168: 168 does not divide 3072
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": f32(96, 48),  # 9216 = 96 x 96: cuts on blocks
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": f32(96, 64),
    })
    ld = formats.read_source(src)
    assert ld.family == "flux"
    assert ld.metadata["family_detection"]["unmatched_count"] == 0
    fused = ld.modules["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    assert isinstance(fused, Kronecker) and fused.matrix_shape == (21504, 3072)
    assert isinstance(ld.modules["transformer.transformer_blocks.0.attn.to_k"], Kronecker)
    assert not any(isinstance(d, Dense) for d in ld.modules.values())


def test_fused_kept_elsewhere_keeps_own_name() -> None:
    """Families without fused names (SD3) keep an uncuttable fused module under its resolved name."""
    mods = [RawModule("unet", "joint_blocks_0_x_block_attn_qkv", True, _kron_delta(1536 * 3 // 8, 4608, 1536)),
            mod("unet", "joint_blocks_0_x_block_attn_proj", 1536, 1536, flat=True),
            RawModule("unet", "joint_blocks_0_x_block_attn_qkv", True, Dense(zeros(4608)), is_bias=True)]
    p = parsed(*mods)
    res = families.resolve(p)
    assert res.family == "sd3"
    assert res.names[0] == "transformer.joint_blocks.0.x_block.attn.qkv"
    assert res.fused_kept == ["transformer.joint_blocks.0.x_block.attn.qkv (LoKr rows come in blocks of 576; "
                              "the cut at row 1536 falls inside one)"]
    assert res.splits[2][0] == ("transformer.transformer_blocks.0.attn.to_q#bias", 0, 1536)  # the bias still cuts
    out, _, _ = families.canonical_modules(p, res)
    assert set(out) == {"transformer.joint_blocks.0.x_block.attn.qkv", "transformer.transformer_blocks.0.attn.to_out.0",
                        "transformer.transformer_blocks.0.attn.to_q#bias", "transformer.transformer_blocks.0.attn.to_k#bias",
                        "transformer.transformer_blocks.0.attn.to_v#bias"}


# ---------------------------------------------------------------------------
# Real layouts (/work/shared/lora-keys)
# ---------------------------------------------------------------------------

# Expected family per layout; a set where the layout alone cannot decide. The
# synthetic LoKr fixtures have Kronecker shapes that fit no real layer, so no
# table accepts them; Anima and h3 have no table.
EXPECTED: dict[str, str | set[str]] = {
    "invokeai_anima_kohya_synthetic": "unknown",
    "invokeai_anima_kohya_te_synthetic": "unknown",
    "invokeai_anima_lokr_dora_synthetic": "unknown",
    "invokeai_anima_peft_synthetic": "unknown",
    "invokeai_flux_aitoolkit": "flux",
    "invokeai_flux_control_lora_depth": "flux",
    "invokeai_flux_diffusers": "flux",
    "invokeai_flux_diffusers_base_model_prefix": "flux",
    "invokeai_flux_diffusers_lora_dot_down_keys_only": "flux",
    "invokeai_flux_diffusers_no_proj_mlp": "flux",
    "invokeai_flux_diffusers_norm_out_hypersd": "flux",
    "invokeai_flux_dora_lora_transformer": "flux",
    "invokeai_flux_dora_onetrainer": "flux",
    "invokeai_flux_kohya": "flux",
    "invokeai_flux_kohya_te1": "flux",
    "invokeai_flux_kohya_te1_te3": "flux",
    "invokeai_flux_lokr_bfl_synthetic": "unknown",
    "invokeai_flux_xlabs": "flux",
    "invokeai_krea2_kohya_excerpt": "krea2",
    "invokeai_qwen_image_diffusers_synthetic": {"flux", "flux2-klein-4b", "qwen-image"},  # 3 modules, 3072 wide
    "invokeai_qwen_image_kohya_lokr_synthetic": "unknown",
    "li_flux1_aitoolkit_diffusers_daubrez": "flux",
    "li_flux1_kohya_dracofelis": "flux",
    "li_flux2_klein4b_kohya": "flux2-klein-4b",
    "li_flux2_klein9b_aitoolkit": "flux2-klein-9b",
    "li_h3_peft_default": "unknown",
    "li_krea2_aitoolkit": "krea2",
    "li_krea2_aitoolkit_lokr": "krea2",
    "li_ltx23_diffusers": "ltx2",
    "li_qwen_image_lightning": "qwen-image",
    "li_sd15_kohya_add_detail": "sd15",
    "li_sdxl_kohya_anyaxl": "sdxl",
    "li_sdxl_lycoris_loha_gwei": "sdxl",
    "li_wan21_i2v_kohya": "wan-14b",
    "li_wan22_5b_aitoolkit": "wan-5b",
    "sdscripts_flux_aitoolkit_diffusers_block0": "flux",
    "sdscripts_flux_kohya_block0": "flux",
    "sdscripts_flux_xlabs_block0": "flux",
}
KEY_FILES = sorted(LORA_KEYS.glob("*.json")) if LORA_KEYS.is_dir() else []


def _family_ok(family: str, expected: str | set[str]) -> bool:
    if isinstance(expected, set):
        return family in expected
    return family.startswith("unknown:") if expected == "unknown" else family == expected


def test_expected_table_covers_every_layout() -> None:
    if not KEY_FILES:
        pytest.skip("no /work/shared/lora-keys")
    assert {p.stem for p in KEY_FILES} == set(EXPECTED)


# A minimal key parser, enough to check the tables against the real layouts
# without the format readers (test_lora_keys_detection runs the real readers).
_PREFIXES = (("lora_unet_", "unet", True), ("lora_te1_", "te1", True), ("lora_te2_", "te2", True),
             ("lora_te3_", "te3", True), ("lora_te_", "te", True), ("lora_transformer_", "transformer", True),
             ("transformer.", "transformer", False), ("diffusion_model.", "transformer", False),
             ("base_model.model.", None, False))
_ROLE = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha|lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|"
                   r"lora_B\.bias|hada_w[12]_[ab]|lokr_w[12]|dora_scale|lora\.down\.weight|lora\.up\.weight|"
                   r"down\.weight|up\.weight|scale)$")
_DOWN = {"lora_down.weight", "lora_A.weight", "lora_A.default.weight", "lora.down.weight", "down.weight"}
_UP = {"lora_up.weight", "lora_B.weight", "lora_B.default.weight", "lora.up.weight", "up.weight"}


def _shape_only_parse(tensors: dict[str, dict[str, Any]]) -> ParsedLora:
    groups: dict[str, dict[str, list[int]]] = {}
    for key, info in tensors.items():
        m = _ROLE.search(key)
        if m:
            groups.setdefault(key[: m.start()], {})[m.group(1).replace(".default", "")] = info["shape"]
    mods = []
    for name, roles in groups.items():
        comp, path, flat = None, name, False
        for prefix, c, f in _PREFIXES:
            if name.startswith(prefix):
                comp, path, flat = c, name[len(prefix):], f
                break
        if any(shape is None for shape in roles.values()):  # a keys-only layout: shape unknown
            delta: Any = NeedsBase("lora", {})
        elif "lokr_w1" in roles and "lokr_w2" in roles:
            w2 = roles["lokr_w2"]
            delta = Kronecker(zeros(*roles["lokr_w1"]), zeros(w2[0], math.prod(w2[1:])))
        elif "scale" in roles:
            delta = Dense(zeros(*roles["scale"]))
        else:
            up = next((roles[r] for r in roles if r in _UP or r == "hada_w1_a"), None)
            down = next((roles[r] for r in roles if r in _DOWN or r == "hada_w1_b"), None)
            if up is None or down is None:
                continue
            delta = fac(up[0], math.prod(down[1:]))
        mods.append(RawModule(comp, path, flat, delta))
        if "lora_B.bias" in roles:
            mods.append(RawModule(comp, path, flat, Dense(zeros(*roles["lora_B.bias"])), is_bias=True))
    return ParsedLora("shape-only", mods)


@pytest.mark.parametrize("path", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_lora_keys_tables_fit_real_layouts(path: Path) -> None:
    data = json.loads(path.read_text())
    res = families.resolve(_shape_only_parse(data["tensors"]), data.get("metadata"))
    assert _family_ok(res.family, EXPECTED[path.stem]), res.hints
    if not res.family.startswith("unknown:") and data["provenance"] != "synthetic":
        assert not res.unmatched
        expected_mismatch = {"invokeai_flux_control_lora_depth": ["transformer.x_embedder"]}
        assert res.shape_mismatches == expected_mismatch.get(path.stem, [])


# --- through the real readers ----------------------------------------------

_RANK_DIM = {"lora_down.weight": 0, "lora_A.weight": 0, "lora_A.default.weight": 0, "lora.down.weight": 0,
             "down.weight": 0, "lora_up.weight": 1, "lora_B.weight": 1, "lora_B.default.weight": 1,
             "lora.up.weight": 1, "up.weight": 1, "hada_w1_a": 1, "hada_w2_a": 1, "hada_w1_b": 0, "hada_w2_b": 0}


def _small_tensors(tensors: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """Zero-memory stand-ins; LoRA/LoHa ranks cut to 1 so decoders that materialise stay small."""
    out = {}
    for key, info in tensors.items():
        shape = list(info["shape"])
        m = _ROLE.search(key)
        dim = _RANK_DIM.get(m.group(1)) if m else None
        if dim is not None and len(shape) > dim:
            shape[dim] = 1
        out[key] = np.broadcast_to(np.float32(0.01), tuple(shape))
    return out


@pytest.mark.parametrize("path", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_lora_keys_detection(path: Path) -> None:
    formats = pytest.importorskip("lorasearch.formats")
    if not hasattr(formats, "read_source"):  # guard until the readers land; the lead removes it
        pytest.skip("lorasearch.formats.read_source not available yet")
    from lorasearch.formats.base import DictSource, ReadContext

    data = json.loads(path.read_text())
    if any(info["shape"] is None for info in data["tensors"].values()):
        pytest.skip("layout without shapes")
    src = DictSource(_small_tensors(data["tensors"]), dict(data.get("metadata") or {}))
    ld = formats.read_source(src, ReadContext(path=path.name))
    assert _family_ok(ld.family, EXPECTED[path.stem]), ld.metadata.get("family_detection")


@pytest.mark.parametrize("component,path,flat", [
    ("text_encoder", "encoder.layers.{i}.self_attn.q_proj", False),   # transformers 5 CLIPTextModel names
    ("te", "encoder_layers_{i}_self_attn_q_proj", True),
    ("text_encoder", "text_model.encoder.layers.{i}.self_attn.q_proj", False),
])
def test_clip_names_with_and_without_text_model(component: str, path: str, flat: bool) -> None:
    mods = [mod(component, path.format(i=i), 768, 768, flat=flat) for i in range(3)]
    res = families.resolve(parsed(*mods))
    assert res.family == "sd15" and not res.unmatched
    assert res.names[0] == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
