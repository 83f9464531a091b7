"""The indexer's job table, in the store's own SQLite file, so an interrupted run resumes.

Tables (created through ``Store.ensure_tables``):

- ``jobs``: one row per indexing command (its sources, a key made from them,
  status ``running`` / ``done``, how many times it was run);
- ``job_items``: one row per (job, source, item): the local path, size, mtime,
  status ``pending`` -> ``committing`` -> ``done`` (or ``failed``, with the
  error), the LoRA id and the outcome (``added`` / ``duplicate`` / ``skipped``).

Crash safety: the store commits a batch in its own transaction, so a kill can
fall between the store commit and the job-table update. Before handing a batch
to the store, each item is marked ``committing`` with its AutoV3 and whether
that content was already in the store (``preexisting``); a resumed run keeps
that flag, so an item whose content its own killed run committed still counts
as ``added`` and is never counted twice.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from lorasearch.store import Store

from indexer.sources import Failure, WorkItem, normalise_source

JOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    sources TEXT NOT NULL,
    status TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 1,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key, status);
CREATE TABLE IF NOT EXISTS job_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    source TEXT NOT NULL,
    item TEXT NOT NULL,
    path TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    status TEXT NOT NULL,
    outcome TEXT,
    error TEXT,
    lora_id INTEGER,
    autov3 TEXT,
    preexisting INTEGER,
    updated_at TEXT NOT NULL,
    UNIQUE(job_id, source, item)
);
CREATE INDEX IF NOT EXISTS job_items_item ON job_items(item, source, status);
"""

