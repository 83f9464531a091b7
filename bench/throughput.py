"""Indexing throughput: ``run_index`` with 1 and 2 workers ÷ a plain sha256 read of the same files.

Corpus: every file of ``../shared/loras`` (LoRAs, PEFT sidecar configs, and
the few layouts the readers refuse), repeated ``--copies`` times into a temp
folder. Copy 0 is the file itself; copy i > 0 is re-written with its first
floating-point tensor multiplied by (1 + i/64) and a ``lorasearch_bench_copy``
metadata entry, so every copy is distinct content (a metadata edit alone
would not be: AutoV3 ignores the header, and the store would count a
duplicate without a new row).

Each run indexes the whole folder into a fresh store
(``indexer.pipeline.run_index(..., workers=N, progress=False)``, blob copies
kept unless the row says otherwise): reading, hashing, decoding, family
resolution, embedding, SQLite + sketch + blob writes with fsync, FAISS saves,
job-table bookkeeping, and the collection maps the indexer refreshes at the
end (timed on its own and reported beside, since it is a per-family layout,
not per-file work). The reference is ``hashlib.sha256`` over the same files in 1 MiB reads
(1 process, and 2 processes for the 2-worker ratio). Files are in the OS page
cache for every run (they were just written and are read once before timing).

Run: ``python bench/throughput.py [--copies 5] [--quick] [--write]``.
"""
from __future__ import annotations

import common  # noqa: F401,I001  (first: sets the BLAS thread count before numpy loads)

import argparse
import hashlib
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SHARED_LORAS, command_line, machine, md_table, today, write_section

CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """The reference read: sha256 of the whole file in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_all(paths: list[Path], procs: int) -> float:
    """Wall seconds to sha256 every file with ``procs`` processes (pool start-up not timed)."""
    names = [str(p) for p in paths]
    if procs == 1:
        t0 = time.perf_counter()
        for p in names:
            sha256_file(p)
        return time.perf_counter() - t0
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(sha256_file, names[:procs])  # start the workers
        t0 = time.perf_counter()
        pool.map(sha256_file, names, chunksize=4)
        return time.perf_counter() - t0


def _distinct_copy(src: Path, dest: Path, i: int) -> None:
    """``src`` re-written with one tensor scaled by (1 + i/64) and a metadata marker: new content, same layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in sorted(tensors):
        t = tensors[k]
        if t.is_floating_point() and t.numel() > 1:
            tensors[k] = (t.double() * (1 + i / 64)).to(t.dtype)
            break
    meta["lorasearch_bench_copy"] = str(i)
    save_file(tensors, str(dest), metadata=meta)


