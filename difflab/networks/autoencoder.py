"""The first stage of latent diffusion: a convolutional autoencoder (Rombach et al. 2022).

The encoder maps an image x in [-1, 1], [B, C, H, W], to a latent [B, latent_channels, H/f,
W/f] with f = 2**(len(block_out_channels) - 1); the decoder maps it back. Regularisation
(LDM Sec. 3.1) is either a small KL penalty towards N(0, I) on a diagonal-Gaussian posterior
("kl") or vector quantisation ("vq", :mod:`difflab.networks.vq`).

The topology is that of diffusers' ``AutoencoderKL`` (and of LDM's ``AutoencoderKL``), so that
their weights load (:mod:`difflab.networks.diffusers_vae`):

    encoder: conv_in, per resolution ``layers_per_block`` ResBlocks then a stride-2 conv
             (except at the last), mid (ResBlock, attention, ResBlock), GroupNorm, SiLU,
             conv_out to 2 * latent_channels (mean and log-variance); quant_conv (1x1)
    decoder: post_quant_conv (1x1), conv_in, mid, per resolution from the coarsest
             ``layers_per_block + 1`` ResBlocks then nearest 2x upsampling + conv (except at
             the last), GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import option
from difflab.networks.vq import VectorQuantizer

__all__ = ["Autoencoder", "AutoencoderConfig", "LatentDistribution", "kl_standard_normal"]

#: GroupNorm epsilon of LDM's and diffusers' autoencoders
EPS = 1e-6
#: log-variance clamp of LDM's DiagonalGaussianDistribution
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of :class:`Autoencoder` (JSON-serialisable via ``dataclasses.asdict``).

    Attributes:
        in_channels: image channels of the input.
        out_channels: image channels of the reconstruction; ``None`` means ``in_channels``.
        block_out_channels: width at each resolution; the down-sampling factor is
            ``f = 2**(len(block_out_channels) - 1)``.
        layers_per_block: ResBlocks per resolution in the encoder (``+ 1`` in the decoder).
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups; must divide every width.
        mid_attention: self-attention between the two mid ResBlocks of encoder and decoder.
        regularizer: ``"kl"`` (diagonal-Gaussian posterior, KL to N(0, I)) or ``"vq"``.
        codebook_size: codebook entries (``vq`` only).
        commitment: weight beta of the commitment loss (``vq`` only; VQ-VAE Eq. 3).
        use_quant_conv: 1x1 conv after the encoder (diffusers' ``quant_conv``).
        use_post_quant_conv: 1x1 conv before the decoder (diffusers' ``post_quant_conv``).
    """

    in_channels: int = option(3, "image channels (set from the data)", cli=False, ge=1)
    out_channels: int | None = option(None, "reconstruction channels; None: in_channels",
                                      cli=False, ge=1)
    block_out_channels: tuple[int, ...] = option(
        (32, 64, 64), "autoencoder width per resolution; f = 2**(count - 1), e.g. 32 64 64")
    layers_per_block: int = option(1, "ResBlocks per resolution (decoder: one more)", ge=1)
    latent_channels: int = option(4, "latent channels", ge=1)
    norm_num_groups: int = option(32, "GroupNorm groups (must divide every width)", ge=1)
    mid_attention: bool = option(True, "self-attention in the mid blocks")
    regularizer: Literal["kl", "vq"] = option("kl", "latent regulariser: 'kl' or 'vq'")
    codebook_size: int = option(512, "VQ codebook entries", ge=1)
    commitment: float = option(0.25, "VQ commitment weight (beta)", ge=0)
    use_quant_conv: bool = option(True, "1x1 conv after the encoder")
    use_post_quant_conv: bool = option(True, "1x1 conv before the decoder")

    def __post_init__(self) -> None:
        # JSON gives lists back; keep a tuple so configs compare equal after a round trip.
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self._validate()

    @property
    def resolved_out_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _validate(self) -> None:
        for name in ("in_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {self.out_channels}")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be non-empty and >= 1, got "
                             f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every width "
                             f"in block_out_channels={self.block_out_channels} (not {bad[0]})")
        if self.regularizer not in ("kl", "vq"):
            raise ValueError(f"regularizer must be 'kl' or 'vq', got {self.regularizer!r}")
        if self.commitment < 0:
            raise ValueError(f"commitment must be >= 0, got {self.commitment}")


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image, summed over the latent elements:
    0.5 * sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, Appendix B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@dataclass
