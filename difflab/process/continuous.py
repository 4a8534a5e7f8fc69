"""Continuous-time variance-preserving processes on t in [0, 1].

- ``VPSDE``: the variance-preserving SDE of Song et al. 2021 with linear beta(t) =
  beta_min + t (beta_max - beta_min); alpha_bar(t) = exp(-int_0^t beta(s) ds)
  = exp(-beta_min t - (beta_max - beta_min) t^2 / 2). With beta_min = 0.1, beta_max = 20 it is
  the continuous limit of DDPM's linear schedule (T = 1000).
- ``CosineRates``: signal rate cos(theta(t)), noise rate sin(theta(t)) with
  theta(t) = (1 - t) arccos(s_max) + t arccos(s_min) (the Keras DDIM example's schedule);
  lambda(t) = 2 log cot(theta(t)).
- ``ZeroTerminalSNR``: the rescaling of Lin et al. 2024 applied to any process: alpha is shifted
  and scaled so alpha(t_max) = 0 while alpha(t_min) is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Process, as_time


class VPSDE(Process):
    """VP SDE with linear beta(t) (score-SDE, Song et al. 2021, eq. 11)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def to_config(self) -> dict[str, Any]:
        return {"kind": "vpsde", "beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t: Tensor | float) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        t = as_time(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def log_snr(self, t: Tensor | float) -> Tensor:
        log_ab = self.log_alpha_bar(t)
        return log_ab - torch.log(-torch.expm1(log_ab))

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 0) -> Tensor:
        # alpha_bar = sigmoid(lambda), so -log alpha_bar = softplus(-lambda) = b t + d t^2 / 2.
        c = torch.nn.functional.softplus(-as_time(lam))
        d = self.beta_max - self.beta_min
        if d == 0:
            return c / self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c)) / d


class CosineRates(Process):
    """signal = cos(theta(t)), noise = sin(theta(t)); theta linear in t."""

    def __init__(self, s_max: float = 0.95, s_min: float = 0.02):
        if not 0 <= s_min < s_max <= 1:
            raise ValueError(f"need 0 <= s_min < s_max <= 1, got s_min={s_min}, s_max={s_max}")
        self.s_max, self.s_min = s_max, s_min
        self.theta_0, self.theta_1 = math.acos(s_max), math.acos(s_min)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "cosine_rates", "s_max": self.s_max, "s_min": self.s_min}

    def theta(self, t: Tensor | float) -> Tensor:
        t = as_time(t)
        return (1 - t) * self.theta_0 + t * self.theta_1

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        th = self.theta(t)
        return torch.cos(th), torch.sin(th)

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * torch.log(torch.tan(self.theta(t)))

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 0) -> Tensor:
        th = torch.atan(torch.exp(-0.5 * as_time(lam)))
        return (th - self.theta_0) / (self.theta_1 - self.theta_0)


class ZeroTerminalSNR(Process):
    """Any process rescaled so that alpha(t_max) = 0 (Lin et al. 2024, Algorithm 1)."""

    def __init__(self, inner: Process):
        self.inner = inner
        self.t_min, self.t_max = inner.t_min, inner.t_max
        self.is_discrete = inner.is_discrete
        self._a0 = float(inner.alpha(inner.t_min))
        self._aT = float(inner.alpha(inner.t_max))

    def to_config(self) -> dict[str, Any]:
        return {**self.inner.to_config(), "zero_terminal_snr": True}

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        a = (self.inner.alpha(t) - self._aT) * self._a0 / (self._a0 - self._aT)
        return a, (1 - a**2).clamp(min=0).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        a, s = self.alpha_sigma(t)
        return 2 * (torch.log(a) - torch.log(s))

    def c_noise(self, t: Tensor) -> Tensor:
        return self.inner.c_noise(t)

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        return self.inner.sample_t(n, generator, device)
