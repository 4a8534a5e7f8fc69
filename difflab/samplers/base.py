"""What every sampler shares: the signature, argument checks, the callback, noise draws and the
last step.

Signature (DESIGN.md): ``sampler(denoiser, x, ts, generator=None, callback=None, *, cond=None,
**options) -> x0``, where ``x`` is the initial state at ``ts[0]`` and ``ts`` a decreasing grid
whose last entry is the end time. Each sampler declares its options (names, types, defaults,
help, ranges) with ``options.declare_options``; ``difflab.samplers.check_sampler_options``
validates a user's options against that declaration.

The last step. By default it returns the denoised x0_hat of the last network evaluation, with
no residual noise: for grids ending at clean data this is what the exact update gives anyway,
and for processes whose t_min still has noise it is the usual "final denoising step".
Every multistep ODE sampler that can do better takes one option for it, ``final_order`` (int
>= 1), with one meaning everywhere:

- ``final_order = 1``: return x0_hat of the last evaluation (the Euler step to sigma~ = 0);
- ``final_order = k > 1``: on a grid ending at sigma = 0, the last step, from sigma~_{N-1} to
  sigma~ = 0, is instead the variable-step Adams-Bashforth step in sigma~ = sigma / alpha
  through the latest k eps_hat (fewer if fewer evaluations were made; ``final_sigma_step``).
  The result is still noise-free clean data, of higher order than x0_hat alone, and is
  reported as both x and x0. On a grid ending at a noisy time it is x0_hat again.
- ``final_order = 0`` (plms, lms, dpmpp_2m, dpmpp_3m, unipc*): the local-Gaussian step
  (``gaussian_final_step``): x0_hat plus the share of the remaining sigma~ eps_hat that the
  exact PF-ODE of a Gaussian fitted to the last two eps_hat leaves. It is exact for
  isotropic Gaussian data, returns x0_hat where the data are unresolved at sigma~_{N-1}
  (eps_hat still pure noise) and (y + x0_hat) / 2 where they are resolved (eps_hat shrinking
  like sigma~), where the Adams-Bashforth step's extrapolation of eps_hat over
  [0, sigma~_{N-1}] amplifies (on trailing DDPM grids sigma~ ~ sqrt(t) near the data, and the
  sum of |weights| / step of the order-4 step is 42, order 3 12, order 2 3.4).

Samplers that take it and their defaults (each keeps its published behaviour): ``plms`` 4,
``lms`` None (= its ``order``), ``dpmpp_2m``, ``dpmpp_3m``, ``unipc_bh1``, ``unipc_bh2`` 1.
The other samplers always return x0_hat and do not take the option.

The deterministic (probability-flow ODE) samplers, ``ODE_SAMPLERS``, also accept a strictly
*increasing* grid starting at a noisy time (``check_ode_grid``): they then integrate the ODE
upwards with the same formulas (which hold for negative steps in lambda or sigma~), take every
step to the last grid point instead of the final denoising step (``final_order`` is ignored),
and return the state there. That is inversion x_t -> x_T (``difflab.editing.ode_invert``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..parameterization import Prediction
from .expint import lagrange_weights
from .options import GAUSSIAN_FITS


@dataclass(frozen=True)
class StepInfo:
    """Passed to the callback after each step."""

    i: int          # step index, 0..N-1
    t: Tensor       # time of the network evaluation
    x: Tensor       # state after the step
    x0: Tensor      # denoised estimate at t


Callback = Callable[[StepInfo], None]


def check_grid(ts: Tensor) -> Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"time grid must be 1-D with at least 2 entries, got shape "
                         f"{tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("time grid must be strictly decreasing")
    return ts


def check_ode_grid(ts: Tensor, process) -> tuple[Tensor, bool]:
    """A strictly decreasing grid (sampling), or a strictly increasing one (inversion) whose
    first time is noisy (sigma > 0, where the denoiser is defined); returns (ts, rising)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim == 1 and ts.numel() >= 2 and bool((ts[1:] > ts[:-1]).all()):
        if not float(process.sigma(ts[0])) > 0:
            raise ValueError("a rising (inversion) grid must start at a noisy time, sigma > 0")
        return ts, True
    return check_grid(ts), False


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Gaussian noise of x's shape, dtype and device from ``generator``.

    A sequence of generators, one per example, draws each example's noise from its own
    generator: an image then depends only on its seed, not on the batch it was drawn in.
    """
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype,
                                        device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def report(callback: Callback | None, i: int, t: Tensor, x: Tensor, pred: Prediction) -> None:
    if callback is not None:
        callback(StepInfo(i=i, t=t, x=x, x0=pred.x0))


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE): ``nfe`` after a sampler call is the
    number of network evaluations it used; adaptive solvers (``rk45``) are read this way."""

    def __init__(self, denoiser):
        self.inner, self.process, self.nfe = denoiser, denoiser.process, 0

    def __call__(self, x: Tensor, t: Tensor | float, cond=None) -> Prediction:
        self.nfe += 1
        return self.inner(x, t, cond)


