"""``difflab fit-grid``'s held-out check: the fitted and the default grid are scored on
validation draws from another seed, and a fitted grid worse there is refused (exit 2, one line
with both errors, nothing written).

The command runs end to end on an exact Gaussian-mixture denoiser (a stand-in pipeline), so
its references are cheap and the errors mean something."""

import json

import pytest
import torch

import difflab.cli.fit_grid as cli
from difflab.analytic import GaussianMixture
from difflab.cli.main import main
from difflab.process import make_process
from difflab.samplers import ddim, time_grid
from difflab.samplers.optimize import (
    fit_grid,
    fit_three_piece_grid,
    optimize_grid,
    reference_solution,
)


class ExactPipeline:
    """What fit-grid reads from a pipeline, around an exact 2-d mixture denoiser."""

    is_text, class_names, sample_shape = False, [], (2,)

    def __init__(self):
        process = make_process("linear")
        mu = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.2]], dtype=torch.float64)
        self.exact = GaussianMixture(process, mu, torch.tensor([0.3, 0.1, 0.2],
                                                               dtype=torch.float64))

    def denoiser(self, guidance=None, clip=True):
        exact = self.exact

        class Float32:  # the noise draws are float32, like a network's inputs
            process = exact.process

            def __call__(self, x, t, cond=None):
                return exact(x.double(), t, cond)

        return Float32()


@pytest.fixture
def exact_pipeline(monkeypatch):
    monkeypatch.setattr(cli.Pipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: ExactPipeline()))


ARGS = ["--checkpoint", "exact", "--sampler", "ddim", "--steps", "5", "--pool", "32",
        "--hard", "4", "--easy", "4", "--validation", "32", "--tol", "1e-4", "--device", "cpu",
        "--no-progress"]


def test_check_held_out_refuses_only_a_worse_grid():
    cli.check_held_out(0.1, 0.1, 8)  # a tie is kept
    cli.check_held_out(0.05, 0.1, 8)
    with pytest.raises(ValueError) as err:
        cli.check_held_out(0.2, 0.1, 8)
    msg = str(err.value)
    assert "\n" not in msg and "2.0000e-01" in msg and "1.0000e-01" in msg and " 8 " in msg


def crammed(den, sampler, n, x, ref, w, max_evals=0, starts="both"):
    """A stand-in fit that puts every step at the noisy end: the last step then jumps from
    near t_max to clean data, much worse than the default grid on any draws."""
    t_max, t_min = float(den.process.t_max), float(den.process.t_min)
    top = torch.linspace(t_max, t_max - 0.05 * (t_max - t_min), n, dtype=torch.float64)
    return torch.cat([top, torch.tensor([t_min], dtype=torch.float64)]), 0.0


