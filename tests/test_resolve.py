"""``lorasearch resolve``: a renamed, re-saved, converted or derived file linked back to its indexed entry."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lorasearch.cli import app
from lorasearch.dedupe import resave_with_metadata
from lorasearch.delta import Factored, LoraDelta
from lorasearch.resolve import resolve, source_url, trigger_words

pytest.importorskip("peft")

META = {
    "ss_network_module": "networks.lora",
    "modelspec.trigger_phrase": "zqx style, glowing",
    "ss_tag_frequency": json.dumps({"10_zqx": {"zqx style": 12, "1girl": 3, "glowing": 5}}),
}
REPO, REV = "someone/zqx-lora", "0123abc"


def _template(root: Path) -> LoraDelta:
    """The tiny UNet's LoRA module layout (a peft adapter with random B, read back)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorasearch.formats import load_lora
    from lorasearch.samples import ALPHA, RANK, TARGETS
    from lorasearch.tinymodels import make_tiny_unet

    torch.manual_seed(0)
    pm = get_peft_model(make_tiny_unet(0), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(root / "template"))
    return load_lora(root / "template")


def _random(t: LoraDelta, seed: int) -> LoraDelta:
    rng = np.random.default_rng(seed)
    mods = {n: Factored(rng.standard_normal(d.up.shape).astype(np.float32) * 0.1,
                        rng.standard_normal(d.down.shape).astype(np.float32) * 0.1, d.scale, d.shape)
            for n, d in t.modules.items()}
    return LoraDelta(t.family, "kohya", mods)


