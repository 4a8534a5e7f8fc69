"""UniPC's ``stop_sigma``: the last step is the UniP predictor to a small sigma~ and y = x /
alpha there is returned; it converges to the exact PF-ODE state there at the solver's order,
and is the default where the grid's last level is already below stop_sigma."""

import math

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, time_grid, unipc_bh1, unipc_bh2

pytestmark = pytest.mark.usefixtures("one_thread")
SIG = 0.05


def problem():
    process = make_process("vpsde")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, generator=g, dtype=torch.float64)
    data = GaussianMixture(process, mu, torch.tensor([0.4, 0.6], dtype=torch.float64))
    x_T = torch.randn(8, 3, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    return process, data, x_T


@pytest.mark.parametrize("sampler,order", [(unipc_bh1, 4), (unipc_bh2, 3)])
def test_stop_sigma_converges_to_the_flow_at_that_level(sampler, order):
    """Uniform log-SNR grids to SIG; stop_sigma one more such step below: the result is
    y(stop_sigma) of the exact flow to the order of the converged x0_hat test."""
    process, data, x_T = problem()
    nfes, errs = [], []
    for n in (16, 32, 64):
        ts = time_grid(process, n, "logsnr", sigma_min=SIG)
        s_max = float((-0.5 * process.log_snr(ts[0])).exp())
        s_end = SIG * math.exp(-math.log(s_max / SIG) / (n - 1))
        t_end = process.t_from_log_snr(torch.tensor(-2 * math.log(s_end), dtype=torch.float64))
        exact = data.ode_solution(x_T, process.t_max, float(t_end)) / process.alpha(t_end)
        counted = CountingDenoiser(data)
        out = sampler(counted, x_T, ts, stop_sigma=s_end)
        nfes.append(counted.nfe)
        errs.append(float((out - exact).pow(2).mean().sqrt()))
    assert nfes == [16, 32, 64]
    slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.35, (errs, slope)


def test_stop_sigma_above_the_last_level_changes_nothing():
    process, data, x_T = problem()
    ts = time_grid(process, 6, "logsnr", sigma_min=SIG)
    torch.testing.assert_close(unipc_bh1(data, x_T, ts, stop_sigma=2 * SIG),
                               unipc_bh1(data, x_T, ts), rtol=0, atol=0)
    assert float((unipc_bh1(data, x_T, ts, stop_sigma=SIG / 4)
                  - unipc_bh1(data, x_T, ts)).abs().max()) > 0
