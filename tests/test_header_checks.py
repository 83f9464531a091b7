"""Header-vs-weights checks (lorasearch.header_checks) and ``info``'s checks / training output."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save, save_file
from typer.testing import CliRunner

from lorasearch.cli import app
from lorasearch.formats import load_lora
from lorasearch.header_checks import EMPTY_SHA256, check_header, top_tags, training_info

AI_TOOLKIT = "leighwoods__public-loras__lora.safetensors"


# ---------------------------------------------------------------------------
# sd-scripts' own definitions, written out here so the checks are tested
# against the writer's algorithm, not against themselves
# ---------------------------------------------------------------------------


def sdscripts_hashes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[str, str]:
    """train_util.precalculate_safetensors_hashes: (addnet hash, legacy hash) of the ss_*-only file."""
    b = io.BytesIO(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


def sai_hash(tensors: dict[str, np.ndarray]) -> str:
    """sai_model_spec.precalculate_safetensors_hashes: tensor bytes in state-dict order."""
    h = hashlib.sha256()
    for t in tensors.values():
        b = save({"tensor": t})
        n = int.from_bytes(b[:8], "little")
        h.update(b[8 + n:])
    return "0x" + h.hexdigest()


def layout_tensors(shared_keys: Path, name: str, keep: str, alpha: float | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Real key names and shapes of a /work/shared/lora-keys layout (subset), random fp16 values."""
    data = json.loads((shared_keys / f"{name}.json").read_text())
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, info in sorted(data["tensors"].items()):
        if not re.search(keep, key):
            continue
        if key.endswith(".alpha"):
            if alpha is not None:
                out[key] = np.array(alpha, dtype=np.float16)
            continue
        out[key] = (rng.standard_normal(info["shape"]) * 0.01).astype(np.float16)
    return out


def write(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str], hashes: str = "right",
          after: dict[str, str] | None = None, modelspec: bool | str = False) -> Path:
    """Save like sd-scripts: hash the ss_* file, then write with the hashes (and later edits) in the header."""
    meta = dict(meta)
    model, legacy = sdscripts_hashes(tensors, meta)
    if hashes == "empty":
        model, legacy = EMPTY_SHA256, EMPTY_SHA256[:8]
    if hashes != "none":
        meta.update(sshs_model_hash=model, sshs_legacy_hash=legacy)
    if modelspec:  # "shuffled": the writer's state-dict order is neither file nor name order
        order = list(tensors)[::-1] if modelspec == "shuffled" else list(tensors)
        meta["modelspec.hash_sha256"] = sai_hash({k: tensors[k] for k in order})
    meta.update(after or {})
    save_file(tensors, str(path), meta)
    return path


