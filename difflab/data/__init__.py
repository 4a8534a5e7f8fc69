"""Data sets for difflab: built-in digits, image folders, 2-D toys, and image file I/O.

All image loaders return :class:`ImageData` (``[N, C, H, W]`` float32 in ``[-1, 1]``).
:func:`load_dataset` picks a loader by name.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    DataError,
    ImageData,
    check_split,
    from_uint8,
    split_data,
    split_indices,
    to_uint8,
)
from .digits import load_digits
from .folder import IMAGE_EXTENSIONS, load_image_folder
from .images import load_png, save_grid, save_images, save_scatter
from .shapes import CaptionedImageData, load_shapes
from .toy2d import (
    TOY_DATASETS,
    checkerboard,
    eight_gaussians,
    sample_toy,
    swiss_roll,
    two_moons,
)

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "shapes")
FOLDER_PREFIX = "folder:"

__all__ = [
    "BUILTIN_DATASETS",
    "CaptionedImageData",
    "DataError",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "TOY_DATASETS",
    "checkerboard",
    "eight_gaussians",
    "from_uint8",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_png",
    "load_shapes",
    "sample_toy",
    "save_grid",
    "save_images",
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
    """Load an image data set by name.

    Args:
        name: ``"digits"`` or ``"shapes"`` (built in, case-insensitive; shapes are captioned,
            RGB, and their "test" split holds the held-out attribute pairs, see
            :mod:`difflab.data.shapes`), ``"folder:PATH"``, or the path of an
            existing image folder. A built-in name wins over a folder of the same name; use
            ``"folder:digits"`` for the folder.
        resolution: output side length (a multiple of 8 for digits).
        channels: 1 or 3; default 1 for digits (3 repeats the grey channel) and 3 for folders.
        split: "all", "train" or "test" (deterministic, stratified by class when labelled).
        test_fraction: share of the data in the test split.
        seed: seed of the split.

    Raises:
        DataError: unknown name that is not an existing folder, or any loader error.
    """
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"invalid channels={channels!r} for dataset {name!r}: expected 1 or 3")
    check_split(split, test_fraction)
    if name.strip().lower() == "shapes":
        if channels == 1:
            raise DataError("the shapes dataset is RGB: channels must be 3")
        return load_shapes(resolution, split=split, seed=seed)
    if name.strip().lower() in BUILTIN_DATASETS:
        data = load_digits(resolution, split=split, test_fraction=test_fraction, seed=seed)
        if channels == 3:
            data = ImageData(
                data.images.repeat(1, 3, 1, 1).contiguous(), data.labels, data.class_names
            )
        return data
    if name.startswith(FOLDER_PREFIX):
        path = Path(name[len(FOLDER_PREFIX) :]).expanduser()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"unknown dataset {name!r}: the folder {path} does not exist and the built-in "
                f"dataset names are {list(BUILTIN_DATASETS)} (use 'folder:PATH' for an image "
                f"folder)"
            )
    data = load_image_folder(path, resolution, channels=3 if channels is None else channels)
    return split_data(data, split, test_fraction, seed)
