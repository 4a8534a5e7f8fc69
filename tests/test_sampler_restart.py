"""Restart sampling (Xu et al. 2023): K = 0 is heun bit for bit, the NFE is heun's plus
2 K N_restart, each restart contracts the gap between trajectories by the exact ODE factor of
its interval, and the samples follow an exact Gaussian mixture."""

import math

import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    SAMPLERS,
    CountingDenoiser,
    check_sampler_options,
    heun,
    restart,
    time_grid,
)
from difflab.samplers.restart import restart_index, restart_levels

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(process):
    mu = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
    return GaussianMixture(process, mu, torch.tensor([0.2, 0.3, 0.25], dtype=torch.float64),
                           torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def noise(process, n, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * process.sigma(process.t_max)


@pytest.mark.parametrize("schedule,spacing,steps", [
    ("linear", "karras", 8), ("cosine", None, 6), ("vpsde", "logsnr", 5), ("ve", "karras", 7)])
def test_no_restarts_is_heun_bit_for_bit(schedule, spacing, steps):
    """The paper's knob at zero: K = 0 takes exactly heun's steps, its callbacks included (the
    discrete cosine grid starts with heun's steep-interval Euler step)."""
    process = make_process(schedule)
    data, x = mixture(process), noise(process, 16)
    ts = time_grid(process, steps, spacing)
    seen_h, seen_r = [], []
    out_h = heun(data, x, ts, callback=seen_h.append)
    out_r = restart(data, x, ts, torch.Generator().manual_seed(1), restarts=0,
                    callback=seen_r.append)
    assert torch.equal(out_h, out_r)
    assert [s.i for s in seen_r] == [s.i for s in seen_h] == list(range(steps))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.x0, b.x0)
               for a, b in zip(seen_h, seen_r, strict=True))


@pytest.mark.parametrize("restarts,restart_steps", [(1, 2), (3, 4)])
def test_nfe_is_heuns_plus_two_per_restart_step(restarts, restart_steps):
    process = make_process("linear")
    data, x = mixture(process), noise(process, 4)
    ts = time_grid(process, 10, "karras")
    count_h, count_r, seen = CountingDenoiser(data), CountingDenoiser(data), []
    heun(count_h, x, ts)
    restart(count_r, x, ts, torch.Generator().manual_seed(0), restarts=restarts,
            restart_steps=restart_steps, callback=seen.append)
    assert count_h.nfe == 2 * 10 - 1
    assert count_r.nfe == count_h.nfe + 2 * restarts * restart_steps
    assert [s.i for s in seen] == list(range(10 + restarts * restart_steps))  # every step


def test_each_restart_contracts_the_gap_by_the_ode_factor():
    """Xu et al.'s contraction, in closed form: for x0 ~ N(0, s^2) the PF ODE maps y = x / alpha
    from sigma~_max to sigma~_min by c = sqrt((s^2 + sigma~_min^2) / (s^2 + sigma~_max^2)), and
    two trajectories that get the same restart noise (one generator per example, same seed)
    differ after K restarts by q^K times their gap without restarts (heun), where q is the
    restart pass's Heun approximation of c, second order in N_restart."""
    process, s = make_process("vpsde"), 0.5
    data = GaussianData(process, torch.zeros(3, dtype=torch.float64),
                        torch.full((3,), s, dtype=torch.float64))
    x = noise(process, 2, 3)
    ts = time_grid(process, 12, "karras")
    st = (process.sigma(ts) / process.alpha(ts)).tolist()
    j = restart_index(st, 0.1)
    c = math.sqrt((s**2 + st[j] ** 2) / (s**2 + 1.0))
    gap_h = heun(data, x, ts).diff(dim=0)

    def ratio(k, n):
        gens = [torch.Generator().manual_seed(7) for _ in range(2)]
        gap = restart(data, x, ts, gens, restarts=k, restart_steps=n, restart_min=0.1,
                      restart_max=1.0).diff(dim=0)
        q = gap / gap_h
        torch.testing.assert_close(q, q.mean().expand_as(q), rtol=1e-9, atol=0)  # one factor
        return float(q.mean())

    q10, q20 = ratio(1, 10), ratio(1, 20)
    assert abs(ratio(3, 10) - q10**3) < 1e-9                 # K restarts: the factor K times
    err10, err20 = abs(q10 / c - 1), abs(q20 / c - 1)
    assert err20 < 2e-3 and 3.5 < err10 / err20 < 4.5        # -> c at order 2


