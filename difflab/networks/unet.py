"""DDPM-style U-Net denoiser.

Architecture after Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B),
with the refinements of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic
Models": adaptive GroupNorm time conditioning, ``use_scale_shift_norm``; multi-head
attention) and Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs": class embedding added
to the time embedding).  Class conditioning reserves one extra "null" label for
classifier-free guidance (Ho & Salimans 2022).

Shape conventions in comments: ``B`` batch, ``C`` channels, ``H, W`` spatial, ``E`` width
of the time embedding (``4 * base_channels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.conditioning import GuidanceCond, TextCond
from difflab.config import option
from difflab.networks.cross_attention import (
    AttentionProcessor,
    CrossAttentionBlock,
    attend,
    pooled_context,
)
from difflab.networks.embeddings import broadcast_c_noise, resolve_labels, timestep_embedding
from difflab.networks.fused import dropout_rate, group_norm_act, use_fused
from difflab.networks.fused_native import supports
from difflab.networks.upsample import is_channels_last, upsample_conv3x3

__all__ = ["GUIDANCE_EMBED_SCALE", "UNet", "UNetConfig", "group_count",
           "with_guidance_embedding"]

TIME_CONDITIONING_MODES = ("add", "scale_shift")
#: Without the native kernels, smaller feature maps (H * W) keep PyTorch's GroupNorm in
#: :func:`norm_act`: below 16x16 its kernel is as fast as the PyTorch-ops node or faster
#: (``benchmarks/fused_ops.py``). The native node is faster at every size.
MIN_FUSED_PIXELS = 256
#: The guidance scale w is embedded like c_noise, as sinusoid(w * this): scales in [0, 10]
#: then span the [0, 1000] range the sinusoidal features are made for.
GUIDANCE_EMBED_SCALE = 100.0


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (JSON-serialisable via ``dataclasses.asdict``).

    Attributes:
        in_channels: image channels of the input.
        out_channels: output channels; ``None`` means ``in_channels``.
        image_size: nominal (square) training resolution; fixes where attention goes.
        base_channels: width of the first level; level ``i`` has
            ``base_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: ResBlocks per level on the down path (``+ 1`` on the up path).
        attention_resolutions: feature-map sizes (e.g. ``8`` for 8x8) at which a
            self-attention block follows each ResBlock.  The middle block always attends.
        num_heads: attention heads; must divide the width of every attending level.
        dropout: dropout rate inside the ResBlocks.
        time_conditioning: ``"add"`` (DDPM: add the projected embedding to the
            features) or ``"scale_shift"`` (adaptive GroupNorm,
            ``h = norm(h) * (1 + scale) + shift``).
        num_classes: if set, class-conditional with labels ``0..num_classes - 1`` and the
            null label ``num_classes`` (used for classifier-free guidance).
        groups: maximum number of GroupNorm groups; see :func:`group_count` for the rule
            that makes it divide small widths.
        context_dim: if set, text-conditional: every attention block is followed by a
            cross-attention block to prompt tokens of this width (a :class:`TextCond` given
            as ``cond``), and their masked mean is added to the time embedding.
        guidance_embedding: if True, the network also takes the guidance scale w as an
            input (a :class:`~difflab.conditioning.GuidanceCond` given as ``cond``): an MLP
            of sinusoid(w) added to the time embedding, its last layer zero-initialised so
            that a network whose other weights come from a teacher starts exactly as the
            teacher (guidance distillation, Meng et al. 2023; latent consistency models,
            Luo et al. 2023). See :func:`with_guidance_embedding`.
    """

    in_channels: int = option(1, "image channels of the input (set from the data)", cli=False)
    out_channels: int | None = option(None, "output channels; None: in_channels (set from the "
                                            "objective)", cli=False)
    image_size: int = option(16, "nominal training resolution (set from the data)", cli=False)
    base_channels: int = option(64, "U-Net width at the first resolution")
    channel_mult: tuple[int, ...] = option((1, 2, 2), "width multiplier per resolution level, "
                                                      "e.g. 1 2 2")
    num_res_blocks: int = option(2, "residual blocks per resolution level")
    attention_resolutions: tuple[int, ...] = option((8,), "feature-map sizes with "
                                                          "self-attention, e.g. 16 8")
    num_heads: int = option(4, "attention heads")
    dropout: float = option(0.0, "dropout in residual blocks")
    time_conditioning: Literal["add", "scale_shift"] = option(
        "scale_shift", "inject the time embedding by 'add' or adaptive GroupNorm 'scale_shift'")
    num_classes: int | None = option(None, "class labels 0..K-1 plus a null label (set from the "
                                           "data)", cli=False)
    groups: int = option(32, "maximum number of GroupNorm groups")
    context_dim: int | None = option(None, "width of prompt tokens for cross-attention (set "
                                           "from the text encoder)", cli=False)
    guidance_embedding: bool = option(False, "take the guidance scale as an input (set by "
                                             "guidance distillation)", cli=False)

    def __post_init__(self) -> None:
        # JSON gives lists back; keep tuples so configs compare equal after a round trip.
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self._validate()

    @property
    def resolved_out_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level at the nominal ``image_size``."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def _validate(self) -> None:
        positive = {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "base_channels": self.base_channels,
            "num_res_blocks": self.num_res_blocks,
            "num_heads": self.num_heads,
            "groups": self.groups,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {self.out_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty and >= 1, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1)"
                f"={factor} for channel_mult={self.channel_mult}"
            )
        unknown = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} match no feature-map size; with "
                f"image_size={self.image_size} the sizes are {list(self.resolutions)}"
            )
        if self.time_conditioning not in TIME_CONDITIONING_MODES:
            raise ValueError(
                f"time_conditioning must be one of {TIME_CONDITIONING_MODES}, "
                f"got {self.time_conditioning!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")
        if self.context_dim is not None and self.num_classes is not None:
            raise ValueError("a U-Net is either class- or text-conditional, not both")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be >= 1 or None, got {self.context_dim}")
        self._validate_heads()

    def _validate_heads(self) -> None:
        widths = [self.base_channels * m for m in self.channel_mult]
        pairs = zip(widths, self.resolutions, strict=True)
        attending = [w for w, r in pairs if r in self.attention_resolutions]
        for width in attending + [widths[-1]]:  # the middle block attends at the last width
            if width % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the attention width {width}"
                )


