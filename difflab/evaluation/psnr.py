"""Peak signal-to-noise ratio of reconstructions (autoencoders, latent round trips)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["psnr"]


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image [B] in dB: 10 log10(range^2 / MSE), the MSE over
    each image's pixels (in float32); ``data_range`` 2 for images in [-1, 1], i.e.
    10 log10(4 / MSE). Identical images give 10 log10(range^2 / 1e-20), not infinity."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-20))
