"""indexer.ray_engine on a real local Ray cluster (2 CPUs, 127.0.0.1): same store as the local engine.

One cluster for the module (Ray starts in seconds, not milliseconds).
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer import shards as sh
from indexer.pipeline import run_index
from indexer.ray_engine import embed_batch, run_index_ray
from indexer.sources import expand_sources
from lorasearch.store import Store

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
SHARED_PICK = (  # a few real files of three families and layouts
    "Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors",
    "IvanBy12__Imagenes__pytorch_lora_weights.safetensors",
    "Hareshjethani__BERT-GPT2-Multitask-Finetuning__adapter_model.safetensors",
    "JamesQFreeman__LoRA-ViT__lora.safetensors",
)


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, shared_loras: Path) -> list[str]:
    bad = tmp_path_factory.mktemp("bad") / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return [str(SAMPLES), *[str(shared_loras / n) for n in SHARED_PICK if (shared_loras / n).is_file()], str(bad)]


def _rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every store table that defines the content (timestamps left out), in id order."""
    c = sqlite3.connect(db / "lorasearch.sqlite")
    cols = [r[1] for r in c.execute("PRAGMA table_info(loras)") if r[1] != "added_at"]
    out = {
        "loras": c.execute(f"SELECT {', '.join(cols)} FROM loras ORDER BY id").fetchall(),
        "sources": c.execute("SELECT lora_id, source, repo, revision, path FROM sources ORDER BY id").fetchall(),
        "vectors": c.execute("SELECT lora_id, view, vec FROM vectors ORDER BY lora_id, view").fetchall(),
        "index_state": c.execute("SELECT family, view FROM index_state ORDER BY family, view").fetchall(),
        "meta": c.execute("SELECT key, value FROM meta WHERE key IN ('k', 'dim', 'sketch_version') ORDER BY key").fetchall(),
    }
    c.close()
    return out


def _files(db: Path, sub: str) -> dict[str, bytes]:
    return {str(p.relative_to(db)): p.read_bytes() for p in sorted((db / sub).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def both(ray_cluster: Any, sources: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    local, remote = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    s_local = run_index(sources, local, workers=1, progress=False)
    # batches of 2 files: several shards and tasks in flight at once
    s_ray = run_index_ray(sources, remote, batch_files=2)
    return local, remote, s_local, s_ray


def test_same_summary_and_failure(both: tuple[Path, Path, dict, dict]) -> None:
    _, _, s_local, s_ray = both
    assert s_ray["engine"] == "ray" and s_ray["shards"] >= 2
    for key in ("added", "duplicates", "skipped", "items"):
        assert s_ray[key] == s_local[key], key
    assert s_local["added"] >= 8
    fail = lambda s: sorted((f["source"], f.get("item"), f["error"]) for f in s["failed"])  # noqa: E731
    assert fail(s_ray) == fail(s_local)
    assert any("broken.safetensors" in f["source"] for f in s_ray["failed"])


def test_identical_stores(both: tuple[Path, Path, dict, dict]) -> None:
    local, remote, _, _ = both
    a, b = _rows(local), _rows(remote)
    for table in a:
        assert a[table] == b[table], table
    assert _files(local, "sketches") == _files(remote, "sketches")
    assert _files(local, "blobs") == _files(remote, "blobs")
    assert not (remote / "shards" / "1").exists()  # merged shards are removed


def test_identical_faiss_answers(both: tuple[Path, Path, dict, dict]) -> None:
    local, remote = both[0], both[1]
    sa, sb = Store(local, readonly=True), Store(remote, readonly=True)
    try:
        keys = [(r[0], r[1]) for r in sa.execute("SELECT family, view FROM index_state ORDER BY family, view")]
        assert keys
        rng = np.random.default_rng(0)
        for fam, view in keys:
            ia, ib = sa.index_info(fam, view), sb.index_info(fam, view)
            assert (ia["index_type"], ia["ids"]) == (ib["index_type"], ib["ids"])
            for _ in range(3):
                q = rng.standard_normal(sa.dim or 0).astype(np.float32)
                assert sa.search(fam, view, q, 5) == sb.search(fam, view, q, 5)
    finally:
        sa.close()
        sb.close()


def test_rerun_skips_and_resume_merges_left_shards(ray_cluster: Any, sources: list[str], tmp_path: Path) -> None:
    db = tmp_path / "db"
    # a killed run: its job is open and one finished shard waits on disk (written by the task body itself)
    with Store(db) as st:
        from indexer.jobs import JobTable

        job, _ = JobTable(st).open(sources)
    items = [x for x in expand_sources(sources[:1]) if not hasattr(x, "error")][:2]
    folder = sh.shard_dir(db, job)
    folder.mkdir(parents=True)
    out = embed_batch(items, str(folder), "left-over", 8, 1024, None)
    assert out["written"] and (folder / "left-over.json").is_file()
    s = run_index_ray(sources, db)
    assert s["job"] == job and s["resumed"] and s["added"] >= 8
    again = run_index_ray(sources, db)
    assert again["added"] == 0 and again["skipped"] == s["added"] + s["duplicates"]


def test_shard_round_trip(tmp_path: Path) -> None:
    items = [x for x in expand_sources([str(SAMPLES)]) if not hasattr(x, "error")][:2]
    out = embed_batch(items, str(tmp_path / "not-here"), "x", 8, 1024, ["a"])
    assert not out["written"] and out["records"] == 2
    path = sh.write_encoded(tmp_path, "x", out["npz"], out["json"])
    shard = sh.read_shard(path)
    assert shard.items == [it.key for it in items] and shard.record_items == shard.items
    r = shard.records[0]
    assert r.labels == ["a"] and r.sketches is not None and r.sketches.shape[1:] == (8, 8)
    assert set(r.vectors) and all(v.shape == (1024,) for v in r.vectors.values())
    assert json.loads(r.info_json)


def test_cli_engine_ray(ray_cluster: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorasearch.cli import app

    db = tmp_path / "db"
    res = CliRunner().invoke(app, ["index", str(SAMPLES), "--db", str(db), "--engine", "ray", "--json",
                                   "--max-memory", "1GiB", "--max-query-ms", "5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["engine"] == "ray" and out["added"] >= 4 and not out["failed"]
    with Store(db, readonly=True) as st:
        assert (st.policy.memory_bytes, st.policy.max_query_ms) == (2**30, 5.0)
