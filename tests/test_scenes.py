"""Tests for the scenes data set (difflab.data.scenes) and its evaluation support."""

from __future__ import annotations

import pytest
import torch

from difflab.cli.main import main
from difflab.data import CaptionedImageData, DataError, DataRequest, SceneData, load_data
from difflab.data.registry import dataset_folder, dataset_slug
from difflab.data.scenes import (
    BACKGROUNDS,
    CLASS_NAMES,
    COUNT_WORDS,
    MAX_BACKGROUND_CHROMA,
    _background,
    load_scenes,
    parse_scene_caption,
    render_scenes,
    sample_scenes,
    scene_caption,
)
from difflab.data.shapes import COLOURS, SHAPES
from difflab.evaluation.builtin import (
    builtin_config,
    builtin_feature_net,
    feature_dataset,
    feature_stem,
)
from difflab.evaluation.featurenet import (
    FeatureNet,
    FeatureNetConfig,
    feature_net_accuracy,
)
from difflab.evaluation.scenes import scene_classes, scenes_accuracy

PALETTE = torch.tensor(list(COLOURS.values()))


@pytest.fixture(scope="module")
def drawn():
    """300 scenes at 32 px with the objects' coverages."""
    scenes = sample_scenes(300, torch.Generator().manual_seed(7))
    images, masks = render_scenes(scenes, 32, return_masks=True)
    return scenes, images, masks


