"""The image side of the diffusion recipe: the U-Net's config and the periodic sample grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..data import save_grid
from ..networks import UNetConfig
from ..parameterization import ClippedDenoiser, Denoiser
from ..samplers import ddim
from ..samplers.generate import generate

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


def image_grid(denoiser: Denoiser, shape: tuple[int, ...], path: Path, n: int, labels: Any,
               per_class: int, steps: int, resolution: int, seed: int = 0) -> Path:
    """``n`` DDIM samples (x0 clipped to the data range), ``per_class`` to a row; ``labels``
    ([n] class indices, a text condition, or None) condition them."""
    x = generate(ClippedDenoiser(denoiser), ddim, shape, list(range(seed, seed + n)),
                 labels=labels, steps=steps, device=next(denoiser.net.parameters()).device,
                 progress=False)
    return save_grid(x, path, nrow=per_class, scale=max(1, 64 // resolution))
