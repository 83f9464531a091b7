"""The indexing pipeline: sources -> (workers: read + embed) -> the parent writes the store in batches.

- Workers (a ``ProcessPoolExecutor`` with the ``spawn`` context, recycled
  every ``MAX_TASKS_PER_CHILD`` items to bound memory) run
  ``read_embed.load_and_embed`` and return light picklable results (the embedding and ``summary(ld)``,
  no factor values). When the store keeps file copies, each worker also copies
  its file into the store's ``blobs/`` (content-addressed, checked against the
  sha256), so the copies run in parallel and the parent finds them in place;
  with ``workers=1`` the same work runs in the parent process.
- The parent is the single writer: ``Store.add_many`` per batch (``batch``
  items, or fewer when their files pass ``BATCH_BYTES`` or ``FLUSH_SECONDS``
  passed), then the job table records the items as done (see ``indexer.jobs``
  for why a kill between the two is harmless).
- A re-run of the same command resumes its unfinished job: items already done
  are not read again. A new command skips files an earlier job already indexed
  from the same source with the same size and mtime.
- One bad file, a worker that dies, or a source that cannot be reached becomes
  an entry of ``failed`` with a reason; it never stops the run.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lorasearch import sketch_helper
from lorasearch.collection_map import update_maps
from lorasearch.delta import LoraDelta, without_values
from lorasearch.embed import Embedding
from lorasearch.errors import BadInput, LoraSearchError
from lorasearch.read_embed import load_and_embed
from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K
from lorasearch.store import Store, copy_blob

from indexer.jobs import DONE, JobTable, Outcome
from indexer.sources import DEFAULT_SEARCH_LIMIT, Failure, WorkItem, expand_sources

MAX_TASKS_PER_CHILD = 256  # a recycled worker pays its imports and cold Gaussian caches again (~1 s)
BATCH_BYTES = 512 * 2**20  # input bytes of the results waiting in the parent (each holds its sketches)
FLUSH_SECONDS = 5.0
RECORD_EVERY = 1000  # job rows (pending/skipped/failed) buffered before a write
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOCK_NAME = "indexer.lock"


class IndexerBusy(LoraSearchError):
    """Another indexing run holds the store (one indexer writes a store at a time)."""


@contextlib.contextmanager
def exclusive(db: str | Path) -> Iterator[None]:
    """Hold ``DB/indexer.lock`` for the run; the kernel drops it when the process dies, even by kill -9.

    Raises:
        IndexerBusy: another process holds it.
    """
    root = Path(db)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise IndexerBusy(f"{root}: another indexing run (pid {holder}) is writing this store; "
                              "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class Result:
    """What a worker sends back for one item: the LoRA's summary and its embedding, or an error.

    Light to pickle: ``ld`` is ``summary(ld)`` (every module kept with its kind,
    rank and shape, but no factor values), which is all the store's writer
    needs besides the embedding; the parent copies the file into the store
    from ``ld.source["weights"]`` itself.
    """

    item: WorkItem
    ld: LoraDelta | None = None
    emb: Embedding | None = None
    error: str | None = None


def summary(ld: LoraDelta) -> LoraDelta:
    """``ld`` without its tensors: what ``Store.add_many`` reads (family, format, module kinds, ranks,
    metadata, source and hashes), at a few bytes per module instead of every factor.

    A LoRA without a file AutoV3 is returned whole (the store then hashes its values).
    """
    return without_values(ld) if ld.source.get("autov3") else ld


def process_item(item: WorkItem, k: int = DEFAULT_K, dim: int = DEFAULT_DIM, blobs: str | None = None) -> Result:
    """Read and embed one item (runs in a worker); every failure becomes ``Result.error``.

    Args:
        item: the work item.
        k: sketch size.
        dim: view vector length.
        blobs: the root of a store that keeps file copies: the file is copied there now
            (``store.copy_blob``), so that the store's single writer finds it in place.

    Returns:
        a picklable Result holding ``summary(ld)`` and the embedding.
    """
    try:
        ld, emb = load_and_embed(item.path, k=k, dim=dim, keep_factors=False)
        if blobs is not None:
            _copy_ahead(blobs, ld.source)
        return Result(item, summary(ld), emb)
    except BadInput as exc:
        return Result(item, error=str(exc))
    except MemoryError:
        return Result(item, error=f"{item.path}: out of memory while reading or embedding")
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
        return Result(item, error=f"{item.path}: internal error {exc.__class__.__name__}: {exc}")


def _copy_ahead(root: str, source: dict[str, Any]) -> None:
    """The store's copy of an indexed file, made by the worker that read it. Best effort: whatever
    fails here (the file changed, a full disk) the writer meets again and reports as it always does."""
    with contextlib.suppress(Exception):
        copy_blob(Path(root), source.get("weights"), source.get("file_sha256"), source.get("config"))


@dataclass
class _Tally:
    """Running counts for the progress bar."""

    added: int = 0
    duplicates: int = 0
    skipped: int = 0
    failed: int = 0
    seen: int = 0

    def postfix(self) -> dict[str, int]:
        return {"added": self.added, "dup": self.duplicates, "skip": self.skipped, "failed": self.failed}


@dataclass
class _Batch:
    """Results waiting for the next store write."""

    results: list[Result] = field(default_factory=list)
    nbytes: int = 0
    since: float = field(default_factory=time.monotonic)

    def due(self, size: int) -> bool:
        return bool(self.results) and (
            len(self.results) >= size or self.nbytes >= BATCH_BYTES or time.monotonic() - self.since >= FLUSH_SECONDS
        )


class _Writer:
    """The parent's side: job-table bookkeeping and batched store writes."""

    def __init__(self, store: Store, jobs: JobTable, job_id: int, labels: list[str] | None, bar: Any) -> None:
        self.store, self.jobs, self.job_id, self.labels, self.bar = store, jobs, job_id, labels, bar
        self.tally = _Tally()
        self.batch = _Batch()
        self.new_items: list[WorkItem] = []
        self.skipped: list[tuple[WorkItem, int]] = []
        self.failures: list[tuple[Failure, WorkItem | None]] = []
        self.added_families: set[str] = set()  # families that got new rows in this run (their maps change)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.tally.postfix(), refresh=False)

    def discovered(self) -> None:
        self.tally.seen += 1
        if self.bar is not None:
            self.bar.total = self.tally.seen
            self.bar.refresh()

    def finished_one(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
        self._show()

    def skip(self, item: WorkItem, lora_id: int) -> None:
        self.skipped.append((item, lora_id))
        self.tally.skipped += 1
        self.finished_one()

    def fail(self, failure: Failure, item: WorkItem | None = None) -> None:
        self.failures.append((failure, item))
        self.tally.failed += 1
        self.finished_one()

    def add(self, res: Result) -> None:
        if res.error is not None or res.ld is None or res.emb is None:
            self.fail(Failure(res.item.source, res.error or "no result", res.item.path), res.item)
            return
        self.batch.results.append(res)
        self.batch.nbytes += res.item.size

    def backlog(self) -> int:
        return len(self.new_items) + len(self.skipped) + len(self.failures)

    def flush_records(self) -> None:
        """Write pending/skipped/failed rows gathered since the last write."""
        if self.new_items or self.skipped or self.failures:
            self.jobs.record(self.job_id, self.new_items, self.skipped, self.failures)
            self.new_items, self.skipped, self.failures = [], [], []

    def flush(self) -> None:
        """Commit the waiting results: job rows -> committing, store.add_many, job rows -> done."""
        self.flush_records()
        results, self.batch = self.batch.results, _Batch()
        if not results:
            return
        self.jobs.mark_committing(self.job_id, [(r.item, _autov3(r.ld)) for r in results])
        stored = self._store(results)
        outcomes = [Outcome(r.item, _autov3(r.ld), lid, new) for r, (lid, new) in stored]
        for (r, (_, new)), o in zip(stored, self.jobs.mark_done(self.job_id, outcomes)):
            if new and r.ld is not None:
                self.added_families.add(r.ld.family)
            if o == "added":
                self.tally.added += 1
            else:
                self.tally.duplicates += 1
        self.finished_one(len(outcomes))
        self.flush_records()

    def _store(self, results: list[Result]) -> list[tuple[Result, tuple[int, bool]]]:
        """``add_many`` for the batch; if it fails, item by item so only the bad ones fail."""
        items = [(r.ld, r.emb, r.item.source_dict(), self.labels) for r in results]
        try:
            return list(zip(results, self.store.add_many(items)))
        except Exception:  # noqa: BLE001 - find the bad item(s) below
            pass
        out = []
        for r, it in zip(results, items):
            try:
                out.append((r, self.store.add_many([it])[0]))
            except Exception as exc:  # noqa: BLE001
                self.fail(Failure(r.item.source, f"{r.item.path}: could not store: {exc.__class__.__name__}: {exc}",
                                  r.item.path), r.item)
        return out


def _autov3(ld: LoraDelta | None) -> str:
    return str((ld.source if ld is not None else {}).get("autov3") or "").upper()


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Child processes started inside inherit one BLAS/OpenMP thread each (the pool is the parallelism)."""
    old = {v: os.environ.get(v) for v in _THREAD_VARS}
    for v in _THREAD_VARS:
        os.environ.setdefault(v, "1")
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               max_tasks_per_child=MAX_TASKS_PER_CHILD, initializer=_worker_init, initargs=(workers,))


def _worker_init(workers: int) -> None:
    """No sketch helper process per worker unless there is a spare core for each (the workers are the parallelism)."""
    if 2 * workers > sketch_helper.cores():
        os.environ[sketch_helper.ENV] = "0"


class _PoolRunner:
    """Keeps at most ``2 × workers`` items in flight; survives a worker that dies.

    When a worker dies, the items it may have held are re-run one at a time so
    only the culprit fails. If no worker ever returned a result and two items
    in a row kill their worker, the workers cannot start at all (e.g. a script
    without ``if __name__ == "__main__":``): the rest is read in this process.
    """

    def __init__(self, workers: int, k: int, dim: int, on_result: Callable[[Result], None],
                 fn: Callable[[WorkItem, int, int], Result] = process_item) -> None:
        self.workers, self.k, self.dim, self.on_result, self.fn = workers, k, dim, on_result, fn
        self.pool: ProcessPoolExecutor | None = _new_pool(workers)
        self.inflight: dict[Future[Result], WorkItem] = {}
        self.returned = 0

    def submit(self, item: WorkItem) -> None:
        while len(self.inflight) >= 2 * self.workers:
            self.collect(block=True)
        if self.pool is None:
            self.on_result(self.fn(item, self.k, self.dim))
            return
        self.inflight[self.pool.submit(self.fn, item, self.k, self.dim)] = item

    def _take(self, fut: Future[Result], item: WorkItem) -> bool:
        """Hand a finished future's result on; False when its worker died."""
        try:
            res = fut.result()
        except BrokenProcessPool:
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled back
            res = Result(item, error=f"{item.path}: internal error in a worker {exc.__class__.__name__}: {exc}")
        self.returned += 1
        self.on_result(res)
        return True

    def collect(self, block: bool) -> None:
        if not self.inflight:
            return
        done, _ = wait(list(self.inflight), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        broken = [item for fut in done if not self._take(fut, item := self.inflight.pop(fut))]
        if broken:
            self._recover(broken)

    def _restart(self) -> None:
        assert self.pool is not None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = _new_pool(self.workers)

    def _recover(self, broken: list[WorkItem]) -> None:
        """A worker died (segfault, OOM kill): re-run the affected items one at a time to find the culprit."""
        broken += list(self.inflight.values())
        self.inflight.clear()
        self._restart()
        doubtful: list[WorkItem] = []  # died alone before any worker ever answered: the item or the pool?
        for item in broken:
            if self.pool is None:
                self.on_result(self.fn(item, self.k, self.dim))
            elif self._take(self.pool.submit(self.fn, item, self.k, self.dim), item):
                self._died(doubtful)
                doubtful = []
            elif self.returned == 0 and len(doubtful) >= 1:
                print("lorasearch index: worker processes fail to start (see the errors above); "
                      "reading in this process instead", file=sys.stderr, flush=True)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
                for it in [*doubtful, item]:
                    self.on_result(self.fn(it, self.k, self.dim))
                doubtful = []
            else:
                if self.returned == 0:
                    doubtful.append(item)
                else:
                    self._died([item])
                self._restart()
        self._died(doubtful)

    def _died(self, items: list[WorkItem]) -> None:
        for item in items:
            self.on_result(Result(item, error=f"{item.path}: the worker process died while reading it "
                                              "(crash or out of memory)"))

    def drain(self) -> None:
        while self.inflight:
            self.collect(block=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="lora", desc="indexing", file=sys.stderr, dynamic_ncols=True)


def run_index(
    sources: Sequence[str],
    db: str | Path,
    workers: int = 1,
    keep_files: bool = True,
    progress: bool = True,
    endpoint: str | None = None,
    batch: int = 32,
    cache_dir: str | Path | None = None,
    search_limit: int = DEFAULT_SEARCH_LIMIT,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """Index LoRAs from files, folders and hub repos into the store at ``db``.

    Args:
        sources: paths, ``hf:owner/name[@revision]``, ``hf-search:<filter>[,...]``.
        db: the store directory (created if missing).
        workers: reader/embedder processes (1: in this process).
        keep_files: keep a content-addressed copy of each file in the store.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        endpoint: hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        batch: LoRAs per store transaction.
        cache_dir: huggingface_hub cache folder (default its own).
        search_limit: most repos one ``hf-search:`` source expands to.
        labels: labels given to every newly indexed LoRA.

    Returns:
        ``{"added", "duplicates", "skipped", "failed": [{"source", "error", "item"?}], "job",
        "resumed", "items", "seconds"}``: counts over the whole job (a resumed job
        counts the items its earlier, interrupted runs finished too).

    Raises:
        IndexerBusy: another indexing run is writing this store.
        StoreError: the store cannot be opened or written.
    """
    t0 = time.monotonic()
    sources = list(sources)
    with exclusive(db):
        out = _index(sources, db, workers, keep_files, progress, endpoint, batch, cache_dir, search_limit, labels)
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def _index(sources: list[str], db: str | Path, workers: int, keep_files: bool, progress: bool, endpoint: str | None,
           batch: int, cache_dir: str | Path | None, search_limit: int, labels: list[str] | None) -> dict[str, Any]:
    """``run_index`` while holding the store's indexer lock."""
    store = Store(db, keep_files=keep_files)
    try:
        jobs = JobTable(store)
        job_id, resumed = jobs.open(sources)
        k, dim = store.k or DEFAULT_K, store.dim or DEFAULT_DIM
        bar = _progress_bar(progress)
        writer = _Writer(store, jobs, job_id, labels, bar)
        if resumed:
            s = jobs.summary(job_id)
            writer.tally = _Tally(s["added"], s["duplicates"], s["skipped"])
        try:
            _run(sources, writer, jobs, job_id, workers, k, dim, batch, endpoint, cache_dir, search_limit)
        finally:
            if bar is not None:
                bar.close()
        jobs.finish(job_id)
        out = jobs.summary(job_id)
        # the web page's maps follow the index (never raises); only families with new rows change,
        # and laying one out costs seconds (UMAP + its numba JIT): a run that added nothing skips it
        if resumed:
            update_maps(store)  # an interrupted run may have committed rows without refreshing
        elif writer.added_families:
            update_maps(store, families=sorted(writer.added_families))
    finally:
        store.close()
    out.pop("pending", None)
    out["resumed"] = resumed
    out["items"] = out["added"] + out["duplicates"] + out["skipped"] + len(out["failed"])
    return out


def _run(sources: list[str], writer: _Writer, jobs: JobTable, job_id: int, workers: int, k: int, dim: int,
         batch: int, endpoint: str | None, cache_dir: str | Path | None, search_limit: int) -> None:
    """Expand the sources lazily, hand new items to the workers, write results in batches."""
    known = jobs.known(job_id)

    def on_result(res: Result) -> None:
        writer.add(res)
        if writer.batch.due(batch):
            writer.flush()

    # the workers copy the files into the store themselves: in parallel, not one by one in this process
    fn = functools.partial(process_item, blobs=str(writer.store.root.resolve())) if writer.store.keep_files else process_item
    runner = _PoolRunner(workers, k, dim, on_result, fn=fn) if workers > 1 else None
    try:
        with single_threaded_children() if runner else contextlib.nullcontext():
            for x in expand_sources(sources, endpoint, cache_dir, search_limit):
                writer.discovered()
                if isinstance(x, Failure):
                    writer.fail(x)
                    continue
                if _already_done(x, known, writer, jobs):
                    continue
                if writer.backlog() >= RECORD_EVERY:
                    writer.flush_records()
                if runner is None:
                    on_result(process_item(x, k, dim))
                else:
                    runner.submit(x)
                    runner.collect(block=False)
            if runner is not None:
                runner.drain()
        writer.flush()
    finally:
        if runner is not None:
            runner.close()


def _already_done(item: WorkItem, known: dict[tuple[str, str], tuple[str, int | None, int | None]],
                  writer: _Writer, jobs: JobTable) -> bool:
    """True when the item needs no work: done by this job's interrupted run, or by an earlier job (skipped)."""
    prev = known.get((item.source, item.key))
    if prev is not None:
        if prev[0] == DONE and prev[1:] == (item.size, item.mtime_ns):
            writer.finished_one()
            return True
        return False
    lid = jobs.done_before(item)
    if lid is not None:
        writer.skip(item, lid)
        return True
    writer.new_items.append(item)
    return False
