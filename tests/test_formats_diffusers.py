"""diffusers readers (legacy attention-processor, current, DiT) and cloneofsimo files.

The reference for every ΔW is diffusers itself: the file is written by
diffusers' own writers, loaded back with ``load_lora_adapter`` /
``load_lora_into_text_encoder`` on a tiny model, fused, and the change of each
weight is compared with the reader's delta.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from lorasearch.delta import Dense, Factored
from lorasearch.errors import UnsupportedLayout
from lorasearch.formats import DictSource, ReadContext, load_lora, pick_reader
from lorasearch.formats.base import ParsedLora, group_by_suffix
from lorasearch.formats.cloneofsimo import CloneofsimoReader, text_encoder_slots, unet_slots
from lorasearch.formats.diffusers import SUFFIX_ROLES, normalise_key, parse_adapter_metadata, split_module
from lorasearch.formats.safetensors_file import SafetensorsFile
from lorasearch.tinymodels import make_tiny_unet

RTOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1"]
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                 max_position_embeddings=16)


# --------------------------------------------------------------------------- helpers


def read_file(path: Path, ctx: ReadContext | None = None) -> ParsedLora:
    src = SafetensorsFile(path)
    return pick_reader(src.keys(), src.metadata).read(src, ctx or ReadContext(path=str(path)))


def deltas(parsed: ParsedLora, component: str | None) -> dict[str, np.ndarray]:
    """Dense ΔW by module path (``#bias`` for bias updates) for one component."""
    out: dict[str, np.ndarray] = {}
    for m in parsed.modules:
        if m.component == component:
            out[m.path + ("#bias" if m.is_bias else "")] = m.delta.matrix()
    return out


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ref = np.asarray(ref, dtype=np.float64).reshape(ours.shape)
    err = np.abs(ours - ref).max()
    assert err <= RTOL * max(np.abs(ref).max(), 1e-8), f"{what}: max error {err:.3g} (ref max {np.abs(ref).max():.3g})"


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B (and bias) so every ΔW is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def fused_changes(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Weight (and bias) change of every peft-wrapped layer after ``fuse_lora``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, np.ndarray] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            base = mod.get_base_layer()
            w = base.weight.detach()
            out[name] = (w - before[name + ".weight"]).reshape(w.shape[0], -1).numpy()
            if getattr(base, "bias", None) is not None and name + ".bias" in before:
                db = (base.bias.detach() - before[name + ".bias"]).numpy()
                if np.abs(db).max() > 0:  # only lora_bias adapters move the bias
                    out[name + "#bias"] = db
    return out


def peft_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, np.ndarray]:
    """peft's own ``get_delta_weight`` per wrapped layer (out x in, conv flattened)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and adapter in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight(adapter).detach()
            out[name] = d.reshape(d.shape[0], -1).numpy()
    return out


def compare_all(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], skip_bias: bool = False) -> None:
    ref_keys = {k for k in ref if not (skip_bias and k.endswith("#bias"))}
    ours_keys = {k for k in ours if not (skip_bias and k.endswith("#bias"))}
    assert ours_keys == ref_keys, f"module sets differ: only ours {sorted(ours_keys - ref_keys)[:3]}, only ref {sorted(ref_keys - ours_keys)[:3]}"
    for k in ref_keys:
        assert_close(ours[k], ref[k], k)
    assert any(np.abs(v).max() > 0 for v in ref.values())


def tiny_clip(seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TE_CONFIG))


def tiny_flux(seed: int) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(2, 2, 4))


def lora_config(**kw: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kw)


def to_legacy(key: str) -> str:
    """A current diffusers UNet key in the attention-processor naming of diffusers <= 0.20."""
    for proj in ("to_q", "to_k", "to_v"):
        key = key.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
    return key.replace(".to_out.0.lora.", ".processor.to_out_lora.")


# --------------------------------------------------------------------------- key naming

KEY_CASES = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
     "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
     None, "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "up"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora.down.weight",
     "text_encoder", "text_model.encoder.layers.3.self_attn.out_proj", "down"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_k_lora.up.weight",
     "text_encoder", "text_model.encoder.layers.3.self_attn.k_proj", "up"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
     "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "down"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
     "unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.lora_magnitude_vector",
     "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "magnitude"),
    ("transformer.single_transformer_blocks.12.proj_out.lora_A.weight",
     "transformer", "single_transformer_blocks.12.proj_out", "down"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_B.default.weight",
     "transformer", "transformer_blocks.0.attn.to_q", "up"),
    ("transformer.x_embedder.lora_B.bias", "transformer", "x_embedder", "up_bias"),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
     "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "down"),
    ("diffusion_model.blocks.0.cross_attn.k.lora_A.weight", None, "blocks.0.cross_attn.k", "down"),
    ("transformer_blocks.0.attn.add_k_proj.lora_down.weight", None, "transformer_blocks.0.attn.add_k_proj", "down"),
    ("transformer_blocks.0.attn.add_k_proj.alpha", None, "transformer_blocks.0.attn.add_k_proj", "alpha"),
    ("token_refiner.refiner_blocks.0.attn.to_k.lora_A.default.weight", None, "token_refiner.refiner_blocks.0.attn.to_k", "down"),
]


@pytest.mark.parametrize("key,component,path,role", KEY_CASES)
def test_key_naming(key: str, component: str | None, path: str, role: str) -> None:
    nk, _ = normalise_key(key)
    groups, rest = group_by_suffix([nk], SUFFIX_ROLES)
    assert not rest, key
    (mod, roles), = groups.items()
    assert split_module(mod) == (component, path)
    assert list(roles) == [role]


@pytest.mark.parametrize("key", [k for k, comp, _, _ in KEY_CASES if "_lora." in k or "lora_linear_layer" in k])
def test_legacy_names_agree_with_diffusers_converters(key: str) -> None:
    """diffusers' own tables (UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT) give the same module."""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if key.startswith("text_encoder"):
        kind = StateDictType.DIFFUSERS if "lora_linear_layer" in key else StateDictType.DIFFUSERS_OLD
        conv = convert_state_dict_to_peft({key: None}, original_type=kind)
    else:
        conv = convert_unet_state_dict_to_peft({key: None})
    (theirs,) = conv
    module = theirs.rsplit(".lora_", 1)[0]
    nk, _ = normalise_key(key)
    groups, _ = group_by_suffix([nk], SUFFIX_ROLES)
    (ours,) = groups
    assert ours == module


