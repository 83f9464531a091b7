"""The zoo's tiny text-conditioned pixel-space diffusion model.

A real diffusers ``UNet2DConditionModel`` on 32x32 RGB (no VAE), conditioned on
a fixed, seeded word-embedding table over ``render.VOCAB`` (plus positions),
trained once on the unstyled content pool with the DDPM epsilon objective.
``generate`` samples with DDIM from the saved folder, optionally with a LoRA
merged in (any format ``lorasearch.formats.load.load_lora`` reads, or a dict of
dense updates).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lorasearch.zoo import render

EMBED_DIM = 32
SEQ_LEN = 8
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=EMBED_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="epsilon", clip_sample=True)
TEXT_FILE = "text_encoder.safetensors"
EVAL_POOL_SEED = 7  # the fixed prompts/start images of generated images come from this content pool
# the undertrained tiny base samples noise textures from pure noise; image-to-image from fixed
# content at this strength keeps the content, so stored images differ only by the LoRA
GEN_STRENGTH = 0.6


def make_unet(seed: int, config: Mapping[str, Any] | None = None) -> Any:
    """A freshly initialised zoo UNet (torch seed ``seed``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config or UNET_CONFIG))


class TextEncoder:
    """Fixed seeded embeddings: ``token[id] + position[i]``; padding is zero."""

    def __init__(self, token: torch.Tensor, position: torch.Tensor) -> None:
        self.token, self.position = token, position

    @classmethod
    def seeded(cls, seed: int, vocab: int = len(render.VOCAB)) -> "TextEncoder":
        """Unit-variance random tables from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(vocab, EMBED_DIM, generator=g), 0.3 * torch.randn(SEQ_LEN, EMBED_DIM, generator=g))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), SEQ_LEN, EMBED_DIM) conditioning."""
        ids = torch.tensor([render.tokenize(c, SEQ_LEN) for c in captions])
        emb = self.token[ids] + self.position[None]
        return emb * (ids > 0)[..., None]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"token": self.token.contiguous(), "position": self.position.contiguous()}, str(path),
                  metadata={"vocab": json.dumps(list(render.VOCAB))})

    @classmethod
    def load(cls, path: Path) -> "TextEncoder":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["token"], t["position"])


def noise_scheduler() -> Any:
    """The training scheduler (DDPM, 1000 steps, cosine betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) floats in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def diffusion_loss(unet: Any, x0: torch.Tensor, cond: torch.Tensor, sched: Any, g: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction MSE with noise and timesteps drawn from ``g`` (the run's only randomness)."""
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t)
    return torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)


def pretrain(out: Path, seed: int = 0, pool_size: int = 4096, steps: int = 600, batch: int = 32, lr: float = 2e-3,
             config: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train the base model on the unstyled content pool and save it to ``out`` (atomically).

    Args:
        out: the model folder (``unet/``, ``text_encoder.safetensors``, ``scheduler/``, ``zoo_model.json``).
        seed: drives init, the pool, batches, noise and timesteps.
        pool_size: number of rendered content images.
        steps: AdamW steps.
        batch: batch size.
        lr: peak learning rate (cosine decay).
        config: UNet config override (tests use a smaller one).
        log: optional progress callback.

    Returns:
        ``out``.
    """
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, intra-op threads make small steps far slower
    try:
        return _pretrain(out, seed, pool_size, steps, batch, lr, config, log, start)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out: Path, seed: int, pool_size: int, steps: int, batch: int, lr: float,
              config: Mapping[str, Any] | None, log: Callable[[str], None] | None, start: float) -> Path:
    """``pretrain``'s body (one thread)."""
    pool = render.content_pool(pool_size, seed=seed + 1)
    images = to_tensor(np.stack([c.image for c in pool]))
    text = TextEncoder.seeded(seed + 2)
    cond_all = text([c.caption for c in pool])
    unet = make_unet(seed, config)
    sched = noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed + 3)
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, pool_size, (batch,), generator=g)
        loss = diffusion_loss(unet, images[idx], cond_all[idx], sched, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"pretrain step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    return save_model(out, unet, text, {"seed": seed, "pool_size": pool_size, "steps": steps, "batch": batch,
                                        "lr": lr, "seconds": round(time.time() - start, 1)})


