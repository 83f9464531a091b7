"""The Ray engine of ``lorasearch index --engine ray``: the same sources and store as the local engine.

- The driver expands the sources (``indexer.sources``, as the local engine),
  skips items its job already finished or an earlier job indexed, and groups
  the rest, in order, into small batches (``batch_files`` files or
  ``batch_bytes``).
- Each batch is one Ray task (``max_retries``: a task whose worker dies is
  re-run by Ray); at most ``inflight`` tasks are pending at a time (``ray.wait``
  back-pressure), so a million-file source never floods the object store.
  The task runs the local engine's ``process_item`` on each file (a bad file is
  an error in its result, never an exception) and writes an embedding shard
  (``indexer.shards``) into ``DB/shards/<job>/``; on a node that cannot see
  that folder it returns the shard's bytes and the driver writes them. A batch
  whose task still fails after its retries is re-run one file per task, so only
  the culprit is recorded as failed.
- One merge step folds every shard into the store with ``Store.add_records``:
  one SQLite transaction, then one FAISS update and save per (family, view),
  in the order the sources were expanded (so row ids follow the local engine's
  single-worker order). Shards are deleted only after the job table records
  the items done: a crash at any point leaves the last committed store, and
  a re-run of the same command resumes (finished shards are not recomputed).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from lorasearch import sketch_helper
from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K
from lorasearch.store import IndexPolicy, Store, record_from

from indexer import shards as sh
from indexer.jobs import DONE, JobTable, Outcome
from indexer.pipeline import exclusive, process_item, single_threaded_children
from indexer.sources import DEFAULT_SEARCH_LIMIT, Failure, WorkItem, expand_sources

BATCH_FILES = 8
BATCH_BYTES = 64 * 2**20
MAX_RETRIES = 2


# --------------------------------------------------------------------------- the task (runs on a worker)


def embed_batch(items: Sequence[WorkItem], folder: str, sid: str, k: int, dim: int,
                labels: list[str] | None) -> dict[str, Any]:
    """Read and embed a batch of files into one shard (a Ray task body; also callable in-process).

    Returns:
        ``{"sid", "written": bool, "npz"?, "json"?, "records", "failures", "seconds"}``; when the
        shard folder is not visible on this node the shard's bytes are returned for the driver.
    """
    t0 = time.perf_counter()
    shard = sh.Shard(items=[it.key for it in items])
    for it in items:
        with sketch_helper.disabled():  # Ray gave this task one CPU: no second process beside it
            res = process_item(it, k, dim)
        try:
            if res.error is not None or res.ld is None or res.emb is None:
                raise ValueError(res.error or f"{it.path}: no result")
            shard.records.append(record_from(res.ld, res.emb, it.source_dict(), labels))
            shard.record_items.append(it.key)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
            msg = str(exc) if isinstance(exc, ValueError) else f"{it.path}: internal error {exc.__class__.__name__}: {exc}"
            shard.failures.append({"item": it.key, "error": msg})
    npz, meta = sh.encode(shard)
    out: dict[str, Any] = {"sid": sid, "records": len(shard.records), "failures": len(shard.failures)}
    if Path(folder).is_dir():
        sh.write_encoded(Path(folder), sid, npz, meta)
        out["written"] = True
    else:
        out.update({"written": False, "npz": npz, "json": meta})
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to a Ray cluster (``address``), or reuse the initialised one, or start a local one on 127.0.0.1."""
    import ray

    started = False
    if not ray.is_initialized():
        with single_threaded_children():  # local workers: one BLAS thread each, the tasks are the parallelism
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or 2, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _batches(items: list[WorkItem], files: int, nbytes: int) -> Iterator[list[WorkItem]]:
    """Consecutive items, at most ``files`` per batch and about ``nbytes`` of weights."""
    cur: list[WorkItem] = []
    size = 0
    for it in items:
        if cur and (len(cur) >= files or size + it.size > nbytes):
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += it.size
    if cur:
        yield cur


