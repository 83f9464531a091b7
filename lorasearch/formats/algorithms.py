"""Decoders from one module's stored tensors (by role) to its delta.

Every adapter algorithm in FORMATS.md, independent of how the file names its
keys: LoRA/LoCon (+Tucker mid), LoHa (+Tucker), LoKr (every w1/w2 variant),
full/diff, norms, DoRA magnitudes, and the base-dependent (IA)^3, OFT/BOFT and
GLoRA. Readers map key suffixes to the role names used here.

The maths follows the forward pass of lycoris-lora (checked against v4.1 in
``tests/test_formats_lycoris.py``), which is also what A1111 and ComfyUI apply:
the scale ``alpha/r`` multiplies the update once. Updates stay factored: LoRA,
LoCon, Tucker and LoHa as ``up @ down``, LoKr as a Kronecker product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lorasearch.delta import Delta, Dense, Factored, Kronecker, NeedsBase
from lorasearch.errors import BadInput

Getter = Callable[[str], np.ndarray]

LORA_ROLES = {"down", "up", "mid"}
LOHA_ROLES = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_ROLES = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL_ROLES = {"diff", "diff_b"}
NORM_ROLES = {"w_norm", "b_norm"}
IA3_ROLES = {"ia3", "on_input"}
OFT_ROLES = {"oft_blocks", "rescale", "oft_r"}
GLORA_ROLES = {"a1", "a2", "b1", "b2", "bm"}
EXTRA_ROLES = {"alpha", "dora_scale", "magnitude", "up_bias", "full_weight", "full_bias"}
ALL_ROLES = (
    LORA_ROLES | LOHA_ROLES | LOKR_ROLES | FULL_ROLES | NORM_ROLES | IA3_ROLES | OFT_ROLES | GLORA_ROLES | EXTRA_ROLES
)


@dataclass
class DecodedModule:
    """What one module's tensors decode to."""

    weight: Delta | None
    bias: Delta | None = None
    magnitude: np.ndarray | None = None
    algorithm: str = "lora"


@dataclass(frozen=True)
class AlphaRule:
    """How a format scales the update when the file does or does not store alpha.

    Attributes:
        alpha: alpha from a config (PEFT ``lora_alpha`` after patterns), or None.
        missing: what a missing alpha means: ``"rank"`` (alpha = r, scale 1 —
            kohya/LyCORIS) or ``"one"`` (scale 1 whatever r, diffusers).
        rslora: scale alpha/sqrt(r) instead of alpha/r. Never for LyCORIS
            files: with ``rs_lora`` LyCORIS stores ``alpha*sqrt(r)`` so that the
            plain alpha/r rule gives its scale.
    """

    alpha: float | None = None
    missing: str = "rank"
    rslora: bool = False

    def scale(self, stored_alpha: float | None, rank: int) -> float:
        """The scale for a module of ``rank`` whose file stores ``stored_alpha`` (or None)."""
        a = stored_alpha if stored_alpha is not None else self.alpha
        if a is None:
            return 1.0
        if rank <= 0:
            return 1.0
        return float(a) / (math.sqrt(rank) if self.rslora else rank)


def _chain_error(mod: str, what: str) -> BadInput:
    return BadInput(f"module {mod!r}: {what}", code="bad_factors")


def _shp(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in a.shape)


def _check_1x1(mod: str, name: str, a: np.ndarray) -> None:
    """A conv factor that must act per pixel (LoCon up, Tucker down)."""
    if a.ndim > 2 and any(k != 1 for k in a.shape[2:]):
        raise _chain_error(mod, f"{name} factor must be 1x1, got {_shp(a)}")


