"""Training objectives: one small class per objective in the registry ``OBJECTIVES``, each
owning its time distribution and weighting and returning an unreduced loss
(:class:`~.base.Objective` is the interface); ``build_objective`` makes one from an
``ObjectiveConfig`` (what ``difflab train`` builds).

=============  ====================================================  =====================
objective      loss per example                                      default time sampling
=============  ====================================================  =====================
``simple``     w(lambda) |target - output|^2 in the loss space       ``uniform``
``vlb``        (L_T + term(t) / p(t)) / dims, learned variance       ``importance``
``hybrid``     L_simple + 0.001 L_vlb (mean detached in L_vlb)       ``uniform``
``edm``        lambda(sigma) |x0 - D(x_t)|^2, EDM preconditioning    ``lognormal``
``consis-      lambda(s_n) d(f(x_{n+1}), sg f(x_n)), the student     log-normal over the
tency-         its own target (iCT, Song & Dhariwal 2023)            levels, N(k) curriculum
training``
``rectified-   |(eps - x0) - v(x_t)|^2, velocity of the linear path  ``uniform`` (or
flow``         (``rectified_flow`` process, ``flow`` prediction)     ``logit_normal``)
=============  ====================================================  =====================

A new objective is a module with its class and one entry here (registry and ``ObjectiveName``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .base import Objective, ObjectiveOutput
from .consistency import ConsistencyTrainingObjective
from .edm import EDMObjective
from .flow import FLOW_TIMES, RectifiedFlowObjective, velocity_loss
from .hybrid import HybridObjective
from .simple import LOSS_SPACES, LossOutput, LossSpace, SimpleObjective, simple_loss
from .times import (
    P_MEAN,
    P_STD,
    TIME_SAMPLINGS,
    ImportanceSampler,
    TimeSampling,
    continuous_times,
    logit_normal_times,
    lognormal_times,
)
from .vlb import VLBObjective, model_prediction, vlb_loss, vlb_term_from_prediction
from .weighting import WEIGHTINGS, Weighting, loss_weight

ObjectiveName = Literal["simple", "vlb", "hybrid", "edm", "rectified-flow",
                        "consistency-training", "ddgan"]
#: objectives trained by a recipe of their own rather than as a loss of the diffusion recipe
#: (``ddgan``: ``difflab.recipes.ddgan``); ``difflab train --objective NAME`` dispatches there
RECIPE_OBJECTIVES: tuple[str, ...] = ("ddgan",)
OBJECTIVES: dict[str, type[Objective]] = {
    "simple": SimpleObjective,
    "vlb": VLBObjective,
    "hybrid": HybridObjective,
    "edm": EDMObjective,
    "rectified-flow": RectifiedFlowObjective,
    "consistency-training": ConsistencyTrainingObjective,
}
#: each objective's time distribution when ``time_sampling`` is None
DEFAULT_TIMES: dict[str, str] = {name: cls.default_times for name, cls in OBJECTIVES.items()}


def _opt(default: object, help: str, flag: str | None = None) -> Any:
    """A config field with its help text; objective options stay fixed across a resume."""
    return field(default=default, metadata={"help": help, "resume": False, "flag": flag})


@dataclass
class ObjectiveConfig:
    """The training objective and its options (each objective uses the ones it needs)."""

    name: ObjectiveName = _opt(
        "simple", "training objective: simple (MSE, weighted by --weighting), vlb (variational "
        "bound, learned variance, importance-sampled t), hybrid (simple + --vlb-lambda * vlb, "
        "learned variance; Nichol & Dhariwal 2021), edm (needs --prediction edm; log-normal "
        "noise levels, EDM weight), rectified-flow (velocity MSE on x_t = (1 - t) x_0 + t "
        "eps; sets --schedule rectified_flow and --prediction flow when not given), "
        "consistency-training (a consistency model without a teacher, Song & Dhariwal 2023; "
        "needs --prediction edm) or ddgan (denoising diffusion GAN, Xiao et al. 2022: "
        "--gan-steps steps, an x0 generator with latent z; try --lr 2e-4)",
        flag="--objective")
    weighting: Weighting | None = _opt(
        None, "loss weight as a function of SNR: constant (the loss space's own MSE), snr, "
        "min_snr (min(SNR, gamma), Hang et al. 2023), truncated_snr (max(SNR, 1)), edm (SNR + "
        "1 / sigma_data^2); default: the objective's (edm for edm, where constant also means "
        "edm; else constant)")
    min_snr_gamma: float = _opt(5.0, "gamma of --weighting min_snr")
    loss_space: LossSpace | None = _opt(
        None, "space of the MSE loss: eps, x0 or v (default: the prediction's own)")
    vlb_lambda: float = _opt(0.001, "weight of L_vlb in --objective hybrid")
    time_sampling: TimeSampling | None = _opt(
        None, "training-time distribution: uniform (the process's own), continuous "
        "(real-valued t, also for discrete schedules), lognormal (EDM), importance (vlb only), "
        "logit_normal (rectified-flow only; SD3); default: the objective's")
    p_mean: float = _opt(P_MEAN, "mean of ln(sigma / alpha) under lognormal time sampling "
                                 "(EDM's P_mean)")
    p_std: float = _opt(P_STD, "standard deviation of ln(sigma / alpha) under lognormal time "
                               "sampling (EDM's P_std)")
    logit_mean: float = _opt(0.0, "mean m of logit(t) under logit_normal time sampling "
                                  "(Esser et al. 2024)")
    logit_std: float = _opt(1.0, "standard deviation s of logit(t) under logit_normal time "
                                 "sampling")
    gan_steps: int = _opt(4, "ddgan: number of large reverse steps (its sampling grid: the "
                             "trailing grid of the process)")
    r1_gamma: float = _opt(0.02, "ddgan: R1 penalty weight gamma ((gamma/2)|grad D|^2 on real "
                                 "x_{t-1}; 0: off)")
    curriculum_start: int = _opt(10, "consistency-training: s0, the number of noise-level "
                                     "intervals at the start (N(0) = s0 + 1)")
    curriculum_end: int = _opt(160, "consistency-training: s1, the most intervals; N doubles "
                                    "from s0 + 1 to s1 + 1 over the run (the paper: 1280)")


def build_objective(config: ObjectiveConfig) -> Objective:
    """The objective ``config.name`` from the registry, given the fields it uses (its
    ``options``)."""
    if config.name in RECIPE_OBJECTIVES:
        raise ValueError(f"objective {config.name!r} is trained by its own recipe "
                         f"(difflab.recipes.{config.name}), not as a diffusion loss")
    if config.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.name!r}; choose from {tuple(OBJECTIVES)}")
    cls = OBJECTIVES[config.name]
    return cls(**{name: getattr(config, name) for name in cls.options})


__all__ = ["ConsistencyTrainingObjective", "DEFAULT_TIMES", "FLOW_TIMES", "LOSS_SPACES",
           "OBJECTIVES", "P_MEAN", "P_STD",
           "TIME_SAMPLINGS", "WEIGHTINGS", "EDMObjective", "HybridObjective",
           "ImportanceSampler", "LossOutput", "LossSpace", "Objective", "ObjectiveConfig",
           "ObjectiveName", "ObjectiveOutput", "RECIPE_OBJECTIVES", "RectifiedFlowObjective",
           "SimpleObjective",
           "TimeSampling", "VLBObjective", "Weighting", "build_objective", "continuous_times",
           "logit_normal_times", "lognormal_times", "loss_weight", "model_prediction",
           "simple_loss", "velocity_loss", "vlb_loss", "vlb_term_from_prediction"]
