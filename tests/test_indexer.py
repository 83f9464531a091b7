"""The indexing pipeline: counts, duplicates, failures, workers, hub sources, idempotence, resume after kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hub_server import DemoHub, dead_endpoint, demo_hub  # noqa: F401  (fixture)
from indexer.jobs import JobTable
from indexer.pipeline import IndexerBusy, Result, _PoolRunner, exclusive, run_index
from indexer.sources import WorkItem, expand_source
from lorasearch.store import Store

REPO = Path(__file__).resolve().parents[1]
GOOD_ITEMS, DISTINCT, BAD_ITEMS = 5, 4, 3


def snapshot(db: Path) -> dict[str, Any]:
    """The store's contents by content hash (row ids and times left out)."""
    with Store(db) as s:
        loras = [tuple(r) for r in s.execute(
            "SELECT autov3, family, format, modules, blob IS NOT NULL FROM loras WHERE deleted=0 ORDER BY autov3")]
        sources = [tuple(r) for r in s.execute(
            "SELECT l.autov3, s.source, s.repo, s.revision, s.path FROM sources s JOIN loras l ON l.id=s.lora_id"
            " ORDER BY 1, 2, 5")]
        vecs = {(r[0], r[1]): bytes(r[2]) for r in s.execute(
            "SELECT l.autov3, v.view, v.vec FROM vectors v JOIN loras l ON l.id=v.lora_id")}
    return {"loras": loras, "sources": sources, "vectors": vecs}


def assert_folder_summary(out: dict[str, Any], tree: Path) -> None:
    assert (out["added"], out["duplicates"], out["skipped"]) == (DISTINCT, GOOD_ITEMS - DISTINCT, 0)
    reasons = {Path(f["item"]).name: f["error"] for f in out["failed"]}
    assert sorted(reasons) == ["evil.bin", "model.ckpt", "vit.safetensors"]
    assert "refused" in reasons["evil.bin"] and "refused" in reasons["model.ckpt"]
    assert "unsupported LoRA layout" in reasons["vit.safetensors"]
    assert all(f["source"] == str(tree) for f in out["failed"])
    assert out["items"] == GOOD_ITEMS + BAD_ITEMS