@pytest.mark.parametrize("alpha_key", [
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.alpha",  # diffusers network_alphas naming
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.alpha",
    None,
])
def test_legacy_network_alphas(alpha_key: str | None) -> None:
    rng = np.random.default_rng(0)
    base = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    t = {f"{base}.down.weight": rng.standard_normal((4, 8)).astype(np.float32),
         f"{base}.up.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    if alpha_key:
        t[alpha_key] = np.array(2.0, np.float32)
    src = DictSource(t)
    reader = pick_reader(src.keys(), {})
    assert reader.name == "diffusers_legacy"
    (m,) = reader.read(src, ReadContext()).modules
    assert m.path == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert m.delta.scale == (0.5 if alpha_key else 1.0)


def test_adapter_metadata_shapes() -> None:
    flat = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 2})}
    per, warn = parse_adapter_metadata(flat)
    assert per == {"unet": {"r": 4, "lora_alpha": 8}, "text_encoder": {"r": 2}} and not warn
    plain, _ = parse_adapter_metadata({"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}})})
    assert plain == {None: {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}}}
    nested, _ = parse_adapter_metadata({"lora_adapter_metadata": json.dumps({"transformer": {"r": 4, "lora_alpha": 2}})})
    assert nested == {"transformer": {"r": 4, "lora_alpha": 2}}
    _, warn = parse_adapter_metadata({"lora_adapter_metadata": "{not json"})
    assert warn and "not valid JSON" in warn[0]


# --------------------------------------------------------------------------- UNet through diffusers

UNET_VARIANTS = {
    "patterns": dict(cfg=dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"to_k": 2},
                              alpha_pattern={"ff.net.0.proj": 3}), metadata=True),
    "rslora": dict(cfg=dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_rslora=True), metadata=True),
    "no_metadata": dict(cfg=dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS), metadata=False),
}


