"""plms noisy_end: every step, the last one too, is the PLMS step of its place in the warm-up,
landing on the grid's last (noisy) level, where x is returned -- the end of diffusers' PNDM
(``set_alpha_to_one=False``: the last step lands on alpha_bar_0)."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser, check_sampler_options
from difflab.samplers.multistep import plms

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    proc = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g, dtype=torch.float64)
    std = torch.full((3, 5), 0.05, dtype=torch.float64)
    return GaussianMixture(proc, mu, std, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))


def start(proc, t, n=6, seed=1):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * float(proc.sigma(torch.tensor(t, dtype=torch.float64)))


def sigma_tilde(proc, ts):
    return (-0.5 * proc.log_snr(ts)).exp().tolist()


def test_three_steps_by_hand():
    """y = x / alpha: Euler, then AB2, then AB3 in sigma~ -- the last one onto ts[-1] = 1 (the
    first level), returned as alpha_1 y there; one evaluation per step."""
    model = mixture()
    proc = model.process
    ts = torch.tensor([800.0, 300.0, 60.0, 1.0], dtype=torch.float64)
    x = start(proc, 800.0)
    a = proc.alpha(ts).tolist()
    st = sigma_tilde(proc, ts)
    y = x / a[0]
    e0 = model(a[0] * y, ts[0]).eps
    y = y + (st[1] - st[0]) * e0
    e1 = model(a[1] * y, ts[1]).eps
    y = y + (st[2] - st[1]) * (1.5 * e1 - 0.5 * e0)
    e2 = model(a[2] * y, ts[2]).eps
    y = y + (st[3] - st[2]) * (23 * e2 - 16 * e1 + 5 * e0) / 12
    counted = CountingDenoiser(model)
    got = plms(counted, x, ts, noisy_end=True)
    assert counted.nfe == 3
    torch.testing.assert_close(got, a[3] * y, rtol=1e-12, atol=1e-12)
    assert check_sampler_options("plms", {"noisy_end": True}) == {"noisy_end": True}


def test_zero_end_refused():
    model = mixture()
    ts = torch.tensor([999.0, 500.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="noisy_end"):
        plms(model, start(model.process, 999.0), ts, noisy_end=True)


@pytest.mark.parametrize("n", [4, 5, 10])
def test_equals_diffusers_pndm(n):
    """With warm_start="heun" on diffusers' own levels (trailing timesteps k -> t = k + 1,
    ending at t = 1, i.e. alpha_bar_0) it is diffusers' PNDMScheduler(skip_prk_steps=True),
    which takes n + 1 evaluations for n steps."""
    diffusers = pytest.importorskip("diffusers")
    model = mixture()
    proc = model.process
    sched = diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                    beta_start=1e-4, beta_end=0.02, skip_prk_steps=True,
                                    timestep_spacing="trailing")
    sched.set_timesteps(n)
    x = start(proc, 1000.0, n=8, seed=3)
    xd = x.to(torch.float32)
    for k in sched.timesteps:
        eps = model(xd.to(torch.float64), float(k) + 1.0).eps.to(torch.float32)
        xd = sched.step(eps, k, xd).prev_sample
    levels = sorted({int(k) for k in sched.timesteps}, reverse=True)
    ts = torch.tensor([k + 1.0 for k in levels] + [1.0], dtype=torch.float64)
    counted = CountingDenoiser(model)
    got = plms(counted, x, ts, warm_start="heun", noisy_end=True)
    assert counted.nfe == len(sched.timesteps) == n + 1
    # diffusers runs on float32 tables: sigma~ differs by ~1e-4 relative at the ends
    torch.testing.assert_close(got, xd.to(torch.float64), rtol=3e-4, atol=2e-5)
    wrong = plms(model, x, ts, noisy_end=True)  # the AB warm start instead: clearly not it
    assert float((wrong - got).abs().max()) > 100 * float((got - xd).abs().max())
