"""Sub-commands that live in their own modules.

Each module here defines ``register(app: typer.Typer) -> None``; the CLI imports
every module of this package once, after its shared helpers exist, so a new
command is one new file and no edit of ``lorasearch/cli.py``.
"""
from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Register every command module of this package on ``app``.

    Args:
        app: the top-level Typer application.
    """
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        module.register(app)
