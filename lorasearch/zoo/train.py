"""Zoo specs and per-LoRA training.

Each LoRA's seed is a hash of (zoo seed, genre, style, index), so no two LoRAs
share a random sequence, and that seed drives everything random in its run:
the hyper-parameters drawn for it, the factor initialisation, its training
subset, batches, noise and timesteps. The "paper" subset instead gives every
style one LoRA with one shared seed, rank, format and hyper-parameters.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any

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
        tag = "paper" if self.subset == "paper" else f"{self.index:02d}"
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


def paper_spec(zoo_seed: int, style: Style, s: Settings) -> LoraSpec:
    """The paper-setting LoRA of ``style``: one seed, rank, format and schedule shared by all styles."""
    seed = lora_seed(zoo_seed, "paper", "paper", 0)
    return LoraSpec(style.genre, style.name, 0, seed, int(PAPER["rank"]), float(PAPER["alpha"]), s.paper_steps,
                    float(PAPER["lr"]), str(PAPER["format"]), "paper", min(int(PAPER["n_train"]), s.pool))


def zoo_specs(styles: list[Style], per_style: int, zoo_seed: int, paper: bool, s: Settings) -> list[LoraSpec]:
    """All LoRAs of a zoo, mixed first (style-major), then the paper subset."""
    specs = [mixed_spec(zoo_seed, st, pos, i, per_style, s) for pos, st in enumerate(styles) for i in range(per_style)]
    if paper:
        specs += [paper_spec(zoo_seed, st, s) for st in styles]
    return specs


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
    subset = torch.randperm(images.shape[0], generator=g)[: spec.n_train]
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
