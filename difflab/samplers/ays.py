"""Sampling schedules that generalise: a KL-bound optimiser and a two-parameter grid family.

``optimize_schedule`` follows "Align Your Steps" (Sabour et al. 2024, Sec. 3): it chooses the
noise levels that minimise an upper bound on the KL divergence between the true reverse-time
SDE and the one a first-order sampler simulates, which holds the denoiser constant over each
step. Written in sigma~ = sigma / alpha and y = x / alpha (every Gaussian process is then
y = x0 + sigma~ eps, the variance-exploding form), the reverse SDE has drift -2 (D(y, s) - y) / s
and diffusion sqrt(2 s); by Girsanov the KL between the exact path measure and the one with
D(y_i, s_i) frozen over [s_{i+1}, s_i] is bounded by

    KLUB = sum_i int_{s_{i+1}}^{s_i} E || D(x0 + s eps, s) - D(x0 + s_i eps, s_i) ||^2 / s^3 ds,

which needs only the denoiser and data draws (no reference solutions), as in the paper
(Theorem 3.1, with the same eps along the path). Instead of the paper's iterative
coordinate-wise search, the bound is evaluated on a fine set of candidate levels and the
best N-step schedule among them is found exactly by dynamic programming (a shortest path
with N - 1 edges; the cost of every interval comes from one Gram matrix of denoiser outputs).
The schedule depends on the data only through the denoiser: it adapts to the data scale,
which fixed families cannot, and uses no trajectory references, so it cannot overfit them.

The KLUB bounds the error of a stochastic first-order sampler. For the deterministic samplers
the default ``bound="ode"`` applies the same construction to the probability-flow ODE in y:
per step, the Cauchy-Schwarz bound on the squared local error of the first-order (DDIM) step,
weighted by how much of an error made at that noise level survives to the data, with
eps_hat taken along PF-ODE trajectories computed on the fine candidate levels (not along the
forward paths x0 + s eps, which vary much more at high noise than the ODE's trajectories do;
see ``_bound_costs``). On exact mixtures it gives 2-5x smaller errors than the default grids
at 5-20 steps for DDIM, DPM-Solver++, PLMS and UniPC, and beats the KLUB schedule, which is
why it is the default.

``grid_family`` is the low-dimensional alternative: Karras et al. 2022's rho-spacing in
sigma~ (rho = inf: uniform in log-SNR) with its step index warped by u -> u^warp, two
parameters that ``fit_grid_family`` chooses over many problems at once (geometric mean of the
RMS error to reference solutions), so that a grid fitted once applies to unseen problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn
from ..process import Process
from .grids import default_sigma_min


def _sigma_top(process: Process) -> float:
    """sigma~ at t_max."""
    return math.exp(-0.5 * float(process.log_snr(process.t_max)))


def _sigma_bounds(process: Process, sigma_min: float | None,
                  sigma_max: float | None) -> tuple[float, float]:
    s_hi = sigma_max if sigma_max is not None else _sigma_top(process)
    s_lo = sigma_min if sigma_min is not None else default_sigma_min(process)
    if not (math.isfinite(s_hi) and 0 < s_lo < s_hi):
        raise ValueError(f"need 0 < sigma_min < sigma_max (sigma~ = sigma / alpha), got "
                         f"sigma_min={s_lo}, sigma_max={s_hi}")
    return s_lo, s_hi


def levels_to_times(process: Process, sigmas: Tensor) -> Tensor:
    """Decreasing sigma~ levels -> a time grid: their times, then t_min (the sampler's last
    step returns clean data from the smallest level). A first level at sigma~(t_max) (to
    1e-6 relative) becomes t_max exactly; a lower one (``sigma_max=``) stays where it is."""
    ts = process.t_from_log_snr(-2 * sigmas.to(torch.float64).log())
    if float(sigmas[0]) >= _sigma_top(process) * (1 - 1e-6):
        ts[0] = process.t_max
    t_end = torch.tensor([process.t_min], dtype=torch.float64)
    return torch.cat([ts, t_end])


def _gram(denoiser: DenoiserFn, data: Tensor, sig: Tensor, generator: torch.Generator | None,
          chunk: int, field: str = "x0") -> Tensor:
    """G[j, k] = mean over draws of <F(x0 + s_j eps, s_j), F(x0 + s_k eps, s_k)>, F the
    denoiser's ``field`` ("x0": D, "eps": eps_hat)."""
    process = denoiser.process
    ts = process.t_from_log_snr(-2 * sig.log())
    alphas = process.alpha(ts)
    gram = torch.zeros(len(sig), len(sig), dtype=torch.float64)
    for start in range(0, len(data), chunk):
        x0 = data[start:start + chunk].to(torch.float64)
        # drawn on the CPU (the generator's device) whatever the model's: the same draws
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        outs = [getattr(denoiser(alphas[j] * (x0 + sig[j] * eps), ts[j]), field).flatten(1)
                for j in range(len(sig))]
        d = torch.stack(outs).flatten(1)                     # [J, chunk * dim]
        gram += (d @ d.T).cpu()
    return gram / len(data)


