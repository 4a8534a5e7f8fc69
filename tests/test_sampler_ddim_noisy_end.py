"""ddim noisy_end: the last step is the DDIM update to the grid's last (noisy) level and x
there is returned -- where diffusers' DDIM ends with ``set_alpha_to_one=False`` (or whenever
its step count does not divide T: its last step then lands on alpha_bar_0)."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, check_sampler_options, ddim

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    proc = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g, dtype=torch.float64)
    std = torch.full((3, 5), 0.05, dtype=torch.float64)
    return GaussianMixture(proc, mu, std, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))


def start(proc, n=6, seed=1):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * float(proc.sigma(torch.tensor(1000.0, dtype=torch.float64)))


def test_two_steps_by_hand():
    model = mixture()
    proc = model.process
    ts = torch.tensor([1000.0, 200.0, 1.0], dtype=torch.float64)
    x = start(proc)
    a, s = proc.alpha_sigma(ts)
    p0 = model(x, ts[0])
    x1 = a[1] * p0.x0 + s[1] * p0.eps
    p1 = model(x1, ts[1])
    counted = CountingDenoiser(model)
    got = ddim(counted, x, ts, noisy_end=True)
    assert counted.nfe == 2
    torch.testing.assert_close(got, a[2] * p1.x0 + s[2] * p1.eps, rtol=1e-12, atol=1e-12)
    assert check_sampler_options("ddim", {"noisy_end": True}) == {"noisy_end": True}
    # off by default: x0_hat of the last evaluation, as before
    assert torch.equal(ddim(model, x, ts), p1.x0)


def test_zero_end_refused():
    model = mixture()
    ts = torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="noisy_end"):
        ddim(model, start(model.process), ts, noisy_end=True)


@pytest.mark.parametrize("n", [5, 10])
def test_equals_diffusers_ddim_ending_at_alpha_bar_0(n):
    """On diffusers' trailing levels (k -> t = k + 1) plus its first level, it is
    DDIMScheduler(set_alpha_to_one=False), whose last step lands on alpha_bar_0."""
    diffusers = pytest.importorskip("diffusers")
    model = mixture()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                    beta_start=1e-4, beta_end=0.02, set_alpha_to_one=False,
                                    clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(n)
    x = start(model.process, n=8, seed=3)
    xd = x.to(torch.float32)
    for k in sched.timesteps:
        eps = model(xd.to(torch.float64), float(k) + 1.0).eps.to(torch.float32)
        xd = sched.step(eps, k, xd).prev_sample
    ts = torch.tensor([float(k) + 1.0 for k in sched.timesteps] + [1.0], dtype=torch.float64)
    got = ddim(model, x, ts, noisy_end=True)
    # diffusers runs on float32 tables: sigma~ differs by ~1e-4 relative at the ends
    torch.testing.assert_close(got, xd.to(torch.float64), rtol=3e-4, atol=2e-5)
    clean = ddim(model, x, ts)  # the default x0_hat end is measurably elsewhere
    assert float((clean - got).abs().max()) > 100 * float((got - xd).abs().max())
