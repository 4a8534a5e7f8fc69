"""Training on one's own image folder on the first try: the defaults that cannot be constants
follow from the data (resolution, attention sizes, run folder, warm-up of a short run), the
options print as one line after the run is validated, an error is one line before anything
else, and booleans are ``--flag`` / ``--no-flag``."""

import json
import math

import pytest
from conftest import image_folder
from torch import nn

from difflab.cli.main import build_parser, main
from difflab.cli.options import given_options
from difflab.config import to_dict
from difflab.data.registry import dataset_folder, dataset_slug, folder_resolution
from difflab.networks import UNetConfig
from difflab.recipes import TrainConfig
from difflab.recipes.config import OptimConfig, default_attention, resolve_values
from difflab.recipes.images import MODEL_SIZES
from difflab.training import EMA


def saved_config(run):
    return json.loads((run / "config.json").read_text())["config"]


@pytest.mark.parametrize("size, attention", [(32, [16]), (64, [32])])
def test_an_image_folder_trains_with_only_the_dataset_option(tmp_path, monkeypatch, capsys,
                                                             size, attention):
    """The README's first real step: no --resolution, --out-dir or --attention-resolutions."""
    folder = image_folder(tmp_path / "photos" / f"mine{size}", size)
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--dataset", str(folder), "--steps", "2", "--batch-size", "4",
               "--sample-every", "0", "--sample-steps", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    run = tmp_path / "runs" / f"mine{size}"
    c = saved_config(run)
    assert c["data"]["resolution"] == size
    assert c["network"]["unet"]["attention_resolutions"] == attention
    assert c["run"]["out_dir"] == f"runs/mine{size}"
    assert c["optim"]["warmup_steps"] == 0  # 2 steps // 5
    assert f"note: resolution {size}: the most common image size" in out
    assert f"note: run folder runs/mine{size} (named after the dataset" in out
    assert "note: warm-up 0 steps: the default 200" in out
    config_lines = [line for line in out.splitlines() if line.startswith("config:")]
    assert len(config_lines) == 1 and "{" not in out  # one line, no JSON dump
    assert f"--resolution {size}" in config_lines[0]
    assert f"--attention-resolutions {attention[0]}" in config_lines[0]
    assert (run / "checkpoints" / "step_00000002.safetensors").is_file()


