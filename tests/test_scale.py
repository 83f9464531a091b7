"""Large-index support at toy sizes: the budget policy, a store built from shards, memory-mapped IVF loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import shards as sh
from lorasearch.errors import BadInput
from lorasearch.store import EntryRecord, IndexPolicy, Store, parse_bytes

DIM = 32


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((12, DIM))
    x = (c[rng.integers(0, 12, n)] + 0.7 * rng.standard_normal((n, DIM))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _records(x: np.ndarray, start: int = 0) -> list[EntryRecord]:
    return [EntryRecord(autov3=f"{start + i + 1:064X}", family="bench", format="synthetic", k=4, dim=DIM,
                        sketch_version=1, vectors={"delta": x[i]}, source={"source": "synthetic", "path": f"v{start + i}"})
            for i in range(len(x))]


@pytest.mark.parametrize("n, dim, memory, ms, kind, codec", [
    (10_000, 1024, 2 * 2**30, 10.0, "flat", None),
    (10_000, 1024, 2 * 2**30, 1.0, "hnsw", None),          # a flat scan would take ~2.8 ms
    (100_000, 1024, 2 * 2**30, 10.0, "hnsw", None),
    (100_000, 1024, 256 * 2**20, 10.0, "ivf", "SQ8"),       # the graph (426 MB) does not fit
    (1_000_000, 1024, 2 * 2**30, 10.0, "ivf", "SQ8"),
    (1_000_000, 1024, 512 * 2**20, 10.0, "ivf", "PQ128x8"),
    (3_000, 32, 16 * 1024, 10.0, "ivf", "PQ4x4"),        # 32 training vectors: 16 centroids per sub-quantizer
])
def test_policy_from_budget(n: int, dim: int, memory: int, ms: float, kind: str, codec: str | None) -> None:
    p = IndexPolicy.from_budget(memory, ms, flat_max=20_000 if n > 5_000 else 100, hnsw_max=1_000_000 if n > 5_000 else 200)
    assert p.choose(n, dim) == kind
    if codec is not None:
        plan = p.ivf_plan(n, dim)
        assert plan["codec"] == codec
        assert plan["train"] <= max(memory // (16 * dim), 1)
        assert plan["nlist"] <= max(plan["train"] // 32, 1)
        assert plan["code_bytes"] <= 0.6 * memory or codec.startswith("PQ")


def test_million_plan_fits_budget() -> None:
    plan = IndexPolicy().ivf_plan(1_000_000, 1024)
    assert (plan["nlist"], plan["codec"], plan["train"]) == (4096, "SQ8", 131_072)
    assert plan["code_bytes"] + plan["quantizer_bytes"] + 4 * plan["train"] * 1024 < 2 * 2**30
    assert plan["est_query_ms"] <= 10.0


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000),
                                         ("4096", 4096), ("64 KiB", 65536)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "2 parsecs"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(BadInput):
        parse_bytes(text)


def test_store_from_shards_ivf_mmap_and_growth(tmp_path: Path) -> None:
    n = 3000
    x = _clustered(n + 200, seed=3)
    folder = tmp_path / "shards"
    for s in range(0, n, 1000):  # three shards, merged in one transaction
        keys = [f"v{i}" for i in range(s, s + 1000)]
        sh.write_shard(folder, f"{s:06d}", sh.Shard(records=_records(x[s:s + 1000], s), record_items=keys, items=keys))
    policy = IndexPolicy(flat_max=100, hnsw_max=200, memory_bytes=DIM * 1000 * 16)  # SQ8 codes, 31 lists
    root = tmp_path / "store"
    st = Store(root, keep_files=False, policy=policy)
    st.set_policy(policy)
    out = st.add_records(rec for _, rec in sh.iter_records(sh.list_shards(folder), {}))
    assert [i for i, _ in out] == list(range(1, n + 1)) and all(new for _, new in out)
    info = st.index_info("bench", "delta")
    assert (info["index_type"], info["codec"], info["count"]) == ("ivf", "SQ8", n)
    st.close()

    # the budget is the store's: a reader without a policy of its own uses it, and maps the IVF
    rd = Store(root, readonly=True)
    assert (rd.policy.memory_bytes, rd.policy.max_query_ms) == (policy.memory_bytes, policy.max_query_ms)
    rec = []
    for j in range(0, n, 100):
        got = rd.search("bench", "delta", x[j], 10)
        exact = set((np.argsort(-(x[:n] @ x[j]))[:10] + 1).tolist())
        rec.append(len({i for i, _ in got} & exact) / 10)
        np.testing.assert_allclose([s for _, s in got], x[[i - 1 for i, _ in got]] @ x[j], atol=1e-5)
    assert np.mean(rec) >= 0.95
    assert rd._indexes[("bench", "delta")].mmapped  # noqa: SLF001

    # a writer adds to the memory-mapped index (read fully first) and deletes from it
    wr = Store(root, keep_files=False)
    wr.search("bench", "delta", x[0], 1)
    assert wr._indexes[("bench", "delta")].mmapped  # noqa: SLF001
    wr.add_records(_records(x[n:], n))
    assert wr.delete(1)
    info = wr.index_info("bench", "delta")
    assert (info["index_type"], info["count"]) == ("ivf", n + 199)
    assert wr.search("bench", "delta", x[n + 5], 1)[0][0] == n + 6
    wr.close()
    # the reader sees the new generation and reloads
    assert rd.search("bench", "delta", x[n + 5], 1)[0][0] == n + 6
    rd.close()
