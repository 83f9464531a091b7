"""SOURCE strings -> work items (one LoRA each) or failures with a reason.

Sources:

- a file: ``path/to/x.safetensors`` (pickled ``.bin/.pt/.ckpt`` are refused, never opened);
- a folder: every ``.safetensors`` under it, recursively, with PEFT adapter
  folders (``adapter_model.safetensors`` + ``adapter_config.json``) taken as one
  LoRA (``lorasearch.formats.load.find_loras``); hidden folders are skipped;
- ``hf:owner/name[@revision]``: the repo's ``*.safetensors``, ``*.json`` and
  ``README.md`` fetched with ``huggingface_hub.snapshot_download`` and pinned to
  the commit the revision resolved to;
- ``hf-search:<filter>[,<filter>...]``: every repo ``HfApi.list_models(filter=[...])``
  returns (e.g. ``lora`` or ``base_model:adapter:<id>``), each as an ``hf:`` source.

A bad source (missing path, malformed ``hf:`` spec, unknown repo or revision,
unreachable hub) becomes a ``Failure``; nothing here raises on bad input.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

from lorasearch.formats.load import PEFT_WEIGHTS, find_loras
from lorasearch.formats.safetensors_file import DEFAULT_MAX_FILE_BYTES, PICKLE_SUFFIXES

HF_PREFIX = "hf:"
HF_SEARCH_PREFIX = "hf-search:"
DEFAULT_ENDPOINT = "https://huggingface.co"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "README.md"]
DEFAULT_SEARCH_LIMIT = 100
# Repo ids: optional owner, then name; the hub allows letters, digits, '-', '_', '.'.
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class WorkItem:
    """One LoRA to read: a local weights file or PEFT folder and where it came from.

    Attributes:
        source: the SOURCE string it was expanded from.
        path: the local file or PEFT folder handed to ``load_lora``.
        key: its identity in the job table (absolute path, or ``hf:repo@sha/path``).
        size: bytes of the weights file.
        mtime_ns: modification time of the weights file (0 for hub files: a commit never changes).
        repo: hub repo id, for hub items.
        revision: the commit sha, for hub items.
        path_in_repo: the weights file inside the repo, for hub items.
    """

    source: str
    path: str
    key: str
    size: int
    mtime_ns: int
    repo: str | None = None
    revision: str | None = None
    path_in_repo: str | None = None

    def source_dict(self) -> dict[str, Any]:
        """What ``Store.add`` records: ``{"source", "repo", "revision", "path"}``."""
        return {
            "source": self.source,
            "repo": self.repo,
            "revision": self.revision,
            "path": self.path_in_repo if self.repo else str(weights_file(Path(self.path))),
        }


@dataclass(frozen=True)
class Failure:
    """A source, or one file of it, that cannot be indexed, with a one-line reason."""

    source: str
    error: str
    item: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "error": self.error}
        if self.item is not None:
            out["item"] = self.item
        return out


def weights_file(path: Path) -> Path:
    """The weights file of an item: the file itself, or a PEFT folder's ``adapter_model.safetensors``."""
    return path / PEFT_WEIGHTS if path.is_dir() else path


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The hub endpoint: the argument, else ``HF_ENDPOINT``, else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def normalise_source(spec: str) -> str:
    """A SOURCE as a job identity: local paths made absolute, hub sources as given."""
    if spec.startswith((HF_PREFIX, HF_SEARCH_PREFIX)) or not spec.strip():
        return spec
    return str(Path(spec).expanduser().absolute())


def parse_hf(spec: str) -> tuple[str, str | None]:
    """``hf:owner/name[@revision]`` -> (repo id, revision or None).

    Raises:
        ValueError: the spec is malformed (the message says how).
    """
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    repo, sep, rev = body.partition("@")
    if not _REPO_RE.match(repo) or ".." in repo or "--" in repo:
        raise ValueError(f"malformed hub source {spec!r}: expected hf:owner/name[@revision]")
    if sep and not rev.strip():
        raise ValueError(f"malformed hub source {spec!r}: empty revision after '@'")
    return repo, (rev if sep else None)


def parse_search(spec: str) -> list[str]:
    """``hf-search:a,b`` -> ``["a", "b"]``.

    Raises:
        ValueError: no filter given.
    """
    filters = [f.strip() for f in spec[len(HF_SEARCH_PREFIX):].split(",") if f.strip()]
    if not filters:
        raise ValueError(f"malformed hub search {spec!r}: expected hf-search:<filter>[,<filter>...]")
    return filters


