"""Score-SDE samplers (Song et al. 2021): reverse-SDE Euler-Maruyama and probability-flow ODE
Euler, written in log-SNR lambda so they work for every process.

For x_t = alpha x_0 + sigma eps with lambda(t) = log(alpha^2 / sigma^2), the forward SDE has
f(t) = d log alpha / dt = k lambda'(t) with k = d log alpha / d lambda
(``Process.log_alpha_slope``: sigma^2 / 2 for VP processes, sigma / 2 for rectified flow, 0
for VE), and g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = -sigma^2 lambda'(t) for every process
(d log sigma / d lambda = k - 1/2). With the score -eps/sigma and h = lambda_{i+1} - lambda_i
> 0 (time runs backwards), eq. 6 (reverse SDE) and eq. 13 (probability flow) become

  reverse SDE:  dx = k x dlambda - sigma eps dlambda + sigma dW_lambda,
  PF ODE:       dx = (k x - sigma eps / 2) dlambda,

which Euler(-Maruyama) steps with dlambda = h. The last step returns x0_hat (``final_step``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from .base import (
    Callback,
    Generators,
    check_grid,
    check_ode_grid,
    final_step,
    randn_like,
    report,
    zero_snr_start,
)
from .options import declare_options


@torch.no_grad()
def _euler(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators,
           callback: Callback | None, cond: Any, stochastic: bool) -> Tensor:
    # the ODE also runs upwards on a rising grid (h < 0: inversion); the SDE does not
    ts, rising = (check_grid(ts), False) if stochastic else check_ode_grid(ts, denoiser.process)
    lam = denoiser.process.log_snr(ts)
    s = denoiser.process.sigma(ts)
    h = (lam[1:] - lam[:-1]).tolist()
    sig, slope = s.tolist(), denoiser.process.log_alpha_slope(lam).tolist()
    for i in range(len(ts) - 1):
        pred = denoiser(x, ts[i], cond)
        if i == len(ts) - 2 and not rising:
            return final_step(callback, i, ts[i], pred)
        si, hi, ki = sig[i], h[i], slope[i]
        if stochastic:
            x = (1 + ki * hi) * x - si * hi * pred.eps
            x = x + si * math.sqrt(hi) * randn_like(x, generator)
        else:
            x = (1 + ki * hi) * x - 0.5 * si * hi * pred.eps
        report(callback, i, ts[i], x, pred)
    return x


@declare_options()
@zero_snr_start
def euler_maruyama(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                   callback: Callback | None = None, *, cond: Any = None) -> Tensor:
    """Reverse-SDE Euler-Maruyama (Song et al. 2021, eq. 6), step dlambda. Weak order 1."""
    return _euler(denoiser, x, ts, generator, callback, cond, stochastic=True)


@declare_options()
@zero_snr_start
def euler_ode(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
              callback: Callback | None = None, *, cond: Any = None) -> Tensor:
    """Probability-flow ODE Euler in log-SNR (Song et al. 2021, eq. 13 written in lambda):
    x <- (1 + k h) x - sigma h eps_hat / 2 with h = dlambda, stepping the ODE in x itself, for
    every process (VE and rectified flow too). Order 1. This is *not* the "Euler" of
    k-diffusion and diffusers (Euler in sigma~ = sigma / alpha on x / alpha, which equals
    DDIM): that one is ``heun.euler``, registered as ``euler``. Also runs upwards on a rising
    grid (inversion), returning x at ts[-1]."""
    return _euler(denoiser, x, ts, generator, callback, cond, stochastic=False)


__all__ = ["euler_maruyama", "euler_ode"]
