"""Building a zoo folder: base model, every LoRA (resumable, atomic), labels.csv, README.md.

Layout of ``DIR``::

    model/                     base UNet (safetensors), text encoder, scheduler
    loras/<genre>/<style>/     one LoRA per spec: a PEFT folder or a .safetensors file
    images/train/<stem>/       PNGs the LoRA was trained on (the first of its subset)
    images/generated/<stem>/   PNGs of base + LoRA on fixed prompts and noise
    labels.csv                 one row per finished LoRA
    zoo.json, .rows/           settings, run log and per-LoRA completion records
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lorasearch.zoo import model as zmodel
from lorasearch.zoo import render, writers
from lorasearch.zoo.styles import GENRES, Style, select_styles
from lorasearch.zoo.train import QUICK, LoraSpec, Settings, style_pool, train_lora, zoo_specs

LABEL_FIELDS = ["file", "genre", "style", "seed", "rank", "alpha", "steps", "lr", "format", "subset",
                "train_images", "generated_images"]
GEN_SEED = 0  # the sampling noise of every LoRA's generated images (the LoRA is the only difference)
ROWS = ".rows"


def settings_for(quick: bool) -> Settings:
    """The test-sized or the default sizes."""
    return QUICK if quick else Settings()


def _unet_config(s: Settings) -> dict[str, Any]:
    return dict(s.unet_config) if s.unet_config else dict(zmodel.UNET_CONFIG)


def _save_pngs(images: np.ndarray, folder: Path) -> None:
    """uint8 (N, H, W, 3) -> ``folder/00.png ...``, written under a temporary name then renamed."""
    from PIL import Image

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp / f"{i:02d}.png", optimize=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Worker:
    """Holds the base model, text encoder and content pool; trains and writes LoRAs."""

    def __init__(self, out: Path, seed: int, s: Settings) -> None:
        from safetensors.torch import load_file

        torch.set_num_threads(1)  # tiny steps: intra-op threads only add overhead on 2 cores
        self.out, self.s = out, s
        self.config = _unet_config(s)
        self.base = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
        self.text = zmodel.TextEncoder.load(out / "model" / zmodel.TEXT_FILE)
        pool = render.content_pool(s.pool, seed=seed + 11)
        self.cond = self.text([c.caption for c in pool])
        self.pool = pool
        self.styles = {st.key: st for sts in GENRES.values() for st in sts}
        self._cache: tuple[str, torch.Tensor, np.ndarray] | None = None
        self._gen_base: Any = None

    def styled(self, style: Style) -> tuple[torch.Tensor, np.ndarray]:
        """The style's pool as a training tensor and as uint8 images (cached for the last style)."""
        if self._cache is None or self._cache[0] != style.key:
            imgs = style_pool(style, self.pool)
            self._cache = (style.key, zmodel.to_tensor(imgs), (imgs * 255).round().astype(np.uint8))
        return self._cache[1], self._cache[2]

    def make(self, spec: LoraSpec) -> dict[str, Any]:
        """Train, write the LoRA and its images, then the completion record (last, so resume is safe)."""
        x, u8 = self.styled(self.styles[f"{spec.genre}/{spec.style}"])
        res = train_lora(spec, self.base, x, self.cond, self.config, self.s.batch)
        folder = self.out / "loras" / spec.genre / spec.style
        folder.mkdir(parents=True, exist_ok=True)
        path = writers.write(spec.format, res.trained, writers.lora_path(folder, spec.stem, spec.format),
                             spec.rank, spec.alpha)
        train_dir = self.out / "images" / "train" / spec.stem
        gen_dir = self.out / "images" / "generated" / spec.stem
        _save_pngs(u8[res.train_idx[: self.s.n_images]], train_dir)
        _save_pngs(self.generated(path), gen_dir)
        row = dict(asdict(spec), file=path.relative_to(self.out).as_posix(),
                   train_images=train_dir.relative_to(self.out).as_posix(),
                   generated_images=gen_dir.relative_to(self.out).as_posix(),
                   generated_with=gen_tag(self.s), seconds=round(res.seconds, 2),
                   loss_first=round(float(np.mean(res.losses[:10])), 5),
                   loss_last=round(float(np.mean(res.losses[-10:])), 5))
        self.record(spec, row)
        return row

    def record(self, spec: LoraSpec, row: dict[str, Any]) -> None:
        """Write the completion record (atomically)."""
        rows = self.out / ROWS
        rows.mkdir(exist_ok=True)
        _atomic_text(rows / f"{spec.stem}.json", json.dumps(row, indent=1))

    def generated(self, lora: Path) -> np.ndarray:
        """Base + the LoRA read back from its file: image-to-image from the fixed content (uint8)."""
        if self._gen_base is None:
            self._gen_base = zmodel.make_unet(0, self.config)
            self._gen_base.load_state_dict(self.base)
            self._gen_base.eval()
        unet = copy.deepcopy(self._gen_base)
        zmodel.merge(unet, zmodel.lora_updates(lora))
        init, prompts = zmodel.eval_content(self.s.n_images)
        return zmodel.sample(unet, self.text, prompts, GEN_SEED, self.s.gen_steps, init, zmodel.GEN_STRENGTH)

    def refresh_generated(self, spec: LoraSpec, row: dict[str, Any]) -> None:
        """Re-render a finished LoRA's generated images made with other settings, then its record."""
        _save_pngs(self.generated(self.out / row["file"]), self.out / row["generated_images"])
        self.record(spec, dict(row, generated_with=gen_tag(self.s)))