# -- local files and folders -------------------------------------------------------------------------------------
def _local_item(source: str, path: Path, **hub: Any) -> WorkItem | Failure:
    """A file or PEFT folder -> a work item (pickles refused by name, never opened)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return Failure(source, f"{path}: refused: pickled weights ({path.suffix}) are never unpickled "
                               "(unpickling can run arbitrary code); convert the file to .safetensors", str(path))
    w = weights_file(path)
    try:
        st = w.stat()
    except OSError as exc:
        return Failure(source, f"{w}: cannot read ({exc.strerror or exc})", str(path))
    if hub:
        key = f"hf:{hub['repo']}@{hub['revision']}/{hub['path_in_repo']}"
        return WorkItem(source, str(path), key, st.st_size, 0, **hub)
    return WorkItem(source, str(path), str(path.resolve()), st.st_size, st.st_mtime_ns)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_paths(folder: Path) -> Iterator[Path]:
    """LoRA paths under a folder: the folder itself when it is a PEFT adapter, then ``find_loras``
    (which lists a PEFT folder once, never its weights file on its own)."""
    if (folder / PEFT_WEIGHTS).is_file():
        yield folder
    for p in find_loras(folder):
        if not _hidden(p, folder):
            yield p


def expand_local(source: str, path: Path | None = None) -> Iterator[WorkItem | Failure]:
    """A local file or folder source -> its items.

    Args:
        source: the SOURCE string (a path).
        path: the path, when it differs from ``source``.
    """
    path = Path(source).expanduser() if path is None else path
    if not path.exists():
        yield Failure(source, f"{path}: no such file or folder")
        return
    if path.is_file():
        yield _local_item(source, path.absolute())
        return
    found = False
    for p in _folder_paths(path.absolute()):
        found = True
        yield _local_item(source, p)
    if not found:
        yield Failure(source, f"{path}: no .safetensors files or PEFT adapter folders under this folder")


# -- the hub -----------------------------------------------------------------------------------------------------
def hub_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the endpoint opens, else why not.

    ``list_models`` retries a refused connection with back-off for ~20 s; one
    connect first makes "hub unreachable" a fast, clear failure.
    """
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return f"hub unreachable at {endpoint} ({exc.strerror or exc.__class__.__name__})"


def hub_error(spec: str, repo: str, revision: str | None, endpoint: str, exc: Exception) -> str:
    """One line for a failed hub call."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo} on {endpoint}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"repository {repo} not found on {endpoint} (or it is private/gated)"
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return f"hub unreachable at {endpoint} and {repo} is not in the local cache"
    if isinstance(exc, HFValidationError):
        return f"malformed hub source {spec!r}: {str(exc).splitlines()[0]}"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"hub error {status} for {repo} on {endpoint}: {str(exc).splitlines()[0]}"
    if isinstance(exc, OSError):
        return f"hub unreachable at {endpoint} ({exc.__class__.__name__}: {exc})"
    return f"{repo}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's own progress bars off (the indexer shows one bar for the run)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()  # a plain call works in every huggingface_hub version (newer ones also allow `with`)
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def oversized_files(repo: str, revision: str | None, endpoint: str, max_bytes: int) -> dict[str, int]:
    """``*.safetensors`` files of a repo over ``max_bytes`` (path -> size), from the file listing.

    Raises:
        RepositoryNotFoundError, RevisionNotFoundError: from ``huggingface_hub``. Other errors
        (an unreachable hub) give ``{}``: ``snapshot_download`` may still serve the repo from the cache.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception:  # noqa: BLE001 - unreachable hub etc.: snapshot_download may still serve the cache
        return {}
    return {s.rfilename: int(s.size) for s in info.siblings or []
            if s.rfilename.endswith(".safetensors") and s.size is not None and s.size > max_bytes}


def download_repo(
    repo: str, revision: str | None, endpoint: str, cache_dir: str | Path | None = None,
    ignore: list[str] | None = None,
) -> tuple[Path, str]:
    """Fetch a repo's safetensors/json/README at a revision into the hub cache.

    Args:
        ignore: repo paths not to fetch (e.g. oversized files).

    Returns:
        (the snapshot folder, the commit sha it is pinned to).
    """
    from huggingface_hub import snapshot_download

    with quiet_hub():
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=ignore or None,
            endpoint=endpoint, cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    # In cache mode the snapshot folder is named by the resolved commit, also when served from the cache offline.
    sha = Path(folder).name
    if not _SHA_RE.match(sha):
        raise RuntimeError(f"snapshot folder {folder} is not named by a commit sha")
    return Path(folder), sha


