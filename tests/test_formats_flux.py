"""Flux BFL-named readers: mapping against diffusers' own converters, cross-format identity, real layouts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorasearch import frobenius
from lorasearch.delta import Delta, Dense, Factored, Kronecker, NeedsBase, side_matrix
from lorasearch.formats import DictSource, ReadContext, pick_reader, read_source
from lorasearch.formats.base import ParsedLora
from lorasearch.formats.flux import FORMATS, block_sparse_parts, row_slice, split_rows, swap_halves

H = 3072
# (out, in) of every kohya-Flux module, by its name after the block prefix.
DOUBLE_SHAPES = {
    "img_attn_qkv": (3 * H, H), "img_attn_proj": (H, H), "img_mlp_0": (4 * H, H), "img_mlp_2": (H, 4 * H),
    "img_mod_lin": (6 * H, H), "txt_attn_qkv": (3 * H, H), "txt_attn_proj": (H, H), "txt_mlp_0": (4 * H, H),
    "txt_mlp_2": (H, 4 * H), "txt_mod_lin": (6 * H, H),
}
SINGLE_SHAPES = {"linear1": (7 * H, H), "linear2": (H, 5 * H), "modulation_lin": (3 * H, H)}
TOP_SHAPES = {
    "img_in": (H, 64), "txt_in": (H, 4096), "time_in_in_layer": (H, 256), "time_in_out_layer": (H, H),
    "vector_in_in_layer": (H, 768), "vector_in_out_layer": (H, H), "guidance_in_in_layer": (H, 256),
    "guidance_in_out_layer": (H, H), "final_layer_linear": (64, H), "final_layer_adaLN_modulation_1": (2 * H, H),
}


# --------------------------------------------------------------------------- helpers


def _t(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal(shape) * 0.1).astype(np.float32))


def kohya_flux_sd(rng: np.random.Generator, rank: int = 4, double: tuple[int, ...] = (0, 1),
                  single: tuple[int, ...] = (0, 2)) -> dict[str, torch.Tensor]:
    """A random kohya-Flux LoRA over a few blocks and every top-level module."""
    mods: dict[str, tuple[int, int]] = {}
    for i in double:
        mods.update({f"lora_unet_double_blocks_{i}_{k}": v for k, v in DOUBLE_SHAPES.items()})
    for i in single:
        mods.update({f"lora_unet_single_blocks_{i}_{k}": v for k, v in SINGLE_SHAPES.items()})
    mods.update({f"lora_unet_{k}": v for k, v in TOP_SHAPES.items()})
    sd: dict[str, torch.Tensor] = {}
    for j, (name, (p, q)) in enumerate(mods.items()):
        sd[f"{name}.lora_down.weight"] = _t(rng, rank, q)
        sd[f"{name}.lora_up.weight"] = _t(rng, p, rank)
        # diffusers' converter ignores alpha on final_layer ("TODO: alphas"), so
        # those keep alpha = rank; every other module gets its own alpha.
        alpha = float(rank) if "final_layer" in name else float(1 + j % 7)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items()}


def read(sd: dict[str, Any], metadata: dict[str, str] | None = None) -> ParsedLora:
    src = DictSource(to_numpy(sd) if any(isinstance(v, torch.Tensor) for v in sd.values()) else sd, metadata or {})
    return pick_reader(src.keys(), src.metadata).read(src, ReadContext())


def by_name(parsed: ParsedLora) -> dict[str, Delta]:
    """RawModules keyed as diffusers names (``transformer.<path>`` / ``#bias``)."""
    out: dict[str, Delta] = {}
    for m in parsed.modules:
        name = f"{m.component}.{m.path}" + ("#bias" if m.is_bias else "")
        assert name not in out, f"duplicate module {name}"
        out[name] = m.delta
    return out


def peft_reference(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ΔW per module straight from a converted PEFT dict: (B, A) pairs, bias vectors, full weights."""
    ref: dict[str, Any] = {}
    for k, v in sd.items():
        name = k if k.startswith(("transformer.", "text_encoder")) else f"transformer.{k}"
        if name.endswith(".lora_A.weight"):
            base = name[: -len(".lora_A.weight")]
            ref[base] = (sd[k.replace(".lora_A.", ".lora_B.")].double().numpy(), v.double().numpy())
        elif name.endswith(".lora_B.bias"):
            ref[name[: -len(".lora_B.bias")] + "#bias"] = v.double().numpy()
        elif not name.endswith(".lora_B.weight"):
            ref[name.removesuffix(".weight")] = v.double().numpy()
    return ref


def _kron_apply(d: Kronecker, x: np.ndarray) -> np.ndarray:
    w1, w2 = side_matrix(d.w1).astype(np.float64), side_matrix(d.w2).astype(np.float64)
    c, dd = w1.shape[1], w2.shape[1]
    y = np.einsum("ic,jl,clk->ijk", w1, w2, x.reshape(c, dd, -1))
    return d.scale * y.reshape(w1.shape[0] * w2.shape[0], -1)


def apply(d: Delta, x: np.ndarray) -> np.ndarray:
    """ΔW @ x without forming ΔW (vectors and replacements are returned as they are)."""
    if isinstance(d, Factored):
        return d.scale * (d.up.astype(np.float64) @ (d.down.astype(np.float64) @ x))
    if isinstance(d, Kronecker):
        return _kron_apply(d, x)
    if isinstance(d, NeedsBase):
        return next(iter(d.tensors.values())).astype(np.float64)
    v = d.values.astype(np.float64)
    return v if v.ndim == 1 else v @ x


def ref_apply(r: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(r, tuple):
        b, a = r
        return b @ (a @ x)
    return r


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_matches_reference(ours: dict[str, Delta], ref: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:10]
    rng = np.random.default_rng(1)
    probes: dict[int, np.ndarray] = {}
    for name, d in ours.items():
        if name in skip:
            continue
        q = d.shape[1] if len(d.shape) > 1 and not isinstance(d, NeedsBase) else 0
        x = probes.setdefault(q, rng.standard_normal((q, 3)))
        err = rel_err(apply(d, x), ref_apply(ref[name], x))
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def swap_rows(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]])


# --------------------------------------------------------------------------- (1) against diffusers' converters


def test_kohya_flux_matches_diffusers_converter() -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rng = np.random.default_rng(0)
    sd = kohya_flux_sd(rng, rank=6)
    # sd-scripts' split_qkv writes q, k, v as one block-diagonal fused LoRA.
    up = torch.zeros(3 * H, 6)
    for j in range(3):
        up[j * H:(j + 1) * H, 2 * j:2 * j + 2] = _t(rng, H, 2)
    sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"] = up
    parsed = read(sd)
    assert parsed.format == "kohya-flux" and parsed.family_hint == "flux"
    assert parsed.metadata["block_sparse_split"] == 1
    ours = by_name(parsed)
    ref = peft_reference(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    assert_matches_reference(ours, ref)
    # the block-sparse qkv gets diffusers' own factors back (rank 2 each)
    assert ours["transformer.transformer_blocks.1.attn.add_k_proj"].rank == 2
    assert ours["transformer.transformer_blocks.0.attn.to_q"].rank == 6


def test_xlabs_matches_diffusers_converter() -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    rng = np.random.default_rng(2)
    r = 4
    shapes = {"qkv_lora1": (3 * H, H), "qkv_lora2": (3 * H, H), "proj_lora1": (H, H), "proj_lora2": (H, H)}
    sd: dict[str, torch.Tensor] = {}
    for i in (0, 3):
        for name, (p, q) in shapes.items():
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = _t(rng, r, q)
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = _t(rng, p, r)
    for i in (0, 5):
        for name, (p, q) in {"qkv_lora": (3 * H, H), "proj_lora": (H, 5 * H)}.items():
            sd[f"single_blocks.{i}.processor.{name}.down.weight"] = _t(rng, r, q)
            sd[f"single_blocks.{i}.processor.{name}.up.weight"] = _t(rng, p, r)
    parsed = read(sd)
    assert parsed.format == "xlabs-flux" and parsed.family_hint == "flux"
    ref = peft_reference(_convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    assert_matches_reference(by_name(parsed), ref)


def bfl_control_sd(rng: np.random.Generator, rank: int = 2) -> dict[str, torch.Tensor]:
    """A random BFL control LoRA: all 19 + 38 blocks (diffusers' converter expects them all)."""
    mods: dict[str, tuple[int, int]] = {}
    dotted = {"attn_qkv": "attn.qkv", "attn_proj": "attn.proj", "mlp_0": "mlp.0", "mlp_2": "mlp.2",
              "mod_lin": "mod.lin"}
    for i in range(19):
        for k, shape in DOUBLE_SHAPES.items():
            stream, rest = k.split("_", 1)
            mods[f"double_blocks.{i}.{stream}_{dotted[rest]}"] = shape
    for i in range(38):
        for k, shape in SINGLE_SHAPES.items():
            mods[f"single_blocks.{i}.{k.replace('modulation_lin', 'modulation.lin')}"] = shape
    top = {k.replace("_in_layer", ".in_layer").replace("_out_layer", ".out_layer"): v for k, v in TOP_SHAPES.items()}
    top = {k.replace("final_layer_linear", "final_layer.linear")
            .replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1"): v for k, v in top.items()}
    mods.update(top)
    mods["img_in"] = (H, 128)  # control LoRAs widen the input (64 latent + 64 control channels)
    sd: dict[str, torch.Tensor] = {}
    for name, (p, q) in mods.items():
        sd[f"{name}.lora_A.weight"] = _t(rng, rank, q)
        sd[f"{name}.lora_B.weight"] = _t(rng, p, rank)
        sd[f"{name}.lora_B.bias"] = _t(rng, p)
    for i in range(19):
        for s in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{s}_attn.norm.{n}.scale"] = _t(rng, 128)
    for i in range(38):
        for n in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{n}.scale"] = _t(rng, 128)
    return sd


def test_bfl_control_matches_diffusers_converter() -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    sd = bfl_control_sd(np.random.default_rng(3))
    parsed = read(sd)
    assert parsed.format == "bfl-control-flux" and parsed.family_hint == "flux"
    ours = by_name(parsed)
    ref = peft_reference(_convert_bfl_flux_control_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    # diffusers (0.42) applies swap_scale_shift to lora_A as well as lora_B on
    # norm_out.linear, which permutes the rank axis of A only and changes ΔW;
    # the right update swaps the output rows of B @ A (as its kohya converter does).
    assert_matches_reference(ours, ref, skip=("transformer.norm_out.linear",))
    b = sd["final_layer.adaLN_modulation.1.lora_B.weight"].double().numpy()
    a = sd["final_layer.adaLN_modulation.1.lora_A.weight"].double().numpy()
    x = np.random.default_rng(4).standard_normal((H, 3))
    assert rel_err(apply(ours["transformer.norm_out.linear"], x), swap_rows(b @ (a @ x))) <= 1e-6
    norm = ours["transformer.transformer_blocks.3.attn.norm_added_k"]
    assert isinstance(norm, NeedsBase) and norm.method == "replace" and norm.shape == (128,)
    assert ours["transformer.x_embedder"].shape == (H, 128)


# --------------------------------------------------------------------------- (2) one update, several files


def comfy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya-Flux keys -> ComfyUI ``diffusion_model.`` BFL keys (same tensors, same alphas)."""
    flat_to_dotted = {
        "img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
        "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin", "modulation_lin": "modulation.lin",
        "time_in_in_layer": "time_in.in_layer", "time_in_out_layer": "time_in.out_layer",
        "vector_in_in_layer": "vector_in.in_layer", "vector_in_out_layer": "vector_in.out_layer",
        "guidance_in_in_layer": "guidance_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
        "final_layer_linear": "final_layer.linear", "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
    }
    flat_to_dotted.update({k.replace("img", "txt"): v.replace("img", "txt") for k, v in flat_to_dotted.items()})
    out = {}
    for k, v in sd.items():
        mod, suffix = k.split(".", 1)
        flat = mod[len("lora_unet_"):]
        for kind in ("double_blocks", "single_blocks"):
            if flat.startswith(kind + "_"):
                idx, rest = flat[len(kind) + 1:].split("_", 1)
                flat = f"{kind}.{idx}.{flat_to_dotted.get(rest, rest)}"
        out[f"diffusion_model.{flat_to_dotted.get(flat, flat)}.{suffix}"] = v
    return out


def peft_names(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """kohya-Flux -> diffusers ``transformer.`` PEFT keys by diffusers' own converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    conv = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    return {(k if k.startswith("transformer.") else f"transformer.{k}"): v.numpy() for k, v in conv.items()}


def raw_peft_names(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The same as a raw PEFT ``get_peft_model_state_dict`` on the transformer (``base_model.model.``)."""
    return {"base_model.model." + k[len("transformer."):]: v for k, v in peft_names(sd).items()}


@pytest.mark.parametrize("other", ["comfyui", "diffusers-peft", "peft-raw"])
def test_same_update_in_two_formats(other: str) -> None:
    sd = kohya_flux_sd(np.random.default_rng(5), rank=4, double=(0,), single=(1,))
    a = read_source(DictSource(to_numpy(sd)))
    writers = {"comfyui": lambda s: to_numpy(comfy_names(s)), "diffusers-peft": peft_names, "peft-raw": raw_peft_names}
    b = read_source(DictSource(writers[other](sd)))
    assert a.format == "kohya-flux" and a.family == "flux"
    assert b.format == "bfl-flux" if other == "comfyui" else b.format not in FORMATS
    assert a.family == b.family
    assert set(a.modules) == set(b.modules)
    cmp = frobenius.compare(a, b)
    assert cmp.shared_modules == len(a.modules)
    assert cmp.cosine is not None and cmp.cosine >= 0.9999
    assert cmp.coefficient == pytest.approx(1.0, rel=1e-4)


def test_bf16_safetensors_file_reads_like_memory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lorasearch.formats import load_lora

    sd = comfy_names(kohya_flux_sd(np.random.default_rng(13), 2, (4,), ()))
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    path = tmp_path / "comfy_flux.safetensors"
    save_file(sd, str(path), metadata={"ss_base_model_version": "flux1"})
    ld = load_lora(path)
    mem = read_source(DictSource({k: v.float().numpy() for k, v in sd.items()}))
    assert (ld.format, ld.family) == ("bfl-flux", "flux")
    assert set(ld.modules) == set(mem.modules)
    assert frobenius.compare(ld, mem).cosine == pytest.approx(1.0, abs=1e-6)


def test_same_update_as_xlabs_and_kohya() -> None:
    rng = np.random.default_rng(6)
    r = 3
    qkv_d, qkv_u, proj_d, proj_u = _t(rng, r, H), _t(rng, 3 * H, r), _t(rng, r, 5 * H), _t(rng, H, r)
    x, k = "single_blocks.2.processor.", "lora_unet_single_blocks_2_"
    xlabs = {f"{x}qkv_lora.down.weight": qkv_d, f"{x}qkv_lora.up.weight": qkv_u,
             f"{x}proj_lora.down.weight": proj_d, f"{x}proj_lora.up.weight": proj_u}
    # kohya writes the same q,k,v update on linear1 with zero rows for proj_mlp
    up1 = torch.cat([qkv_u, torch.zeros(4 * H, r)])
    kohya = {f"{k}linear1.lora_down.weight": qkv_d, f"{k}linear1.lora_up.weight": up1,
             f"{k}linear1.alpha": torch.tensor(float(r)),
             f"{k}linear2.lora_down.weight": proj_d, f"{k}linear2.lora_up.weight": proj_u,
             f"{k}linear2.alpha": torch.tensor(float(r))}
    ox, ok = by_name(read(xlabs)), by_name(read(kohya))
    assert set(ox) | {"transformer.single_transformer_blocks.2.proj_mlp"} == set(ok)
    for name, d in ox.items():
        assert frobenius.inner(d, ok[name]) == pytest.approx(frobenius.sq_norm(d), rel=1e-5)
        assert frobenius.sq_norm(ok[name]) == pytest.approx(frobenius.sq_norm(d), rel=1e-5)


# --------------------------------------------------------------------------- row maths on every delta form


def _dense(d: Delta) -> np.ndarray:
    return d.matrix().astype(np.float64)


def _kron(rng: np.random.Generator, a: int, c: int, b: int, d: int, factored: bool = False) -> Kronecker:
    w1 = Factored(rng.standard_normal((a, 2)), rng.standard_normal((2, c))) if factored else rng.standard_normal((a, c))
    return Kronecker(w1, rng.standard_normal((b, d)), 0.5)


@pytest.mark.parametrize(
    "make, dims, exact",
    [
        (lambda r: Factored(r.standard_normal((12, 3)), r.standard_normal((3, 5)), 0.7), [4, 4, 4], True),
        (lambda r: Dense(r.standard_normal((12, 5))), [3, 3, 6], True),
        (lambda r: Dense(r.standard_normal(12)), [4, 4, 4], True),
        (lambda r: _kron(r, 6, 2, 4, 3), [8, 8, 8], True),           # cuts on w2's 4-row blocks
        (lambda r: _kron(r, 6, 2, 4, 3, factored=True), [8, 4, 12], True),
        (lambda r: _kron(r, 4, 2, 6, 3), [8, 8, 8], False),          # 8 is not a multiple of 6: keep fused
    ],
)
def test_split_rows_is_exact(make: Any, dims: list[int], exact: bool) -> None:
    d = make(np.random.default_rng(7))
    parts = split_rows(d, dims)
    if not exact:
        assert parts is None
        return
    assert parts is not None
    np.testing.assert_allclose(np.concatenate([_dense(p) for p in parts]), _dense(d), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: Factored(r.standard_normal((8, 2)), r.standard_normal((2, 3))),
        lambda r: Dense(r.standard_normal(8)),
        lambda r: _kron(r, 4, 2, 2, 3),                 # halves fall on w2 blocks: stays Kronecker
        lambda r: _kron(r, 2, 2, 3, 3, factored=True),  # 3 rows per half, w2 has 3: stays Kronecker
        lambda r: _kron(r, 3, 2, 2, 3),                 # 3 rows per half, w2 has 2: exact dense
    ],
)
def test_swap_halves_is_exact(make: Any) -> None:
    d = make(np.random.default_rng(8))
    s = swap_halves(d)
    assert s is not None
    np.testing.assert_allclose(_dense(s), swap_rows(_dense(d)), rtol=1e-6, atol=1e-9)
    assert row_slice(NeedsBase("oft", {}), 0, 1) is None


def test_block_sparse_needs_exact_zeros() -> None:
    rng = np.random.default_rng(9)
    up = np.zeros((6, 3))
    for j in range(3):
        up[2 * j:2 * j + 2, j] = rng.standard_normal(2)
    f = Factored(up, rng.standard_normal((3, 4)), 2.0)
    parts = block_sparse_parts(f, [2, 2, 2])
    assert parts is not None and [p.rank for p in parts] == [1, 1, 1]
    np.testing.assert_allclose(np.concatenate([_dense(p) for p in parts]), _dense(f), rtol=1e-6)
    up[0, 2] = 1e-3
    assert block_sparse_parts(Factored(up, f.down), [2, 2, 2]) is None


def test_lokr_dora_and_te_on_bfl_names() -> None:
    rng = np.random.default_rng(10)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {
        # LoKr qkv with w2 rows 96: cuts at 3072 are exact
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": f32(96, 48),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": f32(96, 4),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": f32(4, 64),
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": np.float32(2.0),
        # LoKr linear1 with w2 rows 168 (LyCORIS factorisation of 21504): kept fused
        "diffusion_model.single_blocks.0.linear1.lokr_w1": f32(128, 48),
        "diffusion_model.single_blocks.0.linear1.lokr_w2": f32(168, 64),
        # DoRA on a fused LoRA: per-row magnitude is cut with the rows
        "diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight": f32(2, H),
        "diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight": f32(3 * H, 2),
        "diffusion_model.double_blocks.0.txt_attn.qkv.dora_scale": f32(3 * H, 1),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_down.weight": f32(2, 768),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight": f32(3072, 2),
    }
    parsed = read(sd)
    assert parsed.format == "bfl-flux"
    mods = {f"{m.component}.{m.path}": m for m in parsed.modules}
    q = mods["transformer.transformer_blocks.0.attn.to_k"].delta
    assert isinstance(q, Kronecker) and q.scale == pytest.approx(0.5) and q.matrix_shape == (H, H)
    fused = mods["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"].delta
    assert isinstance(fused, Kronecker) and fused.matrix_shape == (7 * H, H)
    assert parsed.metadata["fused_kept"] == [
        "diffusion_model.single_blocks.0.linear1 -> single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    mag = mods["transformer.transformer_blocks.0.attn.add_v_proj"].magnitude
    np.testing.assert_array_equal(mag, sd["diffusion_model.double_blocks.0.txt_attn.qkv.dora_scale"][2 * H:])
    te = mods["te1.text_model.encoder.layers.0.mlp.fc1"]
    assert not te.flat


def test_kohya_text_encoders_stay_kohya_modules() -> None:
    rng = np.random.default_rng(11)
    sd = kohya_flux_sd(rng, rank=2, double=(0,), single=())
    sd.update({
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _t(rng, 2, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _t(rng, 768, 2),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": _t(rng, 2, 4096),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": _t(rng, 4096, 2),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha": torch.tensor(1.0),
    })
    mods = {(m.component, m.path): m for m in read(sd).modules}
    assert mods[("te1", "text_model_encoder_layers_0_self_attn_q_proj")].flat
    te3 = mods[("te3", "encoder_block_0_layer_0_SelfAttention_q")]
    assert te3.flat and te3.delta.scale == pytest.approx(0.5)


# --------------------------------------------------------------------------- (3) real-world layouts


EXPECTED_LAYOUTS = {
    "invokeai_flux_aitoolkit.json": "bfl-flux",
    "invokeai_flux_control_lora_depth.json": "bfl-control-flux",
    "invokeai_flux_kohya.json": "kohya-flux",
    "invokeai_flux_kohya_te1.json": "kohya-flux",
    "invokeai_flux_kohya_te1_te3.json": "kohya-flux",
    "invokeai_flux_lokr_bfl_synthetic.json": "bfl-flux",
    "invokeai_flux_xlabs.json": "xlabs-flux",
    "li_flux1_kohya_dracofelis.json": "kohya-flux",
    "sdscripts_flux_kohya_block0.json": "kohya-flux",
    "sdscripts_flux_xlabs_block0.json": "xlabs-flux",
}
# BFL block names but not Flux.1: must not be read as flux.
NOT_FLUX1 = ["li_flux2_klein4b_kohya.json", "li_flux2_klein9b_aitoolkit.json"]


def layout_source(path: Path, keep_metadata: bool = True) -> DictSource:
    """Tensors of a key layout as zero-copy broadcast views of one random row."""
    doc = json.loads(path.read_text())
    rng = np.random.default_rng(12)
    tensors: dict[str, np.ndarray] = {}
    for k, v in doc["tensors"].items():
        shape = v["shape"]
        if not shape:
            tensors[k] = np.float32(8.0)
        else:
            tensors[k] = np.broadcast_to(rng.standard_normal(shape[-1]).astype(np.float32), shape)
    meta = {k: str(v) for k, v in (doc.get("metadata") or {}).items()} if keep_metadata else {}
    return DictSource(tensors, meta)


@pytest.mark.parametrize("name, fmt", sorted(EXPECTED_LAYOUTS.items()))
def test_flux_layouts_read(shared_keys: Path, name: str, fmt: str) -> None:
    src = layout_source(shared_keys / name)
    reader = pick_reader(src.keys(), src.metadata)
    parsed = reader.read(src, ReadContext())
    assert parsed.format == fmt and parsed.family_hint == "flux"
    transformer = [m for m in parsed.modules if m.component == "transformer"]
    assert transformer and all(not m.flat for m in transformer)
    assert "unmapped_modules" not in parsed.metadata
    if "synthetic" not in name:
        assert "fused_kept" not in parsed.metadata
    names = {m.path for m in transformer}
    if fmt == "kohya-flux":
        assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"} <= names
        assert {m.component for m in parsed.modules} <= {"transformer", "te1", "te3"}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_LAYOUTS if "synthetic" not in n))
def test_flux_layouts_resolve_to_flux(shared_keys: Path, name: str) -> None:
    ld = read_source(layout_source(shared_keys / name))
    found = ld.metadata["family_detection"]
    assert ld.family == "flux" and found["unmatched_count"] == 0
    # only the control LoRA's widened x_embedder (128 input channels) differs from the base shapes
    assert found["shape_mismatches"] == (["transformer.x_embedder"] if "control" in name else [])


@pytest.mark.parametrize("name", ["invokeai_flux_dora_onetrainer.json", "invokeai_flux_dora_lora_transformer.json"])
def test_onetrainer_flux_resolves_through_kohya(shared_keys: Path, name: str) -> None:
    ld = read_source(layout_source(shared_keys / name))
    assert ld.format not in FORMATS and ld.family == "flux"
    assert "transformer.transformer_blocks.0.attn.to_q" in ld.modules and ld.magnitudes


@pytest.mark.parametrize("name", NOT_FLUX1)
@pytest.mark.parametrize("keep_metadata", [True, False])
def test_flux2_layouts_are_not_flux1(shared_keys: Path, name: str, keep_metadata: bool) -> None:
    src = layout_source(shared_keys / name, keep_metadata)
    parsed = pick_reader(src.keys(), src.metadata).read(src, ReadContext())
    assert parsed.format not in FORMATS and parsed.family_hint != "flux"
    assert not any(m.path.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in parsed.modules)


def test_shapes_outrank_wrong_metadata() -> None:
    sd = kohya_flux_sd(np.random.default_rng(14), rank=2, double=(0,), single=())
    assert read(sd, {"ss_base_model_version": "flux2_klein_4b"}).format == "kohya-flux"


def test_hunyuan_names_are_not_flux() -> None:
    keys = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_0_img_mod_linear.lora_down.weight"]
    dotted = ["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
              "diffusion_model.single_blocks.0.linear1.lora_A.weight"]
    from lorasearch.formats.base import readers

    flux_readers = [r for r in readers() if r.name in FORMATS]
    assert not any(r.matches(keys, {}) or r.matches(dotted, {}) for r in flux_readers)
