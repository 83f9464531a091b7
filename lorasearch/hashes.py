"""File hashes used by model hubs (see FORMATS.md, "Hashes").

- sha256: the whole file (lower-case hex).
- AutoV2: its first 10 hex digits, upper case (Civitai).
- AutoV3: sha256 of the bytes after the 8-byte length and the JSON header,
  upper case; equal to sd-scripts' ``addnet_hash_safetensors`` /
  ``sshs_model_hash`` (lower case there). Metadata edits do not change it.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

AUTOV3_FROM_START_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20


def file_sha256(path: str | Path, chunk: int = _CHUNK) -> str:
    """Lower-case hex sha256 of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def autov2(sha256_hex: str) -> str:
    """Civitai AutoV2: the first 10 hex digits of the file sha256 (upper case)."""
    return sha256_hex[:10].upper()


def autov3_start(header_len: int) -> int:
    """Byte offset AutoV3 hashes from.

    Civitai's scanner hashes from byte 8 (header included) when the header is
    16 MiB or more; otherwise from the end of the header.
    """
    return 8 if header_len >= AUTOV3_FROM_START_BYTES else 8 + header_len


def autov3(path: str | Path, header_len: int | None = None, chunk: int = _CHUNK) -> str:
    """Civitai AutoV3 / sd-scripts ``sshs_model_hash``: sha256 of the bytes after the header.

    Args:
        path: a safetensors file.
        header_len: the u64 JSON-header length stored in the first 8 bytes
            (read from the file when None).

    Returns:
        64 upper-case hex digits.
    """
    with open(path, "rb") as fh:
        if header_len is None:
            header_len = _read_header_len(fh.read(8), path)
        fh.seek(autov3_start(header_len))
        h = hashlib.sha256()
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest().upper()


def file_hashes(path: str | Path, header_len: int, chunk: int = _CHUNK) -> tuple[str, str]:
    """sha256 and AutoV3 in one pass over the file.

    Args:
        path: a safetensors file.
        header_len: its JSON-header length.

    Returns:
        (lower-case sha256 of the whole file, upper-case AutoV3).
    """
    start = autov3_start(header_len)
    full, tail = hashlib.sha256(), hashlib.sha256()
    pos = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            full.update(block)
            if pos + len(block) > start:
                tail.update(block[max(start - pos, 0):])
            pos += len(block)
    return full.hexdigest(), tail.hexdigest().upper()


def _read_header_len(head: bytes, path: str | Path) -> int:
    if len(head) < 8:
        raise ValueError(f"{path}: shorter than 8 bytes, not a safetensors file")
    return int(struct.unpack("<Q", head)[0])