_WORKER: Worker | None = None


def gen_tag(s: Settings) -> str:
    """How generated images are made (a record made otherwise is re-rendered on resume)."""
    return f"img2img strength {zmodel.GEN_STRENGTH} ddim {s.gen_steps} seed {GEN_SEED} from file"


def _init_worker(out: str, seed: int, s: Settings) -> None:
    global _WORKER
    _WORKER = Worker(Path(out), seed, s)


def _make(spec: LoraSpec) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.make(spec)


def done_row(out: Path, spec: LoraSpec) -> dict[str, Any] | None:
    """The completion record of ``spec`` when its LoRA and images all exist, else None."""
    rec = out / ROWS / f"{spec.stem}.json"
    if not rec.exists():
        return None
    row = json.loads(rec.read_text())
    ok = all((out / row[k]).exists() for k in ("file", "train_images", "generated_images"))
    return row if ok else None


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_labels(out: Path, specs: list[LoraSpec]) -> int:
    """Rewrite ``labels.csv`` from the finished LoRAs (spec order). Returns the row count."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LABEL_FIELDS)
    n = 0
    for spec in specs:
        row = done_row(out, spec)
        if row is not None:
            w.writerow([_fmt(row[k]) for k in LABEL_FIELDS])
            n += 1
    _atomic_text(out / "labels.csv", buf.getvalue())
    return n


def _check_settings(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Load ``zoo.json`` (or start it); a resumed zoo must keep its settings."""
    path = out / "zoo.json"
    if path.exists():
        state = json.loads(path.read_text())
        # Zoos from before paper_per_style had one; changing it only adds or leaves out paper LoRAs.
        old = dict(state["params"], paper_per_style=params["paper_per_style"])
        if old != params:
            raise ValueError(f"{out} holds a zoo built with {state['params']}; use another --out or the same options")
        state["params"] = params
        return state
    return {"params": params, "runs": []}


