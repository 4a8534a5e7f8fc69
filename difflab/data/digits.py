"""The scikit-learn handwritten digits: 1797 grey 8x8 images of the digits 0-9.

The data ship with scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .base import DataError, ImageData, check_split, split_data

NATIVE_RESOLUTION = 8


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ([1797, 1, 8, 8] float32 in [-1, 1], [1797] int64), loaded once."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    images = (images / 16.0 * 2.0 - 1.0).clamp(-1.0, 1.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images.contiguous(), labels


def load_digits(
    resolution: int = 8, split: str = "all", test_fraction: float = 0.2, seed: int = 0
) -> ImageData:
    """Load the scikit-learn digits as ``[N, 1, resolution, resolution]`` images in ``[-1, 1]``.

    Args:
        resolution: output size; a positive multiple of 8. Sizes above 8 are upscaled with
            bilinear (antialiased) interpolation.
        split: "all" (1797 images), "train" or "test". The split is stratified by class and
            fixed by ``seed``; train and test are disjoint and together give "all".
        test_fraction: fraction of each class put in the test split, in (0, 1).
        seed: seed of the split permutation.

    Returns:
        :class:`ImageData` with labels 0..9 and class_names ``["0", ..., "9"]``.

    Raises:
        DataError: bad ``resolution``, ``split`` or ``test_fraction``.
    """
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or resolution < NATIVE_RESOLUTION
        or resolution % NATIVE_RESOLUTION
    ):
        raise DataError(
            f"invalid resolution {resolution!r} for the digits dataset: must be a positive "
            f"multiple of {NATIVE_RESOLUTION}"
        )
    check_split(split, test_fraction)
    images, labels = _raw_digits()
    if resolution != NATIVE_RESOLUTION:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False,
            antialias=True,
        ).clamp(-1.0, 1.0)
    data = ImageData(images.contiguous().clone(), labels.clone(), [str(d) for d in range(10)])
    return split_data(data, split, test_fraction, seed)
