"""Tests for difflab.data: digits, image folders, toy 2-D data and image I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import (
    TOY_DATASETS,
    DataError,
    ImageData,
    from_uint8,
    load_dataset,
    load_digits,
    load_image_folder,
    load_png,
    sample_toy,
    save_grid,
    save_images,
    to_uint8,
)

# ---------------------------------------------------------------------------- base helpers


def test_uint8_round_trip_exact() -> None:
    u = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(u)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(torch.tensor([-5.0, 5.0, float("nan")])),
                       torch.tensor([0, 255, 0], dtype=torch.uint8))


def test_image_data_validates_shapes() -> None:
    with pytest.raises(DataError):
        ImageData(torch.zeros(2, 8, 8))
    with pytest.raises(DataError):
        ImageData(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long), ["a"])
    data = ImageData(torch.zeros(2, 1, 8, 8))
    assert len(data) == 2 and data.num_classes is None and data.class_names == []


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_range_labels() -> None:
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.dtype == torch.float32 and data.images.is_contiguous()
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.labels.shape == (1797,)
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert set(data.labels.tolist()) == set(range(10))
    assert len(data) == 1797


def test_digits_split_disjoint_union_and_deterministic() -> None:
    full = load_digits()
    train = load_digits(split="train", seed=3)
    test = load_digits(split="test", seed=3)
    assert len(train) + len(test) == len(full)
    assert abs(len(test) - 0.2 * len(full)) < 10
    # Recover indices by matching images back to the full set.
    flat = full.images.flatten(1)
    index = {tuple(row.tolist()): i for i, row in enumerate(flat)}

    def ids(part: ImageData) -> set[int]:
        return {index[tuple(row.tolist())] for row in part.images.flatten(1)}

    train_ids, test_ids = ids(train), ids(test)
    # A handful of digits are exact duplicates in the data set; compare label multisets too.
    assert len(train_ids & test_ids) <= 5
    labels = torch.cat([train.labels, test.labels]).sort().values
    assert torch.equal(labels, full.labels.sort().values)
    # Stratified: every class is in the test split.
    assert set(test.labels.tolist()) == set(range(10))
    again = load_digits(split="test", seed=3)
    assert torch.equal(again.images, test.images)
    other = load_digits(split="test", seed=4)
    assert not torch.equal(other.images, test.images)


def test_digits_upscale() -> None:
    data = load_digits(resolution=32)
    assert data.images.shape == (1797, 1, 32, 32)
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    # Downscaling back roughly recovers the 8x8 originals.
    small = torch.nn.functional.avg_pool2d(data.images, 4)
    assert (small - load_digits().images).abs().mean() < 0.15


@pytest.mark.parametrize("bad", [0, 7, 12, -8])
def test_digits_bad_resolution(bad: int) -> None:
    with pytest.raises(DataError, match="resolution"):
        load_digits(resolution=bad)


def test_digits_bad_split() -> None:
    with pytest.raises(DataError, match="split"):
        load_digits(split="valid")
    with pytest.raises(DataError, match="test_fraction"):
        load_digits(split="train", test_fraction=1.5)


# ---------------------------------------------------------------------------- image folders


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _thirds(width: int, height: int) -> Image.Image:
    """Red | green | blue vertical thirds."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    t = width // 3
    arr[:, :t, 0] = 255
    arr[:, t : 2 * t, 1] = 255
    arr[:, 2 * t :, 2] = 255
    return Image.fromarray(arr, "RGB")


