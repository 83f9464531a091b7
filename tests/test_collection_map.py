"""Collection maps: layout maths, computed at index time, saved, reloaded, deterministic, kept up to date."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import run_index
from lorasearch.collection_map import (
    MAP_VIEW,
    UMAP_MIN_POINTS,
    cosine_knn,
    layout,
    load_map,
    map_path,
    normalise_layout,
    pca_2d,
    update_maps,
)
from lorasearch.store import Store

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def _clusters(n_per: int, k: int = 3, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well separated clusters of unit vectors and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    x = np.concatenate([c + 0.15 * rng.standard_normal((n_per, dim)) for c in centres])
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(k), n_per)


# --------------------------------------------------------------------------- pure maths


@pytest.mark.parametrize(("xy", "expected"), [
    (np.zeros((0, 2)), np.zeros((0, 2))),
    (np.array([[3.0, 4.0]]), np.zeros((1, 2))),
    (np.array([[1.0, 1.0], [1.0, 1.0]]), np.zeros((2, 2))),
    (np.array([[0.0, 0.0], [4.0, 2.0]]), np.array([[-1.0, -0.5], [1.0, 0.5]])),
    (np.array([[10.0, 0.0], [12.0, 0.0], [14.0, 8.0]]), np.array([[-0.5, -1.0], [0.0, -1.0], [0.5, 1.0]])),
])
def test_normalise_layout(xy: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(normalise_layout(xy), expected)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 14])
def test_pca_2d_shapes_and_signs(n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 16))
    out = pca_2d(x)
    assert out.shape == (n, 2)
    np.testing.assert_array_equal(out, pca_2d(x.copy()))
    for j in range(2):
        col = out[:, j]
        if np.abs(col).max(initial=0) > 1e-12:
            assert col[np.argmax(np.abs(col))] > 0  # sign convention: largest loading positive


def test_pca_2d_recovers_the_dominant_directions() -> None:
    rng = np.random.default_rng(1)
    t = rng.standard_normal((40, 2)) * [10.0, 3.0]
    basis = np.linalg.qr(rng.standard_normal((32, 2)))[0].T
    x = t @ basis + 0.01 * rng.standard_normal((40, 32))
    out = pca_2d(x)
    # the layout is the planted plane up to rotation/reflection: pairwise distances agree
    d_in = np.linalg.norm(t[:, None] - t[None], axis=-1)
    d_out = np.linalg.norm(out[:, None] - out[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, rtol=0.02, atol=0.05)


def test_cosine_knn_puts_each_point_first_even_with_duplicates() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    idx, dist = cosine_knn(x, 3)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]
    assert dist[:, 0].tolist() == [0.0] * 4
    assert idx[0, 1] == 1 and dist[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(dist, axis=1) >= -1e-6)  # nearest first


@pytest.mark.parametrize(("n", "method"), [(1, "pca"), (5, "pca"), (UMAP_MIN_POINTS - 1, "pca"),
                                           (UMAP_MIN_POINTS, "umap"), (45, "umap")])
def test_layout_method_by_size_is_deterministic_and_in_range(n: int, method: str) -> None:
    x, _ = _clusters(n, k=1, seed=n)
    xy, got, note = layout(x)
    assert got == method
    assert (note is not None) == (method == "pca")
    assert xy.shape == (n, 2) and np.abs(xy).max() <= 1.0 + 1e-9
    again, _, _ = layout(x.copy())
    np.testing.assert_array_equal(xy, again)


def test_umap_layout_keeps_clusters_apart() -> None:
    x, labels = _clusters(12, k=3)
    xy, method, _ = layout(x)
    assert method == "umap"
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.all(labels[d.argmin(axis=1)] == labels)  # every point's nearest 2-D neighbour is in its cluster


# --------------------------------------------------------------------------- maps of a real store


def _sd15_files(shared_loras: Path) -> list[Path]:
    with open(shared_loras / "inventory.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["base_family_guess"] == "sd1.x"]
    names = sorted(r["local_name"] for r in rows)
    names.remove("timohavdk__sd-lora__new.safetensors")  # same weights as 2100-lora: a duplicate
    return [shared_loras / n for n in names]


def _ids(m: dict) -> list[int]:
    return [p["id"] for p in m["points"]]


def test_maps_follow_the_index(tmp_path: Path, shared_loras: Path) -> None:
    db = tmp_path / "db"
    sd15 = _sd15_files(shared_loras)
    first = sd15[: UMAP_MIN_POINTS - 1]
    assert len(sd15) >= UMAP_MIN_POINTS + 2

    # 1. first index: both families get a map (PCA: small), saved atomically with the store generation
    run_index([str(SAMPLES), *map(str, first)], db, progress=False)
    with Store(db) as st:
        fams = st.families()
        assert "sd15" in fams and len(fams) == 2
        gen = st.generation()
        for fam in fams:
            m = load_map(db, fam)
            assert m is not None and m["family"] == fam and m["view"] == MAP_VIEW and m["generation"] == gen
            live = [r["id"] for r in st.list(family=fam, limit=1000)]
            assert sorted(_ids(m)) == sorted(live) and m["count"] == len(live)
            assert m["method"] == "pca"
            assert {"id", "name", "x", "y", "labels"} <= set(m["points"][0])
        sd15_before = load_map(db, "sd15")
        other = next(f for f in fams if f != "sd15")
        other_file = map_path(db, other)
        other_mtime = other_file.stat().st_mtime_ns
        assert not list((db / "maps").glob(".*.tmp"))

        # deterministic: recomputing gives the same map
        assert update_maps(st, force=True)["sd15"] == "computed"
        assert load_map(db, "sd15")["points"] == sd15_before["points"]
        other_mtime = other_file.stat().st_mtime_ns

    # 2. nothing new: the maps are left alone
    run_index([str(SAMPLES), *map(str, first)], db, progress=False)
    assert load_map(db, "sd15") == sd15_before
    assert other_file.stat().st_mtime_ns == other_mtime

    # 3. more sd15 LoRAs: that map is laid out again (now with UMAP), the other family's is untouched
    run_index([str(p) for p in sd15[len(first): UMAP_MIN_POINTS + 2]], db, progress=False)
    after = load_map(db, "sd15")
    assert after is not None and after["method"] == "umap" and after["note"] is None
    assert after["count"] == UMAP_MIN_POINTS + 2 and set(_ids(sd15_before)) < set(_ids(after))
    assert other_file.stat().st_mtime_ns == other_mtime
    with Store(db) as st:
        assert after["generation"] == st.generation()
        assert update_maps(st) == {"sd15": "ok", other: "ok"}

        # 4. a relabel only rewrites the points' metadata; a deletion lays the family out again
        lid = after["points"][0]["id"]
        st.relabel(lid, ["anime"])
        assert update_maps(st, ["sd15"]) == {"sd15": "refreshed"}
        relabelled = load_map(db, "sd15")
        assert relabelled["points"][0]["labels"] == ["anime"]
        assert [(p["x"], p["y"]) for p in relabelled["points"]] == [(p["x"], p["y"]) for p in after["points"]]
        st.delete(lid)
        assert update_maps(st, ["sd15"]) == {"sd15": "computed"}
        assert lid not in _ids(load_map(db, "sd15"))

        # 5. big families are subsampled (fixed sample), with a note
        assert update_maps(st, ["sd15"], max_points=5) == {"sd15": "computed"}
        small = load_map(db, "sd15")
        assert len(small["points"]) == 5 and small["count"] == UMAP_MIN_POINTS + 1
        assert "subsample of 5" in small["note"]
        update_maps(st, ["sd15"], max_points=5, force=True)
        assert load_map(db, "sd15")["points"] == small["points"]

        # 6. a family with nothing left loses its map
        for p in load_map(db, other)["points"]:
            st.delete(p["id"])
        result = update_maps(st)
        assert result[other] == "removed" and load_map(db, other) is None and not other_file.exists()


def test_big_families_keep_their_layout_until_enough_changed(tmp_path: Path, shared_loras: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lorasearch.collection_map as cm

    monkeypatch.setattr(cm, "LAZY_MIN_POINTS", 3)  # "big" from 3 LoRAs: laid out again past 25 % change
    monkeypatch.setattr(cm, "STALE_FRACTION", 0.25)
    db = tmp_path / "db"
    sd15 = _sd15_files(shared_loras)
    run_index([str(p) for p in sd15[:8]], db, progress=False)
    base = load_map(db, "sd15")
    assert base is not None and base["count"] == 8
    xy = {p["id"]: (p["x"], p["y"]) for p in base["points"]}
    with Store(db) as st:
        gone = base["points"][0]["id"]
        st.delete(gone)  # 1 of 8 changed: layout kept, the point dropped
        assert update_maps(st) == {"sd15": "refreshed"}
    kept = load_map(db, "sd15")
    assert gone not in _ids(kept) and kept["count"] == 7
    assert all(xy[p["id"]] == (p["x"], p["y"]) for p in kept["points"])

    run_index([str(sd15[8])], db, progress=False)  # 2 of 8 changed: still kept, the newcomer noted
    noted = load_map(db, "sd15")
    assert noted["count"] == 8 and len(noted["points"]) == 7
    assert "1 LoRAs indexed since this layout are not on it yet" in noted["note"]

    run_index([str(sd15[9])], db, progress=False)  # 3 of 9 changed: laid out again
    fresh = load_map(db, "sd15")
    assert fresh["count"] == fresh["layout_count"] == len(fresh["points"]) == 9 and fresh["note"] == fresh["layout_note"]


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"family": "someone-else", "points": []}),
                                     json.dumps({"family": "sd15", "points": "nope"}), json.dumps([1, 2])])
def test_load_map_returns_none_for_missing_or_unreadable(tmp_path: Path, content: str) -> None:
    assert load_map(tmp_path, "sd15") is None
    path = map_path(tmp_path, "sd15")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert load_map(tmp_path, "sd15") is None


def test_map_file_names_are_safe(tmp_path: Path) -> None:
    for fam in ("unknown:abc123", "llm:llama/7b:4096", "../escape"):
        p = map_path(tmp_path, fam)
        assert p.parent == tmp_path / "maps" and p.suffix == ".json"
        assert os.sep not in p.name and ":" not in p.name and not p.name.startswith(".")
