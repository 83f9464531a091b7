"""Tiny real diffusers models built from configs (no downloads): samples, tests, the zoo."""
from __future__ import annotations

from typing import Any

TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def make_tiny_unet(seed: int = 0) -> Any:
    """A real ``UNet2DConditionModel`` (~0.8M parameters) with seeded weights.

    Args:
        seed: torch seed for the initial weights.

    Returns:
        the model, in float32 on the CPU.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)
