"""The adaptive reverse-SDE solver (Jolicoeur-Martineau et al. 2021): it samples an exact
Gaussian mixture, a tighter tolerance costs more evaluations and gives a smaller error, it is
reproducible and batch-independent, and ``max_nfe`` caps the cost."""

import math

import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    SAMPLERS,
    CountingDenoiser,
    adaptive_sde,
    check_sampler_options,
    time_grid,
)
from difflab.samplers.adaptive_sde import local_error
from difflab.samplers.grids import default_sigma_min

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(process):
    mu = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
    return GaussianMixture(process, mu, torch.tensor([0.2, 0.3, 0.25], dtype=torch.float64),
                           torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def noise(process, n, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * process.sigma(process.t_max)


def exact_moments(data):
    w = data.log_w.exp()
    mean = w @ data.mu
    second = sum(wk * (torch.diag(sk**2) + torch.outer(mk, mk))
                 for wk, mk, sk in zip(w, data.mu, data.std, strict=True))
    return mean, second - torch.outer(mean, mean)


@pytest.mark.parametrize("schedule,spacing", [("linear", None), ("vpsde", "logsnr")])
def test_samples_follow_the_mixture(schedule, spacing):
    """Mean and covariance within 4 standard errors of the exact ones (default tolerances)."""
    process = make_process(schedule)
    data, n = mixture(process), 3000
    out = adaptive_sde(data, noise(process, n), time_grid(process, 10, spacing),
                       torch.Generator().manual_seed(3))
    mean, cov = exact_moments(data)
    assert ((out.mean(0) - mean).abs() < 4 * (cov.diag() / n).sqrt()).all()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((out.T.cov() - cov).abs() < 4 * se_cov).all()


def test_tighter_tolerance_costs_more_and_errs_less():
    """On a 16-d Gaussian N(0.5, 0.2^2) the sample std's bias shrinks as the tolerance
    tightens (about -4.8%, -1.9%, -0.7% over seeds at eps_rel 0.3, 0.1, 0.03; its standard
    error here is 0.3%) while the NFE grows (about 68, 138, 340)."""
    process, d, n = make_process("vpsde"), 16, 3000
    data = GaussianData(process, torch.full((d,), 0.5, dtype=torch.float64),
                        torch.full((d,), 0.2, dtype=torch.float64))
    x, ts = noise(process, n, d), time_grid(process, 10, "logsnr")
    nfes, errors = [], []
    for eps_rel in (0.3, 0.1, 0.03):
        count = CountingDenoiser(data)
        out = adaptive_sde(count, x, ts, torch.Generator().manual_seed(10), eps_rel=eps_rel,
                           eps_abs=eps_rel / 8)
        nfes.append(count.nfe)
        errors.append(abs(float(out.std(0).mean()) / 0.2 - 1))
    assert nfes[0] < nfes[1] < nfes[2]
    assert errors[0] > 0.03 and errors[0] > errors[1] + 0.01 and errors[1] > errors[2] + 0.004
    assert errors[2] < 0.015


def test_reproducible_and_batch_independent():
    """The same generator gives the same samples; with one generator per example each example
    is the same whether drawn alone or in a batch (every example has its own step sizes)."""
    process = make_process("vpsde")
    data, x = mixture(process), noise(process, 3)
    ts = time_grid(process, 8)
    a = adaptive_sde(data, x, ts, torch.Generator().manual_seed(1))
    b = adaptive_sde(data, x, ts, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    together = adaptive_sde(data, x, ts, [torch.Generator().manual_seed(s) for s in range(3)])
    for i in range(3):
        alone = adaptive_sde(data, x[i:i + 1], ts, [torch.Generator().manual_seed(i)])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-9, atol=1e-9)


def test_max_nfe_is_respected():
    process = make_process("linear")
    data, x = mixture(process), noise(process, 8)
    ts = time_grid(process, 10)
    free, capped = CountingDenoiser(data), CountingDenoiser(data)
    adaptive_sde(free, x, ts, torch.Generator().manual_seed(0), eps_rel=0.01)
    out = adaptive_sde(capped, x, ts, torch.Generator().manual_seed(0), eps_rel=0.01,
                       max_nfe=25)
    assert free.nfe > 25 >= capped.nfe >= 24 and torch.isfinite(out).all()


def test_ends_at_the_least_noisy_level_of_the_grids_ends():
    """Only the grid's ends count: the SDE runs to sigma~ = default_sigma_min (DDPM's first
    step, the paper's epsilon) and denoises there, or to ts[-2] when that is less noisy."""
    process = make_process("linear")
    data, x = mixture(process), noise(process, 4)
    t_floor = float(process.t_from_log_snr(torch.tensor(
        -2 * math.log(default_sigma_min(process)), dtype=torch.float64)))
    for ts, t_end in [(time_grid(process, 3), t_floor),
                      (torch.tensor([1000.0, 500.0, 0.5, 0.0], dtype=torch.float64), 0.5)]:
        seen = []
        out = adaptive_sde(data, x, ts, torch.Generator().manual_seed(0), eps_rel=0.2,
                           callback=seen.append)
        assert torch.equal(seen[-1].t, torch.full((4,), t_end, dtype=torch.float64))
        assert torch.equal(out, data(seen[-2].x, seen[-1].t).x0)


def test_local_error_is_the_scaled_rms_norm():
    x1 = torch.tensor([[1.0, -2.0, 0.0, 4.0]])
    x2 = x1 + torch.tensor([[0.1, 0.1, 0.01, -0.2]])
    prev = torch.tensor([[2.0, 1.0, 0.0, 1.0]])
    delta = torch.tensor([0.2, 0.2, 0.05, 0.4])  # max(0.05, 0.1 max(|x1|, |prev|))
    expect = (((x1 - x2) / delta) ** 2).mean().sqrt()
    torch.testing.assert_close(local_error(x1, x2, prev, 0.05, 0.1), expect.reshape(1))


def test_refusals():
    process = make_process("linear")
    data, x = mixture(process), noise(process, 2)
    with pytest.raises(ValueError, match="decreasing"):
        adaptive_sde(data, x, time_grid(process, 4).flip(0)[1:])
    with pytest.raises(ValueError, match="option 'eps_rel' must be a float > 0"):
        check_sampler_options("adaptive_sde", {"eps_rel": 0.0})
    with pytest.raises(ValueError, match="option 'max_nfe' must be an int >= 2"):
        check_sampler_options("adaptive_sde", {"max_nfe": 1})
    assert SAMPLERS["adaptive_sde"] is adaptive_sde
