"""Rectified flow / flow matching: regress the velocity of the linear path (``rectified-flow``).

For x_t = (1 - t) x_0 + t eps (``process.RectifiedFlow``) the velocity is u = eps - x_0; the
network v_theta(x_t, t) (prediction ``flow``) minimises E_{t, x_0, eps} |u - v_theta(x_t, t)|^2
(Liu et al. 2022, eq. 1; Lipman et al. 2022, eq. 23 with sigma_min = 0). Times: ``uniform``
t ~ U(0, 1) (the papers'), or ``logit_normal`` t = sigmoid(m + s z), z ~ N(0, 1), which puts
more weight on the middle of the path (Esser et al. 2024, SD3, sec. 3.1: m = 0, s = 1).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..parameterization import Denoiser, Prediction, output_from_prediction
from ..process import Process, RectifiedFlow, q_sample
from .base import Objective, ObjectiveOutput
from .times import ImportanceSampler, TimeSampling, logit_normal_times

#: the time samplings the rectified-flow objective accepts
FLOW_TIMES = ("uniform", "continuous", "logit_normal")


def velocity_loss(denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor
                  ) -> Tensor:
    """|u - v_theta(x_t, t)|^2 per example [B], u = alpha'(t) x_0 + sigma'(t) eps (= eps - x_0
    on the linear path) and x_t = alpha x_0 + sigma eps; the network predicts ``flow``."""
    process = denoiser.process
    x_t = q_sample(process, x0, t, noise)
    out, _ = denoiser.split(denoiser.raw(x_t, t, cond))
    alpha, sigma = process.alpha_sigma(t)
    target = output_from_prediction(Prediction(x0=x0, eps=noise), alpha, sigma, "flow",
                                    process.alpha_sigma_dt(t))
    return (out - target).pow(2).flatten(1).mean(1)


class RectifiedFlowObjective(Objective):
    """MSE on the velocity eps - x_0 at t ~ U(0, 1) or logit-normal; needs the
    ``rectified_flow`` process and ``flow`` prediction."""

    name = "rectified-flow"
    default_times: ClassVar[TimeSampling] = "uniform"
    logit_normal: ClassVar[bool] = True
    velocity: ClassVar[bool] = True
    options = ("time_sampling", "logit_mean", "logit_std")

    def __init__(self, time_sampling: TimeSampling | None = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        super().__init__(time_sampling)
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std >= 0):
            raise ValueError(f"logit_mean must be finite and logit_std finite and >= 0, got "
                             f"logit_mean={logit_mean!r}, logit_std={logit_std!r}")
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def check(self, process: Process, prediction: str) -> None:
        super().check(process, prediction)
        if self.times not in FLOW_TIMES:
            raise ValueError(f"objective 'rectified-flow' takes --time-sampling "
                             f"{', '.join(FLOW_TIMES)}; got {self.times!r}")
        if not isinstance(process, RectifiedFlow):
            raise ValueError("objective 'rectified-flow' needs --schedule rectified_flow "
                             f"(got {process.to_config().get('kind')!r})")
        if prediction != "flow":
            raise ValueError(f"objective 'rectified-flow' needs --prediction flow (got "
                             f"{prediction!r})")

    def sample_t(self, process: Process, n: int, generator: torch.Generator | None,
                 device: Any, sampler: ImportanceSampler | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        if self.times == "logit_normal":
            return logit_normal_times(process, n, generator, device, self.logit_mean,
                                      self.logit_std), None
        return super().sample_t(process, n, generator, device, sampler)

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        return ObjectiveOutput(velocity_loss(denoiser, x0, cond, t, noise), t, None)


__all__ = ["FLOW_TIMES", "RectifiedFlowObjective", "velocity_loss"]