def make_corpus(dest: Path, copies: int, files: list[Path]) -> list[Path]:
    """Write the corpus; returns the weight files (sidecar configs are beside them)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(copies):
        for src in files:
            target = dest / f"c{i:02d}__{src.name}"
            if i == 0:
                shutil.copyfile(src, target)
            else:
                try:
                    _distinct_copy(src, target, i)
                except Exception:  # noqa: BLE001 - a file safetensors cannot rewrite is copied as is
                    shutil.copyfile(src, target)
            cfg = src.with_name(src.stem + ".adapter_config.json")
            if cfg.is_file():
                shutil.copyfile(cfg, target.with_name(target.stem + ".adapter_config.json"))
            out.append(target)
    return out


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def index_run(corpus: Path, db: Path, workers: int, keep_files: bool) -> dict[str, Any]:
    """One ``run_index`` of the corpus folder into a fresh store; wall and CPU seconds.

    The collection-map refresh ``run_index`` ends with (``update_maps``) is timed on its
    own by wrapping the pipeline's reference to it (same function, same arguments).
    """
    import indexer.pipeline as pipeline

    maps: list[float] = []
    real = pipeline.update_maps

    def timed_update_maps(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            maps.append(time.perf_counter() - t)

    shutil.rmtree(db, ignore_errors=True)
    pipeline.update_maps = timed_update_maps
    try:
        c0, t0 = _cpu(), time.perf_counter()
        out = pipeline.run_index([str(corpus)], db, workers=workers, keep_files=keep_files, progress=False)
        wall = time.perf_counter() - t0
    finally:
        pipeline.update_maps = real
    return {"wall": wall, "cpu": _cpu() - c0, "added": out["added"], "duplicates": out["duplicates"],
            "failed": len(out["failed"]), "items": out["items"], "maps": sum(maps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=5, help="times the shared folder is repeated (default 5)")
    ap.add_argument("--quick", action="store_true", help="6 files, 1 copy (seconds; smoke test)")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the corpus and stores (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/BENCHMARKS.md")
    args = ap.parse_args()
    files = sorted(SHARED_LORAS.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{SHARED_LORAS}: no files (set LORASEARCH_SHARED)")
    copies = args.copies
    if args.quick:
        files, copies = [p for p in files if "pytorch_lora_weights" in p.name][:6], 1
    tmp = Path(tempfile.mkdtemp(prefix="lorasearch-throughput-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        corpus = make_corpus(tmp / "corpus", copies, files)
        t_corpus = time.perf_counter() - t0
        nbytes = sum(p.stat().st_size for p in corpus)
        mb = nbytes / 1e6
        sha_procs = (1, 2)
        sha256_all(corpus, 1)  # warm the page cache
        sha = {n: min(sha256_all(corpus, n) for _ in range(2)) for n in sha_procs}
        runs = [(1, True), (2, True), (2, False)]
        res = {(w, k): index_run(tmp / "corpus", tmp / f"store-{w}-{int(k)}", w, k) for w, k in runs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for (w, keep), r in res.items():
        loras = r["added"] + r["duplicates"]
        idx = r["wall"] - r["maps"]  # without the collection-map refresh
        mbs = mb / idx
        rows.append([w, "yes" if keep else "no", r["items"], r["added"], r["failed"], f"{r['wall']:.1f}",
                     f"{r['maps']:.1f}", f"{r['cpu']:.1f}", f"{loras / idx:.2f}", f"{mbs:.1f}",
                     f"{mbs / (mb / sha[1]):.3f}", f"{mbs / (mb / sha[min(w, max(sha_procs))]):.3f}",
                     f"{(res[(1, True)]['wall'] - res[(1, True)]['maps']) / idx:.2f}",
                     f"{loras / r['wall']:.2f}"])
    ref = [[f"sha256, {n} process{'es' if n > 1 else ''}", f"{sha[n]:.2f}", f"{mb / sha[n]:.0f}"] for n in sha_procs]
    body = "\n\n".join([
        "## Indexing throughput (`bench/throughput.py`)",
        f"Command: `{command_line()}`  \nMachine: {machine()}  \nDate: {today()}",
        f"Corpus: {len(files)} files of `../shared/loras` × {copies} distinct-content copies = {len(corpus)} weight "
        f"files, {mb:.0f} MB (+ PEFT sidecar configs), written in {t_corpus:.1f} s, in the page cache. Each row is "
        "one `run_index([folder], fresh_store, workers=N, keep_files=…)`: everything from file discovery to the "
        "last FAISS save and the collection-map refresh. LoRAs/s counts indexed LoRAs (refused layouts are "
        "items, not LoRAs); MB/s counts every input byte. CPU = this process + its worker processes.",
        md_table(["workers", "blob copies", "items", "LoRAs added", "refused", "wall s", "↳ map refresh s", "CPU s",
                  "LoRAs/s", "MB/s", "÷ sha256 MB/s (1 proc)", "÷ sha256 MB/s (same procs)",
                  "speed-up vs 1 worker", "LoRAs/s incl. map refresh"], rows),
        "LoRAs/s, MB/s, the ratios and the speed-up leave out the collection-map refresh that `run_index` ends "
        "with (`lorasearch.collection_map.update_maps`: a UMAP layout per family, whose numba JIT compile is paid "
        "once per process — the first row pays it); the last column keeps it in.",
        "Reference (best of 2, page cache warm):",
        md_table(["reference", "wall s", "MB/s"], ref),
    ])
    print(body)
    if args.write:
        write_section("throughput", body)


if __name__ == "__main__":
    main()
