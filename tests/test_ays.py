"""difflab.samplers.ays: the bound-minimising schedule optimiser and the grid family."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import SAMPLERS, optimize_schedule, time_grid
from difflab.samplers.ays import (
    best_path,
    fit_grid_family,
    grid_family,
    interval_costs,
    optimize_schedules,
)


def mixture(name="linear", d=8, k=4, seed=0):
    process = make_process(name, **({"sigma_max": 80.0} if name == "ve" else {}))
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) / d**0.5
    std = 0.05 + 0.2 * torch.rand(k, d, generator=g, dtype=torch.float64)
    return GaussianMixture(process, mu, std)


def draws(data, n, seed):
    return data.sample(n, torch.Generator().manual_seed(seed))


def rms_of(sampler, data, ts, x_T, ref):
    return float((SAMPLERS[sampler](data, x_T, ts) - ref).pow(2).mean().sqrt())


@pytest.mark.parametrize("name,sigma_min", [("linear", None), ("vpsde", None), ("ve", 0.002)])
@pytest.mark.parametrize("bound", ["ode", "sde"])
def test_grid_is_strictly_decreasing_from_t_max_to_t_min(name, sigma_min, bound):
    data = mixture(name)
    p = data.process
    grids = optimize_schedules(data, draws(data, 32, 1), [1, 2, 6], sigma_min=sigma_min,
                               candidates=48, generator=torch.Generator().manual_seed(0),
                               bound=bound)
    for n, ts in grids.items():
        assert len(ts) == n + 1 and ts.dtype == torch.float64
        assert (ts[1:] < ts[:-1]).all()
        assert float(ts[0]) == p.t_max and float(ts[-1]) == p.t_min
    # the smallest noise level is sigma_min (default: the default grid's)
    lo = sigma_min or float((-0.5 * p.log_snr(time_grid(p, 6, "logsnr")[-2])).exp())
    s_last = float((-0.5 * p.log_snr(grids[6][-2])).exp())
    assert s_last == pytest.approx(lo, rel=1e-6)


def test_deterministic_given_the_generator():
    data = mixture()
    x0 = draws(data, 32, 1)
    a, b = (optimize_schedule(data, x0, 5, candidates=48,
                              generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    assert torch.equal(optimize_schedules(data, x0, [5], candidates=48,
                                          generator=torch.Generator().manual_seed(3))[5], a)


def test_optimised_grid_beats_the_default_on_held_out_draws():
    """Fitted from the denoiser and data draws only, scored against the exact PF-ODE from
    noise it never saw."""
    data = mixture(d=8, k=4, seed=2)
    p = data.process
    ts = optimize_schedule(data, draws(data, 64, 1), 8, candidates=64,
                           generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(9),
                      dtype=torch.float64) * p.sigma(p.t_max)
    ref = data.ode_solution(x_T, p.t_max, p.t_min, rtol=1e-5, atol=1e-5)  # errors ~1e-2
    for sampler in ("ddim", "plms"):
        opt = rms_of(sampler, data, ts, x_T, ref)
        default = rms_of(sampler, data, time_grid(p, 8), x_T, ref)
        assert opt < default, (sampler, opt, default)


def test_best_path_is_the_exact_minimum():
    g = torch.Generator().manual_seed(0)
    n, edges = 8, 3
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    cost = torch.where(torch.ones(n, n, dtype=torch.bool).triu(1), cost,
                       torch.full_like(cost, math.inf))
    path = best_path(cost, edges)
    assert path[0] == 0 and path[-1] == n - 1 and len(path) == edges + 1

    def total(p):
        return sum(float(cost[a, b]) for a, b in zip(p, p[1:], strict=False))

    brute = min(total((0, *mid, n - 1)) for mid in itertools.combinations(range(1, n - 1),
                                                                            edges - 1))
    assert total(path) == pytest.approx(brute)
    with pytest.raises(ValueError, match="steps"):
        best_path(cost, n)


def test_interval_costs_equal_the_direct_sum():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(6, 5, generator=g, dtype=torch.float64)  # 6 levels, one 5-dim output each
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    cost = interval_costs(f @ f.T, sig, power=3)
    for a in range(6):
        for b in range(6):
            if b <= a:
                assert math.isinf(cost[a, b])
                continue
            direct = sum((sig[j - 1] - sig[j]) / sig[j] ** 3 * (f[j] - f[a]).pow(2).sum()
                         for j in range(a + 1, b + 1))
            assert float(cost[a, b]) == pytest.approx(float(direct), rel=1e-10)


@pytest.mark.parametrize("name", ["linear", "vpsde"])
def test_grid_family_limits_are_karras_and_logsnr(name):
    p = make_process(name)
    assert torch.allclose(grid_family(p, 7, 7.0, 1.0), time_grid(p, 7, "karras"), rtol=1e-9)
    assert torch.allclose(grid_family(p, 7, math.inf, 1.0), time_grid(p, 7, "logsnr"),
                          rtol=1e-9)
    ts = grid_family(p, 7, 3.0, 0.7)
    assert (ts[1:] < ts[:-1]).all() and float(ts[-1]) == p.t_min


def test_fit_grid_family_returns_the_best_candidate():
    data = mixture(d=4, k=3, seed=4)
    p = data.process
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(5),
                      dtype=torch.float64) * p.sigma(p.t_max)
    ref = data.ode_solution(x_T, p.t_max, p.t_min, rtol=1e-8, atol=1e-8)
    rhos, warps = (1.0, 7.0, math.inf), (0.7, 1.0)
    ends = (None, 1e-3)
    rho, warp, end = fit_grid_family([(data, x_T, ref)], SAMPLERS["ddim"], 6, rhos, warps,
                                     ends)
    errs = {(r, w, e): rms_of("ddim", data, grid_family(p, 6, r, w, sigma_min=e), x_T, ref)
            for r in rhos for w in warps for e in ends}
    assert errs[rho, warp, end] == min(errs.values())


def test_bad_arguments_are_one_line_value_errors():
    data = mixture()
    x0 = draws(data, 8, 0)
    with pytest.raises(ValueError, match="steps"):
        optimize_schedule(data, x0, 0)
    with pytest.raises(ValueError, match="bound"):
        optimize_schedule(data, x0, 4, bound="kl")
    with pytest.raises(ValueError, match="sigma_min"):
        optimize_schedule(data, x0, 4, sigma_min=1e6)
    with pytest.raises(ValueError, match="candidates"):
        optimize_schedule(data, x0, 10, candidates=5)
    with pytest.raises(ValueError, match="rho"):
        grid_family(data.process, 4, rho=0.0)


def test_free_end_follows_the_data_scale():
    """With free_end the optimiser picks the smallest level too: data ten times narrower
    ends at a smaller noise level, and both stay above the floor."""
    p = make_process("vpsde")
    ends = []
    for scale in (0.3, 0.03):
        g = torch.Generator().manual_seed(0)
        data = GaussianMixture(p, scale * torch.randn(3, 4, generator=g, dtype=torch.float64),
                               torch.full((3,), scale, dtype=torch.float64))
        ts = optimize_schedule(data, draws(data, 64, 1), 6, sigma_min=1e-4, free_end=True,
                               candidates=96, generator=torch.Generator().manual_seed(0))
        assert (ts[1:] < ts[:-1]).all() and float(ts[-1]) == p.t_min
        ends.append(float((-0.5 * p.log_snr(ts[-2])).exp()))
    assert 1e-4 * (1 - 1e-9) <= ends[1] < ends[0]
    with pytest.raises(ValueError, match="free_end"):
        optimize_schedule(data, draws(data, 8, 1), 4, free_end=True, bound="sde")


def test_order_spreads_the_steps_and_is_checked():
    """order = 2 scales each step's bound by its squared log-size: the largest step of the
    optimised grid (in log sigma~) gets no larger, and bad orders are refused."""
    data = mixture(seed=3)
    p = data.process
    x0 = draws(data, 32, 1)

    def largest_log_step(ts):
        s = (-0.5 * p.log_snr(ts[:-1])).exp().log()
        return float((s[:-1] - s[1:]).max())

    one, two = (optimize_schedule(data, x0, 8, candidates=64, order=k,
                                  generator=torch.Generator().manual_seed(0)) for k in (1, 2))
    assert (two[1:] < two[:-1]).all() and float(two[-1]) == p.t_min
    assert largest_log_step(two) <= largest_log_step(one) + 1e-12
    with pytest.raises(ValueError, match="order"):
        optimize_schedule(data, x0, 4, order=0)
    with pytest.raises(ValueError, match="order"):
        optimize_schedule(data, x0, 4, order=2, bound="sde")


def test_sigma_max_below_the_top_is_where_the_grid_starts():
    """With sigma_max below sigma~(t_max) the grid starts at that level (for a sampler started
    there, e.g. behind a GaussianHead), not at t_max; one step is the start level alone."""
    data = mixture("cosine")
    p = data.process
    grids = optimize_schedules(data, draws(data, 32, 1), [1, 4], sigma_max=5.0,
                               candidates=48, generator=torch.Generator().manual_seed(0))
    for ts in grids.values():
        top = float((-0.5 * p.log_snr(ts[0])).exp())
        assert abs(top - 5.0) < 1e-9 * 5.0
        assert float(ts[-1]) == p.t_min
    assert len(grids[1]) == 2


def test_schedule_order_is_the_samplers_order_capped():
    """The bound's order per sampler: its (predictor) steps' order, options read, capped at
    MAX_SCHEDULE_ORDER; rk45 has no fixed grid."""
    from difflab.samplers import schedule_order

    assert [schedule_order(n) for n in ("ddim", "euler", "euler_ode", "heun", "dpmpp_2m")] \
        == [1, 1, 1, 2, 2]
    assert [schedule_order(n) for n in ("plms", "lms", "dpmpp_3m", "dpm_solver", "unipc_bh1",
                                        "unipc_bh2")] == [3, 3, 3, 3, 3, 2]
    assert schedule_order("unipc_bh2", {"order": 3}) == 3
    assert schedule_order("unipc_bh1", {"order": 1}) == 1
    assert schedule_order("lms", {"order": 2}) == 2 and schedule_order("plms", cap=4) == 4
    with pytest.raises(ValueError, match="rk45"):
        schedule_order("rk45")
    with pytest.raises(ValueError, match="eta"):
        schedule_order("heun", {"eta": 1.0})
