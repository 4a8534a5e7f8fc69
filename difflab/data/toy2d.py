"""Two-dimensional toy distributions for quick experiments and plots.

Every sampler has the signature ``(n, generator=None) -> Tensor[n, 2]`` (float32, CPU), draws
all of its randomness from ``generator`` (so a seeded generator reproduces the samples
exactly), and is scaled so that each coordinate has mean near 0 and standard deviation near 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import DataError

ToySampler = Callable[[int, "torch.Generator | None"], Tensor]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"invalid number of samples n={n!r}: must be a non-negative int")
    return n


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float32)


def _randn(*shape: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32)


def swiss_roll(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A 2-D Swiss roll: the spiral ``t (cos t, sin t)`` for ``t`` in ``[1.5 pi, 4.5 pi]``
    plus a little Gaussian noise, centred and scaled to roughly unit variance."""
    _check_n(n)
    t = 1.5 * math.pi * (1.0 + 2.0 * _rand(n, generator))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    x = x + 0.5 * _randn(n, 2, generator=generator)
    # Mean and std of the noiseless spiral's coordinates (uniform t), measured numerically.
    return ((x - torch.tensor([1.98, 0.22])) / 6.8).contiguous()


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaving half circles (as in scikit-learn's ``make_moons``) with noise 0.1,
    each point on either moon with probability 1/2, centred and scaled to unit scale."""
    _check_n(n)
    theta = math.pi * _rand(n, generator)
    lower = _rand(n, generator) < 0.5
    x = torch.cos(theta)
    y = torch.sin(theta)
    x = torch.where(lower, 1.0 - x, x)
    y = torch.where(lower, 0.5 - y, y)
    pts = torch.stack([x, y], dim=1) + 0.1 * _randn(n, 2, generator=generator)
    return ((pts - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])).contiguous()


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A mixture of 8 equally weighted Gaussians (std 0.1) centred on a circle of radius
    sqrt(2) at angles ``k pi / 4``, so each coordinate has variance about 1."""
    _check_n(n)
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.to(torch.float32) * (math.pi / 4.0)
    centres = math.sqrt(2.0) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return (centres + 0.1 * _randn(n, 2, generator=generator)).contiguous()


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the "black" cells of a 4x4 checkerboard covering ``[-2, 2]^2`` (cells of
    side 1 whose integer corner ``(i, j)`` has ``i + j`` even); coordinate std is about 1.15."""
    _check_n(n)
    x = 4.0 * _rand(n, generator) - 2.0
    col = torch.floor(x)
    k = torch.randint(0, 2, (n,), generator=generator).to(torch.float32)
    row = -2.0 + 2.0 * k + torch.remainder(col, 2.0)
    y = row + _rand(n, generator)
    return torch.stack([x, y], dim=1).contiguous()


TOY_DATASETS: dict[str, ToySampler] = {
    "swiss_roll": swiss_roll,
    "moons": two_moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}

_ALIASES = {"two_moons": "moons", "eight_gaussians": "8gaussians", "swissroll": "swiss_roll"}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` samples ``[n, 2]`` from the toy distribution called ``name``.

    Valid names are the keys of :data:`TOY_DATASETS` (the function names ``two_moons`` and
    ``eight_gaussians`` are accepted as aliases).

    Raises:
        DataError: unknown ``name`` (the message lists the valid names) or bad ``n``.
    """
    key = _ALIASES.get(name, name)
    if key not in TOY_DATASETS:
        raise DataError(
            f"unknown toy dataset {name!r}: valid names are {sorted(TOY_DATASETS)}"
        )
    return TOY_DATASETS[key](n, generator)
