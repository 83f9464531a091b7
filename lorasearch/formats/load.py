"""Entry points: a path (file, PEFT folder) or a TensorSource -> LoraDelta."""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator

from lorasearch import families
from lorasearch.delta import LoraDelta
from lorasearch.errors import BadInput, UnsupportedLayout
from lorasearch.formats.base import ReadContext, TensorSource, pick_reader
from lorasearch.formats.safetensors_file import (
    DEFAULT_MAX_FILE_BYTES, HASH_THREADS, PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle_path,
)
from lorasearch.hashes import autov2

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def read_source(src: TensorSource, ctx: ReadContext | None = None) -> LoraDelta:
    """Decode a tensor source into a LoraDelta (no hashes: the caller adds its source).

    Raises:
        UnsupportedLayout: no reader knows the keys, or nothing decodes to a delta.
        BadInput: malformed factors or values.
    """
    ctx = ctx or ReadContext()
    keys = src.keys()
    if not keys:
        raise UnsupportedLayout(f"{ctx.path or 'input'}: unsupported LoRA layout: the file holds no tensors")
    reader = pick_reader(keys, src.metadata, ctx.path)
    rest = getattr(src, "prefetch_rest", None)
    if rest is not None and not getattr(reader, "defers", False):  # every tensor is read now: read all ahead
        rest()
    try:
        parsed = reader.read(src, ctx)
    except BadInput as exc:
        if ctx.path and not str(exc).startswith(ctx.path):
            exc.args = (f"{ctx.path}: {exc}",)
        raise
    except ValueError as exc:
        raise BadInput(f"{ctx.path or 'input'}: {exc}", code="bad_factors") from None
    if not parsed.modules:
        raise UnsupportedLayout(
            f"{ctx.path or 'input'}: unsupported LoRA layout: {reader.name} keys but no adapter module decoded "
            f"(e.g. {keys[0]!r})"
        )
    res = families.resolve(parsed, src.metadata, ctx.peft_config)
    modules, magnitudes, duplicates = families.canonical_modules(parsed, res)
    meta = dict(parsed.metadata)
    dtypes = getattr(src, "dtypes", None)
    meta["dtypes"] = sorted(dtypes() if dtypes is not None else {src.dtype(k) for k in keys})
    meta["family_detection"] = {
        "matched": res.matched,
        "unmatched": res.unmatched[:20],
        "unmatched_count": len(res.unmatched),
        "shape_mismatches": res.shape_mismatches[:20],
        "hints": res.hints,
        "fused_kept": res.fused_kept[:20],
        "fused_kept_count": len(res.fused_kept),
    }
    if duplicates:
        meta.setdefault("warnings", []).append(f"{len(duplicates)} modules appear twice; first kept (e.g. {duplicates[0]})")
    return LoraDelta(res.family, parsed.format, modules, magnitudes, meta)


