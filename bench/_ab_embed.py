"""Old against new: the SDXL-size embed ÷ read of two checkouts, alternating processes.

Each process reads and embeds the same synthetic SDXL-size file back to back
(``read_tensors``, then ``load_and_embed(path, hashes=False, keep_factors=False)``),
``--iters`` times after a warm-up, and also reports the embed's CPU time (this process's
threads and the sketch helper's job); the two checkouts take turns for ``--rounds``
rounds, so load on a shared machine hits both alike. Each process runs from its
own checkout (its sketch helper too). Not part of ``run_all`` (leading underscore).

Run: ``python bench/_ab_embed.py --against /path/to/other/checkout [--rounds 3] [--iters 15]``
(e.g. a ``git worktree add`` of an older commit; the SDXL file is written by
``bench/embed_cost.write_sdxl`` into ``--tmp``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, statistics
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/bench")
import common
from common import set_torch_threads
import torch
set_torch_threads()
import lorasearch
assert lorasearch.__file__.startswith(sys.argv[1]), lorasearch.__file__
from lorasearch.read_embed import load_and_embed
from lorasearch import sketch_helper
import embed_cost as ec
path, iters = sys.argv[2], int(sys.argv[3])
sketch_helper.wait_ready()
for _ in range(3):
    ec.read_tensors(path); load_and_embed(path, hashes=False, keep_factors=False)
reads, embeds, cpus = [], [], []
for _ in range(iters):
    t0 = time.perf_counter(); ec.read_tensors(path); t1 = time.perf_counter()
    c0, h0 = time.process_time(), ec.helper_cpu()
    load_and_embed(path, hashes=False, keep_factors=False); t2 = time.perf_counter()
    reads.append(t1 - t0); embeds.append(t2 - t1); cpus.append(time.process_time() - c0 + ec.helper_cpu() - h0)
r, e = statistics.median(reads), statistics.median(embeds)
print(f"read {r * 1e3:.1f} ms, embed {e * 1e3:.1f} ms (fastest {min(embeds) * 1e3:.1f}), ratio {e / r:.2f}, "
      f"median per-pair ratio {statistics.median(x / y for x, y in zip(embeds, reads)):.2f}, "
      f"embed CPU (both processes) {statistics.median(cpus) * 1e3:.1f} ms")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, required=True, help="the other checkout (its root folder)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the synthetic SDXL file (default: a temp dir)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    import embed_cost

    folder = Path(tempfile.mkdtemp(prefix="lorasearch-ab-", dir=args.tmp))
    path = embed_cost.write_sdxl(folder)
    env = {**os.environ, "LORASEARCH_SHARED": os.environ.get("LORASEARCH_SHARED", str(REPO.parent / "shared"))}
    for i in range(args.rounds):
        for label, root in (("other", args.against.resolve()), ("this ", REPO)):
            # run from the checkout itself: `python -m` in the helper puts the working folder first
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(path), str(args.iters)], cwd=root,
                                 env=env, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-500:]}"
            print(f"round {i + 1} {label} ({root}): {line}", flush=True)
    path.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
