"""DPM-Solver-v3 and its empirical model statistics, against exact Gaussian(-mixture) models:
the l = 1, s = b = 0 limit is DPM-Solver++, the statistics of Gaussian data are the closed
form (and make the solver nearly exact), it converges at its order with estimated
statistics, and the statistics survive a save/load round trip."""

import functools
import math

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.io import LoadError
from difflab.process import make_process
from difflab.samplers import (
    SAMPLERS,
    EMSStatistics,
    check_sampler_options,
    dpm_solver_v3,
    dpmpp_2m,
    dpmpp_3m,
    ems_lambdas,
    ems_statistics,
    parse_sampler_options,
    time_grid,
)
from difflab.samplers.ems import Spline

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA_MIN = 0.05
F64 = torch.float64


@functools.cache
def mixture():
    process = make_process("vpsde")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, generator=g, dtype=F64)
    data = GaussianMixture(process, mu, torch.tensor([0.4, 0.6], dtype=F64))
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return process, data, x_T * process.sigma(process.t_max)


@functools.cache
def gaussian():
    """Diagonal Gaussian data: sigma eps_hat = sigma^2 / (alpha^2 c^2 + sigma^2) (x - alpha mu)
    is linear in x, so l = 1 / (1 + e^{2 lambda} c^2) exactly, N = sigma eps_hat - l x =
    -l alpha mu does not depend on x, f = N / alpha = -l mu, f' = -l' mu: s = 0 and
    b = -l' mu = 2 e^{2 lambda} c^2 mu / (1 + e^{2 lambda} c^2)^2."""
    process = make_process("vpsde")
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    c = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    return process, GaussianData(process, mu, c), mu, c


def closed_form(lam, mu, c):
    e2 = torch.exp(2 * lam)[:, None] * c**2
    return 1 / (1 + e2), 2 * e2 * mu / (1 + e2) ** 2


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("spacing", ["logsnr", "karras", "uniform"])
def test_without_statistics_it_is_dpm_solver_pp(spacing):
    """l = 1, s = b = 0: f = -x0_hat and the steps are DPM-Solver++ multistep's (exact
    integrals of the interpolant in lambda), to rounding, at orders 2 and 3."""
    process, data, x_T = mixture()
    ts = time_grid(process, 9, spacing)
    plain = {"corrector": False, "lower_order_final": False}
    v3 = dpm_solver_v3(data, x_T, ts, order=3, **plain)
    torch.testing.assert_close(v3, dpmpp_3m(data, x_T, ts), rtol=1e-11, atol=1e-12)
    ident = EMSStatistics.identity((3,))
    v2 = dpm_solver_v3(data, x_T, ts, order=2, statistics=ident, **plain)
    torch.testing.assert_close(v2, dpmpp_2m(data, x_T, ts, form="phi2"), rtol=1e-11,
                               atol=1e-12)
    assert rms(dpm_solver_v3(data, x_T, ts), v3) > 1e-6  # the corrector does something


def test_gaussian_statistics_are_the_closed_form():
    process, data, mu, c = gaussian()
    g = torch.Generator().manual_seed(0)
    lam = ems_lambdas(process, 24)[1:]  # (a knot at t_max is estimated just inside it)
    st = ems_statistics(data, data.sample(32, g), lam, generator=g)
    l_exact, b_exact = closed_form(lam, mu, c)
    torch.testing.assert_close(st.l, l_exact, rtol=1e-9, atol=1e-11)
    assert float(st.s.abs().max()) < 1e-9  # f is constant: Var f = 0 (to rounding): flat
    torch.testing.assert_close(st.b, b_exact, rtol=1e-5, atol=1e-6 * float(b_exact.abs().max()))
    shared = ems_statistics(data, data.sample(32, g), lam, generator=g, shared=True)
    torch.testing.assert_close(shared.l, l_exact.mean(1, keepdim=True).expand(-1, 3),
                               rtol=1e-9, atol=1e-11)


