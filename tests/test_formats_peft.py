"""PEFT adapters: ΔW equals what peft itself merges, for every config feature we read.

Each case builds a tiny model from a config, attaches a peft adapter with
non-zero factors, ``save_pretrained``s it, loads it back with
``PeftModel.from_pretrained`` on an identical base and ``merge_and_unload``s;
the change of each weight is the reference for the reader's delta.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from lorasearch.delta import Factored, Kronecker, NeedsBase
from lorasearch.errors import UnsupportedLayout
from lorasearch.formats import DictSource, ReadContext, load_lora, pick_reader
from lorasearch.formats.base import ParsedLora
from lorasearch.formats.peft import NO_CONFIG_ALPHA, PeftReader, get_pattern_key, strip_adapter_name
from lorasearch.formats.safetensors_file import SafetensorsFile
from lorasearch.tinymodels import make_tiny_unet

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*invalid shape.*"),  # peft mistakes lora_B.bias for an unsharded tensor
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
]

RTOL = 1e-4
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=32)
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- helpers


def tiny_llama(seed: int, **kw: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, **kw))


def tiny_llama_with_bias(seed: int) -> Any:
    return tiny_llama(seed, attention_bias=True)


def tiny_gpt2(seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2))


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapter tensors (B = 0 at init would make every ΔW vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(t in name for t in ("lora_", "hada_", "lokr_", "modules_to_save")) or name.endswith(".bias"):
                if "magnitude" in name:
                    p.mul_(1.0 + 0.1 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def save_adapter(tmp: Path, make: Callable[[int], Any], config: Any, seed: int = 7) -> Path:
    from peft import get_peft_model

    pm = get_peft_model(make(0), config)
    randomise(pm, seed)
    pm.save_pretrained(tmp)
    return tmp


def merged_changes(make: Callable[[int], Any], folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base state dict, merged state dict) after peft loads the folder and merges."""
    from peft import PeftModel

    base = make(0)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return before, {k: v.detach() for k, v in merged.state_dict().items()}


def read_folder(folder: Path, with_config: bool = True) -> ParsedLora:
    src = SafetensorsFile(folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text()) if with_config else None
    reader = pick_reader(src.keys(), src.metadata)
    assert reader.name == "peft"
    return reader.read(src, ReadContext(path=str(folder), peft_config=cfg))


def assert_close(ours: np.ndarray, ref: Any, what: str) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    assert err <= RTOL * max(np.abs(ref).max(), 1e-8), f"{what}: max error {err:.3g} (ref max {np.abs(ref).max():.3g})"


