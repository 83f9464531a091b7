"""File -> (LoraDelta, Embedding) in one streaming pass over the factors.

``embed(load_lora(path))`` widens every 16-bit factor to float32 into memory
first and sketches afterwards: on an SDXL-size LoRA (0.5 GB of float32
factors) the sketch then reads everything back from memory. Here the kohya
reader leaves plain LoRA/LoCon factors unwritten
(``SafetensorsFile.get_deferred``) and each module is widened right before it
is sketched, while it is still in cache: into its place in the file's float32
buffer when the caller keeps the factors, else into a small buffer reused
module after module. The sketches and vectors are the same, bit for bit: the
same cast gives the same values, and the same products run on them.

Where this process may use a second core (``sketch_helper.enabled``): without
hashes, part of a large file's modules is sketched meanwhile by a helper
process (``lorasearch.sketch_helper``) that reads their factors from the file
itself; with hashes, the two digests take that core instead (one thread
each, beside the embedding: faster than the helper, since hashing costs
more than sketching). The helper takes the modules stored in the second half of
the data section; when the factors are not kept this process never reads that
half (copying a file out of the page cache runs at ~6 GB/s here: the second
copy of half an SDXL-size file cost ~20 ms of CPU). Python's cyclic garbage
collector is paused while the header's ~10,000 small objects are made and
dropped (its full passes over a busy worker's heap cost as much as the parse).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lorasearch import sketch_helper
from lorasearch.delta import Delta, Factored, LoraDelta, without_values
from lorasearch.embed import Embedding, embed, embedding_of
from lorasearch.formats.load import opened_lora
from lorasearch.formats.safetensors_file import DEFAULT_MAX_FILE_BYTES, HASH_THREADS, SafetensorsFile, read_ahead
from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K, is_stacked, sketch_lora, sketch_shape

# Files from this size share their modules with the helper process (below it the
# job's round trip is a visible share of the work).
HELPER_MIN_BYTES = 64 << 20
# The helper's share of the data section: it sketches the modules stored in the last
# HELPER_SHARE of it (with the factors not kept, this process does not even read that
# part). Measured on the SDXL-size file, embed time is flat from 0.42 to 0.5.
HELPER_SHARE = 0.5


def load_and_embed(
    path: str | Path, k: int = DEFAULT_K, dim: int = DEFAULT_DIM, hashes: bool = True,
    config: str | Path | dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    keep_factors: bool = True, helper: bool | None = None,
) -> tuple[LoraDelta, Embedding]:
    """``(ld, embed(ld, k, dim))`` for ``ld = load_lora(path, config, max_bytes, hashes)``, streamed.

    Args:
        path: a safetensors file or PEFT folder.
        k: sketch size.
        dim: view vector length.
        hashes: compute the file's sha256 / AutoV2 / AutoV3.
        config: a PEFT adapter config overriding the sidecar.
        max_bytes: size cap for the weights file.
        keep_factors: return the LoraDelta with its factor values. False returns
            ``without_values(ld)`` (what the indexer stores) and widens each deferred
            factor into a small reused buffer instead of the file's float32 buffer.
        helper: let a helper process sketch part of the modules; None: when this process
            may use a second core, the file is at least ``HELPER_MIN_BYTES`` and no hashes
            are asked for (with hashes, two hashing threads take the second core: measured
            faster than the helper).

    Returns:
        the LoraDelta and its Embedding.

    Raises:
        BadInput: as ``load_lora`` (a NaN/Inf factor is reported when its module is reached).
    """
    spare_core = sketch_helper.enabled()  # false where the caller was given one core (pool workers, Ray tasks)
    hash_threads = 2 if spare_core else HASH_THREADS
    held = _helper_before_open(path, hashes, keep_factors, helper, spare_core)
    # the helper's share of the data section is left to it: this process reads the rest
    upto = 1.0 - HELPER_SHARE if held is not None else 1.0
    try:
        with _gc_paused(), opened_lora(path, config, max_bytes, hashes, defer=True, hash_threads=hash_threads,
                                       prefetch_upto=upto) as (ld, st):
            if not st.unfilled:
                return (ld if keep_factors else without_values(ld)), embed(ld, k, dim)
            use_helper = _wants_helper(helper, spare_core, hashes, st.size)
            taken, held = held, None  # _sketch_streamed gives it back
            sketches = _sketch_streamed(ld, st, k, use_helper, keep_factors, taken)
            return _finish(ld, st, embedding_of(ld.family, k, dim, sketches), keep_factors)
    finally:
        if held is not None:
            held.release()


def _finish(ld: LoraDelta, st: SafetensorsFile, emb: Embedding, keep_factors: bool) -> tuple[LoraDelta, Embedding]:
    """The LoraDelta (its factors written, or its summary) once every module is sketched."""
    if keep_factors:
        st.fill_all()  # tensors no sketch used (the helper's modules are written already)
        return ld, emb
    if not all(map(math.isfinite, emb.norms.values())):  # a sketch is finite iff its norm is
        st.check_consumed()  # raises non_finite naming the tensor
    st.fill_all()  # tensors no sketch used are still checked
    return without_values(ld, reuse=True), emb


def _wants_helper(helper: bool | None, spare_core: bool, hashes: bool, size: int) -> bool:
    """``load_and_embed``'s ``helper`` rule: as asked, or by default when a second core is free,
    no hashes are asked for and the file has at least ``HELPER_MIN_BYTES``."""
    return (spare_core and not hashes and size >= HELPER_MIN_BYTES) if helper is None else helper


def _helper_before_open(path: str | Path, hashes: bool, keep_factors: bool, helper: bool | None,
                        spare_core: bool) -> sketch_helper.SketchHelper | None:
    """The helper, taken before the file is opened when it is to sketch the modules in the
    second part of the data section and that part need not be read here at all: the helper
    is wanted, the factors are not kept and no hashes are asked for."""
    if keep_factors or hashes or helper is False:
        return None
    try:
        size = os.stat(path).st_size if os.path.isfile(path) else 0
    except OSError:  # opened_lora says what is wrong
        return None
    return sketch_helper.get() if _wants_helper(helper, spare_core, hashes, size) else None


def _sketch_streamed(ld: LoraDelta, st: SafetensorsFile, k: int, use_helper: bool,
                     keep: bool, held: sketch_helper.SketchHelper | None = None) -> dict[str, np.ndarray]:
    """Every module's sketch, each widened right before it is sketched (into its place in
    the file's float32 buffer with ``keep``, else into a reused buffer); part of them
    sketched by the helper process when one is free (``held``: one the caller took;
    ``keep``: their factors are written here meanwhile)."""
    scratch = _Scratch()

    def fill(d: Delta) -> None:
        if isinstance(d, Factored):
            st.fill(d.up)
            st.fill(d.down)

    def in_scratch(arr: np.ndarray, i: int) -> np.ndarray:
        got = st.widen_into(arr, scratch.get(i, arr.size))
        if got is None:  # not one deferred tensor (or already written): its own values
            st.fill(arr)
            return arr
        return got

    def prepare_once(d: Delta) -> None:
        if not isinstance(d, Factored):
            return
        if is_stacked(d):  # multiplied in one stack with others: written in place
            fill(d)
            return
        # the module's factors now point at the scratch buffers, overwritten by the next module:
        # the caller replaces this LoraDelta by its summary
        pair = st.widen_pair_into(d.down, d.up, scratch.get(0, d.up.size + d.down.size))
        if pair is not None:  # side by side in the file (kohya): one cast
            d.down, d.up = pair
            return
        d.up = in_scratch(d.up, 0)
        d.down = in_scratch(d.down, 1)

    prepare = fill if keep else prepare_once

    def sketch_of(names: set[str]) -> dict[str, np.ndarray]:
        mods = {n: d for n, d in ld.modules.items() if n in names}
        return sketch_lora(dataclasses.replace(ld, modules=mods), k, prepare)

    helper = held if held is not None else sketch_helper.get() if use_helper else None
    if helper is None:
        return sketch_lora(ld, k, prepare)
    try:
        items = _helper_items(ld, st)
        fst = os.fstat(st.fileno())
    except BaseException:
        helper.release()
        raise
    if not items:
        helper.release()
        return sketch_lora(ld, k, prepare)
    identity = (fst.st_dev, fst.st_ino, fst.st_size, fst.st_mtime_ns)
    if not helper.submit(os.path.abspath(st.path), identity, st.data_start, ld.family, k, items):
        return sketch_lora(ld, k, prepare)
    theirs = {it[0] for it in items}
    try:
        out = sketch_of(set(ld.modules) - theirs)
        if keep:
            st.fill_all()  # the helper's modules' factors, written and checked while it sketches them
    except BaseException:
        with contextlib.suppress(RuntimeError):
            helper.result()  # the pipe must not keep this job's answer for the next one
        raise
    try:
        got = helper.result()
    except RuntimeError:  # sketched here instead (their factors are still pending in st)
        got = sketch_of(theirs)
    else:
        if not keep:  # checked through their sketches (check_consumed), never written here
            st.consume(start for it in items for start in (it[4][1], it[5][1]))
    out.update(got)
    return {n: out[n] for n in ld.modules if n in out}


def _helper_items(ld: LoraDelta, st: SafetensorsFile) -> list[sketch_helper.Item]:
    """The modules the helper sketches: those whose two factors lie past the part of the data
    section this process read ahead (``SafetensorsFile.prefetched``), or past the same share of
    it when it read the whole section (the same modules in both cases, so each process keeps
    the Gaussians of its own modules only)."""
    cut = read_ahead(st.size - st.data_start, 1.0 - HELPER_SHARE)  # = st.prefetched after a partial prefetch
    items: list[sketch_helper.Item] = []
    for name, d in ld.modules.items():
        if not isinstance(d, Factored) or is_stacked(d):
            continue
        up = st.deferred_spec(d.up)  # a module before the cut is settled by one factor
        if up is None or up[1] < cut:
            continue
        down = st.deferred_spec(d.down)
        if down is not None and down[1] >= cut and down[1] != up[1]:
            p, q = sketch_shape(d)
            items.append((name, p, q, d.scale, up, down))
    return items


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (reference counting still frees everything)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Scratch:
    """Two float32 buffers (up and down factors) grown to the largest factor seen, reused per module."""

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = [np.empty(0, np.float32), np.empty(0, np.float32)]

    def get(self, i: int, n: int) -> np.ndarray:
        if self._bufs[i].size < n:
            self._bufs[i] = np.empty(max(n, 1 << 20), np.float32)
        return self._bufs[i]
