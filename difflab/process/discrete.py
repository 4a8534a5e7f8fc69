"""Discrete beta schedules over T steps (DDPM) and their continuous extension.

With i = (t - 1) / (T - 1) for t = 1..T:

- ``linear``        beta_t = beta_1 (1 - i) + beta_T i                     (Ho et al. 2020)
- ``quadratic``     beta_t = (sqrt(beta_1) (1 - i) + sqrt(beta_T) i)^2
- ``scaled_linear`` ``quadratic`` with beta_1 = 0.00085, beta_T = 0.012      (Stable Diffusion)
- ``cosine``        alpha_bar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2),
                    beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), 0.999)
                    (Nichol & Dhariwal 2021, eq. 17)
- ``sigmoid``       beta_t = beta_1 + (beta_T - beta_1) * sigmoid(-6 + 12 i)  (GeoDiff, Xu et al.
                    2022)

alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s. In the ``Process`` notation,
alpha(t) = sqrt(alpha_bar_t), sigma(t) = sqrt(1 - alpha_bar_t).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .base import Process, as_time

BetaSchedule = Literal["linear", "quadratic", "scaled_linear", "cosine", "sigmoid"]


def _ramp(T: int) -> Tensor:
    """i = (t - 1) / (T - 1) for t = 1..T, in float64."""
    return torch.linspace(0.0, 1.0, T, dtype=torch.float64)


def linear_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    i = _ramp(T)
    return beta_1 * (1 - i) + beta_T * i


def quadratic_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    i = _ramp(T)
    return (math.sqrt(beta_1) * (1 - i) + math.sqrt(beta_T) * i) ** 2


def scaled_linear_betas(T: int, beta_1: float = 0.00085, beta_T: float = 0.012) -> Tensor:
    return quadratic_betas(T, beta_1, beta_T)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    def alpha_bar(u: Tensor) -> Tensor:
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return f / math.cos(s / (1 + s) * math.pi / 2) ** 2

    t = torch.arange(1, T + 1, dtype=torch.float64)
    return (1 - alpha_bar(t / T) / alpha_bar((t - 1) / T)).clamp(max=max_beta)


def sigmoid_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    return beta_1 + (beta_T - beta_1) * torch.sigmoid(-6 + 12 * _ramp(T))


BETA_SCHEDULES = {
    "linear": linear_betas,
    "quadratic": quadratic_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0
    while alpha_bar_1 is unchanged; returns the matching betas (beta_T becomes 1)."""
    a = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    alpha_bar = a**2
    prev = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
    return 1 - alpha_bar / prev


class DiscreteProcess(Process):
    """A DDPM chain of T steps; t is the step index, t = 0 is the data.

    Between integer steps the log-SNR is interpolated linearly so any continuous-time sampler
    can use the schedule. On (0, 1), where lambda_0 = +inf, alpha_bar(t) = alpha_bar_1^t.
    Where a knot is infinite (zero terminal SNR), alpha is interpolated instead.
    """

    is_discrete = True
    t_min = 0.0

    def __init__(self, schedule: BetaSchedule = "linear", T: int = 1000,
                 zero_terminal_snr: bool = False, **schedule_args: float):
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; choose from "
                             f"{sorted(BETA_SCHEDULES)}")
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        self.schedule, self.T, self.zero_terminal_snr = schedule, T, zero_terminal_snr
        self.schedule_args = dict(schedule_args)
        betas = BETA_SCHEDULES[schedule](T, **schedule_args)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.t_max = float(T)
        self.betas = betas                               # beta_t, index t-1
        self.alphas = 1 - betas                          # alpha_t
        self.alpha_bar = torch.cumprod(self.alphas, 0)   # alpha_bar_t
        ab = self.alpha_bar
        # lambda_t at t = 0..T (lambda_0 = +inf); log1p keeps precision near alpha_bar = 1.
        lam = torch.log(ab) - torch.log1p(-ab)
        self._lam = torch.cat([torch.tensor([math.inf], dtype=torch.float64), lam])
        self._sqrt_ab = torch.cat([torch.ones(1, dtype=torch.float64), ab.sqrt()])
        self._device_tables: dict[str, tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The (lambda, sqrt(alpha_bar)) knots on ``device``, copied once: a copy from host
        memory makes the host wait for the device, which would stall every training step."""
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = (self._lam.to(device), self._sqrt_ab.to(device))
        return self._device_tables[key]

    def to_config(self) -> dict[str, Any]:
        return {"kind": "discrete", "schedule": self.schedule, "T": self.T,
                "zero_terminal_snr": self.zero_terminal_snr, **self.schedule_args}

    def log_snr(self, t: Tensor | float) -> Tensor:
        t = as_time(t).clamp(0.0, self.t_max)
        lam_tab, a_tab = self._tables(t.device)
        k = t.floor().long().clamp(max=self.T - 1)
        frac = t - k
        lo, hi = lam_tab[k], lam_tab[k + 1]
        lam = lo + frac * (hi - lo)
        # Alpha-space interpolation where a knot is infinite (first and ZTSNR last interval).
        a = a_tab[k] + frac * (a_tab[k + 1] - a_tab[k])
        lam_a = 2 * torch.log(a) - torch.log1p(-(a**2))
        first = k == 0  # alpha_bar(t) = alpha_bar_1^t on [0, 1]
        lam_first = t * torch.log(self.alpha_bar[0]) - torch.log(-torch.expm1(
            t * torch.log(self.alpha_bar[0])))
        lam = torch.where(torch.isfinite(hi) & torch.isfinite(lo), lam, lam_a)
        lam = torch.where(first, lam_first, lam)
        # Integer times (including t = T) read the table: no rounding from interpolation.
        exact = t == t.round()
        return torch.where(exact, lam_tab[t.round().long()], lam)

    def t_from_log_snr(self, lam: Tensor | float, iters: int = 80) -> Tensor:
        """Exact inverse of the interpolation above: in closed form (a table search and the
        inverse of each piece), or by bisection where alpha is interpolated (zero terminal SNR).
        """
        if self.zero_terminal_snr:
            return super().t_from_log_snr(lam, iters)
        lam = as_time(lam)
        table = self._lam.to(lam.device)
        desc = -table[1:]  # -lambda_t for t = 1..T, increasing
        k = torch.searchsorted(desc, -lam.clamp(max=float(table[1])).contiguous()).clamp(
            1, self.T - 1)  # lambda_{k+1} <= lam <= lambda_k with k >= 1
        lo, hi = table[k], table[k + 1]
        t = k + (lo - lam) / (lo - hi)
        # On [0, 1]: alpha_bar(t) = alpha_bar_1^t, so t = log sigmoid(lam) / log alpha_bar_1.
        t_first = torch.nn.functional.logsigmoid(lam) / torch.log(self.alpha_bar[0])
        t = torch.where(lam >= table[1], t_first, t)
        return t.clamp(0.0, self.t_max)

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """t ~ U{1, ..., T} as in DDPM Algorithm 1."""
        return torch.randint(1, self.T + 1, (n,), generator=generator,
                             device=device).to(torch.float64)
