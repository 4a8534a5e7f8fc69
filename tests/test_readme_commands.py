"""The README's commands run as printed (issue 16), in tiny form, so a stale example fails CI.

Every line of the README's fenced ``bash`` blocks is read (continuation lines joined, comments
dropped). A ``difflab ...`` line is run in-process, in README order, in one temporary folder,
after the options of ``TINY`` have set its sizes; any other line must be in ``SKIP`` with the
reason it cannot run here. A line that is neither fails the test, so a new README command must
be handled here.

What the README presumes a user has is made first (``prepare``): the quick start's
``runs/digits``, a prompt-conditioned ``runs/shapes``, the images ``three.png``,
``right_half.png`` (an inpainting mask) and ``mask.png`` (a control mask), and an image folder
at ``path/to/images``. Prompts are encoded by the stand-in encoder of test_pipeline.py (the
real one, the text extra, is tested in test_text.py): what is checked here is the command
lines.
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_folder
from test_pipeline import FakeEncoder

from difflab.cli.main import main
from difflab.data import load_digits, save_grid

README = Path(__file__).resolve().parents[1] / "README.md"

#: tiny sizes, per command: each value replaces the README's or is appended when absent. Only
#: options that set a size (steps, counts, widths) are here, never one a command needs to work
#: (fit-grid's --steps names the grid file the next command reads, so it is kept; its
#: --validation is 4 draws: on 1 the held-out check refused the fitted grid; its --starts
#: default skips the three-piece search, 225 sampler runs at 8 steps). A value
#: ``(value,)`` only replaces a README value (sample's --n: 20 samples of --class all for eval).
TINY: dict[str, dict[str, str | tuple[str]]] = {
    "train": {"--steps": "2", "--batch-size": "4", "--model-size": "tiny",
              "--sample-every": "0", "--sample-steps": "2", "--resolution": ("16",)},
    "train-classifier": {"--steps": "2", "--batch-size": "8", "--base-channels": "8"},
    "sample": {"--steps": "2", "--n": ("2",)},
    "edit": {"--steps": "4"},
    "eval": {"--feature-steps": "2", "--kid-subset-size": "10"},
    "nll": {"--n": "4", "--steps": "4"},
    "fit-grid": {"--pool": "2", "--hard": "1", "--easy": "1", "--validation": "4",
                 "--evals": "1", "--tol": "1e-2", "--starts": "default"},
    "plot": {},
    "distill": {"--steps": "2", "--batch-size": "4"},
    # the 64 px scenes at 16 px: encoding the data set is the cost of a latent run
    "train-autoencoder": {"--steps": "2", "--batch-size": "4", "--resolution": ("16",),
                          "--sample-every": "0"},
    "finetune": {"--steps": "2", "--batch-size": "2"},
    "train-controlnet": {"--steps": "2", "--batch-size": "4", "--sample-steps": "2"},
}
#: appended to every difflab command that has them: the CPU (same on any machine), no bars
QUIET = ["--device", "cpu", "--no-progress"]
NO_QUIET = {"eval": ["--device", "cpu"], "plot": []}

#: README lines the test cannot run: (first words, why)
SKIP: list[tuple[str, str]] = [
    ("bash scripts/quickstart.sh", "installs into .venv; its training is prepare()'s"),
    ("bash scripts/test.sh", "installs the dev extra and runs the whole suite"),
    ("bash scripts/setup.sh", "installs packages"),
    ("python3 -m venv", "makes a virtual environment"),
    (".venv/bin/pip install", "installs packages"),
    ("torchrun", "needs torchrun and several processes; DDP is tested in "
                 "tests/test_distributed.py"),
]


def readme_commands(text: str) -> list[str]:
    """The command lines of the fenced ``bash`` blocks of ``text``, in order."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def tiny(words: list[str]) -> list[str]:
    """``difflab COMMAND ...`` words -> main()'s argv with the tiny sizes and QUIET options."""
    argv = words[1:]
    command = argv[0]
    if command not in TINY:
        raise AssertionError(f"README command 'difflab {command}' has no entry in TINY")
    for option, value in TINY[command].items():
        if option in argv:
            argv[argv.index(option) + 1] = value if isinstance(value, str) else value[0]
        elif isinstance(value, str):
            argv += [option, value]
    return argv + NO_QUIET.get(command, QUIET)


