"""Hugging Face ``datasets`` folders written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``, read with ``datasets.load_from_disk`` (the optional extra
``difflab[hf]``; imported only when such a folder is loaded).

Columns, chosen by their features unless named by an option (:data:`OPTIONS`):

- images: the one column with an ``Image`` feature (``image=COLUMN`` when there are several);
- labels: the one ``ClassLabel`` column (``class_names`` are its names; when there are several,
  the one called "label", else ``label=COLUMN``), an integer column named by ``label=``
  (names "0", "1", ...), or none (``label=none``);
- captions: ``text=COLUMN`` (a string column) makes a text-conditional data set, a
  :class:`~difflab.data.shapes.CaptionedImageData` whose labels index the distinct captions,
  as an image folder's ``metadata.jsonl`` does.

Splits: a ``DatasetDict`` holding both "train" and "test" gives difflab's "train" / "all" and
"test" splits; otherwise the chosen split (``split=NAME``; "train" by default, or the only one)
or the single ``Dataset`` is split like an image folder (stratified, ``test_fraction``, seed).
Images are decoded by Pillow and prepared as an image folder's files are (mode, resize, crop).
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .base import DataError, ImageData, from_uint8, split_data, split_indices
from .folder import PROGRESS_THRESHOLD
from .images import _check_channels, fit_image
from .shapes import CaptionedImageData

#: the ``:KEY=VALUE`` options of ``hf:PATH``
OPTIONS = ("image", "label", "text", "split")
EXTRA = "pip install 'difflab[hf]' (the Hugging Face datasets package)"
_BATCH = 512


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"reading a Hugging Face dataset folder needs the hf extra: "
                        f"{EXTRA}") from exc
    return datasets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _read_json(file: Path) -> dict[str, Any]:
    try:
        out = json.loads(file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"corrupt dataset file {file}: {_first_line(exc)}") from exc
    if not isinstance(out, dict):
        raise DataError(f"corrupt dataset file {file}: expected a JSON object")
    return out


def split_folder(path: Path, split: str | None, requested: str) -> tuple[Path, bool]:
    """The ``save_to_disk`` folder of one ``Dataset`` under ``path``, and whether it is a saved
    split that stands for difflab's ``requested`` split as a whole (True) or must be divided.

    Raises:
        DataError: a missing path, a folder not written by ``save_to_disk``, an unknown split.
    """
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise DataError(f"Hugging Face dataset folder {what}: {path}")
    if (path / "state.json").is_file():
        if split is not None:
            raise DataError(f"{path} holds one Dataset, not a DatasetDict: drop split={split}")
        return path, False
    if not (path / "dataset_dict.json").is_file():
        raise DataError(f"{path} is not a folder written by save_to_disk (no state.json or "
                        f"dataset_dict.json); save a downloaded dataset with "
                        f"datasets.load_dataset(...).save_to_disk(PATH)")
    splits = _read_json(path / "dataset_dict.json").get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits) or not splits:
        raise DataError(f"corrupt dataset file {path / 'dataset_dict.json'}: no split list")
    if split is None and {"train", "test"} <= set(splits) and requested != "all":
        return path / requested, True
    if split is None and {"train", "test"} <= set(splits):
        return path / "train", True
    chosen = split or ("train" if "train" in splits or len(splits) > 1 else splits[0])
    if chosen not in splits:
        raise DataError(f"no split {chosen!r} in {path} (splits: {', '.join(splits)}); "
                        f"choose one with :split=NAME")
    return path / chosen, False


def open_dataset(folder: Path) -> Any:
    """``datasets.load_from_disk(folder)``; a failure names the file that cannot be read."""
    datasets = _datasets()
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as exc:  # arrow and datasets raise many types; find the bad file
        raise DataError(f"cannot read the dataset in {_bad_file(folder)}: "
                        f"{_first_line(exc)}") from exc


def _bad_file(folder: Path) -> Path:
    """The first data file of ``folder`` that is missing or not a readable Arrow stream (the
    folder itself when each reads)."""
    import pyarrow as pa  # a dependency of datasets

    state = _read_json(folder / "state.json")
    for entry in state.get("_data_files", []):
        file = folder / str(entry.get("filename", "")) if isinstance(entry, dict) else folder
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except Exception:  # any failure marks the file
            return file
    return folder


def _pick(features: dict[str, Any], kind: type, what: str, option: str, named: str | None,
          where: Path, prefer: str | None = None) -> str | None:
    """The column of feature type ``kind``: ``named``, else the only one (``prefer`` among
    several), else None when there is none."""
    if named is not None:
        if named not in features:
            raise DataError(f"no column {named!r} in {where} (columns: {', '.join(features)})")
        return named
    found = [c for c, f in features.items() if isinstance(f, kind)]
    if len(found) > 1 and prefer in found:
        return prefer
    if len(found) > 1:
        raise DataError(f"{where} has several {what} columns ({', '.join(found)}); choose one "
                        f"with :{option}=COLUMN")
    return found[0] if found else None


def _decode_cell(cell: dict[str, Any] | None, mode: str | None, resolution: int,
                 channels: int) -> torch.Tensor | str:
    """uint8 ``[C, R, R]`` of one ``Image(decode=False)`` cell, or why it cannot be read."""
    if cell is None or (cell["bytes"] is None and cell["path"] is None):
        return "no image"
    try:
        source = io.BytesIO(cell["bytes"]) if cell["bytes"] is not None else cell["path"]
        with Image.open(source) as img:
            img.load()
            return fit_image(img.convert(mode) if mode else img, resolution, channels)
    except Exception as exc:  # Pillow raises many types for bad images
        return _first_line(exc)


def _decode_images(ds: Any, column: str, feature: Any, resolution: int, channels: int,
                   where: Path) -> torch.Tensor:
    """Every image of ``column`` as uint8 ``[N, channels, resolution, resolution]``, decoded
    by Pillow in threads (it releases the GIL) as the image-folder loader does."""
    datasets = _datasets()
    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    out = torch.empty((len(ds), channels, resolution, resolution), dtype=torch.uint8)
    bad: list[str] = []
    mode = getattr(feature, "mode", None)  # Image(mode=...): datasets' own decoding converts
    job = partial(_decode_cell, mode=mode, resolution=resolution, channels=channels)
    row = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(ds), desc=f"decoding {where.name}", unit="img",
                 disable=len(ds) <= PROGRESS_THRESHOLD) as bar:
        for batch in raw.with_format("arrow").iter(batch_size=_BATCH):
            cells = batch.column(column).to_pylist()
            for res in pool.map(job, cells):
                if isinstance(res, str):
                    bad.append(f"row {row} ({res})")
                else:
                    out[row] = res
                row += 1
            bar.update(len(cells))
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s) in column {column!r} of {where}: "
                        f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return out


def _labels(ds: Any, column: str, feature: Any, where: Path) -> tuple[torch.Tensor, list[str]]:
    """Labels and class names of a ``ClassLabel`` or integer column."""
    datasets = _datasets()
    values = ds.with_format("arrow")[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and "int" in feature.dtype:
        names = None
    else:
        raise DataError(f"column {column!r} of {where} is not a ClassLabel or integer column "
                        f"({feature}); choose another with :label=COLUMN or :label=none")
    if values.null_count:
        raise DataError(f"column {column!r} of {where} has {values.null_count} empty label(s)")
    labels = torch.from_numpy(values.to_numpy().astype("int64"))
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"column {column!r} of {where} has {int((labels < 0).sum())} row(s) "
                        f"without a label (-1); use :label=none for unlabelled images")
    if names is None:
        names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return labels, names


def _captions(ds: Any, column: str, feature: Any, where: Path) -> tuple[torch.Tensor, list[str]]:
    """Caption indices (distinct captions in order of first appearance) and the captions."""
    datasets = _datasets()
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"column {column!r} of {where} is not a string column ({feature}); "
                        f"name the caption column with :text=COLUMN")
    texts = ds.with_format("arrow")[column].to_pylist()
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise DataError(f"{len(missing)} row(s) of {where} have no caption in column "
                        f"{column!r} (first: row {missing[0]})")
    names = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(names)}
    return torch.tensor([index[t] for t in texts], dtype=torch.int64), names


def load_hf_dataset(path: str | Path, resolution: int, channels: int = 3, split: str = "all",
                    test_fraction: float = 0.2, seed: int = 0, *, image: str | None = None,
                    label: str | None = None, text: str | None = None,
                    hf_split: str | None = None) -> ImageData:
    """A ``save_to_disk`` folder as :class:`ImageData` (see the module docstring).

    Args:
        path: the folder given to ``save_to_disk``.
        resolution, channels: output size and 1 (grey) or 3 (RGB), as for image folders.
        split, test_fraction, seed: difflab's split ("all", "train", "test").
        image, label, text: column names (``label="none"``: unlabelled); see the module.
        hf_split: the ``DatasetDict`` split to read.

    Raises:
        DataError: a missing extra, folder or column, an unreadable file or image.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"invalid resolution={resolution!r} for {path}: must be >= 1")
    _check_channels(channels)
    if text is not None and label is not None:
        raise DataError(f"give :text= or :label= for {path}, not both (captions are the labels "
                        f"of a text-conditional data set)")
    folder, whole = split_folder(Path(path).expanduser(), hf_split, split)
    ds = open_dataset(folder)
    if len(ds) == 0:
        raise DataError(f"the dataset in {folder} has no rows")
    datasets = _datasets()
    features = dict(ds.features)
    img_col = _pick(features, datasets.Image, "Image", "image", image, folder)
    if img_col is None:
        raise DataError(f"no Image column in {folder} (columns: {', '.join(features)}); "
                        f"name one with :image=COLUMN")
    if not isinstance(features[img_col], datasets.Image):
        raise DataError(f"column {img_col!r} of {folder} is not an Image column")
    labels, names, captioned = _targets(ds, features, label, text, folder)  # before decoding
    images = from_uint8(_decode_images(ds, img_col, features[img_col], resolution, channels,
                                       folder))
    data = (CaptionedImageData if captioned else ImageData)(images, labels, names)
    return data if whole else _split(data, split, test_fraction, seed)


def _targets(ds: Any, features: dict[str, Any], label: str | None, text: str | None,
             where: Path) -> tuple[torch.Tensor | None, list[str], bool]:
    """(labels, class names, captioned): caption indices for ``text``, else class labels."""
    datasets = _datasets()
    if text is not None:
        col = str(_pick(features, datasets.Value, "text", "text", text, where))
        return (*_captions(ds, col, features[col], where), True)
    col = None if label == "none" else _pick(
        features, datasets.ClassLabel, "ClassLabel", "label", label, where, "label")
    if col is None:
        return None, [], False
    return (*_labels(ds, col, features[col], where), False)


def _split(data: ImageData, split: str, test_fraction: float, seed: int) -> ImageData:
    """:func:`split_data`; captioned data stays captioned and is split unstratified (most
    captions belong to one image)."""
    if not isinstance(data, CaptionedImageData) or split == "all":
        return split_data(data, split, test_fraction, seed)
    part = data.subset(split_indices(len(data), None, split, test_fraction, seed))
    return CaptionedImageData(part.images, part.labels, part.class_names)
