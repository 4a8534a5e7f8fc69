"""noisy_end: the last step lands on the grid's last, still noisy, level (e.g. the table's
first level, alpha_bar_0) and x there is returned, as diffusers' schedulers end:

- unipc (bh1/bh2): UniPC with final_sigmas_type="sigma_min" and lower_order_final -- the last
  step is a first-order UniP (DDIM) step (Zhao et al. 2023, eq. 8 with B(h) = h for UniC);
- plms: every step, the last one too, is the PLMS step of its place in the warm-up -- PNDM
  with set_alpha_to_one=False;
- ddim: the DDIM update to that level -- DDIM with set_alpha_to_one=False, or whenever its
  step count does not divide T."""

import math

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import SAMPLERS, CountingDenoiser, check_sampler_options, ddim
from difflab.samplers.multistep import plms
from difflab.samplers.unipc import unipc_bh1

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    proc = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g, dtype=torch.float64)
    std = torch.full((3, 5), 0.05, dtype=torch.float64)
    return GaussianMixture(proc, mu, std, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))


def start(proc, t=1000.0, n=6, seed=1):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * float(proc.sigma(torch.tensor(t, dtype=torch.float64)))


def test_unipc_two_steps_by_hand():
    """UniP-1 to t1, UniC-1 (bh1: x += alpha_1 h/2 (m_1 - m_0)) at t1, UniP-1 to t2 = 1."""
    model = mixture()
    proc = model.process
    ts = torch.tensor([700.0, 40.0, 1.0], dtype=torch.float64)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * float(proc.sigma(ts[0]))
    a = [float(proc.alpha(t)) for t in ts]
    s = [float(proc.sigma(t)) for t in ts]
    lam = [math.log(ai / si) for ai, si in zip(a, s, strict=True)]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    m0 = model(x, ts[0]).x0
    x1 = s[1] / s[0] * x + a[1] * -math.expm1(-h0) * m0
    m1 = model(x1, ts[1]).x0
    x1 = x1 + a[1] * h0 / 2 * (m1 - m0)
    want = s[2] / s[1] * x1 + a[2] * -math.expm1(-h1) * m1
    counted = CountingDenoiser(model)
    got = unipc_bh1(counted, x, ts, noisy_end=True)
    assert counted.nfe == 2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def sigma_tilde(proc, ts):
    return (-0.5 * proc.log_snr(ts)).exp().tolist()


def test_plms_three_steps_by_hand():
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


@pytest.mark.parametrize("n", [4, 5, 10])
def test_plms_equals_diffusers_pndm(n):
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


def test_ddim_two_steps_by_hand():
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


@pytest.mark.parametrize("name", ["ddim", "plms", "unipc_bh1", "unipc_bh2"])
def test_a_grid_ending_at_zero_ends_at_the_first_level(name):
    """Every default grid ends at sigma = 0: there noisy_end ends at the process's first level
    instead (t = 1, alpha_bar_0 of a DDPM table), so the option works from the command line;
    a last noisy time already at that level stays the end (the zero is dropped); a grid with no
    noisy level to end at is a one-line ValueError."""
    sampler = SAMPLERS[name]
    model = mixture()
    x = start(model.process)
    one = torch.ones(1, dtype=torch.float64)
    ts = torch.tensor([1000.0, 500.0, 200.0, 50.0, 0.0], dtype=torch.float64)
    at_first = torch.cat([ts[:-1], one])
    assert torch.equal(sampler(model, x, ts, noisy_end=True),
                       sampler(model, x, at_first, noisy_end=True))
    assert torch.equal(sampler(model, x, torch.cat([at_first, 0 * one]), noisy_end=True),
                       sampler(model, x, at_first, noisy_end=True))
    assert not torch.equal(sampler(model, x, ts), sampler(model, x, ts, noisy_end=True))
    with pytest.raises(ValueError, match="noisy_end"):
        sampler(model, x, torch.tensor([1.0, 0.0], dtype=torch.float64), noisy_end=True)
