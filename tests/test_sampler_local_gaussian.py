"""The local-Gaussian multistep sampler against exact mathematics: exact on isotropic Gaussian
data at any grid and NFE (both ways), DDIM, DPM-Solver++(2M) and UniPC bh2 with the fit off,
its orders on a mixture (one more with the corrector), and per-example fits."""

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianData, GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    check_sampler_options,
    ddim,
    dpmpp_2m,
    local_gaussian,
    local_unipc,
    reference_solution,
    time_grid,
    unipc_bh2,
)
from difflab.samplers.unipc import unipc

pytestmark = pytest.mark.usefixtures("one_thread")


def isotropic(process, shape=(5,), std=0.7):
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    return GaussianData(process, mu, torch.full(shape, std, dtype=torch.float64))


def start(data, n=16, seed=1):
    p = data.process
    g = torch.Generator().manual_seed(seed)
    shape = data.sample(1).shape[1:]
    return torch.randn((n, *shape), generator=g, dtype=torch.float64) * p.sigma(p.t_max)


@pytest.mark.parametrize("schedule", ["vpsde", "linear", "cosine"])
@pytest.mark.parametrize("spacing", ["trailing", "logsnr", "karras"])
@pytest.mark.parametrize("options", [{}, {"order": 1}, {"order": 3}, {"corrected_end": False},
                                     {"corrector": True}, {"corrector": True, "order": 1},
                                     {"corrector": True, "order": 3}])
def test_exact_on_isotropic_gaussian_data_at_any_nfe(schedule, spacing, options):
    """The first step is redone with the fitted variance and the rest is the fitted Gaussian's
    own flow: the closed-form PF-ODE end to rounding at 2, 3 and 5 steps (the cosine trailing
    grid starts at sigma~ = 2e4, where x0_hat is computed without cancellation)."""
    data = isotropic(make_process(schedule))
    x_T = start(data)
    p = data.process
    exact = data.ode_solution(x_T, p.t_max, p.t_min)
    for n in (2, 3, 5):
        if spacing == "trailing" and schedule == "vpsde":
            continue  # trailing picks of a 1000-level table: the DDPM schedules
        out = local_gaussian(data, x_T, time_grid(p, n, spacing), **options)
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("corrector", [False, True])
def test_inversion_is_exact_on_isotropic_gaussian_data(corrector):
    """On a rising grid the same steps run upwards and land on the exact noisy state."""
    data = isotropic(make_process("vpsde"))
    p = data.process
    x0 = data.sample(8, torch.Generator().manual_seed(2))
    ts = time_grid(p, 6, "logsnr")[:-1].flip(0)
    start_x = data.ode_solution(x0, p.t_min, ts[0])
    out = local_gaussian(data, start_x, ts, corrector=corrector)
    torch.testing.assert_close(out, data.ode_solution(start_x, ts[0], ts[-1]), rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize("spacing", ["logsnr", "trailing"])
def test_without_the_fit_it_is_ddim_and_dpmpp_2m(spacing):
    """fit="none" keeps u = 0: order 1 is DDIM and order 2 DPM-Solver++(2M), midpoint form."""
    p = make_process("linear")
    data = GaussianMixture(p, torch.randn(3, 4, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3]))
    x_T = start(data)
    ts = time_grid(p, 7, spacing)
    torch.testing.assert_close(local_gaussian(data, x_T, ts, fit="none", order=1),
                               ddim(data, x_T, ts), rtol=0, atol=1e-11)
    torch.testing.assert_close(local_gaussian(data, x_T, ts, fit="none"),
                               dpmpp_2m(data, x_T, ts), rtol=0, atol=1e-11)
    # and with the fit it is another method on this non-Gaussian data
    assert float((local_gaussian(data, x_T, ts) - dpmpp_2m(data, x_T, ts)).abs().max()) > 1e-4


