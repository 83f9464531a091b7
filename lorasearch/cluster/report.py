"""The cluster report: ``metrics.json``, ``report.md``, ``report.html`` and one scatter PNG per representation.

The scatter plots are 2-D UMAP layouts (``lorasearch.collection_map.layout``:
UMAP with cosine neighbours, PCA below 15 points) of each representation's raw
vectors, coloured by the label level. The HTML page is self-contained: tables
plus inline SVG scatters with hover labels and a small inline script, no CDN.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorasearch.cluster.algorithms import prepare
from lorasearch.cluster.evaluate import SCORES, Labelled, Rep

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363"]
HEADERS = ("representation", "n", "ARI [95% CI]", "NMI", "AMI", "purity", "silhouette", "P@k", "mAP")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def fmt(v: float | None) -> str:
    """A score with 3 decimals ('-' for missing)."""
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def table_rows(section: dict[str, Any]) -> list[list[str]]:
    """One row per representation of an ``evaluate`` section (views then baselines)."""
    rows = []
    for kind in ("views", "baselines"):
        for name, s in section.get(kind, {}).items():
            ci = s.get("ci", {}).get("ari")
            ari = fmt(s["ari"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
            rows.append([name, str(s["n"]), ari, *(fmt(s[m]) for m in SCORES[1:5]), f"{fmt(s['p_at_k'])} (k={s['k']})",
                         fmt(s["map"])])
    return rows


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def algo_rows(section: dict[str, Any]) -> list[list[str]]:
    """ARI / NMI of every clustering algorithm per representation."""
    out = []
    for kind in ("views", "baselines"):
        for name, s in section.get(kind, {}).items():
            a = s.get("algorithms", {})
            out.append([name, *(f"{fmt(a[m]['ari'])} / {fmt(a[m]['nmi'])} ({a[m]['clusters']})" for m in a)])
    return out


def layouts(reps: Sequence[Rep], joined: Sequence[Labelled], level: str) -> list[dict[str, Any]]:
    """2-D layout of every representation's raw vectors, with labels and file names per point."""
    from lorasearch.collection_map import layout

    out = []
    for rep in reps:
        idx = np.flatnonzero(rep.mask)
        if len(idx) < 3:
            continue
        xy, method, note = layout(prepare(rep.x[idx]))
        out.append({"name": rep.name, "method": method, "note": note, "xy": np.round(xy, 4).tolist(),
                    "label": [joined[i].row[level] for i in idx],
                    "file": [joined[i].row.get("file", "") for i in idx]})
    return out


