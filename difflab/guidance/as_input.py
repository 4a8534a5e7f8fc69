"""Guidance as a network input: one network call per step instead of classifier-free
guidance's two.

A guidance-distilled student (Meng et al. 2023, "On distillation of guided diffusion models")
or a latent consistency model (Luo et al. 2023) is a network D(x, t, y, w) trained so that its
output at scale w matches the classifier-free-guided teacher's,
eps(x, t, null) + w (eps(x, t, y) - eps(x, t, null)). Its stage card says so
(``StageCard.guidance_input``), and ``Pipeline.denoiser(guidance=w)`` then wraps it in
:class:`GuidanceInput` instead of :class:`~difflab.guidance.ClassifierFreeGuidance`.

The scale is carried to the network inside ``cond`` as a
:class:`~difflab.conditioning.GuidanceCond` (the condition plus w [B]); a U-Net built with
``guidance_embedding=True`` embeds it (``difflab.networks.with_guidance_embedding``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..conditioning import GuidanceCond, cat_cond, expand_cond, split_guidance
from ..parameterization import DenoiserFn, Prediction
from ..process import as_time, expand_like


class GuidanceInput:
    """D(x, t, cond) = inner(x, t, GuidanceCond(cond, w)) with the scale ``scale`` for every
    example (the pipeline's convention: 1 is the conditional model). A ``cond`` that already
    is a :class:`GuidanceCond` (per-example scales) is passed on unchanged."""

    def __init__(self, denoiser: DenoiserFn, scale: float):
        self.inner, self.scale = denoiser, float(scale)
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        if not isinstance(cond, GuidanceCond):
            w = torch.full((x.shape[0],), self.scale, dtype=torch.float32, device=x.device)
            cond = GuidanceCond(cond, w)
        return self.inner(x, t, cond)


class ScaleInputCFG:
    """Classifier-free guidance whose scale comes per example inside ``cond`` (a
    :class:`~difflab.conditioning.GuidanceCond`): D(x, t, (y, w)) = D(x, t, null) + w (D(x, t,
    y) - D(x, t, null)) applied to x0_hat and eps_hat (Ho & Salimans 2022), both branches in
    one batched call. It answers the same calls as a guidance-input student, so it is the
    teacher's side of guidance distillation (Meng et al. 2023, stage one; Luo et al. 2023).
    For a scalar w it equals :class:`~difflab.guidance.ClassifierFreeGuidance` with that
    scale. The null condition is ``null_label`` (class labels) or the one-row ``null_cond``
    (e.g. the empty prompt's TextCond); a ``None`` inner condition is the null itself."""

    def __init__(self, denoiser: DenoiserFn, null_label: int | None = None,
                 null_cond: Any = None):
        if (null_label is None) == (null_cond is None):
            raise ValueError("give exactly one of null_label and null_cond")
        self.inner, self.null_label, self.null_cond = denoiser, null_label, null_cond
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        inner, w = split_guidance(cond)
        if w is None:
            raise ValueError("ScaleInputCFG needs a GuidanceCond (the condition and w [B])")
        if inner is None:
            return self.inner(x, t, None)
        if self.null_cond is not None:
            null = expand_cond(self.null_cond, len(inner))
        else:
            null = torch.full_like(inner, self.null_label)
        t = as_time(t, x)
        tt = t.expand(x.shape[0]) if t.ndim == 0 else t
        both = self.inner(torch.cat([x, x]), torch.cat([tt, tt]), cat_cond([inner, null]))
        n = x.shape[0]
        g = expand_like(w, x)
        c0, u0, ce, ue = both.x0[:n], both.x0[n:], both.eps[:n], both.eps[n:]
        return Prediction(x0=u0 + g * (c0 - u0), eps=ue + g * (ce - ue))
