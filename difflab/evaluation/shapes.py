"""Attribute check for samples of the shapes data set: which colour, shape, size and position
does an image show?

Everything is read from the foreground mask: pixels whose brightness (brightest channel) is
above the midpoint between the image's median brightness (the background: a shape covers
under a fifth of the image) and its peak. The mask, not raw brightness, makes the check
insensitive to a tinted or slightly noisy background, which samples of a briefly trained model
have. Colour: the nearest palette colour to the mean foreground colour; position: the
quadrant of the mask's centroid; shape and size (jointly, as size depends on the shape's
area): a small scikit-learn MLP fitted on the masks of clean procedural images (every
attribute combination, held-out pairs included: the checker is independent of any diffusion
model and only needs to read the generated pictures). Given a ``palette`` and fitted on data
with the new shape (``data.shapes.ALL_COLOURS``, ``load_shape_variants``), it reads the
attributes a base model never saw too.

:func:`mask_iou` and :func:`masked_psnr` score spatial control and edits against a mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..data.shapes import COLOURS, CaptionedImageData

__all__ = ["ShapeAttributeChecker", "attribute_accuracy", "foreground", "mask_iou",
           "masked_psnr"]

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")


def foreground(images: Tensor) -> Tensor:
    """Soft foreground [N, H, W] in [0, 1] of images [N, 3, H, W] in [-1, 1]: brightness
    rescaled so the background (median) is 0 and the peak 1; ``> 0.5`` is the mask."""
    inten = ((images.float().clamp(-1, 1) + 1) / 2).amax(dim=1)  # brightest channel
    background = inten.flatten(1).median(dim=1).values[:, None, None]
    peak = inten.amax(dim=(1, 2), keepdim=True)
    return ((inten - background) / (peak - background).clamp(min=1e-6)).clamp(0, 1)


class ShapeAttributeChecker:
    """``fit(clean data)`` then ``predict(images [N, 3, H, W] in [-1, 1]) -> [N, 4]`` indices
    (shape, colour, size, position) in the order of :class:`CaptionedImageData.attributes`.

    ``palette``: the colours it can read, name -> RGB in [0, 1], in index order (default: the
    data set's :data:`~difflab.data.shapes.COLOURS`); the shapes are those of the fit data."""

    def __init__(self, seed: int = 0,
                 palette: Mapping[str, tuple[float, float, float]] | None = None):
        self.seed = seed
        self.palette = torch.tensor(list((COLOURS if palette is None else palette).values()))
        self.shape_clf = None

    def fit(self, data: CaptionedImageData) -> ShapeAttributeChecker:
        from sklearn.neural_network import MLPClassifier

        fg = foreground(data.images)  # soft: keeps the anti-aliased edges of small shapes
        self.shape_clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300,
                                       random_state=self.seed)
        joint = data.attributes[:, 0] * 2 + data.attributes[:, 2]  # shape x size: 6 classes
        self.shape_clf.fit(fg.flatten(1).numpy(), joint.numpy())
        return self

    def predict(self, images: Tensor) -> Tensor:
        if self.shape_clf is None:
            raise RuntimeError("call fit() first")
        soft = foreground(images)  # [N, H, W]
        fg = (soft > 0.5).float()
        rgb = (images.float().clamp(-1, 1) + 1) / 2  # [N, 3, H, W]
        mean_rgb = (rgb * fg[:, None]).sum((2, 3)) / fg.sum((1, 2)).clamp(min=1)[:, None]
        colour = torch.cdist(mean_rgb, self.palette).argmin(1)
        h, w = fg.shape[1:]
        ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
        mass = fg.sum((1, 2)).clamp(min=1e-6)
        cy, cx = (fg * ys).sum((1, 2)) / mass, (fg * xs).sum((1, 2)) / mass
        position = (cy >= h / 2).long() * 2 + (cx >= w / 2).long()
        joint = torch.as_tensor(self.shape_clf.predict(soft.flatten(1).numpy())).long()
        return torch.stack([joint // 2, colour, joint % 2, position], dim=1)


def attribute_accuracy(predicted: Tensor, target: Tensor) -> dict[str, float]:
    """Per-attribute accuracy and the share of images with every attribute right."""
    hit = (predicted == target).numpy()
    out = {name: float(hit[:, i].mean()) for i, name in enumerate(ATTRIBUTES)}
    out["all"] = float(np.all(hit, axis=1).mean())
    return out


def mask_iou(images: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Intersection over union [N] of each image's foreground (:func:`foreground` >
    ``threshold``) and a mask [N, H, W] or [N, 1, H, W] (> 0.5 is inside); 1 where both are
    empty. (The soft foreground of a clean image is its shape's coverage, so ``threshold``
    sets which anti-aliased edge pixels count, as a control mask's threshold does.)"""
    fg = foreground(images) > threshold
    target = (masks.reshape(fg.shape) > 0.5)
    inter = (fg & target).sum((1, 2)).float()
    union = (fg | target).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def masked_psnr(x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
    """PSNR [N] in dB between images [N, C, H, W] in [-1, 1] over the pixels where ``keep``
    [N, H, W] is true (peak-to-peak 2); inf where they agree exactly there."""
    keep = keep.reshape(len(x), 1, *x.shape[2:]).float()
    se = ((x.float() - y.float()) ** 2 * keep).sum((1, 2, 3))
    mse = se / (keep.sum((1, 2, 3)) * x.shape[1]).clamp(min=1)
    return 10 * torch.log10(4 / mse)