def skip_reason(line: str) -> str | None:
    return next((why for start, why in SKIP if line.startswith(start)), None)


def run(argv: list[str]) -> None:
    rc = main(argv)
    assert rc == 0, f"exit status {rc}: difflab {shlex.join(argv)}"


def prepare(root: Path) -> None:
    """What the README presumes: the quick start's run, a prompt model, images, a folder."""
    run(tiny(["difflab", "train", "--out-dir", "runs/digits"]))
    run(tiny(["difflab", "train", "--dataset", "shapes", "--resolution", "16",
              "--out-dir", "runs/shapes"]))
    three = load_digits(8, split="test")
    i = int((three.labels == 3).nonzero()[0])
    save_grid(three.images[i:i + 1], root / "three.png", nrow=1, scale=1, padding=0)
    mask = torch.full((1, 1, 8, 8), -1.0)
    mask[..., 4:] = 1.0  # white right half: the part to fill in
    save_grid(mask, root / "right_half.png", nrow=1, scale=1, padding=0)
    square = torch.full((1, 1, 16, 16), -1.0)
    square[..., 4:12, 4:12] = 1.0  # where the ControlNet example's object goes
    save_grid(square, root / "mask.png", nrow=1, scale=1, padding=0)
    image_folder(root / "path" / "to" / "images", 32)


def test_readme_commands_are_all_handled():
    lines = readme_commands(README.read_text())
    assert sum(line.startswith("difflab ") for line in lines) >= 10  # the ten used most
    for line in lines:
        words = shlex.split(line)
        if words[0] == "difflab":
            tiny(words)  # fails on a command without a TINY entry
        else:
            assert skip_reason(line), f"README command neither run nor skipped: {line}"


@pytest.fixture
def fake_text_encoder(monkeypatch):
    """FakeEncoder for TextEncoder (the pipeline's encoder cache is keyed by the class, so an
    encoder made here never serves later tests as 'minilm')."""
    monkeypatch.setattr("difflab.text.TextEncoder", FakeEncoder)


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys, one_thread,
                                   fake_text_encoder):
    # the text extra is
    monkeypatch.chdir(tmp_path)  # tested in test_text.py; this checks the command lines
    monkeypatch.setenv("DIFFLAB_CACHE_DIR", str(tmp_path / "cache"))
    prepare(tmp_path)
    ran = []
    for line in readme_commands(README.read_text()):
        words = shlex.split(line)
        if words[0] != "difflab":
            continue
        run(tiny(words))
        ran.append(words[1])
    capsys.readouterr()
    assert {"train", "sample", "edit", "eval", "nll", "fit-grid", "train-classifier",
            "distill", "train-autoencoder", "finetune", "train-controlnet"} <= set(ran)
    assert (tmp_path / "runs" / "mine" / "config.json").is_file()
    assert json.loads((tmp_path / "eval.json").read_text())["fid"] >= 0
    assert (tmp_path / "runs" / "digits" / "grids" / "plms_8.json").is_file()


@pytest.mark.parametrize("size", [32, 64])
def test_an_image_folder_from_train_to_eval_with_only_the_required_options(
        tmp_path, monkeypatch, capsys, one_thread, size):
    """The acceptance of issue 16: train, sample and eval a made-up folder from the command
    line alone (no --resolution, --out-dir or --features), tiny sizes only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFLAB_CACHE_DIR", str(tmp_path / "cache"))
    image_folder(tmp_path / "mine", size)
    run(tiny(["difflab", "train", "--dataset", "mine"]))
    run(tiny(["difflab", "sample", "--checkpoint", "runs/mine", "--save-npz", "s.npz"]))
    run(tiny(["difflab", "eval", "--samples", "s.npz", "--reference", "mine", "--out",
              "e.json"]))
    out = capsys.readouterr().out
    assert re.search(r"training the built-in feature network on (folder:)?mine:train", out)
    samples = np.load(tmp_path / "s.npz")["images"]
    assert samples.shape[1:] == (size, size, 3)
    report = json.loads((tmp_path / "e.json").read_text())
    assert all(np.isfinite(report[k]) for k in ("fid", "precision", "recall"))
