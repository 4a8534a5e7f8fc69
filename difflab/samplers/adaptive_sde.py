"""The adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast
When Generating Data with Score-Based Models", Algorithm 1), with rejection sampling with memory
(Rackauckas & Nie 2017, RSwM) for the Brownian path.

The reverse SDE is integrated in log-SNR lambda, as ``euler_maruyama`` (``sde``) writes it:

  dx = (k x - sigma eps_hat) dlambda + sigma dW_lambda,   k = d log alpha / d lambda,

with lambda rising from lambda(ts[0]) to the least noisy level a sampler should visit
(``end_time``: ``grids.default_sigma_min``, the paper's epsilon, or ts[-2] if less noisy).
Why lambda and not the process time: one step size means the same in every process (DDPM's
t in 1..1000, VP-SDE's in [0, 1], VE, rectified flow), the drift's stiffness is of order 1 per
unit lambda at every noise level, and the Euler-Maruyama proposal is exactly difflab's
``euler_maruyama`` step. Each attempt, from x at lambda with step h and Brownian increment W
over [lambda, lambda + h]:

  x'  = x + h f(x, lambda) + sigma(lambda) W                             (Euler-Maruyama)
  x~  = x + h f(x', lambda + h) + sigma(lambda + h) W                    (same noise)
  x'' = (x' + x~) / 2                                                    (improved Euler)

  delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|))      (elementwise; x'_prev: the last
                                                          accepted x', initially x)
  E = ||(x' - x'') / delta||_2 / sqrt(dim)                (per example)

The step is accepted when E <= 1 (x <- x'', the extrapolated value, as the paper), and
h <- min(h_max, theta h E^(-r), distance left). Every example has its own lambda and h
(the paper's per-sample steps), so with one generator per example an example's sample does
not depend on the batch.

The Brownian path. Whether a step is rejected depends on its W, so neither drawing W again
(the paper's code: it keeps the draws that pass) nor keeping the draw rescaled to the smaller
step (sqrt(h1 / h) W: conditioned on the rejection, an atypical draw) samples a Brownian path,
and the samples keep a bias that does not shrink with the tolerance (docs/samplers.md). Here a
rejected (h, W) is kept and split by the Brownian bridge, the retry uses (h1, W1) and the rest
waits for the following steps (``BrownianQueue``): every W the solver uses is an increment of
one Brownian path revealed piece by piece, so the error vanishes with the tolerance.

The eps_hat at (x, lambda) is reused after a step the whole batch rejected. The end is the
shared final denoising step there (``final_step``): x0_hat. Read the NFE with
``CountingDenoiser`` (as ``rk45``): every attempt costs 2 evaluations (1 after a rejection of
the whole batch), plus 1 for the last step; ``max_nfe`` caps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..parameterization import DenoiserFn, Prediction
from ..process import Process, expand_like
from .base import Callback, Generators, check_grid, final_step, randn_like, report, zero_snr_start
from .grids import default_sigma_min
from .options import SamplerOption, declare_options


def _per(v: Tensor, like: Tensor) -> Tensor:
    """``v`` [B] or [B, S] viewed to broadcast against ``like`` (trailing singleton dims);
    float values take ``like``'s dtype."""
    v = v.view(*v.shape, *[1] * (like.ndim - v.ndim))
    return v.to(like.dtype) if v.is_floating_point() else v


def _pick(v: Tensor, idx: Tensor) -> Tensor:
    """``v`` [B, S, ...] at slots ``idx`` [B, S'] along dim 1."""
    return v.gather(1, idx.view(*idx.shape, *[1] * (v.ndim - 2)).expand(*idx.shape,
                                                                       *v.shape[2:]))


