"""``lorasearch compat LORA BASE``: does an adapter's module layout fit a base model?"""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``compat`` command to the CLI.

    Args:
        app: the top-level Typer application.
    """
    from lorasearch.cli import _emit, handles_errors

    @app.command()
    @handles_errors
    def compat(
        lora: Path = typer.Argument(..., help="The adapter: a LoRA .safetensors file or a PEFT adapter folder."),
        base: Path = typer.Argument(..., help="The base: config.json (transformers/diffusers), a diffusers pipeline folder, "
                                              "a .safetensors file or a model.safetensors.index.json."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    ) -> None:
        """Check module names and shapes of LORA against BASE without loading weights (exit 0 fits, 1 does not, 2 bad input)."""
        from lorasearch.compat import compat as run_compat

        res = run_compat(lora, base)
        if as_json:
            _emit(res)
        else:
            print(f"{lora} on {base}: {'fits' if res['fits'] else 'DOES NOT FIT'} ({res['message']})")
            for c, n in res["skipped_components"].items():
                print(f"  skipped    {n} modules of {c} (not part of this base)")
            for m in res["missing"][:20]:
                print(f"  missing    {m}")
            for m in res["shape_mismatches"][:20]:
                print(f"  shape      {m['module']}: adapter {tuple(m['lora'])}, base {m['base_module']} {tuple(m['base'])}")
            extra = res["missing_count"] - min(20, len(res["missing"])) + res["mismatch_count"] - min(20, len(res["shape_mismatches"]))
            if extra > 0:
                print(f"  ... and {extra} more (see --json)")
        if not res["fits"]:
            raise typer.Exit(1)