def test_gaussian_exact_statistics_make_the_solver_nearly_exact():
    """With the closed-form statistics g is constant, so even order 1 is exact but for the
    spline interpolation of l and b between knots: the error falls ~16x per halving of the
    knot spacing (cubic splines) and is far below DPM-Solver++'s at 5 steps."""
    process, data, mu, c = gaussian()
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * float(
        process.sigma(process.t_max))
    ts = time_grid(process, 5, "logsnr")
    exact = data(data.ode_solution(x_T, float(ts[0]), float(ts[-2])), ts[-2]).x0
    errs = []
    for m in (16, 32):
        lam = ems_lambdas(process, m)
        l_exact, b_exact = closed_form(lam, mu, c)
        st = EMSStatistics(lam, l_exact, torch.zeros_like(l_exact), b_exact)
        errs.append(rms(dpm_solver_v3(data, x_T, ts, order=1, statistics=st), exact))
    base = rms(dpmpp_3m(data, x_T, ts), exact)
    assert errs[1] < 1e-3 * base and errs[0] / errs[1] > 8, (errs, base)


@functools.cache
def mixture_statistics():
    process, data, _ = mixture()
    g = torch.Generator().manual_seed(3)
    return ems_statistics(data, data.sample(256, g), ems_lambdas(process, 128, SIGMA_MIN),
                          generator=g)


@pytest.mark.parametrize("options,order,steps", [
    ({}, 3, (32, 64, 128)), ({"corrector": False}, 3, (24, 48, 96)),
    ({"order": 2, "corrector": False}, 2, (16, 32, 64)), ({"order": 1}, 1, (16, 32, 64))])
def test_converges_at_its_order_with_statistics(options, order, steps):
    """Slope of log error against log NFE within 0.3 of the order, on the mixture with
    statistics estimated from 256 draws (the reparameterised ODE has the same solution)."""
    process, data, x_T = mixture()
    t_end = time_grid(process, 4, "logsnr", sigma_min=SIGMA_MIN)[-2]
    exact = data(data.ode_solution(x_T, process.t_max, float(t_end)), t_end).x0
    errs = [rms(dpm_solver_v3(data, x_T, time_grid(process, n, "logsnr", sigma_min=SIGMA_MIN),
                              statistics=mixture_statistics(), **options), exact)
            for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.3, (errs, slope)


def test_statistics_help_on_the_mixture_at_few_steps():
    process, data, x_T = mixture()
    ts = time_grid(process, 8, "logsnr", sigma_min=SIGMA_MIN)
    exact = data(data.ode_solution(x_T, float(ts[0]), float(ts[-2])), ts[-2]).x0
    with_stats = rms(dpm_solver_v3(data, x_T, ts, statistics=mixture_statistics()), exact)
    assert with_stats < 0.5 * rms(dpm_solver_v3(data, x_T, ts), exact)
    assert with_stats < 0.5 * rms(dpmpp_3m(data, x_T, ts), exact)


def test_save_load_round_trip_and_path_option(tmp_path):
    process, data, x_T = mixture()
    st = EMSStatistics(ems_lambdas(process, 5), *torch.rand(3, 5, 3, dtype=F64),
                       {"draws": 7})
    path = st.save(tmp_path / "ems.safetensors")
    back = EMSStatistics.load(path)
    for k in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(st, k))
    assert back.meta == {"draws": 7}
    ts = time_grid(process, 6, "logsnr")
    opts = parse_sampler_options("dpm_solver_v3", [f"statistics={path}"])
    assert check_sampler_options("dpm_solver_v3", opts) == {"statistics": str(path)}
    assert torch.equal(SAMPLERS["dpm_solver_v3"](data, x_T, ts, **opts),
                       dpm_solver_v3(data, x_T, ts, statistics=st))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="bad.safetensors"):
        EMSStatistics.load(tmp_path / "bad.safetensors")


def test_data_draws_as_the_statistics_option():
    """A tensor of data draws estimates the statistics at the grid's lambdas first."""
    process, data, x_T = mixture()
    ts = time_grid(process, 6, "logsnr", sigma_min=SIGMA_MIN)
    draws = data.sample(64, torch.Generator().manual_seed(4))
    out = dpm_solver_v3(data, x_T, ts, torch.Generator().manual_seed(5), statistics=draws)
    exact = data(data.ode_solution(x_T, float(ts[0]), float(ts[-2])), ts[-2]).x0
    assert rms(out, exact) < rms(dpm_solver_v3(data, x_T, ts), exact)


