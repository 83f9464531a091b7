"""lorasearch.embed: views, invariances and the full-sketch re-ranking score."""
from __future__ import annotations

import numpy as np
import pytest

from lorasearch.delta import Dense, Factored, LoraDelta, NeedsBase
from lorasearch.embed import GROUP_VIEWS, VIEWS, Embedding, embed, sketch_cosine, view_name
from lorasearch.frobenius import compare

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
ATTN2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
FF = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {ATTN: (320, 320), ATTN2: (320, 768), FF: (320, 1280), CONV: (320, 2880), TE: (768, 768)}


def lora(seed: int, names: tuple[str, ...] = (ATTN, ATTN2, FF), rank: int = 4, scale: float = 1.0) -> LoraDelta:
    rng = np.random.default_rng(seed)
    mods = {n: Factored(rng.standard_normal((SHAPES[n][0], rank)), rng.standard_normal((rank, SHAPES[n][1])) * 0.1, scale)
            for n in names}
    return LoraDelta("sd15", "synthetic", mods)


def transformed(ld: LoraDelta, seed: int, factor: float = 0.5) -> LoraDelta:
    """Same update up to ``factor``: factors re-parameterised by a random G, cast to fp16."""
    rng = np.random.default_rng(seed)
    mods = {}
    for n, d in ld.modules.items():
        assert isinstance(d, Factored)
        g = rng.standard_normal((d.rank, d.rank)) + 3 * np.eye(d.rank)
        up = (factor * d.up.astype(np.float64) @ g).astype(np.float16)
        down = (np.linalg.inv(g) @ d.down.astype(np.float64)).astype(np.float16)
        mods[n] = Factored(up, down, d.scale)
    return LoraDelta(ld.family, "other", mods)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("names, views", [
    ((ATTN,), {"delta", "style", "style:attention"}),
    ((ATTN, FF), {"delta", "style", "style:attention", "style:feed_forward"}),
    ((FF,), {"delta", "style", "style:feed_forward"}),
    ((CONV,), {"delta", "style", "style:conv"}),
    ((TE, FF), {"delta", "style", "style:text_encoder", "style:attention", "style:feed_forward"}),
    ((TE,), {"delta", "style", "style:text_encoder", "style:attention"}),
])
def test_views_present_only_for_groups_with_modules(names: tuple[str, ...], views: set[str]) -> None:
    emb = embed(lora(0, names), k=4, dim=128)
    assert set(emb.vectors) == views
    assert set(emb.vectors) <= set(VIEWS)
    for v in emb.vectors.values():
        assert v.dtype == np.float32 and v.shape == (128,)
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert set(emb.sketches) == set(names) and all(z.shape == (4, 4) for z in emb.sketches.values())
    assert (emb.family, emb.k, emb.dim) == ("sd15", 4, 128)


def test_vectors_invariant_to_factorisation_scale_and_dtype() -> None:
    a = lora(1)
    b = transformed(a, 2, factor=0.5)
    ea, eb = embed(a, k=8, dim=256), embed(b, k=8, dim=256)
    for v in ea.vectors:
        assert cos(ea.vectors[v], eb.vectors[v]) > 0.999, v
    for n in ea.sketches:
        np.testing.assert_allclose(eb.sketches[n], 0.5 * ea.sketches[n], rtol=0.02, atol=1e-3 * float(np.abs(ea.sketches[n]).max()))
        assert eb.norms[n] == pytest.approx(0.5 * ea.norms[n], rel=0.01)


def test_unrelated_loras_are_far_and_norms_are_sketch_norms() -> None:
    a, b = embed(lora(3), k=8, dim=1024), embed(lora(4), k=8, dim=1024)
    assert abs(cos(a.vectors["delta"], b.vectors["delta"])) < 0.3
    ld = lora(3)
    exact2 = sum(float(np.linalg.norm(d.matrix().astype(np.float64))) ** 2 for d in ld.modules.values())
    for n in ld.modules:
        assert a.norms[n] == pytest.approx(float(np.linalg.norm(a.sketches[n].astype(np.float64))), rel=1e-6)
    # E‖Z‖² = ‖ΔW‖²: over all modules the sketch's squared norm is close to the exact one
    assert sum(v * v for v in a.norms.values()) == pytest.approx(exact2, rel=0.3)


def test_modules_needing_base_are_not_sketched() -> None:
    ld = LoraDelta("sd15", "x", {ATTN: NeedsBase("ia3", {"w": np.ones(320, np.float32)}, shape=(320, 320))})
    emb = embed(ld, k=4, dim=64)
    assert emb.sketches == {} and emb.vectors == {}
    mixed = LoraDelta("sd15", "x", {**ld.modules, FF: Dense(np.ones((320, 1280), np.float32))})
    assert set(embed(mixed, k=4, dim=64).sketches) == {FF}


@pytest.mark.parametrize("view, groups, expected", [
    ("delta", None, "delta"),
    ("delta", ["attention"], "delta"),
    ("style", None, "style"),
    ("style", [], "style"),
    ("style", ["feed_forward"], "style:feed_forward"),
    ("style", ["attention", "conv"], "style"),
])
def test_view_name(view: str, groups: list[str] | None, expected: str) -> None:
    assert view_name(view, groups) == expected


