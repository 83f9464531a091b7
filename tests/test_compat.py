"""Base-model inference: partial-LoRA families, base suggestions from neighbours, and ``lorasearch compat``."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from lorasearch.base_inference import base_of, family_candidates, hub_base_model, suggest_base, vote
from lorasearch.cli import app
from lorasearch.compat import check_fit, compat, read_base
from lorasearch.formats import load_lora, read_source
from lorasearch.formats.base import DictSource, ReadContext

GPT2_ADAPTER = "abrhaleyarefaine1997__gpt2-tigrinya-lora__adapter_model__620b62ec.safetensors"
LLAMA_ADAPTER = "merkulovsvt__NLP__lora_model__adapter_model.safetensors"
SD15_LORA = "Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights.safetensors"
SD15_OTHERS = ["Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights.safetensors",
               "huggingface__diffusers__examples__text_to_image__sd-pokemon-model-lora__pytorch_lora_weights.safetensors",
               "Riniii09__IAssignment2__pytorch_lora_weights.safetensors",
               "mvclab-ntust-course__course3-B11115019__pytorch_lora_weights.safetensors"]

# Published configs (shapes only matter; models are built on the meta device).
GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12, "n_head": 12,
               "n_positions": 1024, "vocab_size": 50257}
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256}
SDXL_UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
                    "block_out_channels": [320, 640, 1280],
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    "layers_per_block": 2, "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10],
                    "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
                    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                    "projection_class_embeddings_input_dim": 2816}


def _cfg(tmp_path: Path, name: str, cfg: dict[str, Any]) -> Path:
    p = tmp_path / name / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cfg))
    return p


# ---------------------------------------------------------------------------
# Partial LoRAs: family from the modules they have
# ---------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
from test_families import _small_tensors  # noqa: E402

# layout, keys kept, expected family, families that fit equally (empty: unambiguous)
PARTIAL = [
    ("li_sdxl_kohya_anyaxl", r"^lora_te1_", "sdxl", {"sd15", "sdxl", "sd3", "flux"}),  # CLIP-L only, te1 tag
    ("invokeai_flux_kohya_te1", r"^lora_te1_", "sdxl", {"sd15", "sdxl", "sd3", "flux"}),  # same modules: a tie
    ("li_sd15_kohya_add_detail", r"^lora_te_", "sd15", {"sd15", "sdxl", "sd3", "flux"}),  # te tag: one encoder
    ("li_sdxl_kohya_anyaxl", r"^lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn", "sdxl", set()),
    ("li_sdxl_kohya_anyaxl", r"^lora_unet_down_blocks_1_attentions_0_transformer_blocks_[01]_attn2", "sdxl", set()),
    ("li_sdxl_kohya_anyaxl", r"^lora_unet_mid_block_attentions_0_transformer_blocks_[0-3]_attn1", "sdxl", set()),
    ("li_sdxl_kohya_anyaxl", r"^lora_unet_up_blocks_1_attentions_2_proj_out", "sdxl", set()),
    ("li_sdxl_kohya_anyaxl", r"^lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1", "sd15",
     {"sd15", "sd2", "sdxl"}),  # 640-wide self-attention exists in all three
    ("li_sd15_kohya_add_detail", r"^lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "sd15", set()),
    ("li_sd15_kohya_add_detail", r"attn2_to_[qo]", "sd15", {"sd15", "sd2"}),
    ("li_sd15_kohya_add_detail", r"^lora_unet_down_blocks_0_attentions_0_proj_in", "sd15", {"sd15", "sd2"}),  # 1x1 conv
    ("li_flux1_kohya_dracofelis", r"^lora_unet_single_blocks_3_", "flux", set()),
    ("li_sdxl_lycoris_loha_gwei", r"^lora_unet_output_blocks_0_1", "sdxl", set()),
]


@pytest.mark.parametrize("layout,keep,family,tied", PARTIAL, ids=[f"{p[0]}:{p[1]}" for p in PARTIAL])
def test_partial_lora_family(shared_keys: Path, layout: str, keep: str, family: str, tied: set[str]) -> None:
    data = json.loads((shared_keys / f"{layout}.json").read_text())
    tensors = {k: v for k, v in data["tensors"].items() if re.search(keep, k)}
    ld = read_source(DictSource(_small_tensors(tensors), {}), ReadContext(path=layout))
    fc = family_candidates(ld)
    assert ld.family == family, fc
    assert set(fc["tied"]) == tied and fc["ambiguous"] == bool(tied)
    for c in fc["candidates"]:
        assert c["reason"] and {"family", "names", "shapes", "tied"} <= set(c)


def test_linear_proj_in_is_sd2() -> None:
    """SD2's proj_in is linear, SD1.5's a 1x1 conv: same matrix, the stored kernel rank breaks the tie."""
    z = lambda *s: np.broadcast_to(np.float32(0.01), s)  # noqa: E731
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    ld = read_source(DictSource({f"{m}.lora_down.weight": z(4, 320), f"{m}.lora_up.weight": z(320, 4)}), ReadContext())
    fc = family_candidates(ld)
    assert ld.family == "sd2" and fc["decided_by"] == "layer_kind" and set(fc["tied"]) == {"sd15", "sd2"}


# ---------------------------------------------------------------------------
# Suggestions from neighbours
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("labels,header,expected", [
    (["base:Illustrious XL"], {}, ("Illustrious XL", "label base:Illustrious XL")),
    (["base_model:Laxhar/noobai-XL-1.1"], {}, ("NoobAI XL", "label base_model:Laxhar/noobai-XL-1.1")),
    (["style:ink", "ponyxl"], {}, ("Pony Diffusion V6 XL", "label ponyxl")),
    ([], {"ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors", "ss_base_model_version": "sdxl_base_v1-0"},
     ("Pony Diffusion V6 XL", "ss_sd_model_name=ponyDiffusionV6XL_v6StartWithThisOne.safetensors")),
    ([], {"ss_base_model_version": "sdxl_base_v1-0"}, ("SDXL 1.0", "ss_base_model_version=sdxl_base_v1-0")),
    ([], {"modelspec.architecture": "flux-1-dev/lora"}, ("FLUX.1 dev", "modelspec.architecture=flux-1-dev/lora")),
    ([], {"ss_sd_model_name": "model.ckpt"}, None),
    ([], {}, None),
])
def test_base_of(labels: list[str], header: dict[str, str], expected: tuple[str, str] | None) -> None:
    assert base_of(labels, header) == expected


@pytest.mark.parametrize("neighbours,base,confidence", [
    ([{"base": "A", "score": 0.1}, {"base": "A", "score": 0.1}, {"base": "B", "score": 0.9}, {"base": None}], "A", 0.6667),
    ([{"base": "A", "score": 0.1}, {"base": "B", "score": 0.3}], "B", 0.5),  # tie: larger summed score
    ([{"base": None}], None, 0.0),
])
def test_vote(neighbours: list[dict[str, Any]], base: str | None, confidence: float) -> None:
    v = vote(neighbours)
    assert v["base"] == base and v["confidence"] == confidence


def test_hub_base_model() -> None:
    assert hub_base_model("SDXL 1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_base_model("someone/custom-base") == "someone/custom-base"
    assert hub_base_model("Pony Diffusion V6 XL") is None and hub_base_model(None) is None


@pytest.fixture(scope="module")
def labelled_db(shared_loras: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from indexer.pipeline import run_index

    db = tmp_path_factory.mktemp("basedb") / "db"
    run_index([str(shared_loras / f) for f in SD15_OTHERS[:3]], db, progress=False, labels=["base:Illustrious XL"])
    run_index([str(shared_loras / SD15_OTHERS[3])], db, progress=False, labels=["base:NoobAI XL"])
    return db


def test_suggest_base_votes_among_neighbours(shared_loras: Path, labelled_db: Path) -> None:
    from lorasearch.store import Store

    ld = load_lora(shared_loras / SD15_LORA)
    with Store(labelled_db, create=False, readonly=True) as store:
        s = suggest_base(store, ld, k=4)
    assert s["base"] == "Illustrious XL" and s["confidence"] == 0.75 and s["voters"] == 4
    assert s["hub_base_model"] == "OnomaAIResearch/Illustrious-xl-early-release-v0"
    assert {n["base"] for n in s["neighbours"]} == {"Illustrious XL", "NoobAI XL"}


def test_info_with_db(shared_loras: Path, labelled_db: Path) -> None:
    res = CliRunner().invoke(app, ["info", "--json", "--db", str(labelled_db), "-k", "4", str(shared_loras / SD15_LORA)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["base_suggestion"]["base"] == "Illustrious XL"


# ---------------------------------------------------------------------------
# compat
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lora,config,fits,why", [
    (GPT2_ADAPTER, GPT2_CONFIG, True, None),
    (GPT2_ADAPTER, LLAMA_CONFIG, False, "missing"),
    (LLAMA_ADAPTER, LLAMA_CONFIG, True, None),
    (LLAMA_ADAPTER, {**LLAMA_CONFIG, "hidden_size": 4096, "intermediate_size": 11008}, False, "shape"),
    (SD15_LORA, SDXL_UNET_CONFIG, False, "shape"),
])
def test_compat_config(shared_loras: Path, tmp_path: Path, lora: str, config: dict[str, Any], fits: bool,
                       why: str | None) -> None:
    res = compat(shared_loras / lora, _cfg(tmp_path, "base", config))
    assert res["fits"] is fits, res["message"]
    if why == "missing":
        assert res["missing_count"] == res["checked"] > 0
    if why == "shape":
        assert res["mismatch_count"] > 0


def test_compat_from_safetensors_headers(shared_loras: Path, tmp_path: Path) -> None:
    """A GPT-2 checkpoint without its ``transformer.`` prefix and with Conv1D (in x out) weights."""
    from safetensors.numpy import save_file

    z = lambda *s: np.zeros(s, np.float16)  # noqa: E731
    tensors = {}
    for i in range(12):
        tensors[f"h.{i}.attn.c_attn.weight"] = z(768, 2304)
        tensors[f"h.{i}.attn.c_proj.weight"] = z(768, 768)
        tensors[f"h.{i}.mlp.c_proj.weight"] = z(3072, 768)
        tensors[f"h.{i}.mlp.c_fc.weight"] = z(768, 3072)
    f = tmp_path / "model.safetensors"
    save_file(tensors, str(f))
    res = compat(shared_loras / GPT2_ADAPTER, f)
    assert res["fits"] and res["turned_round"] > 0
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}))
    assert compat(shared_loras / GPT2_ADAPTER, idx)["fits"]
    ld = load_lora(shared_loras / LLAMA_ADAPTER)
    assert not check_fit(ld, read_base(f))["fits"]


def test_compat_cli_exit_codes(shared_loras: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    good = _cfg(tmp_path, "gpt2", GPT2_CONFIG)
    bad = _cfg(tmp_path, "llama", LLAMA_CONFIG)
    r = runner.invoke(app, ["compat", "--json", str(shared_loras / GPT2_ADAPTER), str(good)])
    assert r.exit_code == 0 and json.loads(r.stdout)["fits"] is True
    r = runner.invoke(app, ["compat", str(shared_loras / GPT2_ADAPTER), str(bad)])
    assert r.exit_code == 1 and "DOES NOT FIT" in r.stdout
    r = runner.invoke(app, ["compat", str(shared_loras / GPT2_ADAPTER), str(tmp_path / "missing.json")])
    assert r.exit_code == 2
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    r = runner.invoke(app, ["compat", str(shared_loras / GPT2_ADAPTER), str(junk)])
    assert r.exit_code == 2


def test_compat_pipeline_folder_and_unknown_family(tmp_path: Path) -> None:
    """The bundled tiny-UNet LoRAs (family ``unknown:``, flattened names) against a diffusers pipeline folder."""
    from lorasearch.tinymodels import TINY_UNET_CONFIG

    samples = Path(__file__).resolve().parents[1] / "data" / "samples"
    pipe = tmp_path / "pipe"
    cfg = {"_class_name": "UNet2DConditionModel",
           **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET_CONFIG.items()}}
    _cfg(pipe, "unet", cfg)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    wide = _cfg(tmp_path, "wide", {**cfg, "cross_attention_dim": 64})
    for name in ("tiny_kohya.safetensors", "tiny_peft", "tiny_loha.safetensors"):
        assert compat(samples / name, pipe)["fits"], name
        res = compat(samples / name, wide)
        assert not res["fits"] and res["mismatch_count"] > 0, name
