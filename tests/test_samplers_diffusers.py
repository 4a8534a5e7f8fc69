"""difflab's samplers against their diffusers namesakes on the same grid of noise levels.

Both run on the exact Gaussian-mixture denoiser; diffusers' schedulers get difflab's grid as
their sigma~ = sigma / alpha table (custom sigmas, or the table overwritten after
``set_timesteps``), so only float32 rounding separates them (diffusers steps in float32).
Note that diffusers computes its alpha-bar table in float32 and difflab in float64: on their
own default grids sigma~ differs by up to 8e-5 relative at t = T, which these tests avoid by
sharing one grid.
"""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import dpm_solver, dpmpp_2m, euler, time_grid

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    process = make_process("vpsde")
    g = torch.Generator().manual_seed(0)
    data = GaussianMixture(process, torch.randn(3, 4, generator=g, dtype=torch.float64),
                           torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64))
    x_T = torch.randn(16, 4, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    return process, data, x_T


def run_scheduler(scheduler, data, x_T, ts, scale=True):
    """diffusers' loop with an eps-prediction model on the grid ``ts``; the scheduler sees
    sigma~ of ``ts`` and the model is evaluated at the matching difflab time. With ``scale``
    the scheduler works on the variance-exploding sample x / alpha (Euler's) and
    scale_model_input gives the model x; else on x itself (DPM-Solver's)."""
    a, s = data.process.alpha_sigma(ts)
    x = x_T / a[0] if scale else x_T
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(data(inp, ts[i]).eps, t, x).prev_sample
    return x


def set_grid(scheduler, process, ts):
    """Overwrite the scheduler's noise levels with sigma~ of ``ts`` (last one 0)."""
    a, s = process.alpha_sigma(ts)
    scheduler.set_timesteps(len(ts) - 1)
    scheduler.sigmas = (s / a).to(torch.float32)
    scheduler.timesteps = torch.arange(len(ts) - 1, 0, -1)  # labels only: the model ignores them
    return scheduler


@pytest.mark.parametrize("spacing,n", [("logsnr", 5), ("karras", 8), ("uniform", 20)])
def test_euler_matches_euler_discrete(spacing, n):
    process, data, x_T = mixture()
    ts = time_grid(process, n, spacing)
    a, s = process.alpha_sigma(ts)
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(sigmas=(s / a).tolist())
    out = run_scheduler(scheduler, data, x_T, ts)
    torch.testing.assert_close(out.double(), euler(data, x_T, ts), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("form,solver_type", [("midpoint", "midpoint"), ("phi2", "heun")])
@pytest.mark.parametrize("spacing,n", [("logsnr", 6), ("karras", 10), ("uniform", 16)])
def test_dpmpp_2m_matches_dpm_solver_multistep(form, solver_type, spacing, n):
    """Both forms of DPM-Solver++(2M) against DPMSolverMultistepScheduler (order 2, data
    prediction, last step to sigma = 0 first order, i.e. x0_hat, as difflab's)."""
    process, data, x_T = mixture()
    ts = time_grid(process, n, spacing)
    scheduler = set_grid(diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, algorithm_type="dpmsolver++",
        solver_type=solver_type, final_sigmas_type="zero"), process, ts)
    out = run_scheduler(scheduler, data, x_T, ts, scale=False)
    ours = dpmpp_2m(data, x_T, ts, form=form)
    torch.testing.assert_close(out.double(), ours, rtol=2e-5, atol=2e-5)
    other = dpmpp_2m(data, x_T, ts, form="phi2" if form == "midpoint" else "midpoint")
    assert float((out.double() - other).abs().max()) > 1e-3  # the forms differ


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("spacing,n", [("logsnr", 7), ("karras", 10), ("uniform", 14)])
def test_dpm_solver_midpoint_matches_dpm_solver_singlestep(order, spacing, n):
    """Singlestep DPM-Solver++ with form="midpoint", remainder="last" and steep_guard=False is
    diffusers' DPMSolverSinglestepScheduler (data prediction, solver_type="midpoint", last
    step to sigma = 0 first order) on the same grid; difflab's default form is another
    solver (all stages in the interpolant)."""
    process, data, x_T = mixture()
    ts = time_grid(process, n, spacing)
    scheduler = set_grid(diffusers.DPMSolverSinglestepScheduler(
        num_train_timesteps=1000, solver_order=order, algorithm_type="dpmsolver++",
        solver_type="midpoint", final_sigmas_type="zero"), process, ts)
    out = run_scheduler(scheduler, data, x_T, ts, scale=False)
    opts = {"order": order, "data_prediction": True, "remainder": "last", "steep_guard": False}
    ours = dpm_solver(data, x_T, ts, form="midpoint", **opts)
    torch.testing.assert_close(out.double(), ours, rtol=2e-5, atol=2e-5)
    other = dpm_solver(data, x_T, ts, **opts)
    assert float((out.double() - other).abs().max()) > 1e-4  # the forms differ