def _tucker(mod: str, what: str, t: np.ndarray, out_factor: np.ndarray, in_factor: np.ndarray) -> Factored:
    """``W[p, q, k...] = sum_ij t[i, j, k...] out[p, i] in[j, q]`` as a rank-``i`` factored p x (q*k...) update.

    This is LyCORIS ``rebuild_tucker`` (``einsum('i j ..., i p, j r -> p r ...')``).

    Args:
        mod: module name (for errors).
        what: which factors, for errors.
        t: core ``[r_out, r_in, k...]``.
        out_factor: ``[p, r_out]`` (or ``[p, r_out, 1, 1]``).
        in_factor: ``[r_in, q]`` (or ``[r_in, q, 1, 1]``).
    """
    if t.ndim < 3:
        raise _chain_error(mod, f"{what}: Tucker core must be [r, r, k...], got {_shp(t)}")
    out2d = out_factor.reshape(out_factor.shape[0], -1)
    in2d = in_factor.reshape(in_factor.shape[0], -1)
    if out2d.shape[1] != t.shape[0] or in2d.shape[0] != t.shape[1]:
        raise _chain_error(
            mod, f"{what}: factors do not chain with the Tucker core: {_shp(out_factor)}, {_shp(t)}, {_shp(in_factor)}"
        )
    down = np.einsum("ij...,jq->iq...", t, in2d)  # [r_out, q, k...]
    return Factored(out2d, down.reshape(t.shape[0], -1))


def _khatri_rao(a: Factored, b: Factored) -> Factored:
    """Hadamard product of two factored matrices as one factored matrix of rank ra*rb."""
    p, q = a.up.shape[0], a.down.shape[1]
    up = (a.up[:, :, None] * b.up[:, None, :]).reshape(p, -1)
    down = (a.down[:, None, :] * b.down[None, :, :]).reshape(-1, q)
    return Factored(up, down, a.scale * b.scale)


def _pair(mod: str, what: str, a: np.ndarray, b: np.ndarray) -> Factored:
    """``a @ b`` with a ``[p, r]`` and b ``[r, q...]``, checked."""
    if a.ndim != 2 or b.ndim < 2 or a.shape[1] != b.shape[0]:
        raise _chain_error(mod, f"{what} factors do not chain: {_shp(a)} x {_shp(b)}")
    return Factored(a, b.reshape(b.shape[0], -1))


def _need(mod: str, roles: dict[str, str], need: set[str], algo: str) -> None:
    if not need <= roles.keys():
        raise _chain_error(mod, f"{algo} needs {sorted(need)}, found {sorted(roles)}")


def decode_lora(mod: str, get: Getter, roles: dict[str, str], rule: AlphaRule) -> Delta:
    """LoRA / LoCon: ``s * up @ down``; with a Tucker ``mid``, ``s * rebuild_tucker(mid, up, down)``."""
    down, up = get(roles["down"]), get(roles["up"])
    r = int(down.shape[0])
    if up.ndim < 2 or up.shape[1] != r:
        raise _chain_error(mod, f"factors do not chain: up {_shp(up)} x down {_shp(down)}")
    if up.ndim > 2:
        _check_1x1(mod, "conv up", up)
    up2d = up if up.ndim == 2 else up.reshape(up.shape[0], r)  # the array itself when 2-D already
    scale = rule.scale(_alpha(mod, get, roles), r)
    if "mid" in roles:
        mid = get(roles["mid"])
        if mid.ndim < 3 or mid.shape[0] != r or mid.shape[1] != r:
            raise _chain_error(mod, f"Tucker mid {_shp(mid)} does not chain with rank {r}")
        _check_1x1(mod, "Tucker down", down)
        f = _tucker(mod, "LoCon", mid, up2d, down.reshape(r, -1))
        return Factored(f.up, f.down, scale, (int(up.shape[0]), int(down.shape[1]), *_shp(mid)[2:]))
    shape = (up.shape[0], *down.shape[1:])  # numpy shapes hold Python ints
    return Factored(up2d, down if down.ndim == 2 else down.reshape(r, -1), scale, shape)