def save_unet_lora(tmp: Path, cfg: dict[str, Any], metadata: bool, seed: int = 1) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    unet = make_tiny_unet(0)
    unet.add_adapter(lora_config(**cfg))
    randomise_lora(unet, seed)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    md = unet.peft_config["default"].to_dict() if metadata else None
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=md)
    return tmp / "pytorch_lora_weights.safetensors"


def diffusers_unet_reference(path: Path, prefix: str | None = "unet") -> dict[str, np.ndarray]:
    unet = make_tiny_unet(0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=prefix, adapter_name="ref")
    unet.fuse_lora()
    return fused_changes(unet, before)


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_unet_current_matches_diffusers_fuse(tmp_path: Path, variant: str) -> None:
    v = UNET_VARIANTS[variant]
    path = save_unet_lora(tmp_path, v["cfg"], v["metadata"])
    parsed = read_file(path)
    assert parsed.format == "diffusers"
    assert ("lora_adapter_metadata" in parsed.metadata["alpha_source"]) == v["metadata"]
    compare_all(deltas(parsed, "unet"), diffusers_unet_reference(path))


def test_unet_save_lora_adapter_plain_metadata(tmp_path: Path) -> None:
    """A model's own ``save_lora_adapter``: unprefixed keys, the LoraConfig as metadata."""
    unet = make_tiny_unet(0)
    unet.add_adapter(lora_config(r=4, lora_alpha=2, target_modules=UNET_TARGETS, rank_pattern={"attn2.to_v": 3}))
    randomise_lora(unet, 2)
    unet.save_lora_adapter(tmp_path)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    parsed = read_file(path)
    assert {m.component for m in parsed.modules} == {None}
    assert parsed.metadata["adapter_metadata_components"] == ["None"]
    compare_all(deltas(parsed, None), diffusers_unet_reference(path, prefix=None))


@pytest.mark.parametrize("prefixed", [True, False])
def test_unet_legacy_processor_matches_diffusers_fuse(tmp_path: Path, prefixed: bool) -> None:
    from safetensors.torch import load_file, save_file

    cur = save_unet_lora(tmp_path, dict(r=4, lora_alpha=4, target_modules=ATTN_TARGETS), metadata=False)
    sd = load_file(cur)
    legacy = {to_legacy(k if prefixed else k.removeprefix("unet.")): v for k, v in sd.items()}
    assert all(".processor." in k for k in legacy)
    path = tmp_path / "legacy.safetensors"
    save_file(legacy, path, metadata={"format": "pt"})
    parsed = read_file(path)
    assert parsed.format == "diffusers_legacy" and parsed.metadata["layout"] == "legacy attention-processor"
    component = "unet" if prefixed else None
    assert {m.component for m in parsed.modules} == {component}
    compare_all(deltas(parsed, component), diffusers_unet_reference(path, "unet" if prefixed else None))


# --------------------------------------------------------------------------- text encoder through diffusers


def te_reference(state: dict[str, torch.Tensor], metadata: dict[str, Any] | None) -> dict[str, np.ndarray]:
    from diffusers import StableDiffusionPipeline

    te = tiny_clip(0)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, None, te, prefix="text_encoder", adapter_name="ref",
                                                        metadata=metadata)
    return peft_deltas(te, "ref")


