"""Attribute check for samples of the shapes data set: which colour, shape, size and position
does an image show?

Colour and position come from pixel statistics: the nearest palette colour to the mean
colour of the foreground (pixels whose brightest channel is above mid-range on the black
background), and the quadrant of the intensity-weighted centroid. Shape and size (jointly, as
size depends on the shape's area) come from a small scikit-learn MLP fitted on the foreground
intensity of clean procedural images (every
attribute combination, held-out pairs included: the checker is independent of any diffusion
model and only needs to read the generated pictures).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.shapes import COLOURS, CaptionedImageData

__all__ = ["ShapeAttributeChecker", "attribute_accuracy"]

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")


def _intensity(images: Tensor) -> Tensor:
    """Foreground intensity [N, H, W] in [0, 1]: the brightest channel."""
    return ((images.float().clamp(-1, 1) + 1) / 2).amax(dim=1)


class ShapeAttributeChecker:
    """``fit(clean data)`` then ``predict(images [N, 3, H, W] in [-1, 1]) -> [N, 4]`` indices
    (shape, colour, size, position) in the order of :class:`CaptionedImageData.attributes`."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.palette = torch.tensor(list(COLOURS.values()))  # [K, 3]
        self.shape_clf = None

    def fit(self, data: CaptionedImageData) -> ShapeAttributeChecker:
        from sklearn.neural_network import MLPClassifier

        inten = _intensity(data.images)
        self.shape_clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300,
                                       random_state=self.seed)
        joint = data.attributes[:, 0] * 2 + data.attributes[:, 2]  # shape x size: 6 classes
        self.shape_clf.fit(inten.flatten(1).numpy(), joint.numpy())
        return self

    def predict(self, images: Tensor) -> Tensor:
        if self.shape_clf is None:
            raise RuntimeError("call fit() first")
        inten = _intensity(images)  # [N, H, W]
        fg = (inten > 0.5).float()
        rgb = (images.float().clamp(-1, 1) + 1) / 2  # [N, 3, H, W]
        mean_rgb = (rgb * fg[:, None]).sum((2, 3)) / fg.sum((1, 2)).clamp(min=1)[:, None]
        colour = torch.cdist(mean_rgb, self.palette).argmin(1)
        h, w = inten.shape[1:]
        ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
        mass = inten.sum((1, 2)).clamp(min=1e-6)
        cy, cx = (inten * ys).sum((1, 2)) / mass, (inten * xs).sum((1, 2)) / mass
        position = (cy >= h / 2).long() * 2 + (cx >= w / 2).long()
        joint = torch.as_tensor(self.shape_clf.predict(inten.flatten(1).numpy())).long()
        return torch.stack([joint // 2, colour, joint % 2, position], dim=1)


def attribute_accuracy(predicted: Tensor, target: Tensor) -> dict[str, float]:
    """Per-attribute accuracy and the share of images with every attribute right."""
    hit = (predicted == target).numpy()
    out = {name: float(hit[:, i].mean()) for i, name in enumerate(ATTRIBUTES)}
    out["all"] = float(np.all(hit, axis=1).mean())
    return out
