"""Base models for ``POST /v1/attribute`` of a full checkpoint: resolved from local copies only.

The API never fetches what a client names. A ``base`` parameter is a hub id
(``owner/name``, ``name``, with an optional ``@revision`` and an optional
``hf:`` prefix) and is looked up, in this order, in:

1. the server's bases folder ``DB/bases/``: ``DB/bases/<owner>/<name>/`` (a
   diffusers folder, or a folder holding exactly one ``.safetensors``) or
   ``DB/bases/<owner>/<name>.safetensors``; the operator puts them there;
2. the local Hugging Face cache (``HF_HUB_CACHE``), read as files on disk
   (``models--<owner>--<name>/refs/<rev>`` -> ``snapshots/<sha>``): a model the
   operator downloaded before; nothing here can open a connection.

Anything else is refused with 422: a URL, a path (absolute, ``~``, ``..``,
backslashes: a client never names files on the server), a malformed id
(``bad_base``), or an id with no local copy (``base_not_local``).
"""
from __future__ import annotations

import re
from pathlib import Path

from api.errors import ApiError

BASES_DIR = "bases"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def parse_base(spec: str) -> tuple[str, str | None]:
    """A client's ``base`` as (repo id, revision or None).

    Raises:
        ApiError: 422 ``bad_base`` for anything that is not a plain hub id.
    """
    from indexer.sources import parse_hf

    s = spec.strip()
    if "://" in s or s.startswith(("/", "~", ".")) or "\\" in s or "\0" in s:
        raise ApiError(422, "bad_base", f"base {spec[:200]!r}: give a hub id (owner/name[@revision]); the API "
                       "never fetches URLs and never opens paths a client names")
    try:
        repo, rev = parse_hf(s)
    except ValueError as exc:
        raise ApiError(422, "bad_base", f"base: {exc}") from None
    if rev is not None and (not re.fullmatch(r"[\w.\-/]{1,200}", rev) or ".." in rev):
        raise ApiError(422, "bad_base", f"base {spec[:200]!r}: malformed revision")
    return repo, rev


def _pick(folder: Path) -> Path | None:
    """A diffusers folder itself, else its one top-level ``.safetensors`` (None when neither)."""
    if any((folder / c).is_dir() and any((folder / c).glob("*.safetensors")) for c in _COMPONENTS):
        return folder
    top = sorted(folder.glob("*.safetensors"))
    return top[0] if len(top) == 1 else None


def _in_bases_dir(root: Path, repo: str) -> Path | None:
    base = root / BASES_DIR
    if not base.is_dir():
        return None
    folder, single = base / repo, base / f"{repo}.safetensors"
    if single.is_file():
        return single
    return _pick(folder) if folder.is_dir() else None


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _in_hub_cache(repo: str, rev: str | None, cache: Path | None = None) -> Path | None:
    """The cached snapshot of ``repo`` at ``rev`` (a branch/tag ref or a commit sha), read from disk only."""
    root = (cache or _hub_cache_dir()) / f"models--{repo.replace('/', '--')}"
    if not root.is_dir():
        return None
    sha = rev if rev is not None and _SHA_RE.match(rev) else None
    if sha is None:
        ref = root / "refs" / (rev or "main")
        try:
            sha = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        if not _SHA_RE.match(sha):
            return None
    snap = root / "snapshots" / sha
    return _pick(snap) if snap.is_dir() else None


def resolve_base(spec: str, store_root: Path, hub_cache: Path | None = None) -> Path:
    """The local weights of the base a client named (see the module docstring).

    Args:
        spec: the client's ``base`` parameter.
        store_root: the store directory (its ``bases/`` folder is searched first).
        hub_cache: the Hugging Face cache folder (default ``HF_HUB_CACHE``).

    Returns:
        a diffusers folder or a single ``.safetensors`` file.

    Raises:
        ApiError: 422 ``bad_base`` (not a hub id) or ``base_not_local`` (no local copy).
    """
    repo, rev = parse_base(spec)
    found = (_in_bases_dir(store_root, repo) if rev is None else None) or _in_hub_cache(repo, rev, hub_cache)
    if found is None:
        where = f"{BASES_DIR}/{repo}/ in the store folder" + (" (no revisions there)" if rev else "")
        raise ApiError(422, "base_not_local", f"base {spec[:200]!r} has no local copy on this server (looked in "
                       f"{where} and the local Hugging Face cache); the API never downloads: ask the operator to "
                       "place it there")
    return found
