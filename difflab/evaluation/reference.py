"""Sample sets and reference statistics on disk.

- A *sample set* is a folder of images (PNG or anything Pillow reads; sub-folders are classes)
  or an ``.npz`` written by ``difflab sample --save-npz`` (``images`` uint8 [N, H, W, C],
  ``labels`` [N], ``seeds`` [N]).
- *Reference statistics* are an ``.npz`` with the feature mean ``mu`` [D] and covariance
  ``sigma`` [D, D] (pytorch-fid's key names), ``n``, the ``extractor`` name, and optionally the
  ``features`` themselves (needed for KID and precision/recall, which are not functions of the
  mean and covariance). Computed once, reused by every evaluation against that data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import IMAGE_EXTENSIONS, DataError, load_dataset, load_image_folder, to_uint8
from ..io import atomic_write
from .metrics import FeatureStats, feature_stats


@dataclass
class SampleSet:
    images: np.ndarray              # uint8 [N, H, W, C]
    labels: np.ndarray | None       # int [N] or None
    source: str


def _first_image(root: Path) -> Path:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            return p
    raise DataError(f"no image files in sample folder {root}")


def load_image_dir(root: Path) -> SampleSet:
    """All images under ``root`` at the size and channel count of the first one."""
    first = _first_image(root)
    with Image.open(first) as img:
        size, channels = img.size[0], 1 if img.mode in ("L", "LA", "I", "I;16", "F") else 3
    data = load_image_folder(root, size, channels=channels, num_workers=0)
    labels = None if data.labels is None else data.labels.numpy()
    return SampleSet(to_uint8(data.images).permute(0, 2, 3, 1).numpy(), labels, str(root))


def load_npz_samples(path: Path) -> SampleSet:
    with np.load(path) as z:
        if "images" not in z:
            raise DataError(f"{path} has no 'images' array (keys: {sorted(z.keys())}); expected "
                            f"an .npz from 'difflab sample --save-npz'")
        images = z["images"]
        labels = z["labels"] if "labels" in z else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: 'images' must be uint8 [N, H, W, C], got {images.dtype} "
                        f"{images.shape}")
    return SampleSet(images, labels, str(path))


def load_sample_set(spec: str, resolution: int | None = None,
                    channels: int | None = None) -> SampleSet:
    """A PNG folder, a ``--save-npz`` file, or a data set name (``digits``, ``digits:test``,
    ``digits:train``, ``folder:PATH``) loaded at ``resolution`` (needed for data sets)."""
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"sample file not found: {path}")
        return load_npz_samples(path)
    if path.is_dir():
        return load_image_dir(path)
    name, _, split = spec.rpartition(":") if spec.endswith((":train", ":test", ":all")) \
        else (spec, "", "all")
    if resolution is None:
        raise DataError(f"{spec!r} is neither an existing folder nor an .npz file")
    data = load_dataset(name, resolution, channels, split=split or "all")
    labels = None if data.labels is None else data.labels.numpy()
    return SampleSet(to_uint8(data.images).permute(0, 2, 3, 1).numpy(), labels, spec)


def dataset_spec(spec: str, named_only: bool = False) -> str | None:
    """The data set of a ``--samples`` / ``--reference`` value without its split (``digits``
    of ``digits:test``, ``folder:PATH``, or an image folder), None for an ``.npz`` file.
    ``named_only``: None for a plain folder too (generated images are saved as folders)."""
    if spec.endswith(".npz"):
        return None
    if named_only and Path(spec).expanduser().is_dir():
        return None
    return spec.rpartition(":")[0] if spec.endswith((":train", ":test", ":all")) else spec


def save_reference(path: str | Path, features: np.ndarray, extractor: str,
                   keep_features: bool = True) -> Path:
    """Write reference statistics (and, by default, the features) to ``path`` (.npz)."""
    st = feature_stats(features)
    arrays = {"mu": st.mu, "sigma": st.cov, "n": np.array(st.n), "extractor": np.array(extractor)}
    if keep_features:
        arrays["features"] = np.asarray(features, np.float64)
    return atomic_write(Path(path), lambda tmp: np.savez(open(tmp, "wb"), **arrays))


@dataclass
class Reference:
    stats: FeatureStats
    features: np.ndarray | None
    extractor: str


def is_reference_file(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix != ".npz" or not p.is_file():
        return False
    with np.load(p) as z:
        return "mu" in z and "sigma" in z


def load_reference(path: str | Path) -> Reference:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {p}")
    with np.load(p) as z:
        missing = {"mu", "sigma"} - set(z.keys())
        if missing:
            raise DataError(f"{p} is not a reference statistics file (missing {sorted(missing)})")
        feats = z["features"] if "features" in z else None
        n = int(z["n"]) if "n" in z else (len(feats) if feats is not None else 0)
        extractor = str(z["extractor"]) if "extractor" in z else "unknown"
        return Reference(FeatureStats(z["mu"], z["sigma"], n), feats, extractor)


__all__ = ["Reference", "SampleSet", "dataset_spec", "is_reference_file", "load_image_dir",
           "load_npz_samples", "load_reference", "load_sample_set", "save_reference"]
