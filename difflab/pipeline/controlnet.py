"""ControlNet stages in a pipeline: applying one, and giving the control images at sampling.

A ``"controlnet"`` stage (:data:`~difflab.pipeline.card.ADAPTER_KINDS`) wraps the pipeline's
U-Net in a :class:`~difflab.networks.controlnet.ControlledUNet` (the first such stage) or adds
itself to it (the next ones; their residuals are summed, each times its ``stage.scale``, the
conditioning scale). The control images are given per call, ``pipe(..., control=...)``, and
stay set for later calls (``pipe.denoiser()`` for editing uses them too):

- one control for all ControlNets when there is one, else a list with one per ControlNet;
- each control is a file path (read as the ControlNet's channels and resized to the model's
  resolution), a tensor ``[C, H, W]`` or ``[1, C, H, W]`` (one control image for every sample)
  or ``[n, C, H, W]`` (one per sample; such draws run in one batch), values in [0, 1].

Classifier-free guidance gives the conditional and the null rows the same control image
(:func:`~difflab.networks.controlnet.batch_hint`), so control works with every sampler and
with guidance through the pipeline's denoiser unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..data.control import read_control_image
from ..networks.controlnet import ControlledUNet, ControlNet
from ..networks.unet import UNet
from .card import StageCard

__all__ = ["ControlSpec", "apply_controlnet", "control_batch_size", "controlled",
           "set_control", "set_control_scales"]

#: one control image: a file, or a tensor [C, H, W] / [K, C, H, W] in [0, 1]
ControlImage = str | os.PathLike[str] | Tensor
ControlSpec = ControlImage | Sequence[ControlImage]


def apply_controlnet(pipe: Any, stage: StageCard, module: nn.Module) -> None:
    """The ``ADAPTERS["controlnet"]`` function: wrap (or extend) ``pipe.net``."""
    if not isinstance(module, ControlNet):
        raise ValueError(f"stage {stage.name!r}: a controlnet stage needs network "
                         f"'controlnet', got {stage.network!r}")
    net = pipe.net
    if not isinstance(net, ControlledUNet):
        if not isinstance(net, UNet):
            raise ValueError(f"stage {stage.name!r}: a ControlNet steers a U-Net; this "
                             f"model's network is {type(net).__name__}")
        net = ControlledUNet(net)
    if module.config.unet != net.config:
        raise ValueError(f"stage {stage.name!r}: the ControlNet was made for another U-Net "
                         "(its unet config differs from the base model's)")
    net.add(module, stage.scale)
    pipe.net = net


def controlled(pipe: Any) -> ControlledUNet:
    """``pipe.net`` as a ControlledUNet; a ValueError when the model has no ControlNet."""
    if not isinstance(pipe.net, ControlledUNet) or not len(pipe.net.controlnets):
        raise ValueError("--control needs a model with a ControlNet (a 'difflab "
                         "train-controlnet' run, or one loaded with --adapter)")
    return pipe.net


def _hint(spec: ControlImage, net: ControlNet, shape: Sequence[int]) -> Tensor:
    """One control as ``[K, C_h, H, W]`` float32 in [0, 1] for samples of ``shape``."""
    channels, size = net.config.hint_channels, tuple(shape[-2:])
    if isinstance(spec, Tensor):
        x = spec.unsqueeze(0) if spec.ndim == 3 else spec
        if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != size:
            raise ValueError(f"control image tensor must be [K, {channels}, {size[0]}, "
                             f"{size[1]}], got {list(spec.shape)}")
        return x.float()
    if size[0] != size[1]:
        raise ValueError(f"control image files need square samples, not {list(size)}")
    return read_control_image(spec, size[0], channels)


def set_control(pipe: Any, control: ControlSpec) -> None:
    """Set the control images of ``pipe``'s ControlNets (see the module docstring)."""
    net = controlled(pipe)
    k = len(net.controlnets)
    specs = (list(control) if isinstance(control, (list, tuple))
             else [control])
    if len(specs) != k:
        raise ValueError(f"{len(specs)} control images given for {k} ControlNets (one "
                         "--control per ControlNet)")
    net.set_hints([_hint(s, cn, pipe.sample_shape).to(pipe.device)
                   for s, cn in zip(specs, net.controlnets, strict=True)])


def set_control_scales(pipe: Any, scales: Sequence[float]) -> None:
    """The conditioning scale of the first ``len(scales)`` ControlNets (the card's stage
    scales follow)."""
    net = controlled(pipe)
    if len(scales) > len(net.controlnets):
        raise ValueError(f"{len(scales)} control scales given for {len(net.controlnets)} "
                         "ControlNets")
    stages = [s for s in pipe.card.stages if s.kind == "controlnet"]
    for i, scale in enumerate(scales):
        net.scales[i] = float(scale)
        if i < len(stages):
            stages[i].scale = float(scale)


def control_batch_size(pipe: Any, batch_size: int, n: int) -> int:
    """The batch size to draw ``n`` samples with: at least ``n`` when a control has one image
    per sample (a batch then holds all of them), else ``batch_size``."""
    net = pipe.net
    if not isinstance(net, ControlledUNet):
        return batch_size
    net.check_hints()
    per_sample = [h.shape[0] for h in net.hints if h is not None and h.shape[0] > 1]
    for k in per_sample:
        if k != n:
            raise ValueError(f"{k} control images for {n} samples: give one control image "
                             "for all samples or one per sample")
    return max(batch_size, n) if per_sample else batch_size