def test_folder_labelled_mixed_modes(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 128))
    grey = Image.new("L", (15, 30), 100)
    pal = Image.new("RGB", (25, 25), (0, 0, 255)).convert("P")
    _save(tmp_path / "cats" / "a.png", rgba)
    _save(tmp_path / "cats" / "nested" / "b.jpg", Image.new("RGB", (64, 48), (10, 200, 30)))
    _save(tmp_path / "dogs" / "c.png", grey)
    _save(tmp_path / "dogs" / "d.gif", pal)
    _save(tmp_path / "dogs" / "e.bmp", Image.new("RGB", (9, 17), (1, 2, 3)))
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")

    data = load_image_folder(tmp_path, resolution=12)
    assert data.images.shape == (5, 3, 12, 12)
    assert data.images.dtype == torch.float32
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert data.class_names == ["cats", "dogs"]
    assert data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    # Half-transparent red over white -> (255, ~127, ~127).
    px = to_uint8(data.images[0, :, 6, 6]).tolist()
    assert px[0] == 255 and abs(px[1] - 127) <= 2 and abs(px[2] - 127) <= 2
    # Grey image replicated over channels.
    assert torch.equal(to_uint8(data.images[2]), torch.full((3, 12, 12), 100, dtype=torch.uint8))
    # Palette image keeps its colour.
    assert to_uint8(data.images[3, :, 6, 6]).tolist() == [0, 0, 255]

    grey_data = load_image_folder(tmp_path, resolution=12, channels=1)
    assert grey_data.images.shape == (5, 1, 12, 12)
    assert torch.equal(to_uint8(grey_data.images[2]), torch.full((1, 12, 12), 100,
                                                                  dtype=torch.uint8))


def test_folder_unlabelled_and_center_crop(tmp_path: Path) -> None:
    _save(tmp_path / "wide.png", _thirds(60, 20))
    tall = _thirds(60, 20).transpose(Image.Transpose.ROTATE_90)  # thirds stacked vertically
    _save(tmp_path / "tall.png", tall)
    data = load_image_folder(tmp_path, resolution=10)
    assert data.labels is None and data.class_names == [] and data.num_classes is None
    assert data.images.shape == (2, 3, 10, 10)
    for img in to_uint8(data.images):  # sorted order: tall.png, wide.png
        centre = img[:, 2:8, 2:8].int()
        assert (centre[1] >= 250).all(), "centre crop should keep the green middle third"
        assert (centre[0] <= 5).all() and (centre[2] <= 5).all()
        # All pixels of the crop are mostly green (only edge blur from resampling).
        assert (img[1].int() - img[0].int() > 100).all()


def test_folder_16bit_and_upscale(tmp_path: Path) -> None:
    arr = np.full((4, 6), 65535 // 2, dtype=np.uint16)
    _save(tmp_path / "deep.png", Image.fromarray(arr))
    _save(tmp_path / "small.png", Image.new("RGB", (3, 3), (255, 255, 255)))
    data = load_image_folder(tmp_path, resolution=16, channels=1)
    assert data.images.shape == (2, 1, 16, 16)
    assert abs(int(to_uint8(data.images[0]).float().mean()) - 127) <= 1
    assert torch.equal(to_uint8(data.images[1]), torch.full((1, 16, 16), 255, dtype=torch.uint8))


def test_folder_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        load_image_folder(missing, 8)
    assert str(missing) in str(err.value)


def test_folder_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file.png"
    _save(f, Image.new("RGB", (4, 4)))
    with pytest.raises(DataError, match="not a directory") as err:
        load_image_folder(f, 8)
    assert str(f) in str(err.value)


def test_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files") as err:
        load_image_folder(tmp_path, 8)
    assert str(tmp_path) in str(err.value) and "png" in str(err.value)


def test_folder_corrupt_files_listed_together(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "good.png", Image.new("RGB", (8, 8)))
    bad1 = tmp_path / "a" / "bad1.png"
    bad2 = tmp_path / "b" / "bad2.jpg"
    bad2.parent.mkdir()
    bad1.write_bytes(b"this is not an image at all")
    bad2.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DataError, match="unreadable") as err:
        load_image_folder(tmp_path, 8)
    msg = str(err.value)
    assert str(bad1) in msg and str(bad2) in msg and "good.png" not in msg


def test_folder_top_level_files_with_classes_rejected(tmp_path: Path) -> None:
    _save(tmp_path / "cls" / "a.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "stray.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="stray.png"):
        load_image_folder(tmp_path, 8)


