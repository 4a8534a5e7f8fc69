"""Consistency models: the discretisation of noise levels, the distance metrics, and
consistency training without a teacher (Song et al. 2023; Song & Dhariwal 2023, "iCT").

Discretisation. N noise levels s_0 = s_min < s_1 < ... < s_{N-1}, with s = sigma / alpha the
VE view of the process: Karras et al.'s rho-spacing (eq. 5, rho = 7) from s_min up to
s_max = min(sigma_max, s(t_max)) (80 by default, the paper's; a VP schedule's s(T) is ~2e4 for
cosine). The model records s_max (``StageCard.sigma_max``) and evaluates noisier inputs there
(``parameterization.Denoiser``), so sampling from t_max starts, as in the paper, from noise
at s_max. s_min is the noise level of the process's first step (``boundary_time``: t = 1 of
a discrete schedule, Song et al.'s epsilon = 1e-3 of the time range of a continuous one).

Consistency training (iCT, Song & Dhariwal 2023, sec. 3): for data x and z ~ N(0, I), the
student at the upper level of a pair (s_{n+1}, s_n) is pulled towards itself, stop-gradient,
at the lower one, both with the same z (the exact one-step "solver" of the data's ODE):

  L = lambda(s_n) d(f_theta(x + s_{n+1} z, s_{n+1}), sg f_theta(x + s_n z, s_n)),

with d the pseudo-Huber metric sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(dim) (sec. 3.3),
lambda(s_n) = 1 / (s_{n+1} - s_n) (sec. 3.4), n drawn with probability proportional to the
log-normal mass of [ln s_n, ln s_{n+1}] (sec. 3.5), and N growing with the training step k
(the curriculum, sec. 3.4): N(k) = min(s0 2^floor(k / K'), s1) + 1,
K' = floor(K / (log2 floor(s1 / s0) + 1)), K the total number of steps. (The paper's levels
are written t in VE units; here every level is a time of the process, so x + s z reads
x_t = alpha_t x + sigma_t z.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..parameterization import Denoiser, noise_level
from ..process import Process, q_sample
from .base import Objective, ObjectiveOutput
from .times import P_MEAN, P_STD, TimeSampling

Metric = Literal["l2", "pseudo_huber"]
METRICS: tuple[str, ...] = ("l2", "pseudo_huber")
#: the paper's top noise level (EDM's sigma_max)
SIGMA_MAX = 80.0


def boundary_time(process: Process) -> float:
    """t of the boundary s_min: the first step of a discrete schedule, else t_min + 1e-3 of
    the time range (as ``samplers.default_sigma_min``)."""
    span = process.t_max - process.t_min
    return process.t_min + (1.0 if process.is_discrete else 1e-3 * span)


def boundary_sigma(process: Process) -> float:
    """s_min = sigma / alpha at :func:`boundary_time`, computed as the parameterisation does
    (``parameterization.noise_level``), so f(x, t) = x~ there exactly."""
    t = torch.tensor([boundary_time(process)], dtype=torch.float64)
    return float(noise_level(process, t)[0])


def consistency_levels(process: Process, n: int, sigma_max: float = SIGMA_MAX,
                       rho: float = 7.0) -> Tensor:
    """The N increasing times of the discretisation (module docstring): times[0] is the
    boundary, times[-1] the level min(sigma_max, s(t_max))."""
    if n < 2:
        raise ValueError(f"the discretisation needs at least 2 noise levels, got {n}")
    s_lo = boundary_sigma(process)
    s_top = float(noise_level(process, torch.tensor([process.t_max], dtype=torch.float64))[0])
    s_hi = min(sigma_max, s_top)
    if not s_hi > s_lo:
        raise ValueError(f"sigma_max ({sigma_max}) must exceed the boundary level {s_lo:.4g}")
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (s_lo ** (1 / rho) + u * (s_hi ** (1 / rho) - s_lo ** (1 / rho))) ** rho
    times = process.t_from_log_snr(-2 * s.log())
    times[0] = boundary_time(process)
    if s_hi == s_top:
        times[-1] = process.t_max
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"{n} noise levels are too many for this process: two of them fall "
                         "on the same time")
    return times


def consistency_distance(a: Tensor, b: Tensor, metric: Metric = "pseudo_huber",
                         huber_c: float | None = None) -> Tensor:
    """d(a, b) per example [B]: ``l2`` the mean squared difference, ``pseudo_huber``
    sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(dim) unless given (Song & Dhariwal 2023,
    sec. 3.3)."""
    sq = (a - b).pow(2).flatten(1)
    if metric == "l2":
        return sq.mean(1)
    if metric == "pseudo_huber":
        c = 0.00054 * math.sqrt(sq.shape[1]) if huber_c is None else huber_c
        return (sq.sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown consistency metric {metric!r}; choose from {METRICS}")


def curriculum_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1))
    (Song & Dhariwal 2023, eq. 6, doubling from s0 to s1 over K = ``total_steps``)."""
    if not 1 <= s0 <= s1:
        raise ValueError(f"the curriculum needs 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    stages = math.floor(math.log2(s1 // s0)) + 1
    k_prime = max(total_steps // stages, 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_level_probs(times: Tensor, process: Process, p_mean: float, p_std: float
                          ) -> Tensor:
    """p(n) for the N - 1 pairs (s_n, s_{n+1}): the mass of ln s ~ N(p_mean, p_std^2) between
    them (Song & Dhariwal 2023, sec. 3.5), normalised."""
    log_s = noise_level(process, times).log().clamp(max=1e4)
    cdf = torch.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)
    if not float(p.sum()) > 0:
        return torch.full_like(p, 1.0 / len(p))
    return p / p.sum()


class ConsistencyTrainingObjective(Objective):
    """Consistency training, the improved recipe (module docstring). Needs ``--prediction
    edm`` (or ``consistency``): the network is EDM-preconditioned under the consistency
    boundary parameterisation, and the run saves as a consistency model."""

    name = "consistency-training"
    default_times: ClassVar[TimeSampling] = "lognormal"
    options = ("p_mean", "p_std", "curriculum_start", "curriculum_end")

    def __init__(self, p_mean: float = P_MEAN, p_std: float = P_STD,
                 curriculum_start: int = 10, curriculum_end: int = 160):
        super().__init__("lognormal", p_mean, p_std)
        curriculum_levels(0, 1, curriculum_start, curriculum_end)  # checks the range
        self.s0, self.s1 = int(curriculum_start), int(curriculum_end)
        self.step, self.total_steps = 0, 1
        self._levels: tuple[int, Tensor] | None = None

    def check(self, process: Process, prediction: str) -> None:
        if prediction not in ("edm", "consistency"):
            raise ValueError("objective 'consistency-training' needs --prediction edm (the "
                             "network is EDM-preconditioned under the consistency boundary "
                             "parameterisation)")

    def set_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, max(total_steps, 1)

    def levels(self, process: Process) -> Tensor:
        """The discretisation at the current step (N from the curriculum), cached per N."""
        n = curriculum_levels(self.step, self.total_steps, self.s0, self.s1)
        if self._levels is None or self._levels[0] != n:
            self._levels = (n, consistency_levels(process, n))
        return self._levels[1]

    def sample_t(self, process: Process, n: int, generator: torch.Generator | None,
                 device: Any, sampler: Any = None) -> tuple[Tensor, Tensor | None]:
        """The upper time t_{n+1} of each example's pair, n log-normally weighted."""
        times = self.levels(process)
        p = lognormal_level_probs(times, process, self.p_mean, self.p_std)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.multinomial(p.to(gen_device), n, replacement=True, generator=generator)
        return times.to(idx.device)[idx + 1].to(device), None

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        times = self.levels(denoiser.process).to(t.device)
        hi = torch.searchsorted(times, t)  # t is a level: its own index
        t_lo = times[hi - 1]
        s_hi, s_lo = noise_level(denoiser.process, t), noise_level(denoiser.process, t_lo)
        with torch.no_grad():
            target = denoiser(q_sample(denoiser.process, x0, t_lo, noise), t_lo, cond).x0
        pred = denoiser(q_sample(denoiser.process, x0, t, noise), t, cond).x0
        weight = 1.0 / (s_hi - s_lo)
        weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
        loss = consistency_distance(pred, target) * weight.to(pred.dtype)
        return ObjectiveOutput(loss, t, None)


__all__ = ["METRICS", "SIGMA_MAX", "ConsistencyTrainingObjective", "Metric", "boundary_sigma",
           "boundary_time", "consistency_distance", "consistency_levels", "curriculum_levels",
           "lognormal_level_probs"]