def read_json_object(path: Path, code: str, not_json: str, not_object: str) -> dict[str, Any]:
    """A JSON file that must hold an object.

    Args:
        path: the file.
        code: the BadInput code of either failure.
        not_json: message after ``"<path>: "`` when the file cannot be read or parsed
            (``{exc}`` is replaced by the reason).
        not_object: message after ``"<path>: "`` when it parses to something else.

    Raises:
        BadInput: either failure, with ``code``.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: {not_json.format(exc=exc)}", code=code) from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: {not_object}", code=code)
    return data


def _read_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "bad_config", "adapter config is not valid JSON ({exc})",
                            "adapter config is not a JSON object")


def sidecar_config(weights: Path) -> Path | None:
    """The PEFT config that belongs to a weights file, if any.

    ``adapter_config.json`` beside ``adapter_model.safetensors``, or
    ``<stem>.adapter_config.json`` beside ``<stem>.safetensors``.
    """
    named = weights.with_name(weights.stem + ".adapter_config.json")
    if named.is_file():
        return named
    plain = weights.with_name(PEFT_CONFIG)
    if weights.name == PEFT_WEIGHTS and plain.is_file():
        return plain
    return None


def resolve_path(path: Path) -> tuple[Path, Path | None]:
    """A file or PEFT folder -> (weights file, config file or None)."""
    refuse_pickle_path(path)
    if path.is_dir():
        w = path / PEFT_WEIGHTS
        if w.is_file():
            c = path / PEFT_CONFIG
            return w, (c if c.is_file() else None)
        pickled = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            raise BadInput(f"{path}: folder holds only pickled weights ({pickled[0]}); they are never unpickled", code="pickle_refused")
        raise BadInput(f"{path}: folder is not a PEFT adapter (no {PEFT_WEIGHTS})", code="not_a_lora")
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder", code="not_found")
    return path, sidecar_config(path)


def load_lora(
    path: str | Path, config: str | Path | dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    hashes: bool = True,
) -> LoraDelta:
    """Read one LoRA: a safetensors file or a PEFT adapter folder.

    The file is read once: the tensors and the hashes come from the same bytes
    (files over ``PRELOAD_MAX_BYTES`` are hashed in a second, streaming pass).

    Args:
        path: the file or folder.
        config: a PEFT adapter config (path or dict) that overrides the sidecar.
        max_bytes: size cap for the weights file.
        hashes: compute sha256 / AutoV2 / AutoV3 (the file's identity; the
            embedding does not need them). False leaves them None.

    Returns:
        the LoraDelta, with ``source`` holding path, sha256, AutoV2 and AutoV3.

    Raises:
        BadInput: with a one-line reason naming the file.
    """
    with opened_lora(path, config, max_bytes, hashes) as (ld, _):
        return ld


@contextlib.contextmanager
def opened_lora(
    path: str | Path, config: str | Path | dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    hashes: bool = True, defer: bool = False, hash_threads: int = HASH_THREADS, prefetch_upto: float = 1.0,
) -> Iterator[tuple[LoraDelta, SafetensorsFile]]:
    """``load_lora`` with its file still open, for a caller that writes deferred factors.

    Args:
        path, config, max_bytes, hashes: as ``load_lora``.
        defer: let the kohya reader leave plain 16-bit factors unwritten
            (``SafetensorsFile.get_deferred``): the LoraDelta is only valid once
            the caller has called ``fill`` for every module it reads and ``fill_all``.
            The hashes are then computed in a background thread while the caller
            works (hashlib releases the GIL) and land in ``ld.source`` when the
            block ends.
        hash_threads: threads hashing the file (1 or 2).
        prefetch_upto: with ``defer``, the share of the data section read ahead (from its
            start) while the header is decoded; the rest is read when asked for.

    Yields:
        (the LoraDelta, its open SafetensorsFile).
    """
    weights, cfg_path = resolve_path(Path(path))
    if isinstance(config, dict):
        cfg: dict[str, Any] | None = config
    else:
        cfg_path = Path(config) if config is not None else cfg_path
        cfg = _read_config(cfg_path) if cfg_path is not None else None
    # with defer, the data section is read while the header is parsed and decoded
    with SafetensorsFile(weights, max_bytes=max_bytes, prefetch=defer, prefetch_upto=prefetch_upto) as st:
        st.defer = defer
        ld = read_source(st, ReadContext(path=str(weights), peft_config=cfg))
        ld.source = {
            "path": str(path),
            "weights": str(weights),
            "config": str(cfg_path) if cfg_path is not None and not isinstance(config, dict) else None,
            "bytes": st.size,
            "file_sha256": None,
            "autov2": None,
            "autov3": None,
        }
        ld.header_metadata = dict(st.metadata)
        if not hashes:
            yield ld, st
            return
        if not defer:
            _set_hashes(ld.source, st.hashes(hash_threads))
            yield ld, st
            return
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["hashes"] = st.hashes(hash_threads)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                done["error"] = exc

        hasher = threading.Thread(target=run, name="lora-hashes", daemon=True)
        hasher.start()
        try:
            yield ld, st
        finally:
            hasher.join()
        if "error" in done:
            raise done["error"]
        _set_hashes(ld.source, done["hashes"])  # the same dict as any summary the caller made of ld


def _set_hashes(source: dict[str, Any], hashes: tuple[str, str]) -> None:
    sha, v3 = hashes
    source.update(file_sha256=sha, autov2=autov2(sha), autov3=v3)


def find_loras(folder: Path) -> Iterator[Path]:
    """Every LoRA under a folder: PEFT folders once, other ``.safetensors`` files one by one.

    A folder holding ``adapter_model.safetensors`` is a PEFT adapter (with or without
    ``adapter_config.json``) and is listed as the folder, never its weights file again.
    ``folder`` itself is not listed (callers read a PEFT root folder as one LoRA).
    Pickled files are yielded too, so callers can report them as refused.
    """
    for p in sorted(folder.rglob("*")):
        if p.is_dir() and (p / PEFT_WEIGHTS).is_file():
            yield p
        elif p.is_file() and p.suffix == ".safetensors" and p.name != PEFT_WEIGHTS:
            yield p
        elif p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
            yield p
