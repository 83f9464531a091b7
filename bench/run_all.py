"""Run every benchmark of bench/ in sequence: sketch_error, embed_cost, retrieval, throughput, query_latency, then the others.

Each runs as its own process (``python bench/<name>.py``), its output streamed
as it comes. Besides the five core benchmarks, every other ``bench/*.py``
script (except ``common.py`` and this one) runs after them, in name order.

``--quick`` runs the core five in their seconds-long mode (``--quick`` where
the benchmark has it, otherwise its smallest settings; the smoke test's mode)
and never writes BENCHMARKS.md; the other scripts are left out of ``--quick``
unless named with ``--only`` (their quick modes take minutes, or they have
none). ``--write`` lets each benchmark replace its own section.

Run: ``python bench/run_all.py [--quick] [--write] [--only a,b] [--skip a,b]``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ORDER = ("sketch_error", "embed_cost", "retrieval", "throughput", "query_latency")
NOT_BENCHMARKS = {"common", "run_all"}
# Smallest settings of benchmarks that have no --quick (used only when their script lacks --quick;
# a flag is passed only if the script defines it).
QUICK_FALLBACK: dict[str, list[str]] = {
    "sketch_error": ["--draws", "1"],
    "embed_cost": ["--repeats", "1", "--sdxl-repeats", "1", "--skip-sdxl", "--pairs", "2"],
    "http_latency": ["--requests", "6"],
}


def discover() -> list[str]:
    """The core benchmarks in their order, then every other script of bench/ by name."""
    others = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHMARKS and p.stem not in ORDER
                    and not p.stem.startswith("_"))
    return [n for n in ORDER if (BENCH / f"{n}.py").is_file()] + others


def _defines(script: Path, flag: str) -> bool:
    return f'"{flag}"' in script.read_text(encoding="utf-8")


def bench_args(name: str, quick: bool, write: bool) -> list[str]:
    """The flags one benchmark runs with.

    Args:
        name: benchmark (file stem in bench/).
        quick: seconds-long mode.
        write: let it replace its BENCHMARKS.md section (ignored with ``quick``).
    """
    script = BENCH / f"{name}.py"
    args: list[str] = []
    if quick:
        if _defines(script, "--quick"):
            args.append("--quick")
        else:
            fb = QUICK_FALLBACK.get(name, [])
            i = 0
            while i < len(fb):  # flag [value] pairs, kept only where the script defines the flag
                flag = fb[i]
                val = [fb[i + 1]] if i + 1 < len(fb) and not fb[i + 1].startswith("--") else []
                if _defines(script, flag):
                    args += [flag, *val]
                i += 1 + len(val)
    elif write:
        args.append("--write")
    return args


def run(name: str, args: list[str], timeout: float | None) -> tuple[int, float]:
    """Run one benchmark; (exit status, wall seconds)."""
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args]
    print(f"\n=== {name}: {' '.join(['python', f'bench/{name}.py', *args])}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=REPO, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long mode of each benchmark; writes nothing")
    ap.add_argument("--write", action="store_true", help="each benchmark replaces its section of bench/BENCHMARKS.md")
    ap.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    args = ap.parse_args()
    known = discover()
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = [s for s in [*only, *skip] if s not in known]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(known)})")
    default = [n for n in known if n in ORDER] if args.quick else known
    names = [n for n in (only or default) if n not in skip]
    if args.quick and not only and len(default) < len(known):
        print(f"--quick leaves out {', '.join(n for n in known if n not in default)} (run them with --only)", flush=True)
    summary = []
    for name in names:
        rc, secs = run(name, bench_args(name, args.quick, args.write), args.timeout)
        summary.append((name, rc, secs))
    print("\n=== summary", flush=True)
    for name, rc, secs in summary:
        print(f"{name:15s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {secs:7.1f} s")
    if any(rc != 0 for _, rc, _ in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
