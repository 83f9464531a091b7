"""Attribution end to end (issue 5 §2): derived, merged or unrelated, on tiny trained LoRAs and real files.

One store (module fixture) holds every readable real file of ``shared_loras``
(recorded with its repository from ``inventory.tsv``, as the indexer records
hub files) and six tiny LoRAs trained here (``lorasearch.samples.train_lora``).
Each case writes its target with a real writer (or builds a checkpoint on the
tiny UNet) and checks the verdict, the first match and its coefficient.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hub_server import HubDouble
from lorasearch.attribution import Thresholds, attribute
from lorasearch.attribution import derivatives as dv
from lorasearch.attribution.calibration import calibration_path, get_calibration
from lorasearch.delta import Factored, LoraDelta
from lorasearch.embed import embed
from lorasearch.errors import BadInput, LoraSearchError
from lorasearch.formats import load_lora
from lorasearch.frobenius import compare
from lorasearch.paper import paper_raw_vector
from lorasearch.store import Store
from lorasearch.tinymodels import make_tiny_unet

ZOO = 6
STEPS = 8
HIRVITA = "Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights"
KRISHNA = "Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights"
RICK = "qwerty-aditya__rick_and_morty_LoRA__pytorch_lora_weights"
CATUND = "catundchat__stable-diffusion-v1.5-lora__pytorch_lora_weights"
SUSANA = "Susana2306__Difusor__lora_model__adapter_model"
ANALOG = "cloneofsimo__lora__example_loras__analog_svd_rank4"
MATCH_FIELDS = {"id", "name", "source", "path", "cosine", "coefficient", "fpr"}


@dataclass
class World:
    store: Store
    ids: dict[str, int]
    lds: dict[str, LoraDelta]
    root: Path
    base: Path
    base_state: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, shared_loras: Path) -> World:
    from lorasearch.samples import train_lora

    root = tmp_path_factory.mktemp("attribution")
    inv = {r["local_name"]: r for r in csv.DictReader(open(shared_loras / "inventory.tsv", encoding="utf-8"), delimiter="\t")}
    items, keys = [], []
    lds: dict[str, LoraDelta] = {}
    for p in sorted(shared_loras.glob("*.safetensors")):
        try:
            ld = load_lora(p)
        except LoraSearchError:
            continue
        r = inv[p.name]
        items.append((ld, embed(ld), {"source": f"hf:{r['repo']}", "repo": r["repo"], "revision": r["commit"], "path": r["path"]}))
        keys.append(p.stem)
        lds[p.stem] = ld
    for s in range(ZOO):
        train_lora(steps=STEPS, seed=s).save_pretrained(root / f"zoo{s}")
        ld = load_lora(root / f"zoo{s}")
        items.append((ld, embed(ld), {"source": str(root), "path": str(root / f"zoo{s}" / "adapter_model.safetensors")}))
        keys.append(f"zoo{s}")
        lds[f"zoo{s}"] = ld
    store = Store(root / "db")
    ids = {k: lid for k, (lid, _) in zip(keys, store.add_many(items))}
    state = dv.unet_state(make_tiny_unet(0))
    base = dv.write_checkpoint(state, root / "base.safetensors")
    yield World(store, ids, lds, root, base, state)
    store.close()


# --------------------------------------------------------------------------- cases


def _resaved(w: World, path: Path) -> Path:
    """The same tensors under a new name with new header metadata."""
    src = Path(w.lds[HIRVITA].source["path"])
    save_file(load_file(str(src)), str(path), metadata={"ss_output_name": "my-new-lora", "uploader": "someone else"})
    return path


def _kohya(fn: Callable[[World], LoraDelta], dtype: str = "float32") -> Callable[[World, Path], Path]:
    return lambda w, p: dv.write_kohya(fn(w), p, dtype)


def _further(w: World, p: Path) -> Path:
    return dv.continue_training(w.root / "zoo1", p, steps=STEPS // 4, data_seed=1)  # +25 % of the steps


def _ckpt(parts: list[tuple[str, float]], folder: bool = False, dtype: str = "float32") -> Callable[[World, Path], Path]:
    def build(w: World, p: Path) -> Path:
        state = dv.merged_state(w.base_state, [(w.lds[k], c) for k, c in parts])
        return dv.write_checkpoint(state, p, dtype, diffusers_folder=folder)
    return build


def _merge(parts: list[tuple[str, float]], svd_rank: int | None = None) -> Callable[[World, Path], Path]:
    def build(w: World, p: Path) -> Path:
        pp = [(w.lds[k], c) for k, c in parts]
        return dv.write_kohya(dv.merge_concat(pp) if svd_rank is None else dv.merge_svd(pp, svd_rank), p)
    return build


# (case, builder, verdict, {source key: coefficient or None}, coefficient tolerance)
CASES: list[tuple[str, Callable[[World, Path], Path], str, dict[str, float | None], float]] = [
    ("re-upload, renamed, new metadata", _resaved, "derived", {HIRVITA: 1.0}, 1e-4),
    ("converted diffusers -> kohya", _kohya(lambda w: w.lds[HIRVITA]), "derived", {HIRVITA: 1.0}, 1e-4),
    ("cast fp16", _kohya(lambda w: w.lds[HIRVITA], "float16"), "derived", {HIRVITA: 1.0}, 0.01),
    ("cast bf16", _kohya(lambda w: w.lds[KRISHNA], "bfloat16"), "derived", {KRISHNA: 1.0}, 0.02),
    ("alpha changed (x0.25)", _kohya(lambda w: dv.scaled(w.lds[SUSANA], 0.25)), "derived", {SUSANA: 0.25}, 1e-3),
    ("factors re-parameterised", _kohya(lambda w: dv.reparameterised(w.lds[RICK], np.random.default_rng(0))),
     "derived", {RICK: 1.0}, 1e-3),
    ("rank resized by SVD 4 -> 2", _kohya(lambda w: dv.rank_resize(w.lds[CATUND], 2)), "derived", {CATUND: 1.0}, 1e-3),
    ("module subset: no cross-attention", _kohya(lambda w: dv.subset(w.lds[KRISHNA], lambda n: ".attn2." not in n)),
     "derived", {KRISHNA: 1.0}, 1e-3),
    ("module subset: UNet only (text encoder dropped)",
     _kohya(lambda w: dv.subset(w.lds[ANALOG], lambda n: n.startswith("unet."))), "derived", {ANALOG: 1.0}, 1e-3),
    ("tiny: converted peft -> kohya", _kohya(lambda w: w.lds["zoo0"]), "derived", {"zoo0": 1.0}, 1e-4),
    ("tiny: subset (another unknown: family)", _kohya(lambda w: dv.subset(w.lds["zoo2"], lambda n: "attn2" not in n)),
     "derived", {"zoo2": 1.0}, 1e-3),
    ("tiny: trained further (+25 % steps)", _further, "derived", {"zoo1": None}, 0.0),
    ("merge of 2, factors concatenated", _merge([(KRISHNA, 0.6), (RICK, -0.4)]), "merged", {KRISHNA: 0.6, RICK: -0.4}, 0.05),
    ("merge of 3 tiny, factors concatenated", _merge([("zoo2", 0.9), ("zoo3", -0.3), ("zoo4", 0.5)]), "merged",
     {"zoo2": 0.9, "zoo3": -0.3, "zoo4": 0.5}, 0.05),
    ("merge of 4, SVD-compressed to rank 8", _merge([(HIRVITA, 0.7), (KRISHNA, -0.5), (RICK, 1.0), (CATUND, 0.3)], 8),
     "merged", {HIRVITA: 0.7, KRISHNA: -0.5, RICK: 1.0, CATUND: 0.3}, 0.05),
    ("checkpoint W0 + 3 LoRAs (single file)", _ckpt([("zoo3", 0.8), ("zoo4", -0.5), ("zoo5", 0.3)]), "merged",
     {"zoo3": 0.8, "zoo4": -0.5, "zoo5": 0.3}, 0.05),
    ("checkpoint W0 + 2 LoRAs (diffusers folder, fp16)", _ckpt([("zoo0", -1.0), ("zoo5", 0.6)], True, "float16"),
     "merged", {"zoo0": -1.0, "zoo5": 0.6}, 0.05),
]


def _check(w: World, res: dict[str, Any], verdict: str, truth: dict[str, float | None], tol: float) -> None:
    assert res["verdict"] == verdict, res
    got = {m["id"]: m for m in res["matches"]}
    want = {w.ids[k]: c for k, c in truth.items()}
    assert set(got) == set(want), (got, want)
    for lid, c in want.items():
        m = got[lid]
        assert MATCH_FIELDS <= m.keys()
        assert m["fpr"] <= Thresholds().max_fpr
        if c is not None:
            assert m["coefficient"] == pytest.approx(c, abs=tol), m
    assert 0.0 <= res["explained"] <= 1.0 + 1e-9
    json.dumps(res)  # plain JSON types only (the API serialises it as is)


@pytest.mark.parametrize("case, build, verdict, truth, tol", CASES, ids=[c[0] for c in CASES])
def test_case(world: World, tmp_path: Path, case: str, build: Callable[[World, Path], Path], verdict: str,
              truth: dict[str, float | None], tol: float) -> None:
    target = build(world, tmp_path / "target.safetensors")
    base = str(world.base) if "checkpoint" in case else None
    if "folder" in case:
        base_dir = dv.write_checkpoint(world.base_state, tmp_path / "base", diffusers_folder=True)
        base = str(base_dir)
    res = attribute(world.store, target, base=base)
    _check(world, res, verdict, truth, tol)
    first = res["matches"][0]
    if case.startswith("rank resized"):
        assert 0.5 < first["cosine"] < 0.999 and res["explained"] > 0.99
    if case.startswith("module subset"):
        assert first["module_share"] < 0.99 and first["cosine"] == pytest.approx(1.0, abs=1e-4)
    if "trained further" in case:
        assert 0.5 < first["cosine"] < 0.99


def test_unrelated_tiny_lora_is_none(world: World, tmp_path: Path) -> None:
    from lorasearch.samples import train_lora

    train_lora(steps=STEPS, seed=99).save_pretrained(tmp_path / "fresh")
    res = attribute(world.store, tmp_path / "fresh")
    assert res["verdict"] == "none" and res["matches"] == [] and res["explained"] == 0.0
    near = res["per_file"][0]["nearest"]
    assert near is not None and abs(near["cosine"]) < 0.1 and near["fpr"] > 1e-3


def _down_cosine(a: LoraDelta, b: LoraDelta) -> float:
    va = np.concatenate([a.modules[n].down.ravel() for n in sorted(a.modules)])
    vb = np.concatenate([b.modules[n].down.ravel() for n in sorted(b.modules)])
    return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))


SHARED_SEED = [  # SD1.5 diffusers files of different repos, same training script and seed
    ("Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights",
     "wellCh4n__pokemon-diffusers__pytorch_lora_weights"),
    (HIRVITA, KRISHNA),
    ("Riniii09__IAssignment2__pytorch_lora_weights", "mvclab-ntust-course__course3-B11115019__pytorch_lora_weights"),
]


@pytest.mark.parametrize("a, b", SHARED_SEED, ids=[p[0].split("__")[0] for p in SHARED_SEED])
def test_real_shared_seed_pairs_are_unrelated(world: World, a: str, b: str) -> None:
    la, lb = world.lds[a], world.lds[b]
    assert _down_cosine(la, lb) > 0.99
    va, vb = paper_raw_vector(la), paper_raw_vector(lb)
    assert va @ vb / np.linalg.norm(va) / np.linalg.norm(vb) > 0.99  # the paper's raw vectors look like copies
    assert abs(compare(la, lb).cosine) <= 0.02  # the updates are unrelated
    res = attribute(world.store, la, exclude_ids=[world.ids[a]])
    assert res["verdict"] == "none"
    assert world.ids[b] not in {m["id"] for m in res["matches"]}


REAL_PAIRS = [  # (later checkpoint, the earlier one it derives from)
    ("reddinft__sandmantales-hackathon__lora_weights__checkpoint-500__pytorch_lora_weights",
     "reddinft__sandmantales-hackathon__lora_weights__checkpoint-250__pytorch_lora_weights"),
    ("huggingface__peft__examples__monteclora_finetuning__monteclora-roberta-mrpc__checkpoint-460__adapter_model",
     "huggingface__peft__examples__monteclora_finetuning__monteclora-roberta-mrpc__checkpoint-230__adapter_model"),
    ("ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a16_d0.1_e1__checkpoint-7__adapter_model",
     "ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a16_d0.05_e1__checkpoint-7__adapter_model"),
]


@pytest.mark.parametrize("later, earlier", REAL_PAIRS, ids=[p[0].split("__")[0] for p in REAL_PAIRS])
def test_real_checkpoint_pairs_are_derived(world: World, later: str, earlier: str) -> None:
    res = attribute(world.store, world.lds[later], exclude_ids=[world.ids[later]])
    assert res["verdict"] == "derived"
    assert res["matches"][0]["id"] == world.ids[earlier]
    assert 0.5 < res["matches"][0]["cosine"] < 0.99


def test_checkpoint_needs_a_base(world: World, tmp_path: Path) -> None:
    target = _ckpt([("zoo3", 0.5)])(world, tmp_path / "ft.safetensors")
    with pytest.raises(BadInput, match="--base"):
        attribute(world.store, target)


def test_thresholds_are_configurable(world: World, tmp_path: Path) -> None:
    target = _kohya(lambda w: dv.subset(w.lds[KRISHNA], lambda n: ".attn2." not in n))(world, tmp_path / "t.safetensors")
    strict = attribute(world.store, target, thresholds=Thresholds(min_cosine=1.01))
    assert strict["verdict"] == "none" and strict["thresholds"]["min_cosine"] == 1.01


def test_calibration_is_persisted_and_excludes_lineage(world: World) -> None:
    cal = get_calibration(world.store, "sd15")
    path = calibration_path(world.store, "sd15")
    saved = json.loads(path.read_text())
    assert saved["generation"] == cal.generation and saved["null_pairs"] == cal.cosine.size > 200
    assert cal.excluded_lineage >= 1  # reddinft 250/500, filip131311 siblings share a repository
    assert cal.cosine[-1] < 0.03 and cal.method == "family"
    assert cal.fpr(0.9) < 1e-12 < 0.01 < cal.fpr(0.01)


def test_hf_target_through_the_hub_double(world: World, tmp_path: Path) -> None:
    """A repo with a renamed LoRA and a merged checkpoint; the model card names the base, fetched from the hub too."""
    lora = _kohya(lambda w: w.lds[RICK])(world, tmp_path / "x.safetensors")
    ckpt = _ckpt([("zoo1", 0.7), ("zoo2", -0.4)])(world, tmp_path / "ft.safetensors")
    base_dir = dv.write_checkpoint(world.base_state, tmp_path / "base", diffusers_folder=True)
    hub = HubDouble(tmp_path / "hub").start()
    try:
        hub.add_commit("tiny/base", {"unet/diffusion_pytorch_model.safetensors": base_dir / "unet" / "diffusion_pytorch_model.safetensors",
                                     "model_index.json": base_dir / "model_index.json"})
        sha = hub.add_commit("eve/remix", {"loras/mine.safetensors": lora, "model.safetensors": ckpt,
                                           "README.md": b"---\nlicense: mit\nbase_model: tiny/base\n---\n# remix\n"})
        res = attribute(world.store, "hf:eve/remix", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    finally:
        hub.stop()
    assert res["target"] == f"hf:eve/remix@{sha}" and res["base_model"] == ["tiny/base"]
    assert res["verdict"] == "merged"
    by_path = {f["path"].rsplit("/", 1)[-1]: f for f in res["per_file"]}
    assert by_path["mine.safetensors"]["verdict"] == "derived"
    assert [m["id"] for m in by_path["mine.safetensors"]["matches"]] == [world.ids[RICK]]
    coefs = {m["id"]: m["coefficient"] for m in by_path["model.safetensors"]["matches"]}
    assert coefs == pytest.approx({world.ids["zoo1"]: 0.7, world.ids["zoo2"]: -0.4}, abs=0.05)
    assert {m["id"] for m in res["matches"]} == {world.ids[RICK], world.ids["zoo1"], world.ids["zoo2"]}


def test_cli_attribute(world: World, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasearch.cli import app

    target = _kohya(lambda w: dv.scaled(w.lds[HIRVITA], 2.0))(world, tmp_path / "t.safetensors")
    run = CliRunner().invoke(app, ["attribute", str(target), "--db", str(world.store.root), "--json"])
    assert run.exit_code == 0, run.output
    d = json.loads(run.stdout)
    assert {"target", "family", "verdict", "explained", "matches", "per_file"} <= d.keys()
    assert d["verdict"] == "derived" and d["matches"][0]["coefficient"] == pytest.approx(2.0, abs=1e-3)
    ckpt = _ckpt([("zoo3", 0.5)])(world, tmp_path / "ft.safetensors")
    run = CliRunner().invoke(app, ["attribute", str(ckpt), "--db", str(world.store.root)])
    assert run.exit_code == 2
    run = CliRunner().invoke(app, ["attribute", str(ckpt), "--db", str(world.store.root), "--base", str(world.base)])
    assert run.exit_code == 0 and run.stdout.startswith(f"{ckpt}: derived")
    run = CliRunner().invoke(app, ["attribute", str(target), "--db", str(tmp_path / "nothing")])
    assert run.exit_code == 2


def test_other_family_has_no_candidates(world: World) -> None:
    ld = LoraDelta("unknown:feedfacecafe", "test", {"x.y": Factored(np.ones((3, 1)), np.ones((1, 3)))})
    res = attribute(world.store, ld)
    assert res["verdict"] == "none" and "no indexed LoRAs" in res["per_file"][0]["message"]


def test_without_file_copies_decides_in_sketch_space(world: World, tmp_path: Path) -> None:
    """A store without blob copies: the same verdicts from the stored module sketches, flagged not exact."""
    keys = [HIRVITA, KRISHNA, RICK, CATUND, SUSANA]
    store = Store(tmp_path / "db", keep_files=False)
    ids = {k: lid for k, (lid, _) in zip(keys, store.add_many(
        [(world.lds[k], embed(world.lds[k]), {"source": "x", "repo": f"r/{i}", "path": "p"}) for i, k in enumerate(keys)]))}
    try:
        res = attribute(store, dv.merge_concat([(world.lds[KRISHNA], 0.6), (world.lds[RICK], -0.4)]))
        assert res["verdict"] == "merged" and res["per_file"][0]["exact"] is False
        assert {m["id"]: m["coefficient"] for m in res["matches"]} == pytest.approx({ids[KRISHNA]: 0.6, ids[RICK]: -0.4}, abs=0.05)
        assert res["per_file"][0]["calibration"]["sd15"]["exact"] is False
    finally:
        store.close()


def test_negative_weight_found_beyond_the_overfetch(world: World) -> None:
    """FAISS ranks by inner product: a component merged with a negative weight is found by the negated query."""
    target = dv.merge_concat([(world.lds[HIRVITA], 0.8), (world.lds[CATUND], -0.5)])
    res = attribute(world.store, target, thresholds=Thresholds(overfetch=3, shortlist=4))
    assert {m["id"]: m["coefficient"] for m in res["matches"]} == pytest.approx(
        {world.ids[HIRVITA]: 0.8, world.ids[CATUND]: -0.5}, abs=1e-3)


ZOO_DIR = Path(__file__).resolve().parents[1] / "data" / "zoo"


@pytest.mark.parametrize("fmt", ["peft", "kohya", "loha"])
def test_zoo_continue_training_resumes_the_saved_lora(fmt: str, tmp_path: Path) -> None:
    """0 extra steps gives the saved ΔW back exactly; a few more steps move it, but it stays its own source."""
    from lorasearch.zoo.train import continue_training

    assert (ZOO_DIR / "labels.csv").is_file(), "data/zoo is committed; regenerate it with `lorasearch zoo --out data/zoo`"
    row = next(r for r in csv.DictReader(open(ZOO_DIR / "labels.csv")) if r["format"] == fmt)
    src = load_lora(ZOO_DIR / row["file"])
    for extra in (0, 3):
        out = tmp_path / (f"c{extra}" if fmt == "peft" else f"c{extra}.safetensors")
        res = continue_training(row, ZOO_DIR / row["file"], extra, ZOO_DIR, out=out)
        c = compare(src, load_lora(out))
        assert len(res.losses) == extra and c.shared_modules == len(src.modules)
        assert (c.cosine > 1 - 1e-6) if extra == 0 else (0.9 < c.cosine < 1 - 1e-6)
