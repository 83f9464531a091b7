"""``lorasearch dedupe``: tiers, keep choice, no false groupings, CLI contract."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasearch.cli import app
from lorasearch.dedupe import TIERS, UnionFind, dedupe, knn_pairs, precision, resave_with_metadata

pytest.importorskip("peft")

# file name -> expected tier of its pair with the kohya original ("orig"); None: never grouped with it
CASES: list[tuple[str, str | None]] = [
    ("renamed copy.safetensors", "bytes"),
    ("header_edit.safetensors", "tensors"),
    ("w/a_peft", "update"),
    ("w/b_diffusers/pytorch_lora_weights.safetensors", "tensors"),  # same factors and scale under diffusers keys
    ("w/d_fp16.safetensors", "update"),
    ("w/d_bf16.safetensors", "update"),
    ("w/e_reparam.safetensors", "update"),
    ("alpha_half.safetensors", "update"),
    ("rank2.safetensors", "lineage"),
    ("no_attn2.safetensors", "lineage"),
    ("trained_more", "lineage"),
    ("unrelated", None),
    ("same_seed_other_data", None),
]
ORIG = "w/c_kohya.safetensors"
# real files from different repositories whose raw A factors are nearly identical (one training
# script, one seed) but whose updates are unrelated (bench/attribution.py, shared-seed pairs)
SAME_SEED_REAL = [
    "Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors",
    "wellCh4n__pokemon-diffusers__pytorch_lora_weights.safetensors",
    "Riniii09__IAssignment2__pytorch_lora_weights.safetensors",
    "mvclab-ntust-course__course3-B11115019__pytorch_lora_weights.safetensors",
    "Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights.safetensors",
    "Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights.safetensors",
]


def _same_seed_lora(init_seed: int, data_seed: int, steps: int = 8):  # noqa: ANN202 - a peft model
    """One training script and init seed, other data (``samples.train_lora`` seeds both alike)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorasearch.samples import ALPHA, RANK, TARGETS, train_steps
    from lorasearch.tinymodels import make_tiny_unet

    torch.manual_seed(init_seed)
    pm = get_peft_model(make_tiny_unet(0), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    train_steps(pm, steps, data_seed=data_seed)
    return pm


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained tiny LoRA written by every writer, plus its copies and derivatives, and unrelated ones."""
    from lorasearch.attribution import derivatives as dv
    from lorasearch.formats import load_lora
    from lorasearch.samples import train_lora, write_copies

    root = tmp_path_factory.mktemp("dedupe")
    write_copies(train_lora(steps=8, seed=11), root / "w")
    orig = root / ORIG
    ld = load_lora(orig)
    shutil.copy(orig, root / "renamed copy.safetensors")
    resave_with_metadata(orig, root / "header_edit.safetensors",
                         {"ss_output_name": "edited", "sshs_model_hash": hashlib.sha256(b"").hexdigest()})
    dv.write_kohya(dv.scaled(ld, 0.5), root / "alpha_half.safetensors")
    dv.write_kohya(dv.rank_resize(ld, 2), root / "rank2.safetensors")
    dv.write_kohya(dv.subset(ld, lambda n: "attn2" not in n), root / "no_attn2.safetensors")
    dv.continue_training(root / "w" / "a_peft", root / "trained_more", steps=4, data_seed=11)
    train_lora(steps=8, seed=12).save_pretrained(str(root / "unrelated"))
    _same_seed_lora(11, 99).save_pretrained(str(root / "same_seed_other_data"))
    return root


@pytest.fixture(scope="module")
def result(collection: Path):  # noqa: ANN201 - a dedupe Result
    return dedupe([str(collection)])


def _index(res, path: Path) -> int:  # noqa: ANN001
    return next(i for i, it in enumerate(res.items) if Path(it.path) == path)


@pytest.mark.parametrize("name,tier", CASES)
def test_tier_with_original(collection: Path, result, name: str, tier: str | None) -> None:  # noqa: ANN001
    a, b = _index(result, collection / ORIG), _index(result, collection / name)
    assert result.pair_tier(a, b) == tier


def test_unrelated_pairs_stay_apart(collection: Path, result) -> None:  # noqa: ANN001
    un, ss = _index(result, collection / "unrelated"), _index(result, collection / "same_seed_other_data")
    assert result.pair_tier(un, ss) is None
    for i in range(len(result.items)):
        if i not in (un, ss):
            assert result.pair_tier(un, i) is None and result.pair_tier(ss, i) is None


def test_groups_json(collection: Path, result) -> None:  # noqa: ANN001
    out = result.to_json()
    assert out["files"] == len(result.items)
    tiers = [g["tier"] for g in out["groups"]]
    assert tiers == sorted(tiers, key=TIERS.index)  # strongest first
    by = {g["tier"]: g for g in out["groups"]}
    assert set(by) == set(TIERS)
    # a file stands in the group of its strongest tier; a keep stands for its group in the next one
    assert sorted(Path(f).name for f in by["bytes"]["files"]) == ["c_kohya.safetensors", "renamed copy.safetensors"]
    assert by["bytes"]["keep"] in by["tensors"]["files"]
    # the pass hashes a file in two parts: the file's own sha256 is shown
    assert by["bytes"]["evidence"]["sha256"] == hashlib.sha256(Path(by["bytes"]["keep"]).read_bytes()).hexdigest()
    assert str(collection / "header_edit.safetensors") in by["tensors"]["files"]
    assert by["tensors"]["keep"] in by["update"]["files"]
    # keep of the update group: lossless (fp32), the smallest such file
    assert Path(by["update"]["keep"]).name not in ("d_fp16.safetensors", "d_bf16.safetensors")
    coefs = {Path(r["file"]).name: r.get("coefficient") for r in by["update"]["evidence"]["versus_keep"]}
    assert coefs["alpha_half.safetensors"] == pytest.approx(0.5, abs=1e-3)
    assert coefs["d_fp16.safetensors"] is None  # a cast keeps the scale: no coefficient shown
    links = by["lineage"]["evidence"]["links"]
    assert links and all(ln["fpr"] < 1e-4 and ln["cosine"] > 0.3 for ln in links)
    json.dumps(out)


def test_never_modifies_files(collection: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in collection.rglob("*") if p.is_file()}
    dedupe([str(collection)])
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in collection.rglob("*") if p.is_file()}
    assert before == after


def test_same_seed_real_families_not_grouped(shared_loras: Path) -> None:
    res = dedupe([str(shared_loras / n) for n in SAME_SEED_REAL])
    assert res.groups == []


def test_real_collection_lineage(shared_loras: Path) -> None:
    """Checkpoints of one run are lineage, identical tensors under another header are tensors."""
    res = dedupe([str(shared_loras)])
    tensors = [sorted(Path(f).name for f in g["files"]) for g in res.groups if g["tier"] == "tensors"]
    assert ["timohavdk__sd-lora__2100-lora.safetensors", "timohavdk__sd-lora__new.safetensors"] in tensors
    assert sum(g["tier"] == "lineage" for g in res.groups) >= 5
    for g in res.groups:
        repos = {Path(f).name.split("__")[0] for f in g["files"]}
        assert len(repos) == 1, g  # every group lies within one source repository


@pytest.mark.parametrize("vecs,k,min_cos,want", [
    ([[1, 0], [1, 0], [0, 1]], 4, 0.5, [(0, 1)]),
    ([[1, 0], [0.6, 0.8], [0, 1]], 4, 0.5, [(0, 1), (1, 2)]),
    ([[1, 0]], 4, 0.0, []),
])
def test_knn_pairs(vecs: list[list[float]], k: int, min_cos: float, want: list[tuple[int, int]]) -> None:
    import numpy as np

    assert [(a, b) for a, b, _ in knn_pairs(np.asarray(vecs, dtype=np.float32), k, min_cos)] == want


@pytest.mark.parametrize("dtypes,want", [(["F32"], 3), (["F16", "F32"], 2), (["BF16"], 2), (["I64"], 0), ([], 0)])
def test_precision(dtypes: list[str], want: int) -> None:
    assert precision(dtypes) == want


def test_union_find_order_free() -> None:
    uf = UnionFind(5)
    for a, b in [(3, 4), (1, 3), (0, 2)]:
        uf.union(a, b)
    assert sorted(uf.groups().values()) == [[0, 2], [1, 3, 4]]


def test_cli_json_and_table(collection: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["dedupe", str(collection / "w"), str(collection / "renamed copy.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["files"] == 7 and {g["tier"] for g in out["groups"]} == {"bytes", "tensors", "update"}
    for g in out["groups"]:
        assert set(g) == {"tier", "files", "keep", "evidence"} and g["keep"] in g["files"]
    r = runner.invoke(app, ["dedupe", str(collection / "w")])
    assert r.exit_code == 0 and "update" in r.stdout and "keep" in r.stdout


@pytest.mark.parametrize("args", [["/no/such/folder"], []])
def test_cli_bad_input(args: list[str], tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["dedupe", *args])
    assert r.exit_code == 2
    if args:
        assert len(r.stderr.strip().splitlines()) == 1 and "no such file" in r.stderr


def test_unreadable_files_reported_not_grouped(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "b.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "c.ckpt").write_bytes(b"PK\x03\x04")
    res = dedupe([str(tmp_path)]).to_json()
    assert res["files"] == 3
    assert {Path(s["path"]).name for s in res["skipped"]} == {"a.safetensors", "b.safetensors", "c.ckpt"}
    assert [g["tier"] for g in res["groups"]] == ["bytes"]  # identical bytes, even unreadable


def _safetensors(path: Path, values: list[float], metadata: dict[str, str] | None = None) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"x": np.asarray(values, dtype=np.float32)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("content, header_ok", [
    (None, True),  # a real safetensors file
    (b"\x00" * 3, False),  # shorter than the length field
    (b"\xff" * 8 + b"{}", False),  # header length beyond the file
])
def test_split_hashes(tmp_path: Path, content: bytes | None, header_ok: bool) -> None:
    from lorasearch.dedupe import split_hashes
    from lorasearch.hashes import autov3

    p = tmp_path / "f.safetensors"
    if content is None:
        _safetensors(p, [1.0, 2.0])
    else:
        p.write_bytes(content)
    head, v3, sha, size = split_hashes(p)
    assert size == p.stat().st_size
    if header_ok:
        assert v3 == autov3(p) and sha == "" and head
    else:
        assert v3 is None and head == "" and sha == hashlib.sha256(p.read_bytes()).hexdigest()


def test_split_hashes_identify_bytes(tmp_path: Path) -> None:
    """A header edit keeps AutoV3 and changes the head; other values change AutoV3."""
    from lorasearch.dedupe import split_hashes

    a = split_hashes(_safetensors(tmp_path / "a.safetensors", [1.0, 2.0], {"k": "1"}))
    b = split_hashes(_safetensors(tmp_path / "b.safetensors", [1.0, 2.0], {"k": "2"}))
    c = split_hashes(_safetensors(tmp_path / "c.safetensors", [1.0, 3.0], {"k": "1"}))
    d = split_hashes(Path(shutil.copy(tmp_path / "a.safetensors", tmp_path / "d.safetensors")))
    assert a[1] == b[1] and a[0] != b[0]
    assert a[1] != c[1]
    assert a == d


def test_content_prekey_and_key() -> None:
    """Equal contents in another module order share both keys; one changed value changes the exact key."""
    import numpy as np

    from lorasearch.dedupe import content_key, content_prekey
    from lorasearch.delta import Factored, LoraDelta

    rng = np.random.default_rng(0)
    mods = {f"m{i}": Factored(rng.standard_normal((6, 2)).astype(np.float32),
                              rng.standard_normal((2, 5)).astype(np.float32), 0.5, (6, 5)) for i in range(3)}
    a = LoraDelta("sd15", "kohya", mods)
    b = LoraDelta("sd15", "kohya", dict(reversed(list(mods.items()))))
    up = mods["m1"].up.copy()
    up[2, 1] += 1.0  # not one of the values the pre-key samples
    c = LoraDelta("sd15", "kohya", {**mods, "m1": Factored(up, mods["m1"].down, 0.5, (6, 5))})
    assert content_prekey(a) == content_prekey(b) and content_key(a) == content_key(b)
    assert content_prekey(a) == content_prekey(c) and content_key(a) != content_key(c)


def test_collection_null_keeps_a_crowd_of_look_alikes_and_leaves_out_a_lineage() -> None:
    import numpy as np

    from lorasearch.dedupe import CROWD_NEIGHBOURS, collection_calibration
    from lorasearch.delta import Dense, LoraDelta

    rng = np.random.default_rng(0)
    shared = rng.standard_normal((16, 16))
    crowd = [shared + 0.9 * rng.standard_normal((16, 16)) for _ in range(CROWD_NEIGHBOURS + 6)]  # pairwise cos ~0.55
    base = rng.standard_normal((16, 16))
    lineage = [base + 0.5 * rng.standard_normal((16, 16)) for _ in range(3)]  # pairwise cos ~0.8, no crowd
    loose = [rng.standard_normal((16, 16)) for _ in range(40)]
    lds = [LoraDelta("unknown:x", "synthetic", {"m": Dense(w)}) for w in crowd + lineage + loose]
    cal = collection_calibration("unknown", lds)
    assert cal.excluded_cosine == 3  # the lineage's three pairs; the crowd's pairs stay in the null
    assert cal.cosine.max() > 0.4 and cal.fpr(0.6) > 1e-2


def test_store_calibrates_the_real_family_of_a_bucket(collection: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import lorasearch.attribution.calibration as cal
    from indexer import run_index
    from lorasearch.store import Store

    run_index([str(collection / "w")], tmp_path / "db", workers=1, progress=False)
    seen: list[str] = []
    real = cal.get_calibration
    monkeypatch.setattr(cal, "get_calibration", lambda st, fam, *a, **k: seen.append(fam) or real(st, fam, *a, **k))
    store = Store(tmp_path / "db")
    try:
        res = dedupe([str(collection)], store=store)
        assert seen and set(seen) <= set(store.families())  # the store's null, not the bucket name
    finally:
        store.close()
    orig = _index(res, collection / ORIG)
    assert res.pair_tier(orig, _index(res, collection / "rank2.safetensors")) == "lineage"
    assert res.pair_tier(orig, _index(res, collection / "unrelated")) is None