def _gram_ode(denoiser: DenoiserFn, data: Tensor, sig: Tensor,
              generator: torch.Generator | None, chunk: int) -> Tensor:
    """G[j, k] = mean over draws of <eps_hat_j, eps_hat_k> along probability-flow ODE
    trajectories from y = sigma~_max z, integrated on the candidate levels themselves (the
    first-order step y_{j+1} = y_j + (s_{j+1} - s_j) eps_hat_j; the levels are fine, so the
    trajectories are close to exact). One evaluation per level and draw, as for the SDE form."""
    process = denoiser.process
    ts = process.t_from_log_snr(-2 * sig.log())
    alphas = process.alpha(ts)
    gram = torch.zeros(len(sig), len(sig), dtype=torch.float64)
    for start in range(0, len(data), chunk):
        shape = data[start:start + chunk].shape
        y = sig[0] * torch.randn(shape, generator=generator, dtype=torch.float64).to(
            data.device)
        outs = []
        for j in range(len(sig)):
            eps = denoiser(alphas[j] * y, ts[j]).eps.to(torch.float64)
            outs.append(eps.flatten(1))
            if j + 1 < len(sig):
                y = y + (sig[j + 1] - sig[j]) * eps
        d = torch.stack(outs).flatten(1)
        gram += (d @ d.T).cpu()
    return gram / len(data)


def interval_costs(gram: Tensor, sig: Tensor, power: int = 3) -> Tensor:
    """C[a, b] (a < b, levels decreasing): sum_{j=a+1..b} w_j E||F_j - F_a||^2 with
    w_j = (s_{j-1} - s_j) / s_j^power (F = D, power 3: the KLUB of one step from level a to
    level b); inf elsewhere."""
    w = torch.zeros_like(sig)
    w[1:] = (sig[:-1] - sig[1:]) / sig[1:] ** power
    diag = gram.diagonal()
    cum_w, cum_wd = w.cumsum(0), (w * diag).cumsum(0)
    cross = (gram * w[None, :]).cumsum(1)                   # [a, b] = sum_{j<=b} w_j G_aj
    cost = (cum_wd[None, :] - cum_wd[:, None]) + diag[:, None] * (cum_w[None, :] - cum_w[:, None]) \
        - 2 * (cross - cross.diagonal()[:, None])
    upper = torch.ones_like(cost, dtype=torch.bool).triu(1)
    return torch.where(upper, cost.clamp(min=0), torch.full_like(cost, math.inf))


def _interval_sums(gram: Tensor, sig: Tensor, power: int) -> Tensor:
    """``interval_costs`` summed per start level a (no differences of prefix sums over all
    levels, which lose the small costs of short low-noise steps when the weights at high
    noise are large, as s_j^-power with power < 0 makes them)."""
    w = torch.zeros_like(sig)
    w[1:] = (sig[:-1] - sig[1:]) / sig[1:] ** power
    diag = gram.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2 * gram).clamp(min=0)   # [a, j]
    after = torch.ones_like(dist, dtype=torch.bool).triu(1)
    cost = torch.where(after, w[None, :] * dist, torch.zeros_like(dist)).cumsum(1)
    return torch.where(after, cost, torch.full_like(cost, math.inf))


