"""heun final_order: the last step to sigma~ = 0 from eps_hat at the grid points (the
evaluation that starts each step), not from the Euler predictor's evaluations. 1 (the default)
is EDM's Euler step (x0_hat); 0 the local-Gaussian step; k > 1 Adams-Bashforth in sigma~."""

import functools

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import check_sampler_options, heun, time_grid
from difflab.samplers.base import final_sigma_step, gaussian_final_step

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def gaussian(s: float):
    process = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 16, generator=g, dtype=torch.float64)
    data = GaussianMixture(process, mu, torch.full((1, 16), s, dtype=torch.float64),
                           torch.ones(1, dtype=torch.float64))
    x_T = torch.randn(64, 16, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    return process, data, x_T, data.ode_solution(x_T, process.t_max, process.t_min)


class Recorder:
    def __init__(self, inner):
        self.inner, self.process, self.calls = inner, inner.process, []

    def __call__(self, x, t, cond=None):
        pred = self.inner(x, t, cond)
        self.calls.append((x, float(t), pred))
        return pred


def test_default_is_x0_hat_bit_for_bit():
    _, data, x_T, _ = gaussian(0.3)
    ts = time_grid(data.process, 6)
    rec = Recorder(data)
    out = heun(rec, x_T, ts)
    assert torch.equal(out, heun(data, x_T, ts, final_order=1))
    assert torch.equal(out, rec.calls[-1][2].x0)
    assert check_sampler_options("heun", {"final_order": 0}) == {"final_order": 0}


@pytest.mark.parametrize("order", [0, 2])
def test_last_step_uses_the_grid_point_evaluations(order):
    """Evaluations per step: grid point t_i, then the predictor at t_{i+1}; the last grid
    point's is the final one. The last step takes eps_hat at t_{N-1} and t_{N-2} (calls[-1]
    and calls[-3]), never the predictor's (calls[-2], also at t_{N-1})."""
    process, data, x_T, _ = gaussian(0.3)
    ts = time_grid(process, 6)
    rec = Recorder(data)
    out = heun(rec, x_T, ts, final_order=order)
    (x1, t1, p1), (_, t2, p2) = rec.calls[-1], rec.calls[-3]
    assert t1 == float(ts[-2]) and t2 == float(ts[-3])
    st = (-0.5 * process.log_snr(ts)).exp().tolist()
    if order == 0:
        expected = gaussian_final_step(p1.x0, p1.eps, p2.eps, st[-2], st[-3])
    else:
        expected = final_sigma_step(x1, float(process.alpha(ts[-2])), st, [p1.eps, p2.eps], 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_gaussian_end_beats_x0_hat_on_gaussian_data():
    """On N(mu, s^2 I), resolved (s = 0.5) or not (s = 0.01) at the last noisy level of a
    10-step trailing grid, the Gaussian last step is >= 2x closer to the PF-ODE end."""
    for s in (0.5, 0.01):
        _, data, x_T, ref = gaussian(s)
        ts = time_grid(data.process, 10)
        err = {k: float((heun(data, x_T, ts, final_order=k) - ref).pow(2).mean().sqrt())
               for k in (0, 1)}
        assert 2 * err[0] < err[1], (s, err)