@pytest.mark.parametrize("view, groups", [("paper", None), ("styles", None), ("style", ["mlp"])])
def test_view_name_rejects_unknown(view: str, groups: list[str] | None) -> None:
    with pytest.raises(ValueError):
        view_name(view, groups)


def _tuple(emb: Embedding) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = sorted(emb.sketches)
    return names, np.stack([emb.sketches[n] for n in names]), np.asarray([emb.norms[n] for n in names], np.float32)


def test_sketch_cosine_tracks_exact_cosine() -> None:
    a = lora(5, rank=8)
    # b = a + independent noise of about the same size: exact cosine ~0.7
    noise = lora(7, rank=8)
    b = LoraDelta("sd15", "x", {n: Factored(np.hstack([d.up, noise.modules[n].up]), np.vstack([d.down, noise.modules[n].down]))
                                for n, d in a.modules.items()})
    exact = compare(a, b).cosine
    ea, eb = embed(a, k=16, dim=256), embed(b, k=16, dim=256)
    got, shared = sketch_cosine(_tuple(ea), _tuple(eb), "delta")
    assert shared == 3
    assert got == pytest.approx(exact, abs=0.1)
    assert sketch_cosine(_tuple(ea), _tuple(ea), "delta")[0] == pytest.approx(1.0, abs=1e-6)


def test_sketch_cosine_style_groups_and_disjoint() -> None:
    la = lora(8, (ATTN, FF))
    a = embed(la, k=4, dim=64)
    b_only_ff = embed(LoraDelta("sd15", "x", {FF: la.modules[FF]}), k=4, dim=64)
    assert sketch_cosine(_tuple(a), _tuple(b_only_ff), "style", ["feed_forward"])[0] == pytest.approx(1.0, abs=1e-6)
    full, shared = sketch_cosine(_tuple(a), _tuple(b_only_ff), "style")
    # modules are divided by their exact norms; the ff module is shared, attention only in a
    u = {n: np.asarray(a.sketches[n], np.float64) / a.norms[n] for n in (ATTN, FF)}
    want = float(np.sum(u[FF] ** 2) / np.sqrt(np.sum(u[FF] ** 2) * (np.sum(u[FF] ** 2) + np.sum(u[ATTN] ** 2))))
    assert shared == 1 and full == pytest.approx(want, rel=1e-5)
    other = embed(lora(9, (ATTN2,)), k=4, dim=64)
    assert sketch_cosine(_tuple(a), _tuple(other), "delta") == (None, 0)
    assert set(GROUP_VIEWS) == {"attention", "feed_forward", "conv", "text_encoder"}


@pytest.mark.parametrize("names, rank", [
    ((ATTN, ATTN2, FF), 4),  # small factors: the batched path
    ((ATTN, CONV, TE), 64),  # bigger factors: one module at a time
    ((ATTN, ATTN2, FF, CONV, TE), 1),
])
def test_sketch_and_norms_is_sketch_lora_plus_module_norms_bit_for_bit(names: tuple[str, ...], rank: int) -> None:
    from lorasearch.sketch import module_norms, sketch_and_norms, sketch_lora

    ld = lora(7, names, rank)
    ld.modules["extra#bias"] = Dense(np.arange(320, dtype=np.float32))
    ld.modules["needs"] = NeedsBase("ia3", {"w": np.ones(320, np.float32)}, (320,))
    z, n = sketch_and_norms(ld)
    z0, n0 = sketch_lora(ld), module_norms(ld)
    assert list(z) == list(z0) == list(n) and "needs" not in z
    assert all(np.array_equal(z[m], z0[m]) for m in z) and n == {m: n0[m] for m in z}


@pytest.mark.parametrize("name, groups", [
    (FF, {"feed_forward"}),
    (ATTN, {"attention"}),
    (CONV, {"conv"}),
    ("diffusion_model.down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj", {"feed_forward"}),
    ("diffusion_model.down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", {"attention"}),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", {"feed_forward"}),
    ("transformer.single_transformer_blocks.0.proj_mlp", {"feed_forward"}),
    ("unet.buffer_diffusion", set()),
])
def test_module_groups_of_dotted_and_flattened_names(name: str, groups: set[str]) -> None:
    from lorasearch.sketch import module_groups

    assert set(module_groups(name)) == groups


@pytest.mark.parametrize("inner", [4095, 4096, 9000, 23040])
def test_long_products_summed_in_pieces_stay_exact(inner: int) -> None:
    """Sketch products with a long inner dimension (summed from pieces) match float64 to float32 rounding."""
    from lorasearch.sketch import module_sketch

    rng = np.random.default_rng(inner)
    d = Factored(rng.standard_normal((inner, 16)).astype(np.float32), rng.standard_normal((16, inner)).astype(np.float32), 0.5)
    L = rng.standard_normal((8, inner)).astype(np.float32)
    R = rng.standard_normal((8, inner)).astype(np.float32)
    want = 0.5 * (L.astype(np.float64) @ d.up.astype(np.float64)) @ (d.down.astype(np.float64) @ R.T.astype(np.float64))
    got = module_sketch(d, L, R)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