def test_bad_input_is_a_one_line_error():
    process, data, x_T = mixture()
    ts = time_grid(process, 4)
    with pytest.raises(ValueError, match="option 'statistics'"):
        dpm_solver_v3(data, x_T, ts, statistics=3)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_v3(data, x_T, ts, order=4)
    with pytest.raises(ValueError, match=r"statistics of shape \(2,\) do not match"):
        dpm_solver_v3(data, x_T, ts, statistics=EMSStatistics.identity((2,)))
    with pytest.raises(ValueError, match="strictly increasing"):
        EMSStatistics(torch.tensor([1.0, 0.0], dtype=F64), *torch.ones(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="data must be"):
        ems_statistics(data, torch.zeros(1, 3, dtype=F64), 4)


def test_spline_interpolates_and_integrates_exactly():
    """The natural cubic spline through samples of a cubic with zero second derivative at
    both ends is that cubic; its antiderivative is exact; outside it is held constant."""
    knots = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=F64)
    fn = lambda t: 1 + 2 * t  # noqa: E731 (a line: natural at both ends)
    sp = Spline(knots, fn(knots)[:, None])
    q = torch.tensor([-0.7, 0.0, 0.9], dtype=F64)
    torch.testing.assert_close(sp(q)[:, 0], fn(q))
    torch.testing.assert_close(sp.integral(q)[:, 0], (q + q**2) - (-1 + 1))
    out = torch.tensor([-2.0, 3.0], dtype=F64)
    torch.testing.assert_close(sp(out)[:, 0], fn(torch.tensor([-1.0, 1.0], dtype=F64)))
    assert math.isclose(float(sp.integral(out)[1, 0]), 2.0 + 2 * 3.0, rel_tol=1e-12)


def test_pseudo_order_keeps_two_nodes_and_changes_three():
    """The pseudo predictor keeps the Newton form's leading divided differences: with two
    nodes that is the interpolant itself, with three it drops a cross term."""
    process, data, x_T = mixture()
    ts = time_grid(process, 7, "logsnr", sigma_min=SIGMA_MIN)
    st = mixture_statistics()
    run = functools.partial(dpm_solver_v3, data, x_T, ts, statistics=st, corrector=False)
    torch.testing.assert_close(run(order=2, predictor_pseudo=True), run(order=2), rtol=1e-12,
                               atol=1e-12)
    assert rms(run(order=3, predictor_pseudo=True), run(order=3)) > 1e-6


def test_final_order_limit_is_dpm_solver_pp_too():
    """Without statistics and corrector the Adams-Bashforth last step sees the same eps_hat
    as DPM-Solver++'s, so final_order=3 agrees as well."""
    process, data, x_T = mixture()
    ts = time_grid(process, 7, "logsnr")
    v3 = dpm_solver_v3(data, x_T, ts, corrector=False, lower_order_final=False, final_order=3)
    torch.testing.assert_close(v3, dpmpp_3m(data, x_T, ts, final_order=3), rtol=1e-11,
                               atol=1e-12)


def test_difflab_ems_stats_then_sample(tmp_path):
    """``difflab ems-stats`` on a trained (toy) model writes statistics of its sample shape
    that ``difflab sample --sampler-opt statistics=PATH`` reads; it refuses to overwrite; a
    missing statistics file is a one-line error (exit status 2)."""
    from conftest import train_toy_moons

    from difflab.cli.main import main

    run = tmp_path / "toy"
    train_toy_moons(run)
    path = tmp_path / "e.safetensors"
    ems = ["ems-stats", "--checkpoint", str(run), "--out", str(path), "--draws", "16",
           "--knots", "6", "--sample-steps", "4", "--device", "cpu"]
    assert main(ems) == 0
    st = EMSStatistics.load(path)
    assert st.l.shape == (6, 2) and st.meta["draws"] == 16
    assert main(ems) == 2  # exists: refused without --overwrite
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run), "--n", "8", "--steps", "5", "--sampler",
                 "dpm_solver_v3", "--sampler-opt", f"statistics={path}", "--out",
                 str(tmp_path / "s.png"), "--save-npz", str(npz), "--no-progress"]) == 0
    assert np.isfinite(np.load(npz)["images"]).all()
    assert main(["sample", "--checkpoint", str(run), "--n", "2", "--steps", "5", "--sampler",
                 "dpm_solver_v3", "--sampler-opt", f"statistics={tmp_path / 'none'}",
                 "--out", str(tmp_path / "t.png"), "--no-progress"]) == 2
