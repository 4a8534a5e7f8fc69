"""The image side of the diffusion recipe: U-Net presets and the U-Net's config."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..networks import UNetConfig

#: U-Net presets: (base_channels, channel_mult, num_res_blocks).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1},
    "small": {"base_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 2},
    "base": {"base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2},
}


def unet_config(arch: UNetConfig, channels: int, resolution: int, learned_variance: bool,
                num_classes: int | None, context_dim: int | None) -> UNetConfig:
    """``arch`` (widths, depth, attention, ...) with the fields the data and objective fix.
    Text models are conditioned through ``context_dim`` instead of class labels."""
    # learned variance: the second half of the output channels is v (Nichol & Dhariwal)
    out = 2 * channels if learned_variance else None
    return replace(arch, in_channels=channels, out_channels=out, image_size=resolution,
                   num_classes=None if context_dim is not None else num_classes,
                   context_dim=context_dim)
