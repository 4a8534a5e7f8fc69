"""plms with PNDM's trapezoidal first step (``warm_start="heun"``): equal to a hand-written
reference update, equal to Heun where it is one step, one extra evaluation, and a first step
whose local error falls like h^3 (second order) where Euler's falls like h^2."""

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, heun, plms, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    process = make_process("linear")
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    data = GaussianMixture(process, mu, torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64))
    x_T = torch.randn(6, 4, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    return data, x_T


def sigma_tilde(process, ts):
    return (-0.5 * process.log_snr(ts)).exp().tolist()


def test_warm_start_equals_reference_pndm_update():
    """Heun first step, then eps_hat at the corrected state and Adams-Bashforth 2, 3 on the
    history [eps_1, eps_0] (PNDM's PLMS), final x0_hat; NFE = steps + 1."""
    data, x_T = mixture()
    process = data.process
    ts = time_grid(process, 4, "trailing")
    st, a = sigma_tilde(process, ts), process.alpha(ts).tolist()
    eps = lambda y, i: data(a[i] * y, ts[i]).eps  # noqa: E731
    y0 = x_T / a[0]
    e0 = eps(y0, 0)
    h0 = st[1] - st[0]
    y1 = y0 + h0 * (e0 + eps(y0 + h0 * e0, 1)) / 2
    e1 = eps(y1, 1)
    y2 = y1 + (st[2] - st[1]) * (1.5 * e1 - 0.5 * e0)
    e2 = eps(y2, 2)
    y3 = y2 + (st[3] - st[2]) * (23 * e2 - 16 * e1 + 5 * e0) / 12
    expected = data(a[3] * y3, ts[3]).x0
    counted = CountingDenoiser(data)
    out = plms(counted, x_T, ts, warm_start="heun", final_order=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert counted.nfe == 5


def test_warm_start_on_two_steps_is_heun():
    """(From sigma~ = 2: heun takes a steep noisiest interval by Euler alone.)"""
    data, x_T = mixture()
    lam = torch.tensor([-2 * np.log(2.0), -2 * np.log(0.5)], dtype=torch.float64)
    ts = torch.cat([data.process.t_from_log_snr(lam), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(plms(data, x_T, ts, warm_start="heun", final_order=1),
                               heun(data, x_T, ts), rtol=1e-12, atol=1e-12)


def test_first_step_local_error_is_third_order():
    """One step from sigma~ = 1 against the exact flow: local error ~ h^3 with the
    trapezoidal warm start, ~ h^2 with the Euler (AB1) one."""
    data, x_T = mixture()
    process = data.process
    t0 = process.t_from_log_snr(torch.tensor(0.0, dtype=torch.float64))
    x0 = data.ode_solution(x_T, process.t_max, float(t0))
    slopes = {}
    for start in ("ab", "heun"):
        hs, errs = [], []
        for h in (0.2, 0.1, 0.05):
            t1 = process.t_from_log_snr(torch.tensor(-2 * np.log(1 - h), dtype=torch.float64))
            t_end = process.t_from_log_snr(torch.tensor(-2 * np.log(0.5), dtype=torch.float64))
            ts = torch.stack([t0, t1, t_end])
            # rising=False, final_order=1: the state after the first step, read off the callback
            states: list[torch.Tensor] = []
            plms(data, x0, ts, callback=lambda info, out=states: out.append(info.x),
                 warm_start=start, final_order=1)
            exact = data.ode_solution(x0, float(t0), float(t1))
            hs.append(h)
            errs.append(float((states[0] - exact).pow(2).mean().sqrt()))
        slopes[start] = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slopes["ab"] - 2) < 0.3 and abs(slopes["heun"] - 3) < 0.3, slopes
