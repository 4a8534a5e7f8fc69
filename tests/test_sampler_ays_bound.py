"""The AYS ODE bound's two Cauchy-Schwarz forms against the exact local error of the
first-order step for Gaussian data, where eps_hat along the PF-ODE is known in closed form."""

import math

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers.ays import local_error_bounds, optimize_schedule

# data N(0, S0^2 I): y(s) = q(s) z, eps_hat(s) = (s / q(s)) z, q = sqrt(S0^2 + s^2)
S0, DIM = 0.1, 4


def exact_gram(sig):
    e = sig / (S0**2 + sig**2).sqrt()
    return DIM * e[:, None] * e[None, :]


def exact_sq_error(sa, sb):
    """E || int_{sb}^{sa} (eps(s) - eps(sa)) ds ||^2 = DIM (q_a - q_b - (sa / q_a)(sa - sb))^2."""
    qa, qb = math.hypot(S0, sa), math.hypot(S0, sb)
    return DIM * (qa - qb - sa / qa * (sa - sb)) ** 2


def test_both_bounds_hold_and_min_is_tight_on_a_long_step_from_high_noise():
    sig = torch.logspace(math.log10(2e4), math.log10(1e-3), 1500, dtype=torch.float64)
    plain = local_error_bounds(exact_gram(sig), sig, "sigma")
    tight = local_error_bounds(exact_gram(sig), sig, "min")
    assert bool((tight <= plain).all())
    for sa, sb in [(2e4, 3.0), (2e4, 0.3), (5.0, 0.05), (0.2, 0.1), (1.0, 0.9)]:
        a, b = int((sig - sa).abs().argmin()), int((sig - sb).abs().argmin())
        exact = exact_sq_error(float(sig[a]), float(sig[b]))
        # upper bounds (up to the Riemann sums' relative error on 1500 levels)
        assert float(tight[a, b]) >= 0.98 * exact and float(plain[a, b]) >= 0.98 * exact
    a, b = 0, int((sig - 3.0).abs().argmin())
    exact = exact_sq_error(float(sig[a]), float(sig[b]))
    # from sigma~ = 2e4 to 3 the plain bound is > 1000x loose, the weighted one < 20x
    assert float(plain[a, b]) > 1e3 * exact and float(tight[a, b]) < 20 * exact


def test_min_bound_spends_fewer_levels_on_the_cosine_schedules_noisy_end():
    """Discrete cosine: sigma~_max = 2e4. The plain bound puts the second level higher than
    the weighted one does (it pays for the long, nearly free first step)."""
    process = make_process("cosine")
    g = torch.Generator().manual_seed(0)
    data = GaussianMixture(process, torch.randn(3, 2, generator=g, dtype=torch.float64),
                           torch.full((3, 2), 0.05, dtype=torch.float64))
    x0 = data.sample(128, g)
    second = {}
    for cs in ("sigma", "min"):
        ts = optimize_schedule(data, x0, 5, sigma_min=2e-4, free_end=True, order=2,
                               cauchy_schwarz=cs, candidates=128,
                               generator=torch.Generator().manual_seed(1))
        second[cs] = float((-0.5 * process.log_snr(ts[1])).exp())
    assert second["min"] < second["sigma"], second


def test_unknown_cauchy_schwarz_is_refused():
    process = make_process("ve")
    data = GaussianMixture(process, torch.zeros(1, 2, dtype=torch.float64),
                           torch.ones(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cauchy_schwarz"):
        optimize_schedule(data, torch.zeros(4, 2, dtype=torch.float64), 3, cauchy_schwarz="x")
