"""The local-Gaussian multistep sampler: DPM-Solver++ in a variance-shifted time.

In the EDM variables y = x / alpha, sigma~ = sigma / alpha the PF-ODE is dy / dsigma~ = eps_hat.
For any u >= 0 write q = sqrt(u + sigma~^2) and

    mu(y, sigma~) = y - (q^2 / sigma~) eps_hat(y, sigma~).

Then, exactly and for any data, dy / dq = (y - mu) / q: the data-prediction ODE of DPM-Solver++
(dy / dsigma~ = (y - x0_hat) / sigma~) with sigma~ replaced by q and x0_hat by mu. For isotropic
Gaussian data N(m, u I) that mu is the constant m (eps_hat = sigma~ (y - m) / q^2), so one step
y_{i+1} = mu + (q_{i+1} / q_i)(y_i - mu) is exact; u = 0 gives back x0_hat and DDIM.

Each step fits u per example to its last two evaluations (``base.two_point_variance``, the
least squares of ``two_point_gaussian_step``: x0_hat_i - x0_hat_{i-1} = u g,
g = eps_i / sigma~_i - eps_{i-1} / sigma~_{i-1}; exact for isotropic Gaussian data wherever the
two evaluations were made), recomputes mu of both with that u, and takes the step in
h = log(q_i / q_{i+1}):

- ``order=1``: the exact step of the fitted Gaussian, y_{i+1} = mu_i + (q_{i+1} / q_i)(y_i - mu_i);
- ``order=2`` (default): DPM-Solver++(2M), midpoint form (Lu et al. 2022b, Alg. 2), on mu:
  mu_i replaced by mu_i + (mu_i - mu_{i-1}) h / (2 h_prev), second order for smooth data and
  still exact for the Gaussian (there mu_i = mu_{i-1});
- ``order=3``: the exact integral of the quadratic through the last three mu (UniPC's
  third-order predictor, ``fit="none"`` gives UniP-3 bh2), the last step to clean data at
  most second order (the quadratic extrapolated to sigma~ = 0 made it up to 39x worse on
  the benchmark family).

The first step has no fit yet and is the DDIM step (u = 0). Once the second evaluation gives
u, that first step is taken again with it and the second evaluation moved to the new state by
the fitted Gaussian's own linear response (eps_hat changes by (sigma~ / q^2) dy), at no
evaluation: so the whole run is exact for isotropic Gaussian data, whatever the grid and NFE.
``fit="none"`` keeps u = 0: order 1 is then DDIM and order 2 DPM-Solver++(2M) (midpoint form).

The last step to clean data (sigma~ = 0, q = sqrt(u)) has the mu correction too
(``corrected_end=False``: the fitted Gaussian's exact end, ``two_point_gaussian_step``);
where u = 0 there it returns mu = x0_hat. On a rising grid (inversion) the same steps run
upwards and x at ts[-1] is returned.

``corrector=True`` (``local_unipc``) adds UniPC's corrector UniC (Zhao et al. 2023, Alg. 2) in
the same variables. With lambda = -log q the ODE reads dy / dlambda = mu - y, so a step of
length h from y_a is y = e^{-h} y_a + int_0^h e^{-(h - tau)} mu(lambda_a + tau) dtau. After
each evaluation the step that led to it is taken again with the new mu as one more node of
the polynomial in that integral (order + 1 nodes: the exact integral of the polynomial
through three or four, UniPC's B(h) = e^h - 1 rule through two), all under this evaluation's
u; the next step starts from the corrected state, so the corrector costs no evaluation. With
``fit="none"`` this is ``unipc_bh2`` of the same order. A Gaussian's mu is constant, so the
corrector is zero there and the run still exact.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from .base import (
    Callback,
    Generators,
    check_ode_grid,
    report,
    two_point_variance,
    zero_snr_start,
)
from .options import SamplerOption, declare_options

FITS = ("two_point", "none")


def fit_variance(x0: Tensor, eps: Tensor, st: float, x0_prev: Tensor, eps_prev: Tensor,
                 st_prev: float) -> Tensor:
    """u >= 0 per example, shaped to broadcast over x: the isotropic Gaussian variance fitted
    by least squares to two evaluations (module docstring). A u within the rounding of the
    x0_hat difference (|u| <= 4 eps_mach (|x0_hat| + |x0_hat_prev|) / |g|, Cauchy-Schwarz) is
    0: the end at q = sqrt(u) would turn rounding of 1e-16 into 1e-8."""
    u, g_norm = two_point_variance(x0, eps, x0_prev, eps_prev, st, st_prev)
    dims = tuple(range(1, eps.ndim))
    norm = lambda v: v.pow(2).sum(dims, keepdim=True).sqrt()  # noqa: E731
    noise = 4 * torch.finfo(eps.dtype).eps * (norm(x0) + norm(x0_prev)) / g_norm
    return torch.where(u > noise, u, torch.zeros_like(u))


def _mu(x0: Tensor, eps: Tensor, st: float, u: Tensor) -> Tensor:
    """mu = y - (q^2 / sigma~) eps_hat = x0_hat - (u / sigma~) eps_hat: the data prediction in
    the shifted time q (the second form has no cancellation where sigma~ is large)."""
    return x0 - (u / st) * eps


def _step(d: Tensor, mu: Tensor, eps: Tensor, st: float, q: Tensor, q_next: Tensor) -> Tensor:
    """The first-order step in q on the data prediction d: d + (q_next / q)(y - d), with
    y - d = (q^2 / sigma~) eps_hat + (mu - d) (y itself is not differenced: it is ~sigma~
    where that is large, d is of the data's size)."""
    return d + (q_next / q) * ((q * q / st) * eps + (mu - d))


def _corrected(mu: Tensor, mu_prev: Tensor, q_prev: Tensor, q: Tensor,
               q_next: Tensor) -> Tensor:
    """DPM-Solver++(2M)'s midpoint data prediction mu + (mu - mu_prev) h / (2 h_prev), with
    h = log(q / q_next); mu where it is not finite (q_next = 0: the end with u = 0)."""
    ratio = torch.log(q / q_next) / (2 * torch.log(q_prev / q))
    d = mu + ratio * (mu - mu_prev)
    return torch.where(torch.isfinite(d), d, mu)


def _psi(h: Tensor, m_max: int) -> list[Tensor]:
    """psi_m(h) = int_0^h e^{-(h - tau)} tau^m / m! dtau = h^{m+1} phi_{m+1}(-h) for
    m = 0..m_max, per example (``expint.phi`` is the scalar one): the recursion
    psi_m = h^m / m! - psi_{m-1} (psi_0 = 1 - e^{-h}) where |h| >= 1, the series
    sum_j (-1)^j h^{m+1+j} / (m+1+j)! below (the recursion cancels there)."""
    small = h.abs() < 1
    hs = torch.where(small, h, torch.zeros_like(h))
    out, rec = [], -torch.expm1(-h)
    for m in range(m_max + 1):
        if m > 0:
            rec = h**m / math.factorial(m) - rec
        series = sum((-1) ** j * hs ** (m + 1 + j) / float(math.factorial(m + 1 + j))
                     for j in range(20))
        out.append(torch.where(small, series, rec))
    return out


def _beyond(h: Tensor, taus: list[Tensor], mus: list[Tensor]) -> Tensor:
    """int_0^h e^{-(h - tau)} (p(tau) - mus[0]) dtau, p the polynomial through (taus[j], mus[j])
    with taus[0] = 0: the part of an exponential-integrator step (dy / dlambda = mu - y) beyond
    its first-order term, p in Newton form (divided differences f_k, basis products expanded
    into powers of tau, each integrated by ``_psi``)."""
    f = list(mus)
    k = len(taus)
    for level in range(1, k):
        for j in range(k - 1, level - 1, -1):
            f[j] = (f[j] - f[j - 1]) / (taus[j] - taus[j - level])
    psi = _psi(h, k - 1)
    poly: list = [1.0]  # prod_{j < level} (tau - taus[j]) as powers of tau
    total = torch.zeros_like(mus[0])
    for level in range(k):
        if level > 0:
            total = total + f[level] * sum(c * math.factorial(m) * psi[m]
                                           for m, c in enumerate(poly))
        shifted = [0.0, *poly]
        poly = [shifted[m] - (taus[level] * poly[m] if m < len(poly) else 0.0)
                for m in range(len(shifted))]
    return total


def _unic(mu: Tensor, back: list[Tensor], r_prev: Tensor, h: Tensor,
          offsets: list[Tensor]) -> Tensor:
    """UniC (module docstring): the step of length h (in lambda = -log q) from the previous
    level again, now with mu (this evaluation, at tau = h) as a node beside ``back`` (the
    earlier mu, newest first, at tau = 0 and at ``offsets`` < 0). ``r_prev`` is the previous
    state minus back[0]. Returns the corrected state at this level: back[0] + e^{-h} r_prev +
    the integral of the polynomial's part beyond back[0]; through two nodes UniPC's
    B(h) = e^h - 1 rule (a_1 = 1/2), through more the exact integral."""
    if len(back) == 1:
        beyond = 0.5 * -torch.expm1(-h) * (mu - back[0])
    else:
        beyond = _beyond(h, [torch.zeros_like(h), h, *offsets], [back[0], mu, *back[1:]])
    return back[0] + torch.exp(-h) * r_prev + beyond


_ORDER = SamplerOption("order", int, 2, "1: each step the exact step of the Gaussian fitted "
                       "to the last two evaluations; 2: DPM-Solver++(2M) in the variance-"
                       "shifted time (second order, still exact for isotropic Gaussian data); "
                       "3: the exact integral of the quadratic through the last three mu "
                       "(UniPC's third-order predictor)", choices=(1, 2, 3))
_CORRECTED_END = SamplerOption("corrected_end", bool, True, "with order >= 2, the last step "
                               "to clean data with the second-order correction too (false: the "
                               "fitted Gaussian's exact end, base.two_point_gaussian_step)")
_FIT = SamplerOption("fit", str, "two_point", "how u (the Gaussian's variance) is chosen: "
                     "'two_point' fitted per example to the last two evaluations; 'none' u = "
                     "0, which is DDIM (order 1) or DPM-Solver++(2M), midpoint form (order 2); "
                     "with the corrector, unipc_bh2", choices=FITS)


class _Evaluation(NamedTuple):
    """One evaluation: the model's x0_hat and eps_hat at the state y_eval of level sigma~,
    and the state the next step started from (y_eval, or the corrector's state)."""

    x0: Tensor
    eps: Tensor
    st: float
    y_eval: Tensor
    y_state: Tensor


def _corrected_state(mu: Tensor, back: list[tuple[Tensor, Tensor]], hist: list[_Evaluation],
                     q: Tensor, order: int) -> Tensor:
    """The state at this level by UniC (``_unic``) from the previous one, with ``back`` the
    (mu, q) of the earlier evaluations ``hist`` under this step's u (up to ``order`` of them
    are nodes)."""
    (_, q_prev), prev = back[0], hist[0]
    r_prev = (q_prev * q_prev / prev.st) * prev.eps + (prev.y_state - prev.y_eval)
    used = back[:order]
    offsets = [torch.log(q_prev / qj) for _, qj in used[1:]]  # lambda_j - lambda_prev < 0
    return _unic(mu, [m for m, _ in used], r_prev, torch.log(q_prev / q), offsets)


def _predictor_beyond(mu: Tensor, back: list[tuple[Tensor, Tensor]], q: Tensor,
                      q_next: Tensor) -> Tensor:
    """The third-order predictor's part beyond the first-order step: the exact integral of the
    quadratic through mu and the two earlier mu (``_beyond``); 0 where it is not finite
    (q_next = 0: the end with u = 0, where the step is x0_hat)."""
    offsets = [torch.log(q / qj) for _, qj in back[:2]]
    extra = _beyond(torch.log(q / q_next), [torch.zeros_like(q), *offsets],
                    [mu, back[0][0], back[1][0]])
    return torch.where(torch.isfinite(extra), extra, torch.zeros_like(extra))


@declare_options(
    _ORDER, _CORRECTED_END, _FIT,
    SamplerOption("corrector", bool, False, "UniPC's corrector UniC in the shifted time "
                  "(order + 1, no extra evaluation; with fit='none' this is unipc_bh2)"))
@zero_snr_start
@torch.no_grad()
def local_gaussian(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                   callback: Callback | None = None, *, cond: Any = None, order: int = 2,
                   corrected_end: bool = True, fit: str = "two_point",
                   corrector: bool = False) -> Tensor:
    """The local-Gaussian multistep sampler (module docstring): one evaluation per step,
    exact for isotropic Gaussian data on any grid, first (``order=1``) or second order in
    general, one order more with the ``corrector``. Returns clean data after the last step
    (x at ts[-1] on a rising grid)."""
    if order not in (1, 2, 3) or fit not in FITS:
        raise ValueError(f"local_gaussian: order must be 1, 2 or 3 and fit one of "
                         f"{', '.join(FITS)}; got {order}, {fit!r}")
    ts, rising = check_ode_grid(ts, denoiser.process)
    process = denoiser.process
    a = process.alpha(ts).tolist()
    st = (-0.5 * process.log_snr(ts)).exp().tolist()
    n = len(ts) - 1
    if not rising:
        st[-1] = 0.0  # the last step goes to clean data
    y = x / a[0]
    zero = torch.zeros_like(y.flatten(1)[:, :1]).view(-1, *([1] * (y.ndim - 1)))
    hist: list[_Evaluation] = []  # the earlier evaluations, newest first
    # as many as are used: the corrector's nodes (order), the third-order predictor's (2)
    keep = max(order if corrector else 1, 2 if order == 3 else 1)
    for i in range(n):
        pred = denoiser(a[i] * y, ts[i], cond)
        x0, eps = pred.x0, pred.eps
        s, s_next = st[i], st[i + 1]
        u = zero
        if hist and fit == "two_point":
            u = fit_variance(x0, eps, s, hist[0].x0, hist[0].eps, hist[0].st)
        q, q_next = (u + s * s).sqrt(), (u + s_next * s_next).sqrt()
        # the earlier evaluations' mu and q under this step's u
        back = [(_mu(e.x0, e.eps, e.st, u), (u + e.st**2).sqrt()) for e in hist]
        if i == 1 and fit == "two_point":
            # the first step again, with the fitted Gaussian; this evaluation moved along
            (mu_prev, q_prev), prev = back[0], hist[0]
            y_new = _step(mu_prev, mu_prev, prev.eps, prev.st, q_prev, q)
            eps = eps + (s / (q * q)) * (y_new - y)
            y, x0 = y_new, y_new - s * eps
        mu = _mu(x0, eps, s, u)
        y_state = _corrected_state(mu, back, hist, q, order) if corrector and hist else y
        last = i == n - 1 and not rising
        d, extra = mu, 0.0
        if order == 3 and len(hist) > 1 and not last:
            extra = _predictor_beyond(mu, back, q, q_next)
        elif hist and order > 1 and (corrected_end or not last):
            d = _corrected(mu, back[0][0], back[0][1], q, q_next)
        hist = [_Evaluation(x0, eps, s, y, y_state), *hist][:keep]
        # from y_state: y_state - d = (q^2 / sigma~) eps_hat + (mu - d) + (y_state - y)
        y = _step(d, mu + (y_state - y), eps, s, q, q_next) + extra
        if last:
            report(callback, i, ts[i], y, Prediction(x0=y, eps=eps))
            return y
        report(callback, i, ts[i], a[i + 1] * y, Prediction(x0=x0, eps=eps))
    return a[-1] * y


@declare_options(_ORDER, _CORRECTED_END, _FIT)
def local_unipc(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                callback: Callback | None = None, *, cond: Any = None, order: int = 2,
                corrected_end: bool = True, fit: str = "two_point") -> Tensor:
    """UniPC in the variance-shifted time: ``local_gaussian`` with its ``corrector`` (module
    docstring); exact for isotropic Gaussian data, ``unipc_bh2`` with ``fit="none"``."""
    return local_gaussian(denoiser, x, ts, generator, callback, cond=cond, order=order,
                          corrected_end=corrected_end, fit=fit, corrector=True)


__all__ = ["FITS", "fit_variance", "local_gaussian", "local_unipc"]
