"""Embedding cost: time to embed a LoRA file ÷ time to just read its tensors.

- **read** (the denominator): ``safetensors.safe_open(path, framework="pt")``,
  ``get_tensor(k).clone()`` for every key.
- **ours**: ``load_lora(path)`` (header validation, decode, family resolution,
  sha256 + AutoV3) + ``lorasearch.embed.embed(ld)`` (module sketches, exact
  module norms, the delta/style/group view vectors), with the Gaussian test
  matrices cached (*warm*: the indexer's steady state, one process embedding
  many LoRAs of one family) and with the caches cleared before every call
  (*cold*: the first LoRA of a family in a fresh worker).
- **paper**: ``load_lora(path)`` + ``paper_raw_vector`` (+ the PCA transform,
  where a PCA over the file's signature group could be fitted).

Files: the real SD1.5 files in ``../shared/loras`` and a synthetic SDXL-size
LoRA written by this script (kohya LoCon naming, rank 32, fp16: every linear
and conv module of the UNet's down/mid/up blocks — attention, feed-forward,
resnets, samplers — and every attention/MLP linear of both text encoders).

Every number is a median over ``--repeats`` runs; the stages of one file are
timed interleaved, so load from other processes hits them alike. Files are in
the OS page cache (warm) for every stage; nothing drops caches.

Run: ``python bench/embed_cost.py [--repeats 5] [--profile] [--write]``.
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
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import command_line, machine, md_table, median, set_torch_threads, shared_files, timed, timed_cpu, today, write_section

from lorasearch import sketch
from lorasearch.delta import LoraDelta
from lorasearch.embed import embed, view_vectors
from lorasearch.families import load_table
from lorasearch.formats import load_lora
from lorasearch.formats.safetensors_file import SafetensorsFile
from lorasearch.hashes import file_hashes
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


def clear_caches() -> None:
    sketch.gaussian.cache_clear()
    sketch._buckets.cache_clear()


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

def header_len(path: Path) -> int:
    with SafetensorsFile(path) as st:
        return st.header_len


def evict(path: Path) -> None:
    """Drop one file's pages from the OS page cache (posix_fadvise DONTNEED; other files untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stage_fns(path: Path, paper_model: PaperModel | None) -> dict[str, Callable[[], Any]]:
    """The timed stages of one file (each self-contained)."""
    ld_cache: dict[str, LoraDelta] = {"ld": load_lora(path)}
    hl = header_len(path)

    def ours_warm() -> None:
        embed(load_lora(path))

    def ours_cold() -> None:
        clear_caches()
        embed(load_lora(path))

    def paper() -> None:
        v = paper_raw_vector(load_lora(path))
        if paper_model is not None:
            paper_model.transform(v)

    def views() -> None:
        ld = ld_cache["ld"]
        sk = sketch.sketch_lora(ld)
        nm = sketch.module_norms(ld)
        view_vectors(sk, {n: nm.get(n, 0.0) for n in sk}, sketch.DEFAULT_DIM)

    # ours_cold comes before the warm stages: it clears the caches, then its own embed refills them
    return {
        "read": lambda: read_tensors(path),
        "load_lora": lambda: load_lora(path),
        "hashes": lambda: file_hashes(path, hl),
        "ours_cold": ours_cold,
        "sketch_lora": lambda: sketch.sketch_lora(ld_cache["ld"]),
        "module_norms": lambda: sketch.module_norms(ld_cache["ld"]),
        "sketch+norms+views": views,
        "ours_warm": ours_warm,
        "paper": paper,
        # the same file read from disk, not from the page cache (indicative: the VM's disk is cached by its host)
        "read_evicted": lambda: (evict(path), read_tensors(path)),
        "ours_warm_evicted": lambda: (evict(path), ours_warm()),
    }