SD15_KEEP = r"^lora_unet_(down|up)_blocks_1_attentions_0_transformer_blocks_0_attn"
SD15_META = {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16",
             "ss_base_model_version": "sd_v1", "ss_output_name": "detail",
             "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 3}, "2_reg": {"dog": 5, "grass": 1}})}

# name, layout, keep, alpha, metadata, write options, tensor edit after hashing, expected {field: ok}
CASES: list[tuple[str, str, str, float | None, dict[str, str], dict[str, Any], bool, dict[str, bool | None]]] = [
    ("honest sd-scripts file", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0, SD15_META, {"modelspec": True}, False,
     {"sshs_model_hash": True, "sshs_legacy_hash": True, "modelspec.hash_sha256": True, "ss_base_model_version": True,
      "ss_network_dim": True, "ss_network_alpha": True}),
    ("non-ss metadata edited afterwards", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0, SD15_META,
     {"after": {"modelspec.title": "renamed by a user", "modelspec.trigger_phrase": "sks dog, detailed"}}, False,
     {"sshs_model_hash": True, "sshs_legacy_hash": True}),
    ("modelspec hash in an unknown state-dict order", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0, SD15_META,
     {"modelspec": "shuffled"}, False, {"sshs_model_hash": True, "modelspec.hash_sha256": None}),
    ("empty-string hash (trainer bug)", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0, SD15_META, {"hashes": "empty"},
     False, {"sshs_model_hash": False, "sshs_legacy_hash": False}),
    ("tensors changed after hashing", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0, SD15_META, {"modelspec": True},
     True, {"sshs_model_hash": False, "sshs_legacy_hash": False, "modelspec.hash_sha256": None}),
    ("wrong base label", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0,
     SD15_META | {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
     {"hashes": "none"}, False, {"ss_base_model_version": False, "modelspec.architecture": False}),
    ("dim and alpha claims wrong", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0,
     SD15_META | {"ss_network_dim": "64", "ss_network_alpha": "8"}, {"hashes": "none"}, False,
     {"ss_network_dim": False, "ss_network_alpha": False}),
    ("no alpha tensors (alpha = rank)", "li_sd15_kohya_add_detail", SD15_KEEP, None, SD15_META, {"hashes": "none"}, False,
     {"ss_network_dim": True, "ss_network_alpha": False}),
    ("dynamic rank after a resize", "li_sd15_kohya_add_detail", SD15_KEEP, 16.0,
     SD15_META | {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}, {"hashes": "none"}, False,
     {"ss_network_dim": None, "ss_network_alpha": None}),
    ("SDXL LoHa, CLIP-L modules only", "li_sdxl_lycoris_loha_gwei", r"^lora_te1_text_model_encoder_layers_[01]_", 16.0,
     {"ss_base_model_version": "sdxl_base_v0-9", "ss_network_module": "lycoris.kohya",
      "ss_network_args": '{"conv_dim": "8", "conv_alpha": "4", "use_cp": "True", "algo": "loha"}',
      "ss_network_dim": "32", "ss_network_alpha": "16.0"}, {"hashes": "none"}, False,
     {"ss_base_model_version": True, "ss_network_dim": True, "ss_network_alpha": True}),
    ("Flux kohya block", "li_flux1_kohya_dracofelis", r"^lora_unet_double_blocks_[0-2]_img_attn", 16.0,
     {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux", "ss_network_dim": "2",
      "ss_network_alpha": "16", "modelspec.architecture": "flux-1-dev/lora"}, {"modelspec": True}, False,
     {"sshs_model_hash": True, "ss_base_model_version": True, "modelspec.architecture": True, "ss_network_dim": True,
      "ss_network_alpha": True, "modelspec.hash_sha256": True}),
]


@pytest.mark.parametrize("name,layout,keep,alpha,meta,opts,edit,expected", CASES, ids=[c[0] for c in CASES])
def test_checks_on_layout_files(shared_keys: Path, tmp_path: Path, name: str, layout: str, keep: str,
                                alpha: float | None, meta: dict[str, str], opts: dict[str, Any], edit: bool,
                                expected: dict[str, bool | None]) -> None:
    tensors = layout_tensors(shared_keys, layout, keep, alpha)
    path = tmp_path / "x.safetensors"
    if edit:  # hash the original, then save changed tensors under the old header (a prune / cast / merge)
        write(path, tensors, meta, **opts)
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            header = dict(f.metadata())
        changed = {k: (v * np.float16(2)) if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
        save_file(changed, str(path), header)
    else:
        write(path, tensors, meta, **opts)
    checks = {c["field"]: c for c in check_header(load_lora(path))}
    got = {f: checks[f]["ok"] for f in expected if f in checks}
    assert got == expected, {f: checks.get(f) for f in expected}
    for c in checks.values():
        assert set(c) == {"field", "header", "computed", "ok", "message"} and c["message"]


def test_legacy_hash_window_beyond_a_small_file(tmp_path: Path) -> None:
    """A file under 1 MiB has nothing at the legacy offset: sha256 of nothing is then the right legacy hash."""
    tensors = {"lora_unet_x.lora_down.weight": np.ones((4, 8), np.float16)}
    path = write(tmp_path / "small.safetensors", tensors, {"ss_network_dim": "4"})
    checks = {c["field"]: c for c in check_header(load_lora_unchecked(path))}
    assert checks["sshs_legacy_hash"]["ok"] is True and checks["sshs_legacy_hash"]["header"] == EMPTY_SHA256[:8]
    assert checks["sshs_model_hash"]["ok"] is True


def load_lora_unchecked(path: Path) -> Any:
    """A LoraDelta stand-in for a file no reader needs to understand (only the hash checks run)."""
    from lorasearch.delta import LoraDelta

    return LoraDelta("unknown:0", "test", {}, source={"weights": str(path), "autov3": None},
                     header_metadata={})


def test_real_files_with_header_mismatches(shared_loras: Path) -> None:
    """Across the collected real files only the ai-toolkit Flux file contradicts its header."""
    bad: dict[str, set[str]] = {}
    for p in sorted(shared_loras.glob("*.safetensors")):
        try:
            ld = load_lora(p)
        except Exception:  # noqa: BLE001 - unsupported layouts are other tests' business
            continue
        fails = {c["field"] for c in check_header(ld) if c["ok"] is False}
        if fails:
            bad[p.name] = fails
    assert bad == {AI_TOOLKIT: {"sshs_model_hash", "sshs_legacy_hash", "ss_base_model_version"}}


def test_training_info(shared_loras: Path) -> None:
    ld = load_lora(shared_loras / AI_TOOLKIT)
    info = training_info(ld)
    assert info["trigger_words"] == ["YEW"] and info["output_name"] == "flux_train_replicate"
    assert info["top_tags"] == [["YEW", 1]]
    disney = training_info(load_lora(shared_loras / "cloneofsimo__lora__example_loras__lora_disney.safetensors"))
    assert disney["trigger_words"] == ["<s1>", "<s2>"]


@pytest.mark.parametrize("freq,expected", [
    (json.dumps({"10_a": {"x": 2, "y": 5}, "1_b": {"x": 4}}), [["x", 6], ["y", 5]]),
    ("not json", []),
    (json.dumps({"d": {"x": "bad"}}), []),
    (None, []),
])
def test_top_tags(freq: str | None, expected: list[list[Any]]) -> None:
    assert top_tags(freq) == expected


def test_info_cli_reports_checks(shared_loras: Path) -> None:
    runner = CliRunner()
    path = str(shared_loras / AI_TOOLKIT)
    res = runner.invoke(app, ["info", "--json", path])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    fields = {c["field"]: c["ok"] for c in d["checks"]}
    assert fields["sshs_model_hash"] is False and fields["ss_base_model_version"] is False
    assert d["training"]["trigger_words"] == ["YEW"]
    assert d["family_candidates"]["family"] == "flux"
    res = runner.invoke(app, ["info", path])
    assert res.exit_code == 0 and "MISMATCH" in res.stdout and "triggers   YEW" in res.stdout


@pytest.mark.parametrize("conv_args,expected", [
    ({"conv_dim": "8", "conv_alpha": "4"}, {"ss_network_args.conv_dim": True, "ss_network_args.conv_alpha": True}),
    ({"conv_dim": "16", "conv_alpha": "1"}, {"ss_network_args.conv_dim": False, "ss_network_args.conv_alpha": False}),
])
def test_conv_dim_and_alpha(shared_keys: Path, tmp_path: Path, conv_args: dict[str, str],
                            expected: dict[str, bool]) -> None:
    """LoCon (sd-scripts conv_dim): 3x3 conv modules are checked against conv_dim / conv_alpha, linear ones not."""
    tensors = layout_tensors(shared_keys, "li_sd15_kohya_add_detail", SD15_KEEP, 16.0)
    rng = np.random.default_rng(1)
    for i in range(2):  # real SD1.5 resnet convs: 320 -> 320, 3x3
        m = f"lora_unet_down_blocks_0_resnets_{i}_conv1"
        tensors[f"{m}.lora_down.weight"] = rng.standard_normal((8, 320, 3, 3)).astype(np.float16)
        tensors[f"{m}.lora_up.weight"] = rng.standard_normal((320, 8, 1, 1)).astype(np.float16)
        tensors[f"{m}.alpha"] = np.array(4.0, np.float16)
    meta = SD15_META | {"ss_network_args": json.dumps(conv_args)}
    path = write(tmp_path / "locon.safetensors", dict(sorted(tensors.items())), meta, hashes="none")
    checks = {c["field"]: c["ok"] for c in check_header(load_lora(path))}
    assert {f: checks.get(f) for f in expected} == expected
    assert checks["ss_network_dim"] is True and checks["ss_network_alpha"] is True