def exact_moments(data):
    w = data.log_w.exp()
    mean = w @ data.mu
    second = sum(wk * (torch.diag(sk**2) + torch.outer(mk, mk))
                 for wk, mk, sk in zip(w, data.mu, data.std, strict=True))
    return mean, second - torch.outer(mean, mean)


def component_shares(data, x):
    """Fraction of points whose most likely component is k (at clean data)."""
    _, _, _, _, logp = data._components(x, torch.tensor(0.0, dtype=torch.float64))
    return torch.bincount(logp.argmax(-1), minlength=data.mu.shape[0]).double() / len(x)


@pytest.mark.parametrize("schedule", ["linear", "vpsde"])
def test_samples_follow_the_mixture(schedule):
    """Mean, covariance and component shares within 4 standard errors of the exact ones; a
    restart pass of one step over a wide interval is visibly off (the check has power)."""
    process = make_process(schedule)
    data, n = mixture(process), 4000
    x, ts = noise(process, n), time_grid(process, 12, "karras")
    mean, cov = exact_moments(data)
    se_mean = (cov.diag() / n).sqrt()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    w = data.log_w.exp()
    truth = component_shares(data, data.sample(n, torch.Generator().manual_seed(5)))
    se = (2 * w * (1 - w) / n).sqrt()
    out = restart(data, x, ts, torch.Generator().manual_seed(3), restarts=2, restart_steps=10,
                  restart_min=0.1, restart_max=1.0)
    assert ((out.mean(0) - mean).abs() < 4 * se_mean).all()
    assert ((out.T.cov() - cov).abs() < 4 * se_cov).all()
    assert ((component_shares(data, out) - truth).abs() < 4 * se).all()
    bad = restart(data, x, ts, torch.Generator().manual_seed(3), restarts=2, restart_steps=1,
                  restart_min=0.3, restart_max=3.0)
    assert ((bad.T.cov() - cov).abs() > 4 * se_cov).any()


def test_restart_levels_end_exactly_on_the_grid():
    process = make_process("linear")
    ts = time_grid(process, 10, "karras")
    st = (process.sigma(ts) / process.alpha(ts)).tolist()
    j = restart_index(st, 0.06)
    assert all(abs(math.log(st[j] / 0.06)) <= abs(math.log(st[k] / 0.06)) for k in range(1, 10))
    levels, times, alphas = restart_levels(process, 5 * st[j], st[j], ts[j], 4)
    assert levels[0] == 5 * st[j] and levels[-1] == st[j] and float(times[-1]) == float(ts[j])
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False))
    got = (process.sigma(times) / process.alpha(times)).tolist()
    assert all(abs(g / v - 1) < 1e-6 for g, v in zip(got, levels, strict=True))
    assert alphas[-1] == float(process.alpha(ts[j]))


def test_bad_intervals_and_grids_are_refused():
    process = make_process("linear")
    data, x = mixture(process), noise(process, 2)
    ts = time_grid(process, 8, "karras")
    with pytest.raises(ValueError, match="restart_max=0.01 must lie above sigma~"):
        restart(data, x, ts, restart_min=0.1, restart_max=0.01)
    with pytest.raises(ValueError, match="restart_max=1e\\+04 must lie above"):
        restart(data, x, ts, restart_max=1e4)
    with pytest.raises(ValueError, match="at least 2 steps"):
        restart(data, x, time_grid(process, 1))
    with pytest.raises(ValueError, match="decreasing"):
        restart(data, x, ts.flip(0)[1:])
    with pytest.raises(ValueError, match="option 'restarts' must be an int >= 0"):
        check_sampler_options("restart", {"restarts": -1})
    assert SAMPLERS["restart"] is restart
