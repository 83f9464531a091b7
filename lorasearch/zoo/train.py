"""Zoo specs and per-LoRA training.

Each LoRA's seed is a hash of (zoo seed, genre, style, index), so no two LoRAs
share a random sequence, and that seed drives everything random in its run:
the hyper-parameters drawn for it, the factor initialisation, its training
subset, batches, noise and timesteps. The "paper" subset instead gives every
style a few LoRAs that share one seed, rank, format and hyper-parameters, and so
one stream of batches, noise and timesteps; they differ only in their training
images (the paper's LoRAs of one artist differ in the images alone).
"""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lorasearch.zoo import model as zmodel
from lorasearch.zoo import render, writers
from lorasearch.zoo.styles import Style

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
RANKS = (4, 8, 16)
PAPER = dict(rank=8, alpha=8.0, lr=2e-3, format="peft", n_train=64)  # steps: Settings.paper_steps
BATCH = 8


@dataclass(frozen=True)
class Settings:
    """Sizes that differ between the default zoo and the seconds-long test configuration."""

    pool: int = 256  # shared content images every style is applied to
    steps: tuple[int, ...] = (60, 80, 100)
    n_train: tuple[int, ...] = (48, 64, 96)
    paper_steps: int = 80
    gen_steps: int = 20
    n_images: int = 8  # training / generated images stored per LoRA
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_pool: int = 4096
    unet_config: tuple[tuple[str, Any], ...] | None = None
    batch: int = BATCH


QUICK = Settings(pool=16, steps=(2, 3), n_train=(6, 8), paper_steps=2, gen_steps=2, n_images=2,
                 pretrain_steps=2, pretrain_batch=2, pretrain_pool=8, batch=2,
                 unet_config=tuple(dict(zmodel.UNET_CONFIG, block_out_channels=(8, 8, 8),
                                        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                                        norm_num_groups=4).items()))


@dataclass(frozen=True)
class LoraSpec:
    """Everything that defines one zoo LoRA (a row of labels.csv)."""

    genre: str
    style: str
    index: int
    seed: int
    rank: int
    alpha: float
    steps: int
    lr: float
    format: str
    subset: str
    n_train: int

    @property
    def stem(self) -> str:
        """File stem, unique in the zoo."""
        if self.subset == "paper":
            tag = "paper" if self.index == 0 else f"paper{self.index}"
        else:
            tag = f"{self.index:02d}"
        return f"{self.genre}-{self.style}-{tag}-{self.format}"