def _loha_half(mod: str, get: Getter, roles: dict[str, str], i: int) -> tuple[Factored, int, tuple[int, ...]]:
    """One Hadamard half: (factored matrix, rank, weight shape)."""
    a, b = get(roles[f"hada_w{i}_a"]), get(roles[f"hada_w{i}_b"])
    if f"hada_t{i}" in roles:  # Tucker: w_a [r, out], w_b [r, in], t [r, r, k...]
        t = get(roles[f"hada_t{i}"])
        if a.ndim != 2 or b.ndim != 2:
            raise _chain_error(mod, f"LoHa Tucker half {i} needs 2-D hada_w{i}_a/_b, got {_shp(a)}, {_shp(b)}")
        f = _tucker(mod, f"LoHa half {i}", t, a.T, b)
        return f, int(b.shape[0]), (int(a.shape[1]), int(b.shape[1]), *_shp(t)[2:])
    f = _pair(mod, f"LoHa hada_w{i}_a x hada_w{i}_b", a, b)
    return f, int(b.shape[0]), (int(a.shape[0]), *_shp(b)[1:])


def decode_loha(mod: str, get: Getter, roles: dict[str, str], rule: AlphaRule) -> Delta:
    """LoHa: ``s * (w1a @ w1b) ⊙ (w2a @ w2b)`` as one factored update of rank r1*r2 (Khatri–Rao)."""
    _need(mod, roles, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "LoHa")
    if ("hada_t1" in roles) != ("hada_t2" in roles):
        raise _chain_error(mod, "LoHa Tucker needs both hada_t1 and hada_t2")
    s1, r, shape = _loha_half(mod, get, roles, 1)
    s2, _, _ = _loha_half(mod, get, roles, 2)
    if s1.matrix_shape != s2.matrix_shape:
        raise _chain_error(mod, f"LoHa halves differ in shape: {s1.matrix_shape} vs {s2.matrix_shape}")
    f = _khatri_rao(s1, s2)
    return Factored(f.up, f.down, rule.scale(_alpha(mod, get, roles), r), shape)


def _lokr_w1(mod: str, get: Getter, roles: dict[str, str]) -> tuple[np.ndarray | Factored, int | None]:
    if "lokr_w1" in roles:
        w1 = get(roles["lokr_w1"])
        if w1.ndim < 2 or any(k != 1 for k in w1.shape[2:]):
            raise _chain_error(mod, f"lokr_w1 must be 2-D (or 1x1 conv), got {_shp(w1)}")
        return w1.reshape(w1.shape[0], w1.shape[1]), None
    if {"lokr_w1_a", "lokr_w1_b"} <= roles.keys():
        a, b = get(roles["lokr_w1_a"]), get(roles["lokr_w1_b"])
        return _pair(mod, "lokr_w1_a x lokr_w1_b", a, b), int(b.shape[0])
    raise _chain_error(mod, "LoKr needs lokr_w1 or lokr_w1_a/lokr_w1_b")


def _lokr_w2(
    mod: str, get: Getter, roles: dict[str, str]
) -> tuple[np.ndarray | Factored, int | None, tuple[int, ...]]:
    """The second Kronecker side: (matrix or factored, rank if factored, its kernel dims)."""
    if "lokr_w2" in roles:
        w2 = get(roles["lokr_w2"])  # [b, d] or conv [b, d, k, k]
        if w2.ndim < 2:
            raise _chain_error(mod, f"lokr_w2 must be at least 2-D, got {_shp(w2)}")
        return w2.reshape(w2.shape[0], -1), None, _shp(w2)[2:]
    if "lokr_t2" in roles:  # Tucker: w2_a [r, b], w2_b [r, d], t2 [r, r, k...]
        _need(mod, roles, {"lokr_t2", "lokr_w2_a", "lokr_w2_b"}, "LoKr Tucker")
        t2, a, b = get(roles["lokr_t2"]), get(roles["lokr_w2_a"]), get(roles["lokr_w2_b"])
        if a.ndim != 2 or b.ndim != 2:
            raise _chain_error(mod, f"LoKr Tucker needs 2-D lokr_w2_a/_b, got {_shp(a)}, {_shp(b)}")
        return _tucker(mod, "LoKr w2", t2, a.T, b), int(b.shape[0]), _shp(t2)[2:]
    if {"lokr_w2_a", "lokr_w2_b"} <= roles.keys():
        # conv without Tucker: w2_b is [r, d*k*k] (or [r, d, k, k]); the flat
        # kron(w1, w2) then already is the flattened conv update.
        a, b = get(roles["lokr_w2_a"]), get(roles["lokr_w2_b"])
        return _pair(mod, "lokr_w2_a x lokr_w2_b", a, b), int(b.shape[0]), _shp(b)[2:]
    raise _chain_error(mod, "LoKr needs lokr_w2, lokr_w2_a/lokr_w2_b or lokr_t2")


