"""Editing against exact Gaussian mathematics: inversion order, SDEdit limits, inpainting."""

import math

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.editing import (
    ddim_invert,
    inpaint,
    interpolate,
    ode_invert,
    reconstruct,
    repaint_path,
    sdedit,
    slerp,
    truncated_grid,
    variations,
)
from difflab.process import make_process
from difflab.samplers import ddim, ddpm, time_grid

DIM = 6


def gaussian(name="cosine"):
    process = make_process(name)
    mu = torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)
    std = torch.linspace(0.3, 0.9, DIM, dtype=torch.float64)
    return GaussianData(process, mu, std)


def mixture(name="cosine"):
    """Three well-separated components: the denoiser and the ODE flow are non-linear."""
    g = torch.Generator().manual_seed(7)
    mu = 1.5 * torch.randn(3, DIM, generator=g, dtype=torch.float64)
    return GaussianMixture(make_process(name), mu, torch.tensor([0.2, 0.3, 0.25]))


def data_points(data, n=32, seed=0):
    return data.sample(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["linear", "vpsde"])
@pytest.mark.parametrize("make", [gaussian, mixture])
def test_inversion_then_reconstruction_converges_at_first_order(name, make):
    data = make(name)
    x0 = data_points(data)
    steps, errs = [25, 50, 100, 200], []
    for n in steps:
        ts = time_grid(data.process, n)
        errs.append(float((reconstruct(data, ddim_invert(data, x0, ts), ts) - x0)
                          .pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert errs[-1] < 0.05 and -1.3 < slope < -0.7, (errs, slope)


@pytest.mark.parametrize("method,order,steps", [("ddim", 1, [50, 100, 200, 400]),
                                                ("heun", 2, [40, 80, 160, 320])])
def test_every_inversion_method_converges_at_its_order(method, order, steps):
    """Round-trip error falls at least at the solver's order (Heun's forward and backward
    errors cancel at leading order, so its round trip falls faster, about h^3)."""
    data = mixture("vpsde")
    x0 = data_points(data, n=16)
    errs = []
    for n in steps:
        ts = time_grid(data.process, n, "logsnr")
        z = ode_invert(data, x0, ts, method)
        errs.append(float((reconstruct(data, z, ts, method) - x0).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope < -order + 0.3, (errs, slope)
    if order == 1:
        assert slope > -1.3, (errs, slope)


def test_rk45_inversion_round_trip_is_within_tolerance():
    data = mixture("vpsde")
    x0 = data_points(data, n=8)
    ts = time_grid(data.process, 200, "logsnr")
    z = ode_invert(data, x0, ts, "rk45", rtol=1e-7, atol=1e-7)
    rec = reconstruct(data, z, ts, "rk45", rtol=1e-7, atol=1e-7)
    # the only first-order parts are the two end steps on the fine end of the grid
    assert float((rec - x0).pow(2).mean().sqrt()) < 1e-3
    with pytest.raises(ValueError, match="unknown inversion method"):
        ode_invert(data, x0, ts, "ddpm")


def test_inverted_noise_is_standard_normal():
    data = gaussian()
    z = ddim_invert(data, data_points(data, n=4000), time_grid(data.process, 100))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_sdedit_strength_zero_is_identity_and_one_forgets_the_input():
    data = gaussian()
    x0 = data_points(data, n=8)
    assert torch.equal(sdedit(data, x0, 0.0, steps=20), x0)
    assert len(truncated_grid(data.process, 20, 0.5)) == 11
    far = torch.full((6000, DIM), 4.0, dtype=torch.float64)  # far from the data
    out = sdedit(data, far, 1.0, ddim, 100, torch.Generator().manual_seed(0))
    se = data.std / math.sqrt(len(out))
    assert bool(((out.mean(0) - data.mu).abs() < 5 * se + 0.01).all())
    assert bool(((out.std(0) / data.std - 1).abs() < 0.05).all())
    with pytest.raises(ValueError, match="strength"):
        sdedit(data, x0, 1.5)


def test_variations_are_reproducible_per_seed():
    data = gaussian()
    x0 = data_points(data, n=1)
    a = variations(data, x0, [1, 2, 3], 0.5, ddpm, 20)
    b = variations(data, x0, [3], 0.5, ddpm, 20)
    torch.testing.assert_close(a[2:], b)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("jumps", [(0, 1), (10, 2)])
def test_inpainting_keeps_known_pixels_exactly_and_fills_the_rest(jumps):
    data = gaussian()
    n = 2000
    x_known = data_points(data, n=n, seed=3)
    mask = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.float64)  # 1 = regenerate
    ts = time_grid(data.process, 250)  # DDPM's beta_tilde needs many steps for exact variance
    out = inpaint(data, x_known, mask, ts, torch.Generator().manual_seed(1),
                  jump_length=jumps[0], jump_n_sample=jumps[1])
    keep = mask == 0
    assert torch.equal(out[:, keep], x_known[:, keep])
    # independent dimensions: the filled ones follow the data marginal
    gen = out[:, ~keep]
    mu, std = data.mu[~keep], data.std[~keep]
    assert bool(((gen.mean(0) - mu).abs() < 5 * std / math.sqrt(n) + 0.01).all())
    assert bool(((gen.std(0) / std - 1).abs() < 0.06).all())


def test_repaint_path():
    assert repaint_path(4) == [0, 1, 2, 3, 4]
    path = repaint_path(6, jump_length=2, jump_n_sample=2)
    assert path[0] == 0 and path[-1] == 6
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:], strict=False))
    assert path.count(2) == 2 + 1 and len(path) == 6 + 2 * 2 * 2 + 1


