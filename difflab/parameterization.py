"""One denoiser interface: whatever the network predicts, samplers see x0_hat and eps_hat.

For x_t = alpha x_0 + sigma eps with alpha^2 + sigma^2 = 1 (VP processes):

=========  ======================  ===========================  ==========================
predicts   network output          x0_hat                       eps_hat
=========  ======================  ===========================  ==========================
``eps``    eps (Ho et al. 2020)    (x_t - sigma eps) / alpha    eps
``x0``     x_0                     x_0                          (x_t - alpha x_0) / sigma
``v``      v = alpha eps - sigma   alpha x_t - sigma v          sigma x_t + alpha v
           x_0 (Salimans & Ho
           2022)
=========  ======================  ===========================  ==========================

and the score is grad log q(x_t) = -eps_hat / sigma. The conversion happens once, here; no
sampler looks at the prediction type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from .conditioning import expand_cond
from .process import Process, as_time, expand_like

PredictionType = Literal["eps", "x0", "v"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")


@dataclass(frozen=True)
class Prediction:
    """A denoiser's answer at (x_t, t): the clean-data estimate and the noise estimate."""

    x0: Tensor
    eps: Tensor

    def v(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """v = alpha eps - sigma x0 for per-example rates broadcastable to x."""
        return expand_like(alpha, self.x0) * self.eps - expand_like(sigma, self.x0) * self.x0

    def score(self, sigma: Tensor) -> Tensor:
        """grad_x log q_t(x) = -eps / sigma (Song et al. 2021)."""
        return -self.eps / expand_like(sigma, self.eps)


def prediction_from_output(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
                           kind: PredictionType) -> Prediction:
    """Convert a raw network output of type ``kind`` at x_t into (x0_hat, eps_hat)."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    if kind == "eps":
        return Prediction(x0=(x - s * out) / a, eps=out)
    if kind == "x0":
        return Prediction(x0=out, eps=(x - a * out) / s)
    if kind == "v":
        return Prediction(x0=a * x - s * out, eps=s * x + a * out)
    raise ValueError(f"unknown prediction type {kind!r}; choose from {PREDICTION_TYPES}")


def output_from_prediction(pred: Prediction, alpha: Tensor, sigma: Tensor,
                           kind: PredictionType) -> Tensor:
    """The network output of type ``kind`` that ``pred`` corresponds to (training targets)."""
    if kind == "eps":
        return pred.eps
    if kind == "x0":
        return pred.x0
    if kind == "v":
        return pred.v(alpha, sigma)
    raise ValueError(f"unknown prediction type {kind!r}; choose from {PREDICTION_TYPES}")


def broadcast_cond(cond: Any, n: int) -> Any:
    """Repeat a one-example condition (a [1] label tensor or a one-row
    :class:`~difflab.conditioning.TextCond`) to a batch of n; else unchanged."""
    return expand_cond(cond, n)


class DenoiserFn(Protocol):
    """What samplers, guidance and editing rely on."""

    process: Process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction: ...


class Denoiser:
    """A network plus its prediction type and process, seen as D(x, t, cond) -> Prediction.

    ``t`` is a scalar or a [B] tensor in the process's time units; ``cond`` holds class labels
    ([B] int64, or None for unconditional / the null label). The network runs in its own
    dtype; the answer comes back in x's dtype, so samplers may keep their state in float64.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: PredictionType = "eps"):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; "
                             f"choose from {PREDICTION_TYPES}")
        self.net, self.process, self.prediction = net, process, prediction

    def raw(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The network output (in x's dtype) for x_t at times t [B]."""
        param = next(self.net.parameters())
        c_noise = self.process.c_noise(t).to(device=x.device, dtype=torch.float32)
        out = self.net(x.to(param.dtype), c_noise, cond)
        return out.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        t = as_time(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = self.process.alpha_sigma(t)
        return prediction_from_output(self.raw(x, t, cond), x, alpha, sigma, self.prediction)


class ClippedDenoiser:
    """Wraps a denoiser so x0_hat is clipped to the data range [lo, hi], with eps_hat recomputed
    from the clipped x0_hat so the two stay consistent (Ho et al. 2020, "clip_denoised").

    Near t = T, x0_hat = (x_t - sigma eps_hat) / alpha amplifies the network's error by 1/alpha
    (about 150 for DDPM's linear schedule); clipping keeps samplers from diverging there.
    """

    def __init__(self, denoiser: DenoiserFn, lo: float = -1.0, hi: float = 1.0):
        self.inner, self.lo, self.hi = denoiser, lo, hi
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        pred = self.inner(x, t, cond)
        t = as_time(t, x)
        alpha, sigma = self.process.alpha_sigma(t.expand(x.shape[0]) if t.ndim == 0 else t)
        x0 = pred.x0.clamp(self.lo, self.hi)
        a, s = expand_like(alpha, x), expand_like(sigma, x)
        return Prediction(x0=x0, eps=torch.where(s > 0, (x - a * x0) / s, pred.eps))
