"""The variational bound as a training loss: the ``vlb`` objective (learned variance).

-log p(x0) <= L_T + sum_{t=2}^T L_{t-1} + L_0 (Ho et al. 2020, eq. 5). With t ~ p(t) over 1..T
one term per example gives the unbiased estimate L_T + term(t) / p(t), where term(1) = L_0
(discretized decoder) and term(t) = L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for
t >= 2, a closed-form KL between Gaussians. The model's variance is Sigma_theta =
exp(v log beta_t + (1 - v) log beta_tilde_t) for a learned-variance network, else fixed.

The terms are importance sampled by default (Nichol & Dhariwal 2021, sec. 3.3). The Gaussian
pieces (KL, decoder, posterior coefficients) are the pure functions of
:mod:`difflab.process.gaussian`, shared with the likelihood evaluator.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..parameterization import Denoiser, DenoiserFn, Prediction
from ..process import Process, expand_like, q_sample
from ..process.gaussian import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    learned_log_variance,
    model_log_variance,
    normal_kl,
    posterior,
    prior_kl,
)
from .base import Objective, ObjectiveOutput
from .times import TimeSampling


def vlb_term_from_prediction(process: Process, x0: Tensor, x_t: Tensor, t: Tensor,
                             pred: Prediction, variance: str = "beta_tilde",
                             decoder: str = "discretized") -> Tensor:
    """term(t) per example [B] in nats (summed over dimensions) given the model's prediction
    at x_t: L_{t-1} for t >= 2, L_0 = -log p(x0 | x1) for t = 1. The model mean is
    mu_tilde(x0_hat, x_t); its variance is learned (``pred.var_frac``) or ``variance``."""
    if pred.var_frac is not None:
        logvar = learned_log_variance(process, t, pred.var_frac)
    else:
        logvar = expand_like(model_log_variance(process, t, variance), x0).expand_as(x0)
    post = posterior(process, t)
    mean_model = post.mean(pred.x0, x_t)
    # beta_tilde_1 = 0: the KL branch is evaluated at t >= 2 only, so that the t = 1 rows
    # (which take the decoder branch) carry no inf/NaN into the gradient.
    post2 = posterior(process, t.clamp(min=2))
    true_logvar = expand_like(post2.var.log(), x0).expand_as(x0)
    kl = normal_kl(post.mean(x0, x_t), true_logvar, mean_model, logvar).flatten(1).sum(1)
    if decoder == "discretized":
        ll = discretized_gaussian_log_likelihood(x0, mean_model, 0.5 * logvar).to(x0.dtype)
    elif decoder == "gaussian":
        ll = gaussian_log_likelihood(x0, mean_model, logvar)
    else:
        raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")
    return torch.where(t == 1, -ll.flatten(1).sum(1), kl)


def model_prediction(denoiser: DenoiserFn, x_t: Tensor, t: Tensor, cond: Any = None,
                     stop_grad_mean: bool = False, raw: Tensor | None = None) -> Prediction:
    """The denoiser's prediction at x_t; for a ``Denoiser`` optionally with the mean channels
    detached (hybrid loss) and reusing an already computed raw output."""
    if not isinstance(denoiser, Denoiser):
        return denoiser(x_t, t, cond)
    out = denoiser.raw(x_t, t, cond) if raw is None else raw
    mean, var = denoiser.split(out)
    if stop_grad_mean:
        mean = mean.detach()
    return denoiser.predict(mean if var is None else torch.cat([mean, var], 1), x_t, t)


def vlb_loss(denoiser: DenoiserFn, x0: Tensor, t: Tensor, noise: Tensor, cond: Any = None, *,
             t_weight: Tensor | None = None, stop_grad_mean: bool = False,
             variance: str = "beta_tilde", decoder: str = "discretized",
             raw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per example: (estimate of the whole bound in nats per dimension, term(t) in nats).

    The estimate is (L_T + T w term(t)) / dims with w = ``t_weight`` = 1 / (T p(t)) (1 for
    t ~ U{1..T}); its expectation over t is the bound L_T + sum_t term(t) per dimension."""
    process = denoiser.process
    T = int(process.T)
    x_t = q_sample(process, x0, t, noise)
    pred = model_prediction(denoiser, x_t, t, cond, stop_grad_mean, raw)
    term = vlb_term_from_prediction(process, x0, x_t, t, pred, variance, decoder)
    w = torch.ones_like(term) if t_weight is None else t_weight.to(term.dtype)
    dims = x0[0].numel()
    return (prior_kl(process, x0).to(term.dtype) + T * w * term) / dims, term


def require_discrete(name: str, process: Process) -> None:
    """The bound's terms need a discrete schedule's betas (ValueError naming the objective)."""
    if not hasattr(process, "alpha_bar"):
        raise ValueError(f"objective {name!r} needs a discrete schedule (linear, cosine, ...); "
                         f"got {process!r}")


class VLBObjective(Objective):
    """L_T + T w term(t), per dimension, with t importance sampled by default."""

    name = "vlb"
    default_times: ClassVar[TimeSampling] = "importance"
    learned_variance = True
    importance_sampling = True

    def check(self, process: Process, prediction: str) -> None:
        require_discrete(self.name, process)
        super().check(process, prediction)

    def loss(self, denoiser: Denoiser, x0: Tensor, cond: Any, t: Tensor, noise: Tensor,
             t_weight: Tensor | None = None) -> ObjectiveOutput:
        bound, term = vlb_loss(denoiser, x0, t, noise, cond, t_weight=t_weight)
        return ObjectiveOutput(bound, t, term.detach())


__all__ = ["VLBObjective", "model_prediction", "require_discrete", "vlb_loss",
           "vlb_term_from_prediction"]