def test_deterministic_in_the_seed_and_resolution_free():
    a = load_scenes(32, "all", n=64, seed=3)
    b = load_scenes(32, "all", n=64, seed=3)
    c = load_scenes(32, "all", n=64, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.texts == b.texts and not torch.equal(a.images, c.images)
    # the same scenes at another resolution: 64 px box-filtered to 32 px is close to 32 px
    big = load_scenes(64, "all", n=64, seed=3)
    assert torch.equal(big.labels, a.labels) and big.texts == a.texts
    down = torch.nn.functional.avg_pool2d(big.images, 2)
    assert (down - a.images).abs().mean() < 0.05


def test_shapes_ranges_dtypes_and_classes():
    data = load_scenes(16, "all", n=240, seed=0)
    assert isinstance(data, SceneData)
    assert data.images.shape == (240, 3, 16, 16) and data.images.dtype == torch.float32
    assert data.images.is_contiguous()
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.labels.dtype == torch.int64 and data.class_names == CLASS_NAMES
    assert len(CLASS_NAMES) == len(SHAPES) * len(COLOURS) == 12
    assert set(data.labels.tolist()) == set(range(12))
    assert CLASS_NAMES[int(data.scenes.labels[0])].split() == [
        list(COLOURS)[int(data.scenes.colour[0, 0])], SHAPES[int(data.scenes.shape[0, 0])]]


def test_labels_match_the_drawn_main_object(drawn):
    scenes, images, masks = drawn
    rgb = (images + 1) / 2
    inside = masks[:, 0] > 0.999  # fully covered pixels of the main object
    assert inside.flatten(1).sum(1).min() > 20
    colour = scenes.labels % len(COLOURS)
    for i in range(len(scenes)):
        pix = rgb[i][:, inside[i]].T  # [P, 3]
        # every fully covered pixel is exactly the palette colour of the class
        assert torch.allclose(pix, PALETTE[colour[i]].expand_as(pix), atol=1e-5)
    # the main object is the largest object; distractors never share its colour
    area = masks.sum((2, 3))
    assert (area[:, 0] > area[:, 1:].amax(1)).all()
    present = scenes.present[:, 1:]
    assert (scenes.colour[:, 1:][present] != colour[:, None].expand(-1, 3)[present]).all()


def test_objects_do_not_overlap_and_counts_agree(drawn):
    scenes, images, masks = drawn
    assert (masks.sum(1) <= 1 + 1e-5).all()  # coverages of disjoint sub-pixels add up to <= 1
    visible = (masks.sum((2, 3)) > 0).sum(1) - 1
    assert torch.equal(visible, scenes.distractors)
    assert scenes.distractors.min() >= 1 and scenes.distractors.max() <= 3
    assert set(scenes.distractors.tolist()) == {1, 2, 3}
    assert (masks[:, 1:].sum((2, 3))[~scenes.present[:, 1:]] == 0).all()


def test_background_colours_are_muted_and_never_palette(drawn):
    scenes, images, masks = drawn
    rgb = ((images + 1) / 2).permute(0, 2, 3, 1)[masks.sum(1) == 0]  # background pixels
    assert len(rgb) > 100_000
    chroma = rgb.amax(1) - rgb.amin(1)
    assert chroma.max() <= MAX_BACKGROUND_CHROMA + 1e-5
    assert torch.cdist(rgb, PALETTE).min() > 0.3
    assert (PALETTE.amax(1) - PALETTE.amin(1)).min() >= 0.8  # the palette is saturated


def test_captions_agree_with_the_scene(drawn):
    scenes, images, masks = drawn
    for text, label, n, bg in zip(scenes.captions(), scenes.labels.tolist(),
                                  scenes.distractors.tolist(), scenes.background.tolist(),
                                  strict=True):
        assert parse_scene_caption(text) == (label, n, bg)
        assert f" {COUNT_WORDS[n - 1]} small object" in text and BACKGROUNDS[bg] in text
    assert scene_caption(0, 1, 0) == "a large red circle with one small object on a striped " \
                                      "background"
    with pytest.raises(ValueError, match="not a scenes caption"):
        parse_scene_caption("a large red circle at the top left")


def test_background_kinds_are_what_the_caption_says():
    scenes = sample_scenes(200, torch.Generator().manual_seed(1))
    bg = (_background(scenes, 64) - scenes.bg_colours[:, 0, :, None, None])
    span = (scenes.bg_colours[:, 1] - scenes.bg_colours[:, 0])
    ch = span.abs().argmax(1)  # the channel where the two colours differ most
    idx = torch.arange(len(scenes))
    mix = bg[idx, ch] / span[idx, ch][:, None, None]  # [N, 64, 64] in [0, 1]
    binary = ((mix < 0.01) | (mix > 0.99)).float().mean((1, 2))
    share = mix.mean((1, 2))
    for i in idx.tolist():
        kind = BACKGROUNDS[int(scenes.background[i])]
        if kind == "mottled":
            assert binary[i] < 0.5  # smooth noise: mostly intermediate values
        else:
            # hard-edged patterns with one-pixel ramps (checks: ramps along both axes)
            assert binary[i] > (0.4 if kind == "checked" else 0.6), kind
            expected = {"striped": 0.5, "checked": 0.5, "dotted": 0.283}[kind]
            assert abs(share[i] - expected) < 0.12, (kind, float(share[i]))


def test_splits_disjoint_reproducible_and_stratified():
    kw = dict(resolution=16, n=300, seed=2)
    train, test, full = (load_scenes(split=s, **kw) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(full) == 300 and len(test) == pytest.approx(60, abs=6)
    key = lambda d: {tuple(c) for c in d.scenes.centre[:, 0].tolist()}  # noqa: E731
    assert not key(train) & key(test) and key(train) | key(test) == key(full)
    again = load_scenes(split="test", **kw)
    assert torch.equal(again.images, test.images)
    assert set(test.labels.tolist()) == set(range(12))
    other = load_scenes(split="test", resolution=16, n=300, seed=2, test_fraction=0.5)
    assert len(other) == pytest.approx(150, abs=6)


def test_registry_and_captioned_variant():
    data = load_data("scenes", DataRequest(resolution=64, split="test"))
    assert isinstance(data, SceneData) and data.images.shape[1:] == (3, 64, 64)
    assert len(data) == pytest.approx(1500, abs=6)  # a fifth of 7500, rounded per class
    assert data.num_classes == 12 and not isinstance(data, CaptionedImageData)
    cap = load_data("Scenes:Captions", DataRequest(resolution=16, split="test"))
    assert isinstance(cap, CaptionedImageData) and len(cap) == len(data)
    assert cap.captions == data.texts  # the same scenes, whatever the resolution
    assert torch.equal(cap.attributes[:, 0] * 4 + cap.attributes[:, 1], data.labels)
    assert dataset_folder("scenes") is None and dataset_folder("scenes:captions") is None
    assert dataset_slug("scenes") == "scenes" and dataset_slug("scenes:captions") == \
        "scenes-captions"
    with pytest.raises(DataError, match="resolution 64"):
        load_data("scenes", DataRequest(resolution=8))
    with pytest.raises(DataError, match="RGB"):
        load_data("scenes", DataRequest(resolution=16, channels=1))
    with pytest.raises(DataError, match="n >= 2"):
        load_scenes(16, n=1)


def test_feature_net_stem_and_builtin_config():
    assert [feature_stem(r) for r in (8, 16, 24, 32, 64, 128)] == [0, 0, 1, 1, 2, 3]
    net = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=12, width=8, stem=2))
    f, logits = net(torch.zeros(2, 3, 64, 64))
    assert f.shape == (2, 64) and logits.shape == (2, 12)
    old = FeatureNet(FeatureNetConfig(in_channels=3))  # no stem: the earlier architecture
    assert len(old.convs) == 7 and len(net.convs) == 11
    assert old.features[1].in_features == 64 * 16 and net.features[1].in_features == 16 * 16
    pooled = FeatureNet(FeatureNetConfig(in_channels=3, width=8, stem=2, pool="max"))
    assert pooled.features[1].in_features == 16  # one value per channel
    with pytest.raises(ValueError, match="pool"):
        FeatureNet(FeatureNetConfig(pool="mean"))
    train = load_scenes(16, "test", n=40)
    assert builtin_config(train, 16) == FeatureNetConfig(
        in_channels=3, num_classes=12, class_names=CLASS_NAMES)  # 16 px: as before
    big = builtin_config(train, 64)
    assert (big.stem, big.width, big.pool) == (2, 16, "max")
    assert feature_dataset("scenes:captions") == "scenes" and feature_dataset("digits") == "digits"


