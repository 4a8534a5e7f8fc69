"""Control images for ControlNet (Zhang et al. 2023): computed from images, read from files.

A control image is ``[N, C, H, W]`` with values in [0, 1] (C = 1 for the kinds here), the
size of the images it controls. Kinds (:data:`CONTROL_KINDS`):

- ``edges``: Sobel gradient magnitude of the luminance, thresholded (1 on edges, 0 elsewhere);
  the gradient of a unit step between two pixels has magnitude 4 with Sobel's kernels, so the
  magnitude is divided by 4 before the threshold.
- ``mask``: the foreground (1 where the brightest channel is above the threshold), for data
  whose objects lie on a black background (``shapes``, ``scenes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError
from .images import load_png, save_images

__all__ = ["CONTROL_KINDS", "control_image", "edges", "foreground_mask", "read_control_image",
           "save_control_image"]

#: Sobel kernel of d/dx (rows: y, columns: x); d/dy is its transpose
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
#: ITU-R BT.601 luma weights of R, G, B
LUMA = (0.299, 0.587, 0.114)


def _unit(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` images in [-1, 1] -> [0, 1] (float32), after a shape check."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {list(images.shape)}")
    return ((images.float() + 1) / 2).clamp(0, 1)


def edges(images: Tensor, threshold: float = 0.1) -> Tensor:
    """Edge map ``[N, 1, H, W]`` in {0, 1}: |Sobel gradient of the luminance| / 4 >
    ``threshold`` (images in [-1, 1]; borders replicated)."""
    x = _unit(images)
    if x.shape[1] == 3:
        luma = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)
    kx = SOBEL_X.to(x.device).view(1, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))
    magnitude = torch.sqrt(gx**2 + gy**2) / 4  # a unit step: 1
    return (magnitude > threshold).float()


def foreground_mask(images: Tensor, threshold: float = 0.25) -> Tensor:
    """Foreground mask ``[N, 1, H, W]`` in {0, 1}: the brightest channel (in [0, 1]) above
    ``threshold`` (objects on a black background)."""
    return (_unit(images).amax(dim=1, keepdim=True) > threshold).float()


#: kind -> function of images in [-1, 1]
CONTROL_KINDS: dict[str, Callable[[Tensor], Tensor]] = {
    "edges": edges,
    "mask": foreground_mask,
}


def control_image(images: Tensor, kind: str) -> Tensor:
    """The control images of ``kind`` (:data:`CONTROL_KINDS`) of ``images`` [N, C, H, W] in
    [-1, 1]: ``[N, 1, H, W]`` in {0, 1}, on the images' device."""
    fn = CONTROL_KINDS.get(kind)
    if fn is None:
        raise ValueError(f"unknown control kind {kind!r}; choose from {sorted(CONTROL_KINDS)}")
    return fn(images)


def read_control_image(path: str | os.PathLike[str], resolution: int,
                       channels: int = 1) -> Tensor:
    """A control image file as ``[1, channels, resolution, resolution]`` in [0, 1] (grey for
    1 channel, RGB for 3; resized and centre-cropped to ``resolution``).

    Raises:
        DataError: the file is missing or unreadable (the message names it)."""
    if channels not in (1, 3):
        raise DataError(f"control image {path}: a ControlNet taking {channels} channels "
                        "cannot read image files (1 or 3 channels)")
    x = load_png(path, channels=channels, resolution=resolution)
    return ((x + 1) / 2).clamp(0, 1).unsqueeze(0)


def save_control_image(control: Tensor, directory: str | os.PathLike[str],
                       prefix: str = "control") -> list[os.PathLike[str]]:
    """Write control images ``[N, C, H, W]`` in [0, 1] as PNGs (one per image, the names of
    :func:`difflab.data.save_images`); :func:`read_control_image` reads them back."""
    if control.ndim != 4:
        raise ValueError(f"control images must be [N, C, H, W], got {list(control.shape)}")
    return list(save_images(control.float() * 2 - 1, directory, prefix))
