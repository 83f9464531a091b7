"""``lorasearch index DIR --watch``: keep a store in step with folders as files come and go.

- Changes are noticed from file-system events (watchdog) when it can start,
  and by polling every ``poll_interval`` seconds otherwise; either way the
  decision is taken on a fresh listing of the folders, so a missed event only
  delays a change until the next poll.
- A new or changed file is indexed only when its size and mtime (and a PEFT
  folder's config) have not moved for ``settle_seconds`` *and* its safetensors
  header parses with every tensor span inside the file, so a half-copied file
  is never read. A file that stays broken that long is still handed on after
  ``BROKEN_AFTER`` settle periods, so its error is recorded.
- The work is done by ``indexer.pipeline.run_index`` (same resumable jobs, same
  single-writer lock), one run per batch of ready files.
- A removed file: its store entry is deleted unless another source still
  holds the same content; the source is then only recorded as gone (table
  ``watch_gone``). A changed file is a removal of the old content plus a new file.
- ``rescan`` (or SIGUSR1 to a watching process, or ``Watcher.rescan()``) re-lists
  everything and syncs removals at once, without waiting for events.
- Only local files and folders are watched; hub sources are indexed once at
  start and never polled (nothing reaches out to remote services unless asked).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lorasearch.errors import BadInput
from lorasearch.formats.load import PEFT_CONFIG
from lorasearch.formats.safetensors_file import SafetensorsFile

from indexer.pipeline import exclusive, run_index
from indexer.sources import HF_PREFIX, HF_SEARCH_PREFIX, WorkItem, expand_local, weights_file

DEFAULT_POLL = 2.0
DEFAULT_SETTLE = 2.0
BROKEN_AFTER = 10  # settle periods a stable but unreadable file waits before it is indexed (and fails) anyway
GONE_SCHEMA = """
CREATE TABLE IF NOT EXISTS watch_gone (
    path TEXT NOT NULL,
    lora_id INTEGER NOT NULL,
    removed_at TEXT NOT NULL,
    PRIMARY KEY(path, lora_id)
)
"""

Signature = tuple[int, int, int]
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def local_sources(sources: Sequence[str]) -> list[str]:
    """The sources that are local paths (hub sources are never watched)."""
    return [s for s in sources if not s.startswith((HF_PREFIX, HF_SEARCH_PREFIX))]


def _signature(item: WorkItem) -> Signature:
    p = Path(item.path)
    cfg = p / PEFT_CONFIG if p.is_dir() else None
    try:
        cfg_mtime = cfg.stat().st_mtime_ns if cfg is not None and cfg.is_file() else 0
    except OSError:
        cfg_mtime = 0
    return (item.size, item.mtime_ns, cfg_mtime)


def snapshot(sources: Sequence[str]) -> dict[str, Signature]:
    """Every LoRA under the local sources -> (size, mtime_ns, PEFT config mtime_ns), by absolute path."""
    out: dict[str, Signature] = {}
    for src in local_sources(sources):
        for x in expand_local(src):
            if isinstance(x, WorkItem):
                out[str(Path(x.path).absolute())] = _signature(x)
    return out


def header_complete(path: str | Path) -> bool:
    """True when the weights file's header parses and every tensor lies inside the file."""
    try:
        with SafetensorsFile(weights_file(Path(path))):
            return True
    except (BadInput, OSError, ValueError):
        return False


@dataclass
class _Pending:
    sig: Signature
    since: float


@dataclass
class WatchStats:
    """What a watch did, for the caller's summary."""

    runs: int = 0
    added: int = 0
    duplicates: int = 0
    removed: int = 0
    sources_gone: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    events: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "added": self.added, "duplicates": self.duplicates, "removed": self.removed,
                "sources_gone": self.sources_gone, "failed": self.failed, "events": self.events}


# ---------------------------------------------------------------------------
# Removals
# ---------------------------------------------------------------------------


def _ids_for_path(store: Any, path: str) -> list[int]:
    w = str(weights_file(Path(path)))
    rows = store.execute("SELECT DISTINCT s.lora_id FROM sources s JOIN loras l ON l.id = s.lora_id"
                         " WHERE l.deleted = 0 AND (s.path = ? OR s.path = ?)", (w, path))
    return [int(r[0]) for r in rows]


