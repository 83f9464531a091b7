"""The style zoo in its seconds-long configuration (tiny UNet, a few steps).

Builds one 2 genres x 2 styles x 2 LoRAs zoo (+ the paper subset) per module and
checks: every format is read back by ``load_lora`` into one family, labels.csv is
complete, resume skips finished LoRAs, the same seed gives the same tensors,
different seeds different ones, and ``generate`` reproduces the stored images.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("lycoris")

from lorasearch.formats.load import load_lora  # noqa: E402
from lorasearch.zoo import LABEL_FIELDS, build_zoo, generate  # noqa: E402
from lorasearch.zoo.build import GEN_SEED  # noqa: E402
from lorasearch.zoo.model import GEN_STRENGTH, eval_content  # noqa: E402
from lorasearch.zoo.styles import GENRES, select_styles  # noqa: E402
from lorasearch.zoo.train import QUICK, lora_seed  # noqa: E402

ARGS = dict(genres=2, styles_per_genre=2, loras_per_style=2, seed=0, paper=True, quick=True)
# zoo format -> (reader format, delta kind)
READ_AS = {"peft": ("peft", "Factored"), "diffusers": ("diffusers", "Factored"), "kohya": ("kohya", "Factored"),
           "loha": ("kohya", None), "lokr": ("kohya", "Kronecker")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    summary = build_zoo(out, **ARGS)
    assert summary["built"] == summary["total"] == 16  # 8 mixed + 2 paper per style
    return out


def _rows(zoo: Path) -> list[dict[str, str]]:
    with open(zoo / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_labels_complete(zoo: Path) -> None:
    with open(zoo / "labels.csv", newline="") as f:
        assert next(csv.reader(f)) == LABEL_FIELDS
    rows = _rows(zoo)
    assert len(rows) == 16
    assert sum(r["subset"] == "paper" for r in rows) == 8
    for r in rows:
        assert (zoo / r["file"]).exists()
        for key in ("train_images", "generated_images"):
            assert len(list((zoo / r[key]).glob("*.png"))) == QUICK.n_images
    mixed = [r for r in rows if r["subset"] == "mixed"]
    assert len({r["seed"] for r in mixed}) == len(mixed), "mixed LoRAs must not share seeds"
    assert {r["format"] for r in mixed} == set(READ_AS)
    paper = [r for r in rows if r["subset"] == "paper"]
    assert len({(r["seed"], r["rank"], r["format"], r["steps"], r["lr"]) for r in paper}) == 1
    assert sorted((r["genre"], r["style"]) for r in paper) == sorted(
        (s.genre, s.name) for s in select_styles(2, 2) for _ in range(2))
    assert (zoo / "README.md").read_text().count("labels.csv") >= 1
    assert (zoo / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_formats_read_back_as_one_family(zoo: Path) -> None:
    families = set()
    for r in _rows(zoo):
        ld = load_lora(zoo / r["file"])
        fmt, kind = READ_AS[r["format"]]
        assert ld.format == fmt, r["file"]
        kinds = {type(d).__name__ for d in ld.weight_modules().values()}
        assert kind is None or kinds == {kind}, (r["file"], kinds)
        assert ld.ranks() and max(ld.ranks()) > 0
        assert any(np.abs(d.matrix()).max() > 0 for d in ld.weight_modules().values()), "untrained LoRA"
        families.add(ld.family)
    assert len(families) == 1 and families.pop().startswith("unknown:")


def test_paper_loras_of_a_style_differ_only_in_training_images(zoo: Path) -> None:
    from lorasearch.zoo.styles import GENRES
    from lorasearch.zoo.train import paper_spec, spec_from_row, training_subset
    import torch

    rows = [r for r in _rows(zoo) if r["subset"] == "paper"]
    for r in rows:  # labels rows map back to their specs (index from the file name)
        assert spec_from_row(r, 0, QUICK).stem in r["file"]
    style = GENRES["palette"][0]
    a, b = paper_spec(0, style, QUICK, 0), paper_spec(0, style, QUICK, 1)
    ga, gb = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(b.seed)
    sa, sb = training_subset(a, QUICK.pool, ga), training_subset(b, QUICK.pool, gb)
    assert not torch.equal(sa, sb)
    assert torch.equal(torch.randn(4, generator=ga), torch.randn(4, generator=gb)), "one shared stream"


def test_resume_skips_and_settings_are_kept(zoo: Path) -> None:
    assert build_zoo(zoo, **ARGS)["built"] == 0
    with pytest.raises(ValueError, match="another --out"):
        build_zoo(zoo, **dict(ARGS, seed=1))


def _dense(path: Path) -> dict[str, np.ndarray]:
    return {k: d.matrix() for k, d in load_lora(path).weight_modules().items()}


def test_same_seed_same_tensors_different_seeds_differ(zoo: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from lorasearch.cli import app

    res = CliRunner().invoke(app, ["zoo", "--out", str(tmp_path), "--genres", "1", "--styles-per-genre", "1",
                                   "--loras-per-style", "1", "--no-paper-subset", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == 1
    name = "loras/palette/sepia/palette-sepia-00-peft/adapter_model.safetensors"
    a, b = load_file(str(zoo / name)), load_file(str(tmp_path / name))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    rows = [r for r in _rows(zoo) if r["subset"] == "mixed" and r["style"] == "sepia"]
    d0, d1 = _dense(zoo / rows[0]["file"]), _dense(zoo / rows[1]["file"])
    k = sorted(d0)[0]
    assert not np.allclose(d0[k], d1[k])


@pytest.mark.parametrize("keys", [
    [(0, g, s, i) for g in GENRES for s in ("a", "b") for i in range(5)],
    [(z, "palette", "sepia", 0) for z in range(20)],
])
def test_lora_seeds_are_independent(keys: list[tuple[int, str, str, int]]) -> None:
    seeds = [lora_seed(*k) for k in keys]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [lora_seed(*k) for k in keys]


def test_generate_reproduces_stored_images(zoo: Path) -> None:
    from PIL import Image

    for r in _rows(zoo)[:5]:
        stored = np.stack([np.asarray(Image.open(p)) for p in sorted((zoo / r["generated_images"]).glob("*.png"))])
        init, prompts = eval_content(QUICK.n_images)
        again = generate(zoo / "model", zoo / r["file"], seed=GEN_SEED, prompts=prompts, steps=QUICK.gen_steps,
                         init=init, strength=GEN_STRENGTH)
        assert again.shape == stored.shape and again.dtype == np.uint8
        assert np.array_equal(again, stored), r["file"]
    base = generate(zoo / "model", None, n=2, seed=1, steps=2)
    assert base.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("genre", list(GENRES))
def test_styles_deterministic_and_distinct(genre: str) -> None:
    from lorasearch.zoo.render import content_pool

    imgs = np.stack([c.image for c in content_pool(6, seed=3)])
    outs = []
    for style in GENRES[genre]:
        a = np.stack([style(im) for im in imgs])
        assert a.shape == imgs.shape and a.min() >= 0 and a.max() <= 1
        assert np.array_equal(a, np.stack([style(im) for im in imgs]))
        outs.append(a)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).mean() > 0.01, (genre, i, j)