class BrownianQueue:
    """Per-example queues of the Brownian increments drawn ahead of the current lambda
    (rejection sampling with memory, Rackauckas & Nie 2017, RSwM).

    An example's queue holds pieces (length h_i, increment W_i) that tile [lambda, lambda +
    sum h_i] in order. Nothing inside a piece has been revealed, so given its increment the
    path there is a Brownian bridge. A step of size h takes whole pieces from the front: if it
    ends inside a piece (h_j, W_j), at offset a, that piece is first split by the bridge,
    W' = (a / h_j) W_j + sqrt(a (h_j - a) / h_j) z, into (a, W') and (h_j - a, W_j - W'); if it
    ends past the queue, a fresh piece N(0, h - sum h_i) is appended. A rejected step leaves
    its pieces queued (its retry, shorter, splits them further); an accepted one drops them.
    Padded tensors: ``h`` [B, S], ``w`` [B, S, *x.shape[1:]], valid below ``count`` [B].
    """

    def __init__(self, x: Tensor):
        self.h = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
        self.w = torch.zeros(x.shape[0], 1, *x.shape[1:], dtype=x.dtype, device=x.device)
        self.count = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def take(self, h: Tensor, z: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """The step of size ``h`` [B] for the ``active`` examples: (its increment W, of x's
        shape, and its number of pieces k [B], 0 where inactive). ``z`` ~ N(0, I), of x's
        shape, is the new randomness: a bridge point or a fresh piece (a step needs one)."""
        if int(self.count.max()) + 1 > self.h.shape[1]:     # room for one more piece
            self.h = torch.cat([self.h, torch.zeros_like(self.h[:, :1])], 1)
            self.w = torch.cat([self.w, torch.zeros_like(self.w[:, :1])], 1)
        w, k = _per(h.sqrt(), z) * z, active.long()          # an empty queue: one fresh piece
        rows = (active & (self.count > 0)).nonzero()[:, 0]
        if len(rows):
            w[rows], k[rows] = self._take_queued(rows, h[rows], z[rows])
        new = (active & (self.count == 0)).nonzero()[:, 0]
        self.h[new, 0], self.w[new, 0], self.count[new] = h[new], w[new], 1
        return w, k

    def _take_queued(self, rows: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``take`` for the examples ``rows``, whose queues are not empty."""
        qh, qw, count = self.h[rows], self.w[rows], self.count[rows]
        slots = torch.arange(qh.shape[1], device=qh.device)[None]
        cum = torch.where(slots < count[:, None], qh, torch.zeros_like(qh)).cumsum(1)
        whole = (cum <= h[:, None] * (1 + 1e-9)).sum(1).clamp(max=count)
        j = whole.clamp(max=qh.shape[1] - 1)                        # the piece the step ends in
        hj = qh.gather(1, j[:, None])[:, 0]
        a = h - (cum.gather(1, j[:, None])[:, 0] - hj)              # the offset in it
        split = ((whole < count) & ((a > 1e-9 * hj) | (whole == 0))).nonzero()[:, 0]
        rest = h - cum[:, -1]
        extend = ((whole == count) & (rest > 1e-9 * h)).nonzero()[:, 0]
        if len(split):  # piece j by the Brownian bridge; the pieces after it move one along
            js, hs, as_ = j[split], hj[split], a[split]
            ws = qw[split, js]
            w1 = _per(as_ / hs, ws) * ws + _per((as_ * (hs - as_) / hs).sqrt(), ws) * z[split]
            moved = slots - (slots > js[:, None]).long()
            qh[split], qw[split] = qh[split].gather(1, moved), _pick(qw[split], moved)
            qh[split, js], qh[split, js + 1] = as_, hs - as_
            qw[split, js], qw[split, js + 1] = w1, ws - w1
        if len(extend):  # a step past the queue: a fresh piece for the rest
            ce = count[extend]
            qh[extend, ce] = rest[extend]
            qw[extend, ce] = _per(rest[extend].sqrt(), z) * z[extend]
        grew = torch.zeros_like(count)
        grew[split], grew[extend] = 1, 1
        k = torch.where(grew > 0, whole + 1, whole.clamp(min=1))
        self.h[rows], self.w[rows], self.count[rows] = qh, qw, count + grew
        use = (slots < k[:, None]).to(qw.dtype)
        return torch.bmm(use[:, None], qw.flatten(2)).view(qw[:, 0].shape), k

    def drop(self, k: Tensor) -> None:
        """Remove the first ``k`` [B] pieces of each queue (an accepted step's)."""
        rows = ((k > 0) & (self.count > k)).nonzero()[:, 0]
        if len(rows):
            idx = (torch.arange(self.h.shape[1], device=k.device)[None] + k[rows, None]).clamp(
                max=self.h.shape[1] - 1)
            self.h[rows], self.w[rows] = self.h[rows].gather(1, idx), _pick(self.w[rows], idx)
        self.count = self.count - k
        used = int(self.count.max()) + 1                     # the slots in use, and one free
        self.h, self.w = self.h[:, :used], self.w[:, :used]


class _Sde:
    """The reverse SDE in lambda for one process and denoiser, at per-example log-SNRs."""

    def __init__(self, denoiser: DenoiserFn, cond: Any):
        self.denoiser, self.process, self.cond = denoiser, denoiser.process, cond
        self.nfe = 0

    def drift(self, x: Tensor, lam: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Prediction]:
        """(f(x, lambda) = k x - sigma eps_hat, sigma, the prediction) at log-SNRs ``lam`` [B]
        (times ``t``): one evaluation."""
        k = expand_like(self.process.log_alpha_slope(lam), x).to(x.dtype)
        sigma = expand_like(self.process.rates_from_log_snr(lam)[1], x).to(x.dtype)
        pred = self.denoiser(x, t, self.cond)
        self.nfe += 1
        return k * x - sigma * pred.eps, sigma, pred


def end_time(process: Process, ts: Tensor) -> Tensor:
    """Where the SDE integration stops, before the final denoising step: the least noisy level
    a sampler should visit, sigma~ = ``default_sigma_min`` (the paper's epsilon: DDPM's first
    step, 1e-3 of the span in continuous time), if it lies strictly between ts[-1] and ts[-2];
    else ts[-2] (a grid that ends at a noisy time, or a finer last point)."""
    t_floor = process.t_from_log_snr(torch.tensor(-2 * math.log(default_sigma_min(process)),
                                                  dtype=torch.float64))
    return t_floor if float(ts[-1]) < float(t_floor) < float(ts[-2]) else ts[-2]


def local_error(x1: Tensor, x2: Tensor, x1_prev: Tensor, eps_abs: float, eps_rel: float
                ) -> Tensor:
    """E per example: ||(x' - x'') / delta||_2 / sqrt(dim) with delta = max(eps_abs, eps_rel
    max(|x'|, |x'_prev|)) (Jolicoeur-Martineau et al. 2021, Sec. 3.1, the scaled L2 norm)."""
    delta = (eps_rel * torch.maximum(x1.abs(), x1_prev.abs())).clamp(min=eps_abs)
    return ((x1 - x2) / delta).flatten(1).pow(2).mean(1).sqrt()


@declare_options(
    SamplerOption("eps_abs", float, 0.0078, "absolute tolerance of the local error (the paper's "
                  "0.0078 for data in [-1, 1])", min=0.0, min_exclusive=True),
    SamplerOption("eps_rel", float, 0.05, "relative tolerance of the local error",
                  min=0.0, min_exclusive=True),
    SamplerOption("h_init", float, 0.1, "first step size, in log-SNR", min=0.0,
                  min_exclusive=True),
    SamplerOption("h_max", float, math.inf, "largest step size, in log-SNR", min=0.0,
                  min_exclusive=True),
    SamplerOption("r", float, 0.9, "exponent of the step-size update h E^(-r)", min=0.0,
                  min_exclusive=True),
    SamplerOption("theta", float, 0.9, "safety factor of the step-size update", min=0.0,
                  min_exclusive=True),
    SamplerOption("max_nfe", int, None, "cap on network evaluations: when only the last one "
                  "is left the sampler denoises from where it is (None: no cap)", min=2))
@zero_snr_start
@torch.no_grad()
def adaptive_sde(denoiser: DenoiserFn, x: Tensor, ts: Tensor, generator: Generators = None,
                 callback: Callback | None = None, *, cond: Any = None, eps_abs: float = 0.0078,
                 eps_rel: float = 0.05, h_init: float = 0.1, h_max: float = math.inf,
                 r: float = 0.9, theta: float = 0.9, max_nfe: int | None = None) -> Tensor:
    """Adaptive reverse-SDE sampler (Jolicoeur-Martineau et al. 2021, Alg. 1): Euler-Maruyama
    proposals corrected by improved Euler with the same noise, step sizes in log-SNR chosen
    per example from the mixed absolute / relative local error. Uses only the grid's ends: it
    integrates from ts[0] to ``end_time`` (sigma~ = ``default_sigma_min``, or ts[-2] if less
    noisy), then takes the final denoising step. The callback sees every attempt (t: the
    per-example times)."""
    ts = check_grid(ts)
    sde, process = _Sde(denoiser, cond), denoiser.process
    t_end = end_time(process, ts)
    lam_end = float(process.log_snr(t_end))
    lam = torch.full((x.shape[0],), float(process.log_snr(ts[0])), dtype=torch.float64,
                     device=x.device)                    # per-example state lives with x
    t = torch.full_like(lam, float(ts[0]))
    h = (lam_end - lam).clamp(max=min(h_init, h_max))
    h_floor = 1e-10 * max(lam_end - float(lam[0]), 1.0)
    x_prev, cached, i, queue = x, None, 0, BrownianQueue(x)
    budget = math.inf if max_nfe is None else max_nfe
    while bool((lam < lam_end).any()) and sde.nfe + (1 if cached else 2) + 1 <= budget:
        f0, s0, pred = cached or sde.drift(x, lam, t)
        active = lam < lam_end
        # the step and its Brownian increment: queued pieces first (RSwM), one draw an attempt
        w, k = queue.take(h, randn_like(x, generator), active)
        lam_next = torch.where(lam_end - (lam + h) <= 1e-9 * h, torch.full_like(lam, lam_end),
                               lam + h)
        t_next = torch.where(lam_next == lam_end, float(t_end), process.t_from_log_snr(lam_next))
        hx = _per(h, x)
        x1 = x + hx * f0 + s0 * w                                       # Euler-Maruyama
        f1, s1, _ = sde.drift(x1, lam_next, t_next)
        x2 = 0.5 * (x1 + x + hx * f1 + s1 * w)                          # improved Euler
        err = local_error(x1, x2, x_prev, eps_abs, eps_rel)
        if not bool(torch.isfinite(err).all()):
            raise RuntimeError("sampler 'adaptive_sde': the local error is not finite (the "
                               "denoiser returned inf or nan)")
        ok = (err <= 1) & active
        queue.drop(torch.where(ok, k, torch.zeros_like(k)))
        okx = _per(ok, x)
        x, x_prev = torch.where(okx, x2, x), torch.where(okx, x1, x_prev)
        lam, t = torch.where(ok, lam_next, lam), torch.where(ok, t_next, t)
        factor = theta * err.to(torch.float64).clamp(min=1e-10) ** -r
        h = torch.minimum((h * factor).clamp(max=h_max), lam_end - lam)
        if bool(((h < h_floor) & (h < lam_end - lam)).any()):
            raise RuntimeError("sampler 'adaptive_sde': the step size underflowed; raise "
                               "eps_abs or eps_rel")
        cached = None if bool(ok.any()) else (f0, s0, pred)
        report(callback, i, t, x, pred)
        i += 1
    return final_step(callback, i, t, denoiser(x, t, cond))


__all__ = ["BrownianQueue", "adaptive_sde", "end_time", "local_error"]