@pytest.mark.parametrize("legacy", [False, True])
def test_text_encoder_matches_diffusers(tmp_path: Path, legacy: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    te = tiny_clip(0)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"] + ([] if legacy else ["fc1"])
    te.add_adapter(lora_config(r=4, lora_alpha=4 if legacy else 12, target_modules=targets))
    randomise_lora(te, 3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
    md = None if legacy else te.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path, text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=md)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    sd = load_file(path)
    if legacy:  # diffusers 0.15-0.17 text-encoder naming: to_q_lora ... to_out_lora
        ren = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
        sd = {_rename_te_legacy(k, ren): v for k, v in sd.items()}
        path = tmp_path / "legacy_te.safetensors"
        save_file(sd, path)
    parsed = read_file(path)
    ours = deltas(parsed, "text_encoder")
    file_md = None if legacy else json.loads(SafetensorsFile(path).metadata["lora_adapter_metadata"])
    ref = te_reference(dict(sd), file_md)
    compare_all(ours, ref)
    assert ours.keys() == peft_deltas(te).keys()


def _rename_te_legacy(key: str, ren: dict[str, str]) -> str:
    for new, old in ren.items():
        key = key.replace(f".{new}.lora_linear_layer.", f".{old}.")
    return key


# --------------------------------------------------------------------------- DiT (transformer.) through diffusers


@pytest.mark.filterwarnings("ignore:.*invalid shape.*")  # peft mistakes lora_B.bias for an unsharded tensor
@pytest.mark.parametrize("dora", [False, True])
def test_flux_transformer_prefix_bias_dora(tmp_path: Path, dora: bool) -> None:
    from diffusers import FluxPipeline
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    tr = tiny_flux(0)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "x_embedder", "ff.net.2"]
    tr.add_adapter(lora_config(r=4, lora_alpha=6, target_modules=targets, lora_bias=not dora, use_dora=dora,
                               rank_pattern={"x_embedder": 2}))
    randomise_lora(tr, 5)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(tr),
                                   transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    parsed = read_file(path)
    assert parsed.format == "diffusers" and {m.component for m in parsed.modules} == {"transformer"}
    ours = deltas(parsed, "transformer")
    ref_model = tiny_flux(0)
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref_model.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="ref")
    if not dora:
        assert any(k.endswith("#bias") for k in ours)
        ref_model.fuse_lora()
        compare_all(ours, fused_changes(ref_model, before))
        return
    compare_all(ours, peft_deltas(ref_model, "ref"))
    mags = {m.path: m.magnitude for m in parsed.modules if m.magnitude is not None}
    for name, mod in ref_model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            assert_close(mags[name], mod.lora_magnitude_vector["ref"].weight.detach().numpy(), name)


# --------------------------------------------------------------------------- real files

REAL_FILES = [
    # (file, format, modules, component, family)
    ("Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors",
     "diffusers_legacy", 128, "unet", "sd15"),
    ("wellCh4n__pokemon-diffusers__pytorch_lora_weights.safetensors", "diffusers_legacy", 128, None, "sd15"),
    ("IvanBy12__Imagenes__pytorch_lora_weights.safetensors", "diffusers_legacy", 128, "unet", "sd2"),
    ("Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights.safetensors", "diffusers", 128, "unet", "sd15"),
    ("JustinJiangNext__lora-2.0__pytorch_lora_weights.safetensors", "diffusers", 128, "unet", "sd2"),
    ("vfph55__my_lora__pytorch_lora_weights.safetensors", "diffusers", 128, "unet", "sd2"),
    ("leighwoods__public-loras__lora.safetensors", "diffusers", 4, "transformer", "flux"),
]


@pytest.mark.parametrize("name,fmt,count,component,family", REAL_FILES)
def test_real_diffusers_files(shared_loras: Path, name: str, fmt: str, count: int, component: str | None, family: str) -> None:
    path = shared_loras / name
    parsed = read_file(path)
    assert parsed.format == fmt
    assert len(parsed.modules) == count
    assert {m.component for m in parsed.modules} == {component}
    assert all(isinstance(m.delta, Factored) and m.delta.scale == 1.0 for m in parsed.modules)
    assert parsed.metadata["alpha_source"].startswith("none stored")
    ld = load_lora(path)
    assert ld.family == family and len(ld.modules) == count
    prefix = "transformer." if family == "flux" else "unet."
    assert all(k.startswith(prefix) for k in ld.modules)


def test_legacy_with_and_without_prefix_name_the_same_modules(shared_loras: Path) -> None:
    a = load_lora(shared_loras / REAL_FILES[0][0])
    b = load_lora(shared_loras / REAL_FILES[1][0])
    assert set(a.modules) == set(b.modules)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in a.modules


def _layout_source(shared_keys: Path, name: str) -> DictSource:
    d = json.loads((shared_keys / name).read_text())
    tensors = {k: np.full(v["shape"], 0.01, np.float32) for k, v in d["tensors"].items()}
    return DictSource(tensors, {k: str(v) for k, v in (d.get("metadata") or {}).items()})