def expand_hf(
    spec: str, endpoint: str | None = None, cache_dir: str | Path | None = None, source: str | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[WorkItem | Failure]:
    """``hf:owner/name[@revision]`` -> one item per LoRA of the repo at the resolved commit.

    Args:
        spec: the hub source.
        endpoint: hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        cache_dir: huggingface_hub cache folder (default its own).
        source: the SOURCE string to record (an ``hf-search:`` source expands through here).
        max_bytes: ``.safetensors`` files larger than this (full checkpoints) are not downloaded.
    """
    source = source or spec
    ep = resolve_endpoint(endpoint)
    where = spec if source != spec else None
    try:
        repo, revision = parse_hf(spec)
    except ValueError as exc:
        yield Failure(source, str(exc))
        return
    try:
        big = oversized_files(repo, revision, ep, max_bytes)
        folder, sha = download_repo(repo, revision, ep, cache_dir, sorted(big))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes a reason, never a crash
        yield Failure(source, hub_error(spec, repo, revision, ep, exc), where)
        return
    for path, size in sorted(big.items()):
        yield Failure(source, f"{repo}@{sha[:12]}/{path}: {size} bytes, over the {max_bytes}-byte limit for one "
                              "LoRA file (LORASEARCH_MAX_FILE_BYTES); not downloaded", f"hf:{repo}@{sha}/{path}")
    found = False
    for p in _folder_paths(folder):
        found = True
        rel = weights_file(p).relative_to(folder).as_posix()
        yield _local_item(source, p, repo=repo, revision=sha, path_in_repo=rel)
    if not found and not big:
        yield Failure(source, f"{repo}@{sha[:12]}: no .safetensors files in the repository", where)


def search_hub(filters: list[str], endpoint: str, limit: int = DEFAULT_SEARCH_LIMIT) -> list[str]:
    """Repo ids ``HfApi.list_models(filter=filters)`` returns, at most ``limit``."""
    from huggingface_hub import HfApi

    return [m.id for m in HfApi(endpoint=endpoint).list_models(filter=filters, limit=limit)]


def expand_search(
    spec: str, endpoint: str | None = None, cache_dir: str | Path | None = None, limit: int = DEFAULT_SEARCH_LIMIT,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[WorkItem | Failure]:
    """``hf-search:<filter>[,...]`` -> the items of every matching repo (each fetched as ``hf:<id>``)."""
    ep = resolve_endpoint(endpoint)
    try:
        filters = parse_search(spec)
    except ValueError as exc:
        yield Failure(spec, str(exc))
        return
    why = hub_reachable(ep)
    if why is not None:
        yield Failure(spec, why)
        return
    try:
        repos = search_hub(filters, ep, limit)
    except Exception as exc:  # noqa: BLE001
        yield Failure(spec, hub_error(spec, "model search", None, ep, exc))
        return
    if not repos:
        yield Failure(spec, f"no repositories on {ep} match filter {filters}")
        return
    for rid in repos:
        yield from expand_hf(HF_PREFIX + rid, ep, cache_dir, source=spec, max_bytes=max_bytes)


def expand_source(
    spec: str, endpoint: str | None = None, cache_dir: str | Path | None = None,
    search_limit: int = DEFAULT_SEARCH_LIMIT, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[WorkItem | Failure]:
    """One SOURCE string -> its work items and failures (never raises on bad input).

    Args:
        spec: a path, ``hf:owner/name[@rev]`` or ``hf-search:<filter>[,...]``.
        endpoint: hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        cache_dir: huggingface_hub cache folder.
        search_limit: most repos an ``hf-search:`` source expands to.
        max_bytes: hub ``.safetensors`` files larger than this are not downloaded (a failure says so).
    """
    if spec.startswith(HF_SEARCH_PREFIX):
        yield from expand_search(spec, endpoint, cache_dir, search_limit, max_bytes)
    elif spec.startswith(HF_PREFIX):
        yield from expand_hf(spec, endpoint, cache_dir, max_bytes=max_bytes)
    elif not spec.strip():
        yield Failure(spec, "empty source")
    else:
        yield from expand_local(spec)


def expand_sources(
    specs: Iterable[str], endpoint: str | None = None, cache_dir: str | Path | None = None,
    search_limit: int = DEFAULT_SEARCH_LIMIT, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[WorkItem | Failure]:
    """Every source in turn (see ``expand_source``); an item key is yielded once even if two sources reach it."""
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        for x in expand_source(spec, endpoint, cache_dir, search_limit, max_bytes):
            if isinstance(x, WorkItem):
                if (x.source, x.key) in seen:
                    continue
                seen.add((x.source, x.key))
            yield x


__all__ = [
    "ALLOW_PATTERNS", "Failure", "WorkItem", "expand_hf", "expand_local", "expand_search", "expand_source",
    "expand_sources", "normalise_source", "parse_hf", "parse_search", "resolve_endpoint",
]
