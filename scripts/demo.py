"""The main job end to end on the bundled data: read every LoRA, compare formats, index, query, cluster report.

Run with ``make demo``. Writes ``demo-out/`` and says where things are.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
SHARED = REPO.parent / "shared" / "loras"
ZOO = REPO / "data" / "zoo"
OUT = REPO / "demo-out"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorasearch.cli", *args], capture_output=True, text=True, cwd=REPO)


def info_folder(folder: Path, out: Path) -> list[dict]:
    t0 = time.perf_counter()
    res = cli("info", str(folder), "--json")
    out.write_text(res.stdout)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    ok = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r]
    print(f"\n{folder}: {len(ok)} LoRAs read, {len(bad)} refused ({time.perf_counter() - t0:.1f} s) -> {out}")
    fams = Counter(r["family"].split(":")[0] if r["family"].startswith("unknown") else r["family"] for r in ok)
    fmts = Counter(r["format"] for r in ok)
    print("  families: " + ", ".join(f"{k} {v}" for k, v in fams.most_common()))
    print("  formats:  " + ", ".join(f"{k} {v}" for k, v in fmts.most_common()))
    for r in bad:
        print(f"  refused {Path(r['path']).name}: {r['error']['code']}")
    return ok


def main() -> int:
    OUT.mkdir(exist_ok=True)
    print("lorasearch demo: read LoRAs of every format into one canonical weight update")
    samples = info_folder(SAMPLES, OUT / "samples_info.jsonl")
    pairs = [("tiny_peft", "tiny_kohya.safetensors"), ("tiny_peft", "tiny_diffusers.safetensors"),
             ("tiny_peft", "tiny_peft_bf16.safetensors"), ("tiny_peft", "tiny_other_peft"),
             ("tiny_peft", "tiny_loha.safetensors")]
    print("\nexact cosine of the weight updates (same update in another format -> 1.0; unrelated -> ~0):")
    for a, b in pairs:
        if (SAMPLES / a).exists() and (SAMPLES / b).exists():
            res = cli("compare", str(SAMPLES / a), str(SAMPLES / b), "--json")
            if res.returncode != 0:
                print(res.stderr.strip())
                return res.returncode
            d = json.loads(res.stdout)
            if d["cosine"] is None:
                print(f"  {a:>18} vs {b:<34} nothing comparable ({d['family_a']} vs {d['family_b']})")
                continue
            print(f"  {a:>18} vs {b:<34} cosine {d['cosine']:+.6f}  coefficient {d['coefficient']:+.4f}  ({d['shared_modules']} modules)")
    sources = [str(SAMPLES)]
    if SHARED.is_dir():
        info_folder(SHARED, OUT / "shared_loras_info.jsonl")
        sources.append(str(SHARED))
    else:
        print(f"\n({SHARED} not present: skipping the real-world collection)")
    db = OUT / "db"
    res = cli("index", *sources, "--db", str(db), "--json")
    if res.returncode != 0:
        print(res.stderr.strip())
        return res.returncode
    s = json.loads(res.stdout)
    print(f"\nindexed into {db}: added {s['added']}, duplicates {s['duplicates']}, skipped (already indexed) "
          f"{s.get('skipped', 0)}, failed {len(s['failed'])}")
    queries = [SAMPLES / "tiny_kohya.safetensors"]
    if SHARED.is_dir():
        queries.append(SHARED / "timohavdk__sd-lora__new.safetensors")
    for q in queries:
        for view in ("delta", "paper"):
            res = cli("query", str(q), "--db", str(db), "-k", "3", "--view", view, "--json")
            if res.returncode != 0:
                print(res.stderr.strip())
                return res.returncode
            d = json.loads(res.stdout)
            (OUT / f"query_{q.stem}_{view}.json").write_text(json.dumps(d, indent=2))
            print(f"\nquery {q.name} (family {d['family']}, view {view}, {'exact' if d['exact'] else 'approximate'}):")
            for r in d["results"]:
                print(f"  {r['score']:+.4f}  {r['name']}")
    rc = cluster_zoo()
    if rc:
        return rc
    print(f"\nDone. Outputs in {OUT}/ (info JSON lines, query results, the store in {db}, "
          f"the style zoo's store in {OUT / 'zoo-db'} and its cluster report in {OUT / 'cluster'}/report.html).")
    print(f"Try: .venv/bin/lorasearch query {SAMPLES / 'tiny_loha.safetensors'} --db {db}")
    print("     make serve   (API and web page over the demo store on http://127.0.0.1:8000)")
    return 0 if samples else 1


def cluster_zoo() -> int:
    """Index the committed style zoo and write its cluster report (LoRA views vs image baselines)."""
    db, report = OUT / "zoo-db", OUT / "cluster"
    res = cli("index", str(ZOO / "loras"), "--db", str(db), "--json")
    if res.returncode != 0:
        print(res.stderr.strip())
        return res.returncode
    print(f"\nstyle zoo: {json.loads(res.stdout)['added']} new LoRAs indexed into {db}; clustering (pixel baseline, "
          "a lighter run than bench/cluster.py) ...")
    res = cli("cluster", "--db", str(db), "--labels", str(ZOO / "labels.csv"), "--out", str(report),
              "--baselines", "pixel", "--max-images", "4", "--bootstrap", "100", "--level", "genre", "--json")
    if res.returncode != 0:
        print(res.stderr.strip())
        return res.returncode
    d = json.loads(res.stdout)
    print(f"  {d['level']}-level k-means ARI (labels: {ZOO / 'labels.csv'}):")
    for kind in ("views", "baselines"):
        for name, m in d[kind].items():
            print(f"    {kind[:-1]:>8} {name:<28} ARI {m['ari']:+.3f}  NMI {m['nmi']:.3f}  P@k {m['p_at_k']:.3f}")
    print(f"  report: {d['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
