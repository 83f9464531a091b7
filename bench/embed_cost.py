"""Embedding cost: time to embed a LoRA file ÷ time to just read its tensors.

- **read** (the denominator): ``safetensors.safe_open(path, framework="pt")``,
  ``get_tensor(k).clone()`` for every key.
- **embed** ("ours"): everything from the file to the vectors:
  ``load_and_embed(path, hashes=False, keep_factors=False)`` = header
  validation, one read of the data section, reader + family resolution, each
  module's 16-bit factors widened to float32 right before its sketch
  (``lorasearch.read_embed``), and the delta/style/group view vectors (style
  weights: sketch norms; ``SKETCH_VERSION`` 2). On a 2-core machine the
  SDXL-size file (over ``HELPER_MIN_BYTES``) shares its modules with the
  sketch helper process (``lorasearch.sketch_helper``, started and warm
  before timing); its CPU time is counted in the CPU column of the embed
  rows. "one process" rows time the same call with ``helper=False``. The
  rows "load_lora + embed" time the two-step path that keeps every float32
  factor (``embed(load_lora(path, hashes=False))``); "kept factors" the
  query's call, ``load_and_embed(path, hashes=False)`` (factors kept for the
  exact re-rank).
  Timed with the per-process caches warm (*warm*: the Gaussian test matrices,
  fold buckets and module-name lookups of a worker that has embedded LoRAs of
  the family before) and with every one of those caches cleared before each
  call (*cold*: the first LoRA of a family in a fresh worker).
- **hashing**: sha256 + AutoV3 (the file's identity, not needed for the
  embedding), reported as its own ratio: hashed from the bytes ``load_lora``
  has already read (``SafetensorsFile.hashes``), with 1 thread (what
  ``load_lora`` does by default) and with 2; "embed + hashing" is the
  indexer's call, ``load_and_embed(path, keep_factors=False)`` (with a spare
  core: two hashing threads beside the embedding, no helper).
- **paper**: ``load_lora(path, hashes=False)`` + ``paper_raw_vector`` (+ the
  PCA transform, where a PCA over the file's signature group could be fitted).

Files: the real SD1.5 files in ``../shared/loras`` and a synthetic SDXL-size
LoRA written by this script (kohya LoCon naming, rank 32, fp16: every linear
and conv module of the UNet's down/mid/up blocks — attention, feed-forward,
resnets, samplers — and every attention/MLP linear of both text encoders).

Threads: one BLAS thread and one torch thread (``BENCH_THREADS``); torch is
loaded in this process (the read baseline needs it), so fp16 -> float32 casts
use its vectorised cast; the SDXL "numpy casts" row shows the torch-free path.

Every number is a median over ``--repeats`` runs; the stages of one file are
timed interleaved, so load from other processes hits them alike. The 'paired'
rows measure embed ÷ read once more in ``--pairs`` rounds that read and embed
each file back to back (read first in even rounds, embed first in odd ones),
apart from the other stages. Files are in the OS page cache (warm) for every
stage except the 'evicted' ones.

Run: ``python bench/embed_cost.py [--repeats 5] [--pairs 31] [--profile] [--write]``.
"""
from __future__ import annotations

import common  # noqa: F401,I001  (first: sets the BLAS thread count before numpy loads)

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import command_line, machine, md_table, median, set_torch_threads, shared_files, timed, timed_cpu, today, write_section

from lorasearch import embed as embed_module
from lorasearch import families, sketch, sketch_helper
from lorasearch.delta import LoraDelta
from lorasearch.embed import embed, view_vectors
from lorasearch.read_embed import load_and_embed
from lorasearch.families import load_table
from lorasearch.formats import base, diffusers, load_lora, peft, safetensors_file
from lorasearch.formats.safetensors_file import HASH_THREADS, SafetensorsFile
from lorasearch.paper import PaperModel, paper_raw_vector, paper_signature

TARGET_SD15 = 2.0
TARGET_SDXL = 1.3
_UNET_BLOCKS = re.compile(r"^unet\.(down_blocks|mid_block|up_blocks)\.")
_TE_LINEAR = re.compile(r"^text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.")