def test_slerp_and_interpolation_end_points():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    e0 = torch.zeros(1, 2)
    e0[0, 0] = 1
    e1 = torch.zeros(1, 2)
    e1[0, 1] = 1
    assert float(slerp(e0, e1, 0.5).norm()) == pytest.approx(1.0)
    data = gaussian()
    xa, xb = data_points(data, 1, 1), data_points(data, 1, 2)
    ts = time_grid(data.process, 50)
    out = interpolate(data, xa, xb, torch.tensor([0.0, 0.5, 1.0]), ts)
    torch.testing.assert_close(out[0:1], reconstruct(data, ddim_invert(data, xa, ts), ts))
    assert out.shape == (3, DIM)


class ExactNet(torch.nn.Module):
    """The exact Gaussian denoiser exposed as a raw network of a given prediction type."""

    def __init__(self, data, kind):
        super().__init__()
        self.data, self.kind = data, kind
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, c_noise, labels=None):
        from difflab.parameterization import output_from_prediction
        p = self.data.process
        t = c_noise.double() * (p.t_max - p.t_min) / 1000 + p.t_min
        alpha, sigma = p.alpha_sigma(t)
        return output_from_prediction(self.data(x, t), alpha, sigma, self.kind)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_inversion_works_for_every_prediction_type(kind):
    from difflab.parameterization import Denoiser
    data = gaussian("linear")
    den = Denoiser(ExactNet(data, kind), data.process, kind)
    x0 = data_points(data, n=16)
    ts = time_grid(data.process, 100)
    ref = reconstruct(data, ddim_invert(data, x0, ts), ts)
    rec = reconstruct(den, ddim_invert(den, x0, ts), ts)
    torch.testing.assert_close(rec, ref, rtol=1e-6, atol=1e-6)
    assert float((rec - x0).pow(2).mean().sqrt()) < 0.05


def test_inpainting_a_mixture_keeps_known_pixels_exactly():
    data = mixture()
    x_known = data_points(data, n=64, seed=4)
    mask = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64)
    out = inpaint(data, x_known, mask, time_grid(data.process, 20),
                  torch.Generator().manual_seed(0), jump_length=5, jump_n_sample=2)
    assert torch.equal(out[:, mask == 0], x_known[:, mask == 0])
    assert torch.isfinite(out).all() and not torch.equal(out[:, mask == 1],
                                                         x_known[:, mask == 1])
