"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models") for difflab's :class:`~difflab.networks.unet.UNet`.

A ControlNet is a trainable copy of the U-Net's encoder (time/class/prompt embedding,
``conv_in``, the down blocks and the middle block), initialised from the base network's
weights. A control image c (an edge map, a mask; same size as the samples) goes through a small
hint encoder whose last convolution is zero-initialised and is added to the copy's first
features (eq. 2's ``Z(c)``). Every skip activation of the copy and its middle output pass
through a zero-initialised 1x1 convolution ("zero convolution", eq. 2) and are added, times a
conditioning scale, to the base U-Net's skip connections and middle output
(``UNet.forward(..., skip_residuals=, middle_residual=)``). Freshly built, all residuals are
exactly zero, so the controlled network equals the base bit for bit until trained.

:class:`ControlledUNet` runs the base with any number of ControlNets, each with its scale and
control image; their residuals are summed (multi-control, Zhang et al. sec. 3.4).

Control images and the batch (documented here because every sampler and classifier-free
guidance go through it): a control image tensor is ``[K, C, H, W]`` with values in [0, 1];
``K = 1`` is one control image for every sample, ``K = B`` one per sample, and a batch of
``2K`` rows takes the K control images twice -- classifier-free guidance concatenates the
conditional and the null rows of the same x (``guidance.cfg``), so both branches see the
same control, as in Zhang et al.'s CFG. Any other batch size is an error.

Shapes in comments: ``B`` batch, ``C_h`` control-image channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.conditioning import GuidanceCond, TextCond
from difflab.config import option
from difflab.networks.unet import UNet, UNetConfig, zero_module

__all__ = ["ControlNet", "ControlNetConfig", "ControlResiduals", "ControlledUNet",
           "batch_hint"]


def _unet_config(value: UNetConfig | dict[str, Any]) -> UNetConfig:
    return value if isinstance(value, UNetConfig) else UNetConfig(**value)


@dataclass
class ControlNetConfig:
    """Hyper-parameters of :class:`ControlNet` (JSON via ``dataclasses.asdict``).

    Attributes:
        unet: the base U-Net's config (the copy's architecture is the base's encoder).
        hint_channels: channels of the control image (1 for an edge map or a mask, 3 RGB).
        hint_widths: widths of the hint encoder's hidden 3x3 convolutions.
        control: what control images it was trained on (``data.control`` kinds; a record).
    """

    unet: UNetConfig = option(help="the base U-Net's config", factory=UNetConfig)
    hint_channels: int = option(1, "channels of the control image (1: edges/mask, 3: RGB)")
    hint_widths: tuple[int, ...] = option((16, 32), "hidden widths of the hint encoder")
    control: str = option("edges", "the kind of control image it was trained on")

    def __post_init__(self) -> None:
        self.unet = _unet_config(self.unet)
        self.hint_widths = tuple(int(w) for w in self.hint_widths)
        if self.hint_channels < 1:
            raise ValueError(f"hint_channels must be >= 1, got {self.hint_channels}")
        if not self.hint_widths or min(self.hint_widths) < 1:
            raise ValueError(f"hint_widths must be non-empty and >= 1, got {self.hint_widths}")


@dataclass
class ControlResiduals:
    """What a ControlNet adds to its base: one tensor per skip activation and the middle."""

    skips: list[Tensor]
    middle: Tensor

    def scaled(self, scale: float) -> ControlResiduals:
        return ControlResiduals([scale * s for s in self.skips], scale * self.middle)

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        return ControlResiduals([a + b for a, b in zip(self.skips, other.skips, strict=True)],
                                self.middle + other.middle)


def skip_widths(cfg: UNetConfig) -> list[int]:
    """Channels of each skip activation of a U-Net of ``cfg`` (``conv_in``, then every down
    block's output, as ``UNet._build_down`` emits them)."""
    widths = [cfg.base_channels]
    for level, mult in enumerate(cfg.channel_mult):
        widths += [cfg.base_channels * mult] * cfg.num_res_blocks
        if level < len(cfg.channel_mult) - 1:
            widths.append(widths[-1])
    return widths


class ControlNet(nn.Module):
    """``forward(x, c_noise, labels, hint [B, C_h, H, W]) -> ControlResiduals``.

    ``encoder`` is a U-Net without its up path (same parameter names as the base's, so
    :meth:`from_unet` copies them); ``hint_encoder`` maps the control image to the first
    level's width (last layer zero); ``zero_convs[i]`` / ``middle_out`` are the zero
    convolutions on the skip activations and the middle output."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config.unet
        encoder = UNet(cfg)
        del encoder.up, encoder.out  # the trainable copy is the encoder only
        self.encoder = encoder
        layers: list[nn.Module] = []
        ch = config.hint_channels
        for width in config.hint_widths:
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.SiLU()]
            ch = width
        layers.append(zero_module(nn.Conv2d(ch, cfg.base_channels, 3, padding=1)))
        self.hint_encoder = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(w, w, 1))
                                        for w in skip_widths(cfg))
        mid = cfg.base_channels * cfg.channel_mult[-1]
        self.middle_out = zero_module(nn.Conv2d(mid, mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 1, *, control: str = "edges",
                  hint_widths: Sequence[int] = (16, 32)) -> ControlNet:
        """A ControlNet for ``unet``: its encoder a copy of ``unet``'s weights, on the same
        device, in training mode with gradients (Zhang et al. sec. 3.2)."""
        net = cls(ControlNetConfig(unet=unet.config, hint_channels=hint_channels,
                                   hint_widths=tuple(hint_widths), control=control))
        state = {k: v for k, v in unet.state_dict().items()
                 if not k.startswith(("up.", "out."))}
        net.encoder.load_state_dict(state)
        net.encoder.check_labels = unet.check_labels
        return net.to(next(unet.parameters()).device).train().requires_grad_(True)

    def forward(self, x: Tensor, c_noise: Tensor,
                labels: Tensor | TextCond | GuidanceCond | None, hint: Tensor
                ) -> ControlResiduals:
        """Residuals for the base's skips and middle. ``hint`` [B, C_h, H, W] in [0, 1],
        the size of ``x``; the other arguments as ``UNet.forward``'s."""
        enc = self.encoder
        enc._check_input(x)
        if hint.ndim != 4 or hint.shape[0] != x.shape[0] or hint.shape[1] != \
                self.config.hint_channels or hint.shape[2:] != x.shape[2:]:
            raise ValueError(f"control image must have shape [{x.shape[0]}, "
                             f"{self.config.hint_channels}, {x.shape[2]}, {x.shape[3]}], "
                             f"got {list(hint.shape)}")
        w = None
        if isinstance(labels, GuidanceCond):
            labels, w = labels.cond, labels.w
        emb = enc.embed(c_noise, labels, x.shape[0], w)  # [B, E]
        ctx = labels if isinstance(labels, TextCond) else None
        # the copy's input: x's features plus the zero-initialised hint features (eq. 2)
        h = enc.conv_in(x) + self.hint_encoder(hint.to(x.dtype))  # [B, base, H, W]
        skips = [self.zero_convs[0](h)]
        for block, zero in zip(enc.down, self.zero_convs[1:], strict=True):
            h = enc._run(block, h, emb, ctx)
            skips.append(zero(h))
        h = enc._run(enc.middle, h, emb, ctx)
        return ControlResiduals(skips, self.middle_out(h))


def batch_hint(hint: Tensor, batch: int) -> Tensor:
    """``hint`` [K, C, H, W] for a batch of ``batch`` rows: K = 1 broadcasts, K = batch is
    one per row, batch = 2K repeats them (classifier-free guidance's [cond; null] rows of the
    same x); anything else is a ValueError."""
    k = hint.shape[0]
    if k == batch:
        return hint
    if k == 1:
        return hint.expand(batch, *hint.shape[1:])
    if batch == 2 * k:
        return torch.cat([hint, hint])
    raise ValueError(f"{k} control images for a batch of {batch}: give one control image "
                     "for all samples or one per sample")


class ControlledUNet(nn.Module):
    """A base U-Net steered by ControlNets: ``forward(x, c_noise, labels)`` as the base's.

    ``controls``: (ControlNet, conditioning scale) pairs; ``hints``: their control images
    (``[K, C_h, H, W]``, see :func:`batch_hint`), settable later with :meth:`set_hints`. A
    ControlNet at scale 0 is not run; with none active the base runs exactly as alone."""

    def __init__(self, base: UNet, controls: Sequence[tuple[nn.Module, float]] = (),
                 hints: Sequence[Tensor | None] | None = None) -> None:
        super().__init__()
        self.base = base
        self.controlnets = nn.ModuleList()
        self.scales: list[float] = []
        self.hints: list[Tensor | None] = []
        for net, scale in controls:
            self.add(net, scale)
        if hints is not None:
            self.set_hints(hints)

    # what the pipeline and guidance read from a network: the base's
    @property
    def config(self) -> UNetConfig:
        return self.base.config

    @property
    def out_channels(self) -> int:
        return self.base.out_channels

    @property
    def null_label(self) -> int | None:
        return self.base.null_label

    def add(self, net: nn.Module, scale: float = 1.0) -> None:
        """Append a ControlNet with its conditioning scale (no control image yet)."""
        self.controlnets.append(net)
        self.scales.append(float(scale))
        self.hints.append(None)

    def set_hints(self, hints: Sequence[Tensor | None]) -> None:
        """One control image tensor (or None) per ControlNet, in order."""
        if len(hints) != len(self.controlnets):
            raise ValueError(f"{len(hints)} control images given for "
                             f"{len(self.controlnets)} ControlNets")
        self.hints = list(hints)

    def check_hints(self) -> None:
        """A ValueError when an active ControlNet (scale != 0) has no control image."""
        for i, (scale, hint) in enumerate(zip(self.scales, self.hints, strict=True)):
            if scale != 0.0 and hint is None:
                raise ValueError(f"ControlNet {i} has no control image (give --control IMAGE, "
                                 "or control= to the pipeline)")

    def residuals(self, x: Tensor, c_noise: Tensor, labels: Any) -> ControlResiduals | None:
        """The scaled sum of the active ControlNets' residuals (None: none active)."""
        total = None
        for net, scale, hint in zip(self.controlnets, self.scales, self.hints, strict=True):
            if scale == 0.0:
                continue
            if hint is None:
                self.check_hints()
            hint = batch_hint(hint.to(x.device), x.shape[0])
            r = net(x, c_noise, labels, hint)
            r = r if scale == 1.0 else r.scaled(scale)
            total = r if total is None else total + r
        return total

    def forward(self, x: Tensor, c_noise: Tensor, labels: Any = None) -> Tensor:
        r = self.residuals(x, c_noise, labels)
        if r is None:
            return self.base(x, c_noise, labels)
        return self.base(x, c_noise, labels, skip_residuals=r.skips, middle_residual=r.middle)
