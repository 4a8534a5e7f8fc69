"""Langevin samplers.

- ``pc``: predictor-corrector sampling (Song et al. 2021, Alg. 1 and Alg. 5 for VP): before
  each ancestral (DDPM posterior) predictor step, ``n_corrector`` Langevin steps
  x <- x + e s + sqrt(2 e) z with the step size set from the signal-to-noise ratio r,
  e = 2 alpha_{t|s}^2 (r ||z|| / ||s||)^2, s = -eps_hat / sigma the score. As in the paper's
  code the norms are batch means of per-example norms (a per-example ratio explodes where
  the score vanishes), so this one sampler couples the examples of a batch.
- ``annealed_langevin``: annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) in the
  variance-exploding coordinates y = x / alpha with noise level sigma~ = sigma / alpha, where a
  VP marginal is the data blurred by N(0, sigma~^2) as in NCSN: at every level ``n_steps``
  steps y <- y + (a_i / 2) s + sqrt(a_i) z with a_i = eps sigma~_i^2 / sigma~_L^2.

Both end like every sampler: the last step returns x0_hat.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import Callback, Generators, check_grid, final_step, randn_like, report, zero_snr_start
from .options import SamplerOption, declare_options


def _langevin_step(x: Tensor, score: Tensor, z: Tensor, snr: float, a_ratio2: float) -> Tensor:
    """Song et al. 2021, Alg. 5 lines 6-8 (norms averaged over the batch)."""
    g = score.flatten(1).norm(dim=1).mean()
    n = z.flatten(1).norm(dim=1).mean()
    e = 2 * a_ratio2 * (snr * n / g.clamp(min=1e-30)) ** 2
    return x + e * score + (2 * e).sqrt() * z


@declare_options(
    SamplerOption("snr", float, 0.16, "signal-to-noise ratio r that sets the Langevin step "
                  "size", min=0.0),
    SamplerOption("n_corrector", int, 1, "Langevin corrector steps before each predictor "
                  "step", min=0))
@torch.no_grad()
def pc(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
       callback: Callback | None = None, *, cond: Any = None, snr: float = 0.16,
       n_corrector: int = 1) -> Tensor:
    """Predictor-corrector (Song et al. 2021, Alg. 3/5): ancestral predictor, Langevin
    corrector with step size from ``snr``; 1 + n_corrector evaluations per step."""
    ts = check_grid(ts)
    a, s = denoiser.process.alpha_sigma(ts)
    al, sl = a.tolist(), s.tolist()
    for i in range(len(ts) - 1):
        a_ratio2 = (al[i] / al[i + 1]) ** 2 if i + 1 < len(ts) - 1 else 1.0
        for _ in range(n_corrector):
            pred = denoiser(x, ts[i], cond)
            x = _langevin_step(x, pred.score(s[i]), randn_like(x, generator), snr, a_ratio2)
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], pred)
        # Ho et al. 2020 eq. 7 on the grid: posterior q(x_s | x_t, x0_hat)
        ats, s_t, a_s, s_s = al[i] / al[i + 1], sl[i], al[i + 1], sl[i + 1]
        var_ts = max(s_t**2 - ats**2 * s_s**2, 0.0)
        mean = (a_s * var_ts / s_t**2) * pred.x0 + (ats * s_s**2 / s_t**2) * x
        x = mean + math.sqrt(var_ts * s_s**2 / s_t**2) * randn_like(x, generator)
        report(callback, i, ts[i], x, pred)
    return x


@declare_options(
    SamplerOption("n_steps", int, 10, "Langevin steps (evaluations) per noise level", min=1),
    SamplerOption("eps", float, 0.2, "step size at the smallest level, in units of its "
                  "variance", min=0.0, min_exclusive=True))
@zero_snr_start
@torch.no_grad()
def annealed_langevin(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                      callback: Callback | None = None, *, cond: Any = None,
                      n_steps: int = 10, eps: float = 0.2) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise levels of the
    grid (but the last); ``n_steps`` evaluations per level. ``eps`` is the step at the
    smallest level in units of its variance (NCSN's eps / sigma_L^2)."""
    ts = check_grid(ts)
    a, s = denoiser.process.alpha_sigma(ts)
    al, st = a.tolist(), (s / a).tolist()
    y = x / al[0]
    for i in range(len(ts) - 1):
        if i == len(ts) - 2:
            return final_step(callback, i, ts[i], denoiser(al[i] * y, ts[i], cond))
        step = eps * st[i] ** 2
        for _ in range(n_steps):
            pred = denoiser(al[i] * y, ts[i], cond)
            # score in y: alpha * (-eps / sigma) = -eps / sigma~
            y = y - (step / 2) * pred.eps / st[i] + math.sqrt(step) * randn_like(y, generator)
        report(callback, i, ts[i], al[i + 1] * y, pred)
    return x


__all__ = ["annealed_langevin", "pc"]
