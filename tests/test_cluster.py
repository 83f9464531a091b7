"""Clustering module, image baselines and ``lorasearch cluster``.

The CLIP and DINOv2 tests build *tiny random* models from configs locally
(``CLIPVisionConfig`` / ``Dinov2Config`` with a few hundred parameters, saved
with ``save_pretrained`` into a temp folder): they exercise the loading and
feature code path only; nothing is downloaded and the features mean nothing.
The end-to-end test indexes a small collection of tiny peft LoRAs trained here
(styles = shared training data, LoRAs of a style differ in init seed) with
coloured PNG "training images".
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lorasearch.cluster import metrics as M
from lorasearch.cluster.algorithms import METHODS, cluster, prepare
from lorasearch.errors import BadInput
from lorasearch.cluster.baselines import (
    clip_extractor,
    dino_extractor,
    effnet_extractor,
    lora_features,
    make_extractor,
    pixel_features,
)

# --------------------------------------------------------------------------- metrics on hand-made labels

T = np.array([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("pred, ari, nmi, purity", [
    (np.array([5, 5, 5, 7, 7, 7]), 1.0, 1.0, 1.0),                  # perfect, renamed
    (np.array([0, 0, 0, 0, 0, 0]), 0.0, 0.0, 0.5),                  # one cluster
    # by hand: pair sum 2, expected 6*3/15 = 1.2, max 4.5 -> ARI 0.8/3.3; MI = (2/3) ln 2 over (ln 2 + ln 3)/2
    (np.array([0, 0, 1, 1, 2, 2]), 0.8 / 3.3, 0.5158037429, 5 / 6),
])
def test_cluster_scores(pred: np.ndarray, ari: float, nmi: float, purity: float) -> None:
    assert M.ari(T, pred) == pytest.approx(ari, abs=1e-6)
    assert M.nmi(T, pred) == pytest.approx(nmi, abs=1e-6)
    assert M.purity(T, pred) == pytest.approx(purity)


def test_scores_match_scikit_learn_on_random_labelings() -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        t, p = rng.integers(0, int(rng.integers(1, 6)), n), rng.integers(0, int(rng.integers(1, 6)), n)
        assert M.ari(t, p) == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-9)
        assert M.nmi(t, p) == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-9)
        assert M.ami(t, p) == pytest.approx(skm.adjusted_mutual_info_score(t, p), abs=1e-9)


def test_string_labels_and_ami() -> None:
    assert M.ami(["a", "a", "b", "b"], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert M.ari(["x", "y", "x", "y"], ["p", "p", "q", "q"]) < 0


X2 = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
L2 = np.array(["a", "a", "b", "b"])


@pytest.mark.parametrize("x, labels, p1, ap", [
    (X2, L2, 1.0, 1.0),
    # interleaved: each point's nearest other point has the other label; by hand the
    # 'a' queries find their match at rank 3, the 'b' queries at rank 2: mAP = (1/3+1/3+1/2+1/2)/4
    (np.array([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.05, 0.95]]), np.array(["a", "a", "b", "b"]), 0.0, 5 / 12),
])
def test_retrieval_scores(x: np.ndarray, labels: np.ndarray, p1: float, ap: float) -> None:
    assert M.precision_at_k(x, labels, 1) == pytest.approx(p1)
    assert M.mean_average_precision(x, labels) == pytest.approx(ap)


def test_average_precision_hand_value() -> None:
    # query 0 ranks [2 (b), 1 (a)]: AP = 1/2; its label has one other member
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.2]])
    aps = M.average_precision_samples(x, np.array(["a", "a", "b"]))
    assert aps[0] == pytest.approx(0.5)
    assert aps[2] == 0.0  # no other 'b' to find


def test_silhouette_separated() -> None:
    assert M.silhouette(X2, L2) > 0.8
    assert M.silhouette(X2, np.array(["a", "b", "a", "b"])) < 0


def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    v = np.random.default_rng(0).normal(size=200)
    lo, hi = M.bootstrap_ci(lambda i: float(v[i].mean()), len(v), 300, seed=1)
    assert lo < v.mean() < hi
    assert (lo, hi) == M.bootstrap_ci(lambda i: float(v[i].mean()), len(v), 300, seed=1)


def test_cka_properties() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert M.linear_cka(x, x) == pytest.approx(1.0)
    assert M.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)          # orthogonal + isotropic scale
    assert M.linear_cka(x, x + 5.0) == pytest.approx(1.0)              # translation (centred)
    y = rng.normal(size=(30, 8))
    assert M.linear_cka(x, y) == pytest.approx(M.linear_cka(y, x))   # symmetric
    assert 0.0 <= M.linear_cka(x, y) < 0.6


def test_knn_overlap() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    assert M.knn_overlap(x, x, 3) == 1.0
    assert M.knn_overlap(x, 2 * x, 3) == 1.0
    assert M.knn_overlap(x, rng.normal(size=(20, 5)), 3) < 0.6


@pytest.mark.parametrize("method", METHODS)
def test_algorithms_recover_blobs(method: str) -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 5
    x = np.concatenate([c + rng.normal(scale=0.3, size=(10, 6)) for c in centres])
    truth = np.repeat([0, 1, 2], 10)
    assert M.ari(truth, cluster(prepare(x), 3, method)) > 0.9


def test_centering_removes_shared_offset() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(10, 4)) * 0.1 + [1, 0, 0, 0], rng.normal(size=(10, 4)) * 0.1 + [-1, 0, 0, 0]])
    x = x + [0, 0, 0, 50]  # a big component every vector shares
    truth = np.repeat([0, 1], 10)
    assert M.silhouette(prepare(x, centre=True), truth) > M.silhouette(prepare(x), truth)


# --------------------------------------------------------------------------- image features

IMGS = torch.rand(3, 3, 32, 32)


def test_pixel_and_effnet_shapes() -> None:
    p = pixel_features(IMGS)
    assert p.shape[0] == 3 and p.ndim == 2 and np.isfinite(p).all()
    e = effnet_extractor()(IMGS)
    assert e.shape == (3, 1280) and np.isfinite(e).all()


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=12)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    return folder


def _tiny_dino(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8)
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


def test_clip_dino_code_path_with_tiny_random_models(tmp_path: Path) -> None:
    c = clip_extractor(str(_tiny_clip(tmp_path / "clip")))(IMGS)
    assert c.shape == (3, 12)
    d = dino_extractor(str(_tiny_dino(tmp_path / "dino")))(IMGS)
    assert d.shape == (3, 16)


def test_missing_weights_one_line_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BadInput) as exc:
        make_extractor("clip=nobody/no-such-model")
    msg = str(exc.value)
    assert "\n" not in msg and "--baselines clip=FOLDER" in msg


# --------------------------------------------------------------------------- end to end

STYLES = {"s0": ("warm", (220, 60, 40)), "s1": ("warm", (240, 150, 30)), "s2": ("cool", (30, 80, 220)),
          "s3": ("cool", (40, 200, 200))}
PER_STYLE = 3
RANK8 = 2  # extra rank-8 LoRAs of style s0: another factor signature, where the paper's view is undefined


def _write_png(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(colour)[None, None, :] + rng.normal(scale=25, size=(16, 16, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _collection(root: Path) -> Path:
    """PEFT LoRAs: one training set per style, one init seed per LoRA; labels.csv and image folders."""
    from peft import LoraConfig, get_peft_model

    from lorasearch.samples import TARGETS, train_steps
    from lorasearch.tinymodels import make_tiny_unet

    rows = []
    runs = [(si, style, j, 4) for si, style in enumerate(STYLES) for j in range(PER_STYLE)]
    runs += [(0, "s0", PER_STYLE + j, 8) for j in range(RANK8)]
    for si, style, j, rank in runs:
        genre, colour = STYLES[style]
        seed = 100 + si * 10 + j
        unet = make_tiny_unet(0)
        torch.manual_seed(seed)  # after the UNet: it seeds the global generator itself
        pm = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=4, target_modules=TARGETS))
        train_steps(pm, 8, data_seed=si)
        name = f"{style}_{j}"
        pm.save_pretrained(root / "loras" / name)
        for sc in ("train", "gen"):
            d = root / sc / name
            d.mkdir(parents=True)
            for k in range(2):
                _write_png(d / f"{k}.png", colour, seed * 10 + k + (0 if sc == "train" else 5))
        rows.append({"file": f"loras/{name}", "genre": genre, "style": style, "seed": seed, "rank": rank, "alpha": 4,
                     "steps": 8, "lr": 0.01, "format": "peft", "subset": "mixed", "train_images": f"train/{name}",
                     "generated_images": f"gen/{name}"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from indexer import run_index

    root = tmp_path_factory.mktemp("zoo")
    labels = _collection(root)
    db = root / "db"
    summary = run_index([str(root / "loras")], db, workers=1, progress=False)
    assert summary["added"] == len(STYLES) * PER_STYLE + RANK8, summary
    return db, labels


def test_lora_features_mask(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    _write_png(d / "0.png", (10, 20, 30), 0)
    x, mask = lora_features(pixel_features, [d, None, tmp_path / "missing"], progress=False)
    assert mask.tolist() == [True, False, False] and np.linalg.norm(x[1]) == 0


def test_cluster_command_end_to_end(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    from lorasearch.cli import app

    db, labels = indexed
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["cluster", "--db", str(db), "--labels", str(labels), "--out", str(out),
                                   "--baselines", "pixel", "--bootstrap", "20", "--json",
                                   "--views", "delta", "--views", "style", "--views", "paper"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["level"] == "style"
    assert {"delta", "style", "paper", "style+centred"} <= set(d["views"])
    assert {"pixel/train", "pixel/gen"} <= set(d["baselines"])
    for s in (*d["views"].values(), *d["baselines"].values()):
        assert set(s) == {"ari", "nmi", "ami", "purity", "silhouette", "p_at_k", "map"}
    # styles are separable by construction (shared training data; solid colours)
    assert d["views"]["delta"]["ari"] > 0.5
    assert d["baselines"]["pixel/train"]["ari"] > 0.5
    assert any(k.startswith("delta vs pixel") for k in d["agreement"])
    metrics = json.loads((out / "metrics.json").read_text())
    paper = metrics["levels"]["style"]["views"]["paper"]
    n_rank4 = len(STYLES) * PER_STYLE
    assert paper["n"] == n_rank4 and f"defined on {n_rank4}/{n_rank4 + RANK8} LoRAs" in paper["note"]
    assert metrics["levels"]["style"]["views"]["delta"]["n"] == n_rank4 + RANK8
    for name in ("report.md", "report.html", "metrics.json", "scatter_delta.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "<svg" in html and "<script>" in html
    assert "src=" not in html and "cdn" not in html.lower()  # self-contained: nothing fetched


@pytest.mark.parametrize("args, needle", [
    (["--level", "era"], "--level"),
    (["--views", "nope"], "unknown view"),
    (["--baselines", "vgg"], "unknown baseline"),
    (["--labels", "/nonexistent.csv"], "labels file not found"),
])
def test_cluster_command_bad_input(indexed: tuple[Path, Path], tmp_path: Path, args: list[str], needle: str) -> None:
    from lorasearch.cli import app

    db, labels = indexed
    base = {"--db": str(db), "--labels": str(labels), "--out": str(tmp_path / "o")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["cluster", *[x for kv in base.items() for x in kv], "--no-plots", "--bootstrap", "0"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1


def test_join_by_path_then_by_sha256(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from lorasearch.cluster.evaluate import join
    from lorasearch.cluster.views import all_rows
    from lorasearch.store import Store

    db, labels = indexed
    moved = tmp_path / "moved"
    shutil.copytree(labels.parent / "loras", moved / "loras")  # same files, paths the store never saw
    shutil.copy(labels, moved / "labels.csv")
    with Store(db, create=False, readonly=True) as store:
        rows = all_rows(store)
        by_path, missing = join(store, labels, rows)
        by_sha, missing2 = join(store, moved / "labels.csv", rows)
    assert not missing and not missing2
    assert [j.lora_id for j in by_path] == [j.lora_id for j in by_sha]