def decode_lokr(mod: str, get: Getter, roles: dict[str, str], rule: AlphaRule) -> Delta:
    """LoKr: ``s * kron(W1, W2)`` with W1 unsqueezed to W2's ndim for conv; kept as a Kronecker.

    On the flattened ``p x q`` matrix this is ``kron(W1, W2.reshape(b, -1))``:
    column ``(j*d + l)*k*k + s`` of the flat kron is weight ``[.., j*d + l, s]``.
    """
    w1, r1 = _lokr_w1(mod, get, roles)
    w2, r2, kernel = _lokr_w2(mod, get, roles)
    rank = r2 if r2 is not None else r1
    # LyCORIS forces alpha = r when neither side is factored (scale 1), and
    # readers cannot know r then anyway.
    scale = 1.0 if rank is None else rule.scale(_alpha(mod, get, roles), rank)
    k = Kronecker(w1, w2, scale)
    p, q = k.matrix_shape
    # the weight's own shape where the file shows the kernel (4-D w2 or t2)
    k.shape = (p, q // math.prod(kernel), *kernel) if kernel else (p, q)
    return k


def decode_full(mod: str, get: Getter, roles: dict[str, str]) -> DecodedModule:
    w = Dense(get(roles["diff"])) if "diff" in roles else None
    b = Dense(get(roles["diff_b"])) if "diff_b" in roles else None
    return DecodedModule(w, b, algorithm="full")


def decode_norm(mod: str, get: Getter, roles: dict[str, str]) -> DecodedModule:
    w = Dense(get(roles["w_norm"])) if "w_norm" in roles else None
    b = Dense(get(roles["b_norm"])) if "b_norm" in roles else None
    return DecodedModule(w, b, algorithm="norm")


def _needs_base(
    method: str, get: Getter, roles: dict[str, str], note: str, scale: float = 1.0, shape: tuple[int, ...] = ()
) -> NeedsBase:
    tensors = {role: get(key) for role, key in roles.items()}
    return NeedsBase(method, tensors, shape=shape, scale=scale, note=note)


def _alpha(mod: str, get: Getter, roles: dict[str, str]) -> float | None:
    if "alpha" not in roles:
        return None
    a = get(roles["alpha"])
    if a.size != 1:
        raise _chain_error(mod, f"alpha tensor {roles['alpha']!r} has {a.size} values, expected one")
    return float(a) if a.ndim == 0 else float(a.reshape(()))


def decode_glora(mod: str, get: Getter, roles: dict[str, str], rule: AlphaRule) -> NeedsBase:
    """GLoRA: ``s * (W0 @ a1 @ a2 + b1 @ b2)``; the W0 term needs the base. ``scale`` = alpha/r."""
    a2, b1, b2 = get(roles["a2"]), get(roles["b1"]), get(roles["b2"])
    r = int(a2.shape[0])
    shape = (int(b1.shape[0]), *_shp(b2)[1:]) if "bm" not in roles else ()
    return _needs_base("glora", get, roles, "W0@a1@a2 term needs W0", rule.scale(_alpha(mod, get, roles), r), shape)


def _decode_oft(mod: str, get: Getter, roles: dict[str, str]) -> DecodedModule:
    """Diag-OFT / BOFT: ``scale`` holds the stored constraint (alpha); the rotation needs W0."""
    blocks = get(roles.get("oft_blocks") or roles["oft_r"])
    method = "boft" if blocks.ndim == 4 else "oft"
    alpha = _alpha(mod, get, roles)
    return DecodedModule(_needs_base(method, get, roles, "orthogonal rotation of W0", alpha or 0.0), algorithm=method)


_ALPHA_ONLY = frozenset({"alpha"})
_MAGNITUDE_ROLES = frozenset({"dora_scale", "magnitude"})


def decode_module(mod: str, get: Getter, roles: dict[str, str], rule: AlphaRule,
                  view: Getter | None = None) -> DecodedModule:
    """Decode one module from its role -> key map.

    Args:
        mod: the module's name in the file (for error messages).
        get: reads a tensor as float32 by key.
        roles: role -> tensor key.
        rule: how alpha and rank turn into the scale.
        view: a getter whose values may be written later
            (``SafetensorsFile.get_deferred``); used only for plain LoRA / LoCon
            factors, which are reshaped and never computed with here.

    Returns:
        the module's weight delta (None if it only has a bias or norm part),
        its bias delta and DoRA magnitude if any (as stored: ``[out, 1, ...]``
        when the norm is per output row, ``[1, in, ...]`` per input column),
        and the algorithm name.

    Raises:
        BadInput: factors that do not chain, or a role set no algorithm explains;
            the message names the module.
    """
    keys = roles.keys()
    if keys <= _ALPHA_ONLY:  # a stray alpha with no factors: nothing to apply
        return DecodedModule(None, algorithm="none")
    magnitude = None
    if not keys.isdisjoint(_MAGNITUDE_ROLES):
        for mrole in ("dora_scale", "magnitude"):
            if mrole in keys:
                magnitude = get(roles[mrole])
    bias = Dense(get(roles["up_bias"])) if "up_bias" in keys else None
    if "down" in keys and "up" in keys:
        algo = "dora" if magnitude is not None else "lora"
        plain = view is not None and magnitude is None and "mid" not in keys
        return DecodedModule(decode_lora(mod, view if plain else get, roles, rule), bias, magnitude, algo)  # type: ignore[arg-type]
    if keys & LOHA_ROLES:
        return DecodedModule(decode_loha(mod, get, roles, rule), bias, magnitude, "loha")
    if keys & LOKR_ROLES:
        return DecodedModule(decode_lokr(mod, get, roles, rule), bias, magnitude, "lokr")
    if keys & FULL_ROLES:
        return decode_full(mod, get, roles)
    if keys & NORM_ROLES:
        return decode_norm(mod, get, roles)
    if "oft_blocks" in keys or "oft_r" in keys:
        return _decode_oft(mod, get, roles)
    if {"a1", "a2", "b1", "b2"} <= keys:
        return DecodedModule(decode_glora(mod, get, roles, rule), algorithm="glora")
    if "ia3" in keys:
        return DecodedModule(_needs_base("ia3", get, roles, "(IA)^3 scales W0 element-wise"), algorithm="ia3")
    if "full_weight" in keys or "full_bias" in keys:
        w = b = None
        if "full_weight" in keys:
            w = _needs_base("replace", get, {"full_weight": roles["full_weight"]}, "full replacement weight")
        if "full_bias" in keys:
            b = _needs_base("replace", get, {"full_bias": roles["full_bias"]}, "full replacement bias")
        return DecodedModule(w, b, algorithm="replace")
    if "down" in keys or "up" in keys:
        half = "down" if "down" in keys else "up"
        other = "up" if half == "down" else "down"
        raise _chain_error(mod, f"has a {half} factor ({roles[half]!r}) but no matching {other} factor")
    raise _chain_error(mod, f"no known adapter algorithm for tensors {sorted(roles.values())[:3]}")
