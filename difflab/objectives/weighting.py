"""Loss weightings in one place, as functions of the log-SNR lambda = log(alpha^2 / sigma^2).

Every weighting is a weight w_x(lambda) on the x0-space squared error |x0 - x0_hat|^2.
Because x0 - x0_hat = (sigma / alpha)(eps_hat - eps) and v - v_hat = (eps - eps_hat) / alpha,

    |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2,     |v - v_hat|^2 = (1 + SNR) |x0 - x0_hat|^2

(Kingma et al. 2021; Salimans & Ho 2022), so the unweighted MSE in eps, x0 and v space is w_x =
SNR, 1 and 1 + SNR respectively, and a weighting is applied to a loss measured in any space by
the factor w_x / w_space. Names (w_x):

- ``constant``       no reweighting of the loss space's own MSE (L_simple for eps space,
                     Ho et al. 2020); the default.
- ``snr``            SNR (= the eps-space MSE whatever the loss space).
- ``min_snr``        min(SNR, gamma) (Hang et al. 2023, "Min-SNR-gamma", gamma = 5).
- ``truncated_snr``  max(SNR, 1) (Salimans & Ho 2022, "truncated SNR").
- ``edm``            (s^2 + sd^2) / (s sd)^2 = SNR + 1 / sd^2 with s = sigma / alpha
                     (Karras et al. 2022, eq. 8's lambda(sigma)).

Weights are computed in log space with lambda clamped to +-LOG_SNR_CLAMP so that they stay
finite at zero terminal SNR (lambda = -inf), where SNR-to-SNR ratios would be 0/0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..parameterization import LOG_SNR_CLAMP

Weighting = Literal["constant", "snr", "min_snr", "truncated_snr", "edm"]
WEIGHTINGS: tuple[str, ...] = ("constant", "snr", "min_snr", "truncated_snr", "edm")


def log_space_weight(lam: Tensor, space: str) -> Tensor:
    """log w_x of the unweighted MSE in ``space``: lambda (eps), 0 (x0), log(1 + SNR) (v)."""
    if space == "eps":
        return lam
    if space == "x0":
        return torch.zeros_like(lam)
    if space == "v":
        return torch.nn.functional.softplus(lam)
    raise ValueError(f"unknown loss space {space!r}; choose from ('eps', 'x0', 'v')")


def log_x0_weight(lam: Tensor, weighting: Weighting, gamma: float = 5.0,
                  sigma_data: float = 0.5) -> Tensor:
    """log w_x(lambda) of ``weighting`` (module docstring)."""
    if weighting == "snr":
        return lam
    if weighting == "min_snr":
        return lam.clamp(max=math.log(gamma))
    if weighting == "truncated_snr":
        return lam.clamp(min=0.0)
    if weighting == "edm":
        return torch.logaddexp(lam, torch.full_like(lam, -2 * math.log(sigma_data)))
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def loss_weight(lam: Tensor, weighting: Weighting, space: str, gamma: float = 5.0,
                sigma_data: float = 0.5) -> Tensor:
    """Factor on the ``space`` MSE that turns it into the ``weighting`` loss, per example.

    ``constant`` returns ones. With lambda clamped, eps-space weights that grow without bound
    as SNR -> 0 (truncated SNR, EDM: eps-prediction cannot reach x0 there) stay finite."""
    if weighting == "constant":
        return torch.ones_like(lam)
    lam = lam.clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP)
    return torch.exp(log_x0_weight(lam, weighting, gamma, sigma_data)
                     - log_space_weight(lam, space))


__all__ = ["WEIGHTINGS", "Weighting", "log_space_weight", "log_x0_weight", "loss_weight"]