def _noisy(ld: LoraDelta, seed: int, share: float = 0.3) -> LoraDelta:
    """Up factors with 30 % noise: a stand-in for training further."""
    rng = np.random.default_rng(seed)
    mods = {n: Factored(d.up + share * np.std(d.up) * rng.standard_normal(d.up.shape).astype(np.float32),
                        d.down, d.scale, d.shape) for n, d in ld.modules.items()}
    return LoraDelta(ld.family, ld.format, mods)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A store holding the original (from a hub repo, labelled) and unrelated LoRAs; query files beside it."""
    from lorasearch.attribution import derivatives as dv
    from lorasearch.embed import embed
    from lorasearch.formats import load_lora
    from lorasearch.store import Store

    root = tmp_path_factory.mktemp("resolve")
    t = _template(root)
    orig = _random(t, 1)
    files = {"orig": dv.write_kohya(orig, root / "orig.safetensors", metadata=META)}
    store = Store(root / "db")
    ld = load_lora(files["orig"])
    store.add(ld, embed(ld), {"source": f"hf:{REPO}", "repo": REPO, "revision": REV, "path": "zqx.safetensors"},
              labels=["style:zqx"])
    for s in range(2, 8):
        p = dv.write_kohya(_random(t, s), root / f"other{s}.safetensors")
        o = load_lora(p)
        store.add(o, embed(o), {"source": str(root), "path": str(p)})
    store.close()
    q = root / "q"
    q.mkdir()
    files["copy"] = Path(shutil.copy(files["orig"], q / "renamed.safetensors"))
    files["header_edit"] = resave_with_metadata(files["orig"], q / "edited.safetensors",
                                                {"sshs_model_hash": hashlib.sha256(b"").hexdigest()})
    files["fp16"] = dv.write_kohya(orig, q / "fp16.safetensors", dtype="float16")
    files["alpha_half"] = dv.write_kohya(dv.scaled(orig, 0.5), q / "half.safetensors")
    files["reparam"] = dv.write_kohya(dv.reparameterised(orig, np.random.default_rng(3)), q / "reparam.safetensors")
    files["rank2"] = dv.write_kohya(dv.rank_resize(orig, 2), q / "rank2.safetensors")
    files["noise30"] = dv.write_kohya(_noisy(orig, 4), q / "noisy.safetensors")
    files["subset"] = dv.write_kohya(dv.subset(orig, lambda n: "attn2" not in n), q / "no_attn2.safetensors")
    files["unrelated"] = dv.write_kohya(_random(t, 99), q / "unrelated.safetensors")
    return root / "db", files


@pytest.mark.parametrize("name,tier,coefficient", [
    ("orig", "bytes", None),
    ("copy", "bytes", None),
    ("header_edit", "tensors", None),
    ("fp16", "update", None),
    ("alpha_half", "update", 0.5),
    ("reparam", "update", None),
    ("rank2", "lineage", None),
    ("noise30", "lineage", None),
    ("subset", "lineage", None),
    ("unrelated", None, None),
])
def test_resolve_tiers(setup: tuple[Path, dict[str, Path]], name: str, tier: str | None, coefficient: float | None) -> None:
    from lorasearch.store import Store

    db, files = setup
    with Store(db, create=False, readonly=True) as store:
        res = resolve(store, files[name])
    assert res["tier"] == tier
    if tier is None:
        assert res["match"] is None
        return
    m = res["match"]
    assert m["name"] == f"{REPO}/zqx.safetensors" and m["labels"] == ["style:zqx"]
    assert m["source_url"] == f"https://huggingface.co/{REPO}/blob/{REV}/zqx.safetensors"
    assert m["trigger_words"][:2] == ["zqx style", "glowing"] and m["top_tags"][0] == "zqx style"
    if coefficient is not None:
        assert res["evidence"]["coefficient"] == pytest.approx(coefficient, abs=1e-3)
    elif tier == "update":
        assert "coefficient" not in res["evidence"]


@pytest.mark.parametrize("meta,want", [
    ({}, []),
    ({"modelspec.trigger_phrase": "a, b"}, ["a", "b"]),
    ({"ss_tag_frequency": json.dumps({"10_sks dog": {"x": 1, "y": 3}, "e": {"x": 5}})}, ["sks dog"]),
    ({"ss_tag_frequency": "not json"}, []),
    ({"training_info": json.dumps({"trigger_word": "tok"}), "modelspec.trigger_phrase": "tok"}, ["tok"]),
    ({"trigger_word": "ohwx"}, ["ohwx"]),
])
def test_trigger_words(meta: dict[str, str], want: list[str]) -> None:
    assert trigger_words(meta) == want


@pytest.mark.parametrize("src,want", [
    ({"repo": "a/b", "revision": "r1", "path": "x/y.safetensors"}, "https://huggingface.co/a/b/blob/r1/x/y.safetensors"),
    ({"repo": "a/b", "revision": None, "path": "y.safetensors"}, "https://huggingface.co/a/b/blob/main/y.safetensors"),
    ({"repo": None, "source": "/data", "path": "/data/y.safetensors"}, "/data/y.safetensors"),
    ({}, None),
])
def test_source_url(src: dict[str, str | None], want: str | None) -> None:
    assert source_url(src) == want


def test_cli(setup: tuple[Path, dict[str, Path]]) -> None:
    db, files = setup
    runner = CliRunner()
    r = runner.invoke(app, ["resolve", str(files["fp16"]), "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tier"] == "update" and out["match"]["labels"] == ["style:zqx"]
    r = runner.invoke(app, ["resolve", str(files["rank2"]), "--db", str(db)])
    assert r.exit_code == 0 and "same LoRA as" in r.stdout and "zqx style" in r.stdout


def test_dedupe_with_db(setup: tuple[Path, dict[str, Path]]) -> None:
    db, files = setup
    r = CliRunner().invoke(app, ["dedupe", str(files["copy"].parent), "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    tiers = {Path(m["file"]).name: m["tier"] for m in out["indexed"]}
    assert "unrelated.safetensors" not in tiers
    assert set(tiers.values()) <= {"bytes", "tensors", "update", "lineage"} and tiers


@pytest.mark.parametrize("args,msg", [
    (["/no/such.safetensors", "--db", "{db}"], "no such file"),
    (["{orig}", "--db", "/no/such/store"], ""),
])
def test_cli_bad_input(setup: tuple[Path, dict[str, Path]], args: list[str], msg: str) -> None:
    db, files = setup
    args = [a.format(db=db, orig=files["orig"]) for a in args]
    r = CliRunner().invoke(app, ["resolve", *args])
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr
