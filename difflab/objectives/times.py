"""Training-time distributions: uniform, continuous, EDM's log-normal, and importance sampling.

- ``uniform``:    the process's own ``sample_t``: t ~ U{1..T} for discrete processes (DDPM
                  Algorithm 1), t ~ U(t_min, t_max) for continuous ones (Song et al. 2021).
- ``continuous``: t ~ U(t_min, t_max) real-valued for any process; a discrete schedule is then
                  trained in continuous time on its interpolated log-SNR (Kingma et al. 2021).
- ``lognormal``:  ln s ~ N(P_mean, P_std^2) for the noise level s = sigma / alpha, mapped to t
                  through lambda = -2 ln s (Karras et al. 2022, sec. 5: P_mean = -1.2,
                  P_std = 1.2).
- ``logit_normal``: t = t_min + (t_max - t_min) sigmoid(m + s z), z ~ N(0, 1) (Esser et al.
                  2024, SD3, sec. 3.1; the ``rectified-flow`` objective's option).
- ``importance``: t ~ p(t) proportional to sqrt(E[L_t^2]) over the last 10 values of each term
                  (Nichol & Dhariwal 2021, eq. 18), uniform until every t has its history; the
                  loss is reweighted by 1 / (T p(t)) so the bound's estimate stays unbiased.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..process import Process

TimeSampling = Literal["uniform", "continuous", "lognormal", "importance", "logit_normal"]
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)
#: EDM's log-normal noise levels, ln(sigma / alpha) ~ N(P_mean, P_std^2) (Karras et al. 2022).
P_MEAN, P_STD = -1.2, 1.2


def lognormal_times(process: Process, n: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, p_mean: float = P_MEAN,
                    p_std: float = P_STD) -> Tensor:
    """t whose noise level s = sigma / alpha is log-normal (EDM's training distribution)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    lam = -2 * (p_mean + p_std * z)
    t = process.t_from_log_snr(lam)
    # keep clear of t_min, where s = 0 and the loss carries no signal
    return t.clamp(min=process.t_min + 1e-5 * (process.t_max - process.t_min))


def logit_normal_times(process: Process, n: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, mean: float = 0.0,
                       std: float = 1.0) -> Tensor:
    """t = t_min + (t_max - t_min) sigmoid(mean + std z), z ~ N(0, 1) (SD3's logit-normal)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return process.t_min + (process.t_max - process.t_min) * torch.sigmoid(mean + std * z)


def continuous_times(process: Process, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """t ~ U(t_min, t_max) as real numbers, also for discrete processes."""
    return Process.sample_t(process, n, generator, device)  # the base class: real-valued


class ImportanceSampler:
    """p(t) over the T discrete steps from a history of each term's squared loss."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)  # ring buffers, t = 1..T
        self.counts = torch.zeros(T, dtype=torch.long)

    def probs(self) -> Tensor:
        """p(t) for t = 1..T [T]: uniform until every step has a full history."""
        if bool((self.counts < self.history).any()):
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = self.losses.pow(2).mean(1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(t [n] in 1..T as float64, weights 1 / (T p(t)) [n])."""
        p = self.probs()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.multinomial(p.to(gen_device), n, replacement=True, generator=generator)
        idx = idx.cpu()
        w = 1.0 / (self.T * p[idx])
        return (idx + 1).to(device=device, dtype=torch.float64), w.to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record term(t) of each example (any device; moved to the host)."""
        for ti, li in zip(t.long().cpu().tolist(), losses.detach().double().cpu().tolist(),
                          strict=True):
            k = ti - 1
            self.losses[k, self.counts[k] % self.history] = li
            self.counts[k] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = state["losses"].to(torch.float64).cpu().clone()
        self.counts = state["counts"].long().cpu().clone()


__all__ = ["P_MEAN", "P_STD", "TIME_SAMPLINGS", "ImportanceSampler", "TimeSampling",
           "continuous_times", "logit_normal_times", "lognormal_times"]
