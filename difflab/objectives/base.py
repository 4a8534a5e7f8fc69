"""The interface every training objective implements, and the time distribution they share.

An objective is what the training loop asks for a loss: it says whether the network learns a
variance (2x output channels), draws the training times t (with importance weights when its
distribution is not the one the loss assumes), and returns one unreduced loss per example at
given (x0, t, noise). The loop averages the loss; it knows nothing of how it is made.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..parameterization import Denoiser
from ..process import Process
from .times import (
    P_MEAN,
    P_STD,
    TIME_SAMPLINGS,
    ImportanceSampler,
    TimeSampling,
    continuous_times,
    lognormal_times,
)


@dataclass
class ObjectiveOutput:
    loss: Tensor              # [B] what is averaged and minimised
    t: Tensor                 # [B]
    vlb_term: Tensor | None   # [B] term(t) in nats (vlb, hybrid): feeds importance sampling


class Objective(ABC):
    """A training objective: its loss, and its time distribution (``times``).

    ``times`` is ``time_sampling`` or, when that is None, the class's ``default_times``;
    ``lognormal`` draws ln(sigma / alpha) ~ N(p_mean, p_std^2). Subclasses set ``name``,
    ``default_times``, ``learned_variance``, ``importance_sampling`` (whether the loss
    accepts the importance weights of ``times = "importance"``) and ``options`` (the keyword
    arguments of ``__init__`` that ``build_objective`` takes from the ``ObjectiveConfig`` fields
    of the same names), and implement ``loss``."""

    name: ClassVar[str]
    default_times: ClassVar[TimeSampling] = "uniform"
    learned_variance: ClassVar[bool] = False   # the network outputs Sigma_theta too
    importance_sampling: ClassVar[bool] = False
    logit_normal: ClassVar[bool] = False       # accepts times = "logit_normal"
    velocity: ClassVar[bool] = False           # trains the ``flow`` prediction
    options: ClassVar[tuple[str, ...]] = ("time_sampling", "p_mean", "p_std")

    def __init__(self, time_sampling: TimeSampling | None = None, p_mean: float = P_MEAN,
                 p_std: float = P_STD):
        self.times = time_sampling or self.default_times
        if self.times not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose from "
                             f"{TIME_SAMPLINGS}")
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std >= 0):
            raise ValueError(f"p_mean must be finite and p_std finite and >= 0, got "
                             f"p_mean={p_mean!r}, p_std={p_std!r}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def check(self, process: Process, prediction: str) -> None:
        """Raise a clear error for combinations that cannot work."""
        if self.times == "importance" and not self.importance_sampling:
            raise ValueError("importance sampling of t applies to the 'vlb' objective only")
        if self.times == "logit_normal" and not self.logit_normal:
            raise ValueError("logit_normal time sampling applies to the 'rectified-flow' "
                             "objective only")
        if prediction == "flow" and not self.velocity:
            raise ValueError(f"--prediction flow trains with --objective rectified-flow, not "
                             f"{self.name!r}")

    def set_step(self, step: int, total_steps: int) -> None:
        """Told the training step before each step's draws (by the training loss); objectives
        with a schedule over training use it (consistency training's curriculum)."""
        return None

    def time_sampler(self, process: Process) -> ImportanceSampler | None:
        """The state of an importance-sampled time distribution (None for the others)."""
        return ImportanceSampler(int(process.T)) if self.times == "importance" else None

    def sample_t(self, process: Process, n: int, generator: torch.Generator | None,
                 device: Any, sampler: ImportanceSampler | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """(t [n], importance weights [n] or None), drawn from ``generator``."""
        if self.times == "importance":
            assert sampler is not None, "importance sampling needs its ImportanceSampler"
            return sampler.sample(n, generator, device)
        if self.times == "lognormal":
            return lognormal_times(process, n, generator, device, self.p_mean, self.p_std), None
        if self.times == "continuous":
            return continuous_times(process, n, generator, device), None
        return process.sample_t(n, generator, device), None

    @abstractmethod
    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        """Unreduced loss [B] at the given times and noise; ``t_weight`` are the importance
        weights of ``sample_t`` (only objectives with ``importance_sampling`` use them)."""


__all__ = ["Objective", "ObjectiveOutput"]
