"""``lorasearch dedupe PATH... [--db DIR] [--json]``: duplicate and lineage groups of a collection."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

HELP = """Group LoRA files that are the same or related, strongest evidence first; never deletes or modifies anything.

Tiers: bytes (identical files, sha256), tensors (identical tensors under another header: AutoV3, or the same
decoded modules), update (the same ΔW in another format, dtype, factorisation or alpha: exact cosine >= 0.999;
the coefficient is shown when only the scale differs), lineage (further trained, rank-resized, module subset:
the attribution verdict 'derived'). Files that only share a training script and seed are not grouped.

Groups nest: a file is listed in the group of its strongest tier, and a group's keep file stands for it in the
next weaker group. Keep rule: bytes - the shortest path; tensors - the smallest file; update - the smallest
lossless file (highest-precision dtype in the group, e.g. fp32 over fp16); lineage - the most complete model
(most modules, highest rank, precision); lineage members are different models, review before removing any."""


def _progress() -> Any:
    """A tqdm bar on stderr, one stage after another (None when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    state: dict[str, Any] = {"stage": None, "bar": None}

    def update(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"], state["bar"] = stage, tqdm(total=total, desc=stage, unit="file", file=sys.stderr,
                                                       dynamic_ncols=True, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.update(done - bar.n)

    update.close = lambda: state["bar"] is not None and state["bar"].close()  # type: ignore[attr-defined]
    return update


def register(app: typer.Typer) -> None:
    """Add the ``dedupe`` command."""
    from lorasearch.cli import _emit, _err, _open_store, handles_errors

    @app.command(help=HELP)
    @handles_errors
    def dedupe(
        paths: list[Path] = typer.Argument(..., help="LoRA files, PEFT folders, or folders searched recursively."),
        db: Optional[Path] = typer.Option(None, "--db", help="Store directory: match each file to its indexed entry, and use the store's calibration."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
        no_lineage: bool = typer.Option(False, "--no-lineage", help="Skip the lineage tier (the exact tiers only)."),
    ) -> None:
        from lorasearch.dedupe import dedupe as run, format_table

        store = _open_store(db) if db is not None else None
        prog = _progress()
        try:
            res = run([str(p) for p in paths], store=store, progress=prog, lineage=not no_lineage)
        finally:
            if prog is not None:
                prog.close()
            if store is not None:
                store.close()
        out = res.to_json()
        for s in out.get("skipped", []):  # the reason usually names the file already
            _err(f"skipped: {s['error']}" if s["error"].startswith(s["path"]) else f"skipped {s['path']}: {s['error']}")
        if as_json:
            _emit(out)
        else:
            print(format_table({**out, "skipped": []}))
