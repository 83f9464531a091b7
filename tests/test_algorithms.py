"""``algorithms.decode_module`` against hand-written numpy formulas (FORMATS.md).

Each case stores random tensors under role names, decodes them, and compares
``delta.matrix()`` (the p x q update, conv flattened) with the formula written
out in float64 here, independently of the decoder. The decoder must also keep
the update factored (LoRA/LoCon/Tucker/LoHa as ``Factored``, LoKr as
``Kronecker``) and report the weight's own shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from lorasearch.delta import Dense, Factored, Kronecker, NeedsBase
from lorasearch.errors import BadInput
from lorasearch.formats.algorithms import AlphaRule, DecodedModule, decode_module

Tensors = dict[str, np.ndarray]
MOD = "lycoris_down_blocks_0_resnets_0_conv1"


def rnd(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def alpha(a: float) -> np.ndarray:
    return np.array(a, np.float32)


def f64(t: Tensors) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in t.items()}


def decode(t: Tensors, rule: AlphaRule | None = None, mod: str = MOD) -> DecodedModule:
    return decode_module(mod, t.__getitem__, {k: k for k in t}, rule or AlphaRule(missing="rank"))


def flat(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """LyCORIS rebuild_tucker: einsum('i j ..., i p, j r -> p r ...', t, wa, wb)."""
    return np.einsum("ij...,ip,jr->pr...", t, wa, wb)


def kron_nd(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """LyCORIS make_kron: w1 unsqueezed to w2's ndim, then kron."""
    return np.kron(w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim)), w2)


# -- cases: (tensors, rule) -> expected p x q update, class, weight shape, rank ----------
# (a Kronecker's rank is the product of its sides' ranks; a factored side counts its inner dim)
@dataclass
class Case:
    id: str
    build: Callable[[np.random.Generator], Tensors]
    formula: Callable[[dict[str, np.ndarray]], np.ndarray]
    kind: type
    shape: tuple[int, ...]
    rank: int
    rule: AlphaRule = field(default_factory=lambda: AlphaRule(missing="rank"))
    algorithm: str = ""


def lora_linear(rng: np.random.Generator) -> Tensors:
    return {"down": rnd(rng, 4, 24), "up": rnd(rng, 16, 4), "alpha": alpha(2.0)}


def locon_3x3(rng: np.random.Generator) -> Tensors:
    return {"down": rnd(rng, 4, 8, 3, 3), "up": rnd(rng, 16, 4, 1, 1), "alpha": alpha(3.0)}


def locon_1x1(rng: np.random.Generator) -> Tensors:
    return {"down": rnd(rng, 4, 8, 1, 1), "up": rnd(rng, 16, 4, 1, 1), "alpha": alpha(1.0)}


def locon_tucker(rng: np.random.Generator) -> Tensors:
    return {"down": rnd(rng, 3, 8, 1, 1), "mid": rnd(rng, 3, 3, 3, 3), "up": rnd(rng, 16, 3, 1, 1), "alpha": alpha(1.5)}


def loha(rng: np.random.Generator) -> Tensors:
    return {"hada_w1_a": rnd(rng, 16, 3), "hada_w1_b": rnd(rng, 3, 24), "hada_w2_a": rnd(rng, 16, 3),
            "hada_w2_b": rnd(rng, 3, 24), "alpha": alpha(2.0)}


def loha_conv(rng: np.random.Generator) -> Tensors:
    return {"hada_w1_a": rnd(rng, 16, 2), "hada_w1_b": rnd(rng, 2, 8 * 9), "hada_w2_a": rnd(rng, 16, 2),
            "hada_w2_b": rnd(rng, 2, 8 * 9), "alpha": alpha(1.0)}


def loha_tucker(rng: np.random.Generator) -> Tensors:
    return {"hada_w1_a": rnd(rng, 3, 16), "hada_w1_b": rnd(rng, 3, 8), "hada_t1": rnd(rng, 3, 3, 3, 3),
            "hada_w2_a": rnd(rng, 3, 16), "hada_w2_b": rnd(rng, 3, 8), "hada_t2": rnd(rng, 3, 3, 3, 3), "alpha": alpha(1.0)}


def lokr(**sides: Callable[[np.random.Generator], Tensors]) -> Callable[[np.random.Generator], Tensors]:
    """A LoKr module from a w1 builder and a w2 builder (alpha 2 is stored in all)."""
    def build(rng: np.random.Generator) -> Tensors:
        t: Tensors = {"alpha": alpha(2.0)}
        for b in sides.values():
            t.update(b(rng))
        return t
    return build


