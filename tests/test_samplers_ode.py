"""Every deterministic sampler against the exact probability flow of a Gaussian mixture:
convergence at its theoretical order, and agreement with the float64 reference at high NFE."""

import functools

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    CountingDenoiser,
    ddim,
    dpm_solver,
    dpmpp_2m,
    dpmpp_3m,
    euler,
    euler_ode,
    heun,
    lms,
    plms,
    rk45,
    time_grid,
    unipc_bh1,
    unipc_bh2,
)

DIM = 3
# Last noisy level sigma~ = sigma / alpha of the grids (cosine_rates has sigma~ = 0.33 at t = 0).
SIGMA_MIN = {"vpsde": 0.05, "linear": 0.05, "cosine_rates": 0.4}


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(process):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, DIM, generator=g, dtype=torch.float64)
    return GaussianMixture(process, mu, torch.tensor([0.4, 0.6], dtype=torch.float64))


@functools.cache
def problem(name: str):
    """The process, the mixture, start noise, and the exact x0_hat at the last noisy level."""
    process = make_process(name)
    data = mixture(process)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(8, DIM, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    t_end = time_grid(process, 4, "logsnr", sigma_min=SIGMA_MIN[name])[-2]
    exact = data(data.ode_solution(x_T, process.t_max, float(t_end)), t_end).x0
    return process, data, x_T, exact


# (sampler, theoretical order, grid, step counts in the asymptotic range)
ORDERS = [
    ("ddim", ddim, 1, "logsnr", (16, 32, 64)),
    ("euler", euler, 1, "logsnr", (32, 64, 128)),
    ("euler_karras", euler, 1, "karras", (32, 64, 128)),
    ("euler_ode", euler_ode, 1, "logsnr", (32, 64, 128)),
    ("heun", heun, 2, "logsnr", (16, 32, 64)),
    ("plms", functools.partial(plms, final_order=1), 2, "logsnr", (16, 32, 64)),
    ("lms", functools.partial(lms, final_order=1), 4, "logsnr", (48, 96, 192)),
    ("dpm_solver1", functools.partial(dpm_solver, order=1), 1, "logsnr", (16, 32, 64)),
    ("dpm_solver2", functools.partial(dpm_solver, order=2), 2, "logsnr", (16, 32, 64)),
    ("dpm_solver3", dpm_solver, 3, "logsnr", (16, 32, 64)),
    # the paper's DPM-Solver-2 / -3 (midpoint form): orders 2 and 3 at r = 1/2 and 1/3, 2/3,
    # which stages at the interior points of a log-SNR-uniform grid have
    ("dpm_solver2_midpoint", functools.partial(dpm_solver, order=2, form="midpoint"), 2,
     "logsnr", (16, 32, 64)),
    ("dpm_solver3_midpoint", functools.partial(dpm_solver, form="midpoint"), 3, "logsnr",
     (32, 64, 128)),
    ("dpm_solver3_pp_midpoint", functools.partial(dpm_solver, form="midpoint",
                                                  data_prediction=True), 3, "logsnr",
     (16, 32, 64)),
    ("dpmpp_2m", dpmpp_2m, 2, "logsnr", (16, 32, 64)),
    ("dpmpp_2m_phi2", functools.partial(dpmpp_2m, form="phi2"), 2, "logsnr", (16, 32, 64)),
    ("dpmpp_2m_karras", dpmpp_2m, 2, "karras", (16, 32, 64)),
    ("dpmpp_3m", dpmpp_3m, 3, "logsnr", (24, 48, 96)),
    ("unipc_bh1", unipc_bh1, 4, "logsnr", (16, 32, 64)),
    ("unipc_bh2", unipc_bh2, 3, "logsnr", (16, 32, 64)),
]


@pytest.mark.parametrize("label,sampler,order,spacing,steps", ORDERS, ids=[o[0] for o in ORDERS])
def test_converges_at_its_order(label, sampler, order, spacing, steps):
    """Slope of log error against log NFE within 0.3 of the theoretical order."""
    process, data, x_T, exact = problem("vpsde")
    nfes, errs = [], []
    for n in steps:
        counted = CountingDenoiser(data)
        out = sampler(counted, x_T, time_grid(process, n, spacing, sigma_min=SIGMA_MIN["vpsde"]))
        nfes.append(counted.nfe)
        errs.append(float((out - exact).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.3, (label, errs, slope)


@pytest.mark.parametrize("schedule", ["vpsde", "linear", "cosine_rates"])
def test_euler_in_sigma_is_ddim(schedule):
    """Euler in sigma~ on y = x / alpha lands on alpha x0_hat + sigma eps_hat: DDIM (eta = 0)
    on the same grid, to rounding; and it is a different method from euler_ode (log-SNR)."""
    process, data, x_T, _ = problem(schedule)
    for spacing in ("logsnr", "karras"):
        ts = time_grid(process, 7, spacing, sigma_min=SIGMA_MIN[schedule])
        torch.testing.assert_close(euler(data, x_T, ts), ddim(data, x_T, ts), rtol=1e-10,
                                   atol=1e-10)
    assert float((euler(data, x_T, ts) - euler_ode(data, x_T, ts)).abs().max()) > 1e-3


def test_plms_is_fourth_order_on_equal_sigma_steps():
    """PNDM's fixed coefficients assume equal steps in sigma~ = sigma / alpha: order 4 there
    (started at sigma~ = 2 from the exact solution so the asymptotic range is reached)."""
    process, data, x_T, exact = problem("vpsde")
    t_start = process.t_from_log_snr(torch.tensor(-2 * np.log(2.0), dtype=torch.float64))
    x_start = data.ode_solution(x_T, process.t_max, float(t_start))
    steps = (8, 16, 32)
    errs = []
    for n in steps:
        st = torch.linspace(2.0, SIGMA_MIN["vpsde"], n, dtype=torch.float64)
        ts = torch.cat([process.t_from_log_snr(-2 * st.log()), torch.zeros(1, dtype=torch.float64)])
        ts[0] = t_start
        errs.append(float((plms(data, x_start, ts, final_order=1) - exact).pow(2).mean()
                          .sqrt()))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + 4) < 0.3, (errs, slope)


# (sampler, steps giving ~1e-5 error, schedules); first-order ones only on one schedule
HIGH_NFE = [(ddim, 16000, ["vpsde"]), (euler_ode, 8000, ["vpsde"]), (heun, 800, None),
            (plms, 800, None), (lms, 300, None), (dpm_solver, 200, None), (dpmpp_2m, 800, None),
            (dpmpp_3m, 300, None), (unipc_bh1, 200, None), (unipc_bh2, 300, None),
            (rk45, 10, None)]
CASES = [(f, n, sched) for f, n, scheds in HIGH_NFE
         for sched in (scheds or ["vpsde", "linear", "cosine_rates"])]


@pytest.mark.parametrize("sampler,n,schedule", CASES,
                         ids=[f"{f.__name__}-{s}" for f, _, s in CASES])
def test_high_nfe_agrees_with_reference(sampler, n, schedule):
    """At high NFE every deterministic sampler is within 1e-4 (RMS) of the exact PF-ODE
    solution, for continuous and discrete (log-SNR-interpolated) schedules."""
    process, data, x_T, exact = problem(schedule)
    opts = {"rtol": 1e-8, "atol": 1e-8} if sampler is rk45 else {}
    if sampler in (lms, plms):  # compare x0_hat at the last level, like the others
        opts = {"final_order": 1}
    ts = time_grid(process, n, "logsnr", sigma_min=SIGMA_MIN[schedule])
    out = sampler(data, x_T, ts, **opts)
    assert float((out - exact).pow(2).mean().sqrt()) < 1e-4


def test_rk45_reports_nfe_and_meets_tolerance():
    process, data, x_T, exact = problem("vpsde")
    ts = time_grid(process, 10, "logsnr", sigma_min=SIGMA_MIN["vpsde"])
    errs, nfes = [], []
    for tol in (1e-3, 1e-6):
        counted = CountingDenoiser(data)
        out = rk45(counted, x_T, ts, rtol=tol, atol=tol)
        errs.append(float((out - exact).abs().max()))
        nfes.append(counted.nfe)
    assert errs[1] < errs[0] and errs[1] < 1e-4 and nfes[1] > nfes[0] > 2


@functools.cache
def anisotropic_mixture():
    """A harder exact problem: 16-d mixture of 4 Gaussians with log-uniform per-dimension
    scales 0.05-0.5, DDPM linear schedule, 64 draws; the exact solution (the analytic
    module's own DOP853 in other variables, at 1e-11) to sigma~ = 1e-3, then x0_hat."""
    import math

    process = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 16, generator=g, dtype=torch.float64)
    std = torch.exp(math.log(0.05) + math.log(10) * torch.rand(4, 16, generator=g,
                                                                 dtype=torch.float64))
    data = GaussianMixture(process, mu, std, torch.rand(4, generator=g, dtype=torch.float64)
                           + 0.2)
    x_T = torch.randn(64, 16, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    t_end = process.t_from_log_snr(torch.tensor(-2 * math.log(1e-3), dtype=torch.float64))
    exact = data(data.ode_solution(x_T, process.t_max, float(t_end)), t_end).x0
    return process, data, x_T, t_end, exact


def test_rk45_reaches_1e_4_within_200_nfe_on_an_anisotropic_mixture():
    """The adaptive solver is the accurate one: RMS 1e-4 of the exact solution within 200 NFE
    at its default tolerance (measured: 135 NFE, 2.4e-5), a 10x tighter tolerance costs more
    NFE and gains accuracy, and a loose one runs in few NFE (RK45 33, RK23 24 at 0.1)."""
    process, data, x_T, t_end, exact = anisotropic_mixture()
    ts = torch.tensor([process.t_max, float(t_end), 0.0], dtype=torch.float64)
    runs = {}
    for key, opts in (("default", {}), ("tight", {"rtol": 1e-6, "atol": 1e-6}),
                      ("loose", {"rtol": 0.1, "atol": 0.1}),
                      ("loose23", {"rtol": 0.1, "atol": 0.1, "method": "RK23"})):
        counted = CountingDenoiser(data)
        out = rk45(counted, x_T, ts, **opts)
        runs[key] = (counted.nfe, float((out - exact).pow(2).mean().sqrt()))
    assert runs["default"][0] <= 200 and runs["default"][1] < 1e-4, runs
    assert runs["tight"][0] > runs["default"][0] and runs["tight"][1] < 0.3 * runs["default"][1]
    assert runs["loose"][0] <= 36 and runs["loose"][1] < 0.05, runs
    assert runs["loose23"][0] <= 25, runs


def test_rk45_bs23_runs_within_20_nfe_and_beats_ddim_there():
    """method=BS23 (3 NFE a step, no start-up estimate) at tolerance 0.1 runs in <= 20 NFE
    (measured 13, RMS 0.029) and is more accurate than DDIM at the same NFE (0.079); scipy's
    RK45 needs more NFE than that at any tolerance."""
    process, data, x_T, exact = problem("vpsde")
    ts = time_grid(process, 10, "logsnr", sigma_min=SIGMA_MIN["vpsde"])
    counted = CountingDenoiser(data)
    err = float((rk45(counted, x_T, ts, rtol=0.1, atol=0.1, method="BS23") - exact)
                .pow(2).mean().sqrt())
    assert counted.nfe <= 20, counted.nfe
    grid = time_grid(process, counted.nfe, "logsnr", sigma_min=SIGMA_MIN["vpsde"])
    ddim_err = float((ddim(data, x_T, grid) - exact).pow(2).mean().sqrt())
    assert err < 0.6 * ddim_err, (err, ddim_err)
    counted = CountingDenoiser(data)
    rk45(counted, x_T, ts, rtol=0.1, atol=0.1)
    assert counted.nfe > 20


def test_rk45_bs23_max_nfe_ends_within_budget_and_tight_tolerance_converges():
    """max_nfe caps the evaluations (the last affordable step goes to the end); at tight
    tolerance BS23 reaches the exact solution; BS23 keeps the FSAL count 1 + 3 * attempts."""
    process, data, x_T, exact = problem("vpsde")
    ts = time_grid(process, 10, "logsnr", sigma_min=SIGMA_MIN["vpsde"])
    errs = {}
    for budget in (7, 15, None):
        counted = CountingDenoiser(data)
        out = rk45(counted, x_T, ts, rtol=1e-6, atol=1e-6, method="BS23", max_nfe=budget)
        assert budget is None or counted.nfe <= budget
        assert (counted.nfe - 1) % 3 == 0
        errs[budget] = float((out - exact).pow(2).mean().sqrt())
    assert errs[None] < 1e-4 < errs[15] < errs[7] < 1.0, errs
    with pytest.raises(ValueError, match="max_nfe"):
        rk45(data, x_T, ts, max_nfe=20)
    counted = CountingDenoiser(data)
    rk45(counted, x_T, ts, rtol=1e-6, atol=1e-6, method="ABM2", max_nfe=9)
    assert counted.nfe == 9


@pytest.mark.parametrize("method", ["BS23", "ABM2"])
def test_rk45_torch_methods_invert_along_the_exact_flow(method):
    """On a rising grid they integrate up the PF ODE: x at t_max matches the exact map."""
    process, data, x_T, _ = problem("linear")
    ts = time_grid(process, 10, "logsnr", sigma_min=SIGMA_MIN["linear"])
    x_low = data.ode_solution(x_T, process.t_max, float(ts[-2]))
    up = rk45(data, x_low, ts[:-1].flip(0), rtol=1e-7, atol=1e-7, method=method)
    torch.testing.assert_close(up, x_T, rtol=0, atol=1e-4)


def test_rk45_abm2_in_20_nfe_beats_ddim_and_dpmpp_2m_on_an_anisotropic_mixture():
    """method=ABM2 (1 NFE a step) with max_nfe=20 at tolerance 1e-2 on the 16-d anisotropic
    mixture: <= 20 NFE and RMS 0.0035, where DDIM and dpmpp_2m on the log-SNR grid to the same
    level take 20 NFE for 0.21 and 0.14; and at tolerance 1e-5 it reaches 1e-4 within 200 NFE
    (measured 175, 3.2e-5), with the evaluation count 1 + attempted steps."""
    process, data, x_T, t_end, exact = anisotropic_mixture()
    ts = torch.tensor([process.t_max, float(t_end), 0.0], dtype=torch.float64)
    counted = CountingDenoiser(data)
    out = rk45(counted, x_T, ts, rtol=1e-2, atol=1e-2, method="ABM2", max_nfe=20)
    err = float((out - exact).pow(2).mean().sqrt())
    assert counted.nfe <= 20
    grid = time_grid(process, 20, "logsnr", sigma_min=1e-3)
    for sampler in (ddim, dpmpp_2m):
        other = float((sampler(data, x_T, grid) - exact).pow(2).mean().sqrt())
        assert err < 0.2 * other, (sampler.__name__, err, other)
    counted = CountingDenoiser(data)
    out = rk45(counted, x_T, ts, method="ABM2")
    assert counted.nfe <= 200 and float((out - exact).pow(2).mean().sqrt()) < 1e-4


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_type_does_not_matter(prediction):
    """Samplers only see Prediction(x0, eps): a network predicting eps, x0 or v gives the same
    samples."""
    from difflab.parameterization import Denoiser, output_from_prediction

    process, data, x_T, _ = problem("linear")

    class Exact(torch.nn.Module):
        def forward(self, x, c_noise, cond):
            t = c_noise.double() * process.t_max / 1000
            a, s = process.alpha_sigma(t)
            return output_from_prediction(data(x, t), a, s, prediction)

    net = Exact()
    net.register_parameter("p", torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    ts = time_grid(process, 12, "karras")
    ref = unipc_bh2(data, x_T, ts)
    out = unipc_bh2(Denoiser(net, process, prediction), x_T, ts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_optimised_grid_beats_its_start_on_new_noise():
    """optimize_grid fitted on one noise draw lowers the error on another."""
    from difflab.samplers import optimize_grid, reference_solution

    process, data, x_T, _ = problem("linear")
    g = torch.Generator().manual_seed(5)
    x_train = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    start = time_grid(process, 5, "trailing")
    ts = optimize_grid(data, unipc_bh2, start, x_train, reference_solution(data, x_train),
                       max_evals=150)
    assert bool((ts[1:] < ts[:-1]).all()) and ts[0] == start[0] and ts[-1] == start[-1]
    ref = reference_solution(data, x_T)
    before = float((unipc_bh2(data, x_T, start) - ref).pow(2).mean().sqrt())
    after = float((unipc_bh2(data, x_T, ts) - ref).pow(2).mean().sqrt())
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("sampler,multi,single", [
    (lms, {}, {"final_order": 1}), (plms, {}, {"final_order": 1}),
    (dpmpp_3m, {"final_order": 3}, {}),
    (unipc_bh2, {"final_order": 3, "lower_order_final": False}, {"lower_order_final": False})])
def test_multistep_final_step_is_closer_to_the_ode_end(sampler, multi, single):
    """The Adams-Bashforth last step to sigma~ = 0 beats returning x0_hat at the last level."""
    process, data, x_T, _ = problem("vpsde")
    x0 = ode_end("vpsde")
    ts = time_grid(process, 12, "logsnr", sigma_min=0.2)
    err = {k: float((sampler(data, x_T, ts, **o) - x0).pow(2).mean().sqrt())
           for k, o in (("multi", multi), ("single", single))}
    assert err["multi"] < 0.7 * err["single"], err


@functools.cache
def ode_end(name):
    process, data, x_T, _ = problem(name)
    return data.ode_solution(x_T, process.t_max, process.t_min)


def test_mixture_density_score_and_denoiser_agree():
    """score = grad log q_t (autograd), denoiser = x + sigma^2 score / alpha form (Tweedie),
    and sampling matches the mixture's mean."""
    process, data, _, _ = problem("vpsde")
    x = torch.randn(5, DIM, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64)
    grad, = torch.autograd.grad(data.log_prob(x, t).sum(), x)
    torch.testing.assert_close(data.score(x, t), grad)
    a, s = process.alpha_sigma(t)
    pred = data(x.detach(), t)
    torch.testing.assert_close(pred.x0, (x.detach() + s**2 * grad) / a)
    torch.testing.assert_close(pred.eps, -s * grad)
    samples = data.sample(20000, torch.Generator().manual_seed(0))
    mean = (data.log_w.exp()[:, None] * data.mu).sum(0)
    assert float((samples.mean(0) - mean).abs().max()) < 0.05


@pytest.mark.parametrize("nfe", [5, 8, 10, 15, 20])
def test_dpm_solver_spends_one_evaluation_per_grid_point(nfe):
    """Singlestep DPM-Solver groups the grid into steps of its order (``singlestep_orders``) and
    so uses exactly N evaluations on N steps, noise or data prediction alike."""
    from difflab.samplers.dpm_solver import singlestep_orders

    assert sum(singlestep_orders(nfe - 1, 3)) == nfe - 1
    assert max(singlestep_orders(nfe - 1, 3)) == 3
    process, data, x_T, _ = problem("vpsde")
    for opts in ({}, {"data_prediction": True}):
        counted = CountingDenoiser(data)
        out = dpm_solver(counted, x_T, time_grid(process, nfe, "logsnr"), **opts)
        assert counted.nfe == nfe and torch.isfinite(out).all()


def test_dpm_solver_data_prediction_converges_at_order_3():
    """Singlestep DPM-Solver++(3) (``data_prediction``) is third order too."""
    process, data, x_T, exact = problem("vpsde")
    errs = [float((dpm_solver(data, x_T, time_grid(process, n, "logsnr",
                                                   sigma_min=SIGMA_MIN["vpsde"]),
                              data_prediction=True) - exact).pow(2).mean().sqrt())
            for n in (16, 32, 64)]
    slope = np.polyfit(np.log([16, 32, 64]), np.log(errs), 1)[0]
    assert abs(slope + 3) < 0.3, (errs, slope)


@functools.cache
def cosine_trailing():
    """The default digits model's setting on the exact mixture: discrete cosine T = 1000 (last
    beta clamped, sigma~ = 2e4 at t = T against 642 at T - 1), x0_hat clipped to [-1, 1] as the
    pipeline does, and a 1000-step DDIM reference on the default trailing grid."""
    from difflab.parameterization import ClippedDenoiser

    process = make_process("cosine")
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(2, DIM, generator=g, dtype=torch.float64)
    den = ClippedDenoiser(GaussianMixture(process, mu, torch.tensor([0.2, 0.3],
                                                                    dtype=torch.float64)))
    x_T = process.sigma(process.t_max) * torch.randn(
        32, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return process, den, x_T, ddim(den, x_T, time_grid(process, 1000))


@pytest.mark.parametrize("sampler", [heun, dpm_solver, functools.partial(
    dpm_solver, data_prediction=True), functools.partial(dpm_solver, order=2)],
    ids=["heun", "dpm_solver", "dpm_solver_pp", "dpm_solver2"])
def test_converges_on_discrete_cosine_trailing_grid(sampler):
    """Out of t = T of the discrete cosine schedule sigma~ falls 500- to 8000-fold in the first
    trailing interval; a second-order step there (Heun's trapezoid, DPM-Solver-3 at 4 and 16
    steps) once gave errors of 1 to 1e5. Now every doubling of the steps helps, like DDIM."""
    process, den, x_T, ref = cosine_trailing()
    steps = (2, 4, 8, 16, 32)
    errs = [float((sampler(den, x_T, time_grid(process, n)) - ref).pow(2).mean().sqrt())
            for n in steps]
    ddim32 = float((ddim(den, x_T, time_grid(process, 32)) - ref).pow(2).mean().sqrt())
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < ddim32 < 0.05, (errs, ddim32)


def test_steep_start_leaves_smooth_schedules_alone():
    """The first-order first interval is taken only on the cosine schedule's steep end: on the
    linear schedule's trailing grid Heun keeps its second-order first step."""
    from difflab.samplers.base import steep_noisy_end

    cosine, linear = make_process("cosine"), make_process("linear")
    assert all(steep_noisy_end(cosine, time_grid(cosine, n)) for n in (2, 16, 64))
    assert steep_noisy_end(cosine, time_grid(cosine, 16).flip(0))  # inversion up to t = T
    for name in ("linear", "sigmoid", "scaled_linear", "vpsde"):
        p = make_process(name)
        assert not any(steep_noisy_end(p, time_grid(p, n)) for n in (2, 4, 64)), name
    data = mixture(linear)
    x_T = float(linear.sigma(linear.t_max)) * torch.randn(
        4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ts = time_grid(linear, 2)
    assert float((heun(data, x_T, ts) - ddim(data, x_T, ts)).abs().max()) > 1e-3
