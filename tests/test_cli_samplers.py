"""`difflab sample` reaches every registered sampler and forwards its options."""

import json

import numpy as np
import pytest
import torch

from difflab.cli.main import main
from difflab.pipeline import Pipeline
from difflab.samplers import SAMPLERS
from difflab.samplers.base import steep_noisy_end


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    assert main(["train", "--dataset", "toy:moons", "--toy-points", "256", "--steps", "2",
                 "--batch-size", "32", "--base-channels", "16", "--sample-steps", "2",
                 "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("sampler,extra", [("unipc_bh2", ["--order", "3"]),
                                           ("heun", ["--churn", "2", "--spacing", "karras"]),
                                           ("dpm_solver", ["--order", "2", "--spacing", "logsnr"])])
def test_cli_samples_with_new_samplers(toy_run, tmp_path, sampler, extra):
    assert sampler in SAMPLERS
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(toy_run), "--n", "8", "--steps", "4",
                 "--sampler", sampler, *extra, "--out", str(tmp_path / "s.png"),
                 "--save-npz", str(npz), "--no-progress"]) == 0
    images = np.load(npz)["images"]
    assert images.shape == (8, 2) and np.isfinite(images).all()


def test_cli_rejects_unknown_sampler(toy_run, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(toy_run), "--sampler", "nope"])


def test_time_grid_saves_loads_and_drives_sample(toy_run, tmp_path):
    """A grid stored as JSON (``save_time_grid``, or a plain list) comes back exactly, and
    ``difflab sample --grid`` with it gives the same images as the equivalent --steps/--spacing.
    """
    import json

    import torch

    from difflab.pipeline import Pipeline
    from difflab.samplers import load_time_grid, save_time_grid, time_grid

    denoiser = Pipeline.from_pretrained(toy_run).denoiser()
    ts = time_grid(denoiser.process, 4, "trailing")
    path = save_time_grid(ts, tmp_path / "grid.json", sampler="dpmpp_2m", fitted_on=0)
    assert torch.equal(load_time_grid(path), ts)
    assert json.loads(path.read_text())["sampler"] == "dpmpp_2m"
    (tmp_path / "list.json").write_text(json.dumps(ts.tolist()))
    assert torch.equal(load_time_grid(tmp_path / "list.json"), ts)
    (tmp_path / "bad.json").write_text("[0.0, 500.0]")
    with pytest.raises(ValueError):
        load_time_grid(tmp_path / "bad.json")
    runs = {}
    for name, extra in [("grid", ["--grid", str(path)]),
                        ("steps", ["--steps", "4", "--spacing", "trailing"])]:
        npz = tmp_path / f"{name}.npz"
        assert main(["sample", "--checkpoint", str(toy_run), "--n", "8", "--sampler",
                     "dpmpp_2m", *extra, "--out", str(tmp_path / f"{name}.png"),
                     "--save-npz", str(npz), "--no-progress"]) == 0
        runs[name] = np.load(npz)["images"]
    np.testing.assert_array_equal(runs["grid"], runs["steps"])


