"""The 2-D side of the diffusion recipe: the MLP denoiser's config."""

from __future__ import annotations

from dataclasses import replace

from ..networks import MLPConfig


def mlp_config(arch: MLPConfig, dim: int, num_classes: int | None) -> MLPConfig:
    """``arch`` (width, depth) for points in R^dim."""
    return replace(arch, dim=dim, num_classes=num_classes)
