"""lorasearch.store: rows, sources, dedupe, delete/relabel, index types, durability under kill -9, readers.

Run as a script this file is also the writer/reader child process the
durability and many-readers tests start (``python tests/test_store.py writer ...``).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorasearch.delta import Dense, Factored, LoraDelta
from lorasearch.embed import Embedding, embed
from lorasearch.families import load_table
from lorasearch.store import IndexPolicy, Store, StoreError, content_hash, read_sketch_file, safe_name

HERE = Path(__file__).resolve()
K, DIM = 4, 64
_SD15 = load_table("sd15")
MODULES = sorted(n for n, (shape, kind) in _SD15.items() if kind == "linear" and max(shape) <= 768 and "attn" in n)[:6]


def synth(i: int, rank: int = 2, family: str = "sd15") -> LoraDelta:
    """A small deterministic LoRA on real SD1.5 module names (content differs per i)."""
    rng = np.random.default_rng(10_000 + i)
    mods = {}
    for n in MODULES:
        p, q = _SD15[n][0][:2]
        mods[n] = Factored(rng.standard_normal((p, rank)), rng.standard_normal((rank, q)) * 0.05, 0.5)
    return LoraDelta(family, "synthetic", mods)


def synth_item(i: int) -> tuple[LoraDelta, Embedding, dict[str, Any]]:
    ld = synth(i)
    return ld, embed(ld, k=K, dim=DIM), {"source": "synthetic", "path": f"lora{i}.safetensors"}


def vec_item(i: int, v: np.ndarray, family: str = "sd15") -> tuple[LoraDelta, Embedding, dict[str, Any]]:
    """A stand-in LoRA whose ``delta`` vector is given (for index-type tests)."""
    ld = LoraDelta(family, "synthetic", {MODULES[0]: Dense(np.full((2, 2), float(i), np.float32))},
                   source={"autov3": f"{i:064X}"})
    emb = Embedding(family, K, len(v), {MODULES[0]: np.zeros((K, K), np.float32)}, {MODULES[0]: 1.0},
                    {"delta": np.asarray(v, np.float32)})
    return ld, emb, {"source": "vectors", "path": f"v{i}"}


def clustered(n: int, dim: int, seed: int, clusters: int = 20) -> np.ndarray:
    """Unit vectors drawn around a few centres (like real sketches: clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def live_ids(store: Store, family: str = "sd15") -> list[int]:
    return [r["id"] for r in store.list(family=family, limit=1_000_000)]


# --------------------------------------------------------------------------- rows, sources, dedupe


def test_add_get_list_and_sources(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    res = s.add_many([synth_item(i) for i in range(3)])
    assert res == [(1, True), (2, True), (3, True)]
    row = s.get(2)
    assert row is not None
    assert (row["family"], row["format"], row["modules"], row["rank_min"], row["rank_max"]) == ("sd15", "synthetic", 6, 2, 2)
    assert row["autov3"] == content_hash(synth(1)) and row["path"] == "lora1.safetensors" and row["source"] == "synthetic"
    assert row["labels"] == [] and row["deleted"] is False and row["info"]["family"] == "sd15"
    assert row["k"] == K and row["dim"] == DIM and row["blob"] is None
    assert [r["id"] for r in s.list()] == [1, 2, 3]
    assert s.families() == ["sd15"] and s.k == K and s.dim == DIM
    # same content again from elsewhere: no new row, the extra source is recorded
    ld, emb, _ = synth_item(1)
    assert s.add(ld, emb, {"source": "hf:me/repo", "repo": "me/repo", "revision": "abc", "path": "x.safetensors"}) == (2, False)
    assert s.add(ld, emb, {"source": "hf:me/repo", "repo": "me/repo", "revision": "abc", "path": "x.safetensors"}) == (2, False)
    srcs = s.get(2)["sources"]
    assert [(x["source"], x["path"]) for x in srcs] == [("synthetic", "lora1.safetensors"), ("hf:me/repo", "x.safetensors")]
    assert s.get(2)["path"] == "lora1.safetensors"  # the first place it was seen
    assert [r["id"] for r in s.list(source="hf:me/repo")] == [2]
    st = s.stats()
    assert (st["loras"], st["sources"], st["families"], st["k"], st["dim"]) == (3, 4, {"sd15": 3}, K, DIM)
    assert st["views"]["sd15"]["delta"] == 3 and {i["view"] for i in st["indexes"]} >= {"delta", "style"}
    assert s.get(99) is None
    s.close()


def test_duplicates_inside_one_batch(tmp_path: Path) -> None:
    s = Store(tmp_path)
    a, b = synth_item(5), synth_item(5)
    b[2]["path"] = "copy.safetensors"
    assert s.add_many([a, b]) == [(1, True), (1, False)]
    assert len(s.get(1)["sources"]) == 2


def test_delete_relabel_revive_without_rebuild(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.add_many([synth_item(i) for i in range(4)], )
    gen = s.generation()
    s.relabel(2, ["anime", "style:ink"])
    assert s.get(2)["labels"] == ["anime", "style:ink"] and s.generation() == gen + 1
    assert [r["id"] for r in s.list(label="anime")] == [2]
    assert s.index_info("sd15", "delta")["generation"] < s.generation()  # relabel leaves FAISS alone
    vec = s.vectors("delta", [3])[0]
    assert s.search("sd15", "delta", vec, 1)[0][0] == 3
    assert s.delete(3) is True and s.delete(3) is False
    assert 3 not in [i for i, _ in s.search("sd15", "delta", vec, 10)]
    assert 3 not in live_ids(s) and s.get(3)["deleted"] is True
    assert s.index_info("sd15", "delta")["ids"] == [1, 2, 4]
    with pytest.raises(KeyError):
        s.relabel(3, ["x"])
    # adding the same content again revives the row
    assert s.add(*synth_item(2)) == (3, True)
    assert s.search("sd15", "delta", vec, 1)[0][0] == 3
    assert s.verify() == {k: "ok" for k in s.verify()}


def test_params_must_match_the_store(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.add(*synth_item(0))
    ld = synth(1)
    with pytest.raises(StoreError, match="dim"):
        s.add(ld, embed(ld, k=K, dim=DIM * 2), {"path": "p"})
    with pytest.raises(StoreError, match="family"):
        s.add(ld, embed(synth(1, family="sd2"), k=K, dim=DIM), {"path": "p"})
    assert live_ids(s) == [1]


def test_a_store_of_an_older_sketch_version_says_to_rebuild(tmp_path: Path) -> None:
    ld0, emb0, src0 = synth_item(0)
    emb0.sketch_version = 1  # what a release before SKETCH_VERSION 2 wrote
    s = Store(tmp_path)
    s.add(ld0, emb0, src0)
    with pytest.raises(StoreError, match="built with sketch_version 1, .* embeds with 2 .* new --db"):
        s.add(*synth_item(1))
    assert live_ids(s) == [1]


def test_readonly_and_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no lorasearch store"):
        Store(tmp_path / "none", readonly=True)
    with pytest.raises(StoreError):
        Store(tmp_path / "none2", create=False)
    Store(tmp_path / "db").add(*synth_item(0))
    r = Store(tmp_path / "db", readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        r.add(*synth_item(1))
    with pytest.raises(StoreError):
        r.delete(1)
    assert r.search("sd15", "delta", r.vectors("delta", [1])[0], 3)[0][0] == 1
    # a reader facing a stale FAISS file catches up in memory and leaves the file alone
    f = _faiss_file(tmp_path / "db")
    stale = f.read_bytes(), f.with_suffix(".json").read_bytes()
    Store(tmp_path / "db").add(*synth_item(1))
    f.write_bytes(stale[0])
    f.with_suffix(".json").write_bytes(stale[1])
    r2 = Store(tmp_path / "db", readonly=True)
    assert r2.search("sd15", "delta", r2.vectors("delta", [2])[0], 3)[0][0] == 2
    assert (f.read_bytes(), f.with_suffix(".json").read_bytes()) == stale


def test_sketch_files_are_memory_mapped_and_exact(tmp_path: Path) -> None:
    s = Store(tmp_path)
    ld, emb, src = synth_item(7)
    lid, _ = s.add(ld, emb, src)
    sf = s.sketch_file(lid)
    assert sf is not None and isinstance(sf.sketches, np.memmap)
    assert sf.names == sorted(emb.sketches)
    for n, z in s.sketches(lid).items():
        np.testing.assert_array_equal(z, emb.sketches[n])
    np.testing.assert_allclose(sf.norms, [emb.norms[n] for n in sf.names], rtol=1e-6)
    again = read_sketch_file(next((tmp_path / "sketches").rglob("*.safetensors")))
    assert again.names == sf.names


def _write_kohya(path: Path, seed: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {}
    for n in MODULES[:3]:
        p, q = _SD15[n][0][:2]
        flat = "lora_unet_" + n[len("unet."):].replace(".", "_")
        t[f"{flat}.lora_up.weight"] = rng.standard_normal((p, 4)).astype(np.float32)
        t[f"{flat}.lora_down.weight"] = rng.standard_normal((4, q)).astype(np.float32)
        t[f"{flat}.alpha"] = np.array(4.0, np.float32)
    save_file(t, str(path), metadata={"ss_output_name": f"test{seed}"})


@pytest.mark.parametrize("keep", [True, False])
def test_blob_copies(tmp_path: Path, keep: bool) -> None:
    from lorasearch.formats import load_lora
    from lorasearch.hashes import file_sha256

    f = tmp_path / "a.safetensors"
    _write_kohya(f, 1)
    ld = load_lora(f)
    s = Store(tmp_path / "db", keep_files=keep)
    lid, _ = s.add(ld, embed(ld, k=K, dim=DIM), {"source": str(tmp_path), "path": str(f)})
    p = s.blob_path(lid)
    if not keep:
        assert p is None and s.get(lid)["blob"] is None
        # re-indexing with copies on fills the missing blob of the existing row
        s2 = Store(tmp_path / "db")
        assert s2.add(ld, embed(ld, k=K, dim=DIM), {"source": "again", "path": str(f)}) == (lid, False)
        p = s2.blob_path(lid)
    assert p is not None and p.name == f"{file_sha256(f)}.safetensors" and file_sha256(p) == file_sha256(f)
    assert s.get(lid)["header_metadata"] == {"ss_output_name": "test1"}


def test_safe_names() -> None:
    assert safe_name("sd15") == "sd15" and safe_name("delta") == "delta"
    a, b = safe_name("llm:a_b"), safe_name("llm_a:b")
    assert a != b and "/" not in safe_name("x/y") and ":" not in a


def test_extra_tables_and_transactions(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.ensure_tables("CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, state TEXT);"
                    "CREATE TABLE IF NOT EXISTS job_items (job INTEGER, path TEXT)")
    with s.transaction() as c:
        c.execute("INSERT INTO jobs(state) VALUES ('running')")
    with pytest.raises(RuntimeError):
        with s.transaction() as c:
            c.execute("INSERT INTO jobs(state) VALUES ('lost')")
            raise RuntimeError("rolled back")
    assert [r["state"] for r in s.execute("SELECT state FROM jobs")] == ["running"]


# --------------------------------------------------------------------------- index types


SMALL = IndexPolicy(flat_max=20, hnsw_max=80, ef_search=64)


def _exact_top(x: np.ndarray, q: np.ndarray, ids: np.ndarray, k: int) -> set[int]:
    return set(ids[np.argsort(-(x @ q))[:k]].tolist())


@pytest.mark.parametrize("n, policy, kind, codec, min_recall", [
    (15, SMALL, "flat", "", 1.0),
    (60, SMALL, "hnsw", "", 0.95),
    (240, SMALL, "ivf", "Flat", 0.9),
    (240, IndexPolicy(flat_max=20, hnsw_max=80, memory_bytes=8 * 1024), "ivf", "PQ4x4", 0.9),
    (240, IndexPolicy(flat_max=20, hnsw_max=80, memory_bytes=16 * 1024), "ivf", "SQ8", 0.9),
])
def test_index_types_and_recall(tmp_path: Path, n: int, policy: IndexPolicy, kind: str, codec: str, min_recall: float) -> None:
    x = clustered(n, 32, seed=n)
    s = Store(tmp_path, policy=policy)
    s.add_many([vec_item(i, x[i]) for i in range(n)])
    info = s.index_info("sd15", "delta")
    assert (info["index_type"], info["codec"], info["count"]) == (kind, codec, n)
    ids = np.arange(1, n + 1)
    rec = []
    for j in range(0, n, max(n // 25, 1)):
        q = x[j] + 0.3 * np.random.default_rng(j).standard_normal(32).astype(np.float32)
        q /= np.linalg.norm(q)
        got = s.search("sd15", "delta", q, 10)
        assert len(got) == 10 and all(a[1] >= b[1] for a, b in zip(got, got[1:]))
        if kind != "ivf" or codec != "Flat":
            # scores are exact inner products with the stored vectors
            np.testing.assert_allclose([sc for _, sc in got], x[[i - 1 for i, _ in got]] @ q, atol=1e-4)
        rec.append(len({i for i, _ in got} & _exact_top(x, q, ids, 10)) / 10)
    assert np.mean(rec) >= min_recall
    # deletion works in every type without a rebuild, and the saved index reloads
    gone = [3, 4, 5]
    for i in gone:
        assert s.delete(i)
    got = s.search("sd15", "delta", x[3], 20)
    assert not set(gone) & {i for i, _ in got}
    assert Store(tmp_path, policy=policy).index_info("sd15", "delta")["ids"] == [i for i in range(1, n + 1) if i not in gone]


def test_type_grows_with_size_and_hnsw_tombstones_trigger_rebuild(tmp_path: Path) -> None:
    x = clustered(120, 32, seed=1)
    s = Store(tmp_path, policy=SMALL)
    kinds = []
    for start in range(0, 120, 15):
        s.add_many([vec_item(i, x[i]) for i in range(start, start + 15)])
        kinds.append(s.index_info("sd15", "delta")["index_type"])
    assert kinds[0] == "flat" and "hnsw" in kinds and kinds[-1] == "ivf"
    s2 = Store(tmp_path / "h", policy=SMALL)
    s2.add_many([vec_item(i, x[i]) for i in range(60)])
    assert s2.index_info("sd15", "delta")["index_type"] == "hnsw"
    for i in range(1, 7):  # 10 % deleted: filtered out of searches, kept in the graph
        s2.delete(i)
    info = s2.index_info("sd15", "delta")
    assert (info["tombstones"], info["count"]) == (6, 60)
    assert not {i for i, _ in s2.search("sd15", "delta", x[0], 30)} & set(range(1, 7))
    s2.delete(7)  # 11.7 % > 10 %: rebuilt lazily on that commit
    info = s2.index_info("sd15", "delta")
    assert (info["tombstones"], info["count"], info["index_type"]) == (0, 53, "hnsw")
    # a reopened store re-derives tombstones from SQLite
    s2.delete(8)
    again = Store(tmp_path / "h", policy=SMALL).index_info("sd15", "delta")
    assert (again["tombstones"], again["live"]) == (1, 52)


def test_choose_has_hysteresis() -> None:
    p = IndexPolicy(flat_max=100, hnsw_max=1000)
    assert [p.choose(n, 8) for n in (10, 100, 999, 1000)] == ["flat", "hnsw", "hnsw", "ivf"]
    assert p.choose(90, 8, "hnsw") == "hnsw" and p.choose(40, 8, "hnsw") == "flat"
    assert IndexPolicy().choose(100_000, 1024) == "hnsw" and IndexPolicy().choose(1_000_000, 1024) == "ivf"
    assert IndexPolicy().ivf_codec(1_000_000, 1024) == "SQ8" and IndexPolicy().nlist(1_000_000, 1024) == 4096
    assert IndexPolicy().ivf_codec(5_000_000, 1024) == "PQ128x8" and IndexPolicy().train_size(5_000_000, 1024) == 131_072
    assert IndexPolicy.from_budget(2**40, 10).choose(500_000, 1024) == "hnsw"
    assert IndexPolicy.from_budget(2**30, 10).choose(500_000, 1024) == "ivf"
    assert IndexPolicy.from_budget(max_query_ms=1.0).choose(10_000, 1024) == "hnsw"  # a flat scan would take ~2.8 ms
    tight, loose = IndexPolicy.from_budget(max_query_ms=5), IndexPolicy.from_budget(max_query_ms=20)
    assert tight.nprobe(4096, 1_000_000, 1024, "SQ8") < loose.nprobe(4096, 1_000_000, 1024, "SQ8")


# --------------------------------------------------------------------------- repair on load


def _faiss_file(root: Path, view: str = "delta") -> Path:
    return root / "faiss" / "sd15" / f"{view}.faiss"


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "rebuilt"),
    ("no_sidecar", "rebuilt"),
    ("stale", "updated"),
    ("foreign", "rebuilt"),
    ("missing", "rebuilt"),
])
def test_verify_repairs(tmp_path: Path, damage: str, expected: str) -> None:
    root = tmp_path / "db"
    s = Store(root)
    s.add_many([synth_item(i) for i in range(5)])
    f = _faiss_file(root)
    old = (f.read_bytes(), f.with_suffix(".json").read_bytes())
    s.add_many([synth_item(i) for i in range(5, 8)])
    s.close()
    if damage == "garbage":
        f.write_bytes(b"not a faiss index")
    elif damage == "no_sidecar":
        f.with_suffix(".json").unlink()
    elif damage == "stale":  # a crash between the SQLite commit and the FAISS save
        f.write_bytes(old[0])
        f.with_suffix(".json").write_bytes(old[1])
    elif damage == "foreign":  # an index from another store
        other = Store(tmp_path / "other")
        other.add_many([synth_item(i) for i in range(100, 110)])
        other.close()
        f.write_bytes(_faiss_file(tmp_path / "other").read_bytes())
        side = json.loads(_faiss_file(tmp_path / "other").with_suffix(".json").read_text())
        side["generation"] = 1
        f.with_suffix(".json").write_text(json.dumps(side))
    elif damage == "missing":
        f.unlink()
    s = Store(root)
    rep = s.verify()
    assert rep["sd15/delta"] == expected and rep["sd15/style"] == "ok"
    assert s.verify() == {k: "ok" for k in rep}
    assert s.index_info("sd15", "delta")["ids"] == list(range(1, 9))
    for i in range(1, 9):
        assert s.search("sd15", "delta", s.vectors("delta", [i])[0], 1)[0][0] == i


# --------------------------------------------------------------------------- durability under kill -9


N_DURABLE, BATCH = 64, 4


def _writer(root: str, n: int, batch: int, first: int = 0) -> None:
    """Child process: index synthetic LoRAs first..n-1 in batches, printing each batch's result."""
    store = Store(root)
    for start in range(first, n, batch):
        res = store.add_many([synth_item(i) for i in range(start, min(start + batch, n))])
        print(json.dumps({"start": start, "res": res}), flush=True)
    store.close()


def _spawn_writer(root: Path, faults: str, mark: Path | None) -> subprocess.Popen[str]:
    env = dict(os.environ, LORASEARCH_FAULTS=faults, PYTHONUNBUFFERED="1")
    if mark is not None:
        env["LORASEARCH_FAULT_MARK"] = str(mark)
    return subprocess.Popen([sys.executable, str(HERE), "writer", str(root), str(N_DURABLE), str(BATCH)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _check_consistent(root: Path) -> list[int]:
    """After a crash: the store loads, FAISS agrees with SQLite, every committed LoRA is found first."""
    s = Store(root)
    rep = s.verify()
    assert set(rep.values()) <= {"ok", "updated", "rebuilt"}, rep
    assert set(s.verify().values()) <= {"ok"}
    ids = live_ids(s)
    for view in s.stats()["views"].get("sd15", {}):
        assert s.index_info("sd15", view)["ids"] == ids, view
    vecs = s.vectors("delta", ids)
    for i, v in zip(ids, vecs):
        assert s.search("sd15", "delta", v, 1)[0][0] == i
    assert not [p for p in root.rglob("*.tmp")], "temp files of dead writers are cleaned"
    rows = s.execute("SELECT COUNT(*) FROM sources")[0][0]
    assert rows == len(ids)
    s.close()
    return ids


def _kill_at(proc: subprocess.Popen[str], mark: Path | None, point: str | None, delay: float) -> None:
    deadline = time.time() + 30
    if point is not None and mark is not None:
        while not (mark / point).exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.time() < deadline, f"never reached {point}"
            time.sleep(0.002)
    else:
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_minus_9_at_any_moment_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "db"
    rng = random.Random(1234)
    # (fault point to stop at, sleep there); None: a random moment with small sleeps everywhere
    rounds = [(None, 0.0), ("faiss_rename", 0.5), ("json_rename", 0.5), ("after_commit", 0.5),
              ("sketch_rename", 0.5), (None, 0.0), ("faiss_rename", 0.5)]
    committed_before: list[int] = []
    for r, (point, sleep) in enumerate(rounds):
        mark = tmp_path / f"mark{r}"
        mark.mkdir()
        faults = (f"{point}={sleep}" if point else
                  "faiss_rename=0.03,json_rename=0.03,after_commit=0.03,sketch_rename=0.005")
        proc = _spawn_writer(root, faults, mark if point else None)
        _kill_at(proc, mark, point, delay=rng.uniform(0.5, 1.5))
        if not (root / "lorasearch.sqlite").exists():
            continue
        ids = _check_consistent(root)
        print(f"round {r} killed at {point or 'random'}: {len(ids)} committed")
        assert ids[: len(committed_before)] == committed_before, "committed LoRAs survive later crashes"
        committed_before = ids
    assert 0 < len(committed_before) < N_DURABLE, "the kills must land mid-run"
    # resume: what was committed is a no-op, the rest is added
    proc = _spawn_writer(root, "", None)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    flags = [new for line in out.splitlines() for _, new in json.loads(line)["res"]]
    assert flags == [False] * len(committed_before) + [True] * (N_DURABLE - len(committed_before))
    ids = _check_consistent(root)
    assert ids == list(range(1, N_DURABLE + 1)) or len(ids) == N_DURABLE
    # and once more: everything is already there
    proc = _spawn_writer(root, "", None)
    out, _ = proc.communicate(timeout=120)
    assert all(not new for line in out.splitlines() for _, new in json.loads(line)["res"])


def test_two_writers_at_once_stay_consistent(tmp_path: Path) -> None:
    """Writers serialise on SQLite's write lock and the FAISS file lock; overlapping content is added once."""
    root = tmp_path / "db"
    Store(root).close()
    procs = [subprocess.Popen([sys.executable, str(HERE), "writer", str(root), str(hi), "3", str(lo)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for lo, hi in ((0, 18), (9, 27))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    new = sum(n for out, _ in outs for line in out.splitlines() for _, n in json.loads(line)["res"])
    assert new == 27
    s = Store(root)
    assert len(live_ids(s)) == 27 and set(s.verify().values()) == {"ok"}


# --------------------------------------------------------------------------- many readers, one writer


def _reader(root: str) -> None:
    """Child process: a read-only store answering search requests from stdin."""
    store = Store(root, readonly=True)
    for line in sys.stdin:
        vec = np.asarray(json.loads(line), np.float32)
        print(json.dumps([i for i, _ in store.search("sd15", "delta", vec, 1000)]), flush=True)


def test_reader_in_another_process_sees_commits(tmp_path: Path) -> None:
    root = tmp_path / "db"
    w = Store(root)
    w.add_many([synth_item(i) for i in range(3)])
    reader = subprocess.Popen([sys.executable, str(HERE), "reader", str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        q = json.dumps(w.vectors("delta", [1])[0].tolist())

        def ask() -> list[int]:
            assert reader.stdin is not None and reader.stdout is not None
            reader.stdin.write(q + "\n")
            reader.stdin.flush()
            return sorted(json.loads(reader.stdout.readline()))

        assert ask() == [1, 2, 3]
        w.add_many([synth_item(i) for i in range(3, 6)])
        assert ask() == [1, 2, 3, 4, 5, 6]
        w.delete(2)
        assert ask() == [1, 3, 4, 5, 6]
        w.add(*synth_item(10))
        assert ask() == [1, 3, 4, 5, 6, 7]
    finally:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait(timeout=30)
    assert reader.returncode == 0, reader.stderr.read() if reader.stderr else ""


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "writer":
        _writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif role == "reader":
        _reader(sys.argv[2])
    else:
        raise SystemExit(f"unknown role {role}")
