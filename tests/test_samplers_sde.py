"""Stochastic samplers reproduce a Gaussian mixture: their sliced Wasserstein distance to true
samples is at the level of the distance between two independent true sample sets."""

import functools

import pytest
import torch

from difflab.analytic import GaussianMixture, sliced_wasserstein
from difflab.process import make_process
from difflab.samplers import (
    annealed_langevin,
    ddpm,
    dpmpp_sde,
    euler_maruyama,
    heun,
    pc,
    time_grid,
)

N = 3000


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(process):
    mu = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
    return GaussianMixture(process, mu, torch.tensor([0.2, 0.3, 0.25], dtype=torch.float64),
                           torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def sw(a, b):
    return sliced_wasserstein(a, b, 64, torch.Generator().manual_seed(0))


@functools.cache
def baseline(name):
    """Distance between independent true sample sets (the largest of three pairs)."""
    data = mixture(make_process(name))
    pairs = [(data.sample(N, torch.Generator().manual_seed(s)),
              data.sample(N, torch.Generator().manual_seed(s + 50))) for s in range(3)]
    return max(sw(a, b) for a, b in pairs)


STOCHASTIC = [
    ("euler_maruyama", euler_maruyama, 200, "logsnr", {}),
    ("dpmpp_sde", dpmpp_sde, 40, "logsnr", {}),
    ("pc", pc, 100, "logsnr", {"snr": 0.05}),
    ("annealed_langevin", annealed_langevin, 60, "logsnr", {"n_steps": 20}),
    ("heun_churn", heun, 40, "karras", {"churn": 10.0}),
    ("ddpm", ddpm, 100, None, {}),
]


@pytest.mark.parametrize("schedule", ["cosine", "vpsde"])
@pytest.mark.parametrize("label,sampler,steps,spacing,opts", STOCHASTIC,
                         ids=[s[0] for s in STOCHASTIC])
def test_reproduces_the_mixture(label, sampler, steps, spacing, opts, schedule):
    process = make_process(schedule)
    data = mixture(process)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 2, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    out = sampler(data, x_T, time_grid(process, steps, spacing), g, **opts)
    truth = data.sample(N, torch.Generator().manual_seed(99))
    assert sw(out, truth) < 1.5 * baseline(schedule), (label, sw(out, truth), baseline(schedule))


def test_detects_a_wrong_distribution():
    """The criterion has power: too few Euler-Maruyama steps fail it."""
    process = make_process("cosine")
    data = mixture(process)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 2, generator=g, dtype=torch.float64)
    out = euler_maruyama(data, x_T, time_grid(process, 4, "logsnr"), g)
    assert sw(out, data.sample(N, torch.Generator().manual_seed(99))) > 1.5 * baseline("cosine")


def test_sliced_wasserstein_properties():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sw(a, a) == 0.0
    assert abs(sw(a, a + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
               - (1 / 3) ** 0.5) < 0.1  # E[(u . e1)^2] = 1/3 for a random unit u
