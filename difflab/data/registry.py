"""Data sets by name: ``name -> loader``. Adding a data set is its module plus one line here.

A name is ``NAME`` (a built-in with no argument, case-insensitive; ``scenes:captions`` is one
such name), ``NAME:ARG`` (a loader that takes an argument: ``folder:PATH``, ``toy:moons``,
``hf:PATH``, ``cifar10:PATH``; the last two take ``:KEY=VALUE`` options and a ``:train`` /
``:test`` suffix, see :mod:`difflab.data.spec`) or the path of an existing image folder.
A built-in name wins over a folder of the same name; use ``folder:NAME`` for that.

:func:`dataset_folder`, :func:`dataset_slug` and :func:`folder_resolution` tell a recipe what a
name refers to before loading it (the defaults of ``difflab train`` follow from them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .base import DataError, ImageData, PointData, check_split, split_data
from .cifar import CIFAR10, CIFAR100, CifarLayout, load_cifar
from .digits import load_digits
from .folder import IMAGE_EXTENSIONS, _images_under, load_image_folder
from .hf import OPTIONS as HF_OPTIONS
from .hf import load_hf_dataset
from .scenes import load_scenes
from .shapes import load_shapes
from .spec import effective_split, parse_path_spec
from .toy2d import TOY_DATASETS, sample_toy


@dataclass(frozen=True)
class DataRequest:
    """What a loader is asked for; each loader uses the fields that apply to it."""

    resolution: int = 8
    channels: int | None = None     # 1 or 3; None: the data set's own
    split: str = "all"              # "all", "train" or "test"
    test_fraction: float = 0.2
    seed: int = 0                   # seed of the split (and of drawn images: shapes, scenes)
    points: int = 20000             # size of a point data set
    points_seed: int = 0            # seed of the draw of a point data set


#: ``loader(arg, request)``; ``arg`` is the text after ``NAME:`` ("" for a bare name).
Loader = Callable[[str, DataRequest], ImageData | PointData]


def _digits(arg: str, r: DataRequest) -> ImageData:
    data = load_digits(r.resolution, split=r.split, test_fraction=r.test_fraction, seed=r.seed)
    if r.channels == 3:  # repeat the grey channel
        data = ImageData(data.images.repeat(1, 3, 1, 1).contiguous(), data.labels,
                         data.class_names)
    return data


def _shapes(arg: str, r: DataRequest) -> ImageData:
    if r.channels == 1:
        raise DataError("the shapes dataset is RGB: channels must be 3")
    return load_shapes(r.resolution, split=r.split, seed=r.seed)


def _scenes(captions: bool) -> Loader:
    def load(arg: str, r: DataRequest) -> ImageData:
        if r.channels == 1:
            raise DataError("the scenes dataset is RGB: channels must be 3")
        return load_scenes(r.resolution, r.split, r.test_fraction, r.seed, captions=captions)
    return load


def _folder(arg: str, r: DataRequest) -> ImageData:
    path = Path(arg).expanduser()
    data = load_image_folder(path, r.resolution, channels=3 if r.channels is None else r.channels)
    return split_data(data, r.split, r.test_fraction, r.seed)


def _hf(arg: str, r: DataRequest) -> ImageData:
    spec = parse_path_spec("hf", arg, HF_OPTIONS)
    o = spec.options
    return load_hf_dataset(
        spec.path, r.resolution, 3 if r.channels is None else r.channels,
        effective_split(f"hf:{arg}", spec.split, r.split), r.test_fraction, r.seed,
        image=o.get("image"), label=o.get("label"), text=o.get("text"), hf_split=o.get("split"))


def _cifar(key: str, layout: CifarLayout) -> Loader:
    def load(arg: str, r: DataRequest) -> ImageData:
        spec = parse_path_spec(key, arg, ("label",) if len(layout.names) > 1 else ())
        return load_cifar(spec.path, r.resolution, 3 if r.channels is None else r.channels,
                          effective_split(f"{key}:{arg}", spec.split, r.split), layout=layout,
                          label=spec.options.get("label"))
    return load


def _toy(arg: str, r: DataRequest) -> PointData:
    if arg not in TOY_DATASETS:
        raise DataError(f"unknown toy dataset {arg!r}; choose from {sorted(TOY_DATASETS)}")
    return PointData(sample_toy(arg, r.points, torch.Generator().manual_seed(r.points_seed)))


#: name -> (loader, takes an argument after "NAME:")
DATASETS: dict[str, tuple[Loader, bool]] = {
    "digits": (_digits, False),
    "shapes": (_shapes, False),
    "scenes": (_scenes(captions=False), False),          # 12 classes: the main object
    "scenes:captions": (_scenes(captions=True), False),  # the same images, captioned
    "folder": (_folder, True),
    "hf": (_hf, True),                          # a Hugging Face save_to_disk folder
    "cifar10": (_cifar("cifar10", CIFAR10), True),     # CIFAR-10's binary version
    "cifar100": (_cifar("cifar100", CIFAR100), True),  # CIFAR-100's binary version
    "toy": (_toy, True),
}


def load_data(name: str, request: DataRequest | None = None) -> ImageData | PointData:
    """The data set called ``name`` (see the module docstring).

    Raises:
        DataError: an unknown name that is not an existing folder, bad options, or any
            loader error; the message names the data set.
    """
    r = request or DataRequest()
    if r.channels is not None and (isinstance(r.channels, bool) or r.channels not in (1, 3)):
        raise DataError(f"invalid channels={r.channels!r} for dataset {name!r}: expected 1 or 3")
    check_split(r.split, r.test_fraction)
    key, sep, arg = name.partition(":")
    bare = DATASETS.get(name.strip().lower())
    if bare is not None and not bare[1]:
        return bare[0]("", r)
    if sep and key in DATASETS and DATASETS[key][1]:
        return DATASETS[key][0](arg, r)
    if not Path(name).expanduser().exists():
        builtins = [k for k, (_, takes_arg) in DATASETS.items() if not takes_arg]
        raise DataError(
            f"unknown dataset {name!r}: the folder {Path(name).expanduser()} does not exist "
            f"and no built-in dataset has that name (built-in: {', '.join(builtins)}; "
            f"toy:NAME for 2-D points)")
    return _folder(name, r)


def dataset_folder(name: str) -> Path | None:
    """The image folder ``name`` refers to (``folder:PATH`` or an existing folder that is not
    shadowed by a built-in name), or None for a built-in or toy data set or a missing path."""
    key, sep, arg = name.partition(":")
    if DATASETS.get(name.strip().lower(), (None, True))[1] is False:
        return None
    if sep and key in DATASETS and DATASETS[key][1]:
        path = Path(arg).expanduser() if key == "folder" else None
    else:
        path = Path(name).expanduser()
    return path if path is not None and path.is_dir() else None


def dataset_slug(name: str) -> str:
    """A short name for the data set, for its default run folder: the built-in's name
    (``digits``), ``toy-moons`` for ``toy:moons``, and an image folder's own name."""
    key, sep, arg = name.strip().partition(":")
    if DATASETS.get(key.lower(), (None, True))[1] is False and not sep:
        return key.lower()
    if sep and key in ("cifar10", "cifar100"):
        return key
    if sep and key == "hf":
        return Path(parse_path_spec(key, arg, HF_OPTIONS).path).resolve().name or "hf"
    if sep and key in DATASETS and key != "folder":
        return f"{key}-{arg}".replace("/", "-")
    folder = Path(arg if sep and key == "folder" else name).expanduser()
    return folder.resolve().name or "data"


def folder_resolution(folder: Path, max_files: int = 2000) -> tuple[int, str]:
    """The resolution to train an image folder at when none is given, and a note saying why:
    the most common shorter side of its images (ties: the smaller), rounded down to a
    multiple of 8 (at least 8). Only the headers are read, of at most ``max_files`` files
    spread evenly over the sorted list.

    Raises:
        DataError: the folder holds no image files, or none whose header can be read."""
    paths = _images_under(folder, IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no image files in image folder {folder}")
    stride = max(1, len(paths) // max_files)
    sides: Counter[int] = Counter()
    for path in paths[::stride]:
        try:
            with Image.open(path) as img:  # lazy: reads the header only
                sides[min(img.size)] += 1
        except Exception:  # Pillow raises many types; the loader lists unreadable files
            continue
    if not sides:
        raise DataError(f"no readable image in image folder {folder}")
    side = min(sides, key=lambda s: (-sides[s], s))
    resolution = max(8, side // 8 * 8)
    seen = sum(sides.values())
    return resolution, (f"resolution {resolution}: the most common image size in {folder} is "
                        f"{side} px ({sides[side]} of {seen} images read), rounded down to a "
                        f"multiple of 8; give --resolution to choose")
