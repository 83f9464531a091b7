"""Style clustering on the zoo: every LoRA view against image baselines (issue 7's measurement).

One command: index the zoo's LoRAs into a temp store, score every LoRA view
(``delta``, ``style``, ``style:<group>``, ``*:sketch``, ``paper``; raw and
corpus-centred) and every image baseline (``effnet``, ``pixel``; training
images and generated images) at both label levels with 95 % bootstrap
intervals, on the mixed collection, on the mixed LoRAs where the paper's view
is defined, and on the paper-setting subset; print the tables and the targets
and, with ``--write``, replace this section of bench/BENCHMARKS.md. The full
per-representation report (report.md/html, scatters, metrics.json) goes to
``--out`` (default a temp folder).

Run: ``python bench/cluster.py [--zoo data/zoo] [--write] [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import REPO, command_line, machine, md_table, today, write_section

ZOO = REPO / "data" / "zoo"


def _log(msg: str) -> None:
    print(f"[cluster bench] {msg}", file=sys.stderr, flush=True)


def _cell(s: dict[str, Any] | None, m: str, ci: bool = False) -> str:
    if s is None:
        return "-"
    v = f"{s[m]:.3f}"
    if ci and "ci" in s and m in s["ci"]:
        lo, hi = s["ci"][m]
        v += f" [{lo:.2f}, {hi:.2f}]"
    return v


def table(res: dict[str, Any]) -> str:
    """Markdown table: one row per representation, ARI [CI] / AMI / P@k / mAP at each level."""
    lv = res["levels"]
    names: list[str] = []
    for sec in lv.values():
        for kind in ("views", "baselines"):
            names += [n for n in sec[kind] if n not in names]
    rows = []
    for n in names:
        row = [n, str(max((sec["views"].get(n) or sec["baselines"].get(n) or {"n": 0})["n"] for sec in lv.values()))]
        for level in ("genre", "style"):
            sec = lv.get(level, {"views": {}, "baselines": {}})
            s = sec["views"].get(n) or sec["baselines"].get(n)
            row += [_cell(s, "ari", ci=True), _cell(s, "ami"), _cell(s, "p_at_k"), _cell(s, "map")]
        rows.append(row)
    head = ["representation", "n", "genre ARI [95% CI]", "genre AMI", "genre P@k", "genre mAP",
            "style ARI [95% CI]", "style AMI", "style P@k", "style mAP"]
    return md_table(head, rows)


def best(sec: dict[str, Any], kind: str, exclude: tuple[str, ...] = ()) -> tuple[str, float]:
    """(name, ARI) of the best representation of a kind in one level's section."""
    items = [(n, s["ari"]) for n, s in sec[kind].items() if not n.startswith(exclude)]
    return max(items, key=lambda t: t[1]) if items else ("-", float("nan"))


def targets(mixed: dict[str, Any], paper_sub: dict[str, Any] | None) -> list[str]:
    """The issue's targets, measured: best LoRA view vs best baseline (both levels) and vs paper + 0.1 ARI."""
    lines = []
    for level, sec in mixed["levels"].items():
        v, va = best(sec, "views", ("paper",))
        b, ba = best(sec, "baselines")
        if not np.isfinite(va) or not np.isfinite(ba):
            lines.append(f"- {level}: not scored (too few labels at this level; see notes)")
            continue
        ok = "MET" if va >= ba else "NOT MET"
        lines.append(f"- {level}: best LoRA view `{v}` ARI {va:.3f} vs best image baseline `{b}` {ba:.3f} -> {ok}")
        p = {n: s["ari"] for n, s in sec["views"].items() if n.startswith("paper")}
        if p:
            pn, pa = max(p.items(), key=lambda t: t[1])
            ok = "MET" if va >= pa + 0.1 else "NOT MET"
            lines.append(f"- {level}: best LoRA view ARI {va:.3f} vs `{pn}` {pa:.3f} + 0.1 (paper on its"
                         f" {sec['views'][pn]['n']}-LoRA subset) -> {ok}")
        else:
            lines.append(f"- {level}: `paper` not scored on the mixed collection at this level (see notes)")
        if paper_sub is not None and level in paper_sub["levels"]:
            ps = paper_sub["levels"][level]
            v2, va2 = best(ps, "views", ("paper",))
            p2 = {n: s["ari"] for n, s in ps["views"].items() if n.startswith("paper")}
            if not p2:
                lines.append(f"- {level}, the LoRAs where paper is defined: not scored at this level (see notes)")
            else:
                pn2, pa2 = max(p2.items(), key=lambda t: t[1])
                ok = "MET" if va2 >= pa2 + 0.1 else "NOT MET"
                lines.append(f"- {level}, same LoRAs (the {paper_sub['n']} where paper is defined): best view `{v2}` {va2:.3f}"
                             f" vs `{pn2}` {pa2:.3f} + 0.1 -> {ok}")
    return lines