def group_count(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``.

    The largest divisor of ``channels`` that is ``<= max_groups`` and leaves at least two
    channels per group (``<= channels // 2``); 1 for a single channel.  Standard widths
    (>= 64, multiples of 32) get 32 groups; tiny widths still divide (16 -> 8, 48 -> 24,
    3 -> 1).  One channel per group (instance norm) is avoided on purpose: it would erase a
    per-channel constant such as the time embedding added before ``norm2`` in "add" mode.
    """
    g = max(1, min(max_groups, channels // 2))
    while channels % g:
        g -= 1
    return g


def norm_act(x: Tensor, norm: nn.GroupNorm, silu: bool = True) -> Tensor:
    """``silu(norm(x))`` (``norm(x)`` if not ``silu``): one fused node on the CPU
    (:func:`~difflab.networks.fused.group_norm_act`), the PyTorch ops elsewhere."""
    if use_fused(x) and (supports(x) is not None
                         or x.shape[-2] * x.shape[-1] >= MIN_FUSED_PIXELS):
        return group_norm_act(x, norm, silu=silu)
    return F.silu(norm(x)) if silu else norm(x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (Ho et al. 2020; Nichol & Dhariwal 2021).

    ``GroupNorm -> SiLU -> conv3x3 -> (+emb | adaptive GroupNorm) -> SiLU -> dropout ->
    conv3x3 (zero-init)``, plus a 1x1-conv skip when the width changes.  With zero-init the
    block starts as the identity (on its skip path).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        scale_shift: bool,
        max_groups: int,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(group_count(in_ch, max_groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # "scale_shift" needs a scale and a shift per channel, "add" only a bias.
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(group_count(out_ch, max_groups), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [B, in_ch, H, W], emb: [B, E] (already SiLU-activated) -> [B, out_ch, H, W]."""
        h = self.conv1(norm_act(x, self.norm1))  # [B, out, H, W]
        e = self.emb_proj(emb)[:, :, None, None]  # [B, out or 2*out, 1, 1]
        if use_fused(h):  # same math in fewer passes (difflab/networks/fused.py)
            p = self.dropout.p if self.training else 0.0
            # Inverted dropout's 1 / (1 - p) goes into conv2's weight (a linear map of the
            # dropped features), not over every kept element.
            kw = {"dropout": p, "scale_kept": False}
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = group_norm_act(h, self.norm2, scale=scale, shift=shift, **kw)
            else:
                h = group_norm_act(h + e, self.norm2, **kw)
            weight = self.conv2.weight
            if p > 0:
                weight = weight * (1.0 / (1.0 - dropout_rate(p)))
            return self.skip(x) + F.conv2d(h, weight, self.conv2.bias, padding=1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # [B, out, 1, 1] each
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-init output.

    Uses the fused ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
    GPU); with ``attn_processor`` set, explicit probabilities passed through it
    (:mod:`~difflab.networks.cross_attention`).
    """

    is_cross = False

    def __init__(self, channels: int, num_heads: int, max_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(group_count(channels, max_groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))
        self.attn_processor: AttentionProcessor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        d = c // self.num_heads
        qkv = self.qkv(norm_act(x, self.norm, silu=False))  # [B, 3C, H, W]
        if is_channels_last(qkv):
            # Memory is [B, HW, 3, heads, d]: q, k, v are strided views with unit stride
            # along d (what the attention kernels need), and the output goes back to
            # channels-last as a view when there is one head; no layout copies.
            t = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3, self.num_heads, d)
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each [B, heads, HW, d]
            out = attend(q, k, v, None, self, self.attn_processor)  # [B, heads, HW, d]
            out = out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            qkv = qkv.reshape(b, 3, self.num_heads, d, h * w)
            q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each [B, heads, HW, d]
            out = attend(q, k, v, None, self, self.attn_processor)  # [B, heads, HW, d]
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W].

    Computed as the equivalent sub-pixel 2x2 convolution of the low-resolution input
    (:func:`~difflab.networks.upsample.upsample_conv3x3`, 2.25x fewer FLOPs); the parameter
    is still the 3x3 ``conv`` applied at the upsampled resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)


class EmbedSequential(nn.Sequential):
    """Sequential container that passes the embedding to the ResBlocks it holds and the
    prompt tokens to its cross-attention blocks."""

    def forward(self, x: Tensor, emb: Tensor,  # type: ignore[override]
                context: TextCond | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CrossAttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """DDPM-style U-Net denoiser (the prediction target is up to the training code).

    ``forward(x [B, C, H, W], c_noise [B], labels [B] | None) -> [B, out_channels, H, W]``.
    Fully convolutional: any ``H, W`` divisible by ``2**(len(channel_mult) - 1)`` works,
    but attention placement is decided at the nominal ``config.image_size``.

    Freshly built, the output is exactly zero (zero-init output conv), as are the residual
    branches of all ResBlocks and attention blocks.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = UNetConfig() if config is None else config
        self.config = cfg
        self.out_channels = cfg.resolved_out_channels
        #: validate label ranges on every call (a host sync; the trainer turns it off)
        self.check_labels = True
        #: recompute each block's activations in backward (less memory, ~30% more compute)
        self.grad_checkpointing = False
        emb_dim = 4 * cfg.base_channels
        self._build_embeddings(cfg, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        skip_chs = self._build_down(cfg, emb_dim)
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.middle = EmbedSequential(
            self._res(cfg, ch, ch, emb_dim),
            *self._attn(cfg, ch),
            self._res(cfg, ch, ch, emb_dim),
        )
        self._build_up(cfg, emb_dim, skip_chs)
        self.out = nn.Sequential(
            nn.GroupNorm(group_count(cfg.base_channels, cfg.groups), cfg.base_channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(cfg.base_channels, self.out_channels, 3, padding=1)),
        )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _res(cfg: UNetConfig, in_ch: int, out_ch: int, emb_dim: int) -> ResBlock:
        scale_shift = cfg.time_conditioning == "scale_shift"
        return ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, scale_shift, cfg.groups)

    @staticmethod
    def _attn(cfg: UNetConfig, ch: int) -> list[nn.Module]:
        """Self-attention, then cross-attention to the prompt for text-conditional nets."""
        layers: list[nn.Module] = [AttentionBlock(ch, cfg.num_heads, cfg.groups)]
        if cfg.context_dim is not None:
            layers.append(CrossAttentionBlock(ch, cfg.context_dim, cfg.num_heads,
                                              group_count(ch, cfg.groups)))
        return layers

    def _build_embeddings(self, cfg: UNetConfig, emb_dim: int) -> None:
        # sinusoid(c_noise) [B, base] -> MLP -> [B, E]   (Ho et al. 2020)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Row num_classes is the null label (classifier-free guidance).
        self.label_emb: nn.Embedding | None = None
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        # pooled prompt tokens [B, D] -> [B, E], added like the class embedding
        self.context_emb: nn.Linear | None = None
        if cfg.context_dim is not None:
            self.context_emb = nn.Linear(cfg.context_dim, emb_dim)
        # sinusoid(w * GUIDANCE_EMBED_SCALE) [B, base] -> MLP -> [B, E], zero at init
        self.guidance_mlp: nn.Sequential | None = None
        if cfg.guidance_embedding:
            self.guidance_mlp = nn.Sequential(
                nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(),
                zero_module(nn.Linear(emb_dim, emb_dim)))

    def _build_down(self, cfg: UNetConfig, emb_dim: int) -> list[int]:
        """Build ``self.down``; return the widths of the skip activations it emits."""
        self.down = nn.ModuleList()
        ch = cfg.base_channels
        skip_chs = [ch]  # conv_in output
        for level, mult in enumerate(cfg.channel_mult):
            out_ch = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [self._res(cfg, ch, out_ch, emb_dim)]
                if cfg.resolutions[level] in cfg.attention_resolutions:
                    layers.extend(self._attn(cfg, out_ch))
                self.down.append(EmbedSequential(*layers))
                ch = out_ch
                skip_chs.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_chs.append(ch)
        return skip_chs

    def _build_up(self, cfg: UNetConfig, emb_dim: int, skip_chs: list[int]) -> None:
        """Build ``self.up``, consuming ``skip_chs`` from the end (num_res_blocks + 1 each)."""
        self.up = nn.ModuleList()
        skip_chs = list(skip_chs)
        ch = cfg.base_channels * cfg.channel_mult[-1]
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.base_channels * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(cfg, ch + skip_chs.pop(), out_ch, emb_dim)]
                ch = out_ch
                if cfg.resolutions[level] in cfg.attention_resolutions:
                    layers.extend(self._attn(cfg, ch))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbedSequential(*layers))
        assert not skip_chs, "every skip activation must be consumed"

    # ------------------------------------------------------------------ forward
    @property
    def null_label(self) -> int | None:
        """The reserved classifier-free-guidance label (``num_classes``), or ``None``."""
        return self.config.num_classes

    def embed(self, c_noise: Tensor, labels: Tensor | TextCond | None, batch: int,
              w: Tensor | None = None) -> Tensor:
        """Time (+ class or pooled prompt, + guidance scale w [B]) embedding, SiLU-activated:
        -> [B, E]."""
        c_noise = broadcast_c_noise(c_noise, batch)
        emb = self.time_mlp(timestep_embedding(c_noise, self.config.base_channels))
        if self.guidance_mlp is not None:
            if w is None:
                raise ValueError("this network takes the guidance scale as an input: give a "
                                 "GuidanceCond (Pipeline.denoiser(guidance=w) does)")
            w = broadcast_c_noise(w.to(device=emb.device, dtype=torch.float32), batch)
            emb = emb + self.guidance_mlp(timestep_embedding(
                w * GUIDANCE_EMBED_SCALE, self.config.base_channels)).to(emb.dtype)
        elif w is not None:
            raise ValueError("a guidance scale given to a network built without "
                             "guidance_embedding")
        if self.context_emb is not None:
            if labels is not None:
                emb = emb + self.context_emb(pooled_context(labels).to(emb.dtype))
        elif isinstance(labels, TextCond):
            raise ValueError("a prompt given to a model built without context_dim")
        elif self.label_emb is not None:
            labels = resolve_labels(labels, batch, self.config.num_classes, c_noise.device,
                                    check_range=self.check_labels)
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels given to a model built without num_classes")
        return F.silu(emb)

    def forward(self, x: Tensor, c_noise: Tensor,
                labels: Tensor | TextCond | GuidanceCond | None = None, *,
                skip_residuals: Sequence[Tensor] | None = None,
                middle_residual: Tensor | None = None) -> Tensor:
        """Predict from noisy ``x``.

        Args:
            x: ``[B, in_channels, H, W]``, H and W divisible by ``2**(levels - 1)``;
                contiguous or channels_last.
            c_noise: ``[B]`` (or scalar, broadcast) float noise conditioning.
            labels: ``[B]`` long in ``[0, num_classes]`` for class-conditional models
                (``num_classes`` = null label); ``None`` means the null label. For
                text-conditional models (``context_dim``) a :class:`TextCond` of ``B`` rows,
                or ``None`` for no prompt at all (cross-attention off, no pooled term).
                With ``guidance_embedding``: a :class:`GuidanceCond` of any of these and the
                guidance scales w [B].
            skip_residuals: one tensor per skip activation (``conv_in``'s output, then each
                down block's), added to it before the up path reads it; with
                ``middle_residual`` (added to the middle block's output) this is how a
                ControlNet steers the network (Zhang et al. 2023, sec. 3.2). None: no
                residuals (the plain U-Net).

        Returns:
            ``[B, out_channels, H, W]``.
        """
        self._check_input(x)
        w = None
        if isinstance(labels, GuidanceCond):
            labels, w = labels.cond, labels.w
        emb = self.embed(c_noise, labels, x.shape[0], w)  # [B, E]
        ctx = labels if isinstance(labels, TextCond) else None  # tokens [B, L, D] + mask
        h = self.conv_in(x)  # [B, base, H, W]
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, ctx)
            skips.append(h)
        h = self._run(self.middle, h, emb, ctx)  # [B, base*mult[-1], H/2**(L-1), W/2**(L-1)]
        if skip_residuals is not None:
            if len(skip_residuals) != len(skips):
                raise ValueError(f"{len(skip_residuals)} skip residuals given for "
                                 f"{len(skips)} skip connections")
            skips = [s + r for s, r in zip(skips, skip_residuals, strict=True)]
        if middle_residual is not None:
            h = h + middle_residual
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, ctx)
        norm, _, conv = self.out  # GroupNorm, SiLU, conv
        return conv(norm_act(h, norm))  # [B, out_channels, H, W]

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor,
             ctx: TextCond | None = None) -> Tensor:
        """``block(h, emb, ctx)``, through activation checkpointing when on and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, ctx, use_reentrant=False)
        return block(h, emb, ctx)

    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x must have shape [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {factor}")


def with_guidance_embedding(net: UNet) -> UNet:
    """A copy of ``net`` that also takes the guidance scale as an input (``UNetConfig.
    guidance_embedding``), with all of ``net``'s weights and a fresh embedding whose last layer
    is zero: for every w its output equals ``net``'s exactly, until it is trained (the start
    of guidance distillation, Meng et al. 2023, and of latent consistency distillation, Luo
    et al. 2023). The copy is in training mode with gradients, in ``net``'s memory format."""
    if net.config.guidance_embedding:
        raise ValueError("the network already takes the guidance scale as an input")
    out = UNet(replace(net.config, guidance_embedding=True))
    missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_mlp.") for k in missing)
    out.check_labels = net.check_labels
    param = next(net.parameters())
    out.to(param.device)
    if any(is_channels_last(p) for p in net.parameters() if p.ndim == 4):
        out.to(memory_format=torch.channels_last)
    return out.train().requires_grad_(True)