def local_error_bounds(gram: Tensor, sig: Tensor, cauchy_schwarz: str = "sigma") -> Tensor:
    """B[a, b] (a < b; inf elsewhere): an upper bound on E || int_{s_b}^{s_a} (eps_hat(s) -
    eps_hat(s_a)) ds ||^2, the squared local error of the first-order step in y from level a
    to level b, from ``gram`` [J, J] of eps_hat along the trajectories (``_gram_ode``) at
    the decreasing levels ``sig`` (integrals as Riemann sums on them). "sigma": Cauchy-Schwarz
    with weight 1, (s_a - s_b) int ||d eps||^2 ds; "min": also with weight 1 / s,
    log(s_a / s_b) int ||d eps||^2 s ds, and the smaller of the two."""
    raw = interval_costs(gram, sig, 0)
    step = (sig[:, None] - sig[None, :]).clamp(min=0)
    bound_sq = torch.where(raw.isinf(), raw, raw * step)
    if cauchy_schwarz == "min":
        raw_s = _interval_sums(gram, sig, -1)                # int ||d eps||^2 s ds
        log_h = (sig[:, None] / sig[None, :]).clamp(min=1).log()
        bound_sq = torch.minimum(bound_sq, torch.where(raw_s.isinf(), raw_s, raw_s * log_h))
    return bound_sq


