"""Gaussian teleportation: the first, high-noise stretch of the PF-ODE in closed form.

While the noise sigma~ = sigma / alpha is large against the data's spread, the marginal
p(y; sigma~) of y = x / alpha is close to that of a Gaussian with the data's mean mu and
covariance C: the score's expansion in 1 / sigma~^2 matches through C, so their denoisers
differ by terms of order kappa_3 / sigma~^2, kappa_3 the data's third cumulant (Wang & Vastola 2024,
"The unreasonable effectiveness of Gaussian score approximation for diffusion models", Sec. 5,
"analytical teleportation"). For N(mu, C) the PF-ODE dy/dsigma~ = (y - D(y)) / sigma~ has the
exact solution, in C's eigenbasis C = V diag(lambda) V^T,

    y(s) = mu + V diag(sqrt((lambda + s^2) / (lambda + s0^2))) V^T (y(s0) - mu),

so the steps down to a level sigma~_skip >> sqrt(lambda_max) need no model evaluation. With
y - mu = (x - alpha mu) / alpha and s0 = sigma / alpha this reads

    y(s) = mu + V diag(sqrt(lambda + s^2)) V^T w,   w = V diag(1 / sqrt(alpha^2 lambda + sigma^2))
                                                          V^T (x - alpha mu),

which stays finite at zero terminal SNR (alpha = 0: w = x / sigma).

Where the schedule's sigma~_max is far above the data's scale (the cosine schedule's is 2e4),
a sampler's first evaluation there only returns mu. ``GaussianHead`` wraps a model so that
every level above sigma~_skip (``skip_level``) is answered by the Gaussian's exact denoiser,
at no model evaluation: a sampler on [t_max, sigma~_skip, ...] keeps its step out of t_max
(and a multistep method its history) and spends the evaluation it saves where the data's
structure appears, which matters most at 5-10 evaluations. ``teleport`` is the exact Gaussian
map itself, for moving a state between two high levels.

``data_moments`` estimates mu and C from draws (training data or model samples): the full
eigendecomposition up to ``FULL_MAX`` entries per sample, the per-entry variance beyond (for
images; at sigma~_skip >> sqrt(lambda) the covariance enters only at order C / sigma~^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import LoadError, atomic_write, read_safetensors
from ..parameterization import Prediction
from ..process import as_time, expand_like

#: The largest number of entries per sample whose full covariance ``data_moments`` keeps.
FULL_MAX = 2048


@dataclass
class GaussianMoments:
    """The data's mean ``mean`` [*shape] and covariance: eigenvalues ``eigvals`` [D] with
    eigenvectors ``eigvecs`` [D, D] (columns), or, with ``eigvecs`` None, per-entry variances
    ``eigvals`` [D] (a diagonal covariance); D = mean.numel()."""

    mean: Tensor
    eigvals: Tensor
    eigvecs: Tensor | None = None

    def __post_init__(self) -> None:
        d = self.mean.numel()
        if self.eigvals.shape != (d,):
            raise ValueError(f"eigvals must have shape ({d},), got {tuple(self.eigvals.shape)}")
        if self.eigvecs is not None and self.eigvecs.shape != (d, d):
            raise ValueError(f"eigvecs must have shape ({d}, {d}), got "
                             f"{tuple(self.eigvecs.shape)}")
        if not bool((self.eigvals >= 0).all()):
            raise ValueError("a covariance's eigenvalues must be >= 0")

    @property
    def scale(self) -> float:
        """sqrt(lambda_max), the data's largest standard deviation along any direction."""
        return math.sqrt(float(self.eigvals.max()))

    def save(self, path: str | Path) -> Path:
        """Write mean, eigvals (and eigvecs) as a safetensors file, atomically."""
        from safetensors.torch import save_file

        tensors = {"mean": self.mean.contiguous(), "eigvals": self.eigvals.contiguous()}
        if self.eigvecs is not None:
            tensors["eigvecs"] = self.eigvecs.contiguous()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path: str | Path) -> GaussianMoments:
        """Read a file written by ``save``; a LoadError naming the file if it is not one."""
        t = read_safetensors(path)
        if "mean" not in t or "eigvals" not in t:
            raise LoadError(f"{path} holds no Gaussian moments (need 'mean' and 'eigvals')")
        try:
            return cls(t["mean"], t["eigvals"], t.get("eigvecs"))
        except ValueError as err:
            raise LoadError(f"{path}: {err}") from None


def data_moments(data: Tensor, full: bool | None = None) -> GaussianMoments:
    """Mean and covariance of draws ``data`` [n >= 2, *shape] in float64. ``full``: keep the
    full covariance (default: when the sample has at most FULL_MAX entries), else the
    per-entry variances."""
    if data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"data_moments needs [n >= 2, ...] draws, got shape "
                         f"{tuple(data.shape)}")
    x = data.detach().to(torch.float64).flatten(1)
    if not bool(x.isfinite().all()):
        raise ValueError("data_moments: the draws hold NaN or infinite values")
    mean = x.mean(0)
    full = x.shape[1] <= FULL_MAX if full is None else full
    if not full:
        return GaussianMoments(mean.reshape(data.shape[1:]), x.var(0))
    lam, vec = torch.linalg.eigh(torch.cov(x.T).reshape(x.shape[1], x.shape[1]))
    return GaussianMoments(mean.reshape(data.shape[1:]), lam.clamp(min=0), vec)


