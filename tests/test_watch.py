"""Folder watching (indexer.watch): new, half-written, changed and removed files, on a real temp folder."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from indexer.watch import Watcher, header_complete, rescan, snapshot, watch
from lorasearch.store import Store, StoreError

SD15 = "Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights.safetensors"
OTHER = "Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights.safetensors"


def _live(db: Path) -> list[dict]:
    if not (db / "lorasearch.sqlite").is_file():
        return []
    try:
        with Store(db, create=False, readonly=True) as st:
            return st.list()
    except StoreError:  # the watcher is creating the store right now
        return []


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_header_complete_and_snapshot(shared_loras: Path, tmp_path: Path) -> None:
    data = (shared_loras / SD15).read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    full = tmp_path / "full.safetensors"
    full.write_bytes(data)
    assert not header_complete(half)
    assert header_complete(full)
    snap = snapshot([str(tmp_path)])
    assert set(snap) == {str(half), str(full)}
    assert snap[str(full)][0] == len(data)


@pytest.mark.parametrize("use_events", [True, False], ids=["events", "polling"])
def test_watch_slow_copy_then_delete(shared_loras: Path, tmp_path: Path, use_events: bool) -> None:
    folder, db = tmp_path / "loras", tmp_path / "db"
    folder.mkdir()
    data = (shared_loras / SD15).read_bytes()
    stop = threading.Event()
    lines: list[str] = []
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(watch([str(folder)], db, poll_interval=0.2, settle_seconds=0.6,
                                                          stop_event=stop, use_events=use_events,
                                                          log=lines.append)))
    th.start()
    try:
        target = folder / "slow.safetensors"
        with open(target, "wb") as fh:  # half now, the rest after longer than the settle time
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(1.8)
            assert _live(db) == [], "a half-written file was indexed"
            fh.write(data[len(data) // 2:])
        assert _wait(lambda: len(_live(db)) == 1), lines
        row = _live(db)[0]
        assert row["path"] == str(target)

        target.unlink()
        assert _wait(lambda: _live(db) == []), lines
    finally:
        stop.set()
        th.join(timeout=30)
    assert not th.is_alive()
    assert out["added"] == 1 and out["removed"] == 1 and not out["failed"]
    assert out["events"] is use_events


def test_removed_copy_keeps_entry_other_source_holds(shared_loras: Path, tmp_path: Path) -> None:
    folder, db = tmp_path / "loras", tmp_path / "db"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    shutil.copy(shared_loras / SD15, folder / "a" / "x.safetensors")
    shutil.copy(shared_loras / SD15, folder / "b" / "y.safetensors")  # same content, second source
    w = Watcher([str(folder)], db, settle_seconds=0.0, use_events=False, log=lambda m: None)
    w._index(w.sources)
    w.known = snapshot(w.local)
    assert len(_live(db)) == 1

    (folder / "a" / "x.safetensors").unlink()
    w.step()
    assert len(_live(db)) == 1 and w.stats.sources_gone == 1 and w.stats.removed == 0
    (folder / "b" / "y.safetensors").unlink()
    w.step()
    assert _live(db) == [] and w.stats.removed == 1


def test_changed_file_replaces_entry(shared_loras: Path, tmp_path: Path) -> None:
    folder, db = tmp_path / "loras", tmp_path / "db"
    folder.mkdir()
    target = folder / "x.safetensors"
    shutil.copy(shared_loras / SD15, target)
    w = Watcher([str(folder)], db, settle_seconds=0.0, use_events=False, log=lambda m: None)
    w._index(w.sources)
    w.known = snapshot(w.local)
    first = _live(db)[0]["autov3"]
    shutil.copy(shared_loras / OTHER, target)
    w.step()  # seen, settling
    w.step()  # settled (0 s) and complete -> old content dropped, new content indexed
    rows = _live(db)
    assert len(rows) == 1 and rows[0]["autov3"] != first


def test_manual_rescan_syncs_removals_made_while_not_watching(shared_loras: Path, tmp_path: Path) -> None:
    folder, db = tmp_path / "loras", tmp_path / "db"
    folder.mkdir()
    shutil.copy(shared_loras / SD15, folder / "x.safetensors")
    s1 = rescan([str(folder)], db, log=lambda m: None)
    assert s1["added"] == 1 and len(_live(db)) == 1
    s1_autov3 = _live(db)[0]["autov3"]
    (folder / "x.safetensors").unlink()
    shutil.copy(shared_loras / OTHER, folder / "z.safetensors")
    s2 = rescan([str(folder)], db, log=lambda m: None)
    assert s2["added"] == 1 and s2["removed"] == 1
    assert [r["path"] for r in _live(db)] == [str(folder / "z.safetensors")]
    shutil.copy(shared_loras / SD15, folder / "z.safetensors")  # rewritten while nobody watched
    s3 = rescan([str(folder)], db, log=lambda m: None)
    assert s3["added"] == 1 and s3["removed"] == 1
    rows = _live(db)
    assert len(rows) == 1 and rows[0]["autov3"] == s1_autov3


def test_cli_index_watch_until_sigterm(shared_loras: Path, tmp_path: Path) -> None:
    """``lorasearch index DIR --watch``: picks up a file dropped in later, stops cleanly on SIGTERM."""
    import json
    import signal
    import subprocess
    import sys

    folder, db = tmp_path / "loras", tmp_path / "db"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lorasearch.cli", "index", str(folder), "--db", str(db), "--watch", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: (db / "lorasearch.sqlite").is_file(), timeout=60)
        shutil.copy(shared_loras / SD15, folder / "late.safetensors")
        assert _wait(lambda: len(_live(db)) == 1, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["added"] >= 1
