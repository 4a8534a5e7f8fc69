"""One denoiser interface: whatever the network predicts, samplers see x0_hat and eps_hat.

For x_t = alpha x_0 + sigma eps (VP processes, alpha^2 + sigma^2 = 1; the conversions hold
for any alpha and sigma, e.g. the VE process with alpha = 1):

=========  ======================  ===========================  ==========================
predicts   network output          x0_hat                       eps_hat
=========  ======================  ===========================  ==========================
``eps``    eps (Ho et al. 2020)    (x_t - sigma eps) / alpha    eps
``x0``     x_0                     x_0                          (x_t - alpha x_0) / sigma
``v``      v = alpha eps - sigma   alpha x_t - sigma v          sigma x_t + alpha v
           x_0 (Salimans & Ho
           2022)
``edm``    F, preconditioned       c_skip x~ + c_out F          (x_t - alpha x0_hat) / sigma
           (Karras et al. 2022)
``score``  s = grad log q(x_t)     (x_t + sigma^2 s) / alpha    -sigma s
           (Song & Ermon 2019)
``flow``   u = dx_t/dt = alpha'    (sigma' x_t - sigma u) / d   (alpha u - alpha' x_t) / d
           x_0 + sigma' eps (Liu
           et al. 2022)
``consis-  F of a base type, under  c_skip^CM x~ + c_out^CM F   (x_t - alpha x0_hat) / sigma
tency``    the consistency boundary (Song et al. 2023)
           parameterisation
=========  ======================  ===========================  ==========================

For ``flow`` (velocity prediction of flow matching, Lipman et al. 2022; rectified flow,
Liu et al. 2022) x_t and u are two linear combinations of (x_0, eps), solved with the
determinant d = alpha sigma' - sigma alpha', where ' is d/dt of the process
(``Process.alpha_sigma_dt``). On the linear path alpha = 1 - t, sigma = t
(``process.RectifiedFlow``): u = eps - x_0, d = 1, x0_hat = x_t - t u and
eps_hat = x_t + (1 - t) u. Without the derivatives (``rates_dt`` None) the conversion assumes
that linear path and checks alpha + sigma = 1.

A raw score output must grow like 1 / sigma near the data, so score models are trained with
the denoising-score-matching weight lambda = sigma^2 (Song & Ermon 2019, eq. 6), which is the
eps-space MSE: that is the default loss space of ``score`` (``objectives.simple_loss``).

For ``edm`` the network sees the variance-exploding view x~ = x_t / alpha with noise level
s = sigma / alpha and (Karras et al. 2022, Table 1, with sigma_data the data std)

  c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),
  c_in = 1 / sqrt(s^2 + sd^2),   c_noise = ln(s) / 4.

Multiplying through by alpha, with r^2 = sigma^2 + alpha^2 sd^2, these read
c_skip x~ = sd^2 alpha x_t / r^2, c_out = sigma sd / r, c_in x~ = x_t / r: finite on the
whole path, including alpha = 0 (zero terminal SNR) and, for a VE process, alpha = 1.

``consistency`` (Song et al. 2023, sec. 3 and appendix C; Song & Dhariwal 2023) is the
consistency function f(x, t) = c_skip(s) x~ + c_out(s) F(x, t) with

  c_skip = sd^2 / ((s - s_min)^2 + sd^2),  c_out = sd (s - s_min) / sqrt(sd^2 + s^2),

so that f(x, t) = x~ exactly where s <= s_min (the boundary condition; s - s_min is clamped
at 0, so c_skip = 1 and c_out = 0 there in floating point too). F is the EDM-preconditioned
output implied by the network's *base* prediction type (``base_prediction``): F =
(x0_base - c_skip^EDM x~) / c_out^EDM, whose consistency form is, with c_out^CM / c_out^EDM =
(s - s_min) / s,

  f = c_skip^CM x~ + ((s - s_min) / s) (x0_base - c_skip^EDM x~).

With base ``edm`` this is the paper's form exactly (F the network output, EDM inputs); with an
``eps`` (or v, x0) base the network keeps its inputs, so a student copied from an eps teacher
starts as f = x0_teacher + O(s_min / s): the teacher's denoiser away from s_min, pulled to the
identity as s -> s_min. s = sigma / alpha is computed as exp(-lambda / 2) in float64, the same
way as the noise levels of the consistency discretisation, so s = s_min at the student's
t_min bit for bit.

The score is grad log q(x_t) = -eps_hat / sigma. The conversion happens once, here; no
sampler looks at the prediction type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from .conditioning import expand_cond
from .process import Process, as_time, expand_like

PredictionType = Literal["eps", "x0", "v", "edm", "score", "flow", "consistency"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v", "edm", "score", "flow", "consistency")
#: what a consistency model's network can predict underneath (``base_prediction``)
BASE_PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v", "edm", "score", "flow")
#: |log-SNR| is clamped to this where it enters c_noise (it is infinite at both ends).
LOG_SNR_CLAMP = 40.0
#: The U-Net's sinusoidal time embedding is made for inputs in [0, 1000]; EDM's
#: c_noise = ln(s) / 4 lies mostly in [-2, 2], so it is scaled by this before embedding.
EDM_NOISE_SCALE = 250.0


@dataclass(frozen=True)
class Prediction:
    """A denoiser's answer at (x_t, t): the clean-data estimate and the noise estimate."""

    x0: Tensor
    eps: Tensor
    #: learned-variance models only: v in [0, 1] per element, the reverse variance is
    #: Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t) (Nichol & Dhariwal 2021, eq. 15).
    var_frac: Tensor | None = None

    def v(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """v = alpha eps - sigma x0 for per-example rates broadcastable to x."""
        return expand_like(alpha, self.x0) * self.eps - expand_like(sigma, self.x0) * self.x0

    def score(self, sigma: Tensor) -> Tensor:
        """grad_x log q_t(x) = -eps / sigma (Song et al. 2021)."""
        return -self.eps / expand_like(sigma, self.eps)


def edm_coefficients(alpha: Tensor, sigma: Tensor, sigma_data: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip / alpha, c_out, c_in / alpha) of Karras et al. 2022 (Table 1) for x_t itself:
    x0_hat = (c_skip / alpha) x_t + c_out F((c_in / alpha) x_t); finite wherever
    alpha^2 + sigma^2 > 0 (module docstring)."""
    r2 = sigma**2 + alpha**2 * sigma_data**2
    return sigma_data**2 * alpha / r2, sigma * sigma_data / r2.sqrt(), 1 / r2.sqrt()


def edm_c_noise(alpha: Tensor, sigma: Tensor) -> Tensor:
    """c_noise = ln(s) / 4 = -lambda / 8 with s = sigma / alpha (Karras et al. 2022, Table 1),
    lambda clamped to +-LOG_SNR_CLAMP so that both ends of the path stay finite."""
    lam = 2 * (torch.log(alpha) - torch.log(sigma))
    return -lam.clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP) / 8


#: noise levels within this relative distance of s_min count as the boundary (float64 exp may
#: round s(t_min) and s_min apart by an ulp), so f(x, t_min) = x~ there bit for bit.
BOUNDARY_RTOL = 1e-12


def noise_level(process: Process, t: Tensor) -> Tensor:
    """s = sigma / alpha = exp(-lambda / 2) in float64 (inf where alpha = 0): the VE noise
    level of the consistency parameterisation and of its discretisation."""
    return (-0.5 * process.log_snr(t)).exp()


def boundary_distance(s: Tensor, sigma_min: float) -> Tensor:
    """s - s_min, exactly 0 at and below the boundary (within ``BOUNDARY_RTOL``)."""
    d = s - sigma_min
    return torch.where(d <= BOUNDARY_RTOL * sigma_min, torch.zeros_like(d), d)


def consistency_coefficients(s: Tensor, sigma_min: float, sigma_data: float
                             ) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the consistency boundary parameterisation at noise levels s (Song et
    al. 2023, appendix C): c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) /
    sqrt(sd^2 + s^2); exactly (1, 0) for s <= s_min, and (0, sd) at s = inf."""
    d = boundary_distance(s, sigma_min)
    c_skip = sigma_data**2 / (d**2 + sigma_data**2)
    c_out = torch.where(torch.isinf(s), torch.full_like(s, sigma_data),
                        sigma_data * d / (sigma_data**2 + s**2).sqrt())
    return c_skip, c_out


def consistency_x0(x0_base: Tensor, x: Tensor, alpha: Tensor, s: Tensor, sigma_min: float,
                   sigma_data: float) -> Tensor:
    """f(x_t, t) = c_skip^CM x~ + ((s - s_min) / s) (x0_base - c_skip^EDM x~), x~ = x_t / alpha:
    the consistency function whose F is the EDM output implied by a base denoiser's x0_base
    (module docstring; c_out^CM / c_out^EDM = (s - s_min) / s). Coefficients are computed in
    float64 and cast to x's dtype; at s <= s_min the result is x~ exactly."""
    c_skip, _ = consistency_coefficients(s, sigma_min, sigma_data)
    finite = torch.isfinite(s)
    safe_s = torch.where(finite & (s > 0), s, torch.ones_like(s))
    ratio = torch.where(finite, boundary_distance(s, sigma_min) / safe_s, torch.ones_like(s))
    skip_edm = torch.where(finite, sigma_data**2 / (safe_s**2 + sigma_data**2),
                           torch.zeros_like(s))
    safe_a = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    x_ve = x / expand_like(safe_a, x)  # x~; only used where alpha > 0 (c_skip = 0 elsewhere)
    c_skip, ratio, skip_edm = (expand_like(v, x) for v in (c_skip, ratio, skip_edm))
    return c_skip * x_ve + ratio * (x0_base - skip_edm * x_ve)


def flow_rates_dt(alpha: Tensor, sigma: Tensor,
                  rates_dt: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(alpha', sigma') for the ``flow`` conversions: ``rates_dt`` when given, else those of
    the linear path (-1, 1), after checking that alpha + sigma = 1 there."""
    if rates_dt is not None:
        return rates_dt
    if not bool(torch.allclose(alpha + sigma, torch.ones_like(alpha), atol=1e-6)):
        raise ValueError("prediction 'flow' off the linear path alpha + sigma = 1 needs the "
                         "time derivatives of alpha and sigma (rates_dt)")
    return torch.full_like(alpha, -1.0), torch.ones_like(sigma)


def prediction_from_output(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor,
                           kind: PredictionType, sigma_data: float = 0.5,
                           rates_dt: tuple[Tensor, Tensor] | None = None) -> Prediction:
    """Convert a raw network output of type ``kind`` at x_t into (x0_hat, eps_hat).

    eps-prediction cannot recover x0 where alpha = 0 (zero terminal SNR: x_T is pure noise);
    there x0_hat is defined as 0, the centre of the [-1, 1] data range, rather than 0/0 (use
    v- or x0-prediction to learn x0 at t = T; Lin et al. 2024, sec. 3.2). ``rates_dt`` =
    (d alpha / dt, d sigma / dt) is used by ``flow`` only (``flow_rates_dt``)."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    if kind == "flow":
        da, ds = (expand_like(r, x) for r in flow_rates_dt(alpha, sigma, rates_dt))
        det = a * ds - s * da  # 1 on the linear path
        return Prediction(x0=(ds * x - s * out) / det, eps=(a * out - da * x) / det)
    if kind in ("eps", "score"):
        eps = out if kind == "eps" else -s * out  # score = -eps / sigma
        safe = torch.where(a > 0, a, torch.ones_like(a))  # no inf in either branch: no NaN grads
        return Prediction(x0=torch.where(a > 0, (x - s * eps) / safe, torch.zeros_like(x)),
                          eps=eps)
    if kind == "x0":
        return Prediction(x0=out, eps=(x - a * out) / s)
    if kind == "v":
        return Prediction(x0=a * x - s * out, eps=s * x + a * out)
    if kind == "edm":
        skip, c_out, _ = edm_coefficients(a, s, sigma_data)
        x0 = skip * x + c_out * out
        return Prediction(x0=x0, eps=(x - a * x0) / s)
    if kind == "consistency":
        raise ValueError("a consistency output needs its base type and sigma_min: use "
                         "Denoiser(..., 'consistency', base_prediction=..., sigma_min=...)")
    raise ValueError(f"unknown prediction type {kind!r}; choose from {PREDICTION_TYPES}")


def output_from_prediction(pred: Prediction, alpha: Tensor, sigma: Tensor,
                           kind: PredictionType,
                           rates_dt: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The network output of type ``kind`` that ``pred`` corresponds to (training targets);
    ``rates_dt`` as in :func:`prediction_from_output`."""
    if kind == "flow":  # u = alpha' x_0 + sigma' eps
        da, ds = flow_rates_dt(alpha, sigma, rates_dt)
        return expand_like(da, pred.x0) * pred.x0 + expand_like(ds, pred.eps) * pred.eps
    if kind == "eps":
        return pred.eps
    if kind == "x0":
        return pred.x0
    if kind == "v":
        return pred.v(alpha, sigma)
    if kind == "score":
        return pred.score(sigma)
    if kind == "edm":
        raise ValueError("the EDM target F depends on x_t; train EDM models in x0 space "
                         "with the 'edm' weighting (difflab.weighting)")
    if kind == "consistency":
        raise ValueError("a consistency model has no regression target of its own; train it "
                         "with consistency distillation or training")
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

    def __init__(self, net: nn.Module, process: Process, prediction: PredictionType = "eps",
                 learned_variance: bool = False, sigma_data: float = 0.5,
                 base_prediction: str = "edm", sigma_min: float | None = None,
                 sigma_max: float | None = None):
        """``learned_variance``: the network outputs 2C channels, the prediction and then
        v in [-1, 1] (mapped to [0, 1], ``Prediction.var_frac``); ``sigma_data``: the data
        std assumed by the ``edm`` preconditioning. For ``consistency``: ``base_prediction``
        is what the network's raw output is read as (and which inputs it sees), and
        ``sigma_min`` the boundary s_min (required), where f(x, t) = x~; ``sigma_max`` (None:
        no limit) the top noise level it was trained to: x_t at a higher level s_t is
        evaluated there as x_top = (sigma_top / sigma_t) x_t, i.e. x~ rescaled to s_max
        (the noise kept, the tiny signal shrunk: the usual start from N(0, s_max^2))."""
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; "
                             f"choose from {PREDICTION_TYPES}")
        if prediction == "consistency":
            if base_prediction not in BASE_PREDICTION_TYPES:
                raise ValueError(f"unknown base prediction {base_prediction!r} of a "
                                 f"consistency model; choose from {BASE_PREDICTION_TYPES}")
            if sigma_min is None or not sigma_min >= 0:
                raise ValueError("a consistency model needs its boundary sigma_min >= 0")
            if sigma_max is not None and not sigma_max > sigma_min:
                raise ValueError("a consistency model's sigma_max must exceed sigma_min")
        self.net, self.process, self.prediction = net, process, prediction
        self.learned_variance, self.sigma_data = learned_variance, sigma_data
        self.base_prediction, self.sigma_min, self.sigma_max = (base_prediction, sigma_min,
                                                                 sigma_max)
        self.t_top = (None if sigma_max is None or prediction != "consistency" else
                      float(process.t_from_log_snr(torch.tensor(-2 * math.log(sigma_max),
                                                                dtype=torch.float64))))

    @property
    def input_kind(self) -> str:
        """The prediction type whose network inputs and raw output the network has (the base
        type of a consistency model, else the prediction itself)."""
        return self.base_prediction if self.prediction == "consistency" else self.prediction

    def raw(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The network output (in x's dtype) for x_t at times t [B]; for ``edm`` the network
        sees c_in x~ and c_noise instead of x_t and the process time."""
        param = next(self.net.parameters())
        if self.input_kind == "edm":
            alpha, sigma = self.process.alpha_sigma(t)
            _, _, c_in = edm_coefficients(alpha, sigma, self.sigma_data)
            x = expand_like(c_in, x) * x
            c_noise = EDM_NOISE_SCALE * edm_c_noise(alpha, sigma)
        else:
            c_noise = self.process.c_noise(t)
        out = self.net(x.to(param.dtype), c_noise.to(device=x.device, dtype=torch.float32),
                       cond)
        return out.to(x.dtype)

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction channels, variance channels v in [-1, 1] or None) of a raw output."""
        if not self.learned_variance:
            return out, None
        c = out.shape[1] // 2
        return out[:, :c], out[:, c:]

    def predict(self, out: Tensor, x: Tensor, t: Tensor) -> Prediction:
        """The Prediction of a raw output at x_t, times t [B]."""
        mean, var = self.split(out)
        alpha, sigma = self.process.alpha_sigma(t)
        rates_dt = self.process.alpha_sigma_dt(t) if self.input_kind == "flow" else None
        pred = prediction_from_output(mean, x, alpha, sigma, self.input_kind, self.sigma_data,
                                      rates_dt)
        if self.prediction == "consistency":
            assert self.sigma_min is not None  # checked in __init__
            x0 = consistency_x0(pred.x0, x, alpha, noise_level(self.process, t),
                                self.sigma_min, self.sigma_data)
            s = expand_like(sigma, x)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            eps = torch.where(s > 0, (x - expand_like(alpha, x) * x0) / safe, pred.eps)
            pred = Prediction(x0=x0, eps=eps)
        if var is None:
            return pred
        return Prediction(x0=pred.x0, eps=pred.eps, var_frac=(var.clamp(-1, 1) + 1) / 2)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        t = as_time(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.t_top is None:
            return self.predict(self.raw(x, t, cond), x, t)
        return self._capped(x, t, cond)

    def _capped(self, x: Tensor, t: Tensor, cond: Any) -> Prediction:
        """A consistency model above its top level: evaluated at t_top on (sigma_top /
        sigma_t) x_t; eps_hat is then re-read at the original (x_t, t)."""
        above = noise_level(self.process, t) > self.sigma_max
        if not bool(above.any()):
            return self.predict(self.raw(x, t, cond), x, t)
        t_eval = torch.where(above, torch.full_like(t, self.t_top), t)
        scale = torch.where(above, self.process.sigma(t_eval) / self.process.sigma(t),
                            torch.ones_like(t))
        x_eval = expand_like(scale, x) * x
        x0 = self.predict(self.raw(x_eval, t_eval, cond), x_eval, t_eval).x0
        alpha, sigma = self.process.alpha_sigma(t)
        return Prediction(x0=x0, eps=(x - expand_like(alpha, x) * x0) / expand_like(sigma, x))


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
        return Prediction(x0=x0, eps=torch.where(s > 0, (x - a * x0) / s, pred.eps),
                          var_frac=pred.var_frac)
