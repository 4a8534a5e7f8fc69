"""Residual MLP denoiser for low-dimensional toy data (2-D point clouds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.config import option
from difflab.networks.embeddings import broadcast_c_noise, resolve_labels, timestep_embedding

__all__ = ["MLPConfig", "MLPDenoiser"]


@dataclass
class MLPConfig:
    """Hyper-parameters of :class:`MLPDenoiser` (JSON-serialisable via ``asdict``).

    Attributes:
        dim: data dimension (input and output width).
        hidden: width of the residual blocks.
        depth: number of residual blocks.
        time_dim: width of the (projected) sinusoidal time embedding.
        num_classes: if set, class-conditional; label ``num_classes`` is the null label.
    """

    dim: int = option(2, "data dimension (set from the data)", cli=False)
    hidden: int = option(256, "MLP width (2-D data)")
    depth: int = option(4, "MLP residual blocks (2-D data)")
    time_dim: int = option(64, "MLP time-embedding width (2-D data)")
    num_classes: int | None = option(None, "class labels (set from the data)", cli=False)

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "time_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_dim < 2:
            raise ValueError(f"time_dim must be >= 2, got {self.time_dim}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")


class _ResidualMLPBlock(nn.Module):
    """``h + Linear(SiLU(Linear(LayerNorm(h))))``; the last Linear starts at zero."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class MLPDenoiser(nn.Module):
    """MLP denoiser: ``[x, emb(c_noise) (+ class emb)] -> residual blocks -> [B, dim]``.

    ``forward(x [B, dim], c_noise [B], labels [B] | None) -> [B, dim]``, with the same
    null-label convention as :class:`~difflab.networks.unet.UNet`.
    """

    def __init__(self, config: MLPConfig | None = None) -> None:
        super().__init__()
        cfg = MLPConfig() if config is None else config
        self.config = cfg
        # sinusoid(c_noise) [B, T] -> projected [B, T]
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.label_emb: nn.Embedding | None = None
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, cfg.time_dim)
        self.inp = nn.Linear(cfg.dim + cfg.time_dim, cfg.hidden)
        self.blocks = nn.Sequential(*(_ResidualMLPBlock(cfg.hidden) for _ in range(cfg.depth)))
        self.out = nn.Sequential(
            nn.LayerNorm(cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.dim)
        )

    @property
    def null_label(self) -> int | None:
        """The reserved classifier-free-guidance label (``num_classes``), or ``None``."""
        return self.config.num_classes

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """x: ``[B, dim]``, c_noise: ``[B]`` (or scalar), labels: ``[B]`` long | None."""
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.dim:
            raise ValueError(f"x must have shape [B, {cfg.dim}], got {tuple(x.shape)}")
        c_noise = broadcast_c_noise(c_noise, x.shape[0])
        emb = self.time_mlp(timestep_embedding(c_noise, cfg.time_dim))  # [B, T]
        if self.label_emb is not None:
            labels = resolve_labels(labels, x.shape[0], cfg.num_classes, x.device)
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels given to a model built without num_classes")
        h = self.inp(torch.cat([x, emb.to(x.dtype)], dim=1))  # [B, hidden]
        return self.out(self.blocks(h))  # [B, dim]
