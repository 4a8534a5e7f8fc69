"""PatchGAN discriminator (Isola et al. 2017, Sec. 3.2.2), as latent diffusion's autoencoder
trains against it (Esser et al. 2021; Rombach et al. 2022, App. G).

A stack of ``layers`` stride-2 4x4 convolutions (the first without normalisation), each
followed by LeakyReLU(0.2), then a stride-1 3x3 convolution block and a 3x3 convolution to
one channel: the output ``[B, 1, H / 2**layers, W / 2**layers]`` holds one real/fake logit
per image patch (a patch of receptive field ~ 2**(layers + 2) px), so the discriminator
judges local texture and sharpness, the part an L1/L2 reconstruction loss leaves blurry.

Normalisation is GroupNorm, not BatchNorm (pix2pix, taming) and no spectral norm: the
autoencoder recipe trains both players in one module with per-example losses, reading the
discriminator once through detached parameters for the generator and once for itself
(``recipes.distill.gan``). BatchNorm would couple the examples of a batch and update its
running statistics on both calls; spectral norm's power iteration updates its ``u`` buffer in
place on each call too. GroupNorm has neither: each example's logits depend on that example
alone, and the two calls see the same function. The hinge loss, the late start of the
discriminator and the adaptive weight of the generator's term keep training stable without
a Lipschitz constraint (as in LDM's and VQGAN's own training).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import check_ranges, option

__all__ = ["PatchDiscriminator", "PatchDiscriminatorConfig"]


@dataclass
class PatchDiscriminatorConfig:
    in_channels: int = option(3, "image channels", cli=False, ge=1)
    channels: int = option(64, "width of the discriminator's first layer (doubled per "
                               "stride-2 layer, at most 8x)", flag="--disc-channels", ge=1)
    layers: int = option(3, "stride-2 layers of the discriminator: one logit per "
                            "(2**layers)-px patch; needs images of at least 2**layers px",
                         flag="--disc-layers", ge=1)

    def __post_init__(self) -> None:
        check_ranges(self)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PatchDiscriminator(nn.Module):
    """Images ``[B, C, H, W]`` in [-1, 1] -> logits ``[B, 1, H / 2**layers, W / 2**layers]``
    (one per patch; H and W at least ``2**layers``)."""

    def __init__(self, config: PatchDiscriminatorConfig | None = None):
        super().__init__()
        c = self.config = config or PatchDiscriminatorConfig()
        width = [c.channels * min(2**i, 8) for i in range(c.layers + 1)]
        blocks: list[nn.Module] = [nn.Conv2d(c.in_channels, width[0], 4, 2, 1),
                                   nn.LeakyReLU(0.2)]
        for i in range(1, c.layers):   # stride 2: the patch grows, the map shrinks
            blocks += [nn.Conv2d(width[i - 1], width[i], 4, 2, 1, bias=False),
                       _norm(width[i]), nn.LeakyReLU(0.2)]
        last = width[c.layers - 1]
        blocks += [nn.Conv2d(last, width[c.layers], 3, 1, 1, bias=False),
                   _norm(width[c.layers]), nn.LeakyReLU(0.2),
                   nn.Conv2d(width[c.layers], 1, 3, 1, 1)]
        self.net = nn.Sequential(*blocks)

    @property
    def min_size(self) -> int:
        """The smallest image side the discriminator takes: 2**layers."""
        return 2**self.config.layers

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"--disc-layers {self.config.layers} needs images of at least "
                             f"{self.min_size} px, got {list(x.shape[-2:])}")
        return self.net(x)
