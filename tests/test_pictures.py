"""Labelled grids and edit strips, `difflab plot`, and the progress bars of edit, nll and
fit-grid."""

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny_digits
from PIL import Image

from difflab.cli.main import main
from difflab.data import labelled_grid_image, save_grid, save_labelled_grid
from difflab.pipeline import PipelineOutput


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pictures")
    d = train_tiny_digits(tmp, steps=3, log_every=1)
    save_grid(d.images[:1], tmp / "a.png", padding=0)
    return tmp


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_labelled_grid_cells_match_the_raw_grid(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((6, channels, 8, 8), generator=g) * 2 - 1
    raw = np.asarray(Image.open(save_grid(x, tmp_path / "raw.png", nrow=3, scale=4)))
    img, (left, top) = labelled_grid_image(x, 3, 4, row_labels=["zero", "a long prompt " * 9],
                                           col_labels=["input", "result", "x"],
                                           caption="ddim, 50 steps, guidance 3, seeds 0-5")
    lab = np.asarray(img)
    assert left > 0 and top > 0
    # the margins hold the text; the grid itself is pasted unchanged
    assert lab.shape[0] > top + raw.shape[0] and lab.shape[1] >= left + raw.shape[1]
    np.testing.assert_array_equal(lab[top:top + raw.shape[0], left:left + raw.shape[1]], raw)
    assert (lab[:, :left] < 128).any() and (lab[:top] < 128).any()  # text was drawn
    assert (lab[top + raw.shape[0]:] < 128).any()
    # the left margin fits the longest row label, cut to 200 pixels
    assert left <= 200 + 8
    saved = np.asarray(Image.open(save_labelled_grid(
        x, tmp_path / "lab.png", 3, 4, row_labels=["zero", "a long prompt " * 9],
        col_labels=["input", "result", "x"], caption="ddim, 50 steps, guidance 3, seeds 0-5")))
    np.testing.assert_array_equal(saved, lab)


def test_labelled_grid_without_text_is_the_raw_grid(tmp_path):
    x = torch.rand((5, 1, 8, 8)) * 2 - 1
    raw = np.asarray(Image.open(save_grid(x, tmp_path / "raw.png", nrow=2, scale=2)))
    img, offset = labelled_grid_image(x, 2, 2)
    assert offset == (0, 0)
    np.testing.assert_array_equal(np.asarray(img), raw)


def test_pipeline_output_row_labels():
    x = torch.zeros(6, 1, 8, 8)
    by_class = PipelineOutput(x, seeds=list(range(6)), nrow=3,
                              labels=torch.tensor([0] * 3 + [2] * 3))
    assert by_class.row_labels(["zero", "one", "two"]) == ["zero", "two"]
    assert by_class.row_labels() == ["0", "2"]
    mixed = PipelineOutput(x, seeds=list(range(6)), nrow=3, labels=torch.arange(6))
    assert mixed.row_labels() is None
    prompts = PipelineOutput(x, seeds=list(range(6)), nrow=3, prompts=["a"] * 3 + ["b"] * 3)
    assert prompts.row_labels() == ["'a'", "'b'"]
    assert PipelineOutput(x, seeds=list(range(6)), nrow=3).row_labels() is None


def test_sample_grid_is_labelled_and_npz_unchanged(run, tmp_path):
    out, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run / "run"), "--n", "4", "--class", "all",
                 "--steps", "2", "--out", str(out), "--save-npz", str(npz), "--device", "cpu",
                 "--no-progress"]) == 0
    arrays = np.load(npz)
    images, labels = arrays["images"], arrays["labels"]
    raw = tmp_path / "raw.png"
    PipelineOutput(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1,
                   seeds=list(range(len(images))), nrow=1, labels=torch.as_tensor(labels)
                   ).save_grid(raw)
    lab, plain = np.asarray(Image.open(out)), np.asarray(Image.open(raw))
    assert lab.shape[0] > plain.shape[0] and lab.shape[1] > plain.shape[1]
    h, w = plain.shape[:2]  # one class per row: labels left, caption below, grid unchanged
    assert any((lab[:h, left:left + w] == plain).all()
               for left in range(1, lab.shape[1] - w + 1))


def test_edit_strip_has_captions(run, tmp_path):
    out = tmp_path / "e.png"
    assert main(["edit", "vary", "--checkpoint", str(run / "run"), "--input",
                 str(run / "a.png"), "--n", "2", "--steps", "2", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    img = np.asarray(Image.open(out))
    cell = 64 + 1  # 8 px upscaled 8 times, and the padding
    assert img.shape[1] >= 3 * cell and img.shape[0] > cell + 2  # three cells and text rows


def test_plot_writes_a_png_and_refuses_to_replace_it(run, capsys):
    (run / "run" / "eval").mkdir(exist_ok=True)
    (run / "run" / "eval" / "fid.json").write_text(json.dumps({"fid": 12.5, "kid": 0.01}))
    assert main(["plot", str(run / "run")]) == 0
    for name in ("loss.png", "eval.png"):
        png = run / "run" / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size[0] > 300
    capsys.readouterr()
    assert main(["plot", str(run / "run")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["plot", str(run / "run"), "--overwrite"]) == 0


@pytest.mark.parametrize("content,message", [(None, "no training log"), ("", "is empty"),
                                             ("{\"step\": 1}\nnot json\n", "line 2")])
def test_plot_errors_in_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_edit_fit_grid_and_nll_show_progress(run, tmp_path, capsys):
    ckpt = str(run / "run")
    commands = {
        "edit sdedit": ["edit", "sdedit", "--checkpoint", ckpt, "--input", str(run / "a.png"),
                        "--steps", "2", "--out", str(tmp_path / "e.png"), "--device", "cpu",
                        "--overwrite"],
        "fit-grid": ["fit-grid", "--checkpoint", ckpt, "--steps", "2", "--pool", "4",
                     "--hard", "1", "--easy", "1", "--validation", "1", "--evals", "1",
                     "--tol", "1e-2", "--out", str(tmp_path / "g.json"), "--device", "cpu",
                     "--overwrite"],
        "nll (vlb)": ["nll", "--checkpoint", ckpt, "--n", "2", "--steps", "2",
                      "--device", "cpu"],
    }
    for desc, argv in commands.items():
        assert main(argv) == 0
        assert desc in capsys.readouterr().err
        assert main([*argv, "--no-progress"]) == 0
        assert desc not in capsys.readouterr().err


def test_the_nll_bar_advances_per_term_of_the_bound(run, capsys):
    """2 images in batches of 1, --steps 2 (two KL terms) and the decoder term: 6 network
    evaluations, each one a tick of the bar, which knows its total."""
    from difflab.evaluation import vlb_evaluations

    assert vlb_evaluations(1000, 2, 1, 2) == 6 and vlb_evaluations(20, 5, 2, None) == 3 * 20
    assert main(["nll", "--checkpoint", str(run / "run"), "--n", "2", "--steps", "2",
                 "--batch-size", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "nll (vlb)" in err and "6/6" in err and "term" in err
