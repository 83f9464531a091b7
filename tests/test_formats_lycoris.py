"""Real LyCORIS files (lycoris-lora, written on the tiny diffusers UNet) read back exactly.

For every algorithm and variant, ``create_lycoris`` wraps the tiny UNet, every
LyCORIS parameter is set to random values (LyCORIS zero-inits one side), and
``save_weights`` writes the file. Reading it with ``load_lora`` must give, for
every module, the update LyCORIS itself applies:

- the module's ΔW (rtol 1e-4, atol 1e-6), from LyCORIS's own code:
  ``get_diff_weight()`` for LoCon, full and norm modules; for LoHa and LoKr
  ``get_weight(shape) * scalar``, the ΔW their ``forward`` adds, because
  v4.1's ``get_diff_weight`` / ``merge_to`` multiply alpha/r in a second time
  (see ``test_lycoris_loha_lokr_diff_weight_scales_twice``);
- the layer output: the wrapped layer's forward equals the base op with
  ``W0 + ΔW`` (DoRA: ``m * (W0 + ΔW) / ||W0 + ΔW||`` from the stored magnitude);
- for LoCon, the weight change made by ``net.merge_to()``.

Base-dependent algorithms ((IA)^3, diag-OFT, BOFT, GLoRA) come back as
``NeedsBase``; the (IA)^3 and GLoRA tensors rebuild LyCORIS's ΔW given W0.
The same files with keys renamed ``lycoris_`` -> ``lora_unet_`` (kohya naming)
give the same deltas. References are computed in float64 (the saved float32
values are exact in float64).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorasearch.delta import Dense, Factored, Kronecker, LoraDelta, NeedsBase
from lorasearch.formats import load_lora
from lorasearch.formats.base import DictSource, ReadContext
from lorasearch.formats.kohya import KohyaReader

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris  # noqa: E402
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from lorasearch.tinymodels import make_tiny_unet  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class Algo:
    """One ``create_lycoris`` configuration."""

    id: str
    kwargs: dict[str, Any]
    needs_base: str | None = None  # NeedsBase.method expected for every module
    roles: tuple[frozenset[str], ...] = field(default=())  # key-suffix sets that must occur


def sig(*suffixes: str) -> frozenset[str]:
    return frozenset(suffixes)


ALGOS = [
    Algo("locon", dict(algo="locon", linear_dim=4, linear_alpha=2.0),
         roles=(sig("lora_down.weight", "lora_up.weight", "alpha"),)),
    Algo("locon_tucker", dict(algo="locon", linear_dim=3, linear_alpha=1.5, use_tucker=True),
         roles=(sig("lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"),)),
    Algo("loha", dict(algo="loha", linear_dim=3, linear_alpha=1.0),
         roles=(sig("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),)),
    Algo("loha_tucker", dict(algo="loha", linear_dim=3, linear_alpha=2.0, use_tucker=True),
         roles=(sig("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"),)),
    Algo("lokr", dict(algo="lokr", linear_dim=4, linear_alpha=1.5),
         roles=(sig("lokr_w1", "lokr_w2", "alpha"), sig("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"))),
    Algo("lokr_decompose_both", dict(algo="lokr", linear_dim=2, linear_alpha=3.0, decompose_both=True),
         roles=(sig("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"),)),
    Algo("lokr_full_matrix", dict(algo="lokr", linear_dim=4, linear_alpha=0.5, full_matrix=True),
         roles=(sig("lokr_w1", "lokr_w2", "alpha"),)),
    Algo("lokr_factor", dict(algo="lokr", linear_dim=2, linear_alpha=1.0, factor=4)),
    Algo("lokr_conv_tucker", dict(algo="lokr", linear_dim=2, linear_alpha=1.0, use_tucker=True, decompose_both=True),
         roles=(sig("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"),
                sig("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"))),
    Algo("full", dict(algo="full"), roles=(sig("diff", "diff_b"),)),
    Algo("norm", dict(algo="locon", linear_dim=2, linear_alpha=1.0, train_norm=True), roles=(sig("w_norm", "b_norm"),)),
    Algo("dora_out", dict(algo="locon", linear_dim=4, linear_alpha=2.0, dora_wd=True, wd_on_output=True),
         roles=(sig("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"),)),
    Algo("dora_in", dict(algo="locon", linear_dim=4, linear_alpha=2.0, dora_wd=True, wd_on_output=False)),
    Algo("doha", dict(algo="loha", linear_dim=2, linear_alpha=1.0, dora_wd=True)),
    Algo("ia3", dict(algo="ia3"), needs_base="ia3", roles=(sig("weight", "on_input"),)),
    Algo("diag_oft", dict(algo="diag-oft", linear_dim=4), needs_base="oft", roles=(sig("oft_blocks", "alpha"),)),
    Algo("boft", dict(algo="boft", linear_dim=4), needs_base="boft"),
    Algo("glora", dict(algo="glora", linear_dim=2, linear_alpha=1.0), needs_base="glora",
         roles=(sig("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"),)),
]
BY_ID = {a.id: a for a in ALGOS}
ADDITIVE = [a for a in ALGOS if a.needs_base is None]


@lru_cache(maxsize=1)
def base_unet() -> Any:
    return make_tiny_unet(0)


@dataclass
class Written:
    """A LyCORIS network on its own UNet copy, and the file it wrote."""

    algo: Algo
    net: Any
    path: Path
    sd: dict[str, torch.Tensor]


def write(algo: Algo, folder: Path, seed: int = 0) -> Written:
    unet = copy.deepcopy(base_unet())
    net = create_lycoris(unet, 1.0, warn_on_unmatched=False, **algo.kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # moderate values keep float32 rounding far below the tolerance
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = folder / f"{algo.id}.safetensors"
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({k: str(v) for k, v in algo.kwargs.items()})}
    net.save_weights(str(path), torch.float32, meta)
    net.double()  # references in float64 from the very values the file holds
    for lora in net.loras:
        lora.org_module[0].double()
        if isinstance(lora, FullModule):
            lora._org_weight = [lora._org_weight[0].double()]
            lora.org_bias = None if lora.org_bias is None else [lora.org_bias[0].double()]
    return Written(algo, net, path, load_file(str(path)))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    folder = tmp_path_factory.mktemp("lycoris")
    return {a.id: write(a, folder) for a in ALGOS}


# component prefixes that families.py may put before an unknown family's flat path
_COMPONENT_HEADS = {"unet", "diffusion_model", "transformer"}


def _flat_name(name: str) -> str:
    """Canonical name -> flat module path (a denoiser component prefix dropped)."""
    head, _, tail = name.partition(".")
    return (tail if tail and head in _COMPONENT_HEADS else name).replace(".", "_")


def by_path(ld: LoraDelta) -> dict[str, Any]:
    out = {_flat_name(n): d for n, d in ld.modules.items()}
    assert len(out) == len(ld.modules)
    return out


def path_of(lora: Any) -> str:
    return lora.lora_name[len("lycoris_"):]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def lycoris_delta(lora: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """ΔW (out x -1) and Δbias of one LyCORIS module, by LyCORIS's own code."""
    with torch.no_grad():
        if isinstance(lora, (LohaModule, LokrModule)):
            # the ΔW forward() adds; get_diff_weight() would scale it once more
            w, b = lora.get_weight(lora.shape) * lora.scalar, None
        else:
            w, b = lora.get_diff_weight()
    w = np64(w)
    return (w.reshape(w.shape[0], -1) if w.ndim > 1 else w), (None if b is None else np64(b))


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
    np.testing.assert_allclose(ours.astype(np.float64), ref, rtol=RTOL, atol=ATOL, err_msg=what)


