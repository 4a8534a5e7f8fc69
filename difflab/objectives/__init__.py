"""Training objectives: L_simple with a weighting, the variational bound, the hybrid loss
with learned variance, and EDM's, behind one ``Objective`` (what ``difflab train`` builds).

=============  ====================================================  =====================
objective      loss per example                                      default time sampling
=============  ====================================================  =====================
``simple``     w(lambda) |target - output|^2 in the loss space       ``uniform``
``vlb``        (L_T + term(t) / p(t)) / dims, learned variance       ``importance``
``hybrid``     L_simple + 0.001 L_vlb (mean detached in L_vlb)       ``uniform``
``edm``        lambda(sigma) |x0 - D(x_t)|^2, EDM preconditioning    ``lognormal``
=============  ====================================================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..losses import simple_loss
from ..parameterization import Denoiser
from ..process import Process, q_sample
from .times import (
    TIME_SAMPLINGS,
    ImportanceSampler,
    continuous_times,
    lognormal_times,
)
from .vlb import model_prediction, vlb_loss, vlb_term_from_prediction
from .weighting import WEIGHTINGS, loss_weight

OBJECTIVES: tuple[str, ...] = ("simple", "vlb", "hybrid", "edm")
DEFAULT_TIMES = {"simple": "uniform", "vlb": "importance", "hybrid": "uniform",
                 "edm": "lognormal"}


@dataclass
class ObjectiveOutput:
    loss: Tensor              # [B] what is averaged and minimised
    t: Tensor                 # [B]
    vlb_term: Tensor | None   # [B] term(t) in nats (vlb, hybrid): feeds importance sampling


@dataclass(frozen=True)
class Objective:
    """One training objective: loss, weighting and time distribution (module table)."""

    name: str = "simple"
    weighting: str = "constant"
    min_snr_gamma: float = 5.0
    loss_space: str | None = None
    vlb_lambda: float = 0.001
    time_sampling: str | None = None   # None: the objective's default

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; choose from {OBJECTIVES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {WEIGHTINGS}")
        if self.times not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.time_sampling!r}; choose from "
                             f"{TIME_SAMPLINGS}")

    @property
    def times(self) -> str:
        return self.time_sampling or DEFAULT_TIMES[self.name]

    @property
    def learned_variance(self) -> bool:
        """vlb and hybrid train Sigma_theta (the network has 2x output channels)."""
        return self.name in ("vlb", "hybrid")

    def check(self, process: Process, prediction: str) -> None:
        """Raise a clear error for combinations that cannot work."""
        if self.name in ("vlb", "hybrid") and not hasattr(process, "alpha_bar"):
            raise ValueError(f"objective {self.name!r} needs a discrete schedule (linear, "
                             f"cosine, ...); got {process!r}")
        if self.times == "importance" and self.name != "vlb":
            raise ValueError("importance sampling of t applies to the 'vlb' objective only")
        if self.name == "edm" and prediction != "edm":
            raise ValueError("objective 'edm' needs --prediction edm (the preconditioning)")

    def time_sampler(self, process: Process) -> ImportanceSampler | None:
        return ImportanceSampler(int(process.T)) if self.times == "importance" else None

    def sample_t(self, process: Process, n: int, generator: torch.Generator | None,
                 device: Any, sampler: ImportanceSampler | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """(t [n], importance weights [n] or None)."""
        if self.times == "importance":
            assert sampler is not None, "importance sampling needs its ImportanceSampler"
            return sampler.sample(n, generator, device)
        if self.times == "lognormal":
            return lognormal_times(process, n, generator, device), None
        if self.times == "continuous":
            return continuous_times(process, n, generator, device), None
        return process.sample_t(n, generator, device), None

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        """Unreduced loss at the given times and noise."""
        if self.name in ("simple", "edm"):
            weighting = "edm" if self.name == "edm" and self.weighting == "constant" \
                else self.weighting
            out = simple_loss(denoiser, x0, cond, t=t, noise=noise, space=self.loss_space,
                              weighting=weighting, min_snr_gamma=self.min_snr_gamma)
            return ObjectiveOutput(out.loss, t, None)
        if self.name == "vlb":
            bound, term = vlb_loss(denoiser, x0, t, noise, cond, t_weight=t_weight)
            return ObjectiveOutput(bound, t, term.detach())
        # hybrid: one network call shared by both terms
        raw = denoiser.raw(q_sample(denoiser.process, x0, t, noise), t, cond)
        mse = simple_loss(denoiser, x0, cond, t=t, noise=noise, space=self.loss_space,
                          weighting=self.weighting, min_snr_gamma=self.min_snr_gamma,
                          raw=raw).loss
        bound, term = vlb_loss(denoiser, x0, t, noise, cond, stop_grad_mean=True, raw=raw)
        return ObjectiveOutput(mse + self.vlb_lambda * bound, t, term.detach())


__all__ = ["DEFAULT_TIMES", "OBJECTIVES", "TIME_SAMPLINGS", "WEIGHTINGS", "ImportanceSampler",
           "Objective", "ObjectiveOutput", "continuous_times", "lognormal_times",
           "loss_weight", "model_prediction", "vlb_loss", "vlb_term_from_prediction"]
