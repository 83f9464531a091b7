"""``lorasearch resolve FILE --db DIR [--json]``: the indexed entry that is the same LoRA as FILE."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``resolve`` command."""
    from lorasearch.cli import _emit, _err, _open_store, handles_errors

    @app.command()
    @handles_errors
    def resolve(
        path: Path = typer.Argument(..., help="A LoRA file or PEFT folder."),
        db: Path = typer.Option(..., "--db", help="Store directory."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    ) -> None:
        """The indexed entry that is the same LoRA as PATH (same file, tensors, update or lineage), with its source, trigger words and labels."""
        from lorasearch.formats import load_lora
        from lorasearch.resolve import format_text, resolve as run

        ld = load_lora(path)
        store = _open_store(db)
        try:
            res = run(store, ld)
        finally:
            store.close()
        res["query"] = str(path)
        if res.get("note"):
            _err(f"note: {res['note']}")
        if as_json:
            _emit(res)
        else:
            print(format_text(res))
