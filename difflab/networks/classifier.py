"""Noise-conditional classifier p_phi(y | x_t, t) for classifier guidance.

The encoder half of the U-Net (input conv, down path, middle block; time-embedded ResBlocks)
followed by GroupNorm, SiLU, global average pooling and a linear head, as in Dhariwal & Nichol
2021 (sec. 4, "the downsampling trunk of the UNet ... with an attention pool"; we pool by
averaging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import broadcast_c_noise, timestep_embedding
from .unet import UNet, UNetConfig, group_count


@dataclass
class ClassifierConfig:
    """Architecture of :class:`NoisyClassifier` (JSON-serialisable via ``asdict``)."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = ()
    num_heads: int = 4
    dropout: float = 0.0
    time_conditioning: str = "scale_shift"

    def __post_init__(self) -> None:  # JSON gives lists back
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)

    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=self.in_channels, image_size=self.image_size,
                          base_channels=self.base_channels,
                          channel_mult=tuple(self.channel_mult),
                          num_res_blocks=self.num_res_blocks,
                          attention_resolutions=tuple(self.attention_resolutions),
                          num_heads=self.num_heads, dropout=self.dropout,
                          time_conditioning=self.time_conditioning)


class NoisyClassifier(nn.Module):
    """The noisy classifier: ``forward(x [B, C, H, W], c_noise [B]) -> logits [B,
    num_classes]`` (``labels`` is ignored: the guidance interface passes it)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        trunk = UNet(cfg.unet_config())  # borrow the U-Net's encoder half, drop the rest
        self.time_mlp, self.conv_in = trunk.time_mlp, trunk.conv_in
        self.down, self.middle = trunk.down, trunk.middle
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.head = nn.Sequential(nn.GroupNorm(group_count(ch), ch), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, cfg.num_classes))

    def features(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """The pooled penultimate activations [B, C] (GroupNorm, SiLU, average pool): what
        the linear head sees; ``difflab eval --features classifier:RUN`` uses them at t ~ 0."""
        c_noise = broadcast_c_noise(c_noise, x.shape[0])
        temb = timestep_embedding(c_noise, self.config.base_channels).to(x.dtype)
        emb = F.silu(self.time_mlp(temb))
        h = self.conv_in(x)
        for block in self.down:
            h = block(h, emb)
        return self.head[:-1](self.middle(h, emb))

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.head[-1](self.features(x, c_noise))  # [B, num_classes]