def test_fit_grid_refuses_a_grid_worse_on_held_out_draws(exact_pipeline, tmp_path, capsys,
                                                         monkeypatch):
    """Exit 2, one line on stderr with both validation errors, no JSON and no PNG."""
    monkeypatch.setattr(cli, "fit_grid", crammed)
    out = tmp_path / "grid.json"
    assert main(["fit-grid", *ARGS, "--evals", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "worse than the default on 32 held-out" in err[0], err
    fitted, default = (float(v) for v in err[0].split("RMS ")[1].split(")")[0].split(" vs "))
    assert fitted > 2 * default
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_fit_grid_saves_a_fit_that_holds_up_on_held_out_draws(exact_pipeline, tmp_path):
    """The accepted case, with the real fit: its grid is no worse than the default on the
    validation draws (another seed), and the file records both errors and that seed."""
    out = tmp_path / "grid.json"
    assert main(["fit-grid", *ARGS, "--evals", "40", "--validation-seed", "7", "--out",
                 str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["validation_rms"] <= saved["default_validation_rms"]
    assert saved["validation_seed"] == 7 and len(saved["times"]) == 6
    default = time_grid(make_process("linear"), 5)
    assert saved["times"][0] == float(default[0]) and saved["times"][-1] == float(default[-1])


def test_fit_grid_refuses_a_grid_overfitted_to_one_draw(exact_pipeline, tmp_path, capsys):
    """The natural failure: fitted on a single training draw, an 8-step grid halves that
    draw's error (8.2e-2 -> 4.2e-2) but is worse than the default on the 32 validation draws
    (2.53e-1 vs 2.32e-1), and is refused."""
    out = tmp_path / "grid.json"
    assert main(["fit-grid", *ARGS, "--steps", "8", "--hard", "0", "--easy", "1", "--evals",
                 "30", "--seed", "0", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    rows = {r.split("|")[1].strip(): [float(v) for v in r.split("|")[2:4]]
            for r in printed.out.splitlines() if r.startswith(("| default", "| fitted"))}
    assert rows["fitted"][0] < rows["default"][0] and rows["fitted"][1] > rows["default"][1]
    assert "worse than the default" in printed.err and not out.exists()


def test_fit_grid_ays_records_the_bound_and_beats_the_default(exact_pipeline, tmp_path):
    """--method ays: the Align-Your-Steps grid of the bound of plms's order (capped at 3),
    with no references to fit, is more accurate than the default 10-step grid on the
    validation draws (8.3e-3 against 1.29e-1 here); the JSON says how it was made."""
    out = tmp_path / "grid.json"
    args = [a if a != "ddim" else "plms" for a in ARGS]
    args[args.index("--steps") + 1] = "10"
    assert main(["fit-grid", *args, "--method", "ays", "--validation", "128", "--out",
                 str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["method"] == "ays" and saved["order"] == 3 and saved["train_rms"] is None
    assert saved["validation_rms"] < 0.5 * saved["default_validation_rms"]
    assert len(saved["times"]) == 11 and saved["times"][-1] == 0.0


def test_fit_grid_ays_refusal_and_bad_options(exact_pipeline, tmp_path, capsys):
    """A worse AYS grid is refused like a fitted one (heun, 10 steps, bound of order 1:
    1.8e-1 against the default's 8.4e-2), naming what to try; --order 0 and --trajectories 1
    are one-line errors."""
    out = tmp_path / "grid.json"
    args = [a if a != "ddim" else "heun" for a in ARGS]
    args[args.index("--steps") + 1] = "10"
    assert main(["fit-grid", *args, "--method", "ays", "--order", "1", "--validation", "128",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AYS grid is worse than the default" in err[0]
    assert "--order" in err[0] and not out.exists()
    for bad in (["--order", "0"], ["--trajectories", "1"]):
        assert main(["fit-grid", *ARGS, "--method", "ays", *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad[0] in err[0]


def test_error_curves_keep_ays_and_fitted_grids_apart(tmp_path):
    """The error-against-NFE plot joins grids made the same way only: an AYS grid's curve
    holds the AYS grids of the folder, a fitted grid's (older files have no "method") the
    fitted ones."""
    from difflab.samplers import save_time_grid

    ts = time_grid(make_process("linear"), 4)
    common = {"sampler": "plms", "checkpoint": "run", "label": None, "guidance": None,
              "clip": True}
    for name, method, nfe, err in (("a.json", "ays", 4, 0.1), ("b.json", "ays", 8, 0.05),
                                   ("c.json", None, 6, 0.2)):
        extra = {"method": method} if method else {}
        save_time_grid(ts, tmp_path / name, **common, **extra, nfe=nfe, validation_rms=err,
                       default_validation_rms=2 * err)
    ays = cli.error_curves(tmp_path / "a.json")
    assert set(ays) == {"default grid", "AYS grid"} and sorted(ays["AYS grid"][0]) == [4, 8]
    fit = cli.error_curves(tmp_path / "c.json")
    assert set(fit) == {"default grid", "fitted grid"} and fit["fitted grid"] == ([6.0], [0.2])


def test_fit_grid_starts_refine_the_default_the_three_piece_grid_or_both():
    """starts="default" is Nelder-Mead from the default grid alone, "three-piece" from the
    best three-piece grid alone (bit for bit), and "both" keeps the better of the two."""
    data = ExactPipeline().exact
    p = data.process
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64) * float(p.sigma(p.t_max))
    ref = reference_solution(data, x, 1e-6)
    fits = {s: fit_grid(data, ddim, 5, x, ref, max_evals=15, starts=s)
            for s in ("default", "three-piece", "both")}
    torch.testing.assert_close(fits["default"][0],
                               optimize_grid(data, ddim, time_grid(p, 5), x, ref, 15),
                               rtol=0, atol=0)
    three = fit_three_piece_grid(data, ddim, 5, x, ref)
    torch.testing.assert_close(fits["three-piece"][0], optimize_grid(data, ddim, three, x, ref,
                                                                     15), rtol=0, atol=0)
    better = min(("default", "three-piece"), key=lambda s: fits[s][1])
    assert fits["both"][1] == fits[better][1]
    torch.testing.assert_close(fits["both"][0], fits[better][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="starts"):
        fit_grid(data, ddim, 5, x, ref, starts="none")


def test_fit_grid_cli_records_a_start_other_than_both(exact_pipeline, tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert main(["fit-grid", *ARGS, "--evals", "10", "--starts", "default", "--out",
                 str(out)]) == 0
    assert json.loads(out.read_text())["starts"] == "default"
    with pytest.raises(SystemExit) as bad:
        main(["fit-grid", *ARGS, "--starts", "none", "--out", str(tmp_path / "g2.json")])
    assert bad.value.code == 2 and "--starts" in capsys.readouterr().err