def final_step(callback: Callback | None, i: int, t: Tensor, pred: Prediction,
               x: Tensor | None = None, alpha: float = 1.0, sigma_tilde: list[float] | None = None,
               eps_hist: list[Tensor] | None = None, gaussian: bool = False,
               x0_prev: Tensor | None = None) -> Tensor:
    """The shared last step: return the denoised x0_hat (no residual noise) and report it.

    Given the state x at the last noisy level, sigma~ = sigma / alpha on the grid (ending at 0)
    and more than one recent eps_hat (newest first), the step to sigma~ = 0 is instead the
    Adams-Bashforth step in sigma~ through them (with one it is exactly x0_hat): still clean
    data, but of higher order than x0_hat of the last evaluation alone (``final_order``).
    With ``gaussian`` it is ``gaussian_final_step`` on the latest two (``final_order=0``), or
    with ``x0_prev`` (x0_hat of the evaluation before, at sigma~_{N-2})
    ``two_point_gaussian_step`` (``gaussian_fit="two_point"``)."""
    out = pred.x0
    if eps_hist is not None and len(eps_hist) > 1 and sigma_tilde and sigma_tilde[-1] == 0:
        if gaussian and x0_prev is not None:
            out = two_point_gaussian_step(pred.x0, eps_hist[0], x0_prev, eps_hist[1],
                                          sigma_tilde[-2], sigma_tilde[-3])
        elif gaussian:
            out = gaussian_final_step(pred.x0, eps_hist[0], eps_hist[1], sigma_tilde[-2],
                                      sigma_tilde[-3])
        else:
            out = final_sigma_step(x, alpha, sigma_tilde, eps_hist, len(eps_hist))
        pred = Prediction(x0=out, eps=pred.eps)
    report(callback, i, t, out, pred)
    return out


