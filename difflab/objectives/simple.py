"""The simple loss of DDPM in eps, x0 or v space, with a weighting: the ``simple`` objective.

``L_simple`` (Ho et al. 2020, eq. 14) is E_{t, x0, eps} |eps - eps_hat(x_t, t)|^2 with
t ~ U{1..T}. The same regression can be measured on x0 or on v = alpha eps - sigma x0
(Salimans & Ho 2022); because every prediction type converts to (x0_hat, eps_hat), the loss
space is independent of what the network outputs. Losses are returned unreduced, one value per
example; a weighting from :mod:`.weighting` multiplies them per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from ..parameterization import (
    Denoiser,
    Prediction,
    output_from_prediction,
    prediction_from_output,
)
from ..process import q_sample
from .base import Objective, ObjectiveOutput
from .times import P_MEAN, P_STD, TimeSampling
from .weighting import WEIGHTINGS, Weighting, loss_weight

LossSpace = Literal["eps", "x0", "v"]
LOSS_SPACES: tuple[str, ...] = get_args(LossSpace)


@dataclass
class LossOutput:
    loss: Tensor   # [B] unreduced
    t: Tensor      # [B] sampled times


def simple_loss(denoiser: Denoiser, x0: Tensor, cond: Any = None,
                generator: torch.Generator | None = None, space: LossSpace | None = None,
                t: Tensor | None = None, noise: Tensor | None = None,
                weighting: str = "constant", min_snr_gamma: float = 5.0,
                raw: Tensor | None = None) -> LossOutput:
    """Mean squared error in ``space`` (default: the network's own prediction type; x0 for
    ``edm``) at t ~ process.sample_t and eps ~ N(0, I), both drawn from ``generator`` unless
    given, times the per-example factor of ``weighting`` (:func:`objectives.loss_weight`).
    Only the prediction channels of a learned-variance network enter this loss; ``raw`` is
    the network output at these (t, noise) when the caller already has it."""
    # EDM trains in x0 space; a raw score output in eps space (denoising score matching with
    # lambda = sigma^2, Song & Ermon 2019), since the score's own MSE explodes as sigma -> 0.
    space = space or {"edm": "x0", "score": "eps"}.get(denoiser.prediction,
                                                       denoiser.prediction)
    if space not in LOSS_SPACES:
        raise ValueError(f"unknown loss space {space!r}; choose from {LOSS_SPACES}")
    process = denoiser.process
    if t is None:
        t = process.sample_t(x0.shape[0], generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_t = q_sample(process, x0, t, noise)
    alpha, sigma = process.alpha_sigma(t)
    out, _ = denoiser.split(denoiser.raw(x_t, t, cond) if raw is None else raw)
    if space == denoiser.prediction:  # regress the raw output directly: no division by alpha
        target = output_from_prediction(Prediction(x0=x0, eps=noise), alpha, sigma, space)
        err = out - target
    else:
        pred = prediction_from_output(out, x_t, alpha, sigma, denoiser.prediction,
                                      denoiser.sigma_data)
        err = (output_from_prediction(pred, alpha, sigma, space)
               - output_from_prediction(Prediction(x0=x0, eps=noise), alpha, sigma, space))
    loss = err.pow(2).flatten(1).mean(1)
    if weighting != "constant":
        w = loss_weight(process.log_snr(t), weighting, space, min_snr_gamma, denoiser.sigma_data)
        loss = loss * w.to(device=loss.device, dtype=loss.dtype)
    return LossOutput(loss=loss, t=t)


class SimpleObjective(Objective):
    """w(lambda) |target - output|^2 in the loss space, t from the process (``uniform``)."""

    name = "simple"
    default_weighting: ClassVar[Weighting] = "constant"
    options = (*Objective.options, "weighting", "min_snr_gamma", "loss_space")

    def __init__(self, weighting: Weighting | None = None, min_snr_gamma: float = 5.0,
                 loss_space: LossSpace | None = None, time_sampling: TimeSampling | None = None,
                 p_mean: float = P_MEAN, p_std: float = P_STD):
        super().__init__(time_sampling, p_mean, p_std)
        self.weighting = weighting or self.default_weighting
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
        if loss_space is not None and loss_space not in LOSS_SPACES:
            raise ValueError(f"unknown loss space {loss_space!r}; choose from {LOSS_SPACES}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        self.min_snr_gamma = float(min_snr_gamma)
        self.loss_space = loss_space

    def mse(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
            raw: Tensor | None = None) -> Tensor:
        """The weighted MSE [B] of :func:`simple_loss` with this objective's options."""
        return simple_loss(denoiser, x0, cond, t=t, noise=noise, space=self.loss_space,
                           weighting=self.weighting, min_snr_gamma=self.min_snr_gamma,
                           raw=raw).loss

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        return ObjectiveOutput(self.mse(denoiser, x0, cond, t, noise), t, None)


__all__ = ["LOSS_SPACES", "LossOutput", "LossSpace", "SimpleObjective", "simple_loss"]
