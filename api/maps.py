"""Collection maps follow the API's writes: a background refresh after ``POST``/``DELETE /v1/loras``.

A write only marks its family dirty (the request never waits); one daemon
thread per server process waits ``delay`` seconds for the burst to settle (up
to ``max_delay`` after the first mark), then refreshes every dirty family in
one go, in a child process (``python -m lorasearch.collection_map``): a
UMAP's numba import and JIT (~7 s here) and its memory stay out of the server,
and the child runs at a lower priority than the queries. Refreshes from
several workers are serialised by a file lock in the child. Until a refresh
lands, ``GET /v1/map`` drops deleted LoRAs and lists the new ones as not
placed yet (``live_map``).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("lorasearch.api")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 5.0
CHILD_TIMEOUT_S = 900
CHILD_NICE = 10


def run_child(db: Path, families: list[str]) -> dict[str, Any]:
    """Refresh the maps of ``families`` in a child process; its JSON answer (or an error entry)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "lorasearch.collection_map", str(db), *families, "--nice", str(CHILD_NICE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"*": f"failed: {exc.__class__.__name__}: {exc}"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"*": f"failed: exit {proc.returncode}: {last}"}
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        return {"*": f"failed: unreadable answer {proc.stdout[-200:]!r}"}


class MapRefresher:
    """Coalesces map refreshes after writes; one worker thread, started on first use.

    Args:
        db: the store directory.
        runner: does one refresh (default: ``run_child``); tests pass a recorder.
        delay: quiet time after the last mark before refreshing.
        max_delay: refresh at the latest this long after the first pending mark.
    """

    def __init__(self, db: Path, runner: Callable[[Path, list[str]], dict[str, Any]] = run_child,
                 delay: float = DEFAULT_DELAY_S, max_delay: float = DEFAULT_MAX_DELAY_S) -> None:
        self.db, self.runner, self.delay, self.max_delay = db, runner, delay, max_delay
        self._cond = threading.Condition()
        self._dirty: set[str] = set()
        self._first = self._last = 0.0
        self._thread: threading.Thread | None = None
        self._stop = False
        self.runs = 0
        self.busy = False
        self.last_result: dict[str, Any] = {}

    def mark(self, families: Iterable[str]) -> None:
        """Schedule a refresh of these families (returns at once)."""
        fams = {f for f in families if f}
        if not fams:
            return
        with self._cond:
            if self._stop:
                return
            now = time.monotonic()
            if not self._dirty:
                self._first = now
            self._dirty |= fams
            self._last = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="map-refresh", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        """A refresh is waiting or running."""
        with self._cond:
            return bool(self._dirty) or self.busy

    def _next_batch(self) -> list[str] | None:
        with self._cond:
            while not self._stop:
                if self._dirty:
                    due = min(self._last + self.delay, self._first + self.max_delay)
                    wait = due - time.monotonic()
                    if wait <= 0:
                        batch = sorted(self._dirty)
                        self._dirty.clear()
                        self.busy = True
                        return batch
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                res = self.runner(self.db, batch)
            except Exception as exc:  # noqa: BLE001 - a map is a convenience: never take the server down
                res = {"*": f"failed: {exc.__class__.__name__}: {exc}"}
            failed = {k: v for k, v in res.items() if str(v).startswith("failed")}
            if failed:
                log.warning("collection map refresh of %s: %s", ", ".join(batch), failed)
            with self._cond:
                self.runs += 1
                self.last_result = res
                self.busy = False
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (tests and shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._dirty or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 0.0) -> None:
        """Stop the thread after the refresh in progress (pending marks are dropped)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout)


def live_map(m: dict[str, Any], live: list[int]) -> dict[str, Any]:
    """A saved map against the family's live LoRAs now: deleted ones dropped, new ones listed as not placed.

    Args:
        m: the saved map (``collection_map.load_map``).
        live: ids of the family's live LoRAs.

    Returns:
        the map with ``points`` filtered, ``count`` = live LoRAs, ``unplaced`` = ids not on it yet, ``stale``.
    """
    alive = set(live)
    points = [p for p in m.get("points", []) if p.get("id") in alive]
    placed = {p.get("id") for p in points}
    unplaced = [i for i in live if i not in placed]
    subsampled = int(m.get("layout_points") or 0) < int(m.get("layout_count") or 0)
    stale = len(points) != len(m.get("points", [])) or (bool(unplaced) and not subsampled)
    return {**m, "points": points, "count": len(live), "unplaced": [] if subsampled else unplaced, "stale": stale}