def test_scenes_accuracy_counts_agreement():
    data = load_scenes(16, "test", n=200)
    torch.manual_seed(0)  # any network will do: the accuracy is agreement with its reading
    model = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=12, width=8, feature_dim=16))
    pred = model(data.images)[1].argmax(1)
    assert scenes_accuracy(data.images, pred, model) == 1.0
    assert scenes_accuracy(data.images, (pred + 1) % 12, model) == 0.0
    assert scenes_accuracy(data.images, data.labels, model) == pytest.approx(
        feature_net_accuracy(model, data))
    captions = [scene_caption(int(p), 1, 0) for p in pred]
    assert torch.equal(scene_classes(captions), pred)
    assert scenes_accuracy(data.images, captions, model) == 1.0
    with pytest.raises(ValueError, match="conditions"):
        scenes_accuracy(data.images[:3], pred, model)
    with pytest.raises(ValueError, match="0..11"):
        scenes_accuracy(data.images[:1], [12], model)


def test_train_cli_smoke(tmp_path, capsys):
    args = ["train", "--dataset", "scenes", "--resolution", "16", "--steps", "2",
            "--out-dir", str(tmp_path / "run"), "--no-progress", "--base-channels", "16",
            "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions",
            "--batch-size", "8", "--sample-every", "0", "--sample-steps", "2", "--log-every", "1",
            "--device", "cpu"]
    assert main(args) == 0
    assert (tmp_path / "run" / "config.json").is_file()
    assert main(["train", "--dataset", "scenes", "--resolution", "8", "--steps", "2",
                 "--out-dir", str(tmp_path / "bad")]) == 2  # too small to draw a scene
    err = capsys.readouterr().err
    assert "resolution" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_builtin_feature_net_reads_scenes_at_64px(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE_DIR", str(tmp_path))
    model, name = builtin_feature_net("scenes:captions", 64, 3, log=lambda _: None)
    assert name.startswith("builtin:scenes (64px, 3ch")
    test = load_scenes(64, "test")
    assert scenes_accuracy(test.images, test.labels, model) > 0.9
