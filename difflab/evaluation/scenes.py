"""Attribute accuracy for the scenes data set: does a generated image show the main object it
was conditioned on?

The reader is the built-in feature network of ``scenes`` (:mod:`.builtin`: trained on the clean
train split, cached, the same network whose features give the FID), which classifies an image
by its large main object (12 classes: shape x colour). The accuracy of generated images is the
share whose predicted class equals the class they were asked for, given as class indices or as
captions (``scenes:captions`` prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data.scenes import CLASS_NAMES, parse_scene_caption
from .builtin import BUILTIN_STEPS, builtin_feature_net
from .featurenet import FeatureNet

__all__ = ["scene_classes", "scenes_accuracy", "scenes_classifier"]


def scenes_classifier(resolution: int = 64, steps: int = BUILTIN_STEPS,
                      log=print) -> FeatureNet:
    """The built-in scenes network for ``resolution`` px images (trained on first use)."""
    return builtin_feature_net("scenes", resolution, 3, steps, log)[0]


def scene_classes(conditions: Tensor | Sequence[int] | Sequence[str]) -> Tensor:
    """Class indices [N] of conditions given as class indices or as scenes captions."""
    if isinstance(conditions, Tensor):
        return conditions.long().flatten()
    items = list(conditions)
    if items and isinstance(items[0], str):
        return torch.tensor([parse_scene_caption(t)[0] for t in items])
    return torch.tensor([int(c) for c in items], dtype=torch.long)


@torch.no_grad()
def scenes_accuracy(images: Tensor, conditions: Tensor | Sequence[int] | Sequence[str],
                    model: FeatureNet | None = None, batch_size: int = 256) -> float:
    """Share of ``images`` ([N, 3, H, W] in [-1, 1]) whose main object's class, as read by
    ``model`` (default: :func:`scenes_classifier` at the images' resolution), equals its
    condition (class indices into :data:`~difflab.data.scenes.CLASS_NAMES` or captions).

    Raises:
        ValueError: images and conditions differ in number, or a class is out of range."""
    target = scene_classes(conditions)
    if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(target):
        raise ValueError(f"scenes_accuracy needs [N, 3, H, W] images and N conditions, got "
                         f"images {tuple(images.shape)} and {len(target)} conditions")
    if len(target) and not 0 <= int(target.min()) <= int(target.max()) < len(CLASS_NAMES):
        raise ValueError(f"scenes classes are 0..{len(CLASS_NAMES) - 1}, got "
                         f"{int(target.min())}..{int(target.max())}")
    model = model if model is not None else scenes_classifier(int(images.shape[-1]))
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for s in range(0, len(images), batch_size):
        logits = model(images[s:s + batch_size].to(device))[1]
        hits += int((logits.argmax(1).cpu() == target[s:s + batch_size]).sum())
    return hits / max(1, len(target))