def best_path(cost: Tensor, edges: int, terminal: Tensor | None = None) -> list[int]:
    """Indices 0 = i_0 < ... < i_edges minimising sum_k cost[i_k, i_{k+1}] (exact dynamic
    programming, O(edges J^2)), ending at J - 1, or, given ``terminal`` [J], at the level
    that minimises the path cost plus ``terminal`` there."""
    n = cost.shape[0]
    if not 0 <= edges <= n - 1:
        raise ValueError(f"need 0 <= steps - 1 <= {n - 1} (candidate levels - 1), got "
                         f"{edges}")
    if edges == 0:
        return [0]  # the path is its start alone
    value = torch.full((n,), math.inf, dtype=torch.float64)
    value[0] = 0.0
    back = []
    for _ in range(edges):
        total = value[:, None] + cost                        # [from, to]
        value, arg = total.min(0)
        back.append(arg)
    path = [n - 1 if terminal is None else int((value + terminal).argmin())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def optimize_schedule(denoiser: DenoiserFn, data: Tensor, steps: int, *,
                      sigma_min: float | None = None, sigma_max: float | None = None,
                      candidates: int = 256, generator: torch.Generator | None = None,
                      chunk: int = 64, bound: str = "ode", free_end: bool = False,
                      order: int = 1, cauchy_schwarz: str = "sigma") -> Tensor:
    """An N-step time grid minimising an Align-Your-Steps error bound (module docstring).

    ``denoiser``: any denoiser with a ``process``; ``data``: clean draws x0 [n, ...] (training
    data or model samples); ``steps``: N, the sampler steps (the grid has N + 1 times,
    ``ts[0] = t_max``, ``ts[-1] = t_min``; its N noise levels are chosen among ``candidates``
    log-spaced levels from sigma~_max down to ``sigma_min``, default ``default_sigma_min``,
    both included). ``bound``: "ode" (default; for the deterministic samplers) or "sde" (the
    paper's KLUB, for stochastic ones). ``free_end``: the smallest level is chosen too,
    anywhere down to ``sigma_min``, by adding the bound of the last step (x0_hat there, i.e.
    the first-order step to sigma~ = 0); use it where the model is defined below its default
    sigma_min (continuous-time or exact models), with a small ``sigma_min``. Deterministic
    given ``generator``. ``order`` (``bound="ode"``): the order p of the sampler the grid is
    for; each step's bound is scaled by h^(2(p - 1)), h = log(s_a / s_b) its log-sigma~ size
    (a p-th order step's local error is O(h^(p+1)) where the first-order one is O(h^2), with
    derivatives of eps_hat of similar size). ``cauchy_schwarz`` (``bound="ode"``): "sigma"
    (default) bounds each step's squared local error by (s_a - s_b) int ||d eps||^2 ds; "min"
    by the smaller of that and log(s_a / s_b) int ||d eps||^2 s ds (the same inequality with
    weight 1 / s, ``_bound_costs``), which stays tight on long steps from high noise. The
    result works as ``ts=`` with every sampler.
    """
    return optimize_schedules(denoiser, data, [steps], sigma_min=sigma_min,
                              sigma_max=sigma_max, candidates=candidates,
                              generator=generator, chunk=chunk, bound=bound,
                              free_end=free_end, order=order,
                              cauchy_schwarz=cauchy_schwarz)[steps]


def optimize_schedules(denoiser: DenoiserFn, data: Tensor, steps: Sequence[int], *,
                       sigma_min: float | None = None, sigma_max: float | None = None,
                       candidates: int = 256, generator: torch.Generator | None = None,
                       chunk: int = 64, bound: str = "ode",
                       free_end: bool = False, order: int = 1,
                       cauchy_schwarz: str = "sigma") -> dict[int, Tensor]:
    """``optimize_schedule`` for several step counts at once, {N: grid}: the denoiser is
    evaluated once (the interval costs are shared) and each N solved by its own programme."""
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {list(steps)}")
    if candidates < max(steps):
        raise ValueError(f"candidates must be at least steps ({max(steps)}), got {candidates}")
    if bound not in ("ode", "sde"):
        raise ValueError(f"bound must be 'ode' or 'sde', got {bound!r}")
    if order < 1 or (order > 1 and bound != "ode"):
        raise ValueError(f"order must be >= 1, and 1 with bound='sde', got {order}")
    if cauchy_schwarz not in ("sigma", "min"):
        raise ValueError(f"cauchy_schwarz must be 'sigma' or 'min', got {cauchy_schwarz!r}")
    if free_end and bound != "ode":
        raise ValueError("free_end needs bound='ode' (the KLUB of the last step to clean "
                         "data is infinite)")
    if len(data) < 1:
        raise ValueError("data must hold at least one draw")
    process = denoiser.process
    s_lo, s_hi = _sigma_bounds(process, sigma_min, sigma_max)
    sig = torch.logspace(math.log10(s_hi), math.log10(s_lo), candidates, dtype=torch.float64)
    cost, terminal = _bound_costs(denoiser, data, sig, generator, chunk, bound, free_end,
                                  order, cauchy_schwarz)
    return {n: levels_to_times(process, sig[best_path(cost, n - 1, terminal)]) for n in steps}


def _bound_costs(denoiser: DenoiserFn, data: Tensor, sig: Tensor,
                 generator: torch.Generator | None, chunk: int, bound: str,
                 free_end: bool, order: int = 1,
                 cauchy_schwarz: str = "sigma") -> tuple[Tensor, Tensor | None]:
    """(C, terminal): C[a, b] the bound's cost of one step from candidate level a to level b;
    terminal[b] that of the last step from level b to clean data (None: the path ends at the
    last candidate).

    "sde": the KLUB interval term (module docstring). "ode": the first-order ODE step in
    y = x / alpha, y_b = y_a + (s_b - s_a) eps_hat_a, has local error int (eps_hat(s) -
    eps_hat_a) ds, whose square is at most (s_a - s_b) int ||eps_hat(s) - eps_hat_a||^2 ds
    (Cauchy-Schwarz), with eps_hat along PF-ODE trajectories (``_gram_ode``); an error made
    at s_b reaches the data scaled by about sqrt(v / (v + s_b^2)) (the PF-ODE of a Gaussian
    with per-dimension variance v, the data's mean variance), so the squared bound is
    weighted by v / (v + s_b^2). The last step returns x0_hat = y_b - s_b eps_hat_b, the same
    step to s = 0: its bound is s_b times the integral down to the smallest candidate.

    ``cauchy_schwarz="min"``: Cauchy-Schwarz with weight 1 / s, |int f ds|^2 <= int ds / s *
    int |f|^2 s ds, bounds the same local error by log(s_a / s_b) int ||d eps||^2 s ds; both
    are upper bounds, so their minimum is one. The plain one is loose by the ratio of the step
    to the level where eps_hat changes: from sigma~_max = 2e4 (the discrete cosine schedule)
    with d eps ~ c / s it is (s_a / s_b) c^2 against the weighted one's log(s_a / s_b)^2 c^2,
    so the plain bound spends a level on a step that costs almost nothing."""
    if bound == "sde":
        return interval_costs(_gram(denoiser, data, sig, generator, chunk, "x0"), sig, 3), None
    gram = _gram_ode(denoiser, data, sig, generator, chunk)
    raw = interval_costs(gram, sig, 0)
    bound_sq = local_error_bounds(gram, sig, cauchy_schwarz)
    var = float(data.to(torch.float64).flatten(1).var(0).mean()) if len(data) > 1 else 1.0
    cost = bound_sq * var / (var + sig[None, :] ** 2)
    if order > 1:
        h = (sig[:, None] / sig[None, :]).clamp(min=1).log()
        cost = torch.where(cost.isinf(), cost, cost * h ** (2 * (order - 1)))
    if not free_end:
        return cost, None
    terminal = torch.cat([raw[:-1, -1], torch.zeros(1, dtype=raw.dtype)]) * sig
    return cost, terminal


def grid_family(process: Process, steps: int, rho: float = 7.0, warp: float = 1.0, *,
                sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """N noise levels sigma~_i = (s_max^(1/rho) + u_i^warp (s_min^(1/rho) - s_max^(1/rho)))^rho,
    u_i = i / (N - 1) (``rho = inf``: log-uniform; ``warp`` > 1 puts more steps at high
    noise, < 1 at low noise), as N + 1 times ending at t_min. rho = 7, warp = 1 is the
    ``karras`` grid."""
    if steps < 1 or not rho > 0 or not warp > 0:
        raise ValueError(f"need steps >= 1, rho > 0 and warp > 0, got steps={steps}, "
                         f"rho={rho}, warp={warp}")
    s_lo, s_hi = _sigma_bounds(process, sigma_min, sigma_max)
    u = torch.linspace(0, 1, steps, dtype=torch.float64) ** warp
    if math.isinf(rho):
        sig = torch.exp(math.log(s_hi) + u * (math.log(s_lo) - math.log(s_hi)))
    else:
        sig = (s_hi ** (1 / rho) + u * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    return levels_to_times(process, sig)


Case = tuple[DenoiserFn, Tensor, Tensor]


def fit_grid_family(cases: Sequence[Case], sampler: Callable, steps: int,
                    rhos: Sequence[float] = (1.5, 2.5, 4.0, 7.0, 12.0, math.inf),
                    warps: Sequence[float] = (0.8, 1.0, 1.25),
                    sigma_mins: Sequence[float | None] = (None,), *,
                    sigma_min: Callable[[Process], float | None] | None = None,
                    **options: Any) -> tuple[float, float, float | None]:
    """(rho, warp, smallest level) of ``grid_family`` with the smallest geometric mean over
    ``cases`` of the RMS error of ``sampler`` (with ``options``) on ``steps`` steps; each
    case is (denoiser, x_T, reference x0). The smallest level is one of ``sigma_mins`` (a
    sigma~ shared by all problems), where None means each problem's own: ``sigma_min(process)``
    or, without that callable, ``default_sigma_min``. Exhaustive; ties keep the first."""
    if not cases:
        raise ValueError("fit_grid_family needs at least one case")
    best, best_loss = (rhos[0], warps[0], sigma_mins[0]), math.inf
    for end in sigma_mins:
        for rho in rhos:
            for warp in warps:
                loss = 0.0
                for den, x_T, ref in cases:
                    lo = end if end is not None else (sigma_min(den.process) if sigma_min
                                                      else None)
                    ts = grid_family(den.process, steps, rho, warp, sigma_min=lo)
                    err = (sampler(den, x_T, ts, **options) - ref).pow(2).mean().sqrt()
                    loss += math.log(max(float(err), 1e-300))
                if loss < best_loss:
                    best, best_loss = (rho, warp, end), loss
    return best
