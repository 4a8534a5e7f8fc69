"""benchmarks/sampler_family.py: its problems are exact, its diffusers table matches difflab's
process, and a tiny run produces every table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import SAMPLERS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sampler_family as bench  # noqa: E402
import sampler_family_tables as tables  # noqa: E402


def test_rotated_mixture_is_the_exact_full_covariance_denoiser():
    """One rotated Gaussian, VE process: D(x) = mu + S (S + s^2 I)^-1 (x - mu) with the full
    covariance S = Q diag(std^2) Q^T (Tweedie)."""
    d = 5
    g = torch.Generator().manual_seed(0)
    std = 0.1 + torch.rand(1, d, generator=g, dtype=torch.float64)
    mu_y = torch.randn(1, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    data = bench.RotatedMixture(GaussianMixture(make_process("ve"), mu_y, std), q)
    x, s = torch.randn(3, d, generator=g, dtype=torch.float64), 0.7
    cov = q @ torch.diag(std[0] ** 2) @ q.T
    mu = mu_y[0] @ q.T
    expect = mu + (x - mu) @ torch.linalg.solve(cov + s**2 * torch.eye(d), cov)
    pred = data(x, torch.tensor(s, dtype=torch.float64))
    assert torch.allclose(pred.x0, expect, atol=1e-12)
    assert torch.allclose(pred.eps, (x - pred.x0) / s, atol=1e-12)


def test_problems_cover_the_family_and_fit_and_held_out_differ():
    problems = [bench.draw_problem(1000 + i) for i in range(12)]
    names = [p.name for p in problems]
    assert len(set(names)) == len(names)
    assert bench.draw_problem(1003).name == names[3]  # deterministic in the seed
    for p in problems:
        d = p.data.sample(2, torch.Generator().manual_seed(0)).shape[1]
        assert 2 <= d <= 256
        assert (p.times[1:] > p.times[:-1]).all() and (p.sigmas[1:] > p.sigmas[:-1]).all()
        grid = p.default_grid(10)
        assert float(grid[0]) == pytest.approx(p.process.t_max) and float(grid[-1]) == \
            p.process.t_min


@pytest.mark.slow  # importing diffusers alone takes ~5 s here
def test_diffusers_ddim_on_the_table_matches_difflab_ddim():
    """The 1000-level table (trained_betas) and the model adapter are right: diffusers' DDIM
    and difflab's on the same trailing grid agree to float32 table precision on typical draws
    (the median over draws is tested: on strongly overlapping mixtures such as problem 1001
    a 10-step DDIM is so sensitive near mode boundaries that the float32 tables alone move
    half the draws by up to 0.1)."""
    pytest.importorskip("diffusers")
    for seed in (1000, 1003, 1004, 1006):  # ve, cosine, linear, vpsde
        ddim_agrees(seed)


def ddim_agrees(seed):
    import diffusers

    p = bench.draw_problem(seed)
    z = bench.noise(p, 16, 0)
    x_T = z * float(p.process.sigma(p.process.t_max))
    ours = SAMPLERS["ddim"](p.data, x_T, p.default_grid(10))
    abar = 1 / (1 + p.sigmas**2)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    theirs, _ = bench.run_diffusers(diffusers.DDIMScheduler,
                                    {"timestep_spacing": "trailing",
                                     "trained_betas": betas.tolist()},
                                    bench.TableModel(p), bench.vp_state(p, x_T), 10)
    scale = float(ours.pow(2).mean().sqrt())
    assert float((ours - theirs).pow(2).mean(1).sqrt().median()) < 1e-4 * scale, p.name


def test_bootstrap_interval_contains_the_median():
    r = torch.linspace(0.1, 1.0, 11).numpy()
    lo, hi = tables.bootstrap_median(r)
    assert lo <= 0.55 <= hi and lo >= 0.1 and hi <= 1.0


@pytest.mark.slow
def test_tiny_run_scores_every_sampler(monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setattr(bench, "NFES", (5, 8))
    monkeypatch.setattr(tables, "NFES", (5, 8))
    fit = [bench.draw_problem(1000)]
    fams = bench.fit_families(fit, 4, 1e-6)
    res = bench.evaluate(bench.draw_problem(1001), 5000, 8, 1e-6, fams)
    assert {lab.split(" [")[1] for lab in res["difflab"]} == {"default]", "ays]", "ays_min]",
                                                             "ays3]", "family]"}
    assert all(math.isfinite(v) for row in res["difflab"].values() for v in row.values())
    assert tables.best(res["diffusers"], 5) > 0
    text = tables.namesake_table([res], "default")
    assert text.count("\n") == len(tables.NAMESAKE) + 1


def test_warm_start_candidates_keep_within_the_budget():
    """plms with PNDM's warm start spends one evaluation more than it has steps."""
    label = "plms, warm_start=heun"
    assert [bench.steps_for(m, 1, label) for m in bench.NFES] == [m - 1 for m in bench.NFES]
    assert bench.steps_for(10, 2) == 5 and bench.steps_for(10, 1) == 10


def test_compare_line_states_the_other_runs_goal(tmp_path):
    """--compare: the goal status of another saved run, from its JSON alone."""
    ours = {f"{configs[0]} [default]": {m: 1.0 for m in bench.NFES}
            for configs, _ in tables.NAMESAKE.values()}
    theirs = {name: {m: 2.0 for m in bench.NFES} for _, name in tables.NAMESAKE.values()}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"seed_base": 2000, "results": [
        {"difflab": ours, "diffusers": theirs}] * 3}))
    line = tables.compare_line(path)
    assert "seeds 2000..2005" in line
    assert "Goal met at every NFE: 5 (median 0.50, worst 0.50)" in line
    assert "on some problem: none." in line