def read_tensors(path: Path) -> int:
    """The denominator: read and copy every tensor with safetensors' torch loader."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            n += f.get_tensor(k).clone().numel()
    return n


# Every per-process cache on the embed path: a fresh worker has none of them.
_CACHED = (
    families._lookup_all, families._variant_list, families._fits,
    diffusers.normalise_key, diffusers.is_diffusers_key, peft.strip_adapter_name, base._suffix_buckets,
    sketch._in_groups, sketch.module_groups, embed_module._group_members,
)


def clear_name_caches() -> None:
    """The module-name caches only (a naming layout the worker has not seen yet)."""
    for fn in _CACHED:
        fn.cache_clear()


def clear_caches() -> None:
    sketch.clear_caches()
    sketch_helper.clear_caches()
    clear_name_caches()


# -- synthetic SDXL ------------------------------------------------------------------------------

def sdxl_modules() -> dict[str, tuple[int, ...]]:
    """The SDXL modules a full kohya LoCon run adapts: canonical name -> weight shape."""
    out = {}
    for name, (shape, kind) in load_table("sdxl").items():
        if kind in ("linear", "conv") and (_UNET_BLOCKS.match(name) or _TE_LINEAR.match(name)):
            out[name] = tuple(shape)
    return out


def kohya_name(canonical: str) -> str:
    comp, path = canonical.split(".", 1)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp]
    return prefix + path.replace(".", "_")


def write_sdxl(folder: Path, rank: int = 32, seed: int = 0) -> Path:
    """Write the synthetic SDXL-size LoRA (fp16, kohya LoCon keys with alpha)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in sdxl_modules().items():
        key = kohya_name(name)
        out_dim, in_dim = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down_shape = (rank, in_dim, *kernel)
        up_shape = (out_dim, rank, *([1] * len(kernel)))
        fan_in = int(np.prod(down_shape[1:]))
        tensors[f"{key}.lora_down.weight"] = (rng.standard_normal(down_shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float16)
        tensors[f"{key}.lora_up.weight"] = (rng.standard_normal(up_shape, dtype=np.float32) * 1e-3).astype(np.float16)
        tensors[f"{key}.alpha"] = np.array(rank / 2, dtype=np.float16)
    path = folder / f"synthetic_sdxl_locon_r{rank}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                                           "ss_network_dim": str(rank), "ss_network_args": f'{{"conv_dim": {rank}}}'})
    return path


# -- timing --------------------------------------------------------------------------------------

def embed_file(path: Path) -> None:
    """What is timed as 'embed': file -> vectors, no hashes (an indexer worker's call without hashing)."""
    load_and_embed(path, hashes=False, keep_factors=False)


def hash_seconds(path: Path, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds of sha256 + AutoV3 over the bytes load_lora has already read."""
    with SafetensorsFile(path) as st:
        st._data_section()  # the read load_lora does anyway, not timed here
        return timed_cpu(lambda: st.hashes(threads))


def decode_all(path: Path) -> None:
    """Bytes -> float32 for every tensor, nothing else (the decode floor)."""
    with SafetensorsFile(path) as st:
        for k in st.keys():
            st.get(k)


def numpy_casts(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run as in a process without torch (the widening falls back to numpy)."""
    def run() -> Any:
        saved = safetensors_file._torch
        safetensors_file._torch = lambda: None
        try:
            return fn()
        finally:
            safetensors_file._torch = saved
    return run


def evict(path: Path) -> None:
    """Drop one file's pages from the OS page cache (posix_fadvise DONTNEED; other files untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def helper_cpu() -> float:
    """CPU seconds the sketch helper process has spent on jobs so far (0 without one)."""
    h = sketch_helper._helper
    return h.cpu_seconds if h is not None else 0.0


def helper_wait() -> float:
    """Seconds callers have spent waiting for the sketch helper's answers so far (0 without one)."""
    h = sketch_helper._helper
    return h.wait_seconds if h is not None else 0.0


def with_helper_cpu(fn: Callable[[], Any]) -> "SelfTimed":
    """A stage whose CPU time counts the sketch helper's CPU for the call too (both processes)."""
    def run() -> tuple[float, float]:
        h0 = helper_cpu()
        wall, cpu = timed_cpu(fn)
        return wall, cpu + helper_cpu() - h0
    return SelfTimed(run)


class SelfTimed:
    """A stage that measures itself (returns (wall, CPU) seconds of its own timed part)."""

    def __init__(self, fn: Callable[[], tuple[float, float]]) -> None:
        self.fn = fn

    def __call__(self) -> tuple[float, float]:
        return self.fn()


def stage_fns(path: Path, paper_model: PaperModel | None, sdxl: bool = False) -> dict[str, Callable[[], Any]]:
    """The timed stages of one file (each self-contained)."""
    ld_cache: dict[str, LoraDelta] = {"ld": load_lora(path, hashes=False)}

    def ours_cold() -> tuple[float, float]:
        clear_caches()
        took = with_helper_cpu(lambda: embed_file(path))()
        # untimed: this process's Gaussians for every module again (the helper process sketched
        # part of them just now), so the warm stages below find them
        sketch.sketch_lora(ld_cache["ld"])
        return took

    def ours_new_names() -> None:
        clear_name_caches()
        embed_file(path)

    def paper() -> None:
        v = paper_raw_vector(load_lora(path, hashes=False))
        if paper_model is not None:
            paper_model.transform(v)

    ld = ld_cache["ld"]
    sk = sketch.sketch_lora(ld)
    norms = sketch.sketch_norms(sk)

    # ours_cold comes before the warm stages: it clears the caches, then its own embed refills them
    fns: dict[str, Callable[[], Any]] = {
        "read": lambda: read_tensors(path),
        "ours_cold": SelfTimed(ours_cold),
        "ours_new_names": with_helper_cpu(ours_new_names),
        "load": lambda: load_lora(path, hashes=False),
        "decode": lambda: decode_all(path),
        "sketch_lora": lambda: sketch.sketch_lora(ld_cache["ld"]),
        "module_norms": lambda: sketch.module_norms(ld_cache["ld"]),
        "views": lambda: view_vectors(sk, norms, sketch.DEFAULT_DIM),
        "ours_warm": with_helper_cpu(lambda: embed_file(path)),
        "ours_alone": lambda: load_and_embed(path, hashes=False, keep_factors=False, helper=False),
        "ours_hashed": with_helper_cpu(lambda: load_and_embed(path, keep_factors=False)),
        "two_step": lambda: embed(load_lora(path, hashes=False)),
        "kept": with_helper_cpu(lambda: load_and_embed(path, hashes=False)),
        "hashes": SelfTimed(lambda: hash_seconds(path, 1)),
        "hashes_2t": SelfTimed(lambda: hash_seconds(path, 2)),
        "paper": paper,
        # the same file read from disk, not from the page cache (indicative: the VM's disk is cached by its host)
        "read_evicted": lambda: (evict(path), read_tensors(path)),
        "ours_warm_evicted": with_helper_cpu(lambda: (evict(path), embed_file(path))),
    }
    if sdxl:
        fns["ours_numpy"] = numpy_casts(lambda: load_and_embed(path, hashes=False, keep_factors=False, helper=False))
    return fns


def time_file(path: Path, repeats: int, paper_model: PaperModel | None, sdxl: bool = False) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of every stage of one file, stages interleaved within each repeat.

    Returns:
        {"wall": {stage: median s}, "cpu": {stage: median s}, "best": {stage: fastest wall s}}.
    """
    fns = stage_fns(path, paper_model, sdxl)
    for fn in fns.values():  # warm-up: page cache, caches, imports, the allocator's huge pages
        fn()
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = fn() if isinstance(fn, SelfTimed) else timed_cpu(fn)
            wall[name].append(w)
            cpu[name].append(c)
    read_tensors(path)  # leave the file cached
    return {"wall": {k: median(v) for k, v in wall.items()}, "cpu": {k: median(v) for k, v in cpu.items()},
            "best": {k: min(v) for k, v in wall.items()}}


def paired(paths: list[Path], rounds: int) -> dict[str, float]:
    """A second measure of the headline ratio: read and embed of the same files, back to back.

    In the stage table every embed follows other, heavier stages (exact norms,
    hashing, PCA); here each round reads every file and embeds it (warm caches, the
    helper as in the table), read first in even rounds and embed first in odd ones.

    Returns:
        median and fastest summed wall seconds per round of "read" and "embed", and
        "ratio" (ratio of the medians) and "ratio_round" (median of per-round ratios);
        "helper_cpu" and "helper_wait": median seconds per round of the sketch helper's
        job CPU and of the caller's wait for its answers.
    """
    for p in paths:  # warm-up
        read_tensors(p)
        embed_file(p)
    reads: list[float] = []
    embeds: list[float] = []
    helper: list[tuple[float, float]] = []
    for i in range(rounds):
        r = e = 0.0
        h0 = (helper_cpu(), helper_wait())
        for p in paths:
            first, second = ((read_tensors, embed_file) if i % 2 == 0 else (embed_file, read_tensors))
            t0 = time.perf_counter()
            first(p)
            t1 = time.perf_counter()
            second(p)
            t2 = time.perf_counter()
            r += (t1 - t0) if first is read_tensors else (t2 - t1)
            e += (t2 - t1) if first is read_tensors else (t1 - t0)
        reads.append(r)
        embeds.append(e)
        helper.append((helper_cpu() - h0[0], helper_wait() - h0[1]))
    return {"read": median(reads), "embed": median(embeds), "read_best": min(reads), "embed_best": min(embeds),
            "ratio": median(embeds) / median(reads), "ratio_round": median([e / r for e, r in zip(embeds, reads)]),
            "helper_cpu": median([c for c, _ in helper]), "helper_wait": median([w for _, w in helper])}


def paired_row(label: str, pr: dict[str, float], rounds: int) -> list[Any]:
    return [label, f"embed (warm caches) ÷ read, paired: each file read and embedded back to back, {rounds} rounds",
            f"{pr['ratio']:.2f}", "", f"{pr['embed_best'] / pr['read_best']:.2f}", "", ""]


def paper_models(lds: list[LoraDelta]) -> dict[str, PaperModel]:
    """One PCA per signature group of at least two files (the paper's setting)."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for ld in lds:
        groups[paper_signature(ld)].append(paper_raw_vector(ld))
    return {sig: PaperModel.fit(vs) for sig, vs in groups.items() if len(vs) >= 2}


def profile(path: Path, cold: bool, top: int = 18) -> str:
    """cProfile of the embed (`embed_file`: load_and_embed without hashes) of one file (internal time)."""
    embed_file(path)
    pr = cProfile.Profile()
    if cold:
        clear_caches()
    pr.enable()
    embed_file(path)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _met(x: float, target: float) -> str:
    return "yes" if x <= target else "**no**"


def ratio_rows(label: str, t: dict[str, dict[str, float]], target: float, sdxl: bool = False) -> list[list[Any]]:
    """Ratios of median wall times, median CPU times and fastest wall times (the least disturbed run)."""
    specs: list[tuple[str | tuple[str, ...], str, str, float | None]] = [
        ("ours_warm", "read", "**embed** (warm caches) ÷ read", target),
        ("ours_alone", "read", "embed (warm), one process: no sketch helper ÷ read", None),
        ("ours_cold", "read", "embed (cold caches) ÷ read", None),
        ("ours_new_names", "read", "embed, module-name caches cold (Gaussians warm) ÷ read", None),
        ("ours_warm_evicted", "read_evicted", "embed (warm) ÷ read, file evicted from page cache", None),
        ("hashes", "read", f"hashing, sha256 + AutoV3 ({HASH_THREADS} thread) ÷ read", None),
        ("hashes_2t", "read", "hashing, 2 threads ÷ read", None),
        ("ours_hashed", "read", "embed + hashing (`load_and_embed(path, keep_factors=False)`) ÷ read", None),
        ("two_step", "read", "load_lora + embed, every float32 factor kept (`embed(load_lora(path, hashes=False))`) ÷ read", None),
        ("kept", "read", "embed, every float32 factor kept, streamed (the query's `load_and_embed(path, hashes=False)`) ÷ read", None),
        ("paper", "read", "paper ÷ read", None),
        ("ours_warm", "paper", "embed (warm) ÷ paper", None),
        ("load", "read", "load_lora alone (no hashes) ÷ read", None),
    ]
    if sdxl:
        specs.insert(3, ("ours_numpy", "read", "embed (warm), one process, numpy casts (no torch in the process) ÷ read", None))
        specs.append(("decode", "read", "decode floor: bytes -> float32 of every tensor ÷ read", None))
        specs.append((("decode", "sketch_lora"), "read", "decode + sketch of the decoded factors ÷ read", None))
        specs.append(("module_norms", "read", "exact module norms (no longer part of embed) ÷ read", None))
    rows = []
    for num, den, name, tgt in specs:
        nums = (num,) if isinstance(num, str) else num
        w, c, b = (sum(t[m][n] for n in nums) / t[m][den] for m in ("wall", "cpu", "best"))
        rows.append([label, name, f"{w:.2f}", f"{c:.2f}", f"{b:.2f}", f"≤ {tgt}" if tgt else "",
                     _met(w, tgt) if tgt else ""])
    return rows


def split_row(label: str, t: dict[str, float]) -> list[Any]:
    ms = {k: v * 1e3 for k, v in t.items()}
    return [label, f"{ms['read']:.1f}", f"{ms['load']:.1f}", f"{ms['sketch_lora']:.1f}", f"{ms['module_norms']:.1f}",
            f"{ms['views']:.1f}",
            f"{ms['ours_warm']:.1f}", f"{ms['ours_cold']:.1f}", f"{ms['hashes']:.1f}", f"{ms['hashes_2t']:.1f}",
            f"{ms['paper']:.1f}", f"{ms['read_evicted']:.1f}", f"{ms['ours_warm_evicted']:.1f}"]


SPLIT_HEADERS = ["file", "read", "load_lora (no hashes)", "sketch_lora (warm)", "exact module_norms (not in embed)", "6 view vectors",
                 "embed warm", "embed cold", "hashing 1 thread", "hashing 2 threads", "paper", "read (evicted)",
                 "embed (evicted)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdxl-repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=31, help="rounds of the paired read/embed measurement (a second measure of embed ÷ read)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the synthetic SDXL file (default: a temp dir)")
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print cProfile of the SDXL embed (cold and warm)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/BENCHMARKS.md")
    args = ap.parse_args()
    set_torch_threads()

    files = shared_files("sd15")
    models = paper_models([ld for _, ld in files])
    per_file = [time_file(p, args.repeats, models.get(paper_signature(ld))) for p, ld in files]
    tot = {m: {k: sum(t[m][k] for t in per_file) for k in per_file[0][m]} for m in ("wall", "cpu", "best")}
    file_ratios = np.array([t["wall"]["ours_warm"] / t["wall"]["read"] for t in per_file])
    sd15_label = f"SD1.5 ({len(files)} real files, summed)"
    rows = ratio_rows(sd15_label, tot, TARGET_SD15)
    rows.insert(1, paired_row(sd15_label, paired([p for p, _ in files], args.pairs), args.pairs))
    splits = [split_row(f"SD1.5, sum of {len(files)} files", tot["wall"]),
              split_row("SD1.5, median file", {k: median(t["wall"][k] for t in per_file) for k in tot["wall"]})]
    info = [f"SD1.5 per-file embed (warm) ÷ read, wall: median {np.median(file_ratios):.2f}, "
            f"min {file_ratios.min():.2f}, max {file_ratios.max():.2f}; "
            f"{len(models)} paper signature group(s) with a fitted PCA."]
    profiles = []
    if not args.skip_sdxl:
        tmp = Path(tempfile.mkdtemp(prefix="lorasearch-bench-", dir=args.tmp))
        try:
            t_write, sdxl = timed(lambda: write_sdxl(tmp, args.rank))
            fd = os.open(sdxl, os.O_RDONLY)
            os.fsync(fd)  # clean pages, so that evict() can drop them
            os.close(fd)
            ld = load_lora(sdxl, hashes=False)
            params = sum(d.rank * sum(d.matrix_shape) for d in ld.weight_modules().values())
            cache = sum(sketch.DEFAULT_K * sum(d.matrix_shape) * 4 for d in ld.weight_modules().values())
            info.append(
                f"Synthetic SDXL LoCon: {len(ld.modules)} modules (family `{ld.family}`), rank {args.rank}, fp16, "
                f"{sdxl.stat().st_size / 2**20:.0f} MiB, {params / 1e6:.1f} M factor parameters (written in "
                f"{t_write:.1f} s). Its paper view is flatten only: a 128-component PCA over {params / 1e6:.0f} M-long "
                f"vectors needs a 128 × {params / 1e6:.0f} M matrix ({128 * params * 4 / 2**30:.0f} GiB in float32). "
                f"The warm Gaussian cache for these modules holds {cache / 2**20:.0f} MiB (k = {sketch.DEFAULT_K}).")
            del ld
            if not sketch_helper.wait_ready():
                print("warning: no sketch helper process: the SDXL rows are one process only")
            t = time_file(sdxl, args.sdxl_repeats, None, sdxl=True)
            pr = paired([sdxl], args.pairs)
            sdxl_rows = ratio_rows("SDXL-size (synthetic)", t, TARGET_SDXL, sdxl=True)
            rows += [sdxl_rows[0], paired_row("SDXL-size (synthetic)", pr, args.pairs), *sdxl_rows[1:]]
            info.append(f"SDXL-size, paired rounds: read {pr['read'] * 1e3:.1f} ms, embed {pr['embed'] * 1e3:.1f} ms "
                        f"(medians; fastest {pr['read_best'] * 1e3:.1f} / {pr['embed_best'] * 1e3:.1f} ms); median "
                        f"of the per-round ratios {pr['ratio_round']:.2f}; per embed the sketch helper's job took "
                        f"{pr['helper_cpu'] * 1e3:.1f} ms of CPU and the caller waited {pr['helper_wait'] * 1e3:.1f} ms "
                        f"for its answer (medians).")
            splits.append(split_row("SDXL-size", t["wall"]))
            if args.profile:
                for cold in (False, True):
                    profiles.append(f"cProfile, SDXL embed, {'cold' if cold else 'warm'} caches:\n\n"
                                    + profile(sdxl, cold))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    body = "\n\n".join([
        "## Embedding cost (`bench/embed_cost.py`)",
        f"Command: `{command_line()}`  \nMachine: {machine()}  \nDate: {today()}",
        f"k = {sketch.DEFAULT_K}, D = {sketch.DEFAULT_DIM}. Medians over {args.repeats} repeats (SDXL: "
        f"{args.sdxl_repeats}), stages interleaved; ratios of median wall times, of median process CPU times and "
        "of each stage's fastest run (the one least disturbed by other jobs on a shared machine). The 'paired' "
        f"rows measure the same ratio apart from the other stages: {args.pairs} rounds, each reading and embedding "
        "every file back to back (read first in even rounds, embed first in odd ones); ratio of the median round "
        "times ('best run' = fastest rounds). Files in the OS page cache unless 'evicted'. "
        "**embed** = everything from file to vectors, without hashing: "
        "`load_and_embed(path, hashes=False, keep_factors=False)` (header checks, one read, reader + family "
        "resolution, each 16-bit factor widened to float32 right before its sketch, sketches, 6 view vectors; "
        "exact module norms are not part of it since `SKETCH_VERSION` 2). *warm* = the "
        "per-process caches filled (Gaussian test matrices, fold buckets, module-name lookups: a worker's steady "
        "state), *cold* = all of them cleared before every call. Hashing (sha256 + AutoV3, the file's identity) is "
        "timed on its own over the bytes already read. On this 2-core machine the SDXL-size file's embed shares "
        "its modules with the sketch helper process (`lorasearch/sketch_helper.py`; 'one process' rows: without "
        "it); the CPU column of those rows adds the helper's CPU time. "
        "'paper' = `load_lora` + flattened factors + PCA transform; "
        "'read' = safetensors `get_tensor().clone()` of every tensor. Threads: "
        f"{common.BENCH_THREADS} BLAS, {common.BENCH_THREADS} torch, {HASH_THREADS} hashing unless a row says 2; "
        "torch is loaded here (for the read), so fp16 casts use its vectorised cast.",
        md_table(["files", "ratio", "wall", "CPU", "wall, best run", "target", "met (wall)"], rows),
        *info,
        "Where the time goes (wall ms):",
        md_table(SPLIT_HEADERS, splits),
    ])
    for p in profiles:
        print(p)
    print(body)
    if args.write:
        write_section("embed_cost", body)


if __name__ == "__main__":
    main()