def skip_level(moments: GaussianMoments, factor: float = 32.0) -> float:
    """sigma~_skip = ``factor`` sqrt(lambda_max): there the Gaussian's denoiser is within
    about factor^-2 of the data's own, in units of the data's scale (module docstring; the
    PF-ODE map to that level is then off by as little, ``tests/test_teleport.py``)."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    return factor * moments.scale


def _basis(moments: GaussianMoments, r: Tensor, back: bool = False) -> Tensor:
    """Rows r [B, D] in C's eigenbasis (``back``: from it); the identity for a diagonal C."""
    if moments.eigvecs is None:
        return r
    vec = moments.eigvecs.to(r.device)
    return r @ (vec.T if back else vec)


def teleport(process, x: Tensor, t_from: float | Tensor, t_to: float | Tensor,
             moments: GaussianMoments) -> Tensor:
    """x at ``t_to`` from x at ``t_from`` along the PF-ODE of N(mean, C) (module docstring),
    exact for Gaussian data; no model evaluation."""
    t_from, t_to = (torch.as_tensor(t, dtype=torch.float64) for t in (t_from, t_to))
    a0, s0 = (float(v) for v in process.alpha_sigma(t_from))
    a1, s1 = (float(v) for v in process.alpha_sigma(t_to))
    if not a1 > 0:
        raise ValueError("teleport must end at a time with alpha > 0")
    lam = moments.eigvals.to(x.device)
    mu = moments.mean.to(x.device, torch.float64).flatten()
    w = _basis(moments, x.to(torch.float64).flatten(1) - a0 * mu)
    w = w * ((lam + (s1 / a1) ** 2) / (a0 * a0 * lam + s0 * s0)).sqrt()
    return (a1 * (mu + _basis(moments, w, back=True))).reshape(x.shape).to(x.dtype)


class GaussianDenoiser:
    """The exact denoiser of N(mean, C) under ``process`` (``GaussianMoments``):
    x0_hat = mu + V diag(alpha lambda / (alpha^2 lambda + sigma^2)) V^T (x - alpha mu) and
    eps_hat = V diag(sigma / (alpha^2 lambda + sigma^2)) V^T (x - alpha mu)."""

    def __init__(self, process, moments: GaussianMoments):
        self.process, self.moments = process, moments

    def __call__(self, x: Tensor, t, cond: Any = None) -> Prediction:
        m = self.moments
        a, s = (v.reshape(-1, 1) for v in self.process.alpha_sigma(
            as_time(t, x).expand(x.shape[0])))
        mu = m.mean.to(x.device, torch.float64).flatten()
        lam = m.eigvals.to(x.device)
        w = _basis(m, x.to(torch.float64).flatten(1) - a * mu) / (a * a * lam + s * s)
        x0 = mu + _basis(m, a * lam * w, back=True)
        eps = _basis(m, s * w, back=True)
        return Prediction(x0=x0.reshape(x.shape).to(x.dtype), eps=eps.reshape(x.shape).to(x.dtype))


class GaussianHead:
    """``denoiser`` at and below the noise level ``sigma_skip`` (sigma~ = sigma / alpha) and
    the data Gaussian's exact denoiser (``GaussianDenoiser``) above it, where the two differ by
    terms of order kappa_3 / sigma~^2 (module docstring). A sampler on any grid then spends no
    model evaluation on its levels above ``sigma_skip`` and keeps them as history (a
    multistep method's first steps use them), so ``CountingDenoiser(denoiser)`` inside it
    counts only the model's evaluations. Any sampler works with it unchanged."""

    def __init__(self, denoiser, moments: GaussianMoments, sigma_skip: float):
        if not sigma_skip > 0:
            raise ValueError(f"sigma_skip must be > 0, got {sigma_skip}")
        self.inner, self.process = denoiser, denoiser.process
        self.gaussian = GaussianDenoiser(denoiser.process, moments)
        self.log_snr_skip = -2 * math.log(sigma_skip)

    def __call__(self, x: Tensor, t, cond: Any = None) -> Prediction:
        t = as_time(t, x)
        # strictly above sigma_skip (a level placed at sigma_skip itself goes to the model)
        high = self.process.log_snr(t) < self.log_snr_skip - 1e-9
        if bool(high.all()):
            return self.gaussian(x, t)
        if not bool(high.any()):
            return self.inner(x, t, cond)
        tb = t.expand(x.shape[0])                      # mixed levels within a batch
        low, hi = self.inner(x, tb, cond), self.gaussian(x, tb)
        pick = expand_like(high.expand(x.shape[0]), x).bool()
        return Prediction(x0=torch.where(pick, hi.x0, low.x0),
                          eps=torch.where(pick, hi.eps, low.eps))


__all__ = ["GaussianDenoiser", "GaussianHead", "GaussianMoments", "data_moments", "skip_level",
           "teleport"]