W1_FULL = lambda rng: {"lokr_w1": rnd(rng, 4, 2)}  # noqa: E731  (a=4, c=2)
W1_AB = lambda rng: {"lokr_w1_a": rnd(rng, 4, 3), "lokr_w1_b": rnd(rng, 3, 2)}  # noqa: E731
W2_FULL = lambda rng: {"lokr_w2": rnd(rng, 5, 6)}  # noqa: E731  (b=5, d=6)
W2_CONV = lambda rng: {"lokr_w2": rnd(rng, 5, 6, 3, 3)}  # noqa: E731
W2_AB = lambda rng: {"lokr_w2_a": rnd(rng, 5, 3), "lokr_w2_b": rnd(rng, 3, 6)}  # noqa: E731
W2_AB_CONV = lambda rng: {"lokr_w2_a": rnd(rng, 5, 3), "lokr_w2_b": rnd(rng, 3, 6 * 9)}  # noqa: E731
W2_TUCKER = lambda rng: {  # noqa: E731
    "lokr_w2_a": rnd(rng, 3, 5), "lokr_w2_b": rnd(rng, 3, 6), "lokr_t2": rnd(rng, 3, 3, 3, 3)}


def lokr_formula(t: dict[str, np.ndarray]) -> np.ndarray:
    """s * kron(W1, W2); s = alpha/r with r from the _b factor, 1 when both sides are full."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if "lokr_w2_b" in t:
        s = float(t["alpha"]) / t["lokr_w2_b"].shape[0]
    elif "lokr_w1_b" in t:
        s = float(t["alpha"]) / t["lokr_w1_b"].shape[0]
    else:
        s = 1.0
    return s * flat(kron_nd(w1, w2))


def loha_formula(t: dict[str, np.ndarray]) -> np.ndarray:
    s = float(t["alpha"]) / t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        half1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        half2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return s * flat(half1 * half2)
    return s * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


CASES = [
    Case("lora_linear", lora_linear, lambda t: float(t["alpha"]) / 4 * t["up"] @ t["down"], Factored, (16, 24), 4,
         algorithm="lora"),
    Case("lora_no_alpha_rank_rule", lambda rng: {k: v for k, v in lora_linear(rng).items() if k != "alpha"},
         lambda t: t["up"] @ t["down"], Factored, (16, 24), 4),
    Case("lora_config_alpha", lambda rng: {k: v for k, v in lora_linear(rng).items() if k != "alpha"},
         lambda t: 8 / 4 * t["up"] @ t["down"], Factored, (16, 24), 4, AlphaRule(alpha=8.0, missing="one")),
    Case("lora_rslora", lora_linear, lambda t: float(t["alpha"]) / 2 * t["up"] @ t["down"], Factored, (16, 24), 4,
         AlphaRule(rslora=True)),
    # conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3) == einsum over r
    Case("locon_3x3", locon_3x3, lambda t: 3 / 4 * flat(np.einsum("or,rikl->oikl", t["up"][:, :, 0, 0], t["down"])),
         Factored, (16, 8, 3, 3), 4),
    Case("locon_1x1", locon_1x1, lambda t: 1 / 4 * t["up"][:, :, 0, 0] @ t["down"][:, :, 0, 0],
         Factored, (16, 8, 1, 1), 4),
    Case("locon_tucker", locon_tucker,
         lambda t: 1.5 / 3 * flat(np.einsum("ijkl,jr,ip->prkl", t["mid"], flat(t["down"]), flat(t["up"]).T)),
         Factored, (16, 8, 3, 3), 3),
    Case("loha", loha, loha_formula, Factored, (16, 24), 9, algorithm="loha"),
    Case("loha_conv_flat", loha_conv, loha_formula, Factored, (16, 72), 4),
    Case("loha_tucker", loha_tucker, loha_formula, Factored, (16, 8, 3, 3), 9),
    Case("lokr_w1_w2_full", lokr(a=W1_FULL, b=W2_FULL), lokr_formula, Kronecker, (20, 12), 2 * 5, algorithm="lokr"),
    Case("lokr_w1_w2_conv_full", lokr(a=W1_FULL, b=W2_CONV), lokr_formula, Kronecker, (20, 12, 3, 3), 2 * 5),
    Case("lokr_w1_w2ab", lokr(a=W1_FULL, b=W2_AB), lokr_formula, Kronecker, (20, 12), 2 * 3),
    Case("lokr_w1_w2ab_conv", lokr(a=W1_FULL, b=W2_AB_CONV), lokr_formula, Kronecker, (20, 12 * 9), 2 * 3),
    Case("lokr_w1ab_w2_full", lokr(a=W1_AB, b=W2_FULL), lokr_formula, Kronecker, (20, 12), 3 * 5),
    Case("lokr_w1ab_w2_conv", lokr(a=W1_AB, b=W2_CONV), lokr_formula, Kronecker, (20, 12, 3, 3), 3 * 5),
    Case("lokr_w1ab_w2ab", lokr(a=W1_AB, b=W2_AB), lokr_formula, Kronecker, (20, 12), 3 * 3),
    Case("lokr_w1_tucker", lokr(a=W1_FULL, b=W2_TUCKER), lokr_formula, Kronecker, (20, 12, 3, 3), 2 * 3),
    Case("lokr_w1ab_tucker", lokr(a=W1_AB, b=W2_TUCKER), lokr_formula, Kronecker, (20, 12, 3, 3), 3 * 3),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decode_matches_formula(case: Case) -> None:
    t = case.build(np.random.default_rng(len(case.id)))
    dec = decode(t, case.rule)
    w = dec.weight
    assert isinstance(w, case.kind), type(w)
    expected = case.formula(f64(t))
    np.testing.assert_allclose(w.matrix(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert tuple(w.shape) == case.shape
    assert w.rank == case.rank
    assert dec.magnitude is None and dec.bias is None
    if case.algorithm:
        assert dec.algorithm == case.algorithm


def test_loha_stays_factored_as_khatri_rao() -> None:
    w = decode(loha(np.random.default_rng(0))).weight
    assert isinstance(w, Factored) and w.up.shape == (16, 9) and w.down.shape == (9, 24)


def test_lokr_sides_stay_factored() -> None:
    w = decode(lokr(a=W1_AB, b=W2_TUCKER)(np.random.default_rng(0))).weight
    assert isinstance(w, Kronecker) and isinstance(w.w1, Factored) and isinstance(w.w2, Factored)
    assert w.w2.matrix_shape == (5, 6 * 9)


@pytest.mark.parametrize("alpha_value", [0.5, 4.0, 16.0])
def test_lokr_both_full_ignores_alpha(alpha_value: float) -> None:
    """LyCORIS forces alpha = r when w1 and w2 are both full: scale 1 whatever is stored."""
    t = lokr(a=W1_FULL, b=W2_FULL)(np.random.default_rng(1))
    t["alpha"] = alpha(alpha_value)
    w = decode(t).weight
    assert isinstance(w, Kronecker) and w.scale == 1.0


def test_full_diff_and_bias() -> None:
    rng = np.random.default_rng(2)
    t = {"diff": rnd(rng, 16, 8, 3, 3), "diff_b": rnd(rng, 16)}
    dec = decode(t)
    assert dec.algorithm == "full"
    assert isinstance(dec.weight, Dense) and dec.weight.shape == (16, 8, 3, 3)
    np.testing.assert_array_equal(dec.weight.matrix(), flat(t["diff"]))
    assert isinstance(dec.bias, Dense)
    np.testing.assert_array_equal(dec.bias.matrix(), t["diff_b"])


def test_norm_weight_and_bias() -> None:
    rng = np.random.default_rng(3)
    t = {"w_norm": rnd(rng, 32), "b_norm": rnd(rng, 32)}
    dec = decode(t)
    assert dec.algorithm == "norm"
    assert isinstance(dec.weight, Dense) and isinstance(dec.bias, Dense)
    np.testing.assert_array_equal(dec.weight.matrix(), t["w_norm"])
    np.testing.assert_array_equal(dec.bias.matrix(), t["b_norm"])


@pytest.mark.parametrize(
    "build,algorithm",
    [(lora_linear, "dora"), (locon_3x3, "dora"), (loha, "loha"), (lokr(a=W1_FULL, b=W2_AB), "lokr")],
    ids=["lora", "locon", "loha", "lokr"],
)
@pytest.mark.parametrize("orientation", ["out", "in"])
def test_dora_scale_is_kept_as_magnitude(
    build: Callable[[np.random.Generator], Tensors], algorithm: str, orientation: str
) -> None:
    """The additive part decodes as without DoRA; ``dora_scale`` comes back as stored."""
    rng = np.random.default_rng(4)
    t = build(rng)
    plain = decode(t).weight
    out_dim = plain.matrix_shape[0]
    mag = rnd(rng, out_dim, 1) if orientation == "out" else rnd(rng, 1, 7)
    dec = decode({**t, "dora_scale": mag})
    assert dec.algorithm == algorithm
    assert dec.magnitude is not None
    np.testing.assert_array_equal(dec.magnitude, mag)
    np.testing.assert_array_equal(dec.weight.matrix(), plain.matrix())


@pytest.mark.parametrize(
    "tensors,method,scale",
    [
        ({"ia3": np.ones(16, np.float32), "on_input": np.array(0.0, np.float32)}, "ia3", 1.0),
        ({"oft_blocks": np.ones((4, 4, 4), np.float32), "alpha": alpha(0.0)}, "oft", 0.0),
        ({"oft_blocks": np.ones((4, 4, 4), np.float32), "rescale": np.ones((16, 1), np.float32),
          "alpha": alpha(1e-3)}, "oft", 1e-3),
        ({"oft_blocks": np.ones((2, 4, 4, 4), np.float32), "alpha": alpha(0.0)}, "boft", 0.0),
        ({"a1": np.ones((8, 2), np.float32), "a2": np.ones((2, 8), np.float32), "b1": np.ones((16, 2), np.float32),
          "b2": np.ones((2, 8), np.float32), "alpha": alpha(1.0)}, "glora", 0.5),
    ],
    ids=["ia3", "diag_oft", "diag_oft_rescaled", "boft", "glora"],
)
def test_base_dependent_methods_need_base(tensors: Tensors, method: str, scale: float) -> None:
    dec = decode(tensors)
    w = dec.weight
    assert isinstance(w, NeedsBase) and w.method == method and dec.algorithm == method
    assert w.scale == pytest.approx(scale)
    assert set(w.tensors) == set(tensors)  # every stored tensor kept, by role
    for role, v in tensors.items():
        np.testing.assert_array_equal(w.tensors[role], v)


def test_glora_shape_from_b_factors() -> None:
    t = {"a1": np.ones((8, 2, 1, 1), np.float32), "a2": np.ones((2, 8, 1, 1), np.float32),
         "b1": np.ones((16, 2, 1, 1), np.float32), "b2": np.ones((2, 8, 3, 3), np.float32), "alpha": alpha(2.0)}
    w = decode(t).weight
    assert isinstance(w, NeedsBase) and w.shape == (16, 8, 3, 3) and w.scale == 1.0


def test_stray_alpha_is_nothing() -> None:
    dec = decode({"alpha": alpha(4.0)})
    assert dec.weight is None and dec.bias is None


def _drop(build: Callable[[np.random.Generator], Tensors], *roles: str) -> Callable[[np.random.Generator], Tensors]:
    return lambda rng: {k: v for k, v in build(rng).items() if k not in roles}


def _with(
    build: Callable[[np.random.Generator], Tensors], **extra: tuple[int, ...]
) -> Callable[[np.random.Generator], Tensors]:
    return lambda rng: {**build(rng), **{k: rnd(rng, *s) for k, s in extra.items()}}


BAD = [
    ("lora_rank_mismatch", _with(lora_linear, up=(16, 5)), "do not chain"),
    ("lora_up_without_down", _drop(lora_linear, "down"), "no matching down"),
    ("lora_down_without_up", _drop(lora_linear, "up"), "no matching up"),
    ("locon_up_not_1x1", _with(locon_3x3, up=(16, 4, 3, 3)), "1x1"),
    ("locon_tucker_mid_rank", _with(locon_tucker, mid=(4, 4, 3, 3)), "Tucker mid"),
    ("locon_tucker_down_not_1x1", _with(locon_tucker, down=(3, 8, 3, 3)), "1x1"),
    ("loha_half_does_not_chain", _with(loha, hada_w1_b=(4, 24)), "do not chain"),
    ("loha_halves_differ", _with(loha, hada_w2_b=(3, 20)), "halves differ"),
    ("loha_missing_factor", _drop(loha, "hada_w2_b"), "LoHa needs"),
    ("loha_tucker_without_t2", _drop(loha_tucker, "hada_t2"), "hada_t1 and hada_t2"),
    ("loha_tucker_core_mismatch", _with(loha_tucker, hada_t1=(2, 3, 3, 3)), "Tucker core"),
    ("lokr_w1_does_not_chain", _with(lokr(a=W1_AB, b=W2_FULL), lokr_w1_b=(2, 2)), "do not chain"),
    ("lokr_w2_does_not_chain", _with(lokr(a=W1_FULL, b=W2_AB), lokr_w2_b=(4, 6)), "do not chain"),
    ("lokr_tucker_core_mismatch", _with(lokr(a=W1_FULL, b=W2_TUCKER), lokr_t2=(3, 2, 3, 3)), "Tucker core"),
    ("lokr_t2_without_w2_a", _drop(lokr(a=W1_FULL, b=W2_TUCKER), "lokr_w2_a"), "LoKr Tucker needs"),
    ("lokr_no_w1", _drop(lokr(a=W1_FULL, b=W2_FULL), "lokr_w1"), "lokr_w1"),
    ("lokr_no_w2", _drop(lokr(a=W1_FULL, b=W2_FULL), "lokr_w2"), "lokr_w2"),
    ("alpha_not_scalar", _with(lora_linear, alpha=(2,)), "alpha"),
    ("unknown_roles", lambda rng: {"rescale": rnd(rng, 4, 1)}, "no known adapter algorithm"),
]


@pytest.mark.parametrize("build,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_factors_name_the_module(build: Callable[[np.random.Generator], Tensors], fragment: str) -> None:
    t = build(np.random.default_rng(5))
    with pytest.raises(BadInput) as exc:
        decode(t)
    assert exc.value.code == "bad_factors"
    msg = str(exc.value)
    assert fragment in msg and MOD in msg