def test_folder_bad_options(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="resolution"):
        load_image_folder(tmp_path, 0)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path, 8, channels=2)


# ---------------------------------------------------------------------------- load_dataset


def test_load_dataset_by_name_and_path(tmp_path: Path) -> None:
    d = load_dataset("digits", 16, split="train")
    assert d.images.shape[1:] == (1, 16, 16) and d.num_classes == 10
    assert load_dataset("digits", 8, channels=3).images.shape == (1797, 3, 8, 8)
    _save(tmp_path / "x" / "a.png", Image.new("RGB", (10, 10), (255, 0, 0)))
    _save(tmp_path / "y" / "b.png", Image.new("RGB", (10, 10), (0, 255, 0)))
    for name in (str(tmp_path), f"folder:{tmp_path}"):
        f = load_dataset(name, 4)
        assert f.images.shape == (2, 3, 4, 4) and f.class_names == ["x", "y"]
    assert load_dataset(str(tmp_path), 4, channels=1).images.shape == (2, 1, 4, 4)


def test_load_dataset_unknown(tmp_path: Path) -> None:
    missing = tmp_path / "not_here"
    with pytest.raises(DataError) as err:
        load_dataset(str(missing), 8)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg and "digits" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{missing}", 8)


# ---------------------------------------------------------------------------- toy 2-D


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_datasets(name: str) -> None:
    x = sample_toy(name, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    again = TOY_DATASETS[name](4000, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    other = sample_toy(name, 4000, torch.Generator().manual_seed(1))
    assert not torch.equal(x, other)
    assert x.mean(0).abs().max() < 0.3
    std = x.std(0)
    assert (std > 0.5).all() and (std < 2.0).all()
    assert sample_toy(name, 0, None).shape == (0, 2)


def test_sample_toy_unknown_name() -> None:
    with pytest.raises(DataError) as err:
        sample_toy("spiral", 10, None)
    for name in TOY_DATASETS:
        assert name in str(err.value)


# ---------------------------------------------------------------------------- image I/O


def test_save_grid_size(tmp_path: Path) -> None:
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    out = save_grid(images, tmp_path / "deep" / "dir" / "grid.png", nrow=4, scale=4, padding=2)
    assert out.exists()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "L"
        # 4 columns, 3 rows of 32x32 plus padding.
        assert img.size == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left
    rgb = save_grid(torch.zeros(3, 3, 5, 7), tmp_path / "rgb.png")
    with Image.open(rgb) as img:
        assert img.mode == "RGB" and img.size == (2 * 7 + 3, 2 * 5 + 3)


def test_save_grid_nearest_upscale(tmp_path: Path) -> None:
    u = torch.randint(0, 256, (1, 1, 3, 3), dtype=torch.uint8)
    out = save_grid(from_uint8(u), tmp_path / "g.png", scale=3, padding=0)
    back = to_uint8(load_png(out, channels=1))
    assert torch.equal(back, u[0].repeat_interleave(3, 1).repeat_interleave(3, 2))


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_round_trip_exact(tmp_path: Path, channels: int) -> None:
    u = torch.randint(0, 256, (1, channels, 6, 9), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    out = save_grid(from_uint8(u), tmp_path / "one.png", padding=0)
    loaded = load_png(out, channels=channels)
    assert loaded.shape == (channels, 6, 9) and loaded.dtype == torch.float32
    assert torch.equal(to_uint8(loaded), u[0])


def test_save_images_and_load_errors(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 4, 4) * 2 - 1
    paths = save_images(images, tmp_path / "samples", prefix="s")
    assert [p.name for p in paths] == ["s_00000.png", "s_00001.png", "s_00002.png"]
    assert torch.equal(to_uint8(load_png(paths[1])), to_uint8(images[1]))
    with pytest.raises(DataError, match="does not exist"):
        load_png(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    with pytest.raises(DataError, match="junk.png"):
        load_png(junk)