def lora_seed(zoo_seed: int, genre: str, style: str, index: int | str) -> int:
    """A 31-bit seed from a hash of (zoo seed, genre, style, index): independent per LoRA."""
    digest = hashlib.sha256(f"{zoo_seed}|{genre}|{style}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def mixed_spec(zoo_seed: int, style: Style, style_pos: int, index: int, per_style: int, s: Settings) -> LoraSpec:
    """A LoRA of the mixed collection: hyper-parameters drawn from its own seed.

    The format rotates over the zoo (so each style sees every format when
    ``per_style >= 5``); everything else comes from the LoRA's seed.
    """
    seed = lora_seed(zoo_seed, style.genre, style.name, index)
    rng = np.random.default_rng(seed)
    fmt = writers.FORMATS[(style_pos * per_style + index) % len(writers.FORMATS)]
    rank = int(rng.choice(RANKS))
    if fmt == "loha":
        rank = max(2, rank // 2)  # LoHa's effective rank is dim^2 and it stores twice the factors
    alpha = float(rank * rng.choice([0.5, 1.0, 2.0]))
    return LoraSpec(style.genre, style.name, index, seed, rank, alpha, int(rng.choice(s.steps)),
                    float(np.round(10 ** rng.uniform(np.log10(1e-3), np.log10(4e-3)), 5)), fmt, "mixed",
                    int(rng.choice(s.n_train)))


def paper_spec(zoo_seed: int, style: Style, s: Settings, index: int = 0) -> LoraSpec:
    """A paper-setting LoRA of ``style``: one seed, rank, format and schedule shared by all styles.

    ``index`` picks the training images (see ``training_subset``); nothing else differs.
    """
    seed = lora_seed(zoo_seed, "paper", "paper", 0)
    return LoraSpec(style.genre, style.name, index, seed, int(PAPER["rank"]), float(PAPER["alpha"]), s.paper_steps,
                    float(PAPER["lr"]), str(PAPER["format"]), "paper", min(int(PAPER["n_train"]), s.pool))


def zoo_specs(styles: list[Style], per_style: int, zoo_seed: int, paper: bool, s: Settings,
              paper_per_style: int = 1) -> list[LoraSpec]:
    """All LoRAs of a zoo, mixed first (style-major), then the paper subset (index-major)."""
    specs = [mixed_spec(zoo_seed, st, pos, i, per_style, s) for pos, st in enumerate(styles) for i in range(per_style)]
    if paper:
        specs += [paper_spec(zoo_seed, st, s, i) for i in range(paper_per_style) for st in styles]
    return specs


def training_subset(spec: LoraSpec, pool: int, g: torch.Generator) -> torch.Tensor:
    """The LoRA's training images (indices into the pool); always advances ``g`` by one permutation.

    A paper-setting LoRA with index > 0 draws its images from its own generator,
    so it shares the batch/noise/timestep stream of ``g`` with the other
    paper-setting LoRAs but not their images.
    """
    subset = torch.randperm(pool, generator=g)[: spec.n_train]
    if spec.subset == "paper" and spec.index > 0:
        own = torch.Generator().manual_seed(lora_seed(spec.seed, spec.genre, spec.style, f"subset{spec.index}"))
        subset = torch.randperm(pool, generator=own)[: spec.n_train]
    return subset


def _adapter(unet: Any, spec: LoraSpec) -> tuple[Any, Any, list[torch.nn.Parameter]]:
    """Wrap ``unet`` with the spec's adapter; returns (denoiser to call, object to write, trainable params)."""
    torch.manual_seed(spec.seed)  # the factor init
    if spec.format in writers.LYCORIS_FORMATS:
        from lycoris import create_lycoris

        with writers.lycoris_targets(TARGETS):
            net = create_lycoris(unet, 1.0, linear_dim=spec.rank, linear_alpha=spec.alpha, algo=spec.format)
        net.apply_to()
        for p in unet.parameters():
            p.requires_grad_(False)
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        return unet, net, params
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(unet, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=TARGETS))
    return pm.base_model.model, pm, [p for p in pm.parameters() if p.requires_grad]


@dataclass
class TrainResult:
    """A trained LoRA, before writing."""

    trained: Any
    denoiser: Any
    train_idx: np.ndarray
    losses: list[float]
    seconds: float


def train_lora(spec: LoraSpec, base_state: dict[str, torch.Tensor], images: torch.Tensor, cond: torch.Tensor,
               unet_config: dict[str, Any] | None = None, batch: int = BATCH) -> TrainResult:
    """Train one LoRA on the styled pool.

    Args:
        spec: the LoRA.
        base_state: the base UNet's state dict (copied into a fresh UNet).
        images: (pool, 3, 32, 32) styled images in [-1, 1].
        cond: (pool, SEQ_LEN, EMBED_DIM) their caption conditioning.
        unet_config: the base UNet's config.
        batch: batch size.

    Returns:
        the TrainResult; ``train_idx`` is the LoRA's training subset of the pool.
    """
    start = time.time()
    unet = zmodel.make_unet(0, unet_config)
    unet.load_state_dict(base_state)
    unet.requires_grad_(False)
    denoiser, trained, params = _adapter(unet, spec)
    g = torch.Generator().manual_seed(spec.seed)
    subset = training_subset(spec, images.shape[0], g)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = zmodel.noise_scheduler()
    losses = []
    denoiser.train()
    for _ in range(spec.steps):
        idx = subset[torch.randint(0, len(subset), (batch,), generator=g)]
        loss = zmodel.diffusion_loss(denoiser, images[idx], cond[idx], sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    denoiser.eval()
    return TrainResult(trained, denoiser, subset.numpy(), losses, time.time() - start)


def spec_row(spec: LoraSpec) -> dict[str, Any]:
    """The spec as a plain dict (JSON-able)."""
    return asdict(spec)


def style_pool(style: Style, pool: list[render.Content]) -> np.ndarray:
    """The style applied to the shared content pool, float (N, 32, 32, 3)."""
    return np.stack([style(c.image) for c in pool])


def spec_from_row(row: Mapping[str, Any], zoo_seed: int = 0, s: Settings | None = None) -> LoraSpec:
    """The LoraSpec of a labels.csv row (``index`` and ``n_train`` re-derived from the LoRA's seed).

    Args:
        row: a labels.csv row (``file, genre, style, seed, rank, alpha, steps, lr, format, subset``).
        zoo_seed: the zoo seed (``zoo.json`` params).
        s: the zoo's Settings (default sizes when None).

    Returns:
        the spec the LoRA was trained from.
    """
    from lorasearch.zoo.styles import GENRES

    s = s or Settings()
    style = next(st for st in GENRES[row["genre"]] if st.name == row["style"])
    if row["subset"] == "paper":
        tag = Path(str(row["file"])).name.split("-")[-2]  # <genre>-<style>-paper[N]-<format>
        spec = paper_spec(zoo_seed, style, s, int(tag[len("paper"):] or 0))
    else:
        index = int(Path(str(row["file"])).name.split("-")[-2])  # <genre>-<style>-<NN>-<format>
        spec = replace(mixed_spec(zoo_seed, style, 0, index, 1, s), format=str(row["format"]))
        if spec.format == "loha":  # mixed_spec halved the rank only for the format it drew
            spec = replace(spec, rank=int(row["rank"]), alpha=float(row["alpha"]))
    if spec.seed != int(row["seed"]) or spec.steps != int(row["steps"]) or spec.rank != int(row["rank"]):
        raise ValueError(f"{row['file']}: labels row does not match the spec re-derived from its seed")
    return spec


def _load_factors(trained: Any, spec: LoraSpec, lora_file: Path) -> None:
    """Put a saved zoo LoRA's factors into a freshly wrapped adapter (same format, rank and alpha)."""
    if spec.format in writers.LYCORIS_FORMATS:
        state = trained.load_weights(str(lora_file))
        if state.get("missing keys"):
            raise ValueError(f"{lora_file}: missing {len(state['missing keys'])} LyCORIS tensors")
        return
    from lorasearch.formats import load_lora

    ld = load_lora(lora_file)
    scaling = spec.alpha / spec.rank  # peft's scale for this adapter
    n = 0
    for name, mod in trained.base_model.model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        d = ld.modules[f"diffusion_model.{name.replace('.', '_')}"]
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(torch.from_numpy(np.array(d.down, dtype=np.float32)))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(np.array(d.up, dtype=np.float32) * (d.scale / scaling)))
        n += 1
    if n != len(ld.modules):
        raise ValueError(f"{lora_file}: {len(ld.modules)} modules in the file, {n} adapted")


@dataclass(frozen=True)
class _ZooData:
    """What every continued run of one zoo folder shares."""

    root: str
    settings: Settings
    seed: int
    config: dict[str, Any]
    base: dict[str, torch.Tensor]
    pool: list[render.Content]
    cond: torch.Tensor


@functools.lru_cache(maxsize=2)
def _zoo_data(root: str) -> _ZooData:
    """The zoo folder's settings, base UNet state, content pool and caption conditioning (read once)."""
    import json

    from safetensors.torch import load_file

    folder = Path(root)
    params = json.loads((folder / "zoo.json").read_text())["params"]
    s = QUICK if params.get("quick") else Settings()
    seed = int(params.get("seed", 0))
    config = dict(s.unet_config) if s.unet_config else dict(zmodel.UNET_CONFIG)
    base = load_file(str(folder / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    pool = render.content_pool(s.pool, seed=seed + 11)  # as build.Worker makes it
    text = zmodel.TextEncoder.load(folder / "model" / zmodel.TEXT_FILE)
    return _ZooData(root, s, seed, config, base, pool, text([c.caption for c in pool]))


@functools.lru_cache(maxsize=8)
def _styled(root: str, genre: str, style: str) -> torch.Tensor:
    """One style's pool as a training tensor (cached: a few styles are continued many times)."""
    from lorasearch.zoo.styles import GENRES

    st = next(x for x in GENRES[genre] if x.name == style)
    return zmodel.to_tensor(style_pool(st, _zoo_data(root).pool))


def continue_training(spec: LoraSpec | Mapping[str, Any], lora_file: str | Path, extra_steps: int,
                      zoo_dir: str | Path, out: str | Path | None = None, lr: float | None = None,
                      checkpoints: Mapping[int, str | Path] | None = None) -> TrainResult:
    """Train a saved zoo LoRA for ``extra_steps`` more steps on its own data.

    The run is continued as if it had not stopped: the same training subset and
    the same seed-driven stream of batches, noise and timesteps (the first
    ``spec.steps`` draws are replayed and skipped), with a fresh AdamW (as when
    a run is resumed from the weights alone) at the spec's learning rate.

    Args:
        spec: the LoRA's spec, or its labels.csv row.
        lora_file: the saved LoRA (a PEFT folder or a .safetensors file of the spec's format).
        extra_steps: further optimiser steps.
        zoo_dir: the zoo folder (``model/``, ``zoo.json``).
        out: when given, the continued LoRA is written there in the spec's format.
        lr: learning rate (default: the spec's).
        checkpoints: extra-step count -> path: the LoRA is also written there after that many
            further steps (intermediate saves of one continued run, as a trainer's ``checkpoint-N``).

    Returns:
        the TrainResult (``trained``: the peft model or lycoris network).
    """
    zoo = _zoo_data(str(Path(zoo_dir).resolve()))
    s = zoo.settings
    if not isinstance(spec, LoraSpec):
        spec = spec_from_row(spec, zoo.seed, s)
    start = time.time()
    unet = zmodel.make_unet(0, zoo.config)
    unet.load_state_dict(zoo.base)
    unet.requires_grad_(False)
    denoiser, trained, params_ = _adapter(unet, spec)
    _load_factors(trained, spec, Path(lora_file))
    images, cond = _styled(zoo.root, spec.genre, spec.style), zoo.cond
    g = torch.Generator().manual_seed(spec.seed)
    subset = training_subset(spec, images.shape[0], g)
    steps_t = zmodel.noise_scheduler().config.num_train_timesteps
    for _ in range(spec.steps):  # replay the original run's draws (batch, timesteps, noise)
        torch.randint(0, len(subset), (s.batch,), generator=g)
        torch.randint(0, steps_t, (s.batch,), generator=g)
        torch.randn((s.batch, *images.shape[1:]), generator=g)
    opt = torch.optim.AdamW(params_, lr=spec.lr if lr is None else lr, weight_decay=0.0)
    sched = zmodel.noise_scheduler()
    losses = []
    denoiser.train()
    for _ in range(extra_steps):
        idx = subset[torch.randint(0, len(subset), (s.batch,), generator=g)]
        loss = zmodel.diffusion_loss(denoiser, images[idx], cond[idx], sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if checkpoints and len(losses) in checkpoints:
            writers.write(spec.format, trained, Path(checkpoints[len(losses)]), spec.rank, spec.alpha)
    denoiser.eval()
    if out is not None:
        writers.write(spec.format, trained, Path(out), spec.rank, spec.alpha)
    return TrainResult(trained, denoiser, subset.numpy(), losses, time.time() - start)
