"""Data sets for difflab: built-in digits, image folders, 2-D toys, and image file I/O.

All image loaders return :class:`ImageData` (``[N, C, H, W]`` float32 in ``[-1, 1]``).
:func:`load_data` picks a loader by name from the registry :data:`DATASETS` (image folders,
``hf:PATH`` Hugging Face ``save_to_disk`` folders, ``cifar10:PATH`` binary CIFAR; 2-D toys give
:class:`PointData`); :func:`load_dataset` is the same for image data sets.
"""

from __future__ import annotations

from .base import (
    DataError,
    ImageData,
    PointData,
    from_uint8,
    split_data,
    split_indices,
    to_uint8,
)
from .cifar import CIFAR10, CIFAR100, load_cifar
from .digits import load_digits
from .folder import IMAGE_EXTENSIONS, load_image_folder
from .hf import load_hf_dataset
from .images import (
    labelled_grid_image,
    load_png,
    save_grid,
    save_images,
    save_labelled_grid,
    save_scatter,
)
from .registry import DATASETS, DataRequest, load_data
from .scenes import SceneData, load_scenes
from .shapes import CaptionedImageData, load_shapes
from .source import Batch, BatchSource, EpochSource, RandomSource
from .toy2d import (
    TOY_DATASETS,
    checkerboard,
    eight_gaussians,
    sample_toy,
    swiss_roll,
    two_moons,
)

BUILTIN_DATASETS: tuple[str, ...] = tuple(k for k, (_, arg) in DATASETS.items() if not arg)

__all__ = [
    "Batch",
    "BatchSource",
    "EpochSource",
    "RandomSource",
    "BUILTIN_DATASETS",
    "CIFAR10",
    "CIFAR100",
    "CaptionedImageData",
    "DATASETS",
    "DataError",
    "DataRequest",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "PointData",
    "SceneData",
    "TOY_DATASETS",
    "checkerboard",
    "eight_gaussians",
    "from_uint8",
    "load_cifar",
    "load_data",
    "load_dataset",
    "load_digits",
    "load_hf_dataset",
    "load_image_folder",
    "load_png",
    "load_scenes",
    "load_shapes",
    "sample_toy",
    "save_grid",
    "save_images",
    "save_labelled_grid",
    "labelled_grid_image",
    "save_scatter",
    "split_data",
    "split_indices",
    "swiss_roll",
    "to_uint8",
    "two_moons",
]


def load_dataset(
    name: str,
    resolution: int,
    channels: int | None = None,
    split: str = "all",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageData:
    """Load an image data set by name (a lookup in :data:`DATASETS`).

    Args:
        name: ``"digits"``, ``"shapes"``, ``"scenes"`` or ``"scenes:captions"`` (built in,
            case-insensitive; shapes are captioned, RGB, and their "test" split holds the
            held-out attribute pairs, see :mod:`difflab.data.shapes`; scenes are 64 px RGB
            with 12 classes or captions, see :mod:`difflab.data.scenes`), ``"folder:PATH"``,
            or the path of an
            existing image folder. A built-in name wins over a folder of the same name; use
            ``"folder:digits"`` for the folder.
        resolution: output side length (a multiple of 8 for digits).
        channels: 1 or 3; default 1 for digits (3 repeats the grey channel) and 3 for folders.
        split: "all", "train" or "test" (deterministic, stratified by class when labelled).
        test_fraction: share of the data in the test split.
        seed: seed of the split.

    Raises:
        DataError: unknown name that is not an existing folder, a point data set, or any
            loader error.
    """
    data = load_data(name, DataRequest(resolution, channels, split, test_fraction, seed))
    if not isinstance(data, ImageData):
        raise DataError(f"dataset {name!r} holds points, not images")
    return data
