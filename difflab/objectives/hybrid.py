"""The hybrid objective (Nichol & Dhariwal 2021, sec. 3.1): L_simple + lambda L_vlb.

lambda = 0.001 by default, and L_vlb sees the mean channels through a stop-gradient, so the
bound trains only the learned variance and the mean is trained by L_simple alone. Both terms
share one network call.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..parameterization import Denoiser
from ..process import Process, q_sample
from .base import ObjectiveOutput
from .simple import LossSpace, SimpleObjective
from .times import P_MEAN, P_STD, TimeSampling
from .vlb import require_discrete, vlb_loss
from .weighting import Weighting


class HybridObjective(SimpleObjective):
    """L_simple (weighted as ``simple``) + ``vlb_lambda`` L_vlb (mean detached)."""

    name = "hybrid"
    learned_variance = True
    options = (*SimpleObjective.options, "vlb_lambda")

    def __init__(self, weighting: Weighting | None = None, min_snr_gamma: float = 5.0,
                 loss_space: LossSpace | None = None, vlb_lambda: float = 0.001,
                 time_sampling: TimeSampling | None = None, p_mean: float = P_MEAN,
                 p_std: float = P_STD):
        super().__init__(weighting, min_snr_gamma, loss_space, time_sampling, p_mean, p_std)
        if not (math.isfinite(vlb_lambda) and vlb_lambda >= 0):
            raise ValueError(f"vlb_lambda must be finite and >= 0, got {vlb_lambda!r}")
        self.vlb_lambda = float(vlb_lambda)

    def check(self, process: Process, prediction: str) -> None:
        require_discrete(self.name, process)
        super().check(process, prediction)

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        raw = denoiser.raw(q_sample(denoiser.process, x0, t, noise), t, cond)
        mse = self.mse(denoiser, x0, cond, t, noise, raw=raw)
        bound, term = vlb_loss(denoiser, x0, t, noise, cond, stop_grad_mean=True, raw=raw)
        return ObjectiveOutput(mse + self.vlb_lambda * bound, t, term.detach())


__all__ = ["HybridObjective"]
