"""The adaptive reverse-SDE solver (Jolicoeur-Martineau et al. 2021): its Brownian queue
(rejection sampling with memory) keeps one Brownian path whatever is rejected, it samples an
exact Gaussian mixture, a tighter tolerance costs more evaluations and gives a smaller error,
it is reproducible and batch-independent, and ``max_nfe`` caps the cost."""

import math

import pytest
import torch
from test_sampler_restart import exact_moments, mixture, noise  # the same 2-D mixture

from difflab.analytic import GaussianData
from difflab.process import make_process
from difflab.samplers import (
    SAMPLERS,
    CountingDenoiser,
    adaptive_sde,
    check_sampler_options,
    time_grid,
)
from difflab.samplers.adaptive_sde import BrownianQueue, end_time, local_error
from difflab.samplers.grids import default_sigma_min

pytestmark = pytest.mark.usefixtures("one_thread")


def walk(n, rule, seed=0, keep_draw=False):
    """W(1) of n 1-d paths built by adaptive steps in [0, 1]: propose h, reject when
    ``rule(W, h)``, halve on rejection, grow by 1.5 (at most 0.25) on acceptance. The queue
    supplies W, or (``keep_draw``) a draw kept and rescaled across retries, sqrt(h) n."""
    g = torch.Generator().manual_seed(seed)
    queue = BrownianQueue(torch.zeros(n, 1, dtype=torch.float64))
    lam, total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    h, kept = torch.full((n,), 0.25, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    ok = torch.ones(n, dtype=torch.bool)
    while bool((lam < 1).any()):
        active, h = lam < 1, torch.minimum(h, 1 - lam)
        z = torch.randn(n, 1, generator=g, dtype=torch.float64)
        if keep_draw:
            kept = torch.where(ok[:, None], z, kept)
            w = h.sqrt()[:, None] * kept
        else:
            w, k = queue.take(h, z, active)
        ok = active & ~rule(w[:, 0], h)
        if not keep_draw:
            queue.drop(torch.where(ok, k, torch.zeros_like(k)))
        total = torch.where(ok[:, None], total + w, total)
        lam = torch.where(ok, torch.where(1 - (lam + h) <= 1e-9 * h, 1.0, lam + h), lam)
        h = torch.where(ok, 1.5 * h, 0.5 * h).clamp(max=0.25)
    return total[:, 0]


@pytest.mark.parametrize("rule", [lambda w, h: w.abs() > 0.4,
                                  lambda w, h: w > 0.2],
                         ids=["large", "one-sided"])
def test_rejections_keep_one_brownian_path(rule):
    """However the rejections depend on the increments, the accepted ones add up to W(1) ~
    N(0, 1) (mean, variance and fourth moment within 4 standard errors). A draw kept and
    rescaled on retry (the branch's former rule) gives a variance far off."""
    n = 20000
    w1 = walk(n, rule)
    assert abs(float(w1.mean())) < 4 / n**0.5
    assert abs(float(w1.pow(2).mean()) - 1) < 4 * (2 / n) ** 0.5
    assert abs(float(w1.pow(4).mean()) - 3) < 4 * (96 / n) ** 0.5
    assert abs(float(walk(n, rule, keep_draw=True).var()) - 1) > 0.2


def test_queue_splits_pieces_by_the_brownian_bridge():
    """Rejected steps of 1, 0.5, 0.25 leave pieces [0.25, 0.25, 0.5]; a step of 0.8 takes two
    of them and splits the third at 0.3. The pieces always add up to the first draw, and the
    accepted increment and the rest have variances 0.8, 0.2 and no correlation."""
    n = 20000
    g = torch.Generator().manual_seed(5)
    queue = BrownianQueue(torch.zeros(n, 1, dtype=torch.float64))
    on, none = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    first = None
    for h in (1.0, 0.5, 0.25, 0.8):
        w, k = queue.take(torch.full((n,), h, dtype=torch.float64),
                          torch.randn(n, 1, generator=g, dtype=torch.float64), on)
        first = w if first is None else first
        total = queue.w[:, :, 0].mul(torch.arange(queue.h.shape[1]) < 4).sum(1)
        torch.testing.assert_close(total, first[:, 0], rtol=0, atol=1e-12)
        if h < 0.8:
            queue.drop(none)
    torch.testing.assert_close(queue.h[0, :4], torch.tensor([0.25, 0.25, 0.3, 0.2],
                                                             dtype=torch.float64))
    assert torch.equal(k, torch.full((n,), 3)) and torch.equal(queue.count, torch.full((n,), 4))
    queue.drop(k)
    rest = queue.w[:, 0, 0]
    assert torch.equal(queue.count, torch.ones(n, dtype=torch.long))
    cov = torch.cov(torch.stack([w[:, 0], rest]))
    se = (2 / n) ** 0.5
    assert abs(float(cov[0, 0]) / 0.8 - 1) < 4 * se and abs(float(cov[1, 1]) / 0.2 - 1) < 4 * se
    assert abs(float(cov[0, 1])) < 4 * (0.8 * 0.2 / n) ** 0.5


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
    tightens (-4.7%, -1.9%, -0.7% against 0.2 at eps_rel 0.3, 0.1, 0.03, of which -0.15% is
    the final denoising step's; its standard error here is 0.3%) while the NFE grows (71,
    151, 357)."""
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


def test_tight_tolerance_has_no_bias_on_a_gaussian():
    """At eps_rel 0.01 the samples of the 16-d Gaussian N(0.5, 0.2^2) match the exact law
    within 4 standard errors: the pooled sample std against a^2 s^2 / m (x0_hat at the end
    time, exact), and the means."""
    process, d, n = make_process("vpsde"), 16, 1000
    data = GaussianData(process, torch.full((d,), 0.5, dtype=torch.float64),
                        torch.full((d,), 0.2, dtype=torch.float64))
    ts = time_grid(process, 10, "logsnr")
    out = adaptive_sde(data, noise(process, n, d, seed=4), ts, torch.Generator().manual_seed(4),
                       eps_rel=0.01, eps_abs=0.01 / 8)
    a, s = process.alpha_sigma(end_time(process, ts))
    std = float(a * 0.2**2 / (a**2 * 0.2**2 + s**2).sqrt())
    assert abs(float(out.std(0).mean()) / std - 1) < 4 / (2 * n * d) ** 0.5
    assert ((out.mean(0) - 0.5).abs() < 4 * std / n**0.5).all()


def test_tight_tolerance_has_no_bias_on_the_mixture():
    """At eps_rel 0.01 the 2-D mixture's sample mean and covariance (linear schedule) are
    within 4 standard errors of the exact ones. (The first version's bias, about 0.02 in the
    mean, shows only at some 20 000 draws; the Brownian-path tests above are what tell the
    two rules apart quickly.)"""
    process, n = make_process("linear"), 2000
    data = mixture(process)
    out = adaptive_sde(data, noise(process, n, seed=5), time_grid(process, 10),
                       torch.Generator().manual_seed(5), eps_rel=0.01)
    mean, cov = exact_moments(data)
    assert ((out.mean(0) - mean).abs() < 4 * (cov.diag() / n).sqrt()).all()
    se_cov = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((out.T.cov() - cov).abs() < 4 * se_cov).all()


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
