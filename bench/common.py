"""Shared helpers for the benchmarks: data, timing, machine info, BENCHMARKS.md sections.

Benchmarks print their tables on stdout and, with ``--write``, replace their
own section of ``bench/BENCHMARKS.md`` (between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``), so each one can be re-run without touching the
others' sections.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

# One BLAS/torch thread per process unless BENCH_THREADS says otherwise: the indexer
# runs one worker process per core, and on a small shared machine a second BLAS
# thread that finds its core busy makes timings swing by 10× (measured).
BENCH_THREADS = os.environ.get("BENCH_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, BENCH_THREADS)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORASEARCH_SHARED", REPO.parent / "shared"))
SHARED_LORAS = SHARED / "loras"
BENCHMARKS_MD = REPO / "bench" / "BENCHMARKS.md"

if str(REPO) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def shared_files(family: str, folder: Path = SHARED_LORAS) -> list[tuple[Path, Any]]:
    """Every readable real file of one family, with its LoraDelta.

    Args:
        family: e.g. ``sd15``.
        folder: the shared real-file folder.

    Returns:
        (path, LoraDelta) sorted by path; unreadable files are skipped.
    """
    from lorasearch.errors import LoraSearchError
    from lorasearch.formats import load_lora

    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: the benchmark needs the shared real files (set LORASEARCH_SHARED)")
    out = []
    for p in sorted(folder.glob("*.safetensors")):
        try:
            ld = load_lora(p)
        except LoraSearchError:
            continue
        if ld.family == family:
            out.append((p, ld))
    return out


@contextlib.contextmanager
def work_dir(prefix: str, keep: Path | None) -> Iterator[Path]:
    """A fresh temp folder for a benchmark's files, inside ``keep`` (created) and kept there, else removed after."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=keep))
    try:
        yield tmp
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call (perf_counter) and its result."""
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call; CPU time is what contention on a shared machine leaves alone."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def set_torch_threads() -> None:
    """Apply BENCH_THREADS to torch too (the read baseline uses it)."""
    import torch

    torch.set_num_threads(int(BENCH_THREADS))


def repeat(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(repeats)]


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def machine() -> str:
    """One line describing the machine and the library versions that matter for timings."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = "-"
    try:
        load = "load average %.1f" % os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = "load average ?"
    ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    return (f"{cpu}, {os.cpu_count()} cores, {ram} ({load} at the end of the run), {BENCH_THREADS} BLAS/torch thread(s), "
            f"Linux {platform.release()}, Python {platform.python_version()}, numpy {np.__version__}, torch {tv}")


def today() -> str:
    return _dt.date.today().isoformat()


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section of one benchmark in BENCHMARKS.md.

    Args:
        name: the benchmark's id (``sketch_error``, ``embed_cost``...).
        body: markdown, starting with its own ``## `` heading.
        path: the markdown file.
    """
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def command_line() -> str:
    """The command that ran this benchmark, relative to the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])