class LatentDistribution:
    """What :meth:`Autoencoder.encode` returns.

    Attributes:
        mean: [B, latent_channels, H/f, W/f]; for ``vq`` the quantised latent.
        logvar: log-variance of the diagonal Gaussian, clamped to [-30, 20] (as LDM);
            ``None`` for ``vq`` (deterministic).
        reg_loss: [B]; KL(q || N(0, I)) summed over latent elements (``kl``), or codebook +
            beta * commitment loss averaged over latent elements (``vq``).
        indices: [B, H/f, W/f] codebook indices of ``mean`` (``vq``), else ``None``.
    """

    mean: Tensor
    logvar: Tensor | None
    reg_loss: Tensor
    indices: Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + exp(logvar / 2) * eps with eps ~ N(0, I) drawn from ``generator``
        (reparameterised, so gradients reach the encoder); ``mean`` for ``vq``."""
        if self.logvar is None:
            return self.mean
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device,
                          dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> Tensor:
        """The posterior's mode: ``mean``."""
        return self.mean


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the input (through a 1x1 conv
    when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                         if in_channels != out_channels else None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class PixelAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual:
    x + out(softmax(q k^T / sqrt(C)) v) on GroupNorm(x) flattened to [B, H*W, C]."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/sqrt(C)
        return x + self.out(a).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResBlock, attention (optional), ResBlock at the coarsest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attn = PixelAttention(channels, groups) if attention else None
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 conv of stride 2
    (LDM's and diffusers' asymmetric padding; a weight-compatible choice)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """The ResBlocks of one resolution followed by an optional resampling layer."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int,
                 resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(blocks))
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image [B, C, H, W] -> features [B, out_channels, H/f, W/f]."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], w, cfg.layers_per_block, groups,
                  Downsample(w) if i < last else None)
            for i, w in enumerate(widths))
        self.mid = MidBlock(widths[-1], groups, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent [B, latent_channels, h, w] -> image [B, out_channels, f h, f w]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups, cfg.mid_attention)
        last = len(widths) - 1
        self.up = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, groups,
                  Upsample(w) if i < last else None)
            for i, w in enumerate(widths))
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.resolved_out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """A KL- or VQ-regularised convolutional autoencoder (LDM's first stage).

    ``encode(x)`` -> :class:`LatentDistribution`; ``decode(z)`` -> image (not clamped);
    ``forward(x, sample=True, generator=None)`` -> (reconstruction, posterior). Latents are
    unscaled: the pipeline applies the scale and shift factors.
    """

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        config = AutoencoderConfig() if config is None else config
        self.config = config
        self.downsample_factor = config.downsample_factor
        self.latent_channels = config.latent_channels
        d = config.latent_channels
        vq = config.regularizer == "vq"
        moments = d if vq else 2 * d  # "double_z": mean and log-variance
        self.encoder = Encoder(config, moments)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.quantizer = (VectorQuantizer(config.codebook_size, d, config.commitment)
                          if vq else None)
        self.post_quant_conv = nn.Conv2d(d, d, 1) if config.use_post_quant_conv else None
        self.decoder = Decoder(config)

    def _check(self, x: Tensor, channels: int, what: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"{what} height and width must be multiples of the down-sampling "
                             f"factor {factor}, got {tuple(x.shape[2:])}")

    def encode(self, x: Tensor) -> LatentDistribution:
        """Posterior q(z | x) of images ``x`` in [-1, 1], [B, C, H, W] (H, W multiples of f)."""
        self._check(x, self.config.in_channels, "autoencoder input", self.downsample_factor)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        if self.quantizer is not None:
            zq, indices, loss = self.quantizer(h)
            return LatentDistribution(zq, None, loss, indices)
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return LatentDistribution(mean, logvar, kl_standard_normal(mean, logvar))

    def quantize(self, z: Tensor) -> Tensor:
        """``z`` snapped to its nearest codebook vectors (``vq`` only), e.g. for latents a
        diffusion model sampled before :meth:`decode`."""
        if self.quantizer is None:
            raise ValueError("quantize needs an autoencoder with regularizer='vq'")
        self._check(z, self.latent_channels, "latent", 1)
        return self.quantizer.lookup(self.quantizer.nearest(z))

    def decode(self, z: Tensor) -> Tensor:
        """Image [B, out_channels, f h, f w] of an unscaled latent ``z`` [B, latent, h, w]."""
        self._check(z, self.latent_channels, "latent", 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, LatentDistribution]:
        """(reconstruction, posterior); the latent decoded is a posterior sample if ``sample``
        (drawn from ``generator``), else its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
