"""Smoke test: every benchmark runs end to end in its quick mode and writes nothing to BENCHMARKS.md."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "bench" / "BENCHMARKS.md"
TIMEOUT_S = 180


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def test_run_all_quick(shared_loras: Path) -> None:
    before = _digest(BENCHMARKS_MD)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"run_all --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for name in ("sketch_error", "embed_cost", "retrieval", "throughput", "query_latency"):
        assert f"=== {name}:" in proc.stdout
    assert "FAILED" not in proc.stdout.split("=== summary", 1)[-1]
    assert _digest(BENCHMARKS_MD) == before, "--quick must not write BENCHMARKS.md"
