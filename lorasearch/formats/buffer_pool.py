"""Reusable large read buffers, so a worker's steady state does not fault in fresh memory per file.

An SDXL-size LoRA needs ~0.25 GB for its bytes and ~0.5 GB for their float32
widening. Fresh allocations of that size are mapped and zeroed by the kernel
page by page on first touch (~0.1 ms per MiB here: ~70 ms per SDXL file,
about as long as reading the file from the page cache). A block is lent out
again only once nothing references it any more: every array sliced from it
keeps it alive, so its reference count tells whether a LoraDelta built on it
is still around.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

import numpy as np

# Bytes of idle blocks a process keeps for reuse (0 turns pooling off).
POOL_MAX_BYTES = int(os.environ.get("LORASEARCH_BUFFER_POOL_BYTES") or 1 << 30)
POOL_MIN_BYTES = 16 << 20  # smaller buffers are cheap to allocate: not pooled

_blocks: list[np.ndarray] = []
_lock = threading.Lock()

# The smaller temporaries of each file (the view folds' products, ~2 MiB for an
# SDXL-size LoRA; module factors; header objects) come and go file after file too.
# glibc serves every allocation from 128 KiB with a fresh mmap and hands freed heap
# tops back to the OS, so each file faults the same pages in again (several ms per
# SDXL-size file here). These thresholds keep such memory for the next file.
_MALLOC_MMAP_THRESHOLD = 64 << 20
_MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_malloc_tuned = False


def _free_refs() -> int:
    """The reference count a pooled block shows in ``_take``'s scan when nothing else holds it."""
    probe = [np.empty(1, dtype=np.uint8)]
    for b in probe:
        return sys.getrefcount(b)
    raise AssertionError


_FREE = _free_refs()


def keep_freed_memory() -> None:
    """Let glibc keep freed memory up to a few hundred MiB for reuse (once per process).

    Left alone where the user tuned malloc (``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_``), where the pool is off, and where there is no
    glibc ``mallopt``.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if POOL_MAX_BYTES <= 0 or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load by name, or no mallopt in it
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, _MALLOC_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _MALLOC_TRIM_THRESHOLD)


def empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes``, from an idle pooled block when one fits.

    Args:
        nbytes: size wanted.

    Returns:
        a writable uint8 array (a view of a pooled block, or a fresh array).
    """
    if not _malloc_tuned:
        keep_freed_memory()
    if nbytes < POOL_MIN_BYTES or nbytes > POOL_MAX_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    with _lock:
        block = _take(nbytes)
        if block is None:
            block = np.empty(nbytes, dtype=np.uint8)
            _blocks.append(block)
            _trim()
        return block[:nbytes]


def _take(nbytes: int) -> np.ndarray | None:
    """The smallest idle block of at least ``nbytes`` (None if there is none)."""
    best: np.ndarray | None = None
    for b in _blocks:
        if b.nbytes >= nbytes and sys.getrefcount(b) == _FREE and (best is None or b.nbytes < best.nbytes):
            best = b
    return best


def _trim() -> None:
    """Forget idle blocks, smallest first, while the pool holds more than ``POOL_MAX_BYTES``."""
    idle = []
    for b in _blocks:  # the same loop shape as _free_refs, so the same count means idle
        if sys.getrefcount(b) == _FREE:
            idle.append(b)
    idle.sort(key=lambda b: b.nbytes)
    total = sum(b.nbytes for b in _blocks)
    for b in idle:
        if total <= POOL_MAX_BYTES:
            break
        _blocks.remove(b)
        total -= b.nbytes


def clear() -> None:
    """Drop every pooled block (blocks still in use stay alive with their users)."""
    with _lock:
        _blocks.clear()


def pooled_bytes() -> int:
    """Bytes the pool holds (idle or lent out)."""
    with _lock:
        return sum(b.nbytes for b in _blocks)