LAYOUTS = [
    # (file, reader, modules, component, alpha tensors)
    ("invokeai_flux_diffusers.json", "diffusers", 494, "transformer", False),
    ("invokeai_flux_diffusers_norm_out_hypersd.json", "diffusers", 504, "transformer", False),
    ("li_h3_peft_default.json", "diffusers", 312, None, False),
    ("li_qwen_image_lightning.json", "diffusers", 720, None, True),
    ("li_wan22_5b_aitoolkit.json", "diffusers", 300, None, False),
    ("invokeai_flux_diffusers_base_model_prefix.json", "peft", 381, None, False),
]


@pytest.mark.parametrize("name,reader,count,component,alpha", LAYOUTS)
def test_real_layouts(shared_keys: Path, name: str, reader: str, count: int, component: str | None, alpha: bool) -> None:
    src = _layout_source(shared_keys, name)
    r = pick_reader(src.keys(), src.metadata)
    assert r.name == reader
    parsed = r.read(src, ReadContext())
    assert len(parsed.modules) == count
    assert {m.component for m in parsed.modules} == {component}
    assert not parsed.metadata.get("ignored_count")
    if alpha:
        d = json.loads((shared_keys / name).read_text())["tensors"]
        key = next(k for k in d if k.endswith(".lora_down.weight"))
        rank = d[key]["shape"][0]
        scales = np.array([m.delta.scale for m in parsed.modules])
        np.testing.assert_allclose(scales, 0.01 / rank, rtol=1e-5)


def test_keys_only_layout_picks_diffusers(shared_keys: Path) -> None:
    d = json.loads((shared_keys / "invokeai_flux_diffusers_lora_dot_down_keys_only.json").read_text())
    assert pick_reader(list(d["tensors"]), {}).name == "diffusers"


def test_bfl_names_are_not_diffusers() -> None:
    from lorasearch.formats.diffusers import DiffusersLegacyReader, DiffusersReader

    keys = ["double_blocks.0.img_attn.qkv.lora_A.weight", "double_blocks.0.img_attn.qkv.lora_B.weight"]
    xlabs = ["double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.qkv_lora1.up.weight"]
    for ks in (keys, xlabs, ["diffusion_model.single_blocks.0.linear1.lora_A.weight"]):
        assert not DiffusersReader().matches(ks, {}) and not DiffusersLegacyReader().matches(ks, {})


# --------------------------------------------------------------------------- cloneofsimo

CLONEOFSIMO = [
    ("cloneofsimo__lora__example_loras__analog_svd_rank4.safetensors", 4, []),
    ("cloneofsimo__lora__example_loras__lora_disney.safetensors", 1, ["<s1>", "<s2>"]),
    ("cloneofsimo__lora__example_loras__lora_disney_inpainting.safetensors", 1, ["<s1>", "<s2>"]),
]


@pytest.mark.parametrize("name,rank,tokens", CLONEOFSIMO)
def test_cloneofsimo_real_files(shared_loras: Path, name: str, rank: int, tokens: list[str]) -> None:
    parsed = read_file(shared_loras / name)
    assert parsed.format == "cloneofsimo" and parsed.family_hint == "sd15"
    assert sum(m.component == "unet" for m in parsed.modules) == 144
    assert sum(m.component == "text_encoder" for m in parsed.modules) == 48
    assert {m.delta.rank for m in parsed.modules} == {rank}
    assert parsed.metadata["token_embeddings"] == tokens
    assert parsed.metadata["unet_order"] == "attn1, ff, attn2; down, up, mid"
    paths = [m.path for m in parsed.modules if m.component == "unet"]
    assert paths[4] == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert paths[-1] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    ld = load_lora(shared_loras / name)
    assert ld.family == "sd15" and len(ld.modules) == 192
    fd = ld.metadata["family_detection"]
    assert fd["unmatched_count"] == 0 and not fd["shape_mismatches"]


def _walk(model: torch.nn.Module, ancestors: set[str]) -> list[tuple[str, int, int]]:
    """cloneofsimo's ``_find_modules_v2``: Linear children of target-class modules, in module order."""
    out = []
    for anc_name, anc in model.named_modules():
        if anc.__class__.__name__ in ancestors:
            for n, m in anc.named_modules():
                if isinstance(m, torch.nn.Linear):
                    out.append((f"{anc_name}.{n}", m.out_features, m.in_features))
    return out