def test_folder_index_counts_duplicates_and_failures(tree: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = run_index([str(tree)], tmp_path / "db")
    assert_folder_summary(out, tree)
    assert out["resumed"] is False and isinstance(out["job"], int)
    assert "indexing" not in capfd.readouterr().err  # no progress bar when stderr is not a terminal
    snap = snapshot(tmp_path / "db")
    assert len(snap["loras"]) == DISTINCT and all(blob for *_, blob in snap["loras"])
    paths = {}
    for v3, _src, _repo, _rev, path in snap["sources"]:
        paths.setdefault(v3, []).append(Path(path).relative_to(tree).as_posix())
    assert sorted(paths.values()) == [["a.safetensors", "sub/a_copy.safetensors"], ["deep/er/disney.safetensors"],
                                      ["deep/tiny.safetensors"], ["sub/peft/adapter_model.safetensors"]]


def test_one_and_two_workers_give_the_same_store(tree: Path, tmp_path: Path) -> None:
    one = run_index([str(tree)], tmp_path / "db1", workers=1, batch=2)
    two = run_index([str(tree)], tmp_path / "db2", workers=2, batch=2)
    assert_folder_summary(two, tree)
    drop = ("job", "seconds", "failed")
    assert {k: v for k, v in one.items() if k not in drop} == {k: v for k, v in two.items() if k not in drop}
    assert sorted(map(str, one["failed"])) == sorted(map(str, two["failed"]))
    assert snapshot(tmp_path / "db1") == snapshot(tmp_path / "db2")
    # two workers copy the files into the store themselves (process_item's blobs): the same copies
    assert blob_files(tmp_path / "db1") == blob_files(tmp_path / "db2") != {}


def blob_files(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in (db / "blobs").rglob("*") if p.is_file()}


@pytest.mark.parametrize("rel", ["a.safetensors", "sub/peft"])
def test_worker_copies_its_file_into_the_store(tree: Path, tmp_path: Path, rel: str) -> None:
    from indexer.pipeline import _copy_ahead, process_item
    from lorasearch.store import blob_rel

    item = next(x for x in expand_source(str(tree / rel)) if isinstance(x, WorkItem))
    root = tmp_path / "db"
    res = process_item(item, blobs=str(root))
    assert res.error is None and res.ld is not None
    src = res.ld.source
    blob = root / blob_rel(src["file_sha256"])
    assert blob.read_bytes() == Path(src["weights"]).read_bytes()
    if src["config"]:
        assert blob.with_name(f"{src['file_sha256']}.adapter_config.json").read_bytes() == Path(src["config"]).read_bytes()
    # the file changed after it was hashed: no copy and no error here (the writer meets it again and reports it)
    _copy_ahead(str(tmp_path / "db2"), {**src, "file_sha256": "0" * 64})
    assert not (tmp_path / "db2" / blob_rel("0" * 64)).exists()
    assert not list((tmp_path / "db2").rglob("*.safetensors*"))


def test_rerun_skips_what_is_indexed_and_rereads_changed_files(tree: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    run_index([str(tree)], db, keep_files=False)
    before = snapshot(db)
    with Store(db) as s:
        gen = s.generation()
    again = run_index([str(tree)], db, keep_files=False)
    assert (again["added"], again["duplicates"], again["skipped"], len(again["failed"])) == (0, 0, GOOD_ITEMS, BAD_ITEMS)
    assert again["job"] != 0 and again["resumed"] is False
    with Store(db) as s:
        assert s.generation() == gen  # nothing written to the store
    os.utime(tree / "deep" / "tiny.safetensors", ns=(time.time_ns(), time.time_ns()))
    third = run_index([str(tree)], db, keep_files=False)
    assert (third["added"], third["duplicates"], third["skipped"]) == (0, 1, GOOD_ITEMS - 1)
    assert snapshot(db) == before
    assert not any(l[-1] for l in before["loras"])  # keep_files=False: no blob copies


def test_hub_sources_record_repo_revision_and_path(demo_hub: DemoHub, tmp_path: Path) -> None:
    a1, a2 = demo_hub.shas["alice/gpt2-lora"]
    (b1,) = demo_hub.shas["bob/sd-lora"]
    db, ep, cache = tmp_path / "db", demo_hub.endpoint, tmp_path / "hf-cache"
    first = run_index([f"hf:alice/gpt2-lora@{a1}", "hf:bob/sd-lora"], db, endpoint=ep, cache_dir=cache)
    assert (first["added"], first["duplicates"], first["failed"]) == (3, 0, [])
    second = run_index(["hf:alice/gpt2-lora"], db, endpoint=ep, cache_dir=cache)
    assert (second["added"], second["duplicates"], second["failed"]) == (0, 2, [])
    rows = {(src, repo, rev, path) for _, src, repo, rev, path in snapshot(db)["sources"]}
    assert rows == {
        (f"hf:alice/gpt2-lora@{a1}", "alice/gpt2-lora", a1, "adapter_model.safetensors"),
        ("hf:alice/gpt2-lora", "alice/gpt2-lora", a2, "adapter_model.safetensors"),
        ("hf:alice/gpt2-lora", "alice/gpt2-lora", a2, "extra/disney.safetensors"),
        ("hf:bob/sd-lora", "bob/sd-lora", b1, "disney.safetensors"),
        ("hf:bob/sd-lora", "bob/sd-lora", b1, "nested/peft/adapter_model.safetensors"),
    }
    with Store(db) as s:
        fams = sorted(s.families())
    assert fams == ["llm:gpt2:768", "llm:gptneo:768", "sd15"]


def test_hf_search_source(demo_hub: DemoHub, tmp_path: Path) -> None:
    out = run_index(["hf-search:lora"], tmp_path / "db", endpoint=demo_hub.endpoint, cache_dir=tmp_path / "c")
    assert (out["added"], out["duplicates"]) == (3, 1)  # alice@main (gpt2, disney) + bob (disney, gptneo)
    assert [(f["source"], f["item"]) for f in out["failed"]] == [("hf-search:lora", "hf:carol/readme-only")]
    assert "no .safetensors files" in out["failed"][0]["error"]


def test_bad_sources_are_listed_and_never_raise(demo_hub: DemoHub, tmp_path: Path) -> None:
    bad = {
        str(tmp_path / "missing"): "no such file or folder",
        "hf:not a repo": "malformed hub source",
        "hf:nobody/nothing": "not found",
        "hf:alice/gpt2-lora@gone": "revision 'gone' not found",
        "hf-search:": "malformed hub search",
    }
    out = run_index(list(bad), tmp_path / "db", endpoint=demo_hub.endpoint, cache_dir=tmp_path / "c")
    assert (out["added"], out["duplicates"], out["items"]) == (0, 0, len(bad))
    got = {f["source"]: f["error"] for f in out["failed"]}
    assert got.keys() == bad.keys() and all(bad[s] in got[s] for s in bad)
    down = run_index(["hf:alice/gpt2-lora"], tmp_path / "db", endpoint=dead_endpoint(), cache_dir=tmp_path / "empty")
    assert len(down["failed"]) == 1 and "hub unreachable" in down["failed"][0]["error"]
    with Store(tmp_path / "db") as s:
        assert s.stats()["loras"] == 0


def test_one_indexer_per_store(tree: Path, tmp_path: Path) -> None:
    with exclusive(tmp_path / "db"):
        with pytest.raises(IndexerBusy, match=f"pid {os.getpid()}"):
            run_index([str(tree)], tmp_path / "db")
    assert run_index([str(tree / "a.safetensors")], tmp_path / "db")["added"] == 1  # released


_CHILD = """
import json, sys
from indexer.pipeline import run_index
out = run_index(sys.argv[3:], sys.argv[1], workers=int(sys.argv[2]), batch=2, progress=False)
print(json.dumps(out))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_sigkill(tree: Path, tmp_path: Path, workers: int) -> None:
    """kill -9 the indexing process right after a store commit (before its job rows say done), then re-run."""
    db, mark = tmp_path / "db", tmp_path / "mark"
    mark.mkdir()
    env = dict(os.environ, LORASEARCH_FAULTS="after_commit=60", LORASEARCH_FAULT_MARK=str(mark),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", _CHILD, str(db), str(workers), str(tree)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (mark / "after_commit").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the indexer never reached its first commit"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the indexer and its workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Store(db) as s:  # the store opens in its last committed state
        committed = s.stats()["loras"]
        assert 1 <= committed < DISTINCT
        jt = JobTable(s)
        (job,) = jt.jobs()
        assert job["status"] == "running" and job["pending"] >= 1

    out = run_index([str(tree)], db, workers=workers, batch=2)
    assert out["resumed"] is True and out["job"] == job["job"]
    assert_folder_summary(out, tree)
    with Store(db) as s:
        assert s.stats()["loras"] == DISTINCT
        per_path = s.execute("SELECT path, COUNT(*) FROM sources GROUP BY path")
        assert len(per_path) == GOOD_ITEMS and all(n == 1 for _, n in per_path)  # every file indexed exactly once
        items = s.execute("SELECT item, COUNT(*), MIN(status) FROM job_items WHERE job_id=? GROUP BY item", (out["job"],))
        assert len(items) == GOOD_ITEMS + BAD_ITEMS and all(n == 1 for _, n, _ in items)
        checked = s.verify()
        assert checked and all(v in ("ok", "updated", "rebuilt") for v in checked.values())
        for lora in s.list():  # every LoRA is found by its own vector
            (vec,) = s.execute("SELECT vec FROM vectors WHERE lora_id=? AND view='delta'", (lora["id"],))
            hits = s.search(lora["family"], "delta", np.frombuffer(vec[0], dtype="<f4"), 1)
            assert hits[0][0] == lora["id"]


def crash_on_marked(item: WorkItem, k: int, dim: int) -> Result:
    """A worker function that dies (like a segfault or the OOM killer) on items named ``*crash*``."""
    if "crash" in item.path:
        os._exit(1)
    return Result(item, error="fine")


def test_a_dying_worker_fails_only_its_item() -> None:
    got: list[Result] = []
    runner = _PoolRunner(2, 8, 64, got.append, fn=crash_on_marked)
    try:
        for name in ["a", "b", "crash", "c", "d"]:
            runner.submit(WorkItem("src", f"/x/{name}", f"/x/{name}", 1, 1))
        runner.drain()
    finally:
        runner.close()
    by = {Path(r.item.path).name: r.error for r in got}
    assert sorted(by) == ["a", "b", "c", "crash", "d"]
    assert "worker process died" in str(by["crash"])
    assert all(by[n] == "fine" for n in "abcd")


def test_job_key_is_independent_of_the_working_folder(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.jobs import job_key

    monkeypatch.chdir(tree.parent)
    assert job_key(["loras", "hf:a/b"]) == job_key([str(tree), "hf:a/b"]) != job_key(["hf:a/b", str(tree)])


@pytest.mark.parametrize("rel", ["deep/er/disney.safetensors", "sub/peft", "a.safetensors"])
def test_worker_result_is_light_and_stores_the_same_row(tree: Path, rel: str) -> None:
    import pickle

    from indexer.pipeline import process_item, summary
    from lorasearch.formats.load import load_lora
    from lorasearch.report import info_dict

    item = next(x for x in expand_source(str(tree / rel)) if isinstance(x, WorkItem))
    res = process_item(item)
    ld = load_lora(item.path)
    assert res.error is None and res.ld is not None and res.emb is not None
    assert info_dict(res.ld) == info_dict(ld) and res.ld.rank_range() == ld.rank_range()
    assert res.ld.source == ld.source and res.ld.family == ld.family
    assert len(pickle.dumps(res)) < len(pickle.dumps(ld)) / 5  # no factor values travel back to the parent
    assert summary(res.ld).modules.keys() == ld.modules.keys()


def test_collection_maps_refresh_only_for_families_with_new_rows(tree: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.pipeline as pipeline

    calls: list[Any] = []
    monkeypatch.setattr(pipeline, "update_maps", lambda store, families=None: calls.append(families))
    run_index([str(tree / "deep")], tmp_path / "db")
    assert len(calls) == 1 and calls[0] is not None and "sd15" in calls[0]
    run_index([str(tree / "deep")], tmp_path / "db")  # nothing new: no layout
    run_index([str(tree / "deep" / "er" / "disney.safetensors")], tmp_path / "db")  # a duplicate: no layout
    assert len(calls) == 1
