"""The variance-exploding process of EDM: x_t = x_0 + t eps, i.e. alpha = 1, sigma(t) = t.

Karras et al. 2022 (EDM, Table 1) parameterise time by the noise level itself, sigma(t) = t
with s(t) = 1, on t in [0, sigma_max]; Song et al. 2021's VE SDE is the same marginal path.
lambda(t) = -2 ln t, so lambda = +inf at t = 0 (data). Every sampler works on it through
alpha and sigma (the initial state of ``generate`` is sigma_max * N(0, I)); use the ``karras``
grid spacing (rho = 7) for EDM's sampling schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Process, as_time


class VEProcess(Process):
    """alpha(t) = 1, sigma(t) = t on [0, sigma_max] (Karras et al. 2022)."""

    def __init__(self, sigma_max: float = 80.0):
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be positive, got {sigma_max}")
        self.sigma_max = float(sigma_max)
        self.t_min, self.t_max = 0.0, self.sigma_max

    def to_config(self) -> dict[str, Any]:
        return {"kind": "ve", "sigma_max": self.sigma_max}

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        return torch.ones_like(t), t.clone()

    def alpha_sigma_dt(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def rates_from_log_snr(self, lam: Tensor | float) -> tuple[Tensor, Tensor]:
        lam = as_time(lam)
        return torch.ones_like(lam), torch.exp(-0.5 * lam)

    def log_alpha_slope(self, lam: Tensor | float) -> Tensor:
        return torch.zeros_like(as_time(lam))  # alpha = 1

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * torch.log(as_time(t))

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 0) -> Tensor:
        return torch.exp(-0.5 * as_time(lam)).clamp(max=self.sigma_max)