def _still_held(store: Any, lora_id: int, gone_path: str) -> bool:
    """Whether another recorded source (not gone, and not a local file that no longer exists) holds the content."""
    w = str(weights_file(Path(gone_path)))
    rows = store.execute("SELECT s.path, s.repo FROM sources s WHERE s.lora_id = ? AND s.path NOT IN (?, ?)"
                         " AND NOT EXISTS (SELECT 1 FROM watch_gone g WHERE g.lora_id = s.lora_id AND g.path = s.path)",
                         (lora_id, w, gone_path))
    return any(r[1] or Path(r[0]).exists() for r in rows)


def _forget_id(store: Any, path: str, lora_id: int, log: Log) -> tuple[int, int]:
    """Record ``path`` as gone for one entry; delete the entry unless another source still holds it."""
    w = str(weights_file(Path(path)))
    with store.transaction() as c:
        c.execute("INSERT OR IGNORE INTO watch_gone(path, lora_id, removed_at) VALUES (?,?,?)", (w, lora_id, _now()))
    if _still_held(store, lora_id, path):
        log(f"watch: {path}: #{lora_id} kept (another source holds the same content)")
        return 0, 1
    if store.delete(lora_id):
        log(f"watch: {path}: #{lora_id} deleted from the store")
        return 1, 0
    return 0, 0


def _latest_id(store: Any, path: str) -> int | None:
    """The entry the newest finished indexing of this path produced."""
    keys = list(dict.fromkeys([path, str(Path(path).resolve())]))
    rows = store.execute(f"SELECT lora_id FROM job_items WHERE item IN ({','.join('?' * len(keys))})"
                         " AND status='done' AND lora_id IS NOT NULL ORDER BY id DESC LIMIT 1", keys)
    return int(rows[0][0]) if rows else None


def forget_paths(db: str | Path, paths: Iterable[str], log: Log = _stderr, replaced: bool = False) -> tuple[int, int]:
    """Sync the store with files that are gone (or rewritten): drop entries no other source holds, record the rest.

    Args:
        db: the store directory.
        paths: absolute paths of removed files or PEFT folders.
        log: where one line per change goes.
        replaced: the paths still exist with new content: only entries other
            than the newest indexing of each path are dropped.

    Returns:
        (entries deleted, sources recorded as gone).
    """
    from lorasearch.store import DB_NAME, Store

    paths = list(paths)
    if not paths or not (Path(db) / DB_NAME).is_file():
        return 0, 0
    deleted = gone = 0
    with exclusive(db):
        store = Store(db, create=False)
        try:
            store.ensure_tables(GONE_SCHEMA)
            for p in paths:
                ids = _ids_for_path(store, p)
                if replaced:
                    latest = _latest_id(store, p) if len(ids) > 1 else None
                    ids = [i for i in ids if latest is not None and i != latest]
                for lid in ids:
                    d, g = _forget_id(store, p, lid, log)
                    deleted, gone = deleted + d, gone + g
            if deleted:
                from lorasearch.collection_map import update_maps

                update_maps(store)
        finally:
            store.close()
    return deleted, gone


def _clear_gone(db: str | Path, paths: Iterable[str]) -> None:
    """A path indexed again is no longer gone."""
    from lorasearch.store import Store

    ws = [str(weights_file(Path(p))) for p in paths]
    if not ws:
        return
    with exclusive(db):
        store = Store(db, create=False)
        try:
            store.ensure_tables(GONE_SCHEMA)
            with store.transaction() as c:
                c.executemany("DELETE FROM watch_gone WHERE path = ?", [(w,) for w in ws])
        finally:
            store.close()


def indexed_paths(db: str | Path, sources: Sequence[str]) -> set[str]:
    """Local paths the store holds live entries for, under the given local sources."""
    from lorasearch.store import Store, StoreError

    roots = [str(Path(s).expanduser().absolute()) for s in local_sources(sources)]
    try:
        store = Store(db, create=False, readonly=True)
    except StoreError:
        return set()
    try:
        has_gone = bool(store.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='watch_gone'"))
        q = ("SELECT s.path FROM sources s JOIN loras l ON l.id = s.lora_id WHERE l.deleted = 0 AND s.repo IS NULL"
             + (" AND NOT EXISTS (SELECT 1 FROM watch_gone g WHERE g.lora_id = s.lora_id AND g.path = s.path)"
                if has_gone else ""))
        paths = {str(r[0]) for r in store.execute(q)}
    finally:
        store.close()
    return {p for p in paths if any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)}


# ---------------------------------------------------------------------------
# The watcher
# ---------------------------------------------------------------------------


