"""lorasearch.search on real SD1.5 files: self-queries, transformed copies, views, families, exactness."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lorasearch.delta import Factored, LoraDelta
from lorasearch.embed import embed
from lorasearch.errors import BadInput
from lorasearch.formats import load_lora
from lorasearch.search import DeltaCache, query
from lorasearch.store import Store

RESULT_FIELDS = {"id", "name", "source", "path", "file_sha256", "autov3", "family", "format", "score", "labels", "exact"}


def sd15_files(folder: Path, n: int = 10, siblings: bool = True) -> list[Path]:
    """The first n SD1.5 files of the inventory, plus a pair of checkpoints of one training run (cosine ~0.79)."""
    rows = list(csv.DictReader(open(folder / "inventory.tsv", encoding="utf-8"), delimiter="\t"))
    names = [r["local_name"] for r in rows if r["base_family_guess"] == "sd1.x" and r["local_name"].endswith(".safetensors")]
    pair = [x for x in names if x.startswith("reddinft__sandmantales-hackathon")] if siblings else []
    return [folder / x for x in names[:n] + [s for s in pair if s not in names[:n]]]


def transformed(ld: LoraDelta, seed: int) -> LoraDelta:
    """Same update, other factors: up·G and G⁻¹·down with a random G, cast to fp16, ΔW halved through the up factor."""
    rng = np.random.default_rng(seed)
    mods = {}
    for name, d in ld.modules.items():
        assert isinstance(d, Factored)
        g = rng.standard_normal((d.rank, d.rank)) + 2 * np.eye(d.rank)
        up = (0.5 * d.up.astype(np.float64) @ g).astype(np.float16)
        down = (np.linalg.solve(g, d.down.astype(np.float64))).astype(np.float16)
        mods[name] = Factored(up, down, d.scale, d.shape)
    return LoraDelta(ld.family, "transformed", mods, source={"path": "copy"})


def build(root: Path, files: list[Path], keep_files: bool = True) -> tuple[Store, dict[int, LoraDelta]]:
    store = Store(root, keep_files=keep_files)
    lds = [load_lora(f) for f in files]
    res = store.add_many([(ld, embed(ld), {"source": str(f.parent), "path": str(f)}) for ld, f in zip(lds, files)])
    assert all(new for _, new in res)
    return store, {lid: ld for (lid, _), ld in zip(res, lds)}


@pytest.fixture(scope="module")
def indexed(shared_loras: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[int, LoraDelta]]:
    return build(tmp_path_factory.mktemp("store"), sd15_files(shared_loras))


def test_self_query_is_rank_one_exact(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    store, lds = indexed
    assert len(lds) >= 10 and all(ld.family == "sd15" for ld in lds.values())
    cache = DeltaCache()
    for lid, ld in lds.items():
        r = query(store, ld, k=5, cache=cache)
        assert (r["family"], r["view"], r["exact"]) == ("sd15", "delta", True)
        top = r["results"][0]
        assert top["id"] == lid and top["score"] == pytest.approx(1.0, abs=1e-5)
        assert RESULT_FIELDS <= set(top) and top["path"] == ld.source["path"]
        assert top["file_sha256"] == ld.source["file_sha256"] and top["autov3"] == ld.source["autov3"]
        assert all(x["exact"] for x in r["results"]) and r["results"][1]["score"] < 0.9
        assert [x["score"] for x in r["results"]] == sorted((x["score"] for x in r["results"]), reverse=True)
    assert cache.hits > 0  # candidates are loaded once, then served from the cache


def test_transformed_copy_finds_its_original(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    store, lds = indexed
    for lid, ld in lds.items():
        r = query(store, transformed(ld, lid), k=3)
        top = r["results"][0]
        assert r["exact"] and top["id"] == lid, (ld.source["path"], r["results"])
        assert top["score"] > 0.995 and top["coefficient"] == pytest.approx(2.0, rel=0.02)  # ΔW_orig ≈ 2·ΔW_copy
        assert r["results"][1]["score"] < 0.9


def test_sibling_checkpoints_rank_second(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    store, lds = indexed
    sib = [i for i, ld in lds.items() if "sandmantales" in ld.source["path"]]
    assert len(sib) == 2
    r = query(store, lds[sib[0]], k=3)
    assert [x["id"] for x in r["results"][:2]] == sib and 0.6 < r["results"][1]["score"] < 0.95


def test_style_views_rerank_from_sketches(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    store, lds = indexed
    lid, ld = next(iter(lds.items()))
    for groups, view in ((None, "style"), (["attention"], "style:attention"), (["attention", "conv"], "style")):
        r = query(store, ld, view="style", groups=groups, k=3)
        assert (r["view"], r["exact"]) == (view, False)
        assert r["results"][0]["id"] == lid and r["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    r = query(store, ld, view="style", groups=["feed_forward"])
    assert r["results"] == [] and "no modules" in r["message"]


def test_other_family_and_bad_view(indexed: tuple[Store, dict[int, LoraDelta]], shared_loras: Path) -> None:
    store, lds = indexed
    ld = next(iter(lds.values()))
    other = LoraDelta("flux", ld.format, {f"transformer.x.{n}": d for n, d in ld.modules.items()})
    r = query(store, other)
    assert r["results"] == [] and r["message"] == "no indexed LoRAs of family flux" and r["exact"] is False
    with pytest.raises(BadInput):
        query(store, ld, view="clip")
    with pytest.raises(BadInput):
        query(store, ld, view="style", groups=["mlp"])
    assert query(store, ld, view="paper")["view"] == "paper"


def test_without_file_copies_scores_come_from_sketches(shared_loras: Path, tmp_path: Path) -> None:
    files = sd15_files(shared_loras, 4, siblings=False)
    store, lds = build(tmp_path, files, keep_files=False)
    for lid, ld in lds.items():
        r = query(store, transformed(ld, 1), k=3)
        assert r["exact"] is False and r["results"][0]["id"] == lid
        assert r["results"][0]["score"] == pytest.approx(1.0, abs=0.01)
    lid, ld = next(iter(lds.items()))
    assert query(store, ld, exact=False)["exact"] is False


def test_deleted_loras_are_not_returned(shared_loras: Path, tmp_path: Path) -> None:
    store, lds = build(tmp_path, sd15_files(shared_loras, 3, siblings=False))
    lid, ld = next(iter(lds.items()))
    assert store.delete(lid)
    r = query(store, ld, k=5)
    assert lid not in [x["id"] for x in r["results"]] and len(r["results"]) == 2


def test_delta_cache_is_bounded(shared_loras: Path) -> None:
    files = sd15_files(shared_loras, 3, siblings=False)
    cache = DeltaCache(max_bytes=files[0].stat().st_size + 10)
    for f in files:
        cache.get(f.name, f)
    assert len(cache) == 1 and cache.misses == 3
    cache.get(files[-1].name, files[-1])
    assert cache.hits == 1


def test_query_searches_every_family_whose_table_fits(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    """SD1.5 and SD2 share module names (and most shapes): a query read as sd2 whose modules all fit
    the sd15 table is searched there too, and its sd15 original comes first."""
    store, lds = indexed
    lid, ld = next(iter(lds.items()))
    r = query(store, LoraDelta("sd2", ld.format, dict(ld.modules)), k=3)
    assert r["family"] == "sd2" and r["families_searched"] == ["sd15"]
    assert r["results"][0]["id"] == lid and r["results"][0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert r["results"][0]["family"] == "sd15" and r["exact"]
    assert query(store, ld, k=1)["families_searched"] == ["sd15"]  # attn2 k/v of width 768 do not fit sd2


def test_batched_exact_scores_match_frobenius_compare(indexed: tuple[Store, dict[int, LoraDelta]]) -> None:
    from lorasearch.frobenius import compare
    from lorasearch.search import exact_compare, factor_pack

    store, lds = indexed
    items = list(lds.values())[:4]
    items.append(transformed(items[0], 3))
    dropped = LoraDelta(items[1].family, "x", {n: d for n, d in items[1].modules.items() if "attn2" not in n})
    items.append(dropped)
    for a in items:
        for b in items:
            want = compare(a, b)
            got = exact_compare(a, factor_pack(a), b, factor_pack(b))
            assert got["shared_modules"] == want.shared_modules
            assert got["score"] == pytest.approx(want.cosine, abs=1e-9)
            assert got["coefficient"] == pytest.approx(want.coefficient, rel=1e-9, abs=1e-12)


def test_delta_cache_packs_once_and_counts_their_bytes(shared_loras: Path) -> None:
    f = sd15_files(shared_loras, 1, siblings=False)[0]
    cache = DeltaCache()
    ld, pack = cache.packed(f.name, f)
    assert pack.nbytes > 0 and cache._bytes == f.stat().st_size + pack.nbytes
    again = cache.packed(f.name, f)
    assert again[0] is ld and again[1] is pack and cache.hits == 1 and cache._bytes == f.stat().st_size + pack.nbytes