def gaussian_final_step(x0: Tensor, eps: Tensor, eps_prev: Tensor, st: float,
                        st_prev: float) -> Tensor:
    """The last step to sigma~ = 0 of the PF-ODE, exact for isotropic Gaussian data.

    For data N(mu, s^2 I) the PF-ODE in y = x / alpha keeps z fixed: y(sigma~) = mu
    + q z with q = sqrt(s^2 + sigma~^2), x0_hat = mu + (s^2 / q) z and eps_hat = (sigma~ / q) z,
    so y(0) = mu + s z = x0_hat + c sigma~ eps_hat with c = t / (1 + t), t = s / q. The ratio
    of the latest two eps_hat (at sigma~ = ``st`` and ``st_prev``, per example, least squares
    over its elements) gives kappa = (st_prev / st) <eps, eps_prev> / |eps_prev|^2 = q_prev / q,
    whence t^2 = (r^2 - kappa^2) / (r^2 - 1), r = st_prev / st (kappa clipped to [1, r]):
    t -> 0 (x0_hat) where eps_hat is still the noise, unchanged by the step (data unresolved
    at sigma~), t -> 1 ((y + x0_hat) / 2, the O(sigma~^4) step of the small-noise expansion
    y = y0 - sigma~^2 g / 2, x0_hat = y0 + sigma~^2 g / 2) where eps_hat shrinks like sigma~."""
    r = st_prev / st
    dims = tuple(range(1, eps.ndim))
    dot = (eps * eps_prev).sum(dims, keepdim=True)
    norm = (eps_prev * eps_prev).sum(dims, keepdim=True)
    kappa = (r * dot / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(1.0, r)
    t = ((r * r - kappa * kappa) / (r * r - 1.0)).clamp_min(0.0).sqrt()
    return _gaussian_end(x0, eps, st, t)


def _gaussian_end(x0: Tensor, eps: Tensor, st: float, t: Tensor) -> Tensor:
    """y(0) = x0_hat + t / (1 + t) sigma~ eps_hat: the exact PF-ODE end of a Gaussian with
    t = s / q (``gaussian_final_step``), however t was estimated."""
    return x0 + (t / (1.0 + t)) * st * eps


def two_point_fit(gaussian_fit: str) -> bool:
    """Whether ``gaussian_fit`` (``final_order=0``'s fit) is "two_point"; any name but the
    two is an error."""
    if gaussian_fit not in GAUSSIAN_FITS:
        raise ValueError(f"gaussian_fit must be one of {', '.join(GAUSSIAN_FITS)}, got "
                         f"{gaussian_fit!r}")
    return gaussian_fit == "two_point"


def two_point_gaussian_step(x0: Tensor, eps: Tensor, x0_prev: Tensor, eps_prev: Tensor,
                            st: float, st_prev: float) -> Tensor:
    """The local-Gaussian last step with the Gaussian fitted to the last two evaluations
    themselves, wherever they were made (``gaussian_fit="two_point"``).

    For data N(mu, u I) the denoiser at y and sigma~ has eps_hat = sigma~ (y - mu) / q^2 with
    q^2 = u + sigma~^2, so y - mu = (q^2 / sigma~) eps_hat at each evaluation. Subtracting the
    two (y = x0_hat + sigma~ eps_hat) gives d linear equations in the one unknown u,

        x0_hat - x0_hat_prev = u g,   g = eps_hat / sigma~ - eps_hat_prev / sigma~_prev,

    solved by least squares per example (u clipped at 0). Then the exact step of
    ``gaussian_final_step``: y(0) = x0_hat + t / (1 + t) sigma~ eps_hat, t = sqrt(u / q^2).
    Unlike the ratio of the last two eps_hat, which assumes both lie on one exact trajectory
    and whose estimate degrades like (q_prev / q - sigma~_prev / sigma~) where sigma~ >> s,
    this fit is exact for isotropic Gaussian data whatever error the solver has made in y,
    and its estimate of u is a difference of x0_hat, not of two nearly equal ratios."""
    u = two_point_variance(x0, eps, x0_prev, eps_prev, st, st_prev)[0].clamp_min(0.0)
    return _gaussian_end(x0, eps, st, (u / (u + st * st)).sqrt())


def two_point_variance(x0: Tensor, eps: Tensor, x0_prev: Tensor, eps_prev: Tensor,
                       st: float, st_prev: float) -> tuple[Tensor, Tensor]:
    """The variance u of the isotropic Gaussian through two evaluations, per example and not
    clipped: least squares of x0_hat - x0_hat_prev = u g, g = eps_hat / sigma~ - eps_hat_prev
    / sigma~_prev (``two_point_gaussian_step``); also |g|. Both keep x's dimensions as 1."""
    dims = tuple(range(1, eps.ndim))
    g = eps / st - eps_prev / st_prev
    gg = (g * g).sum(dims, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    return ((x0 - x0_prev) * g).sum(dims, keepdim=True) / gg, gg.sqrt()


def final_sigma_step(x: Tensor, alpha: float, st: list[float], eps_hist: list[Tensor],
                     order: int) -> Tensor:
    """A higher-order last step for any sampler: from x at sigma~_{N-1} to sigma~ = 0 by the
    Adams-Bashforth rule in sigma~ on the latest eps_hat (newest first). With one output it is
    the Euler step, i.e. x0_hat; ``st`` is sigma~ on the whole grid."""
    (w,) = final_weights(st, order)
    y = x / alpha
    for wj, ej in zip(w, eps_hist, strict=False):
        y = y + wj * ej
    return y


def final_weights(st: list[float], order: int) -> list[list[float]]:
    """Adams-Bashforth weights of the last step, from sigma~_{N-1} to sigma~_N = 0, on the
    latest ``order`` outputs (newest first): the Lagrange polynomial of eps_hat in sigma~
    through them integrated exactly over [sigma~_{N-1}, 0], as ``lagrange_weights`` with c = 0
    gives. A one-element list, or none where t_min is still noisy."""
    if st[-1] > 0:
        return []
    n = len(st) - 2
    h = -st[n]
    nodes = [st[n - j] - st[n] for j in range(min(order, n + 1))]  # newest first
    return [[h * w for w in lagrange_weights(nodes, h, 0.0)]]


#: sigma~ = sigma / alpha falling by more than this factor over the noisiest interval of a grid
#: marks a schedule that ends abruptly: the discrete cosine schedule, whose last beta is clamped
#: to 0.999, has sigma~ = 2.0e4 at t = T against 642 at T - 1, so every trailing grid up to 64
#: steps starts with a drop of 500 to 2e4; smooth schedules stay below about 100 (sigmoid, 2
#: trailing steps), Karras and log-SNR grids far below.
STEEP_START_RATIO = 200.0


def steep_noisy_end(process, ts: Tensor) -> bool:
    """Whether the grid's noisiest interval (the first when sampling, the last on a rising
    inversion grid) spans a drop in sigma~ beyond ``STEEP_START_RATIO``. There a higher-order
    correction extrapolates the change of eps_hat over orders of magnitude of sigma~ (Heun's
    trapezoid multiplies it by the step in sigma~, DPM-Solver's noise form by e^h) and is far
    worse than the first-order DDIM step, which is exact while eps_hat stays constant, as it
    does out of pure noise. Heun and singlestep DPM-Solver then take that interval first
    order, as the multistep solvers always do."""
    ends = ts[-2:].flip(0) if bool(ts[-1] > ts[0]) else ts[:2]
    a, s = process.alpha_sigma(ends)
    if not (float(a[0]) > 0 and float(s[1]) > 0):
        return False
    return float((s[0] / a[0]) / (s[1] / a[1])) > STEEP_START_RATIO


def zero_snr_start(sampler: Callable) -> Callable:
    """Let a sampler start at zero terminal SNR (alpha(ts[0]) = 0, Lin et al. 2024).

    There sigma~ = sigma / alpha and -lambda are infinite, so solvers written in them cannot
    take their first step. The first step is then the DDIM (eta = 0) step out of pure noise,
    x_s = alpha_s x0_hat + sigma_s eps_hat (exact given the prediction, finite for every
    prediction type), and the wrapped sampler continues from ts[1] with its own method.
    Symmetrically, a rising (inversion) grid that ends at alpha = 0 takes its last step, into
    pure noise, as the DDIM step x_T = alpha_T x0_hat + sigma_T eps_hat. Other grids go to the
    sampler unchanged."""

    @functools.wraps(sampler)
    def wrapped(denoiser, x: Tensor, ts: Tensor, generator: Generators = None,
                callback: Callback | None = None, **options):
        ts, rising = check_ode_grid(ts, denoiser.process)
        if rising and len(ts) > 2 and float(denoiser.process.alpha(ts[-1])) == 0:
            x = sampler(denoiser, x, ts[:-1], generator, callback, **options)
            with torch.no_grad():
                pred = denoiser(x, ts[-2], options.get("cond"))
                a, s = denoiser.process.alpha_sigma(ts[-1])
                x = a.to(x.dtype) * pred.x0 + s.to(x.dtype) * pred.eps
            report(callback, len(ts) - 2, ts[-2], x, pred)
            return x
        if rising or float(denoiser.process.alpha(ts[0])) > 0:
            return sampler(denoiser, x, ts, generator, callback, **options)
        with torch.no_grad():
            pred = denoiser(x, ts[0], options.get("cond"))
            if len(ts) == 2:
                return final_step(callback, 0, ts[0], pred)
            a, s = denoiser.process.alpha_sigma(ts[1])
            x = a.to(x.dtype) * pred.x0 + s.to(x.dtype) * pred.eps
        report(callback, 0, ts[0], x, pred)
        shifted = None if callback is None else (
            lambda info: callback(dataclasses.replace(info, i=info.i + 1)))
        return sampler(denoiser, x, ts[1:], generator, shifted, **options)

    return wrapped
