"""Common data container, the error type, pixel scaling and train/test splitting.

Every loader in :mod:`difflab.data` returns an :class:`ImageData`: the whole (small) data set
held pre-decoded as one float32 tensor ``[N, C, H, W]`` with values in ``[-1, 1]``.

Pixel scaling is the same everywhere in the package: a byte value ``u`` in ``0..255`` maps to
``u / 127.5 - 1`` (:func:`from_uint8`) and back with ``round((x + 1) * 127.5)`` after clamping
to ``[-1, 1]`` (:func:`to_uint8`), so ``to_uint8(from_uint8(u)) == u`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SPLITS = ("all", "train", "test")


class DataError(ValueError):
    """Bad input to a data loader: missing or unreadable files, invalid options, bad names.

    The message always names the offending path or option.
    """


@dataclass
class ImageData:
    """A pre-decoded image data set.

    Attributes:
        images: ``[N, C, H, W]`` float32 tensor with values in ``[-1, 1]``.
        labels: ``[N]`` int64 class indices, or ``None`` for unlabelled data.
        class_names: names of the label indices (``class_names[labels[i]]``); ``[]`` if
            unlabelled.
    """

    images: Tensor
    labels: Tensor | None = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.ndim != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else None
            raise DataError(f"ImageData.images must be a [N, C, H, W] tensor, got shape {shape}")
        if self.labels is not None:
            if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
                raise DataError(
                    f"ImageData.labels must have shape [{self.images.shape[0]}], "
                    f"got {tuple(self.labels.shape)}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or ``None`` for unlabelled data."""
        if self.labels is None:
            return None
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max().item()) + 1 if self.labels.numel() else 0

    @property
    def channels(self) -> int:
        """Number of image channels ``C``."""
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        """Image height ``H`` (all loaders produce square images)."""
        return int(self.images.shape[2])

    def subset(self, indices: Tensor) -> ImageData:
        """Return the items at ``indices`` (an int64 index tensor) as a new :class:`ImageData`."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[indices] if self.labels is not None else None
        return ImageData(self.images[indices].contiguous(), labels, list(self.class_names))


@dataclass
class PointData:
    """A data set of points in R^D (2-D toys): ``points`` [N, D] float32, unlabelled."""

    points: Tensor
    labels: Tensor | None = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.points, Tensor) or self.points.ndim != 2:
            raise DataError("PointData.points must be a [N, D] tensor")

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.class_names)


def to_uint8(images: Tensor) -> Tensor:
    """Map values in ``[-1, 1]`` to uint8 ``0..255`` (clamped, rounded; NaN maps to 0).

    Works on any shape; the result is on the CPU.
    """
    x = images.detach().to("cpu", torch.float32)
    x = torch.nan_to_num(x, nan=-1.0).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """Map uint8 values ``0..255`` to float32 in ``[-1, 1]`` (the inverse of :func:`to_uint8`)."""
    return (images.to(torch.float32) / 127.5 - 1.0).contiguous()


def check_split(split: str, test_fraction: float) -> None:
    """Raise :class:`DataError` unless ``split`` and ``test_fraction`` are valid."""
    if split not in SPLITS:
        raise DataError(f"invalid split {split!r}: expected one of {list(SPLITS)}")
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"invalid test_fraction {test_fraction!r}: must be in (0, 1)")


def split_indices(
    n: int, labels: Tensor | None, split: str, test_fraction: float = 0.2, seed: int = 0
) -> Tensor:
    """Deterministic train/test split of ``range(n)``; returns the sorted indices of ``split``.

    With ``labels`` the split is stratified: each class contributes ``round(count *
    test_fraction)`` items to the test set, chosen by a permutation drawn from a generator
    seeded with ``seed``. Train and test are disjoint and together cover all ``n`` items.
    ``split="all"`` returns ``arange(n)``.
    """
    check_split(split, test_fraction)
    if split == "all":
        return torch.arange(n)
    gen = torch.Generator().manual_seed(int(seed))
    is_test = torch.zeros(n, dtype=torch.bool)
    if labels is None:
        groups = [torch.arange(n)]
    else:
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    for members in groups:
        perm = members[torch.randperm(len(members), generator=gen)]
        is_test[perm[: int(round(len(members) * float(test_fraction)))]] = True
    chosen = is_test if split == "test" else ~is_test
    indices = torch.nonzero(chosen).flatten()
    if n > 0 and len(indices) == 0:
        raise DataError(
            f"split {split!r} is empty for {n} items with test_fraction={test_fraction}"
        )
    return indices


def split_data(
    data: ImageData, split: str, test_fraction: float = 0.2, seed: int = 0
) -> ImageData:
    """Return the ``split`` part ("all", "train" or "test") of ``data``; see
    :func:`split_indices`."""
    if split == "all":
        check_split(split, test_fraction)
        return data
    return data.subset(split_indices(len(data), data.labels, split, test_fraction, seed))
