"""``lorasearch cluster``: how well each LoRA view and each image baseline clusters labelled LoRAs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lorasearch.errors import BadInput

SHORT = ("ari", "nmi", "ami", "purity", "silhouette", "p_at_k", "map")


def _short(section: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {m: s[m] for m in SHORT} for name, s in section.items()}


def register(app: typer.Typer) -> None:
    """Add the ``cluster`` command to the CLI."""
    from lorasearch.cli import _emit, _err, _open_store, handles_errors  # here: the CLI imports this module

    @app.command()
    @handles_errors
    def cluster(
        db: Path = typer.Option(..., "--db", help="Store directory holding the LoRAs (lorasearch index)."),
        labels: Path = typer.Option(..., "--labels", help="labels.csv: file,genre,style,... (paths relative to its folder)."),
        out: Path = typer.Option(..., "--out", help="Output folder for report.md, report.html, metrics.json, PNGs."),
        views: list[str] = typer.Option([], "--views", help="LoRA views (comma list or repeatable; default: delta, style, style:<group>, *:sketch, paper)."),
        baselines: list[str] = typer.Option([], "--baselines", help="Image baselines: effnet, pixel, clip[=hub-id-or-folder], dino[=...] (comma list or repeatable; default effnet + pixel; 'none' for no baseline)."),
        level: str = typer.Option("style", "--level", help="Label level of the JSON summary and the scatter colours: genre or style (the report has both)."),
        scenarios: list[str] = typer.Option([], "--scenario", help="Image scenarios: train, gen (repeatable; default both)."),
        centre: str = typer.Option("both", "--centre", help="Corpus centering of the vectors: none, yes or both."),
        bootstrap: int = typer.Option(500, "--bootstrap", min=0, help="Bootstrap resamples for the confidence intervals (0: none)."),
        max_images: int = typer.Option(16, "--max-images", min=1, help="Images per LoRA and scenario."),
        allow_download: bool = typer.Option(False, "--allow-download", help="Let clip/dino download weights from the Hugging Face Hub."),
        no_plots: bool = typer.Option(False, "--no-plots", help="Skip the UMAP scatter plots."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
        seed: int = typer.Option(0, "--seed", help="Clustering and bootstrap seed."),
        subset: Optional[str] = typer.Option(None, "--subset", help="Only labels.csv rows with this `subset` value (e.g. mixed, paper)."),
    ) -> None:
        """Cluster labelled LoRAs by each weight view and image baseline; write report.md/html and metrics.json."""
        import numpy as np

        from lorasearch.cluster.baselines import SCENARIOS
        from lorasearch.cluster.evaluate import LEVELS, Rep
        from lorasearch.cluster.report import write_report
        from lorasearch.cluster.run import DEFAULT_BASELINES, gather, measure

        if level not in LEVELS:
            raise BadInput(f"--level {level!r}: expected genre or style", code="bad_option")
        if centre not in ("none", "yes", "both"):
            raise BadInput(f"--centre {centre!r}: expected none, yes or both", code="bad_option")
        if out.exists() and not out.is_dir():
            raise BadInput(f"--out {out}: exists and is not a folder", code="bad_option")
        # Comma lists and repeated options both work: --baselines effnet,pixel == --baselines effnet --baselines pixel.
        views, baselines, scenarios = ([x.strip() for v in opt for x in v.split(",") if x.strip()]
                                       for opt in (views, baselines, scenarios))
        base = [] if baselines == ["none"] else (baselines or list(DEFAULT_BASELINES))
        store = _open_store(db, create=False, readonly=True)
        try:
            joined, reps, info = gather(store, labels, views or None, base, scenarios or list(SCENARIOS),
                                        allow_download=allow_download, max_images=max_images, progress=True)
        finally:
            store.close()
        levels = (level, *(lv for lv in LEVELS if lv != level))
        keep = None
        if subset is not None:
            keep = np.asarray([j.row.get("subset") == subset for j in joined])
            if keep.sum() < 3:
                raise BadInput(f"--subset {subset!r}: {int(keep.sum())} labelled LoRAs have it (need at least 3)",
                               code="bad_option")
            reps = [Rep(r.name, r.x, r.mask & keep, r.note, r.centred, r.kind) for r in reps]
        result = measure(joined, reps, levels, centre, bootstrap, seed, keep)
        result["info"] = info
        files = write_report(out, result, reps, joined, level, plots=not no_plots)
        sec = result["levels"][level]
        if as_json:
            _emit({"level": level, "n": result["n"], "views": _short(sec["views"]), "baselines": _short(sec["baselines"]),
                   "agreement": result["agreement"], "report": files["md"], "html": files["html"],
                   "metrics": files["metrics"]})
            return
        for kind in ("views", "baselines"):
            for name, s in sec[kind].items():
                print(f"{kind[:-1]:8s} {name:28s} ARI {s['ari']:.3f}  NMI {s['nmi']:.3f}  P@{s['k']} {s['p_at_k']:.3f}  mAP {s['map']:.3f}")
        _err(f"{info['joined']} LoRAs joined ({len(info['missing'])} labels.csv rows not in the store) -> {files['md']}")
