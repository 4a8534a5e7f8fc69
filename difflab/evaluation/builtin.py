"""The built-in feature network of a data set: trained on first use, cached, reproducible.

``difflab eval`` without ``--features`` measures samples in the feature space of a
:class:`~difflab.evaluation.featurenet.FeatureNet` trained on the train split of the reference
data set (digits, shapes, scenes, a labelled image folder). Nothing is downloaded: the network is
trained on the CPU from fixed seeds (same data, steps and seed -> the same weights) and saved
under the user's cache folder, ``$DIFFLAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/difflab`` or
``~/.cache/difflab``, in ``features/``; later evaluations load it.

Above 16 px the network starts with stride-2 convolutions down to 16 px (64 px: two), so that
training it stays a matter of a minute or two on a CPU, and takes a global max over positions
(:data:`STEM_CONFIG`). ``scenes:captions`` uses the network
of ``scenes`` (the same images; its 12 classes, not the captions, are the labels).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..data import BUILTIN_DATASETS, DataError, ImageData, load_dataset
from .featurenet import (
    FeatureNet,
    FeatureNetConfig,
    feature_net_accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)

BUILTIN_STEPS = 1500
BUILTIN_SEED = 0
_VERSION = 1  # bump when the architecture or the training recipe changes
#: built-in data sets whose features are those of another (same images, other labels)
SAME_FEATURES = {"scenes:captions": "scenes"}
STEM_TO = 16  # stride-2 convolutions bring larger images down to this size
#: the architecture above 16 px: 16 channels (its convolutions run at 16 px), and a global
#: max over positions (on scenes at 64 px: 0.86 test accuracy after 400 steps against 0.59
#: with the 4 x 4 average map, which must learn every object at every place)
STEM_CONFIG = {"width": 16, "pool": "max"}


def feature_dataset(dataset: str) -> str:
    """The data set whose built-in network measures ``dataset``: ``scenes`` for
    ``scenes:captions``, else ``dataset`` itself."""
    return SAME_FEATURES.get(dataset.strip().lower(), dataset)


def feature_stem(resolution: int) -> int:
    """Stride-2 convolutions that bring ``resolution`` down to at most :data:`STEM_TO`."""
    stem = 0
    while resolution > STEM_TO * 2**stem:
        stem += 1
    return stem


def builtin_config(train: ImageData, resolution: int) -> FeatureNetConfig:
    """The built-in network's architecture for ``train`` at ``resolution``: the default
    :class:`FeatureNetConfig` up to 16 px, above it a stem (:func:`feature_stem`) and
    :data:`STEM_CONFIG`."""
    stem = feature_stem(resolution)
    extra = {"stem": stem, **STEM_CONFIG} if stem else {}
    return FeatureNetConfig(in_channels=train.channels, num_classes=int(train.num_classes or 0),
                            class_names=list(train.class_names), **extra)


def cache_dir() -> Path:
    """The user's difflab cache folder (not created here)."""
    if os.environ.get("DIFFLAB_CACHE_DIR"):
        return Path(os.environ["DIFFLAB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "difflab"


def _folder_fingerprint(root: Path) -> str:
    """A digest of the file names, sizes and modification times under ``root``: a changed
    folder gets a new cache entry."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def builtin_name(dataset: str, resolution: int, channels: int, steps: int) -> str:
    """The extractor name recorded in reports and reference statistics."""
    return f"builtin:{dataset} ({resolution}px, {channels}ch, {steps} steps)"


def dataset_of_builtin_name(name: str) -> str | None:
    """The data set of an extractor name made by :func:`builtin_name`, else None."""
    m = re.fullmatch(r"builtin:(.+) \(\d+px, \d+ch, \d+ steps\)", name)
    return m.group(1) if m else None


def _cache_stem(dataset: str, resolution: int, channels: int, steps: int) -> Path:
    folder = dataset.partition(":")[2] if dataset.startswith("folder:") else dataset
    key = {"dataset": dataset, "resolution": resolution, "channels": channels, "steps": steps,
           "seed": BUILTIN_SEED, "version": _VERSION}
    if feature_stem(resolution):  # networks without a stem keep their earlier cache names
        key.update(stem=feature_stem(resolution), **STEM_CONFIG)
    if Path(folder).expanduser().is_dir() and dataset.lower() not in BUILTIN_DATASETS:
        key["files"] = _folder_fingerprint(Path(folder).expanduser())
    tag = re.sub(r"[^A-Za-z0-9]+", "-", Path(folder).name or dataset).strip("-") or "data"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "features" / f"{tag}-{resolution}px-{channels}ch-{steps}-{digest}"


def builtin_feature_net(dataset: str, resolution: int, channels: int,
                        steps: int = BUILTIN_STEPS, log=print) -> tuple[FeatureNet, str]:
    """(feature network, name) for ``dataset`` at ``resolution`` and ``channels``: loaded from
    the cache, or trained on the train split (one CPU thread, seed 0; under a minute at 8 px
    for the default steps, about two minutes at 64 px) and cached. A data set without labels
    is a DataError."""
    dataset = feature_dataset(dataset)
    stem = _cache_stem(dataset, resolution, channels, steps)
    name = builtin_name(dataset, resolution, channels, steps)
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        return load_feature_net(stem)[0], name
    train = load_dataset(dataset, resolution, channels, split="train")
    if train.labels is None:
        raise DataError(f"the built-in features need class labels and {dataset!r} has none "
                        f"(sub-folders are classes); give --features inception:PATH or "
                        f"classifier:RUN")
    log(f"training the built-in feature network on {dataset}:train ({len(train)} images, "
        f"{steps} steps, CPU); cached in {stem.parent}")
    threads = torch.get_num_threads()
    # one thread: the tiny CNN trains several times faster, and the sums run in one order
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            model = train_feature_net(train, steps=steps, seed=BUILTIN_SEED, device="cpu",
                                      config=builtin_config(train, resolution))
    finally:
        torch.set_num_threads(threads)
    test = load_dataset(dataset, resolution, channels, split="test")
    info = {"dataset": dataset, "resolution": resolution, "channels": channels, "steps": steps,
            "seed": BUILTIN_SEED, "test_accuracy": feature_net_accuracy(model, test)}
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_feature_net(model, stem, info)
    return model, name


__all__ = ["BUILTIN_STEPS", "builtin_config", "builtin_feature_net", "builtin_name", "cache_dir",
           "dataset_of_builtin_name", "feature_dataset", "feature_stem"]
