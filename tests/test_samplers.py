"""DDPM and DDIM against exact Gaussian mathematics; grids and shared sampler behaviour."""

import math

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianData
from difflab.process import make_process
from difflab.samplers import ddim, ddpm, discrete_timesteps, get_sampler, time_grid

DIM = 6


def gaussian(process):
    mu = torch.linspace(-1.0, 1.5, DIM, dtype=torch.float64)
    std = torch.linspace(0.3, 1.2, DIM, dtype=torch.float64)
    return GaussianData(process, mu, std)


def start_noise(process, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return process.sigma(process.t_max) * torch.randn(n, DIM, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,spacing", [("vpsde", None), ("cosine", "linspace"),
                                          ("linear", "trailing"), ("cosine_rates", None)])
def test_ddim_converges_to_exact_probability_flow(name, spacing):
    """DDIM(eta=0) with the exact denoiser converges to the exact PF-ODE solution at order 1."""
    process = make_process(name)
    data = gaussian(process)
    x_T = start_noise(process)
    # The last step returns the denoised x0_hat at t_min (for clean t_min: the ODE end point).
    exact = data(data.ode_solution(x_T, process.t_max, process.t_min), process.t_min).x0
    steps = [25, 50, 100, 200]
    errs = []
    for n in steps:
        ts = time_grid(process, n, spacing)
        out = ddim(data, x_T, ts)
        errs.append(float((out - exact).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert errs[-1] < errs[0] / 4
    assert -1.3 < slope < -0.7, (errs, slope)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_step_is_ho_et_al_posterior(variance):
    """One DDPM step t -> t-1 is mu_tilde(x_t, x0_hat) + sigma z with Ho et al. eq. 7."""
    process = make_process("linear")
    data = gaussian(process)
    t = 600
    x_t = start_noise(process, n=8)
    seen = []
    ddpm(data, x_t, torch.tensor([t, t - 1, 0.0], dtype=torch.float64),
         torch.Generator().manual_seed(3), seen.append, variance=variance)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ab, beta = process.alpha_bar, process.betas
    ab_t, ab_prev, b_t = ab[t - 1], ab[t - 2], beta[t - 1]
    x0 = data(x_t, float(t)).x0
    mean = (ab_prev.sqrt() * b_t / (1 - ab_t)) * x0 + ((1 - b_t).sqrt() * (1 - ab_prev)
                                                        / (1 - ab_t)) * x_t
    var = b_t if variance == "beta" else (1 - ab_prev) / (1 - ab_t) * b_t
    torch.testing.assert_close(seen[0].x, mean + var.sqrt() * z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler,steps,opts", [(ddpm, 1000, {"variance": "beta_tilde"}),
                                                (ddpm, 1000, {"variance": "beta"}),
                                                (ddim, 100, {"eta": 0.0}),
                                                (ddim, 100, {"eta": 0.5})])
def test_samplers_reproduce_the_data_distribution(sampler, steps, opts):
    """Started from N(0, I) at t = T, samples match N(mu, std^2) (to the schedule's residual)."""
    process = make_process("cosine")
    data = gaussian(process)
    n = 20000
    x_T = start_noise(process, n=n, seed=1)
    out = sampler(data, x_T, time_grid(process, steps), torch.Generator().manual_seed(2), **opts)
    se = data.std / math.sqrt(n)
    assert bool(((out.mean(0) - data.mu).abs() < 5 * se + 0.01).all()), out.mean(0) - data.mu
    assert bool(((out.std(0) / data.std - 1).abs() < 0.03).all()), out.std(0) / data.std


def test_same_seed_same_samples_and_final_step_is_denoised():
    process = make_process("linear")
    data = gaussian(process)
    x_T = start_noise(process)
    ts = time_grid(process, 10)
    a = ddpm(data, x_T, ts, torch.Generator().manual_seed(5))
    b = ddpm(data, x_T, ts, torch.Generator().manual_seed(5))
    c = ddpm(data, x_T, ts, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    seen = []
    ddim(data, x_T, ts, callback=seen.append, eta=0.3, generator=torch.Generator())
    assert [s.i for s in seen] == list(range(10))
    assert torch.equal(seen[-1].x, seen[-1].x0)  # no residual noise after the last step


def test_discrete_spacings():
    T = 1000
    assert discrete_timesteps(T, 10, "trailing").tolist() == list(range(1000, 0, -100))
    assert discrete_timesteps(T, 10, "leading").tolist() == list(range(901, 0, -100))
    lin = discrete_timesteps(T, 10, "linspace").tolist()
    assert lin[0] == 1000 and lin[-1] == 1 and len(set(lin)) == 10
    for spacing in ("trailing", "leading", "linspace"):
        steps = discrete_timesteps(T, 1000, spacing) if spacing != "linspace" else None
        if steps is not None:
            assert steps.tolist() == list(range(1000, 0, -1))
    ts = time_grid(make_process("linear"), 4)
    assert ts.tolist() == [1000, 750, 500, 250, 0]
    assert time_grid(make_process("vpsde"), 4).tolist() == [1, 0.75, 0.5, 0.25, 0]


def test_bad_grids_and_names():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(gaussian(make_process("linear")), torch.zeros(1, DIM), torch.tensor([5.0, 0.0, 10.0]))
    with pytest.raises(ValueError, match="unknown sampler 'foo'"):
        get_sampler("foo")
    with pytest.raises(ValueError, match="needs a discrete schedule"):
        time_grid(make_process("vpsde"), 5, "leading")
    with pytest.raises(ValueError, match=r"in \[1, 1000\]"):
        discrete_timesteps(1000, 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "vpsde", "cosine_rates"])
def test_logsnr_and_karras_grids(name):
    process = make_process(name)
    st_max = float((-0.5 * process.log_snr(process.t_max)).exp())
    for n in (1, 2, 7, 30):
        for spacing in ("logsnr", "karras", "uniform"):
            ts = time_grid(process, n, spacing)
            assert len(ts) == n + 1 and ts[0] == process.t_max and ts[-1] == process.t_min
            assert bool((ts[1:] < ts[:-1]).all())
    ts = time_grid(process, 10, "logsnr", sigma_min=0.5)
    lam = process.log_snr(ts[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((9,), float(lam[1] - lam[0]),
                                                      dtype=torch.float64))
    assert abs(float(lam[-1]) - (-2 * math.log(0.5))) < 1e-9
    ts = time_grid(process, 10, "karras", rho=3.0, sigma_min=0.5)
    st = (-0.5 * process.log_snr(ts[:-1])).exp() ** (1 / 3)
    torch.testing.assert_close(st.diff(), torch.full((9,), float(st[1] - st[0]),
                                                     dtype=torch.float64))
    assert abs(float(st[0]) ** 3 - st_max) < 1e-6 * st_max
    with pytest.raises(ValueError, match="sigma_min"):
        time_grid(process, 10, "karras", sigma_min=2 * st_max)


def test_every_sampler_is_registered_and_ends_denoised():
    from difflab.samplers import SAMPLERS

    process = make_process("linear")
    data = gaussian(process)
    x_T = start_noise(process, n=4)
    ts = time_grid(process, 6, "karras")
    for name, sampler in SAMPLERS.items():
        seen = []
        out = sampler(data, x_T, ts, torch.Generator().manual_seed(0), callback=seen.append)
        assert torch.equal(out, seen[-1].x0) and torch.equal(seen[-1].x, out), name
        assert torch.isfinite(out).all(), name