def test_cloneofsimo_orders_match_real_module_walks() -> None:
    """The current diffusers / transformers SD1.5 structure walks to one of our candidate orders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    ours = [(s.path, s.out_features, s.in_features) for s in unet_slots(768, True, True, ff_after_attn1=False, mid_last=True)]
    assert _walk(unet, {"CrossAttention", "Attention", "GEGLU"}) == ours
    te_ours = [(s.path, s.out_features, s.in_features) for s in text_encoder_slots(768, 3072, 12, True, True)]
    walked = [(p if p.startswith("text_model.") else "text_model." + p, o, i) for p, o, i in _walk(te, {"CLIPAttention", "CLIPMLP"})]
    assert walked == te_ours


def _cloneofsimo_source(shared_loras: Path, name: str) -> DictSource:
    src = SafetensorsFile(shared_loras / name)
    return DictSource({k: src.get(k) for k in src.keys()}, dict(src.metadata))


def _permute_unet(src: DictSource, order: Callable[[int], int]) -> DictSource:
    t = dict(src.tensors)
    n = sum(k.startswith("unet:") and k.endswith(":down") for k in t)
    for half in ("up", "down"):
        old = {i: src.tensors[f"unet:{i}:{half}"] for i in range(n)}
        for i in range(n):
            t[f"unet:{order(i)}:{half}"] = old[i]
    return DictSource(t, src.metadata)


def test_cloneofsimo_newer_diffusers_order(shared_loras: Path) -> None:
    """A file written with attn1, attn2, ff blocks is laid out in that order."""
    src = _cloneofsimo_source(shared_loras, CLONEOFSIMO[0][0])
    # within each 9-layer block move the ff (index 4) to the end
    reorder = [0, 1, 2, 3, 8, 4, 5, 6, 7]  # old position -> new position
    newer = _permute_unet(src, lambda i: 9 * (i // 9) + reorder[i % 9])
    parsed = CloneofsimoReader().read(newer, ReadContext())
    assert parsed.metadata["unet_order"] == "attn1, attn2, ff; down, up, mid"
    old = {m.path: m.delta.matrix() for m in CloneofsimoReader().read(src, ReadContext()).modules if m.component == "unet"}
    new = {m.path: m.delta.matrix() for m in parsed.modules if m.component == "unet"}
    assert old.keys() == new.keys()
    assert all(np.array_equal(old[k], new[k]) for k in old)


def test_cloneofsimo_misfit_is_refused(shared_loras: Path) -> None:
    src = _cloneofsimo_source(shared_loras, CLONEOFSIMO[0][0])
    swapped = _permute_unet(src, lambda i: {5: 6, 6: 5}.get(i, i) if i < 9 else i)  # attn2.to_q <-> to_k
    with pytest.raises(UnsupportedLayout, match="unsupported LoRA layout: cloneofsimo 'unet'"):
        CloneofsimoReader().read(swapped, ReadContext())
    md = dict(src.metadata, unet=json.dumps(["ResnetBlock2D", "CrossAttention"]))
    with pytest.raises(UnsupportedLayout, match="ResnetBlock2D"):
        CloneofsimoReader().read(DictSource(src.tensors, md), ReadContext())


def test_cloneofsimo_scale_and_values(shared_loras: Path) -> None:
    src = SafetensorsFile(shared_loras / CLONEOFSIMO[1][0])
    parsed = read_file(shared_loras / CLONEOFSIMO[1][0])
    te = [m for m in parsed.modules if m.component == "text_encoder"]
    assert te[0].path == "text_model.encoder.layers.0.self_attn.k_proj"
    assert te[2].path == "text_model.encoder.layers.0.self_attn.q_proj"
    d = te[1].delta
    assert isinstance(d, Factored) and d.scale == 1.0
    ref = src.get("text_encoder:1:up").astype(np.float64) @ src.get("text_encoder:1:down").astype(np.float64)
    assert_close(d.matrix(), ref, "text_encoder:1")
    assert not any(isinstance(m.delta, Dense) for m in parsed.modules)
