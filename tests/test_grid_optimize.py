"""Fitted time grids: the stratified training set is an unbiased estimate of its pool, and the
weighted fit is the plain fit on the weighted draws."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    fit_three_piece_grid,
    optimize_grid,
    reference_solution,
    stratified_draws,
    three_piece_grid,
    time_grid,
)
from difflab.samplers.multistep import plms
from difflab.samplers.optimize import stratify

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    process = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = 2 * torch.randn(3, 2, generator=g, dtype=torch.float64)
    return process, GaussianMixture(process, mu, torch.tensor([0.2, 0.3, 0.4],
                                                              dtype=torch.float64))


def test_stratify_keeps_the_top_scores_and_is_unbiased():
    score = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep, w = stratify(score, 5, 9, torch.Generator().manual_seed(2))
    assert set(keep[:5].tolist()) == set(score.argsort(descending=True)[:5].tolist())
    assert len(set(keep.tolist())) == 14 and float(w.sum()) == pytest.approx(50)
    # Over many subsamples the weighted sum of a per-draw quantity averages to its pool sum.
    f = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sums = torch.stack([(w * f[k]).sum() for k, w in
                        (stratify(score, 5, 9, torch.Generator().manual_seed(s))
                         for s in range(4000))])
    assert abs(float(sums.mean() - f.sum())) < 4 * float(sums.std()) / 4000**0.5


def test_stratified_draws_pick_the_draws_a_coarse_solver_gets_wrong():
    process, data = mixture()
    g = torch.Generator().manual_seed(4)
    pool = torch.randn(300, 2, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    x, w = stratified_draws(data, pool, 10, 40, g)
    ref = reference_solution(data, x, 1e-8)
    err = (plms(data, x, time_grid(process, 8)) - ref).pow(2).mean(1)
    # The proxy (coarse vs fine PLMS) ranks by the coarse solver's own error.
    assert float(err[:10].mean()) > 10 * float(err[10:].mean())
    assert float(w.sum()) == pytest.approx(300)


def test_weighted_fit_equals_the_fit_on_the_weighted_draws():
    """Zero weights drop draws; the fitted grid is the one fitted on the others alone."""
    process, data = mixture()
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * process.sigma(process.t_max)
    ref = reference_solution(data, x, 1e-8)
    start = time_grid(process, 4)
    w = torch.tensor([1.0] * 6 + [0.0] * 6, dtype=torch.float64)
    a = optimize_grid(data, plms, start, x, ref, max_evals=60, weights=w)
    b = optimize_grid(data, plms, start, x[:6], ref[:6], max_evals=60)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a, start)


def test_three_piece_grid_is_uniform_in_t_on_each_piece():
    process = make_process("linear")
    ts = three_piece_grid(process, 10, 600.0, 200.0, 2, 5)
    assert len(ts) == 11 and float(ts[0]) == process.t_max and float(ts[-1]) == process.t_min
    hi, window, lo = ts[:3], ts[2:8], ts[7:]
    assert float(hi[-1]) == 600.0 and float(window[-1]) == 200.0
    for piece in (hi, window, lo):
        steps = piece[:-1] - piece[1:]
        torch.testing.assert_close(steps, steps.mean().expand_as(steps))
    with pytest.raises(ValueError, match="at least one step per piece"):
        three_piece_grid(process, 5, 600.0, 200.0, 2, 3)
    with pytest.raises(ValueError, match="t_a > t_b"):
        three_piece_grid(process, 6, 200.0, 600.0, 2, 2)


def test_fit_three_piece_grid_is_the_best_of_its_family():
    """Brute force over the same breaks and splits, with the weighted RMS, finds the same
    error; zero-weight draws do not count."""
    process, data = mixture()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = x * process.sigma(process.t_max)
    ref = reference_solution(data, x, 1e-8)
    w = torch.tensor([2.0] * 8 + [0.0] * 8, dtype=torch.float64)
    upper, lower = (0.5, 0.7), (0.15, 0.3)
    fit = fit_three_piece_grid(data, plms, 5, x, ref, w, upper=upper, lower=lower)

    def err(ts):
        return float((plms(data, x[:8], ts) - ref[:8]).pow(2).mean().sqrt())

    span = process.t_max - process.t_min
    grids = [three_piece_grid(process, 5, process.t_min + a * span, process.t_min + b * span, h, m)
             for a in upper for b in lower for h in (1, 2) for m in range(1, 5 - h)]
    assert err(fit) == pytest.approx(min(err(ts) for ts in grids), rel=1e-12)
    assert err(fit) < err(time_grid(process, 5))
