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
    fc = d.get("family_candidates") or {}
    if fc.get("ambiguous"):
        lines.append(f"  ambiguous  fits {', '.join(fc['tied'])} equally (partial LoRA); chose {d['family']} by {fc.get('decided_by')}")
    for c in d.get("checks", []):
        mark = {True: "ok", False: "MISMATCH", None: "unverified"}[c["ok"]]
        lines.append(f"  check      {mark:<10} {c['field']} = {c['header']}: {c['message']}")
    tr = d.get("training") or {}
    if tr.get("trigger_words"):
        lines.append(f"  triggers   {', '.join(tr['trigger_words'])}")
    if tr.get("top_tags"):
        lines.append(f"  tags       {', '.join(f'{t} ({n})' for t, n in tr['top_tags'][:10])}")
    if tr.get("output_name"):
        lines.append(f"  output     {tr['output_name']}")
    sb = d.get("base_suggestion")
    if sb is not None:
        if sb.get("base"):
            lines.append(f"  base       {sb['base']} (vote share {sb['confidence']:.2f} of {sb['voters']} labelled neighbours)")
        else:
            lines.append(f"  base       unknown ({sb.get('message', 'no labelled neighbours')})")
        if sb.get("hub_base_model"):
            why = "the vote" if sb.get("hub_base_model_from") == "vote" else "the family's reference model"
            lines.append(f"  base_model {sb['hub_base_model']}  (model-card value, from {why})")
    print("\n".join(lines))


@app.command()
@handles_errors
def info(
    path: Path = typer.Argument(..., help="A LoRA .safetensors file, a PEFT adapter folder, or a folder to scan."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON (JSON lines for a folder)."),
    config: Optional[Path] = typer.Option(None, "--config", help="PEFT adapter_config.json to use for a bare weights file."),
    db: Optional[Path] = typer.Option(None, "--db", help="Store directory: suggest the base model from the nearest indexed LoRAs."),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="Neighbours that vote on the base model (with --db)."),
) -> None:
    """Describe a LoRA: format, base-model family, modules, rank, dtype, hashes, header checks, trigger words."""
    from lorasearch.formats import find_loras, load_lora
    from lorasearch.formats.load import PEFT_WEIGHTS
    from lorasearch.header_checks import info_extras
    from lorasearch.report import info_dict

    def describe(ld: Any) -> dict[str, Any]:
        return info_dict(ld) | info_extras(ld, store, k)

    store = _open_store(db) if db is not None else None
    try:
        if path.is_dir() and not (path / PEFT_WEIGHTS).is_file():
            read = refused = 0
            for item in find_loras(path):
                try:
                    d = describe(load_lora(item))
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
        d = describe(load_lora(path, config=config))
        _emit(d) if as_json else _print_info(d)
    finally:
        if store is not None:
            store.close()


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


def _open_store(db: Path, create: bool = False, readonly: bool = True, keep_files: bool = True) -> Any:
    from lorasearch.store import Store, StoreError

    try:
        return Store(db, create=create, readonly=readonly, keep_files=keep_files)
    except StoreError as exc:
        raise BadInput(str(exc), code="no_store") from None


