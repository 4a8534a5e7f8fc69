"""Issue 15, the loading and sampling side: a corrupt or mismatched checkpoint, a bad option and
an existing output file each end in one line naming the file or option (exit status 2, no
traceback), and nothing already written is replaced.

The checkpoints are real ones written by the trainer (two tiny U-Nets of different widths),
then cut, overwritten with garbage, swapped between the two architectures, or given a cut JSON.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.cli.main import main
from difflab.editing import check_mask, inpaint
from difflab.io import LoadError, load_state, read_json, read_safetensors
from difflab.pipeline import Pipeline
from difflab.recipes.config import TrainConfig
from difflab.recipes.diffusion import DiffusionRecipe
from difflab.samplers import time_grid
from difflab.samplers.generate import generate
from difflab.training.checkpoint import load_checkpoint

LAST = "step_00000002"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Run folders "a" (8 base channels) and "b" (16), two checkpoints each, and an 8x8
    image with a matching black/white mask."""
    root = tmp_path_factory.mktemp("runs")
    for name, width in (("a", 8), ("b", 16)):
        cfg = TrainConfig.from_values(dict(
            out_dir=str(root / name), steps=2, batch_size=4, resolution=8,
            base_channels=width, channel_mult=[1], num_res_blocks=1, attention_resolutions=[],
            sample_every=0, checkpoint_every=1, device="cpu"))
        DiffusionRecipe(cfg).run(progress=False)
    Image.new("L", (8, 8), 40).save(root / "in.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (4, 0, 8, 8))
    mask.save(root / "mask.png")
    return root


def copy_run(runs, tmp_path, name="a") -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def fails(capsys, argv, *named) -> str:
    """Run the CLI in-process: exit status 2, one line on stderr naming each of ``named``,
    no traceback (an exception the CLI does not map would escape and fail the test)."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in named:
        assert str(n) in err, (n, err)
    return err


def sample(ckpt, out, *extra):
    return ["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--out", out,
            "--device", "cpu", "--no-progress", *extra]


def resume(run):
    return ["train", "--out-dir", run, "--resume", "--steps", "3", "--device", "cpu",
            "--no-progress"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# -- item 3: corrupt or mismatched checkpoints ---------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_cut_or_garbage_safetensors_names_the_file(runs, tmp_path, capsys, damage):
    run = copy_run(runs, tmp_path)
    file = run / "checkpoints" / f"{LAST}.safetensors"
    if damage == "truncate":
        truncate(file)
    elif damage == "garbage":
        file.write_bytes(torch.Generator().manual_seed(0).get_state().numpy().tobytes() * 9)
    else:
        file.write_bytes(b"")
    for argv in (sample(run, tmp_path / "s.png"), resume(run)):
        err = fails(capsys, argv, file)
        assert "cut short or corrupt" in err
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(LoadError, match=LAST):
        load_checkpoint(run)


def test_another_architectures_tensors_are_one_line_with_the_first_mismatch(runs, tmp_path,
                                                                          capsys):
    run = copy_run(runs, tmp_path)
    file = run / "checkpoints" / f"{LAST}.safetensors"
    shutil.copy(runs / "b" / "checkpoints" / f"{LAST}.safetensors", file)
    for argv in (sample(run, tmp_path / "s.png"), resume(run)):
        err = fails(capsys, argv, file, "does not match")
        # the widths differ (8 vs 16 base channels): shapes named, file's first
        assert "tensors of other shapes, first" in err and "in the file vs" in err


def test_load_state_reports_missing_unexpected_and_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {k: v.clone() for k, v in net.state_dict().items()}
    load_state(net, good, "f.safetensors")  # a fitting state loads
    bad = dict(good)
    bad["0.weight"] = torch.zeros(4, 2)
    del bad["1.bias"]
    bad["extra"] = torch.zeros(1)
    with pytest.raises(LoadError) as e:
        load_state(net, bad, "f.safetensors")
    msg = str(e.value)
    assert msg.startswith("f.safetensors does not match")
    assert "1 tensor of other shapes, first '0.weight' [4, 2] in the file vs [3, 2]" in msg
    assert "1 tensor missing, first '1.bias'" in msg and "1 unexpected tensor, first 'extra'" \
        in msg
    assert torch.equal(net.state_dict()["0.weight"], good["0.weight"])  # nothing half-loaded


def test_a_cut_checkpoint_json_names_the_file(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    file = run / "checkpoints" / f"{LAST}.json"
    truncate(file)
    for argv in (sample(run, tmp_path / "s.png"), resume(run)):
        fails(capsys, argv, file, "not valid JSON")
    file.write_text("[1, 2]")  # valid JSON, not a checkpoint
    for argv in (sample(run, tmp_path / "s.png"), resume(run)):
        fails(capsys, argv, file, "not a difflab checkpoint")
    file.write_text('{"step": 2}')  # a checkpoint's JSON without what the commands need
    fails(capsys, sample(run, tmp_path / "s.png"), file, "lacks 'network'")
    fails(capsys, resume(run), file, "holds no run config")


def test_a_pipeline_folder_with_cut_card_or_foreign_weights(runs, tmp_path, capsys):
    folder = Pipeline.from_pretrained(runs / "a").save_pretrained(tmp_path / "pipe")
    other = Pipeline.from_pretrained(runs / "b").save_pretrained(tmp_path / "other")
    weights = folder / "diffusion.safetensors"
    shutil.copy(other / "diffusion.safetensors", weights)
    fails(capsys, sample(folder, tmp_path / "s.png"), weights, "does not match")
    truncate(weights)
    fails(capsys, sample(folder, tmp_path / "s.png"), weights, "cut short or corrupt")
    card = folder / "model_card.json"
    truncate(card)
    fails(capsys, sample(folder, tmp_path / "s.png"), card, "not valid JSON")


def test_a_corrupt_classifier_checkpoint_names_the_file(runs, tmp_path, capsys):
    clf = copy_run(runs, tmp_path, "b")
    file = clf / "checkpoints" / f"{LAST}.safetensors"
    truncate(file, 0.1)
    fails(capsys, sample(runs / "a", tmp_path / "s.png", "--classifier", clf), file)


def test_a_cut_time_grid_names_the_file(runs, tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text('{"times": [999.0, 500.0, 0')
    fails(capsys, sample(runs / "a", tmp_path / "s.png", "--grid", grid), grid, "JSON")
    grid.write_text('{"times": [0.0, 500.0]}')
    fails(capsys, sample(runs / "a", tmp_path / "s.png", "--grid", grid), grid, "time grid")


def test_read_helpers_keep_file_not_found_and_name_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError):
        read_safetensors(tmp_path / "none.safetensors")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LoadError, match="bin.json"):
        read_json(tmp_path / "bin.json")


def test_a_real_process_prints_one_line_and_exits_2(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    file = run / "checkpoints" / f"{LAST}.safetensors"
    truncate(file)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "difflab", *map(str, sample(
        run, tmp_path / "s.png"))], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"difflab sample: error: {file} is not a readable safetensors file (cut short or "
        "corrupt?): Error while deserializing header: incomplete metadata, file not fully "
        "covered"]


# -- item 6: options out of range ----------------------------------------------------------------
@pytest.mark.parametrize("extra, named", [
    (["--n", "0"], "--n"), (["--n", "-3"], "--n"), (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"), (["--steps", "0"], "--steps"),
    (["--steps", "-2"], "--steps")])
def test_sample_refuses_counts_below_one(runs, tmp_path, capsys, extra, named):
    out = tmp_path / "s.png"
    argv = sample(runs / "a", out)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    fails(capsys, argv, named)
    assert not out.exists()


def test_pipeline_and_generate_refuse_counts_below_one(runs):
    pipe = Pipeline.from_pretrained(runs / "a")
    for kwargs, name in (({"n": 0}, "--n"), ({"n": 2, "batch_size": 0}, "--batch-size"),
                         ({"n": 2, "steps": -1}, "--steps")):
        with pytest.raises(ValueError, match=name):
            pipe(**kwargs)
    den = pipe.denoiser()
    with pytest.raises(ValueError, match="--batch-size"):
        generate(den, None, pipe.sample_shape, [0, 1], steps=2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="--n"):
        generate(den, None, pipe.sample_shape, [], steps=2, progress=False)


@pytest.mark.parametrize("kind, extra, named", [
    ("vary", ["--n", "0"], "--n"), ("vary", ["--n", "-1"], "--n"),
    ("interpolate", ["--n", "1", "--input2", "IN"], "--n"),
    ("sdedit", ["--steps", "0"], "--steps"),
    ("inpaint", ["--mask", "MASK", "--jump-n-sample", "0"], "--jump-n-sample")])
def test_edit_refuses_bad_counts(runs, tmp_path, capsys, kind, extra, named):
    sub = {"IN": str(runs / "in.png"), "MASK": str(runs / "mask.png")}
    argv = ["edit", kind, "--checkpoint", runs / "a", "--input", runs / "in.png", "--steps",
            "2", "--out", tmp_path / "e.png", "--device", "cpu"]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, sub.get(value, value)]
    fails(capsys, argv, named)
    assert not (tmp_path / "e.png").exists()


@pytest.mark.parametrize("make, words", [
    (lambda p: Image.new("L", (16, 16), 255).save(p), "16x16 pixels but the image"),
    (lambda p: Image.new("L", (8, 8), 128).save(p), "64 grey or coloured pixels")])
def test_inpaint_refuses_a_mask_of_another_size_or_with_grey(runs, tmp_path, capsys, make,
                                                             words):
    mask = tmp_path / "m.png"
    make(mask)
    fails(capsys, ["edit", "inpaint", "--checkpoint", runs / "a", "--input", runs / "in.png",
                   "--mask", mask, "--steps", "2", "--out", tmp_path / "e.png", "--device",
                   "cpu"], mask, words)
    assert not (tmp_path / "e.png").exists()


def test_inpaint_library_refuses_grey_or_misshapen_masks(runs):
    x = torch.zeros(1, 1, 8, 8)
    assert check_mask(torch.ones(1, 1, 8, 8), x).all()
    with pytest.raises(ValueError, match="only 0 .keep. and 1"):
        check_mask(torch.full((1, 1, 8, 8), 0.5), x)
    with pytest.raises(ValueError, match="does not fit"):
        check_mask(torch.ones(1, 1, 4, 4), x)
    den = Pipeline.from_pretrained(runs / "a").denoiser()
    with pytest.raises(ValueError, match="only 0"):
        inpaint(den, x, torch.full((1, 1, 8, 8), 0.7), time_grid(den.process, 2))


@pytest.mark.parametrize("extra, named", [
    (["--validation", "0"], "--validation"), (["--tol", "0"], "--tol"),
    (["--pool", "8", "--hard", "8"], "--hard"), (["--steps", "1"], "--steps")])
def test_fit_grid_refuses_bad_values(runs, tmp_path, capsys, extra, named):
    out = tmp_path / "g.json"
    fails(capsys, ["fit-grid", "--checkpoint", runs / "a", "--steps", "3", "--pool", "8",
                   "--hard", "2", "--easy", "2", "--validation", "2", "--evals", "1",
                   "--out", out, "--device", "cpu", *extra], named)
    assert not out.exists()


# -- item 7: existing outputs --------------------------------------------------------------------
def test_sample_refuses_to_replace_an_output_without_overwrite(runs, tmp_path, capsys):
    out, npz = tmp_path / "s.png", tmp_path / "s.npz"
    out.write_bytes(b"keep me")
    fails(capsys, sample(runs / "a", out), "--out", out, "--overwrite")
    assert out.read_bytes() == b"keep me"
    npz.write_bytes(b"keep me too")
    fails(capsys, sample(runs / "a", tmp_path / "new.png", "--save-npz", npz), "--save-npz",
          npz)
    assert npz.read_bytes() == b"keep me too" and not (tmp_path / "new.png").exists()
    assert main([str(a) for a in sample(runs / "a", out, "--save-npz", npz,
                                        "--overwrite")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and npz.read_bytes()[:2] == b"PK"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes


@pytest.mark.parametrize("argv, flag", [
    (["edit", "sdedit", "--checkpoint", "RUN", "--input", "IN", "--out", "OUT"], "--out"),
    (["edit", "invert", "--checkpoint", "RUN", "--input", "IN", "--out", "NEW",
      "--save-npz", "OUT"], "--save-npz"),
    (["eval", "--samples", "digits", "--features", "classifier:none", "--out", "OUT"],
     "--out"),
    (["eval", "--samples", "digits", "--features", "classifier:none", "--save-reference",
      "OUT"], "--save-reference"),
    (["nll", "--checkpoint", "RUN", "--out", "OUT"], "--out"),
    (["fit-grid", "--checkpoint", "RUN", "--out", "OUT"], "--out")])
def test_every_command_refuses_to_replace_an_output(runs, tmp_path, capsys, argv, flag):
    out = tmp_path / "existing.out"
    out.write_bytes(b"keep me")
    sub = {"RUN": runs / "a", "IN": runs / "in.png", "OUT": out, "NEW": tmp_path / "new.png"}
    fails(capsys, [sub.get(a, a) for a in argv], flag, out, "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert not (tmp_path / "new.png").exists()


def test_fit_grid_default_output_is_checked_too(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    existing = run / "grids" / "plms_3.json"
    existing.parent.mkdir()
    existing.write_text("keep")
    fails(capsys, ["fit-grid", "--checkpoint", run, "--steps", "3", "--device", "cpu"],
          existing)
    assert existing.read_text() == "keep"


def test_resume_from_a_checkpoint_without_its_training_state_names_it(runs, tmp_path, capsys):
    from safetensors.torch import save_file

    run = copy_run(runs, tmp_path)
    file = run / "checkpoints" / f"{LAST}.safetensors"
    tensors = read_safetensors(file)
    del tensors["rng.generator"]  # e.g. weights exported on their own
    save_file(tensors, str(file))
    fails(capsys, resume(run), f"{LAST}.json", "not a complete training checkpoint",
          "rng.generator")