def test_algorithm_variants_present(written: dict[str, Written]) -> None:
    """Each configuration writes the key layouts it is meant to cover."""
    for algo in ALGOS:
        layouts: dict[str, set[str]] = {}
        for k in written[algo.id].sd:
            mod, suffix = k.split(".", 1)
            layouts.setdefault(mod, set()).add(suffix)
        found = {frozenset(v) for v in layouts.values()}
        for want in algo.roles:
            assert want in found, f"{algo.id}: no module with {sorted(want)} (found {sorted(map(sorted, found))})"
    lokr_shapes = {tuple(v.shape) for a in ("lokr", "lokr_full_matrix")
                   for k, v in written[a].sd.items() if k.endswith("lokr_w2")}
    assert any(len(s) == 4 for s in lokr_shapes) and any(len(s) == 2 for s in lokr_shapes)
    conv_w2b = [k for k, v in written["lokr_decompose_both"].sd.items() if k.endswith("conv1.lokr_w2_b") and v.ndim == 2]
    assert conv_w2b, "no 3x3 conv LoKr with a factored w2 ([r, d*k*k])"
    assert written["dora_in"].sd["lycoris_conv_in.dora_scale"].shape == (1, 4, 1, 1)
    assert written["dora_out"].sd["lycoris_conv_in.dora_scale"].shape == (32, 1, 1, 1)