def test_fit_grid_writes_a_grid_no_worse_than_the_default(toy_run, tmp_path, capsys):
    """``difflab fit-grid`` keeps the default grid unless it finds a better one on its own
    training draws, and ``difflab sample --grid`` runs with what it wrote."""
    out = tmp_path / "grid.json"
    assert main(["fit-grid", "--checkpoint", str(toy_run), "--sampler", "dpmpp_2m",
                 "--steps", "4", "--pool", "48", "--hard", "6", "--easy", "6",
                 "--validation", "8", "--evals", "20", "--tol", "1e-3", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split("|") for line in printed.splitlines()
            if line.startswith(("| default", "| fitted"))]
    (_, _, default_train, _, _), (_, _, fitted_train, _, _) = rows
    assert float(fitted_train) <= float(default_train)
    saved = json.loads(out.read_text())
    assert saved["sampler"] == "dpmpp_2m" and len(saved["times"]) == 5
    assert saved["nfe"] == 4  # dpmpp_2m: one evaluation per step
    png = out.with_suffix(".png")  # error against NFE, beside the JSON
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert f"wrote {png} (error against NFE, 1 grid(s)" in printed
    assert main(["sample", "--checkpoint", str(toy_run), "--sampler", "dpmpp_2m", "--grid",
                 str(out), "--n", "4", "--out", str(tmp_path / "s.png"),
                 "--no-progress"]) == 0
    assert main(["fit-grid", "--checkpoint", str(toy_run), "--class", "1"]) == 2


def test_fit_grid_plots_every_step_count_fitted_in_its_folder(toy_run, tmp_path, capsys):
    """Grids fitted for several --steps into one folder make the error-versus-NFE curves;
    a grid of another sampler stays off them; the PNG is an output like the JSON."""
    from difflab.cli.fit_grid import error_curves

    tiny = ["--pool", "8", "--hard", "2", "--easy", "2", "--validation", "4", "--evals", "4",
            "--tol", "1e-3", "--device", "cpu", "--no-progress"]
    for sampler, steps in [("ddim", 2), ("ddim", 3), ("heun", 2)]:
        assert main(["fit-grid", "--checkpoint", str(toy_run), "--sampler", sampler,
                     "--steps", str(steps), "--out", str(tmp_path / f"{sampler}_{steps}.json"),
                     *tiny]) == 0
    curves = error_curves(tmp_path / "ddim_3.json")
    assert curves["default grid"][0] == curves["fitted grid"][0] == [2.0, 3.0]  # NFE
    saved = [json.loads((tmp_path / f"ddim_{k}.json").read_text()) for k in (2, 3)]
    assert curves["fitted grid"][1] == [g["validation_rms"] for g in saved]
    assert curves["default grid"][1] == [g["default_validation_rms"] for g in saved]
    # heun: 2 evaluations a step but 1 on the last, and 1 on a steep noisiest interval
    # (samplers.base.steep_noisy_end: there it takes the DDIM step alone)
    heun = json.loads((tmp_path / "heun_2.json").read_text())
    steep = steep_noisy_end(Pipeline.from_pretrained(toy_run).process,
                            torch.tensor(heun["times"], dtype=torch.float64))
    assert error_curves(tmp_path / "heun_2.json")["fitted grid"][0] == [2.0 if steep else 3.0]
    (tmp_path / "ddim_2.json").unlink()  # the PNG alone is still refused, before any work
    capsys.readouterr()
    assert main(["fit-grid", "--checkpoint", str(toy_run), "--sampler", "ddim", "--steps",
                 "2", "--out", str(tmp_path / "ddim_2.json"), *tiny]) == 2
    assert "--plot" in capsys.readouterr().err


def test_an_option_the_sampler_does_not_take_exits_2_naming_its_options(toy_run, tmp_path,
                                                                         capsys):
    """``--sampler heun --eta 0.5`` is refused (once silently dropped), in one line that
    names heun's options; the same for --sampler-opt, a bad value and a duplicate."""
    base = ["sample", "--checkpoint", str(toy_run), "--n", "2", "--steps", "2",
            "--out", str(tmp_path / "s.png"), "--no-progress"]
    for extra, words in [(["--sampler", "heun", "--eta", "0.5"], ["'heun'", "'eta'", "churn"]),
                         (["--sampler", "ddim", "--sampler-opt", "order=3"], ["'ddim'", "eta"]),
                         (["--sampler", "heun", "--sampler-opt", "churn=lots"], ["churn"]),
                         (["--sampler", "ddim", "--eta", "1", "--sampler-opt", "eta=0"],
                          ["twice"])]:
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert all(w in err for w in words), err
    assert not (tmp_path / "s.png").exists()


def test_sampler_opt_and_its_shortcut_give_the_same_samples(toy_run, tmp_path):
    runs = {}
    for name, extra in [("flag", ["--order", "2"]), ("opt", ["--sampler-opt", "order=2"]),
                        ("default", [])]:
        npz = tmp_path / f"{name}.npz"
        assert main(["sample", "--checkpoint", str(toy_run), "--n", "4", "--steps", "5",
                     "--sampler", "dpm_solver", *extra, "--out", str(tmp_path / f"{name}.png"),
                     "--save-npz", str(npz), "--no-progress"]) == 0
        runs[name] = np.load(npz)["images"]
    np.testing.assert_array_equal(runs["flag"], runs["opt"])
    assert not np.array_equal(runs["flag"], runs["default"])  # the option reached the sampler