PENDING, COMMITTING, DONE, FAILED = "pending", "committing", "done", "failed"
ADDED, DUPLICATE, SKIPPED = "added", "duplicate", "skipped"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_key(sources: Sequence[str]) -> str:
    """The identity of an indexing command: its sources (local paths made absolute), in order, without repeats."""
    unique = list(dict.fromkeys(normalise_source(s) for s in sources))
    return hashlib.sha256(json.dumps(unique).encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What the store did with one item: its LoRA id and whether its content was new."""

    item: WorkItem
    autov3: str
    lora_id: int
    new: bool


class JobTable:
    """Reads and writes the job tables through a ``Store`` (same database, same write lock).

    Args:
        store: an open, writable store.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        store.ensure_tables(JOB_SCHEMA)

    # -- jobs ------------------------------------------------------------------------------------------------
    def open(self, sources: Sequence[str]) -> tuple[int, bool]:
        """Resume the unfinished job with these sources, or start a new one.

        Failed items of a resumed job are retried (their rows are cleared).

        Returns:
            (job id, resumed).
        """
        key = job_key(sources)
        now = _now()
        with self.store.transaction() as c:
            row = c.execute("SELECT id FROM jobs WHERE key=? AND status='running' ORDER BY id DESC LIMIT 1", (key,)).fetchone()
            if row is not None:
                jid = int(row[0])
                c.execute("UPDATE jobs SET runs=runs+1, updated_at=? WHERE id=?", (now, jid))
                c.execute("DELETE FROM job_items WHERE job_id=? AND status=?", (jid, FAILED))
                return jid, True
            cur = c.execute("INSERT INTO jobs(key, sources, status, started_at, updated_at) VALUES (?,?,?,?,?)",
                            (key, json.dumps(list(dict.fromkeys(sources))), "running", now, now))
            return int(cur.lastrowid), False

    def finish(self, job_id: int) -> None:
        """Mark a job done (a later run of the same command starts a new job)."""
        now = _now()
        with self.store.transaction() as c:
            c.execute("UPDATE jobs SET status='done', finished_at=?, updated_at=? WHERE id=?", (now, now, job_id))

    # -- items -----------------------------------------------------------------------------------------------
    def known(self, job_id: int) -> dict[tuple[str, str], tuple[str, int | None, int | None]]:
        """(source, item) -> (status, size, mtime_ns) of every item this job has seen."""
        rows = self.store.execute("SELECT source, item, status, size, mtime_ns FROM job_items WHERE job_id=?", (job_id,))
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}

    def done_before(self, item: WorkItem) -> int | None:
        """The live LoRA id when an earlier job already indexed this very file (same source, size, mtime)."""
        rows = self.store.execute(
            "SELECT ji.lora_id FROM job_items ji JOIN loras l ON l.id = ji.lora_id"
            " WHERE ji.item=? AND ji.source=? AND ji.status=? AND ji.size=? AND ji.mtime_ns=? AND l.deleted=0 LIMIT 1",
            (item.key, item.source, DONE, item.size, item.mtime_ns),
        )
        return int(rows[0][0]) if rows else None

    def record(self, job_id: int, pending: Iterable[WorkItem], skipped: Iterable[tuple[WorkItem, int]],
               failed: Iterable[tuple[Failure, WorkItem | None]]) -> None:
        """Write newly seen items (pending), items skipped as already indexed, and failures, in one transaction."""
        now = _now()
        with self.store.transaction() as c:
            for it in pending:
                self._upsert(c, job_id, it, PENDING, now)
            for it, lid in skipped:
                self._upsert(c, job_id, it, DONE, now, outcome=SKIPPED, lora_id=lid)
            for f, it in failed:
                if it is not None:
                    self._upsert(c, job_id, it, FAILED, now, error=f.error)
                else:
                    c.execute(
                        "INSERT INTO job_items(job_id, source, item, path, status, error, updated_at) VALUES (?,?,?,?,?,?,?)"
                        " ON CONFLICT(job_id, source, item) DO UPDATE SET status=excluded.status, error=excluded.error,"
                        " updated_at=excluded.updated_at",
                        (job_id, f.source, f.item or f"source:{f.source}", f.item, FAILED, f.error, now),
                    )

    @staticmethod
    def _upsert(c: Any, job_id: int, it: WorkItem, status: str, now: str, outcome: str | None = None,
                error: str | None = None, lora_id: int | None = None) -> None:
        c.execute(
            "INSERT INTO job_items(job_id, source, item, path, size, mtime_ns, status, outcome, error, lora_id, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(job_id, source, item) DO UPDATE SET path=excluded.path, size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, status=excluded.status, outcome=excluded.outcome, error=excluded.error,"
            " lora_id=excluded.lora_id, updated_at=excluded.updated_at",
            (job_id, it.source, it.key, it.path, it.size, it.mtime_ns, status, outcome, error, lora_id, now),
        )

    def mark_committing(self, job_id: int, items: Sequence[tuple[WorkItem, str]]) -> None:
        """Before the store commit: each item's AutoV3 and whether the store already holds that content.

        A row already ``committing`` (left by a killed run) keeps its ``preexisting`` flag.
        """
        now = _now()
        with self.store.transaction() as c:
            for it, v3 in items:
                row = c.execute("SELECT deleted FROM loras WHERE autov3=?", (v3,)).fetchone()
                pre = int(row is not None and not row[0])
                c.execute(
                    "INSERT INTO job_items(job_id, source, item, path, size, mtime_ns, status, autov3, preexisting, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(job_id, source, item) DO UPDATE SET status=excluded.status, autov3=excluded.autov3,"
                    " size=excluded.size, mtime_ns=excluded.mtime_ns, updated_at=excluded.updated_at,"
                    " preexisting=CASE WHEN job_items.status=? AND job_items.autov3=excluded.autov3"
                    " THEN job_items.preexisting ELSE excluded.preexisting END",
                    (job_id, it.source, it.key, it.path, it.size, it.mtime_ns, COMMITTING, v3, pre, now, COMMITTING),
                )

    def mark_done(self, job_id: int, outcomes: Sequence[Outcome]) -> list[str]:
        """After the store commit: the items are done; returns each one's outcome (``added`` / ``duplicate``).

        An item counts as added when the store made a new row for it, or when
        its content was not in the store before this job and no other item of
        the job already counts as adding it (the case of a killed run whose
        store commit landed but whose job update did not).
        """
        now = _now()
        out: list[str] = []
        with self.store.transaction() as c:
            for o in outcomes:
                added = o.new
                if not added:
                    row = c.execute("SELECT preexisting FROM job_items WHERE job_id=? AND source=? AND item=?",
                                    (job_id, o.item.source, o.item.key)).fetchone()
                    sibling = c.execute("SELECT 1 FROM job_items WHERE job_id=? AND autov3=? AND outcome=? LIMIT 1",
                                        (job_id, o.autov3, ADDED)).fetchone()
                    added = row is not None and row[0] == 0 and sibling is None
                outcome = ADDED if added else DUPLICATE
                out.append(outcome)
                c.execute(
                    "UPDATE job_items SET status=?, outcome=?, lora_id=?, autov3=?, error=NULL, updated_at=?"
                    " WHERE job_id=? AND source=? AND item=?",
                    (DONE, outcome, o.lora_id, o.autov3, now, job_id, o.item.source, o.item.key),
                )
        return out

    # -- reading ---------------------------------------------------------------------------------------------
    def summary(self, job_id: int) -> dict[str, Any]:
        """The job's counts so far: ``added``, ``duplicates``, ``skipped``, ``pending``, ``failed`` [{source, error, item}]."""
        counts = {r[0] or r[1]: int(r[2]) for r in self.store.execute(
            "SELECT outcome, status, COUNT(*) FROM job_items WHERE job_id=? GROUP BY outcome, status", (job_id,))}
        failed = [{"source": r[0], "error": r[1], "item": r[2]} for r in self.store.execute(
            "SELECT source, error, path FROM job_items WHERE job_id=? AND status=? ORDER BY id", (job_id, FAILED))]
        for f in failed:
            if f["item"] is None:
                del f["item"]
        return {
            "added": counts.get(ADDED, 0),
            "duplicates": counts.get(DUPLICATE, 0),
            "skipped": counts.get(SKIPPED, 0),
            "pending": counts.get(PENDING, 0) + counts.get(COMMITTING, 0),
            "failed": failed,
            "job": job_id,
        }

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest jobs, newest first, with their counts."""
        rows = self.store.execute("SELECT id, sources, status, runs, started_at, finished_at FROM jobs ORDER BY id DESC LIMIT ?",
                                  (int(limit),))
        out = []
        for r in rows:
            s = self.summary(int(r[0]))
            out.append({"job": int(r[0]), "sources": json.loads(r[1]), "status": r[2], "runs": int(r[3]),
                        "started_at": r[4], "finished_at": r[5], "added": s["added"], "duplicates": s["duplicates"],
                        "skipped": s["skipped"], "pending": s["pending"], "failed": len(s["failed"])})
        return out