def setting_lines(pset: dict[str, Any] | None) -> list[str]:
    """The paper's own setting (one seed, rank and format): the paper's claim, reproduced or not."""
    if pset is None:
        return ["- not scored: the zoo has no paper-setting subset"]
    lines = []
    for level, sec in pset["levels"].items():
        v, va = best(sec, "views", ("paper",))
        b, ba = best(sec, "baselines")
        p = {n: s["ari"] for n, s in sec["views"].items() if n.startswith("paper")}
        if not (np.isfinite(va) and np.isfinite(ba)) or not p:
            lines.append(f"- {level}: not scored (see notes)")
            continue
        pn, pa = max(p.items(), key=lambda t: t[1])
        lines.append(f"- {level}: best LoRA view `{v}` ARI {va:.3f}, `{pn}` {pa:.3f}, best image baseline `{b}` {ba:.3f}"
                     f" -> LoRA view {'≥' if va >= ba else '<'} image baseline; `{pn}` {'≥' if pa >= ba else '<'}"
                     f" image baseline")
    return lines


def _expected(zoo: Path) -> int | None:
    """How many LoRAs the zoo's zoo.json asks for (None when unknown)."""
    try:
        p = json.loads((zoo / "zoo.json").read_text())["params"]
        styles = int(p["genres"]) * int(p["styles_per_genre"])
        paper = styles * int(p.get("paper_per_style", 1)) if p.get("paper") else 0
        return styles * int(p["loras_per_style"]) + paper
    except (OSError, KeyError, ValueError, TypeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=ZOO, help="zoo folder with labels.csv (default data/zoo)")
    ap.add_argument("--quick", action="store_true", help="build a tiny quick zoo in a temp folder (seconds-long mode)")
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples per score")
    ap.add_argument("--baselines", default="effnet,pixel", help="comma-separated baselines (clip/dino need local weights)")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: a temp folder)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="indexing processes")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/BENCHMARKS.md")
    args = ap.parse_args()

    from indexer import run_index
    from lorasearch.cluster.evaluate import LEVELS, Rep
    from lorasearch.cluster.report import write_report
    from lorasearch.cluster.run import gather, measure
    from lorasearch.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="lorasearch-cluster-"))
    zoo = args.zoo
    if args.quick:
        from lorasearch.zoo import build_zoo

        zoo = tmp / "zoo"
        _log("building a quick zoo")
        build_zoo(zoo, genres=3, styles_per_genre=2, loras_per_style=3, quick=True)
        args.bootstrap = min(args.bootstrap, 50)
    labels = zoo / "labels.csv"
    if not labels.is_file():
        raise SystemExit(f"{labels} is missing: build the zoo first (`lorasearch zoo --out {zoo}`)")
    out = args.out or (tmp / "report")
    db = tmp / "db"
    t0 = time.time()
    summary = run_index([str(zoo / "loras" if (zoo / "loras").is_dir() else zoo)], db, workers=args.workers,
                        progress=sys.stderr.isatty())
    t_index = time.time() - t0
    _log(f"indexed {summary['added']} LoRAs ({len(summary['failed'])} failed) in {t_index:.0f} s")
    for f in summary["failed"][:5]:
        _log(f"  failed {f.get('item') or f['source']}: {f['error']}")
    store = Store(db, create=False, readonly=True)
    t0 = time.time()
    try:
        joined, reps, info = gather(store, labels, None, [b for b in args.baselines.split(",") if b], progress=True)
    finally:
        store.close()
    t_feat = time.time() - t0
    subset = np.asarray([j.row.get("subset", "mixed") or "mixed" for j in joined])
    mixed, paper_set = subset == "mixed", subset == "paper"
    t0 = time.time()
    res_mixed = measure(joined, reps, LEVELS, "both", args.bootstrap, 0, mixed)
    res_mixed["info"] = info
    mixed_reps = [Rep(r.name, r.x, r.mask & mixed, r.note, r.centred, r.kind) for r in reps]
    files = write_report(out, res_mixed, mixed_reps, joined, "style")
    paper_rep = next((r for r in reps if r.name == "paper"), None)
    res_paper_sub = None
    if paper_rep is not None and (paper_rep.mask & mixed).sum() >= 3:
        res_paper_sub = measure(joined, reps, LEVELS, "both", args.bootstrap, 0, mixed & paper_rep.mask)
    res_pset = measure(joined, reps, LEVELS, "both", args.bootstrap, 0, paper_set) if paper_set.sum() >= 3 else None
    t_score = time.time() - t0
    (out / "bench.json").write_text(json.dumps({"mixed": res_mixed, "paper_view_subset": res_paper_sub,
                                                "paper_setting": res_pset}, indent=1, default=float))

    notes = dict(info["notes"])
    for r in (res_mixed, res_paper_sub, res_pset):
        for sec in (r or {"levels": {}})["levels"].values():
            notes.update(sec.get("notes", {}))
    zoo_rel = zoo.relative_to(REPO) if zoo.is_relative_to(REPO) else zoo
    expected = _expected(zoo)
    partial = (f" **Partial zoo: {len(joined)} of the {expected} LoRAs its zoo.json asks for were built when this ran.**"
               if expected and len(joined) < expected else "")
    body = [
        "## Style clustering: LoRA views vs image baselines (issue 7)\n",
        f"{today()}, {machine()}. Command: `{command_line()}`. Zoo `{zoo_rel}`: {len(joined)} LoRAs joined"
        f" ({int(mixed.sum())} mixed, {int(paper_set.sum())} paper-setting; {len(info['missing'])} labels.csv rows"
        f" not indexed). Indexing {t_index:.0f} s, views + image features {t_feat:.0f} s, scoring {t_score:.0f} s.{partial}",
        "",
        "Clustering: k-means, k = number of labels, on unit rows (cosine); `+centred` = corpus mean removed first"
        " (for `paper`, `+centred` is the paper's own centred PCA). Intervals: 95 % bootstrap over LoRAs, clustering"
        " fitted once. P@k: k = typical number of other LoRAs with the same label (at most 10). `/train` = features"
        " of the LoRA's training images, `/gen` = of images generated with base + LoRA. Agglomerative and HDBSCAN"
        " scores, silhouettes, purity, NMI and CKA/kNN agreement are in the report's metrics.json.",
        "",
        "### Targets (mixed collection)\n",
        *targets(res_mixed, res_paper_sub),
        "",
        f"### The paper's setting ({int(paper_set.sum())} LoRAs: one seed, rank and format; no target, the paper's"
        " claim checked)\n",
        *setting_lines(res_pset),
        "",
        f"### Mixed collection ({res_mixed['n']} LoRAs: seeds, ranks, trainers and formats differ)\n",
        table(res_mixed),
        "",
    ]
    if res_paper_sub is not None:
        body += [f"### Mixed collection, only the {res_paper_sub['n']} LoRAs where the paper's view is defined"
                 " (one factor-shape signature)\n", table(res_paper_sub), ""]
    if res_pset is not None:
        body += [f"### Paper setting ({res_pset['n']} LoRAs: one seed, rank and format)\n", table(res_pset), ""]
    skipped = [b for b in ("clip", "dino") if b not in args.baselines]
    if skipped:
        notes["clip/dino"] = ("not run: no CLIP / DINOv2 weights offline on this machine (pass e.g."
                              " `--baselines effnet,pixel,clip=FOLDER,dino=FOLDER` with save_pretrained folders)")
    if notes:
        body += ["Notes:\n", *(f"- `{k}`: {v}" for k, v in notes.items()), ""]
    agr = res_mixed["agreement"]
    top = sorted(agr.items(), key=lambda kv: -kv[1]["cka"])[:6]
    if top:
        body += ["Agreement of LoRA views with image features (mixed, linear CKA / kNN overlap k=10), highest CKA:\n",
                 md_table(["view vs baseline", "CKA", "kNN overlap"], [[k, f"{v['cka']:.3f}", f"{v['knn_overlap']:.3f}"]
                                                                     for k, v in top]), ""]
    text = "\n".join(body)
    print(text)
    _log(f"report: {files['md']}")
    if args.write and not args.quick:
        write_section("cluster", text)
        _log("wrote bench/BENCHMARKS.md section 'cluster'")


if __name__ == "__main__":
    main()
