"""EDM's objective (Karras et al. 2022, sec. 5 and eq. 8): lambda(sigma) |x0 - D(x_t)|^2.

The network is preconditioned (``--prediction edm``); the loss is the x0-space MSE weighted by
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (the ``edm`` weighting), so that the effective
weight on the network's raw output is 1 at every noise level. The noise level s = sigma / alpha
is log-normal, ln s ~ N(P_mean, P_std^2) with P_mean = -1.2 and P_std = 1.2 by default.
"""

from __future__ import annotations

from typing import ClassVar

from ..process import Process
from .simple import LossSpace, SimpleObjective
from .times import P_MEAN, P_STD, TimeSampling
from .weighting import Weighting


class EDMObjective(SimpleObjective):
    """lambda(sigma)-weighted x0 MSE at log-normal noise levels; needs ``prediction='edm'``."""

    name = "edm"
    default_times: ClassVar[TimeSampling] = "lognormal"
    default_weighting: ClassVar[Weighting] = "edm"

    def __init__(self, weighting: Weighting | None = None, min_snr_gamma: float = 5.0,
                 loss_space: LossSpace | None = None, time_sampling: TimeSampling | None = None,
                 p_mean: float = P_MEAN, p_std: float = P_STD):
        # "constant" also selects EDM's own lambda(sigma): run configs written when the
        # weighting could not be left unset say "constant" for edm runs.
        super().__init__(None if weighting == "constant" else weighting, min_snr_gamma,
                         loss_space, time_sampling, p_mean, p_std)

    def check(self, process: Process, prediction: str) -> None:
        super().check(process, prediction)
        if prediction != "edm":
            raise ValueError("objective 'edm' needs --prediction edm (the preconditioning)")


__all__ = ["EDMObjective"]