@pytest.mark.parametrize("algo", [a.id for a in ADDITIVE])
def test_delta_matches_lycoris(written: dict[str, Written], algo: str) -> None:
    w = written[algo]
    ld = load_lora(w.path)
    assert ld.format == "kohya"
    mods = by_path(ld)
    seen = 0
    for lora in w.net.loras:
        p = path_of(lora)
        ref_w, ref_b = lycoris_delta(lora)
        ours = mods[p]
        assert isinstance(ours, (Factored, Kronecker, Dense)), f"{p}: {type(ours).__name__}"
        assert_close(ours.matrix(), ref_w, p)
        assert int(np.prod(ours.shape)) == ref_w.size
        if ref_b is not None:
            assert_close(mods[p + "#bias"].matrix(), ref_b, p + "#bias")
        seen += 1
    assert seen == len(w.net.loras) > 0
    expect_dora = bool(w.algo.kwargs.get("dora_wd"))
    assert ld.needs_base == expect_dora
    if expect_dora:
        assert set(ld.magnitudes) == set(ld.modules)
        for lora in w.net.loras:
            stored = np64(lora.dora_scale).astype(np.float32)
            np.testing.assert_array_equal(ld.magnitudes[_magnitude_key(ld, path_of(lora))], stored)


def _magnitude_key(ld: LoraDelta, path: str) -> str:
    return next(n for n in ld.magnitudes if _flat_name(n) == path)


def _layer_input(lora: Any, g: torch.Generator) -> torch.Tensor:
    if lora.module_type == "linear":
        return torch.randn(3, lora.shape[1], generator=g, dtype=torch.float64)
    return torch.randn(2, lora.shape[1], 6, 6, generator=g, dtype=torch.float64)