@pytest.mark.parametrize("spacing", ["logsnr", "trailing"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_with_the_corrector_and_without_the_fit_it_is_unipc_bh2(spacing, order):
    """UniC in the shifted time with u = 0 is UniPC bh2's corrector (B(h) = e^h - 1 with two
    nodes, the exact polynomial integral with more), so the run is unipc_bh2 of that order
    (order 3: UniP-3 without the corrector too); local_unipc is local_gaussian with the
    corrector."""
    p = make_process("linear")
    data = GaussianMixture(p, torch.randn(3, 4, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3]))
    x_T = start(data)
    ts = time_grid(p, 7, spacing)
    torch.testing.assert_close(local_unipc(data, x_T, ts, fit="none", order=order),
                               unipc_bh2(data, x_T, ts, order=order), rtol=0, atol=1e-11)
    torch.testing.assert_close(local_unipc(data, x_T, ts, order=order),
                               local_gaussian(data, x_T, ts, order=order, corrector=True),
                               rtol=0, atol=0)
    corrected = local_unipc(data, x_T, ts, order=order)
    assert float((corrected - local_gaussian(data, x_T, ts, order=order)).abs().max()) > 1e-4
    if order == 3:
        torch.testing.assert_close(local_gaussian(data, x_T, ts, fit="none", order=3),
                                   unipc(data, x_T, ts, order=3, variant="bh2",
                                         corrector=False), rtol=0, atol=1e-11)


@pytest.mark.parametrize("order,corrector,steps,slope", [(1, False, (16, 32, 64), 1),
                                                         (2, False, (16, 32, 64), 2),
                                                         (3, False, (16, 32, 64), 3),
                                                         (1, True, (32, 64, 128), 2),
                                                         (2, True, (16, 32, 64), 3),
                                                         (3, True, (24, 48, 96), 3)])
def test_converges_at_its_order_on_a_mixture(order, corrector, steps, slope):
    """Anisotropic, overlapping components (no Gaussian fit is exact): error against the
    float64 DOP853 flow falls at the method's order (one more with the corrector) on log-SNR
    grids down to sigma~ = 1e-3; order 3 ends with a second-order step, whose local error
    keeps it at 3 with the corrector too."""
    p = make_process("vpsde")
    g = torch.Generator().manual_seed(5)
    data = GaussianMixture(p, 0.8 * torch.randn(3, 3, generator=g, dtype=torch.float64),
                           0.2 + 0.4 * torch.rand(3, 3, generator=g, dtype=torch.float64))
    x_T = start(data, n=8)
    ref = reference_solution(data, x_T, tol=1e-12, sigma_end=1e-5)
    errs = [float((local_gaussian(data, x_T, time_grid(p, n, "logsnr", sigma_min=1e-3),
                                  order=order, corrector=corrector) - ref).pow(2).mean().sqrt())
            for n in steps]
    fitted = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(fitted + slope) < 0.3, (errs, fitted)


def test_each_example_has_its_own_fit():
    """u is fitted per example: a batch gives each image what it gives alone (image-shaped
    data, 4-D x), and an isotropic Gaussian image is still exact."""
    data = isotropic(make_process("cosine"), shape=(2, 3, 3), std=0.4)
    x_T = start(data, n=4)
    ts = time_grid(data.process, 4, "trailing")
    batch = local_gaussian(data, x_T, ts)
    alone = torch.cat([local_gaussian(data, x_T[i:i + 1], ts) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)
    batch_c = local_unipc(data, x_T, ts)
    alone_c = torch.cat([local_unipc(data, x_T[i:i + 1], ts) for i in range(4)])
    torch.testing.assert_close(batch_c, alone_c, rtol=0, atol=1e-12)
    p = data.process
    torch.testing.assert_close(batch, data.ode_solution(x_T, p.t_max, p.t_min), rtol=0,
                               atol=1e-9)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="order"):
        check_sampler_options("local_gaussian", {"order": 4})
    with pytest.raises(ValueError, match="fit"):
        check_sampler_options("local_gaussian", {"fit": "three_point"})