class Watcher:
    """Keeps ``db`` in step with the local ``sources``; ``run()`` until ``stop_event`` is set.

    Args:
        sources: files and folders (hub sources are indexed once, not watched).
        db: the store directory.
        poll_interval: seconds between listings when no event arrives.
        settle_seconds: how long size+mtime must stay put before a file is read.
        stop_event: set it to stop ``run()`` (None: run until interrupted).
        use_events: try watchdog events (False: polling only).
        log: one line per change (default stderr).
        index_kwargs: passed to ``run_index`` (workers, keep_files, labels...).
    """

    def __init__(self, sources: Sequence[str], db: str | Path, poll_interval: float = DEFAULT_POLL,
                 settle_seconds: float = DEFAULT_SETTLE, stop_event: threading.Event | None = None,
                 use_events: bool = True, log: Log = _stderr, **index_kwargs: Any) -> None:
        self.sources = list(sources)
        self.local = local_sources(self.sources)
        self.db = db
        self.poll_interval = float(poll_interval)
        self.settle = float(settle_seconds)
        self.stop_event = stop_event or threading.Event()
        self.use_events = use_events
        self.log = log
        self.index_kwargs = {"progress": False, **index_kwargs}
        self.known: dict[str, Signature] = {}
        self.pending: dict[str, _Pending] = {}
        self.stats = WatchStats()
        self._wake = threading.Event()
        self._rescan = threading.Event()
        self._observer: Any = None
        self._hub_done = False

    # -- public -------------------------------------------------------------------------------------------------
    def rescan(self) -> None:
        """Ask for a full re-listing and removal sync now (thread- and signal-safe)."""
        self._rescan.set()
        self._wake.set()

    def stop(self) -> None:
        """Stop ``run()`` after the step in progress (thread- and signal-safe)."""
        self.stop_event.set()
        self._wake.set()

    def run(self) -> dict[str, Any]:
        """Index what is there, then follow changes until ``stop_event`` is set.

        Returns:
            ``{"runs", "added", "duplicates", "removed", "sources_gone", "failed", "events"}``.
        """
        self._start_events()  # before the first listing, so nothing written meanwhile goes unnoticed
        self.initial_index()
        try:
            while not self.stop_event.is_set():
                self._wake.wait(self._timeout())
                self._wake.clear()
                if self.stop_event.is_set():
                    break
                if self._rescan.is_set():
                    self._rescan.clear()
                    self.full_rescan()
                else:
                    self.step()
        finally:
            self._stop_events()
        return self.stats.as_dict()

    def step(self, now: float | None = None) -> None:
        """One comparison of the folders with what is indexed: removals, settling files, ready files."""
        now = time.monotonic() if now is None else now
        current = snapshot(self.local)
        removed = [p for p in self.known if p not in current]
        changed = [p for p, sig in current.items() if self.known.get(p) != sig]
        if removed:
            self._forget(removed)
            for p in removed:
                self.known.pop(p, None)
                self.pending.pop(p, None)
        ready = []
        for p in changed:
            sig = current[p]
            pend = self.pending.get(p)
            if pend is None or pend.sig != sig:
                self.pending[p] = _Pending(sig, now)
                continue
            waited = now - pend.since
            if waited >= self.settle and (header_complete(p) or waited >= BROKEN_AFTER * self.settle):
                ready.append(p)
        for p in list(self.pending):
            if p not in current:
                del self.pending[p]
        if ready:
            self._index(ready)
            _clear_gone(self.db, ready)
            old = [p for p in ready if p in self.known]
            if old:  # the old content of a rewritten file goes like a removed file
                self._forget(old, replaced=True)
            for p in ready:
                self.known[p] = current[p]
                del self.pending[p]

    def initial_index(self) -> None:
        """Index every complete file; files still being written wait in ``pending`` like new ones."""
        current = snapshot(self.local)
        incomplete = {p for p in current if not header_complete(p)}
        hub = [] if self._hub_done else [s for s in self.sources if s not in self.local]  # hub: once, at start
        self._hub_done = True
        if incomplete:  # name the complete files one by one, so the half-written ones are not read
            self._index(hub + [p for p in current if p not in incomplete])
        else:
            self._index(hub + self.local)
        now = time.monotonic()
        rewritten = [p for p, sig in current.items() if p not in incomplete and self.known.get(p) != sig]
        self.known = {p: sig for p, sig in current.items() if p not in incomplete}
        self.pending = {p: _Pending(current[p], now) for p in incomplete}
        self._sync_removed(set(current))
        if rewritten:  # a path indexed before with other content keeps only its newest entry
            _clear_gone(self.db, rewritten)
            self._forget(rewritten, replaced=True)

    def full_rescan(self) -> None:
        """Re-list every source, index what is new or changed, and drop what the store holds but the disk does not."""
        self.log("watch: rescanning")
        self.pending.clear()
        self.initial_index()

    # -- internals ------------------------------------------------------------------------------------------------
    def _timeout(self) -> float:
        if self.pending:
            return max(0.05, min(self.poll_interval, self.settle / 2))
        return self.poll_interval

    def _index(self, sources: Sequence[str]) -> None:
        if not sources:
            return
        summary = run_index(list(sources), self.db, **self.index_kwargs)
        self.stats.runs += 1
        self.stats.added += int(summary.get("added", 0))
        self.stats.duplicates += int(summary.get("duplicates", 0))
        # a file still being written when run_index reached it is not a failure: it comes back when it settles
        failed = [f for f in summary.get("failed", []) if not f.get("item") or header_complete(f["item"])]
        summary["failed"] = failed
        self.stats.failed += failed
        if summary.get("added") or summary.get("failed"):
            self.log(f"watch: indexed {summary.get('added', 0)} new, {summary.get('duplicates', 0)} duplicates, "
                     f"{len(summary.get('failed', []))} failed")

    def _forget(self, paths: list[str], replaced: bool = False) -> None:
        deleted, gone = forget_paths(self.db, paths, self.log, replaced=replaced)
        self.stats.removed += deleted
        self.stats.sources_gone += gone

    def _sync_removed(self, on_disk: set[str]) -> None:
        """Entries whose files vanished while nobody watched."""
        stale = [p for p in indexed_paths(self.db, self.local) if p not in on_disk
                 and str(Path(p).parent) not in on_disk and not Path(p).exists()]
        if stale:
            self._forget(stale)

    def _start_events(self) -> None:
        if not self.use_events or not self.local:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self.log("watch: watchdog not available; polling every "
                     f"{self.poll_interval:g} s")
            return
        wake = self._wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type != "opened" and event.event_type != "closed_no_write":
                    wake.set()

        try:
            obs = Observer()
            for src in self.local:
                p = Path(src).expanduser().absolute()
                folder = p if p.is_dir() else p.parent
                obs.schedule(_Handler(), str(folder), recursive=p.is_dir())
            obs.start()
        except Exception as exc:  # noqa: BLE001 - e.g. inotify watch limit: polling still works
            self.log(f"watch: file events unavailable ({exc.__class__.__name__}: {exc}); polling every "
                     f"{self.poll_interval:g} s")
            return
        self._observer = obs
        self.stats.events = True

    def _stop_events(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


def watch(sources: Sequence[str], db: str | Path, poll_interval: float = DEFAULT_POLL,
          settle_seconds: float = DEFAULT_SETTLE, stop_event: threading.Event | None = None,
          **index_kwargs: Any) -> dict[str, Any]:
    """Index ``sources`` into ``db`` and keep following their changes until ``stop_event`` is set (or Ctrl-C).

    In the main thread, SIGUSR1 asks for a full rescan and SIGTERM stops the watch cleanly.

    Args:
        sources: files and folders (hub sources are indexed once).
        db: the store directory.
        poll_interval: seconds between listings without events.
        settle_seconds: quiet time before a new or changed file is read.
        stop_event: stops the loop when set.
        index_kwargs: ``run_index`` options, plus ``use_events`` and ``log`` for the Watcher.

    Returns:
        the watch summary (see ``Watcher.run``).
    """
    opts = {k: index_kwargs.pop(k) for k in ("use_events", "log") if k in index_kwargs}
    w = Watcher(sources, db, poll_interval, settle_seconds, stop_event, **opts, **index_kwargs)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        if hasattr(signal, "SIGUSR1"):
            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: w.rescan())
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: w.stop())
    try:
        return w.run()
    except KeyboardInterrupt:
        return w.stats.as_dict()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rescan(sources: Sequence[str], db: str | Path, **index_kwargs: Any) -> dict[str, Any]:
    """One manual pass: index new and changed files, drop entries whose files are gone.

    Returns:
        the summary (``runs``, ``added``, ``removed``...).
    """
    opts = {k: index_kwargs.pop(k) for k in ("log",) if k in index_kwargs}
    w = Watcher(sources, db, use_events=False, **opts, **index_kwargs)
    w.initial_index()
    return w.stats.as_dict()