class _Dispatcher:
    """Ray tasks with at most ``inflight`` pending; failed batches are split to single files."""

    def __init__(self, ray: Any, folder: Path, k: int, dim: int, labels: list[str] | None, inflight: int,
                 max_retries: int) -> None:
        self.ray, self.folder, self.k, self.dim, self.labels = ray, folder, k, dim, labels
        self.inflight = max(1, inflight)
        self.remote = ray.remote(num_cpus=1, max_retries=max_retries)(embed_batch)
        self.pending: dict[Any, list[WorkItem]] = {}
        self.lost: list[tuple[WorkItem, str]] = []  # items whose single-file task failed for good
        self.task_seconds = 0.0

    def submit(self, batch: list[WorkItem]) -> None:
        while len(self.pending) >= self.inflight:
            self._collect_one()
        ref = self.remote.remote(batch, str(self.folder), sh.shard_id([it.key for it in batch]), self.k, self.dim,
                                 self.labels)
        self.pending[ref] = batch

    def _collect_one(self) -> None:
        done, _ = self.ray.wait(list(self.pending), num_returns=1)
        ref = done[0]
        batch = self.pending.pop(ref)
        try:
            out = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the task failed after its retries (worker died, ...)
            if len(batch) > 1:
                for it in batch:  # one file per task: only the culprit fails
                    self.submit([it])
            else:
                self.lost.append((batch[0], f"{batch[0].path}: the Ray task failed after {MAX_RETRIES} retries "
                                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"))
            return
        self.task_seconds += float(out.get("seconds", 0.0))
        if not out.get("written"):
            sh.write_encoded(self.folder, out["sid"], out["npz"], out["json"])

    def drain(self) -> None:
        while self.pending:
            self._collect_one()


def run_index_ray(
    sources: Sequence[str],
    db: str | Path,
    address: str | None = None,
    keep_files: bool = True,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    search_limit: int = DEFAULT_SEARCH_LIMIT,
    labels: list[str] | None = None,
    num_cpus: int | None = None,
    batch_files: int = BATCH_FILES,
    batch_bytes: int = BATCH_BYTES,
    inflight: int | None = None,
    max_retries: int = MAX_RETRIES,
    policy: IndexPolicy | None = None,
    update_map: bool = True,
) -> dict[str, Any]:
    """``run_index`` with the embedding work on a Ray cluster; same arguments, same summary.

    Args:
        sources: paths, ``hf:owner/name[@revision]``, ``hf-search:<filter>[,...]``.
        db: the store directory (created if missing).
        address: Ray cluster address (None: the initialised Ray, else a local one with ``num_cpus``).
        keep_files: keep a content-addressed copy of each file in the store.
        endpoint, cache_dir, search_limit: as ``run_index`` (hub sources are downloaded by the driver).
        labels: labels given to every newly indexed LoRA.
        num_cpus: CPUs of a local Ray started here (default 2).
        batch_files, batch_bytes: files per task.
        inflight: most pending tasks (default 2 × the cluster's CPUs).
        max_retries: Ray retries of a task whose worker died.
        policy: the store's index policy (memory and latency budget).
        update_map: refresh the collection maps afterwards, as the local engine does.

    Returns:
        ``{"added", "duplicates", "skipped", "failed", "job", "resumed", "items", "seconds", "engine",
        "shards", "merge_seconds", "task_seconds"}``.
    """
    t0 = time.monotonic()
    with exclusive(db):
        out = _index(list(sources), db, address, keep_files, endpoint, cache_dir, search_limit, labels, num_cpus,
                     batch_files, batch_bytes, inflight, max_retries, policy, update_map)
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def _index(sources: list[str], db: str | Path, address: str | None, keep_files: bool, endpoint: str | None,
           cache_dir: str | Path | None, search_limit: int, labels: list[str] | None, num_cpus: int | None,
           batch_files: int, batch_bytes: int, inflight: int | None, max_retries: int, policy: IndexPolicy | None,
           update_map: bool) -> dict[str, Any]:
    store = Store(db, keep_files=keep_files, policy=policy)
    try:
        jobs = JobTable(store)
        job_id, resumed = jobs.open(sources)
        k, dim = store.k or DEFAULT_K, store.dim or DEFAULT_DIM
        folder = sh.shard_dir(db, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        todo, order, failures, skipped = _plan(sources, jobs, job_id, endpoint, cache_dir, search_limit)
        covered = {key for p in sh.list_shards(folder) for key in sh.read_meta(p)["items"]}
        run = [it for it in todo if it.key not in covered]
        known = jobs.known(job_id)  # rows a killed run left (committing) keep their state
        jobs.record(job_id, [it for it in todo if (it.source, it.key) not in known], skipped, failures)
        task_s = 0.0
        if run:
            with ray_session(address, num_cpus) as ray:
                cpus = int(ray.cluster_resources().get("CPU", 1))
                disp = _Dispatcher(ray, folder, k, dim, labels, inflight or 2 * cpus, max_retries)
                for batch in _batches(run, batch_files, batch_bytes):
                    disp.submit(batch)
                disp.drain()
                task_s = disp.task_seconds
            if disp.lost:
                jobs.record(job_id, [], [], [(Failure(it.source, err, it.path), it) for it, err in disp.lost])
        t_merge = time.monotonic()
        nshards, families = merge(store, jobs, job_id, folder, {it.key: it for it in todo}, order)
        merge_s = time.monotonic() - t_merge
        jobs.finish(job_id)
        summary = jobs.summary(job_id)
        shutil.rmtree(folder, ignore_errors=True)
        if update_map and (resumed or families):  # as the local engine: only families with new rows change
            from lorasearch.collection_map import update_maps

            if resumed:  # an interrupted run may have committed rows without refreshing
                update_maps(store)
            else:
                update_maps(store, families=sorted(families))
    finally:
        store.close()
    summary.pop("pending", None)
    summary.update({"resumed": resumed, "engine": "ray", "shards": nshards, "merge_seconds": round(merge_s, 3),
                    "task_seconds": round(task_s, 3)})
    summary["items"] = summary["added"] + summary["duplicates"] + summary["skipped"] + len(summary["failed"])
    return summary


def _plan(sources: list[str], jobs: JobTable, job_id: int, endpoint: str | None, cache_dir: str | Path | None,
          search_limit: int) -> tuple[list[WorkItem], dict[str, int], list[tuple[Failure, WorkItem | None]],
          list[tuple[WorkItem, int]]]:
    """Expand the sources: (items to embed, item key -> position, failures, items an earlier job indexed)."""
    known = jobs.known(job_id)
    todo: list[WorkItem] = []
    order: dict[str, int] = {}
    failures: list[tuple[Failure, WorkItem | None]] = []
    skipped: list[tuple[WorkItem, int]] = []
    for x in expand_sources(sources, endpoint, cache_dir, search_limit):
        if isinstance(x, Failure):
            failures.append((x, None))
            continue
        order.setdefault(x.key, len(order))
        prev = known.get((x.source, x.key))
        if prev is not None:
            if prev[0] == DONE and prev[1:] == (x.size, x.mtime_ns):
                continue
        else:
            lid = jobs.done_before(x)
            if lid is not None:
                skipped.append((x, lid))
                continue
        todo.append(x)
    return todo, order, failures, skipped


def merge(store: Store, jobs: JobTable, job_id: int, folder: Path, items: dict[str, WorkItem],
          order: dict[str, int]) -> tuple[int, set[str]]:
    """Fold every shard of ``folder`` into the store in one transaction; record outcomes and failures.

    Records whose k / dim / sketch version differ from the store's fail alone (the
    rest still commits).

    Returns:
        (shards merged, families that got new rows).
    """
    paths = sh.list_shards(folder)
    families: set[str] = set()
    if not paths:
        return 0, families
    fails: list[tuple[Failure, WorkItem | None]] = []
    for p in paths:
        meta = sh.read_meta(p)
        for f in meta["failures"]:
            it = items.get(f["item"])
            if it is not None:
                fails.append((Failure(it.source, f["error"], it.path), it))
    want = {"k": store.k, "dim": store.dim}
    ok_keys: list[str] = []
    v3: dict[str, str] = {}
    fam: dict[str, str] = {}

    def records() -> Iterator[Any]:
        seen: set[str] = set()
        for key, rec in sh.iter_records(paths, order):
            if key in v3 and key not in seen:  # a key in two shards (a batch re-run as single files): once
                seen.add(key)
                yield rec

    for key, row in sh.iter_rows(paths, order):  # first pass over the JSON rows only: parameters and AutoV3s
        if key not in items or key in v3:
            continue
        bad = [f"{n}={row[n]} (store: {w})" for n, w in want.items() if w is not None and row[n] != w]
        if bad:
            fails.append((Failure(items[key].source, f"{items[key].path}: could not store: {', '.join(bad)}",
                                  items[key].path), items[key]))
            continue
        ok_keys.append(key)
        v3[key] = row["autov3"]
        fam[key] = row["family"]
    if fails:
        jobs.record(job_id, [], [], fails)
    if ok_keys:
        jobs.mark_committing(job_id, [(items[key], v3[key]) for key in ok_keys])
        stored = store.add_records(records())
        outcomes = [Outcome(items[key], v3[key], lid, new) for key, (lid, new) in zip(ok_keys, stored)]
        jobs.mark_done(job_id, outcomes)
        families = {fam[key] for key, (_, new) in zip(ok_keys, stored) if new}
    return len(paths), families

