"""final_order=0: the local-Gaussian last step (``base.gaussian_final_step``, and with
gaussian_fit="two_point" ``base.two_point_gaussian_step``); heun's final_order (0, 1 = EDM's
x0_hat, k > 1).

Closed forms: for data N(mu, s^2 I) the PF-ODE keeps z fixed, y(sigma~) = mu + q z with
q = sqrt(s^2 + sigma~^2), x0_hat = mu + (s^2 / q) z, eps_hat = (sigma~ / q) z, and
y(0) = mu + s z."""

import functools

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import SAMPLERS, check_sampler_options, heun, time_grid
from difflab.samplers.base import final_sigma_step, gaussian_final_step, two_point_gaussian_step

pytestmark = pytest.mark.usefixtures("one_thread")
ZERO = ["plms", "lms", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2"]


def on_trajectory(mu, z, s, st):
    q = (s * s + st * st) ** 0.5
    return mu + (s * s / q) * z, (st / q) * z


@pytest.mark.parametrize("s", [1e-3, 0.05, 0.3, 2.0])
def test_exact_on_a_gaussian_trajectory(s):
    g = torch.Generator().manual_seed(0)
    mu, z = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    st, st_prev = 0.2, 0.35
    x0, eps = on_trajectory(mu, z, s, st)
    _, eps_prev = on_trajectory(mu, z, s, st_prev)
    out = gaussian_final_step(x0, eps, eps_prev, st, st_prev)
    torch.testing.assert_close(out, mu + s * z, rtol=0, atol=1e-12)


def test_limits_unresolved_and_resolved():
    """eps_hat unchanged by the step (still the noise): x0_hat; eps_hat shrinking like sigma~
    (small-noise regime): the midpoint (y + x0_hat) / 2 = x0_hat + sigma~ eps_hat / 2."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    # rounding in kappa = r <eps, eps> / |eps|^2 enters through a square root: ~1e-8 of a share
    torch.testing.assert_close(gaussian_final_step(x0, eps, eps, 0.1, 0.3), x0, rtol=0,
                               atol=1e-7)
    torch.testing.assert_close(gaussian_final_step(x0, eps, 3 * eps, 0.1, 0.3),
                               x0 + 0.05 * eps, rtol=0, atol=1e-15)


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


@pytest.mark.parametrize("name", ZERO)
def test_samplers_end_with_the_gaussian_step(name):
    """final_order=0 is the same last step in every sampler that takes it: the local-Gaussian
    step on the last two evaluations; and on Gaussian data, resolved (s = 0.5) or not
    (s = 0.01) at the last noisy level of a 10-step trailing grid, it is >= 2x closer to the
    PF-ODE end than x0_hat (final_order=1) and than the order-3 Adams-Bashforth step."""
    assert check_sampler_options(name, {"final_order": 0}) == {"final_order": 0}
    for s in (0.5, 0.01):
        process, data, x_T, ref = gaussian(s)
        ts = time_grid(process, 10)
        rec = Recorder(data)
        out = SAMPLERS[name](rec, x_T, ts, final_order=0)
        (_, t1, p1), (_, t2, p2) = rec.calls[-1], rec.calls[-2]
        st = (-0.5 * process.log_snr(torch.tensor([t1, t2], dtype=torch.float64))).exp()
        expected = gaussian_final_step(p1.x0, p1.eps, p2.eps, float(st[0]), float(st[1]))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        err = {k: float((SAMPLERS[name](data, x_T, ts, final_order=k) - ref).pow(2).mean())
               for k in (1, 3)}
        assert float((out - ref).pow(2).mean()) ** 0.5 * 2 < min(err.values()) ** 0.5


def test_dpm_solver_v3_does_not_take_zero():
    with pytest.raises(ValueError, match="final_order"):
        check_sampler_options("dpm_solver_v3", {"final_order": 0})


def test_heun_default_is_x0_hat_bit_for_bit():
    _, data, x_T, _ = gaussian(0.3)
    ts = time_grid(data.process, 6)
    rec = Recorder(data)
    out = heun(rec, x_T, ts)
    assert torch.equal(out, heun(data, x_T, ts, final_order=1))
    assert torch.equal(out, rec.calls[-1][2].x0)
    assert check_sampler_options("heun", {"final_order": 0}) == {"final_order": 0}


@pytest.mark.parametrize("order", [0, 2])
def test_heun_last_step_uses_the_grid_point_evaluations(order):
    """heun's last step works on eps_hat at the grid points (the evaluation that starts each
    step), not the predictor's. Evaluations per step: grid point t_i, then the predictor at
    t_{i+1}; the last grid point's is the final one. The last step takes eps_hat at t_{N-1}
    and t_{N-2} (calls[-1] and calls[-3]), never the predictor's (calls[-2], also at
    t_{N-1})."""
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


def test_heun_gaussian_end_beats_x0_hat_on_gaussian_data():
    """On N(mu, s^2 I), resolved (s = 0.5) or not (s = 0.01) at the last noisy level of a
    10-step trailing grid, the Gaussian last step is >= 2x closer to the PF-ODE end."""
    for s in (0.5, 0.01):
        _, data, x_T, ref = gaussian(s)
        ts = time_grid(data.process, 10)
        err = {k: float((heun(data, x_T, ts, final_order=k) - ref).pow(2).mean().sqrt())
               for k in (0, 1)}
        assert 2 * err[0] < err[1], (s, err)


def gaussian_prediction(mu, u, y, st):
    """The exact denoiser of N(mu, u I) at y and sigma~ = st: (x0_hat, eps_hat)."""
    eps = st * (y - mu) / (u + st * st)
    return y - st * eps, eps


@pytest.mark.parametrize("s", [1e-3, 0.05, 0.3, 2.0])
def test_two_point_exact_off_the_trajectory(s):
    """The two-point fit needs no common trajectory: from two unrelated evaluations of an
    isotropic Gaussian's denoiser it returns the exact PF-ODE end of the last one,
    mu + (s / q) (y - mu); the eps-ratio fit does not (it assumes one trajectory)."""
    g = torch.Generator().manual_seed(2)
    mu, y_a, y_b = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    st, st_prev = 0.2, 0.5
    x0_a, eps_a = gaussian_prediction(mu, s * s, mu + y_a, st_prev)
    x0_b, eps_b = gaussian_prediction(mu, s * s, mu + 0.3 * y_b, st)
    exact = mu + s / (s * s + st * st) ** 0.5 * 0.3 * y_b
    out = two_point_gaussian_step(x0_b, eps_b, x0_a, eps_a, st, st_prev)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)
    # the eps-ratio fit misses by a good part of the step x0_hat -> exact (it is near x0_hat
    # itself where the data are fully resolved, s >> sigma~)
    ratio = gaussian_final_step(x0_b, eps_b, eps_a, st, st_prev)
    if s < 1:
        assert float((ratio - exact).norm()) > 0.05 * float((x0_b - exact).norm())


@pytest.mark.parametrize("name", [*ZERO, "heun"])
def test_two_point_end_is_the_exact_map_of_the_last_state(name):
    """With gaussian_fit="two_point" every sampler's last step on Gaussian data is the exact
    PF-ODE map from the state of its last evaluation to t_min, whatever error the steps
    before made (6 trailing steps: far from the reference, heun with 3 steps further)."""
    assert check_sampler_options(name, {"final_order": 0, "gaussian_fit": "two_point"})
    process, data, x_T, ref = gaussian(0.05)
    ts = time_grid(process, 6)
    rec = Recorder(data)
    out = SAMPLERS[name](rec, x_T, ts, final_order=0, gaussian_fit="two_point")
    x_last, t_last, _ = rec.calls[-1]
    exact = data.ode_solution(x_last, torch.tensor(t_last, dtype=torch.float64), process.t_min)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-9)
    assert float((out - ref).abs().max()) > 1e-6  # the steps before did leave an error
    # the default fit is not that map off the trajectory; final_order=1 ignores gaussian_fit
    assert not torch.allclose(SAMPLERS[name](data, x_T, ts, final_order=0), out, atol=1e-9)
    assert torch.equal(SAMPLERS[name](data, x_T, ts, final_order=1, gaussian_fit="two_point"),
                       SAMPLERS[name](data, x_T, ts, final_order=1))


def test_gaussian_fit_choices():
    with pytest.raises(ValueError, match="gaussian_fit"):
        check_sampler_options("plms", {"gaussian_fit": "three_point"})
