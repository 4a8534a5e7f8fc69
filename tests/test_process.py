"""Schedules against their defining formulas; closed form against the simulated Markov chain."""

import math

import pytest
import torch

from difflab.process import (
    VPSDE,
    CosineRates,
    DiscreteProcess,
    make_process,
    markov_chain,
    process_from_config,
    q_sample,
)

T = 1000
t_int = torch.arange(1, T + 1, dtype=torch.float64)
i = (t_int - 1) / (T - 1)


def expected_betas(name):
    if name == "linear":
        return 1e-4 * (1 - i) + 0.02 * i
    if name == "quadratic":
        return (math.sqrt(1e-4) * (1 - i) + math.sqrt(0.02) * i) ** 2
    if name == "scaled_linear":
        return (math.sqrt(0.00085) * (1 - i) + math.sqrt(0.012) * i) ** 2
    if name == "sigmoid":
        return 1e-4 + (0.02 - 1e-4) / (1 + torch.exp(-(-6 + 12 * i)))
    if name == "cosine":
        def f(u):
            return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - f(t_int / T) / f((t_int - 1) / T), max=0.999)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "quadratic", "scaled_linear", "cosine", "sigmoid"])
def test_discrete_schedule_matches_formula(name):
    p = make_process(name)
    beta = expected_betas(name)
    torch.testing.assert_close(p.betas, beta, rtol=1e-12, atol=1e-15)
    alpha_bar = torch.cumprod(1 - beta, 0)
    a, s = p.alpha_sigma(t_int)
    torch.testing.assert_close(a**2, alpha_bar, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(a**2 + s**2, torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(p.snr(t_int), alpha_bar / (1 - alpha_bar), rtol=1e-9, atol=0)
    assert p.alpha(0.0) == 1 and p.sigma(0.0) == 0


def test_cosine_alpha_bar_is_f_ratio_where_unclipped():
    p = make_process("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert float(p.alpha(float(t)) ** 2) == pytest.approx(f(t / T) / f(0), rel=1e-9)


def test_continuous_processes_match_definitions():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    v = VPSDE()
    alpha_bar = torch.exp(-(0.1 * t + 0.5 * (20 - 0.1) * t**2))
    torch.testing.assert_close(v.alpha(t) ** 2, alpha_bar)
    c = CosineRates()
    theta = (1 - t) * math.acos(0.95) + t * math.acos(0.02)
    torch.testing.assert_close(c.alpha(t), torch.cos(theta))
    torch.testing.assert_close(c.sigma(t), torch.sin(theta))


ALL = ["linear", "cosine", "sigmoid", "vpsde", "cosine_rates"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ztsnr", [False, True])
def test_log_snr_monotone_and_invertible(name, ztsnr):
    p = make_process(name, zero_terminal_snr=ztsnr)
    t = torch.linspace(p.t_min, p.t_max, 2001, dtype=torch.float64)
    lam = p.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    inner = t[1:-1]
    torch.testing.assert_close(p.t_from_log_snr(p.log_snr(inner)), inner, rtol=0, atol=1e-6)


def test_discrete_interpolates_log_snr_between_steps():
    p = make_process("linear")
    lam = p.log_snr(torch.tensor([10.0, 11.0, 10.25], dtype=torch.float64))
    assert float(lam[2]) == pytest.approx(0.75 * float(lam[0]) + 0.25 * float(lam[1]), rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_zero_terminal_snr_rescale(name):
    base, z = make_process(name), make_process(name, zero_terminal_snr=True)
    assert float(z.alpha(float(T))) == 0.0 and float(z.log_snr(float(T))) == -math.inf
    assert float(z.alpha(1.0)) == pytest.approx(float(base.alpha(1.0)), rel=1e-12)
    assert bool((z.betas <= 1).all()) and float(z.betas[-1]) == pytest.approx(1.0)
    c = make_process("vpsde", zero_terminal_snr=True)
    assert float(c.alpha(1.0)) == 0 and float(c.alpha(0.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name):
    p = make_process(name, zero_terminal_snr=name == "cosine")
    q = process_from_config(p.to_config())
    t = torch.linspace(p.t_min, p.t_max, 17, dtype=torch.float64)
    torch.testing.assert_close(q.log_snr(t), p.log_snr(t))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        make_process("foo")


@pytest.mark.parametrize("process,times", [
    (DiscreteProcess("linear"), torch.arange(0, 301, dtype=torch.float64)),
    (DiscreteProcess("cosine", T=200), torch.arange(0, 151, dtype=torch.float64)),
    (VPSDE(), torch.linspace(0, 0.4, 60, dtype=torch.float64)),
])
def test_markov_chain_matches_closed_form(process, times):
    """Composing q(x_t | x_{t-1}) step by step gives q(x_t | x_0) = N(alpha x0, sigma^2)."""
    n, x0 = 40000, torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    chain = markov_chain(process, x0.expand(n, 4).clone(), times, generator=g)
    closed = q_sample(process, x0.expand(n, 4), times[-1],
                      torch.randn(n, 4, generator=g, dtype=torch.float64))
    alpha, sigma = process.alpha_sigma(times[-1])
    se_mean = float(sigma) / math.sqrt(n)
    for x in (chain, closed):
        assert torch.allclose(x.mean(0), alpha * x0, atol=5 * se_mean)
        assert torch.allclose(x.std(0), sigma.expand(4), rtol=5 / math.sqrt(2 * n))
    # the first DDPM step is x_1 = sqrt(1 - beta_1) x_0 + sqrt(beta_1) eps (Ho et al. eq. 2)
    if process.is_discrete:
        one = markov_chain(process, x0[None], times[:2], generator=torch.Generator().manual_seed(1))
        eps = torch.randn(1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        b1 = process.betas[0]
        torch.testing.assert_close(one, (1 - b1).sqrt() * x0 + b1.sqrt() * eps)
