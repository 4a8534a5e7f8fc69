"""Data from the ecosystem: CIFAR binary files, Hugging Face save_to_disk folders, and
torchvision ImageFolder parity of image folders. Every data set is written by the test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import (
    IMAGE_EXTENSIONS,
    CaptionedImageData,
    DataError,
    DataRequest,
    load_data,
    load_image_folder,
    to_uint8,
)
from difflab.data import hf as hf_module
from difflab.data.registry import dataset_slug
from difflab.evaluation.reference import load_sample_set
from difflab.recipes.config import resolve_values

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def _one_line_error(name: str, request: DataRequest | None = None, *parts: str) -> str:
    with pytest.raises(DataError) as err:
        load_data(name, request)
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg
    return msg


# ---------------------------------------------------------------- CIFAR binary version

def _records(rng: np.random.Generator, n: int, label_bytes: list[np.ndarray]
             ) -> tuple[bytes, np.ndarray]:
    """``n`` records (label bytes then 3072 pixel bytes) and their pixels [n, 3, 32, 32]."""
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rows = np.concatenate([*(b[:, None].astype(np.uint8) for b in label_bytes),
                           pixels.reshape(n, -1)], axis=1)
    return rows.tobytes(), pixels


def _write_cifar10(folder: Path, sizes=(3, 2, 4, 1, 2), test_size=3, seed=0):
    """A CIFAR-10 binary folder with random pixels; returns {split: (pixels, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    out = {}
    files = [(f"data_batch_{i + 1}.bin", n) for i, n in enumerate(sizes)]
    for split, group in (("train", files), ("test", [("test_batch.bin", test_size)])):
        pix, lab = [], []
        for name, n in group:
            labels = rng.integers(0, 10, n)
            raw, pixels = _records(rng, n, [labels])
            (folder / name).write_bytes(raw)
            pix.append(pixels)
            lab.append(labels)
        out[split] = (np.concatenate(pix), np.concatenate(lab))
    return out


def test_cifar10_binary_round_trip_and_splits(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    truth = _write_cifar10(folder)
    for name, split, want in [(f"cifar10:{folder}", "train", "train"),
                              (f"cifar10:{folder}", "all", "train"),  # all = the training set
                              (f"cifar10:{folder}", "test", "test"),
                              (f"cifar10:{tmp_path}", "test", "test"),  # the unpacked archive
                              (f"cifar10:{folder}:test", "all", "test"),
                              (f"cifar10:{folder}:train", "train", "train")]:
        data = load_data(name, DataRequest(resolution=32, split=split))
        pixels, labels = truth[want]
        assert torch.equal(to_uint8(data.images), torch.from_numpy(pixels)), (name, split)
        assert data.labels.tolist() == labels.tolist()
        assert data.class_names == CIFAR10_NAMES
    assert len(truth["train"][0]) == 12 and len(truth["test"][0]) == 3
    samples = load_sample_set(f"cifar10:{folder}:test", resolution=32)  # difflab eval's names
    assert np.array_equal(samples.images, truth["test"][0].transpose(0, 2, 3, 1))
    _one_line_error(f"cifar10:{folder}:test", DataRequest(32, split="train"),
                    "split 'test'", "'train'")


def test_cifar10_resized_like_an_image_folder(tmp_path: Path) -> None:
    """At another size or in grey, CIFAR images equal the same pixels saved as PNGs and read
    by the image-folder loader."""
    folder = tmp_path / "bin"
    pixels, _ = _write_cifar10(folder)["test"]
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, chw in enumerate(pixels):
        Image.fromarray(chw.transpose(1, 2, 0), "RGB").save(pngs / f"{i:03d}.png")
    for resolution, channels in ((32, 1), (20, 3), (48, 1)):
        data = load_data(f"cifar10:{folder}:test", DataRequest(resolution, channels))
        ref = load_image_folder(pngs, resolution, channels, num_workers=0)
        assert data.images.shape == (3, channels, resolution, resolution)
        assert torch.equal(data.images, ref.images), (resolution, channels)


def test_cifar10_refusals(tmp_path: Path) -> None:
    pickled = tmp_path / "cifar-10-batches-py"
    pickled.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (pickled / name).write_bytes(b"\x80\x04 pickled")
    for where in (pickled, tmp_path):  # the folder, or the folder it was unpacked into
        _one_line_error(f"cifar10:{where}", None, "pickled", "cifar-10-binary.tar.gz",
                        str(pickled))
    _one_line_error(f"cifar10:{tmp_path / 'nope'}", None, "does not exist", "nope")
    _one_line_error(f"cifar10:{tmp_path}:label=fine", None, "unknown option 'label'")

    good = tmp_path / "good"
    _write_cifar10(good, sizes=(2, 2, 2, 2, 2))
    raw = (good / "data_batch_3.bin").read_bytes()
    (good / "data_batch_3.bin").write_bytes(raw[:-7])
    _one_line_error(f"cifar10:{good}", None, "truncated", "data_batch_3.bin", "3073-byte")
    (good / "data_batch_3.bin").write_bytes(bytes([10]) + raw[1:])
    _one_line_error(f"cifar10:{good}", None, "corrupt", "data_batch_3.bin", "record 0",
                    "label 10")
    (good / "data_batch_3.bin").write_bytes(raw)
    assert len(load_data(f"cifar10:{good}", DataRequest(32))) == 10
    (good / "data_batch_4.bin").unlink()
    _one_line_error(f"cifar10:{good}", None, "missing", "data_batch_4.bin")
    assert len(load_data(f"cifar10:{good}", DataRequest(32, split="test"))) == 3
    (good / "batches.meta.txt").write_text("cat\ndog\n")
    _one_line_error(f"cifar10:{good}:test", None, "batches.meta.txt", "2 names", "expected 10")


def test_cifar100_binary_fine_and_coarse_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    (folder / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
    rng = np.random.default_rng(1)
    truth = {}
    for file, n in (("train.bin", 5), ("test.bin", 2)):
        coarse, fine = rng.integers(0, 20, n), rng.integers(0, 100, n)
        raw, pixels = _records(rng, n, [coarse, fine])
        (folder / file).write_bytes(raw)
        truth[file] = (pixels, coarse, fine)
    data = load_data(f"cifar100:{tmp_path}", DataRequest(32))
    pixels, coarse, fine = truth["train.bin"]
    assert torch.equal(to_uint8(data.images), torch.from_numpy(pixels))
    assert data.labels.tolist() == fine.tolist() and data.class_names == fine_names
    data = load_data(f"cifar100:{folder}:label=coarse:test", DataRequest(32))
    pixels, coarse, fine = truth["test.bin"]
    assert torch.equal(to_uint8(data.images), torch.from_numpy(pixels))
    assert data.labels.tolist() == coarse.tolist() and data.class_names == coarse_names
    _one_line_error(f"cifar100:{folder}:label=medium", None, "label='medium'")
    (folder / "test.bin").write_bytes(bytes([0, 100]) + bytes(3072))
    _one_line_error(f"cifar100:{folder}:test", None, "test.bin", "fine 100")


def test_cifar10_train_defaults(tmp_path: Path) -> None:
    """difflab train --dataset cifar10:PATH: 32 px and runs/cifar10 unless given."""
    notes: list[str] = []
    out = resolve_values({"data": {"dataset": f"cifar10:{tmp_path}"}}, notes)
    assert out["data"]["resolution"] == 32 and out["run"]["out_dir"] == "runs/cifar10"
    assert dataset_slug(f"hf:{tmp_path / 'pets'}:text=caption") == "pets"


# ---------------------------------------------------------------- Hugging Face datasets

try:
    import datasets
except ImportError:  # the hf extra is not installed: the tests below skip
    datasets = None
needs_hf = pytest.mark.skipif(datasets is None, reason="needs the hf extra: "
                              "pip install 'difflab[hf]' (Hugging Face datasets)")


def _hf_rows(n: int, seed: int, size: int = 8) -> tuple[list[Image.Image], np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return [Image.fromarray(p, "RGB") for p in pixels], pixels


def _hf_dataset(n: int = 6, seed: int = 0, size: int = 8):
    images, pixels = _hf_rows(n, seed, size)
    labels = [i % 3 for i in range(n)]
    captions = [f"a picture of {['cats', 'dogs', 'eels'][i % 3]}" for i in range(n)]
    features = datasets.Features({
        "img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"]),
        "caption": datasets.Value("string"), "idx": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": images, "label": labels, "caption": captions,
                                     "idx": list(range(n))}, features=features)
    return ds, pixels, labels, captions


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


@needs_hf
def test_hf_dataset_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_module, "_BATCH", 4)  # rows are read in batches: two here
    ds, pixels, labels, captions = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_data(f"hf:{tmp_path / 'ds'}", DataRequest(resolution=8))
    assert torch.equal(to_uint8(data.images), _chw(pixels))
    assert data.labels.tolist() == labels and data.class_names == ["cat", "dog", "eel"]

    text = load_data(f"hf:{tmp_path / 'ds'}:text=caption", DataRequest(resolution=8))
    assert isinstance(text, CaptionedImageData) and text.captions == captions
    assert torch.equal(text.images, data.images)
    ints = load_data(f"hf:{tmp_path / 'ds'}:label=idx", DataRequest(resolution=8))
    assert ints.labels.tolist() == list(range(6)) and ints.class_names == list("012345")
    none = load_data(f"hf:{tmp_path / 'ds'}:label=none", DataRequest(resolution=8))
    assert none.labels is None and none.class_names == []

    # a single Dataset is split like a folder: stratified, disjoint, covering
    train = load_data(f"hf:{tmp_path / 'ds'}", DataRequest(8, split="train", test_fraction=0.5))
    test = load_data(f"hf:{tmp_path / 'ds'}:test", DataRequest(8, test_fraction=0.5))
    assert len(train) == len(test) == 3
    assert sorted(train.labels.tolist() + test.labels.tolist()) == sorted(labels)
    both = torch.cat([to_uint8(train.images), to_uint8(test.images)]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == 6


@needs_hf
def test_hf_images_prepared_like_an_image_folder(tmp_path: Path) -> None:
    """Resized, grey and odd-mode images equal the image-folder loader's on the same PNGs."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB"),
              Image.fromarray(rng.integers(0, 256, (16, 10), dtype=np.uint8), "L"),
              Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA")]
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, img in enumerate(images):
        img.save(pngs / f"{i}.png")
    ds = datasets.Dataset.from_dict({"photo": [str(pngs / f"{i}.png") for i in range(3)]},
                                    features=datasets.Features({"photo": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    for resolution, channels in ((8, 3), (6, 1), (16, 3)):
        data = load_data(f"hf:{tmp_path / 'ds'}", DataRequest(resolution, channels))
        ref = load_image_folder(pngs, resolution, channels, num_workers=0)
        assert data.labels is None
        assert torch.equal(data.images, ref.images), (resolution, channels)


@needs_hf
def test_hf_dataset_dict_splits(tmp_path: Path) -> None:
    train, train_px, train_lab, _ = _hf_dataset(6, seed=0)
    test, test_px, test_lab, _ = _hf_dataset(3, seed=1)
    val, val_px, _, _ = _hf_dataset(2, seed=2)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dd"))
    path = tmp_path / "dd"
    for name, split, want in [(f"hf:{path}", "all", (train_px, train_lab)),
                              (f"hf:{path}", "train", (train_px, train_lab)),
                              (f"hf:{path}", "test", (test_px, test_lab)),
                              (f"hf:{path}:test", "all", (test_px, test_lab)),
                              (f"hf:{path}:split=test", "all", (test_px, test_lab))]:
        data = load_data(name, DataRequest(8, split=split))
        assert torch.equal(to_uint8(data.images), _chw(want[0])), (name, split)
        assert data.labels.tolist() == want[1]
    # a chosen split is divided like a folder when a recipe asks for train/test
    part = load_data(f"hf:{path}:split=test:label=none:train", DataRequest(8, test_fraction=0.34))
    assert len(part) == 2

    datasets.DatasetDict(train=train, validation=val).save_to_disk(str(tmp_path / "tv"))
    data = load_data(f"hf:{tmp_path / 'tv'}:split=validation", DataRequest(8))
    assert torch.equal(to_uint8(data.images), _chw(val_px))
    _one_line_error(f"hf:{tmp_path / 'tv'}:split=test", DataRequest(8),
                    "no split 'test'", "train, validation", str(tmp_path / "tv"))
    _one_line_error(f"hf:{tmp_path / 'dd' / 'train'}:split=test", DataRequest(8),
                    "one Dataset", "split=test")


@needs_hf
def test_hf_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, *_ = _hf_dataset(4)
    ds.save_to_disk(str(tmp_path / "ds"))
    good = f"hf:{tmp_path / 'ds'}"
    _one_line_error(f"hf:{tmp_path / 'nope'}", None, "does not exist", "nope")
    _one_line_error(f"hf:{tmp_path}", None, "not a folder written by save_to_disk",
                    str(tmp_path))
    _one_line_error(f"{good}:colour=red", None, "unknown option 'colour'", "image, label")
    _one_line_error(f"{good}:image=idx", DataRequest(8), "'idx'", "not an Image column")
    _one_line_error(f"{good}:image=photo", DataRequest(8), "no column 'photo'")
    _one_line_error(f"{good}:label=caption", DataRequest(8), "'caption'",
                    "not a ClassLabel or integer column")
    _one_line_error(f"{good}:text=label", DataRequest(8), "'label'", "not a string column")
    _one_line_error(f"{good}:text=caption:label=label", DataRequest(8), "not both")

    two = ds.add_column("img2", [None] * 4).cast_column("img2", datasets.Image())
    two.save_to_disk(str(tmp_path / "two"))
    _one_line_error(f"hf:{tmp_path / 'two'}", DataRequest(8), "several Image columns",
                    "img, img2", ":image=COLUMN")
    _one_line_error(f"hf:{tmp_path / 'two'}:image=img2", DataRequest(8),
                    "4 unreadable image(s)", "'img2'", "row 0")
    garbage = datasets.Dataset.from_dict(
        {"img": [{"bytes": b"not an image", "path": None}]},
        features=datasets.Features({"img": datasets.Image()}))
    garbage.save_to_disk(str(tmp_path / "garbage"))
    _one_line_error(f"hf:{tmp_path / 'garbage'}", DataRequest(8), "1 unreadable image(s)",
                    "row 0 (UnidentifiedImageError", str(tmp_path / "garbage"))
    ds.map(lambda row: {"label": -1 if row["idx"] == 2 else row["label"]}).save_to_disk(
        str(tmp_path / "minus"))
    _one_line_error(f"hf:{tmp_path / 'minus'}", DataRequest(8), "1 row(s) without a label",
                    ":label=none")
    unlabelled = ds.remove_columns(["label"])
    unlabelled.save_to_disk(str(tmp_path / "nolabel"))
    assert load_data(f"hf:{tmp_path / 'nolabel'}", DataRequest(8)).labels is None

    arrow = next((tmp_path / "ds").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    _one_line_error(good, DataRequest(8), "cannot read", str(arrow))

    monkeypatch.setitem(sys.modules, "datasets", None)  # the extra not installed
    _one_line_error(f"hf:{tmp_path / 'nolabel'}", DataRequest(8), "difflab[hf]")


# ---------------------------------------------------------------- torchvision ImageFolder

#: torchvision.datasets.folder.IMG_EXTENSIONS, as documented
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")


def _torchvision_samples(root: Path) -> list[tuple[str, int]]:
    """ImageFolder's (path, class index) list by its documented rule: classes are the sorted
    sub-folder names; each class's files in sorted(os.walk(..., followlinks=True)) order,
    sorted by name, kept when the lower-cased name ends in an IMG_EXTENSIONS entry."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples.extend((os.path.join(dirpath, f), index) for f in sorted(files)
                           if f.lower().endswith(TORCHVISION_EXTENSIONS))
    return samples


def test_image_folder_matches_torchvision_image_folder(tmp_path: Path) -> None:
    files = ["Zebra/z.png", "apple/b.png", "apple/a/x.ppm", "apple/a-b/y.bmp",
             "apple/a/c/z.tif", "apple/A.PNG", "banana/p.pgm", "banana/q.webp",
             "banana/deep/er/r.tiff", "banana/s.jpeg"]
    for i, rel in enumerate(files):  # each image a flat grey level that names it
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if rel.endswith(".pgm") else "RGB"
        extra = {"lossless": True} if rel.endswith(".webp") else {}
        Image.new(mode, (5, 7), (20 * i + 10,) * (1 if mode == "L" else 3)).save(path, **extra)
    (tmp_path / "banana" / "notes.txt").write_text("not an image")

    expected = _torchvision_samples(tmp_path)
    assert len(expected) == len(files)
    data = load_image_folder(tmp_path, 4, num_workers=0)
    assert data.class_names == ["Zebra", "apple", "banana"]
    assert data.labels.tolist() == [label for _, label in expected]
    got = (to_uint8(data.images[:, 0, 0, 0]).float() - 10) / 20  # the file's index
    order = [files.index(Path(p).relative_to(tmp_path).as_posix()) for p, _ in expected]
    assert got.round().long().tolist() == order, (got, order)
    assert set(IMAGE_EXTENSIONS) - {e.lstrip(".") for e in TORCHVISION_EXTENSIONS} == {"gif"}
    assert {e.lstrip(".") for e in TORCHVISION_EXTENSIONS} <= set(IMAGE_EXTENSIONS)