@app.command()
@handles_errors
def index(
    sources: list[str] = typer.Argument(
        ..., help="Files, folders (recursive; PEFT folders recognised), hf:owner/name[@revision], hf-search:<filter>."
    ),
    db: Path = typer.Option(..., "--db", help="Store directory (created if missing)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes that read and embed files."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    no_keep_files: bool = typer.Option(False, "--no-keep-files", help="Do not keep content-addressed copies (queries are then re-ranked from sketches, not exactly)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hugging Face Hub endpoint (default: $HF_ENDPOINT or the public hub)."),
    label: list[str] = typer.Option([], "--label", help="Label to attach to every LoRA indexed by this run (repeatable)."),
    engine: str = typer.Option("local", "--engine", help="local (worker processes here) or ray (tasks on a Ray cluster)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address for --engine ray (default: start a local Ray on 127.0.0.1)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget of one index, e.g. 2GiB (sets the index type and IVF codes)."),
    max_query_ms: Optional[float] = typer.Option(None, "--max-query-ms", min=0.01, help="Latency budget of one index search in ms (sets flat/IVF and nprobe)."),
    watch: bool = typer.Option(False, "--watch", help="Keep running: index new and changed files, drop removed ones (file events, polling fallback; half-written files wait until stable; SIGUSR1 rescans, Ctrl-C stops)."),
) -> None:
    """Index LoRAs into a store; re-running resumes an interrupted job, and the same content twice is one entry."""
    from indexer import run_index
    from indexer.pipeline import IndexerBusy
    import dataclasses

    from lorasearch.store import Store, StoreError, parse_bytes

    if engine not in ("local", "ray"):
        raise BadInput(f"--engine must be local or ray, not {engine!r}", code="bad_parameter")
    if address and engine != "ray":
        raise BadInput("--address needs --engine ray", code="bad_parameter")
    if watch and engine != "local":
        raise BadInput("--watch runs the local engine; drop --engine ray", code="bad_parameter")
    try:
        if max_memory is not None or max_query_ms is not None:  # the budget is the store's: its server uses it too
            budget: dict[str, Any] = {}
            if max_memory is not None:
                budget["memory_bytes"] = parse_bytes(max_memory)
            if max_query_ms is not None:
                budget["max_query_ms"] = float(max_query_ms)
            with Store(db) as st:
                st.set_policy(dataclasses.replace(st.policy, **budget))
        if engine == "ray":
            from indexer.ray_engine import run_index_ray

            summary = run_index_ray(sources, db, address=address, keep_files=not no_keep_files, endpoint=endpoint,
                                    labels=label or None, num_cpus=workers if workers > 1 else None)
        elif watch:
            from indexer.watch import watch as run_watch

            summary = run_watch(sources, db, workers=workers, keep_files=not no_keep_files, endpoint=endpoint,
                                labels=label or None)
        else:
            summary = run_index(sources, db, workers=workers, keep_files=not no_keep_files, progress=not as_json,
                                endpoint=endpoint, labels=label or None)
    except (IndexerBusy, StoreError) as exc:
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        _emit(summary)
    else:
        print(f"added {summary['added']}, duplicates {summary['duplicates']}, failed {len(summary['failed'])} -> {db}")
        for f in summary["failed"]:
            print(f"  failed {f.get('item') or f['source']}: {f['error']}")


@app.command()
@handles_errors
def query(
    path: Path = typer.Argument(..., help="The query LoRA (file or PEFT folder)."),
    db: Path = typer.Option(..., "--db", help="Store directory."),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="Number of results."),
    view: str = typer.Option("delta", "--view", help="delta (identity, exact re-rank), style (per-module normalised) or paper (the paper's A/B+PCA baseline)."),
    groups: list[str] = typer.Option([], "--groups", help="Module groups for the style view: attention, feed_forward, conv, text_encoder (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """The indexed LoRAs closest to PATH, within its base-model family, best first."""
    from lorasearch.read_embed import load_and_embed
    from lorasearch.search import query as run_query
    from lorasearch.sketch import MODULE_GROUPS

    if view not in ("delta", "style", "paper"):
        raise BadInput(f"--view must be delta, style or paper, not {view!r}", code="bad_parameter")
    bad = [g for g in groups if g not in MODULE_GROUPS]
    if bad:
        raise BadInput(f"unknown module group {bad[0]!r} (choose from {', '.join(MODULE_GROUPS)})", code="bad_parameter")
    # read and embedded in one streaming pass (the store's k and D are checked by run_query);
    # the query file is not hashed: nothing in the answer needs its identity
    ld, emb = load_and_embed(path, hashes=False)
    store = _open_store(db)
    try:
        res = run_query(store, ld, view=view, k=k, groups=groups or None, embedding=emb)
    finally:
        store.close()
    res.setdefault("query", str(path))
    if res.get("message"):
        _err(f"note: {res['message']}")
    if as_json:
        _emit(res)
        return
    print(f"{path}: family {res['family']}, view {res['view']}, {'exact' if res['exact'] else 'approximate'} scores")
    for i, r in enumerate(res["results"], 1):
        print(f"{i:>3}. {r['score']:+.4f}  #{r['id']:<6} {r['name']}  ({r['path']})")


@app.command()
@handles_errors
def stats(
    db: Path = typer.Option(..., "--db", help="Store directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
) -> None:
    """What a store holds: LoRAs per family, views and index types, sources, size on disk."""
    store = _open_store(db)
    try:
        st = store.stats()
    finally:
        store.close()
    if as_json:
        _emit(st)
        return
    print(f"{db}: {st.get('loras')} LoRAs, generation {st.get('generation')}")
    for fam, n in sorted((st.get("families") or {}).items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<28} {n}")


@app.command()
@handles_errors
def serve(
    db: Path = typer.Option(..., "--db", help="Store directory (an empty store is created when there is none)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes."),
    max_upload_mb: float = typer.Option(512, "--max-upload-mb", min=0.001, help="Cap for one uploaded LoRA file, in MiB."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token that enables POST/DELETE /v1/loras."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (warning hides the access log)."),
) -> None:
    """Run the HTTP API and web page (FastAPI under uvicorn) over a store."""
    from api.app import serve as run_server

    run_server(db, host=host, port=port, workers=workers, max_upload_mb=max_upload_mb, token_file=token_file,
               log_level=log_level)


@app.command()
@handles_errors
def attribute(
    target: str = typer.Argument(..., help="A LoRA file or PEFT folder, a full checkpoint (file or diffusers folder), a folder of those, or hf:owner/name[@rev]."),
    db: Path = typer.Option(..., "--db", help="Store directory."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of a full checkpoint: local file/diffusers folder or hub id (default: the hub model card's base_model)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON."),
    max_fpr: float = typer.Option(2e-4, "--max-fpr", min=0.0, max=1.0, help="A component counts when its calibrated false-positive rate is at most this."),
    min_cosine: float = typer.Option(0.1, "--min-cosine", min=0.0, max=1.0, help="... and its (partial) cosine with the target is at least this."),
    max_components: int = typer.Option(6, "--max-components", min=1, max=64, help="Most components of a merge."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hugging Face Hub endpoint (default: $HF_ENDPOINT or the public hub)."),
) -> None:
    """Does TARGET derive from indexed LoRAs (re-upload, conversion, resize, further training) or merge several, at what weight, and how sure?"""
    from lorasearch.attribution import Thresholds
    from lorasearch.attribution import attribute as run_attribution

    th = Thresholds(max_fpr=max_fpr, min_cosine=min_cosine, max_components=max_components)
    store = _open_store(db)
    try:
        res = run_attribution(store, target, base=base, thresholds=th, endpoint=endpoint)
    finally:
        store.close()
    for f in res["per_file"]:
        if f.get("message"):
            _err(f"note: {f['path']}: {f['message']}")
        if f.get("error"):
            _err(f"skipped {f['path']}: {f['error']['message']}")
    if as_json:
        _emit(res)
        return
    print(f"{res['target']}: {res['verdict']} (family {res['family']}, explained {res['explained']:.3f})")
    for m in res["matches"]:
        cos = "n/a" if m["cosine"] is None else f"{m['cosine']:+.4f}"
        print(f"  #{m['id']:<6} coefficient {m['coefficient']:+.4f}  cosine {cos}  fpr {m['fpr']:.2g}  {m['name']}  ({m['path']})")


# Imported last: command modules use the helpers defined above. Under
# ``python -m lorasearch.cli`` this file runs as ``__main__``; the commands are
# then registered on the importable ``lorasearch.cli`` module that main() uses.
if __name__ != "__main__":
    from lorasearch.commands import register_all

    register_all(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    from lorasearch.cli import main as _main

    _main()