def build_zoo(out: Path, genres: int = 5, styles_per_genre: int = 4, loras_per_style: int = 5, seed: int = 0,
              paper: bool = True, quick: bool = False, workers: int = 1, command: str = "",
              paper_per_style: int = 2,
              progress: Callable[[int, int, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or resume) a zoo in ``out``.

    Args:
        out: the zoo folder.
        genres: number of genres (first in ``styles.GENRES`` order).
        styles_per_genre: styles per genre.
        loras_per_style: mixed-collection LoRAs per style.
        seed: the zoo seed (base model, content pool, every LoRA seed).
        paper: also build the paper-setting subset.
        paper_per_style: paper-setting LoRAs per style (one seed; they differ in training images).
        quick: the seconds-long test sizes (tiny UNet, a few steps).
        workers: processes training LoRAs in parallel.
        command: the command line, recorded in README.md.
        progress: called as (done, total, stem) after each LoRA.
        log: messages (pretraining).

    Returns:
        summary: total, built, skipped, seconds, out.
    """
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    s = settings_for(quick)
    params = dict(genres=genres, styles_per_genre=styles_per_genre, loras_per_style=loras_per_style, seed=seed,
                  paper=paper, quick=quick, paper_per_style=paper_per_style)
    state = _check_settings(out, params)
    _atomic_text(out / "zoo.json", json.dumps(state, indent=1))
    styles = select_styles(genres, styles_per_genre)
    specs = zoo_specs(styles, loras_per_style, seed, paper, s, paper_per_style)
    if not (out / "model" / "zoo_model.json").exists():
        zmodel.pretrain(out / "model", seed=seed, pool_size=s.pretrain_pool, steps=s.pretrain_steps,
                        batch=s.pretrain_batch, config=_unet_config(s), log=log)
    todo = [sp for sp in specs if done_row(out, sp) is None]
    finished = len(specs) - len(todo)
    if progress:
        progress(finished, len(specs), "")
    for spec_done in _run(out, seed, s, todo, workers):
        finished += 1
        write_labels(out, specs)
        if progress:
            progress(finished, len(specs), spec_done)
    _refresh(out, seed, s, specs, log)
    n = write_labels(out, specs)
    seconds = round(time.time() - start, 1)
    state["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "seconds": seconds,
                          "built": len(todo), "workers": workers, "command": command})
    _atomic_text(out / "zoo.json", json.dumps(state, indent=1))
    write_readme(out, state, specs, n)
    return {"out": str(out), "total": len(specs), "built": len(todo), "skipped": len(specs) - len(todo),
            "rows": n, "seconds": seconds}


def _run(out: Path, seed: int, s: Settings, todo: list[LoraSpec], workers: int) -> Iterator[str]:
    """Build ``todo`` inline or in worker processes; yields each finished stem."""
    if not todo:
        return
    if workers <= 1:
        threads = torch.get_num_threads()
        w = Worker(out, seed, s)
        try:
            for spec in todo:
                w.make(spec)
                yield spec.stem
        finally:
            torch.set_num_threads(threads)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(str(out), seed, s)) as ex:
        for row in ex.map(_make, todo):
            yield f"{row['genre']}-{row['style']}"


def _refresh(out: Path, seed: int, s: Settings, specs: list[LoraSpec], log: Callable[[str], None] | None) -> None:
    """Re-render generated images of finished LoRAs whose record names other generation settings."""
    stale = [(sp, row) for sp in specs if (row := done_row(out, sp)) is not None
             and row.get("generated_with") != gen_tag(s)]
    if not stale:
        return
    if log:
        log(f"re-rendering generated images of {len(stale)} LoRA(s) ({gen_tag(s)})")
    threads = torch.get_num_threads()
    w = Worker(out, seed, s)
    try:
        for sp, row in stale:
            w.refresh_generated(sp, row)
    finally:
        torch.set_num_threads(threads)


def _mean_seconds(out: Path, specs: list[LoraSpec]) -> float:
    """Mean training seconds of the finished LoRAs."""
    secs = [row["seconds"] for sp in specs if (row := done_row(out, sp)) is not None]
    return float(np.mean(secs)) if secs else 0.0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_readme(out: Path, state: dict[str, Any], specs: list[LoraSpec], n: int) -> None:
    """README.md: what the zoo is, how it was made and how long it took."""
    p = state["params"]
    runs = state["runs"]
    wall = sum(r["seconds"] for r in runs)
    cmd = next((r["command"] for r in runs if r["command"]), "")
    styles = select_styles(p["genres"], p["styles_per_genre"])
    genre_lines = "\n".join(
        f"- **{g}**: " + ", ".join(f"`{st.name}` {st.params}" for st in styles if st.genre == g)
        for g in dict.fromkeys(st.genre for st in styles))
    s = settings_for(p["quick"])
    text = f"""# LoRA style zoo

A labelled LoRA collection made by `lorasearch zoo` from nothing but packages
(issue 7). {n} of {len(specs)} LoRAs finished; {_dir_bytes(out) / 1e6:.1f} MB on disk.

## Made with

```
{cmd or 'lorasearch zoo --out ' + str(out)}
```

Settings: `{json.dumps(p)}`. Wall time: **{wall / 60:.1f} min** over {len(runs)} run(s)
({', '.join(f"{r['seconds']:.0f} s, {r['built']} LoRAs, {r['workers']} worker(s)" for r in runs)}),
on the machine that ran it (2 shared CPU cores, one thread per worker; training alone took
{_mean_seconds(out, specs):.0f} s per LoRA on average, wall clock under the load of the day).

## Contents

- `model/`: the base model, a diffusers `UNet2DConditionModel` on 32x32 RGB pixels (no VAE)
  with config `model/unet/config.json`, conditioned on a fixed seeded word-embedding table
  over a small vocabulary (`model/text_encoder.safetensors`, `model/vocab.json`), pre-trained
  ({s.pretrain_steps} steps, batch {s.pretrain_batch}) with the DDPM epsilon objective on
  {s.pretrain_pool} procedurally rendered, captioned images (shapes, stripes, checkers,
  gradients, landscapes, crops of scikit-learn's sample photos). Sample with
  `lorasearch.zoo.generate("<this folder>/model", lora_path, n, seed)`.
- `loras/<genre>/<style>/`: the LoRAs. Targets: attention (`to_q/k/v/out.0`) and feed-forward
  (`ff.net.0.proj`, `ff.net.2`) of every transformer block; fp16 tensors.
- `images/train/<stem>/`: {s.n_images} of the styled images each LoRA was trained on;
  `images/generated/<stem>/`: {s.n_images} images of base + LoRA (the LoRA file read back
  by `lorasearch` and merged into the weights): image-to-image (SDEdit) from the same
  {s.n_images} unstyled content images and captions for every LoRA, strength
  {zmodel.GEN_STRENGTH}, DDIM {s.gen_steps} steps, noise seed {GEN_SEED}, so the LoRA is the
  only difference. (Text-to-image from pure noise gives noise textures: the base is tiny and
  briefly trained; `lorasearch.zoo.generate(..., init=None)` still does it.)
- `labels.csv`: `{','.join(LABEL_FIELDS)}`; paths relative to this folder.

## Styles (genre: styles with their parameters)

{genre_lines}

Each style is the genre's deterministic transform applied to one shared pool of
{s.pool} content images. Palettes are easy for image statistics; hatching, ink and
dithering keep the content's colours and differ only in stroke direction, line
weight or threshold pattern.

## Randomness

`subset=mixed`: each LoRA's seed is `sha256(zoo seed|genre|style|index)`, and it drives
everything random in its run: its rank (4/8/16; LoHa 2/4/8), alpha (rank x 0.5/1/2),
steps ({'/'.join(map(str, s.steps))}), learning rate (log-uniform 1e-3..4e-3), training
subset size ({'/'.join(map(str, s.n_train))} of the pool), factor init, subset, batches,
noise and timesteps. Formats rotate over peft (folder), diffusers, kohya (diffusers'
`convert_state_dict_to_kohya`), LyCORIS LoHa and LoKr (`lycoris-lora`), so each style
has one LoRA of every format when there are 5 per style.

`subset=paper`: {p.get("paper_per_style", 1)} LoRA(s) per style, all with ONE shared seed, rank
{PAPER_TEXT}: the paper's setting (arXiv 2412.12048), where the shared sampling sequence
(batch positions, noise, timesteps, factor init) is the same for every LoRA. LoRAs of one
style differ only in their training images (`-paper-`: the seed's own draw of 64 of the
pool; `-paperN-`: a draw seeded by N), as the paper's LoRAs of one artist do.
"""
    _atomic_text(out / "README.md", text)


PAPER_TEXT = "8, alpha 8, 80 steps, lr 2e-3, 64 training images and format peft"