def time_file(path: Path, repeats: int, paper_model: PaperModel | None) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of every stage of one file, stages interleaved within each repeat.

    Returns:
        {"wall": {stage: s}, "cpu": {stage: s}}.
    """
    fns = stage_fns(path, paper_model)
    for fn in fns.values():  # warm-up: page cache, Gaussian caches, imports
        fn()
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = timed_cpu(fn)
            wall[name].append(w)
            cpu[name].append(c)
    read_tensors(path)  # leave the file cached
    return {"wall": {k: median(v) for k, v in wall.items()}, "cpu": {k: median(v) for k, v in cpu.items()}}


def paper_models(lds: list[LoraDelta]) -> dict[str, PaperModel]:
    """One PCA per signature group of at least two files (the paper's setting)."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for ld in lds:
        groups[paper_signature(ld)].append(paper_raw_vector(ld))
    return {sig: PaperModel.fit(vs) for sig, vs in groups.items() if len(vs) >= 2}


def profile(path: Path, cold: bool, top: int = 18) -> str:
    """cProfile of load_lora + embed on one file (internal time)."""
    embed(load_lora(path))
    pr = cProfile.Profile()
    if cold:
        clear_caches()
    pr.enable()
    embed(load_lora(path))
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _met(x: float, target: float) -> str:
    return "yes" if x <= target else "**no**"


def ratio_rows(label: str, t: dict[str, dict[str, float]], target: float) -> list[list[Any]]:
    """Ratios by wall time and by CPU time."""
    rows = []
    for num, den, name, tgt in [
        ("ours_warm", "read", "ours (warm cache) ÷ read", target),
        ("ours_cold", "read", "ours (cold cache) ÷ read", target),
        ("ours_warm_evicted", "read_evicted", "ours (warm) ÷ read, file evicted from page cache", target),
        ("paper", "read", "paper ÷ read", None),
        ("ours_warm", "paper", "ours (warm) ÷ paper", None),
        ("load_lora", "read", "load_lora alone ÷ read", None),
    ]:
        w = t["wall"][num] / t["wall"][den]
        c = t["cpu"][num] / t["cpu"][den]
        rows.append([label, name, f"{w:.2f}", f"{c:.2f}", f"≤ {tgt}" if tgt else "", _met(w, tgt) if tgt else ""])
    return rows


def split_row(label: str, t: dict[str, float]) -> list[Any]:
    ms = {k: v * 1e3 for k, v in t.items()}
    return [label, f"{ms['read']:.1f}", f"{ms['load_lora']:.1f}", f"{ms['hashes']:.1f}",
            f"{ms['load_lora'] - ms['hashes']:.1f}", f"{ms['sketch_lora']:.1f}", f"{ms['module_norms']:.1f}",
            f"{ms['sketch+norms+views'] - ms['sketch_lora'] - ms['module_norms']:.1f}",
            f"{ms['ours_warm']:.1f}", f"{ms['ours_cold']:.1f}", f"{ms['paper']:.1f}",
            f"{ms['read_evicted']:.1f}", f"{ms['ours_warm_evicted']:.1f}"]


SPLIT_HEADERS = ["file", "read", "load_lora", "↳ sha256+AutoV3", "↳ decode+resolve", "sketch_lora (warm)",
                 "module_norms", "fold 6 views", "ours warm", "ours cold", "paper", "read (evicted)", "ours (evicted)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdxl-repeats", type=int, default=5)
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
    tot = {m: {k: sum(t[m][k] for t in per_file) for k in per_file[0][m]} for m in ("wall", "cpu")}
    file_ratios = np.array([t["wall"]["ours_warm"] / t["wall"]["read"] for t in per_file])
    rows = ratio_rows(f"SD1.5 ({len(files)} real files, summed)", tot, TARGET_SD15)
    splits = [split_row(f"SD1.5, sum of {len(files)} files", tot["wall"]),
              split_row("SD1.5, median file", {k: median(t["wall"][k] for t in per_file) for k in tot["wall"]})]
    info = [f"SD1.5 per-file ours (warm) ÷ read, wall: median {np.median(file_ratios):.2f}, "
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
            ld = load_lora(sdxl)
            params = sum(d.rank * sum(d.matrix_shape) for d in ld.weight_modules().values())
            cache = sum(sketch.DEFAULT_K * sum(d.matrix_shape) * 4 for d in ld.weight_modules().values())
            info.append(
                f"Synthetic SDXL LoCon: {len(ld.modules)} modules (family `{ld.family}`), rank {args.rank}, fp16, "
                f"{sdxl.stat().st_size / 2**20:.0f} MiB, {params / 1e6:.1f} M factor parameters (written in "
                f"{t_write:.1f} s). Its paper view is flatten only: a 128-component PCA over {params / 1e6:.0f} M-long "
                f"vectors needs a 128 × {params / 1e6:.0f} M matrix ({128 * params * 4 / 2**30:.0f} GiB in float32). "
                f"The warm Gaussian cache for these modules holds {cache / 2**20:.0f} MiB (k = {sketch.DEFAULT_K}).")
            del ld
            t = time_file(sdxl, args.sdxl_repeats, None)
            rows += ratio_rows("SDXL-size (synthetic)", t, TARGET_SDXL)
            splits.append(split_row("SDXL-size", t["wall"]))
            if args.profile:
                for cold in (False, True):
                    profiles.append(f"cProfile, SDXL load_lora + embed, {'cold' if cold else 'warm'} cache:\n\n"
                                    + profile(sdxl, cold))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    body = "\n\n".join([
        "## Embedding cost (`bench/embed_cost.py`)",
        f"Command: `{command_line()}`  \nMachine: {machine()}  \nDate: {today()}",
        f"k = {sketch.DEFAULT_K}, D = {sketch.DEFAULT_DIM}. Medians over {args.repeats} repeats (SDXL: "
        f"{args.sdxl_repeats}), stages interleaved. Files in the OS page cache unless 'evicted'. *warm* = Gaussian "
        "test matrices cached (a worker's steady state), *cold* = caches cleared before every call. "
        "'ours' = `load_lora` + `embed` (sketches, exact norms, 6 view vectors); 'paper' = `load_lora` + "
        "flattened factors + PCA transform; 'read' = safetensors `get_tensor().clone()` of every tensor.",
        md_table(["files", "ratio", "wall", "CPU", "target", "met (wall)"], rows),
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
