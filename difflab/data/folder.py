"""Load a folder of image files into memory as one :class:`ImageData`.

Layout rules (decided by the *immediate* sub-folders of ``root``):

- **Labelled**: if any immediate sub-folder of ``root`` contains image files (at any depth),
  each such sub-folder is a class named after it; ``class_names`` are sorted and every image
  below ``root/<class>/`` (recursively) gets that class. Sub-folders without images are ignored.
  Image files lying directly in ``root`` next to class sub-folders are ambiguous and raise
  :class:`DataError` (move them into a class folder or elsewhere).
- **Unlabelled**: if no sub-folder holds images, the image files directly in ``root`` form the
  data set, with ``labels=None`` and ``class_names=[]``.

**Captions** (sidecar, as Hugging Face's ``imagefolder`` reads them): a ``metadata.jsonl`` in
``root`` with one JSON object per line, ``{"file_name": "a.png", "text": "a red circle"}``
(``file_name`` relative to ``root``), makes the result a
:class:`~difflab.data.shapes.CaptionedImageData` whose labels index the distinct captions (a
text-conditional data set); every image must have a caption.

Files and folders whose names start with "." are skipped, symbolic links to folders below the
class level are not followed, and files are matched by extension (case-insensitive). Files are
read in a sorted order, so the result is deterministic.

**torchvision parity.** A folder that torchvision's ``ImageFolder`` reads gives the same
samples in the same order with the same labels: class index = position in the sorted class
folder names, files of each class in ``sorted(os.walk(...))`` order, torchvision's extensions
(:data:`IMAGE_EXTENSIONS`). Deliberate differences, each where ``ImageFolder`` would fail or
read something unintended: hidden files and folders (``.ipynb_checkpoints``, macOS ``._x.png``)
are skipped, not classes or samples; a class folder without images is ignored (ImageFolder
refuses it, or with ``allow_empty=True`` gives it an index); ``.gif`` is read too; links to
folders below the class level are not followed; a folder without class sub-folders is an
unlabelled set (ImageFolder refuses it); images beside class folders are refused (ImageFolder
ignores them).

Every image is converted to "L" or "RGB" (see :func:`difflab.data.images.pil_to_mode`), its
shorter side resized to ``resolution`` (bicubic, antialiased), then centre-cropped to
``resolution x resolution``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io import read_jsonl
from .base import DataError, ImageData, from_uint8
from .images import WHITE, _check_channels, fit_image
from .shapes import CaptionedImageData

#: torchvision's ImageFolder extensions (jpg jpeg png ppm bmp pgm tif tiff webp) and gif
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "ppm", "bmp", "pgm", "gif", "webp",
                                     "tif", "tiff")
PROGRESS_THRESHOLD = 500
_MAX_LISTED = 20


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(sorted({e.lower().lstrip(".") for e in extensions if e.strip(". ")}))
    if not exts:
        raise DataError(f"invalid extensions={extensions!r}: no file extensions given")
    return exts


def _is_image(name: str, exts: tuple[str, ...]) -> bool:
    if name.startswith("."):
        return False
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in exts


def _images_under(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden entries skipped) in torchvision's order:
    folders sorted by their path string (so a folder's own files come before its
    sub-folders'), files by name within each."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walked.append((dirpath, sorted(f for f in filenames if _is_image(f, exts))))
    return [Path(d) / f for d, files in sorted(walked) for f in files]


def _describe(paths: Sequence[object]) -> str:
    shown = "\n  ".join(str(p) for p in paths[:_MAX_LISTED])
    more = f"\n  ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _load_one(
    path: Path, resolution: int, channels: int, background: tuple[int, int, int]
) -> torch.Tensor | str:
    """uint8 ``[C, R, R]`` for a good file, or the error text for a bad one."""
    try:
        with Image.open(path) as img:
            img.load()
            return fit_image(img, resolution, channels, background)
    except Exception as exc:  # Pillow raises many exception types for bad files
        return f"{type(exc).__name__}: {exc}"


def load_image_folder(
    root: str | os.PathLike[str],
    resolution: int,
    channels: int = 3,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    *,
    background: tuple[int, int, int] = WHITE,
    num_workers: int | None = None,
) -> ImageData:
    """Load every image under ``root`` as ``[N, channels, resolution, resolution]`` in [-1, 1].

    See the module docstring for the labelled / unlabelled layout rules.

    Args:
        root: the image folder.
        resolution: output side length (>= 1); shorter side resized, then centre-cropped.
        channels: 1 (greyscale "L") or 3 ("RGB").
        extensions: file extensions to load (case-insensitive, with or without the dot).
        background: colour that transparent pixels are composited over.
        num_workers: decoding threads (default ``min(8, cpu_count)``; 0 or 1 = no threads).

    Returns:
        :class:`ImageData`; labels/class_names from the class sub-folders, or None/[].

    Raises:
        DataError: ``root`` missing or not a directory, no images found, image files both in
            ``root`` and in class sub-folders, invalid options, or unreadable image files (all
            of them listed in one error).
    """
    root = Path(root).expanduser()
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"invalid resolution={resolution!r} for image folder {root}: must be >= 1")
    _check_channels(channels)
    exts = _normalise_extensions(extensions)
    if not root.exists():
        raise DataError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"image folder path is not a directory: {root}")

    paths, labels, class_names = _discover(root, exts)
    out, bad = _decode_all(root, paths, resolution, channels, background, num_workers)
    if bad:
        raise DataError(
            f"{len(bad)} unreadable image file(s) in image folder {root}:{_describe(bad)}"
        )
    captions = read_captions(root, paths)
    if captions is not None:
        names = list(dict.fromkeys(captions))
        index = torch.tensor([names.index(c) for c in captions], dtype=torch.int64)
        return CaptionedImageData(from_uint8(out), index, names)
    return ImageData(from_uint8(out), labels, class_names)


#: the sidecar caption file of an image folder
CAPTIONS_FILE = "metadata.jsonl"


def read_captions(root: Path, paths: Sequence[Path]) -> list[str] | None:
    """The caption of each of ``paths`` from ``root/metadata.jsonl`` (None without one).

    Raises:
        DataError: a line that is not a JSON object with string ``file_name`` and ``text``,
            a file named twice or not found among the images, or images without a caption.
    """
    file = root / CAPTIONS_FILE
    if not file.is_file():
        return None
    found: dict[str, str] = {}
    for n, row in read_jsonl(file, DataError):
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)
                and isinstance(row.get("text"), str)):
            raise DataError(f"{file}:{n}: expected {{\"file_name\": ..., \"text\": ...}}")
        name = Path(row["file_name"]).as_posix()
        if name in found:
            raise DataError(f"{file}:{n}: {name} has a caption already")
        found[name] = row["text"]
    names = [p.relative_to(root).as_posix() for p in paths]
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{file} names files that are not images of {root}:"
                        f"{_describe(unknown)}")
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{len(missing)} image(s) of {root} have no caption in {file}:"
                        f"{_describe(missing)}")
    return [found[n] for n in names]


def _discover(root: Path, exts: tuple[str, ...]
              ) -> tuple[list[Path], torch.Tensor | None, list[str]]:
    """Image paths under ``root`` with labels from class sub-folders (or None), and the
    sorted class names; the layout rules of the module docstring."""
    top_files, class_files = [], {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = _images_under(Path(entry.path), exts)
            if files:
                class_files[entry.name] = files
        elif entry.is_file() and _is_image(entry.name, exts):
            top_files.append(Path(entry.path))

    if class_files and top_files:
        raise DataError(
            f"image folder {root} mixes {len(top_files)} image file(s) at its top level with "
            f"class sub-folders {sorted(class_files)}; move the top-level files into a class "
            f"sub-folder (or elsewhere):{_describe(top_files)}"
        )
    if class_files:
        class_names = sorted(class_files)
        paths = [p for name in class_names for p in class_files[name]]
        labels = torch.tensor(
            [i for i, name in enumerate(class_names) for _ in class_files[name]],
            dtype=torch.int64,
        )
    elif top_files:
        class_names, paths, labels = [], top_files, None
    else:
        raise DataError(
            f"no image files found in {root} (looked for extensions: {', '.join(exts)})"
        )
    return paths, labels, class_names


def _decode_all(root: Path, paths: list[Path], resolution: int, channels: int,
                background: tuple[int, int, int], num_workers: int | None
                ) -> tuple[torch.Tensor, list[str]]:
    """Decode every path (in a thread pool) into one uint8 tensor; collect unreadable ones."""
    workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    bar = tqdm(
        total=len(paths), desc=f"loading {root.name or root}", unit="img",
        disable=len(paths) <= PROGRESS_THRESHOLD,
    )
    out = torch.empty((len(paths), channels, resolution, resolution), dtype=torch.uint8)
    bad: list[str] = []

    def job(path: Path) -> torch.Tensor | str:
        return _load_one(path, resolution, channels, background)

    try:
        if workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results: Iterable[torch.Tensor | str] = pool.map(job, paths)
                for i, res in enumerate(results):
                    _store(out, i, res, paths[i], bad)
                    bar.update()
        else:
            for i, path in enumerate(paths):
                _store(out, i, job(path), path, bad)
                bar.update()
    finally:
        bar.close()
    return out, bad


def _store(out: torch.Tensor, i: int, res: torch.Tensor | str, path: Path, bad: list[str]) -> None:
    if isinstance(res, str):
        bad.append(f"{path} ({res})")
    else:
        out[i] = res