def scatter_png(plot: dict[str, Any], path: Path, title: str) -> None:
    """One scatter PNG coloured by label (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(set(plot["label"]))
    colour = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    xy = np.asarray(plot["xy"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for lab in labels:
        m = np.asarray([x == lab for x in plot["label"]])
        ax.scatter(xy[m, 0], xy[m, 1], s=18, c=colour[lab], label=lab, alpha=0.85, linewidths=0)
    ax.set_title(f"{title} ({plot['method']})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(labels) <= 25:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _svg(plot: dict[str, Any], colour: dict[str, str], size: int = 320) -> str:
    pts = []
    for (x, y), lab, f in zip(plot["xy"], plot["label"], plot["file"]):
        cx, cy = (x + 1.05) / 2.1 * size, (1.05 - y) / 2.1 * size
        pts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour[lab]}" data-label="{html.escape(lab)}">'
                   f"<title>{html.escape(lab)} | {html.escape(f)}</title></circle>")
    return (f'<figure><figcaption>{html.escape(plot["name"])} ({plot["method"]})</figcaption>'
            f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}">{"".join(pts)}</svg></figure>')


_JS = """
document.querySelectorAll('.legend span').forEach(function (el) {
  el.addEventListener('mouseenter', function () {
    var lab = el.dataset.label;
    document.querySelectorAll('circle').forEach(function (c) { c.style.opacity = c.dataset.label === lab ? 1 : 0.08; });
  });
  el.addEventListener('mouseleave', function () {
    document.querySelectorAll('circle').forEach(function (c) { c.style.opacity = 1; });
  });
});
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out: Path, result: dict[str, Any], reps: Sequence[Rep], joined: Sequence[Labelled],
                 level: str, plots: bool = True) -> dict[str, str]:
    """Write metrics.json, report.md, report.html and the scatter PNGs.

    Args:
        out: output folder (created).
        result: ``run.measure`` output plus ``info``.
        reps: the representations (for the scatters).
        joined: the joined rows (labels, file names).
        level: the level the scatters are coloured by.
        plots: draw the scatters.

    Returns:
        name -> path of every file written.
    """
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    pl = layouts(reps, joined, level) if plots else []
    labels = sorted({j.row[level] for j in joined})
    colour = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    for p in pl:
        path = out / f"scatter_{_slug(p['name'])}.png"
        scatter_png(p, path, p["name"])
        files[f"png:{p['name']}"] = str(path)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    files["metrics"] = str(out / "metrics.json")

    md = ["# LoRA clustering report\n", f"{result['n']} labelled LoRAs; scores against `{', '.join(result['levels'])}` labels.",
          "Clustering: k-means with k = number of labels on unit rows; `+centred` = corpus mean removed first."
          " CIs: 95 % bootstrap over LoRAs (clustering fitted once).\n"]
    h = ['<!doctype html><html><head><meta charset="utf-8"><title>LoRA clustering report</title><style>'
         "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:2px 6px;font-size:13px}figure{display:inline-block;margin:4px;border:1px solid #eee}"
         "figcaption{font-size:12px}.legend span{display:inline-block;margin:2px 6px;cursor:default;font-size:12px}"
         "</style></head><body><h1>LoRA clustering report</h1>",
         f"<p>{result['n']} labelled LoRAs. k-means (k = number of labels) on unit rows; <code>+centred</code> = corpus mean"
         " removed first. CIs: 95 % bootstrap over LoRAs.</p>"]
    for lv, sec in result["levels"].items():
        md += [f"## Level: {lv}\n", md_table(HEADERS, table_rows(sec)), "",
               "Clustering algorithms (ARI / NMI (clusters found)): kmeans, agglomerative (Ward), HDBSCAN\n",
               md_table(("representation", "kmeans", "agglomerative", "hdbscan"), algo_rows(sec)), ""]
        h += [f"<h2>Level: {html.escape(lv)}</h2>", _html_table(HEADERS, table_rows(sec)),
              "<h3>Clustering algorithms (ARI / NMI (clusters))</h3>",
              _html_table(("representation", "kmeans", "agglomerative", "hdbscan"), algo_rows(sec))]
    agr = [[k, fmt(v["cka"]), fmt(v["knn_overlap"]), str(v["n"])] for k, v in result.get("agreement", {}).items()]
    if agr:
        md += ["## Agreement between LoRA views and image baselines\n",
               md_table(("view vs baseline", "linear CKA", "kNN overlap (k=10)", "n"), agr), ""]
        h += ["<h2>Agreement (linear CKA, kNN overlap)</h2>",
              _html_table(("view vs baseline", "linear CKA", "kNN overlap (k=10)", "n"), agr)]
    notes = dict(result.get("info", {}).get("notes", {}))
    for sec in result["levels"].values():
        notes.update(sec.get("notes", {}))
    if notes:
        md += ["## Notes\n", *(f"- `{k}`: {v}" for k, v in notes.items()), ""]
        h += ["<h2>Notes</h2><ul>", *(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in notes.items()), "</ul>"]
    missing = result.get("info", {}).get("missing", [])
    if missing:
        md += [f"{len(missing)} labels.csv rows are not in the store (first: `{missing[0]}`).\n"]
    if pl:
        md += [f"## Scatter plots (coloured by {level})\n", *(f"![{p['name']}](scatter_{_slug(p['name'])}.png)" for p in pl), ""]
        legend = "".join(f'<span data-label="{html.escape(lab)}" style="color:{colour[lab]}">&#9679; {html.escape(lab)}</span>'
                         for lab in labels)
        h += [f"<h2>Scatter plots (coloured by {html.escape(level)}; hover a label to highlight it)</h2>",
              f'<div class="legend">{legend}</div>', *(_svg(p, colour) for p in pl)]
    h += [f"<script>{_JS}</script></body></html>"]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.html").write_text("\n".join(h), encoding="utf-8")
    files["md"] = str(out / "report.md")
    files["html"] = str(out / "report.html")
    return files
