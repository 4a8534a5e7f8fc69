"""`difflab edit` end to end on a tiny checkpoint: every kind writes its grid; bad input errors."""

import pytest
from conftest import train_tiny_digits
from PIL import Image

from difflab.cli.main import main
from difflab.data import save_grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    d = train_tiny_digits(tmp, steps=2)
    save_grid(d.images[:1], tmp / "a.png", padding=0)
    save_grid(d.images[1:2], tmp / "b.png", padding=0)
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (4, 0, 8, 8))
    mask.save(tmp / "mask.png")
    return tmp


@pytest.mark.parametrize("kind,extra", [
    ("sdedit", ["--strength", "0.5", "--class", "3"]),
    ("vary", ["--n", "3", "--sampler", "ddpm"]),
    ("sdedit", ["--sampler", "heun", "--sampler-opt", "churn=1"]),
    ("inpaint", ["--mask", "MASK", "--jump-length", "2", "--jump-n-sample", "2"]),
    ("invert", ["--save-npz", "NPZ"]),
    ("invert", ["--inversion", "heun"]),
    ("invert", ["--inversion", "dpmpp_3m"]),
    ("interpolate", ["--input2", "B", "--n", "4"]),
])
def test_every_edit_kind_writes_a_grid(run, kind, extra, capsys):
    sub = {"MASK": str(run / "mask.png"), "NPZ": str(run / "z.npz"), "B": str(run / "b.png")}
    out = run / f"{kind}.png"
    args = ["edit", kind, "--checkpoint", str(run / "run"), "--input", str(run / "a.png"),
            "--steps", "4", "--out", str(out), "--device", "cpu", "--overwrite",
            *[sub.get(a, a) for a in extra]]
    assert main(args) == 0
    assert out.exists() and f"wrote {kind} result" in capsys.readouterr().out
    if kind == "invert":
        assert (run / "z.npz").exists() or "--inversion" in extra


def test_edit_errors(run, capsys):
    base = ["edit", "inpaint", "--checkpoint", str(run / "run"), "--device", "cpu"]
    assert main([*base, "--input", str(run / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main([*base, "--input", str(run / "a.png")]) == 2
    assert "needs --mask" in capsys.readouterr().err
    assert main([*base[:1], "sdedit", *base[2:], "--input", str(run / "a.png"),
                 "--class", "x"]) == 2
    assert "unknown --class 'x'" in capsys.readouterr().err
    for kind, extra, words in [("sdedit", ["--sampler", "heun", "--eta", "0.5"], "churn"),
                               ("invert", ["--sampler-opt", "eta=0"], "sdedit and vary")]:
        assert main([*base[:1], kind, *base[2:], "--input", str(run / "a.png"), *extra]) == 2
        assert words in capsys.readouterr().err
