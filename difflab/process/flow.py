"""The rectified-flow process: x_t = (1 - t) x_0 + t eps on t in [0, 1].

Liu et al. 2022 ("Flow straight and fast", eq. 1) and Lipman et al. 2022 (flow matching with
the optimal-transport path, sigma_min = 0) interpolate linearly between data and noise:
alpha(t) = 1 - t, sigma(t) = t. It is not variance preserving (alpha + sigma = 1), so it gives
its rates in closed form instead of through lambda (``Process.alpha_sigma``), exact at both
ends: alpha(1) = 0 (pure noise, zero terminal SNR) and sigma(0) = 0 (data). In terms of the
log-SNR lambda = 2 log((1 - t) / t), the noise level sigma~ = sigma / alpha = t / (1 - t), so

  t(lambda) = sigmoid(-lambda / 2),  alpha = sigmoid(lambda / 2),  sigma = sigmoid(-lambda / 2),

and d log alpha / d lambda = sigma / 2 (the drift of the probability-flow ODE in lambda-time).
The path's velocity is u = d x_t / dt = eps - x_0 (``alpha_sigma_dt`` = (-1, 1)), the target
of the ``flow`` prediction type; samplers start at t = 1 from x_1 = eps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Process, as_time


class RectifiedFlow(Process):
    """alpha(t) = 1 - t, sigma(t) = t on [0, 1] (Liu et al. 2022; Lipman et al. 2022)."""

    def to_config(self) -> dict[str, Any]:
        return {"kind": "rectified_flow"}

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        return 1 - t, t.clone()

    def alpha_sigma_dt(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = as_time(t)
        return torch.full_like(t, -1.0), torch.ones_like(t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        t = as_time(t)
        return 2 * (torch.log1p(-t) - torch.log(t))  # +inf at t = 0, -inf at t = 1

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 0) -> Tensor:
        return torch.sigmoid(-0.5 * as_time(lam))

    def rates_from_log_snr(self, lam: Tensor | float) -> tuple[Tensor, Tensor]:
        lam = as_time(lam)
        return torch.sigmoid(0.5 * lam), torch.sigmoid(-0.5 * lam)

    def log_alpha_slope(self, lam: Tensor | float) -> Tensor:
        return 0.5 * torch.sigmoid(-0.5 * as_time(lam))

    def c_noise(self, t: Tensor) -> Tensor:
        """1000 t: the network sees the time itself, scaled to the embedding's range."""
        return as_time(t) * 1000.0


__all__ = ["RectifiedFlow"]
