"""A generator G(x_t, z, t) for the denoising diffusion GAN (Xiao et al. 2022): a U-Net whose
input is x_t with the latent z concatenated along the channels.

DDGAN injects z through adaptive normalisation; here z is spatial Gaussian noise of x's own
shape, given as extra input channels, which keeps the network an ordinary U-Net and lets any
sampler draw z from its own generator (``samplers.ddgan``). Called with a plain condition
(labels or None) instead of a :class:`~difflab.conditioning.LatentCond`, z = 0: other
samplers then use the generator's mode-like output deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.conditioning import LatentCond
from difflab.networks.unet import UNet, UNetConfig

__all__ = ["LatentUNet", "LatentUNetConfig"]


@dataclass
class LatentUNetConfig:
    """``unet``: the U-Net's config (a dict of UNetConfig fields) for the data's channels C;
    the U-Net built takes 2C input channels ([x_t, z]) and outputs C."""

    unet: dict[str, Any]


class LatentUNet(nn.Module):
    """``forward(x [B, C, H, W], c_noise [B], cond)`` with ``cond`` a LatentCond (labels, z
    [B, C, H, W]) or plain labels (z = 0) -> [B, C, H, W]."""

    def __init__(self, config: LatentUNetConfig):
        super().__init__()
        self.config = config
        cfg = UNetConfig(**config.unet)
        self.channels = cfg.in_channels
        self.unet = UNet(UNetConfig(**{**config.unet, "in_channels": 2 * cfg.in_channels,
                                       "out_channels": cfg.resolved_out_channels}))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        if isinstance(cond, LatentCond):
            labels, z = cond.labels, cond.z.to(x.dtype)
            if z.shape != x.shape:
                raise ValueError(f"latent z must have x's shape {tuple(x.shape)}, got "
                                 f"{tuple(z.shape)}")
        else:
            labels, z = cond, torch.zeros_like(x)
        return self.unet(torch.cat([x, z], 1), c_noise, labels)