def save_model(out: Path, unet: Any, text: TextEncoder, info: dict[str, Any]) -> Path:
    """Write the model folder under a temporary name, then rename it into place."""
    import shutil

    from diffusers import DDIMScheduler

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save(tmp / TEXT_FILE)
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
    (tmp / "vocab.json").write_text(json.dumps(list(render.VOCAB)))
    (tmp / "zoo_model.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_model(model_dir: str | Path) -> tuple[Any, TextEncoder]:
    """The base UNet (eval mode) and text encoder saved in ``model_dir``."""
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.eval()
    return unet, TextEncoder.load(model_dir / TEXT_FILE)


def eval_prompts(n: int) -> list[str]:
    """The fixed prompts generated images use (captions of a fixed content pool)."""
    return [c.caption for c in render.content_pool(n, seed=EVAL_POOL_SEED)]


def _flat_linears(unet: Any) -> dict[str, torch.nn.Module]:
    """Module path with dots as underscores -> Linear/Conv module (how unknown families name modules)."""
    return {n.replace(".", "_"): m for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def lora_updates(lora: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Dense updates (flattened module path -> p x q tensor) of a LoRA file/folder, or the given mapping."""
    if isinstance(lora, Mapping):
        return {k.replace(".", "_"): torch.as_tensor(np.asarray(v, np.float32)) for k, v in lora.items()}
    from lorasearch.formats.load import load_lora

    ld = load_lora(lora, hashes=False)
    out = {}
    for name, delta in ld.weight_modules().items():
        path = name.split(".", 1)[1] if "." in name else name  # drop the component prefix
        out[path.replace(".", "_")] = torch.from_numpy(np.asarray(delta.matrix(), np.float32))
    return out


def merge(unet: Any, updates: Mapping[str, torch.Tensor], scale: float = 1.0) -> int:
    """Add the updates into the UNet's weights in place.

    Returns:
        how many modules were updated.

    Raises:
        KeyError: when an update names no module of the UNet.
    """
    mods = _flat_linears(unet)
    with torch.no_grad():
        for name, upd in updates.items():
            key = next((k for k in (name, name.removeprefix("unet_"), name.removeprefix("diffusion_model_"))
                        if k in mods), None)
            if key is None:
                raise KeyError(f"LoRA module {name} is not in the zoo UNet")
            w = mods[key].weight
            w += scale * upd.reshape(w.shape).to(w.dtype)
    return len(updates)


def eval_content(n: int) -> tuple[np.ndarray, list[str]]:
    """The fixed content images (float (n, 32, 32, 3)) and captions generated images start from."""
    pool = render.content_pool(n, seed=EVAL_POOL_SEED)
    return np.stack([c.image for c in pool]), [c.caption for c in pool]


@torch.no_grad()
def sample(unet: Any, text: TextEncoder, prompts: list[str], seed: int, steps: int = 20,
           init: np.ndarray | None = None, strength: float = 1.0) -> np.ndarray:
    """DDIM samples for ``prompts``; uint8 (N, 32, 32, 3).

    Args:
        unet: the denoiser (base, base + adapter, or merged weights).
        text: the text encoder.
        prompts: captions.
        seed: the noise seed.
        steps: DDIM steps of the full schedule.
        init: float (N, 32, 32, 3) images in [0, 1] to start from (image-to-image,
            SDEdit), or None for pure text-to-image from noise.
        strength: with ``init``, the fraction of the schedule run (noise level).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    noise = torch.randn((len(prompts), unet.config.in_channels, size, size), generator=g)
    timesteps = sched.timesteps
    if init is None:
        x = noise
    else:
        timesteps = timesteps[min(len(timesteps) - 1, int(round(steps * (1 - strength)))):]
        x = sched.add_noise(to_tensor(init), noise, timesteps[:1].repeat(len(prompts)))
    cond = text(prompts)
    for t in timesteps:
        eps = unet(x, t, encoder_hidden_states=cond).sample
        x = sched.step(eps, t, x).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).numpy()


def generate(model_dir: str | Path, lora: str | Path | Mapping[str, Any] | None = None, n: int = 8, seed: int = 0,
             prompts: list[str] | None = None, steps: int = 20, init: np.ndarray | None = None,
             strength: float = 1.0) -> np.ndarray:
    """Images from the zoo's base model, with a LoRA merged in when given.

    Args:
        model_dir: the zoo's ``model/`` folder.
        lora: a LoRA file or PEFT folder (any format the project reads), or a
            mapping module path -> dense update, or None for the base model.
        n: number of images (prompts default to ``eval_prompts(n)``).
        seed: the sampling noise seed.
        prompts: captions over ``render.VOCAB``.
        steps: DDIM steps.
        init: start images for image-to-image (see ``sample``); the zoo's stored
            generated images use ``eval_content(n)`` at ``GEN_STRENGTH``.
        strength: image-to-image noise level.

    Returns:
        uint8 array (n, 32, 32, 3).
    """
    unet, text = load_model(model_dir)
    if lora is not None:
        merge(unet, lora_updates(lora))
    return sample(unet, text, prompts or eval_prompts(n), seed, steps, init, strength)
