"""The shapes data set's new shape and colour (for fine-tuning benchmarks), off-grid centres,
and the mask scores of evaluation.shapes."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.data.base import DataError
from difflab.data.shapes import (
    ALL_COLOURS,
    ALL_SHAPES,
    JITTER,
    NEW_COLOURS,
    NEW_SHAPES,
    caption,
    coverage,
    load_shape_variants,
    load_shapes,
    parse_caption,
    render,
)
from difflab.evaluation.shapes import ShapeAttributeChecker, mask_iou, masked_psnr


def test_new_values_extend_the_vocabularies_without_renumbering():
    assert ALL_SHAPES[:3] == ("circle", "square", "triangle") and NEW_SHAPES[0] in ALL_SHAPES
    assert list(ALL_COLOURS)[:4] == ["red", "green", "blue", "yellow"]
    # load_shapes never draws them
    d = load_shapes(16, "train", 300, seed=2)
    assert d.attributes[:, 0].max() < 3 and d.attributes[:, 1].max() < 4


def test_variants_captions_round_trip_and_pixels_show_the_new_colour():
    d = load_shape_variants(40, seed=1, shapes=("plus",), colours=("purple",))
    assert set(d.attributes[:, 0].tolist()) == {ALL_SHAPES.index("plus")}
    rgb = torch.tensor(NEW_COLOURS["purple"]) * 2 - 1
    for img, cap, attrs in zip(d.images, d.captions, d.attributes.tolist(), strict=True):
        assert "purple plus" in cap and parse_caption(cap) == tuple(attrs) == parse_caption(
            caption(*attrs))
        brightest = img.flatten(1)[:, (img + 1).sum(0).flatten().argmax()]
        torch.testing.assert_close(brightest, rgb)  # a fully covered pixel: exactly the colour
    with pytest.raises(DataError, match="colours"):
        load_shape_variants(4, colours=("mauve",))
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a small mauve circle at the top left")


def test_plus_area_matches_its_closed_form():
    # bars 2.2 r x 0.8 r crossing: 2 * 1.76 r^2 - 0.64 r^2 = 2.88 r^2, against pi r^2 for the
    # circle drawn with the same radius (same generator); small shapes never touch the border
    plus, circle = (torch.tensor([[ALL_SHAPES.index(s), 0, 0, p] for p in range(4)])
                    for s in ("plus", "circle"))
    area = [coverage(a, 128, torch.Generator().manual_seed(0)).sum((1, 2, 3))
            for a in (plus, circle)]
    torch.testing.assert_close(area[0] / area[1], torch.full((4,), 2.88 / math.pi), rtol=0.01,
                               atol=0)


def test_default_jitter_is_the_data_sets_and_wider_jitter_moves_every_centre():
    attrs = load_shapes(16, "train", 64, seed=0).attributes
    a = render(attrs, 16, torch.Generator().manual_seed(5))
    b = render(attrs, 16, torch.Generator().manual_seed(5), (0.0, JITTER))
    assert torch.equal(a, b)
    circles = torch.tensor([[0, 0, 0, p] for p in range(4)] * 16)
    cover = coverage(circles, 64, torch.Generator().manual_seed(1), (0.08, 0.1))[:, 0]
    ys = torch.arange(64.0)[:, None] + 0.5
    xs = torch.arange(64.0)[None, :] + 0.5
    mass = cover.sum((1, 2))
    cy, cx = (cover * ys).sum((1, 2)) / mass, (cover * xs).sum((1, 2)) / mass
    qx = (circles[:, 3] % 2).float() * 32 + 16
    qy = (circles[:, 3] // 2).float() * 32 + 16
    for off in ((cx - qx).abs(), (cy - qy).abs()):  # small circles stay inside the image
        assert off.min() >= 0.08 * 64 - 0.1 and off.max() <= 0.1 * 64 + 0.1
    with pytest.raises(ValueError, match="jitter"):
        coverage(circles, 16, torch.Generator(), (0.1, 0.05))


@pytest.mark.slow
def test_checker_with_the_new_palette_reads_the_new_shape_and_colour():
    every = dict(shapes=ALL_SHAPES, colours=tuple(ALL_COLOURS))
    checker = ShapeAttributeChecker(0, palette=ALL_COLOURS).fit(
        load_shape_variants(800, seed=1, **every))
    test = load_shape_variants(200, seed=2, **every)
    hit = checker.predict(test.images) == test.attributes
    assert hit[:, 1].all() and hit[:, 3].all() and hit[:, 0].float().mean() > 0.9
    plus = test.attributes[:, 0] == ALL_SHAPES.index("plus")
    assert hit[plus, 0].float().mean() > 0.9


def test_mask_iou_and_masked_psnr_closed_forms():
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 2:6] = 1  # 16 pixels
    images = mask[:, None].expand(-1, 3, -1, -1) * 2 - 1
    assert torch.equal(mask_iou(images, mask), torch.ones(2))
    shifted = torch.zeros(2, 8, 8)
    shifted[:, 2:6, 3:7] = 1  # overlap 12, union 20
    torch.testing.assert_close(mask_iou(images, shifted), torch.full((2,), 0.6))
    keep = mask < 0.5
    assert torch.isinf(masked_psnr(images, images.clone(), keep)).all()
    other = images.clone()
    other[0, :, 0, 0] += 0.2  # one kept pixel off by 0.2 in 3 channels out of 48 x 3
    other[1, :, 3, 3] = 5.0  # inside the edited region: ignored
    psnr = masked_psnr(images, other, keep)
    assert float(psnr[0]) == pytest.approx(10 * math.log10(4 / (0.04 / 48)), rel=1e-5)
    assert torch.isinf(psnr[1])
