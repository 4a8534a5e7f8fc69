"""The 2-D side of the diffusion recipe: an MLP denoiser and a scatter plot of samples."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..data import save_scatter
from ..networks import MLPConfig
from ..parameterization import Denoiser
from ..samplers import ddim
from ..samplers.generate import generate


def mlp_config(arch: MLPConfig, dim: int, num_classes: int | None) -> MLPConfig:
    """``arch`` (width, depth) for points in R^dim."""
    return replace(arch, dim=dim, num_classes=num_classes)


def toy_scatter(denoiser: Denoiser, dim: int, path: Path, steps: int, n: int = 2000,
                seed: int = 0) -> Path:
    """A scatter plot of ``n`` DDIM samples (no clipping: points are unbounded)."""
    x = generate(denoiser, ddim, (dim,), list(range(seed, seed + n)), steps=steps,
                 device=next(denoiser.net.parameters()).device, progress=False)
    return save_scatter(x, path)