def _dora(w: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """m * W / ||W||: per output row when the magnitude is [out, 1, ...], else per input column."""
    rows = mag.shape[0] == w.shape[0] and mag.size == w.shape[0]
    axes = tuple(range(1, w.ndim)) if rows else (0, *range(2, w.ndim))
    return w * mag / np.sqrt((w * w).sum(axis=axes, keepdims=True))


@pytest.mark.parametrize("algo", ["locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_decompose_both",
                                  "lokr_full_matrix", "lokr_conv_tucker", "dora_out", "dora_in", "doha"])
def test_layer_output_matches_lycoris_forward(written: dict[str, Written], algo: str) -> None:
    """What the wrapped layer computes == the base op with our W0 + ΔW (or its DoRA form)."""
    w = written[algo]
    ld = load_lora(w.path)
    mods = by_path(ld)
    g = torch.Generator().manual_seed(1)
    for lora in w.net.loras:
        p = path_of(lora)
        org = lora.org_module[0]
        w0 = np64(org.weight)
        new = w0 + mods[p].matrix().astype(np.float64).reshape(w0.shape)
        if ld.magnitudes:
            new = _dora(new, ld.magnitudes[_magnitude_key(ld, p)].astype(np.float64))
        x = _layer_input(lora, g)
        with torch.no_grad():
            got = org(x)  # org.forward is the LyCORIS wrapper after apply_to()
            want = lora.op(x, torch.from_numpy(new), org.bias, **lora.kw_dict)
        np.testing.assert_allclose(np64(got), np64(want), rtol=RTOL, atol=1e-5, err_msg=p)


def test_merge_to_changes_weights_by_delta(tmp_path: Path) -> None:
    w = write(BY_ID["locon"], tmp_path, seed=3)
    mods = by_path(load_lora(w.path))
    before = {path_of(l): np64(l.org_module[0].weight).copy() for l in w.net.loras}
    w.net.merge_to(1.0)
    for lora in w.net.loras:
        p = path_of(lora)
        change = np64(lora.org_module[0].weight) - before[p]
        assert_close(mods[p].matrix(), change.reshape(change.shape[0], -1), p)


def test_lycoris_loha_lokr_diff_weight_scales_twice(written: dict[str, Written]) -> None:
    """Why LoHa/LoKr are compared with forward's ΔW: v4.1 get_diff_weight = forward ΔW * alpha/r."""
    lora = next(l for l in written["loha"].net.loras if l.scale != 1)
    with torch.no_grad():
        fwd = np64(lora.get_weight(lora.shape))
        diff = np64(lora.get_diff_weight(shape=lora.shape)[0])
    if not np.allclose(diff, fwd, rtol=RTOL):
        np.testing.assert_allclose(diff, fwd * lora.scale, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("algo", ["ia3", "diag_oft", "boft", "glora"])
def test_base_dependent_algorithms_need_base(written: dict[str, Written], algo: str) -> None:
    w = written[algo]
    ld = load_lora(w.path)
    assert ld.needs_base
    mods = by_path(ld)
    assert len(mods) == len(w.net.loras)
    for lora in w.net.loras:
        d = mods[path_of(lora)]
        assert isinstance(d, NeedsBase) and d.method == w.algo.needs_base, path_of(lora)
        if isinstance(lora, IA3Module):
            assert_close(_ia3_delta(d, np64(lora.org_module[0].weight)), lycoris_delta(lora)[0], path_of(lora))
        elif isinstance(lora, GLoRAModule):
            assert d.scale == pytest.approx(lora.scale)
            assert_close(_glora_delta(d, np64(lora.org_module[0].weight)), lycoris_delta(lora)[0], path_of(lora))
        else:  # OFT / BOFT: the stored constraint
            assert d.scale == pytest.approx(float(lora.alpha))
            np.testing.assert_array_equal(d.tensors["oft_blocks"], np64(lora.oft_blocks).astype(np.float32))


def _ia3_delta(d: NeedsBase, w0: np.ndarray) -> np.ndarray:
    """(IA)^3 ΔW = W0 * w along the output channels (``on_input`` 0, LyCORIS's default)."""
    assert float(d.tensors["on_input"]) == 0.0
    scale = d.tensors["ia3"].reshape(-1).astype(np.float64)
    return (w0 * scale.reshape(-1, *[1] * (w0.ndim - 1))).reshape(w0.shape[0], -1)


def _glora_delta(d: NeedsBase, w0: np.ndarray) -> np.ndarray:
    """GLoRA ΔW = s * (W0 @ a1 @ a2 + b1 @ b2) on the in-channel axis (conv kernel kept)."""
    t = {k: v.astype(np.float64) for k, v in d.tensors.items()}
    a1, a2 = t["a1"].reshape(t["a1"].shape[0], -1), t["a2"].reshape(t["a2"].shape[0], -1)
    wa = np.einsum("oi...,ij,jk->ok...", w0, a1, a2)
    wb = t["b1"].reshape(t["b1"].shape[0], -1) @ t["b2"].reshape(t["b2"].shape[0], -1)
    return d.scale * (wa.reshape(w0.shape[0], -1) + wb)


@pytest.mark.parametrize("algo", ["locon_tucker", "loha", "lokr_conv_tucker", "full", "norm", "dora_in"])
def test_kohya_named_copy_gives_same_deltas(written: dict[str, Written], tmp_path: Path, algo: str) -> None:
    w = written[algo]
    renamed = {"lora_unet_" + k[len("lycoris_"):]: v for k, v in w.sd.items()}
    path = tmp_path / "kohya.safetensors"
    save_file(renamed, str(path), {"ss_network_module": "lycoris.kohya"})
    a, b = load_lora(w.path), load_lora(path)
    ma, mb = by_path(a), by_path(b)
    assert set(ma) == set(mb)
    for name, d in ma.items():
        assert type(mb[name]) is type(d)
        np.testing.assert_array_equal(mb[name].matrix(), d.matrix(), err_msg=name)
    assert a.needs_base == b.needs_base and len(a.magnitudes) == len(b.magnitudes)
    parsed = KohyaReader().read(DictSource({k: v.numpy() for k, v in renamed.items()}), ReadContext())
    assert {m.component for m in parsed.modules} == {"unet"}
    assert all(m.flat for m in parsed.modules)


def test_reader_level_names_and_algorithms(written: dict[str, Written]) -> None:
    """``KohyaReader`` alone: ``lycoris_`` modules keep their flat path, no component."""
    w = written["lokr"]
    parsed = KohyaReader().read(DictSource({k: v.numpy() for k, v in w.sd.items()}), ReadContext())
    assert parsed.format == "kohya" and parsed.metadata["algorithms"] == {"lokr": len(w.net.loras)}
    assert {m.path for m in parsed.modules} == {path_of(l) for l in w.net.loras}
    assert {m.component for m in parsed.modules} == {None}


@pytest.mark.parametrize("cls,kwargs", [(LoConModule, {}), (LohaModule, {}), (LokrModule, {"decompose_both": True})],
                         ids=["locon", "loha", "lokr"])
def test_rs_lora_alpha_is_stored_normalised(cls: type, kwargs: dict[str, Any]) -> None:
    """With rs_lora LyCORIS stores alpha*sqrt(r): the plain alpha/r rule, even if ss_network_args says rs_lora."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64).double()
    lora = cls("lora_unet_x", layer, 1.0, 4, 2.0, rs_lora=True, **kwargs).double()
    with torch.no_grad():
        for prm in lora.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3)
    assert lora.scale == pytest.approx(2.0 / 2.0)  # alpha / sqrt(4)
    sd = {f"lora_unet_x.{k}": v.detach().float().numpy() for k, v in lora.state_dict().items()}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"rs_lora": "True"})}
    parsed = KohyaReader().read(DictSource(sd, meta), ReadContext())
    assert "rs_lora" in parsed.metadata
    (mod,) = parsed.modules
    assert_close(mod.delta.matrix(), lycoris_delta(lora)[0], "x")


LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")


def test_real_sdxl_loha_layout(shared_keys: Path) -> None:
    """A real SDXL LyCORIS LoHa layout (linear and flat 3x3 conv modules) with random values.

    Every 16th module of the file is kept (the whole file is 237M values).
    """
    from lorasearch.formats import read_source

    spec = json.loads((shared_keys / "li_sdxl_lycoris_loha_gwei.json").read_text())
    mods = sorted({k.rsplit(".", 1)[0] for k in spec["tensors"]})[::16]
    rng = np.random.default_rng(0)
    tensors = {f"{m}.{s}": (rng.standard_normal(spec["tensors"][f"{m}.{s}"]["shape"]) * 0.1).astype(np.float32)
               for m in mods for s in LOHA_KEYS}
    src = DictSource(tensors, spec.get("metadata", {}))
    ld = read_source(src, ReadContext(path="gwei"))
    assert ld.family == "sdxl" and ld.metadata["algorithms"] == {"loha": len(mods)}
    assert all(isinstance(d, Factored) for d in ld.modules.values())
    assert any(d.matrix_shape[1] % 9 == 0 and "conv" in n for n, d in ld.modules.items())
    # the smallest modules by the formula s * (w1a @ w1b) * (w2a @ w2b) (conv maths: the tiny-UNet tests)
    parsed = KohyaReader().read(src, ReadContext())
    for rm in sorted(parsed.modules, key=lambda rm: np.prod(rm.delta.matrix_shape))[:3]:
        m = "lora_unet_" + rm.path if f"lora_unet_{rm.path}.alpha" in tensors else f"lora_{rm.component}_{rm.path}"
        t = {s: tensors[f"{m}.{s}"].astype(np.float64) for s in LOHA_KEYS}
        s = float(t["alpha"]) / t["hada_w1_b"].shape[0]
        want = s * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        assert_close(rm.delta.matrix(), want, m)