def dora_weight(w0: np.ndarray, dw: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """peft's merged DoRA weight: m * (W0 + ΔW) / ||W0 + ΔW|| per output row."""
    w = w0.astype(np.float64) + dw
    return (magnitude.reshape(-1, 1) / np.linalg.norm(w, axis=1, keepdims=True)) * w


def check_against_merge(parsed: ParsedLora, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                        conv1d: bool = False) -> int:
    """Every reader module reproduces peft's merged weight; returns how many were checked."""
    n = 0
    for m in parsed.modules:
        key = f"{m.path}.{'bias' if m.is_bias else 'weight'}"
        w0, w1 = before[key].numpy(), after[key].numpy()
        if isinstance(m.delta, NeedsBase):
            assert m.delta.method == "replace"
            stored = m.delta.tensors["full_bias" if m.is_bias else "full_weight"]
            assert_close(stored, w1, key)
        elif m.magnitude is not None:
            assert_close(dora_weight(w0, m.delta.matrix(), m.magnitude), w1, key)
        else:
            ours = m.delta.matrix()
            ref = (w1 - w0).T if conv1d and not m.is_bias and ours.shape == (w0.shape[1], w0.shape[0]) else w1 - w0
            assert_close(ours, ref.reshape(ours.shape), key)
        n += 1
    return n


# --------------------------------------------------------------------------- pure helpers

PATTERN_CASES = [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.0.self_attn.q_proj"], "model.layers.10.self_attn.q_proj"),
    (["^model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["^layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    ([r"layers\.[01]\.mlp\..*"], "model.layers.1.mlp.down_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    (["to_k", "attn1.to_k"], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
]


@pytest.mark.parametrize("patterns,key", PATTERN_CASES)
def test_pattern_key_is_peft_semantics(patterns: list[str], key: str) -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key)


@pytest.mark.parametrize("key,expected", [
    ("a.b.lora_A.default.weight", "a.b.lora_A.weight"),
    ("a.b.lora_A.weight", "a.b.lora_A.weight"),
    ("a.lora_B.my-adapter.bias", "a.lora_B.bias"),
    ("wte.lora_embedding_A.default", "wte.lora_embedding_A"),
    ("wte.lora_embedding_B", "wte.lora_embedding_B"),
    ("q.lora_magnitude_vector.default.weight", "q.lora_magnitude_vector.weight"),
    ("q.hada_w1_a.default", "q.hada_w1_a"),
    ("classifier.weight", "classifier.weight"),
])
def test_strip_adapter_name(key: str, expected: str) -> None:
    assert strip_adapter_name(key) == expected


# --------------------------------------------------------------------------- LoRA features vs peft merge


def _lora(**kw: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(**kw)


LORA_CASES: dict[str, tuple[Callable[[int], Any], Callable[[], Any], bool]] = {
    # name: (model factory, config factory, Conv1D model)
    "patterns": (tiny_llama, lambda: _lora(r=4, lora_alpha=8, target_modules=ALL_LLAMA,
                                           rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                           alpha_pattern={"v_proj": 3, r"^model.layers.0.mlp.up_proj": 5}), False),
    "rslora": (tiny_llama, lambda: _lora(r=4, lora_alpha=8, target_modules=ALL_LLAMA, use_rslora=True), False),
    "dora": (tiny_llama, lambda: _lora(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), False),
    "lora_bias": (tiny_llama_with_bias, lambda: _lora(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True), False),
    "bias_lora_only": (tiny_llama_with_bias, lambda: _lora(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="lora_only"), False),
    "embedding_and_modules_to_save": (
        tiny_llama, lambda: _lora(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]), False),
    "gpt2_fan_in_fan_out": (
        tiny_gpt2, lambda: _lora(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), True),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_matches_peft_merge(tmp_path: Path, case: str) -> None:
    make, cfg, conv1d = LORA_CASES[case]
    folder = save_adapter(tmp_path, make, cfg())
    parsed = read_folder(folder)
    before, after = merged_changes(make, folder)
    n = check_against_merge(parsed, before, after, conv1d)
    assert n == len(parsed.modules) > 0
    assert parsed.metadata["alpha_source"].startswith("adapter_config.json")
    if case == "dora":
        assert all(m.magnitude is not None for m in parsed.modules)
    if case in ("lora_bias", "bias_lora_only"):
        biases = [m for m in parsed.modules if m.is_bias]
        assert len(biases) == 2 * LLAMA["num_hidden_layers"]
        assert all(isinstance(m.delta, NeedsBase) == (case == "bias_lora_only") for m in biases)
    if case == "embedding_and_modules_to_save":
        emb = next(m for m in parsed.modules if m.path == "model.embed_tokens")
        assert isinstance(emb.delta, Factored) and emb.delta.shape == (LLAMA["vocab_size"], LLAMA["hidden_size"])
        assert any(isinstance(m.delta, NeedsBase) and m.path == "lm_head" for m in parsed.modules)
    if conv1d:
        assert "fan_in_fan_out" in parsed.metadata
        c_attn = next(m for m in parsed.modules if m.path.endswith("attn.c_attn"))
        assert c_attn.delta.matrix_shape == (3 * GPT2["n_embd"], GPT2["n_embd"])  # out x in, as B @ A


def test_scale_matches_peft_scaling(tmp_path: Path) -> None:
    """Module by module, our scale is the ``scaling`` peft computes from the same config."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    make, cfg, _ = LORA_CASES["patterns"]
    folder = save_adapter(tmp_path, make, cfg())
    parsed = read_folder(folder)
    model = PeftModel.from_pretrained(make(0), folder)
    ref = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    ours = {m.path: m.delta.scale for m in parsed.modules}
    assert ours.keys() == ref.keys()
    assert all(ours[k] == pytest.approx(ref[k], rel=1e-6) for k in ref)
    assert len(set(ours.values())) >= 4  # the patterns really change the scale


def test_peft_on_unet_with_conv(tmp_path: Path) -> None:
    cfg = _lora(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "ff.net.0.proj", "conv1", "conv_in"])
    folder = save_adapter(tmp_path, make_tiny_unet, cfg)
    parsed = read_folder(folder)
    assert {m.component for m in parsed.modules} == {None}
    conv = next(m for m in parsed.modules if m.path == "conv_in")
    assert conv.delta.shape[2:] == (3, 3)
    before, after = merged_changes(make_tiny_unet, folder)
    assert check_against_merge(parsed, before, after) == len(parsed.modules)


def test_without_config_scale_is_one(tmp_path: Path) -> None:
    folder = save_adapter(tmp_path, tiny_llama, _lora(r=4, lora_alpha=8, target_modules=["q_proj"]))
    parsed = read_folder(folder, with_config=False)
    assert parsed.metadata["alpha_source"] == NO_CONFIG_ALPHA
    assert {m.delta.scale for m in parsed.modules} == {1.0}


# --------------------------------------------------------------------------- LoHa / LoKr


def _loha(**kw: Any) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(init_weights=False, **kw)


def _lokr(**kw: Any) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(init_weights=False, **kw)


LYCORIS_CASES = {
    "loha": lambda: _loha(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
    "lokr_full": lambda: _lokr(r=4, alpha=8, target_modules=["q_proj", "gate_proj"]),
    "lokr_factored": lambda: _lokr(r=2, alpha=3, target_modules=["q_proj", "down_proj"], decompose_both=True, decompose_factor=4),
}


@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_loha_lokr_match_peft_merge(tmp_path: Path, case: str) -> None:
    folder = save_adapter(tmp_path, tiny_llama, LYCORIS_CASES[case]())
    parsed = read_folder(folder)
    kind = Kronecker if case.startswith("lokr") else Factored
    assert all(isinstance(m.delta, kind) for m in parsed.modules)
    before, after = merged_changes(tiny_llama, folder)
    assert check_against_merge(parsed, before, after) == len(parsed.modules) > 0
    if case == "lokr_full":  # peft scales alpha/r even when no side is factored
        assert {m.delta.scale for m in parsed.modules} == {2.0}


# --------------------------------------------------------------------------- refusals


def test_unsupported_layouts() -> None:
    r = PeftReader()
    a = np.zeros((4, 8), np.float32)
    cases = [
        (DictSource({"base_model.unilora_theta_d": np.zeros(16, np.float32)}), None, "UniLoRA"),
        (DictSource({"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": a.T,
                     "base_model.model.q.lora_E.weight": np.zeros((4, 1), np.float32)}), None, "AdaLoRA"),
        (DictSource({"base_model.model.q.ia3_l": np.zeros(8, np.float32)}), {"peft_type": "IA3"}, "IA3"),
        (DictSource({"base_model.model.head.weight": a}), None, "without any adapter factors"),
    ]
    for src, cfg, what in cases:
        with pytest.raises(UnsupportedLayout, match=f"unsupported LoRA layout: .*{what}"):
            r.read(src, ReadContext(peft_config=cfg))


@pytest.mark.parametrize("name", [
    "JamesQFreeman__LoRA-ViT__lora.safetensors",
    "JamesQFreeman__LoRA-ViT__feb27.safetensors",
    "MathieuNlp__Sam_LoRA__lora_weights__lora_rank2.safetensors",
    "huggingface__peft__results_glue__adapter_ckpt__adapter_model.safetensors",
])
def test_real_unsupported_files(shared_loras: Path, name: str) -> None:
    with pytest.raises(UnsupportedLayout, match=r"unsupported LoRA layout: .*\(e\.g\. '(w_a_000|base_model\.unilora_theta_d)'\)"):
        load_lora(shared_loras / name)


# --------------------------------------------------------------------------- real files

REAL = [
    # (file stem, factored modules, full-weight modules, scale, family)
    ("Susana2306__Difusor__lora_model__adapter_model", 64, 0, 32 / 8, "sd15"),
    ("bbrokesoul__Text-to-Image-generator__lora_model__adapter_model", 64, 0, 16 / 4, "sd15"),
    ("abrhaleyarefaine1997__gpt2-tigrinya-lora__adapter_model__f9bbefc3", 36, 0, 32 / 8, "llm:gpt2:768"),
    ("ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a1_d0.05_e2__checkpoint-14__adapter_model", 36, 0, 1 / 4, "llm:gpt2:768"),
    ("merkulovsvt__NLP__lora_model__adapter_model", 32, 0, 32 / 8, "llm:llama:2048"),
    ("Tashu014__lora-imdb-distilbert__adapter_model", 12, 4, 16 / 8, None),
    ("huggingface__peft__examples__monteclora_finetuning__monteclora-roberta-mrpc__checkpoint-230__adapter_model",
     24, 4, 16 / 8, None),
    ("Kuntya__Udacity__trainer_peft__adapter_model", 1, 3, 32 / 8, None),
]


@pytest.mark.parametrize("stem,n_factored,n_full,scale,family", REAL)
def test_real_peft_files(shared_loras: Path, stem: str, n_factored: int, n_full: int, scale: float, family: str | None) -> None:
    path = shared_loras / f"{stem}.safetensors"
    ld = load_lora(path)  # picks up the <stem>.adapter_config.json sidecar
    assert ld.format == "peft"
    fac = [d for d in ld.modules.values() if isinstance(d, Factored)]
    full = [d for d in ld.modules.values() if isinstance(d, NeedsBase)]
    assert (len(fac), len(full)) == (n_factored, n_full)
    np.testing.assert_allclose([d.scale for d in fac], scale, rtol=1e-6)
    assert ld.metadata["alpha_source"].startswith("adapter_config.json")
    if family is not None:
        assert ld.family == family
    # the same weights without their config: scale 1, and it says so
    src = SafetensorsFile(path)
    bare = PeftReader().read(src, ReadContext(path=str(path)))
    assert bare.metadata["alpha_source"] == NO_CONFIG_ALPHA
    assert {m.delta.scale for m in bare.modules if isinstance(m.delta, Factored)} == {1.0}


def test_real_quirks(shared_loras: Path) -> None:
    gpt2 = load_lora(shared_loras / f"{REAL[2][0]}.safetensors")
    assert "fan_in_fan_out" in gpt2.metadata
    kuntya = load_lora(shared_loras / f"{REAL[-1][0]}.safetensors")
    assert any("duplicate" in w for w in kuntya.metadata["warnings"])
    assert kuntya.metadata["ignored_reasons"]
    monte = load_lora(shared_loras / f"{REAL[-2][0]}.safetensors")
    assert not monte.metadata.get("warnings")
    sd = load_lora(shared_loras / f"{REAL[0][0]}.safetensors")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in sd.modules
    assert re.match(r"llm:", gpt2.family)
