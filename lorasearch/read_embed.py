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
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lorasearch.delta import Delta, Factored, LoraDelta, without_values
from lorasearch.embed import Embedding, embed
from lorasearch.formats.load import opened_lora
from lorasearch.formats.safetensors_file import DEFAULT_MAX_FILE_BYTES
from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K, is_stacked


def load_and_embed(
    path: str | Path, k: int = DEFAULT_K, dim: int = DEFAULT_DIM, hashes: bool = True,
    config: str | Path | dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    keep_factors: bool = True,
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

    Returns:
        the LoraDelta and its Embedding.

    Raises:
        BadInput: as ``load_lora`` (a NaN/Inf factor is reported when its module is reached).
    """
    with opened_lora(path, config, max_bytes, hashes, defer=True) as (ld, st):
        if not st.unfilled:
            return (ld if keep_factors else without_values(ld)), embed(ld, k, dim)
        if keep_factors:
            def prepare(d: Delta) -> None:
                if isinstance(d, Factored):
                    st.fill(d.up)
                    st.fill(d.down)

            emb = embed(ld, k, dim, prepare)
            st.fill_all()
            return ld, emb
        scratch = _Scratch()

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
                st.fill(d.up)
                st.fill(d.down)
                return
            # the module's factors now point at the scratch buffers, overwritten by the next module:
            # this LoraDelta is replaced by its summary below
            d.up = in_scratch(d.up, 0)
            d.down = in_scratch(d.down, 1)

        emb = embed(ld, k, dim, prepare_once)
        if not all(np.isfinite(z).all() for z in emb.sketches.values()):
            st.check_consumed()  # raises non_finite naming the tensor
        st.fill_all()  # tensors no sketch used are still checked
        return without_values(ld), emb


class _Scratch:
    """Two float32 buffers (up and down factors) grown to the largest factor seen, reused per module."""

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = [np.empty(0, np.float32), np.empty(0, np.float32)]

    def get(self, i: int, n: int) -> np.ndarray:
        if self._bufs[i].size < n:
            self._bufs[i] = np.empty(max(n, 1 << 20), np.float32)
        return self._bufs[i]
