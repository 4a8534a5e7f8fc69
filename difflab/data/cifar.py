"""CIFAR-10 and CIFAR-100 from their binary version on a local disk (nothing is downloaded).

The binary version (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images";
``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html) holds fixed-size records: CIFAR-10 one label
byte then 3072 pixel bytes, CIFAR-100 a coarse and a fine label byte then 3072 pixel bytes;
the pixels are the red, green and blue 32 x 32 planes, rows top to bottom (channels first,
already difflab's ``[C, H, W]``).

- CIFAR-10 (``cifar-10-batches-bin/``): ``data_batch_1.bin`` ... ``data_batch_5.bin`` (the
  training set), ``test_batch.bin``, ``batches.meta.txt`` (the 10 class names, one a line).
- CIFAR-100 (``cifar-100-binary/``): ``train.bin``, ``test.bin``, ``fine_label_names.txt``
  (100 names), ``coarse_label_names.txt`` (20 names).

The split follows the files: "train" and "all" read the training files, "test" the test file.
The pickled Python version (``cifar-10-batches-py``, ``cifar-100-python``) is refused:
unpickling a file can run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DataError, ImageData, from_uint8
from .images import _check_channels, fit_image

PIXELS = 3 * 32 * 32
_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR version keeps its files, and its record format."""

    name: str                            # "CIFAR-10"
    folder: str                          # the folder its archive unpacks to
    pickled_folder: str                  # the pickled version's folder (refused)
    pickled_files: tuple[str, ...]       # files that only the pickled version has
    archive: str                         # the binary archive to get
    train: tuple[str, ...]
    test: str
    label_bytes: int                     # label bytes before the pixels of a record
    names: dict[str, tuple[str, int]]    # label kind -> (names file, number of classes)
    label_byte: dict[str, int]           # label kind -> its byte in the record

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS


CIFAR10 = CifarLayout(
    "CIFAR-10", "cifar-10-batches-bin", "cifar-10-batches-py", ("data_batch_1", "batches.meta"),
    "cifar-10-binary.tar.gz", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test_batch.bin", 1, {"label": ("batches.meta.txt", 10)}, {"label": 0})
CIFAR100 = CifarLayout(
    "CIFAR-100", "cifar-100-binary", "cifar-100-python", ("train", "meta"),
    "cifar-100-binary.tar.gz", ("train.bin",), "test.bin", 2,
    {"fine": ("fine_label_names.txt", 100), "coarse": ("coarse_label_names.txt", 20)},
    {"coarse": 0, "fine": 1})


def find_folder(path: Path, layout: CifarLayout) -> Path:
    """The folder holding ``layout``'s binary files: ``path`` itself or its sub-folder named
    as the archive unpacks (``cifar-10-batches-bin``).

    Raises:
        DataError: a missing path, the pickled version, or no binary files.
    """
    if not path.exists():
        raise DataError(f"{layout.name} folder does not exist: {path}")
    if not path.is_dir():
        raise DataError(f"{layout.name} path is not a folder: {path} (give the "
                        f"{layout.folder} folder)")
    for folder in (path, path / layout.folder):
        if (folder / layout.train[0]).is_file() or (folder / layout.test).is_file():
            return folder
    pickled = path / layout.pickled_folder if (path / layout.pickled_folder).is_dir() else path
    if path.name == layout.pickled_folder or any(
            (pickled / f).is_file() for f in layout.pickled_files):
        raise DataError(f"{pickled} holds {layout.name}'s pickled Python version, which difflab "
                        f"does not read (unpickling can run code); get the binary version "
                        f"{layout.archive} ({layout.folder}) from {_URL}")
    raise DataError(f"no {layout.name} binary files in {path}: expected {layout.train[0]} and "
                    f"{layout.test} there or in {path / layout.folder} ({layout.archive} "
                    f"from {_URL})")


def read_class_names(folder: Path, layout: CifarLayout, kind: str) -> list[str]:
    """The class names of label ``kind`` (non-empty lines of its names file)."""
    file_name, count = layout.names[kind]
    file = folder / file_name
    if not file.is_file():
        raise DataError(f"{layout.name} class names file is missing: {file}")
    try:
        names = [line.strip() for line in file.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc
    if len(names) != count:
        raise DataError(f"corrupt {layout.name} class names file {file}: {len(names)} names, "
                        f"expected {count}")
    return names


def read_records(file: Path, layout: CifarLayout, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The pixels uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]`` (label ``kind``) of one
    binary file.

    Raises:
        DataError: a missing file, a size that is not a whole number of records (truncated or
            not a binary batch), or a label out of range; the message names the file.
    """
    if not file.is_file():
        raise DataError(f"{layout.name} file is missing: {file}")
    raw = np.fromfile(file, dtype=np.uint8)
    if raw.size == 0 or raw.size % layout.record:
        raise DataError(f"truncated or corrupt {layout.name} file {file}: {raw.size} bytes is "
                        f"not a whole number of {layout.record}-byte records")
    records = raw.reshape(-1, layout.record)
    labels = records[:, layout.label_byte[kind]].astype(np.int64)
    count = layout.names[kind][1]
    bad = np.flatnonzero(labels >= count)
    if bad.size:
        raise DataError(f"corrupt {layout.name} file {file}: record {int(bad[0])} has {kind} "
                        f"{int(labels[bad[0]])} (expected 0-{count - 1}; {bad.size} such "
                        f"record(s))")
    return records[:, layout.label_bytes:].reshape(-1, 3, 32, 32), labels


def _fit(pixels: np.ndarray, resolution: int, channels: int) -> torch.Tensor:
    """uint8 ``[N, channels, resolution, resolution]``; the 32 px RGB pixels as they are, else
    each image through :func:`fit_image`, exactly as an image folder's PNGs would be."""
    if resolution == 32 and channels == 3:
        return torch.from_numpy(pixels.copy())
    out = torch.empty((len(pixels), channels, resolution, resolution), dtype=torch.uint8)
    for i, chw in enumerate(pixels):
        out[i] = fit_image(Image.fromarray(chw.transpose(1, 2, 0), "RGB"), resolution, channels)
    return out


def load_cifar(path: str | Path, resolution: int = 32, channels: int = 3, split: str = "all",
               *, layout: CifarLayout = CIFAR10, label: str | None = None) -> ImageData:
    """CIFAR-10 (or, with ``layout=CIFAR100``, CIFAR-100) from its binary files.

    Args:
        path: the ``cifar-10-batches-bin`` folder, or the folder it was unpacked into.
        resolution: output side; other than 32 the images are resized like an image
            folder's (bicubic, antialiased).
        channels: 3 (RGB), or 1 (Pillow's "L" conversion).
        split: "train" and "all" read the training files, "test" the test file.
        label: CIFAR-100's "fine" (default, 100 classes) or "coarse" (20 superclasses).

    Returns:
        :class:`ImageData` with labels and ``class_names`` from the names file.

    Raises:
        DataError: the pickled version, missing or truncated files, bad options.
    """
    kind = label or next(iter(layout.names))
    if kind not in layout.names:
        raise DataError(f"invalid label={kind!r} for {layout.name}: expected one of "
                        f"{list(layout.names)}")
    if split not in ("all", "train", "test"):
        raise DataError(f"invalid split {split!r} for {layout.name}: expected all, train or test")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"invalid resolution={resolution!r} for {layout.name}: must be >= 1")
    _check_channels(channels)
    folder = find_folder(Path(path).expanduser(), layout)
    names = read_class_names(folder, layout, kind)
    files = [layout.test] if split == "test" else list(layout.train)
    parts = [read_records(folder / f, layout, kind) for f in files]
    pixels = np.concatenate([p for p, _ in parts])
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return ImageData(from_uint8(_fit(pixels, resolution, channels)), labels, names)
