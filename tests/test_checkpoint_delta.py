"""ΔW of full checkpoints against their base: streaming, round-off, naming, layouts, model cards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorasearch.attribution import checkpoint as ck
from lorasearch.attribution import derivatives as dv
from lorasearch.delta import Factored, LoraDelta
from lorasearch.errors import BadInput
from lorasearch.formats import load_lora
from lorasearch.formats.safetensors_file import SafetensorsFile
from lorasearch.samples import TARGETS
from lorasearch.tinymodels import make_tiny_unet


@pytest.fixture(scope="module")
def base_state() -> dict[str, np.ndarray]:
    return dv.unet_state(make_tiny_unet(0))


def random_lora(state: dict[str, np.ndarray], seed: int, tmp: Path, rank: int = 2) -> LoraDelta:
    """A LoRA with random factors on the tiny UNet's attention/ff modules, written as kohya and read back."""
    rng = np.random.default_rng(seed)
    mods = {}
    for k, v in state.items():
        if ".transformer_blocks." in k and any(k.endswith(f".{t}.weight") for t in TARGETS):
            p, q = v.shape
            mods["diffusion_model." + k[: -len(".weight")].replace(".", "_")] = Factored(
                0.05 * rng.standard_normal((p, rank)), rng.standard_normal((rank, q)) / np.sqrt(q), 1.0, v.shape)
    path = dv.write_kohya(LoraDelta("unknown:x", "test", mods), tmp / f"lora{seed}.safetensors")
    return load_lora(path)


@pytest.fixture(scope="module")
def loras(base_state: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> list[LoraDelta]:
    tmp = tmp_path_factory.mktemp("loras")
    return [random_lora(base_state, s, tmp) for s in range(3)]


def expected(loras: list[LoraDelta], coefs: list[float]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for ld, c in zip(loras, coefs):
        for n, d in ld.modules.items():
            out[n] = out.get(n, 0) + c * d.matrix().astype(np.float64)
    return out


@pytest.mark.parametrize("folder, dtype, tol", [(False, "float32", 1e-6), (True, "float32", 1e-6), (False, "float16", 2e-3)])
def test_delta_is_the_sum_of_the_merged_loras(base_state: dict[str, np.ndarray], loras: list[LoraDelta], tmp_path: Path,
                                              folder: bool, dtype: str, tol: float) -> None:
    coefs = [0.7, -0.4, 1.0]
    ft = dv.write_checkpoint(dv.merged_state(base_state, list(zip(loras, coefs))), tmp_path / "ft", dtype, folder)
    base = dv.write_checkpoint(base_state, tmp_path / "base.safetensors")
    cd = ck.checkpoint_delta(ft if folder else ft, base)
    want = expected(loras, coefs)
    # the modules that changed, and only those, named like the LoRAs' (same unknown: family)
    assert cd.family == loras[0].family and set(cd.shapes) == set(want)
    assert cd.skipped["unchanged"] > 0  # conv, norms' 2-D weights... left untouched; fp16 round-off too
    for name, d in cd.iter_modules():
        scale = np.linalg.norm(want[name])
        assert np.linalg.norm(d.values - want[name]) <= tol * max(scale, 1.0) + (0.02 * scale if dtype == "float16" else 0)


def test_streaming_reads_tensor_by_tensor(base_state: dict[str, np.ndarray], loras: list[LoraDelta], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Both checkpoints are opened without preloading (one tensor at a time), also when ΔW is re-read."""
    ft = dv.write_checkpoint(dv.merged_state(base_state, [(loras[0], 1.0)]), tmp_path / "ft.safetensors")
    base = dv.write_checkpoint(base_state, tmp_path / "base.safetensors")
    seen: list[int] = []

    class Spy(SafetensorsFile):
        def __init__(self, path: Path, *a: object, preload_max: int = 1 << 30, **kw: object) -> None:
            seen.append(preload_max)
            super().__init__(path, *a, preload_max=preload_max, **kw)  # type: ignore[arg-type]

        def _data_section(self):  # type: ignore[no-untyped-def]
            data = super()._data_section()
            assert data is None, "a whole data section was read"
            return data

    monkeypatch.setattr(ck, "SafetensorsFile", Spy)
    cd = ck.checkpoint_delta(ft, base, cache_bytes=0)  # nothing cached: every pass streams
    assert cd._cache is None
    first = {n: d.values.copy() for n, d in cd.iter_modules()}
    again = {n: d.values for n, d in cd.iter_modules()}
    assert seen and set(seen) == {0}
    assert first.keys() == again.keys() and all(np.array_equal(first[n], again[n]) for n in first)


def test_sd15_names_from_a_diffusers_unet(tmp_path: Path) -> None:
    """Diffusers UNet keys resolve to the family's canonical names (``unet.down_blocks...to_q``)."""
    rng = np.random.default_rng(0)
    shapes = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": (320, 768)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ft = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    cd = ck.checkpoint_delta(dv.write_checkpoint(ft, tmp_path / "ft", diffusers_folder=True),
                             dv.write_checkpoint(base, tmp_path / "base", diffusers_folder=True))
    assert cd.family == "sd15"
    assert set(cd.shapes) == {"unet." + k[: -len(".weight")] for k in shapes}


def test_bad_pairs(base_state: dict[str, np.ndarray], tmp_path: Path) -> None:
    base = dv.write_checkpoint(base_state, tmp_path / "base.safetensors")
    with pytest.raises(BadInput, match="beyond round-off"):
        ck.checkpoint_delta(dv.write_checkpoint(base_state, tmp_path / "same.safetensors"), base)
    other = dv.write_checkpoint({"a.weight": np.ones((2, 2), np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(BadInput) as exc:
        ck.checkpoint_delta(other, base)
    assert exc.value.code == "base_mismatch"
    with pytest.raises(BadInput) as exc:
        ck.checkpoint_delta(tmp_path / "missing.safetensors", base)
    assert exc.value.code == "not_found"


@pytest.mark.parametrize("card, want", [
    ("---\nbase_model: runwayml/stable-diffusion-v1-5\ntags: [lora]\n---\n# x", ["runwayml/stable-diffusion-v1-5"]),
    ("---\nbase_model:\n  - a/b\n  - 'c/d'\nlicense: mit\n---\n", ["a/b", "c/d"]),
    ("---\nbase_model: ['a/b', 'c/d']\n---\n", ["a/b", "c/d"]),
    ("---\nlicense: mit\n---\nbase_model: not/front-matter\n", []),
    ("# no front matter\nbase_model: x/y\n", []),
])
def test_model_card_base_model(tmp_path: Path, card: str, want: list[str]) -> None:
    (tmp_path / "README.md").write_text(card)
    assert ck.read_model_card_base(tmp_path / "README.md") == want


@pytest.mark.parametrize("keys, want", [
    (["conv_in.weight", "conv_in.bias", "down_blocks.0.attentions.0.proj_in.weight"], True),
    (["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha"], False),
    (["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"], False),
    (["x.hada_w1_a", "x.hada_w1_b"], False),
    ([], False),
])
def test_checkpoint_or_adapter(keys: list[str], want: bool) -> None:
    assert ck.looks_like_checkpoint(keys) is want