def test_folder_resolution_is_the_most_common_size_rounded_down_to_8(tmp_path):
    folder = image_folder(tmp_path / "f", 37, odd=(90, 60))
    resolution, note = folder_resolution(folder)
    assert resolution == 32 and "37 px (6 of 7 images read)" in note
    assert resolve_values({"data": {"dataset": str(folder)}})["data"]["resolution"] == 32
    given = resolve_values({"data": {"dataset": str(folder), "resolution": 16}})
    assert given["data"]["resolution"] == 16  # a given resolution is kept
    small = image_folder(tmp_path / "g", 5, odd=(5, 5))
    assert folder_resolution(small)[0] == 8  # never below 8


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("resolution", [8, 16, 24, 32, 48, 64, 128, 256])
def test_default_attention_is_always_a_feature_map_size(size, resolution):
    mult = MODEL_SIZES[size]["channel_mult"]
    if resolution % 2 ** (len(mult) - 1):
        pytest.skip("the resolution does not fit the U-Net's levels")
    att = default_attention(resolution, mult)
    sizes = [resolution // 2**i for i in range(len(mult))]
    assert len(att) == 1 and att[0] in sizes
    assert att[0] <= 16 or att[0] == min(sizes)  # attention cost bounded where possible
    UNetConfig(image_size=resolution, attention_resolutions=tuple(att),
               **MODEL_SIZES[size])  # the U-Net accepts it


def test_default_attention_examples():
    assert default_attention(8, [1, 2]) == [4]          # the digits default, as before
    assert default_attention(32, [1, 2]) == [16]        # the README's folder example
    assert default_attention(32, [1, 2, 2, 2]) == [16]  # DDPM's CIFAR-10 choice
    assert default_attention(16, [1, 2]) == [8]         # shapes at 16 px
    assert default_attention(64, [1, 2]) == [32]        # no level <= 16: the smallest
    given = {"data": {"resolution": 32}, "network": {"unet": {"attention_resolutions": []}}}
    assert resolve_values(given)["network"]["unet"]["attention_resolutions"] == []


def test_the_default_digits_run_is_unchanged():
    """No options: the digits run of before (run folder, attention, warm-up, everything)."""
    notes: list[str] = []
    config = TrainConfig.from_values({}, notes=notes)
    assert to_dict(config) == to_dict(TrainConfig())
    assert config.run.out_dir == "runs/digits" and config.optim.warmup_steps == 200
    assert config.network.unet.attention_resolutions == (4,)
    assert notes == ["run folder runs/digits (named after the dataset; give --out-dir to "
                     "choose)"]


@pytest.mark.parametrize("dataset, slug", [
    ("digits", "digits"), ("Shapes", "shapes"), ("toy:moons", "toy-moons"),
    ("data/mine/", "mine"), ("folder:data/holiday", "holiday")])
def test_the_run_folder_is_named_after_the_dataset(dataset, slug):
    assert dataset_slug(dataset) == slug
    values = resolve_values({"data": {"dataset": dataset}})
    assert values["run"]["out_dir"] == f"runs/{slug}"
    given = resolve_values({"data": {"dataset": dataset}, "run": {"out_dir": "x"}})
    assert given["run"]["out_dir"] == "x"


def test_dataset_folder_tells_folders_from_built_ins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    (tmp_path / "mine").mkdir()
    assert dataset_folder("digits") is None  # a built-in wins over a folder of its name
    assert dataset_folder("folder:digits").resolve() == (tmp_path / "digits").resolve()
    assert dataset_folder("mine") is not None and dataset_folder("toy:moons") is None
    assert dataset_folder("missing") is None


@pytest.mark.parametrize("steps, given, expect, note", [
    (1500, None, 200, None),          # the digits default: untouched
    (1000, None, 200, None),          # exactly a fifth
    (100, None, 20, "warm-up 20 steps: the default 200 is over a fifth of the 100 steps"),
    (100, 50, 50, None),              # given and shorter than the run: kept, no word
    (100, 300, 300, "warning: --warmup-steps 300 >= --steps 100"),
])
def test_the_warmup_of_a_short_run(steps, given, expect, note):
    values = {"optim": {"steps": steps} | ({"warmup_steps": given} if given else {}),
              "run": {"out_dir": "x"}}
    notes: list[str] = []
    assert TrainConfig.from_values(values, notes=notes).optim.warmup_steps == expect
    assert notes == ([] if note is None else [notes[0]])
    if note:
        assert notes[0].startswith(note)


def parse_train(*argv):
    args = build_parser().parse_args(["train", *argv])
    return given_options(args, TrainConfig)


def test_booleans_are_flag_and_no_flag():
    given = parse_train("--compile", "--no-channels-last", "--no-class-conditional")
    assert given["speed"] == {"compile": True, "channels_last": False}
    assert given["data"] == {"class_conditional": False}
    assert parse_train("--channels-last", "false")["speed"] == {"channels_last": False}
    assert parse_train("--compile=yes")["speed"] == {"compile": True}
    assert parse_train() == {}


def test_no_flag_takes_no_value_and_help_shows_both_forms(capsys):
    with pytest.raises(SystemExit) as e:
        parse_train("--no-compile", "true")
    assert e.value.code == 2 and "--compile/--no-compile: takes no value" in \
        capsys.readouterr().err.replace(", ", "/")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--compile, --no-compile" in text and "[--compile | --no-compile]" in text
    assert "[COMPILE]" not in text


def test_a_missing_folder_is_one_line_before_any_config(tmp_path, capsys):
    rc = main(["train", "--dataset", str(tmp_path / "nope"), "--steps", "1"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert f"the folder {tmp_path / 'nope'} does not exist" in lines[0]
    assert "folder:" not in lines[0]  # no form the README does not mention


def test_a_bad_option_is_refused_before_any_config(tmp_path, capsys):
    rc = main(["train", "--attention-resolutions", "5", "--out-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "attention_resolutions [5] match no feature-map size" in captured.err


@pytest.mark.parametrize("steps", [5, 20, 100, 1500, 20000])
def test_the_ema_of_a_short_run_needs_no_cap(steps):
    """docs/training.md: the EMA's warm-up keeps its half-life under about a tenth of the
    steps done, so the default --ema-decay is not scaled for short runs."""
    ema = EMA(nn.Linear(1, 1), OptimConfig().ema_decay)
    ema.updates = steps - 1  # the decay of the last update of the run
    half_life = math.log(0.5) / math.log(ema.current_decay())
    assert half_life <= 0.08 * (10 + steps)
    assert half_life <= max(steps / 10, 1)
