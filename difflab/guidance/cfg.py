"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

With one network trained with condition dropout into a null label,

  eps_guided = eps(x, t, null) + gamma * (eps(x, t, y) - eps(x, t, null)),

equivalently (1 + w) eps(y) - w eps(null) with w = gamma - 1. The same affine combination is
applied to x0_hat, so (x0_hat, eps_hat) stay consistent (both are affine in the network output
at fixed x, t). gamma = 1 is the conditional model, gamma = 0 the unconditional one. The
conditional and unconditional passes run as one batched network call.

Options: ``interval`` applies guidance only for t in [lo, hi] (Kynkäänniemi et al. 2024) and
the conditional model elsewhere; ``rescale`` phi blends in the guided x0_hat rescaled to the
standard deviation of the conditional one (Lin et al. 2024, sec. 3.4), against over-exposure
at large gamma; eps_hat is then recomputed from x0_hat.

Text conditions: ``null_cond`` replaces the null label with any one-row condition, e.g. the
:class:`~difflab.conditioning.TextCond` of the empty prompt (the trained null) or of a negative
prompt, which then plays the unconditional branch: eps(neg) + gamma (eps(y) - eps(neg)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..conditioning import LatentCond, cat_cond, expand_cond
from ..parameterization import DenoiserFn, Prediction
from ..process import as_time, expand_like


class ClassifierFreeGuidance:
    """D_guided(x, t, y) from a denoiser whose null condition is ``null_label`` (class
    labels) or ``null_cond`` (a one-row condition such as an empty or negative prompt)."""

    def __init__(self, denoiser: DenoiserFn, scale: float, null_label: int | None = None,
                 interval: tuple[float, float] | None = None, rescale: float = 0.0,
                 batched: bool = True, null_cond: Any = None):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if (null_label is None) == (null_cond is None):
            raise ValueError("give exactly one of null_label and null_cond")
        self.inner, self.scale, self.null_label = denoiser, scale, null_label
        self.null_cond = null_cond
        self.interval, self.rescale, self.batched = interval, rescale, batched
        self.process = denoiser.process

    @classmethod
    def from_w(cls, denoiser: DenoiserFn, w: float, null_label: int | None = None,
               **kwargs: Any) -> ClassifierFreeGuidance:
        """The (1 + w) eps(y) - w eps(null) form: gamma = 1 + w."""
        return cls(denoiser, 1.0 + w, null_label, **kwargs)

    def _active(self, t: Tensor) -> bool:
        if self.interval is None:
            return True
        lo, hi = self.interval
        return bool(((t >= lo) & (t <= hi)).all())

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        t = as_time(t, x)
        labels = cond.labels if isinstance(cond, LatentCond) else cond  # a DDGAN latent
        if labels is None or self.scale == 1.0 or not self._active(t):
            return self.inner(x, t, cond)
        if self.null_cond is not None:  # one row, repeated; on the condition's device
            null = expand_cond(self.null_cond, len(labels))
        else:
            null = torch.full_like(labels, self.null_label)
        if isinstance(cond, LatentCond):  # both branches see the same latent z
            null = LatentCond(null, cond.z)
        if self.scale == 0.0:
            return self.inner(x, t, null)
        tt = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.batched:  # one network call on [x; x] with [y; null]
            both = self.inner(torch.cat([x, x]), torch.cat([tt, tt]), cat_cond([cond, null]))
            n = x.shape[0]
            vf = both.var_frac
            c = Prediction(both.x0[:n], both.eps[:n], None if vf is None else vf[:n])
            u = Prediction(both.x0[n:], both.eps[n:])
        else:
            c, u = self.inner(x, tt, cond), self.inner(x, tt, null)
        g = self.scale
        x0 = u.x0 + g * (c.x0 - u.x0)
        if self.rescale == 0.0:
            # a learned variance is taken from the conditional branch (it is not extrapolated)
            return Prediction(x0=x0, eps=u.eps + g * (c.eps - u.eps), var_frac=c.var_frac)
        out = self._rescaled(x, tt, x0, c.x0)
        return Prediction(out.x0, out.eps, c.var_frac)

    def _rescaled(self, x: Tensor, t: Tensor, x0: Tensor, x0_cond: Tensor) -> Prediction:
        dims = tuple(range(1, x.ndim))
        ratio = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp(
            min=1e-12)
        x0 = self.rescale * x0 * ratio + (1 - self.rescale) * x0
        alpha, sigma = self.process.alpha_sigma(t)
        eps = (x - expand_like(alpha, x) * x0) / expand_like(sigma, x)
        return Prediction(x0=x0, eps=eps)
