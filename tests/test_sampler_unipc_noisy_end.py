"""unipc noisy_end: diffusers' UniPC end with final_sigmas_type="sigma_min" and
lower_order_final -- the last step is a first-order UniP (DDIM) step to the grid's last,
still noisy, level, returned there (Zhao et al. 2023, eq. 8 with B(h) = h for UniC)."""

import math

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import CountingDenoiser
from difflab.samplers.unipc import unipc_bh1

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture():
    proc = make_process("linear")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g, dtype=torch.float64)
    std = torch.full((3, 5), 0.05, dtype=torch.float64)
    return GaussianMixture(proc, mu, std, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))


def test_two_steps_by_hand():
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


def test_zero_end_refused():
    """A grid ending at sigma = 0 has no noisy last level: a one-line ValueError."""
    model = mixture()
    ts = torch.tensor([999.0, 500.0, 200.0, 50.0, 0.0], dtype=torch.float64)
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(ValueError, match="noisy_end"):
        unipc_bh1(model, x, ts, noisy_end=True)
    out = unipc_bh1(model, x * float(model.process.sigma(999.0)),
                    torch.cat([ts[:-1], torch.ones(1, dtype=torch.float64)]), noisy_end=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
