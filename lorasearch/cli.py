"""``lorasearch`` command line: JSON on stdout, messages on stderr.

Exit codes: 0 success, 2 bad input (one line saying which file and what is
wrong), 1 internal error.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from lorasearch.errors import BadInput

app = typer.Typer(
    help="Find LoRAs by their weights: read any LoRA format, compare, index, query.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def handles_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn BadInput into exit 2 and anything unexpected into exit 1, one line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except BadInput as exc:
            _err(f"error: {exc}")
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - last-resort boundary
            if os.environ.get("LORASEARCH_DEBUG"):
                traceback.print_exc()
            _err(f"internal error: {exc.__class__.__name__}: {exc} (set LORASEARCH_DEBUG=1 for a traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _print_info(d: dict[str, Any]) -> None:
    rank = d["rank"]
    rank_s = "-" if rank["min"] is None else (f"{rank['min']}" if rank["min"] == rank["max"] else f"{rank['min']}..{rank['max']}")
    lines = [
        f"{d['path']}",
        f"  format     {d['format']}",
        f"  family     {d['family']}",
        f"  modules    {d['modules']}  ({', '.join(f'{k}: {v}' for k, v in d['delta_kinds'].items())})",
        f"  rank       {rank_s}",
        f"  dtype      {d['dtype']}",
        f"  needs base {'yes (' + ', '.join(f'{k}: {v}' for k, v in d['needs_base_reasons'].items()) + ')' if d['needs_base'] else 'no'}",
        f"  sha256     {d['file_sha256']}",
        f"  AutoV3     {d['autov3']}",
    ]
    alpha = d["reader"].get("alpha_source")
    if alpha:
        lines.append(f"  alpha      {alpha}")
    for w in d["reader"].get("warnings", []):
        lines.append(f"  warning    {w}")
    print("\n".join(lines))


@app.command()
@handles_errors
def info(
    path: Path = typer.Argument(..., help="A LoRA .safetensors file, a PEFT adapter folder, or a folder to scan."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON (JSON lines for a folder)."),
    config: Optional[Path] = typer.Option(None, "--config", help="PEFT adapter_config.json to use for a bare weights file."),
) -> None:
    """Describe a LoRA: format, base-model family, modules, rank, dtype, hashes."""
    from lorasearch.formats import find_loras, load_lora
    from lorasearch.formats.load import PEFT_WEIGHTS
    from lorasearch.report import info_dict

    if path.is_dir() and not (path / PEFT_WEIGHTS).is_file():
        read = refused = 0
        for item in find_loras(path):
            try:
                d = info_dict(load_lora(item))
            except BadInput as exc:
                refused += 1
                _err(f"refused: {exc}")
                if as_json:
                    _emit({"path": str(item), "error": {"code": exc.code, "message": str(exc)}})
                continue
            read += 1
            _emit(d) if as_json else _print_info(d)
        if read == 0 and refused == 0:
            raise BadInput(
                f"{path}: not a PEFT adapter (no adapter_model.safetensors) and no .safetensors files inside",
                code="not_a_lora",
            )
        _err(f"{path}: read {read} LoRA(s), refused {refused}")
        if read == 0:
            raise BadInput(f"{path}: no readable LoRA found ({refused} refused)", code="not_a_lora")
        return
    d = info_dict(load_lora(path, config=config))
    _emit(d) if as_json else _print_info(d)


@app.command()
@handles_errors
def compare(
    a: Path = typer.Argument(..., help="First LoRA (file or PEFT folder)."),
    b: Path = typer.Argument(..., help="Second LoRA (file or PEFT folder)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """Exact cosine of two LoRAs' weight updates over their shared modules.

    The cosine is computed from the factors, tr((U1'U2)(V2V1')), never by
    building the dense update; the coefficient c is the least-squares fit of
    dW_B ~ c * dW_A.
    """
    from lorasearch.formats import load_lora
    from lorasearch.frobenius import compare as compare_deltas
    from lorasearch.report import compare_dict

    la, lb = load_lora(a), load_lora(b)
    d = compare_dict(la, lb, compare_deltas(la, lb))
    if la.family != lb.family:
        _err(f"note: different families ({la.family} vs {lb.family}): nothing is comparable")
    if as_json:
        _emit(d)
        return
    cos = "n/a" if d["cosine"] is None else f"{d['cosine']:.6f}"
    coef = "n/a" if d["coefficient"] is None else f"{d['coefficient']:.6f}"
    print(f"family      {d['family_a']} / {d['family_b']}")
    print(f"shared      {d['shared_modules']} modules (only A: {d['only_a']}, only B: {d['only_b']})")
    print(f"cosine      {cos}  (exact)")
    print(f"coefficient {coef}  (dW_B ~ c * dW_A)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
