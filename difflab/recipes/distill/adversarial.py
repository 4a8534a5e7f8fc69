"""Adversarial diffusion distillation (ADD; Sauer et al. 2023): a few-step student trained
with an adversarial loss against a discriminator plus a score-distillation loss from the
teacher.

Student (Sec. 3.1): initialised from the teacher, it maps noised real data
x_s = alpha_s x0 + sigma_s eps at one of K student times s (the student's sampling grid) to
x0_hat = x_theta(x_s, s), through the teacher's parameterisation. The grid is the
``trailing`` K-step grid with its top time moved to ``t_start`` (an eps-predicting student
cannot recover x0 where alpha ~ 0; ADD starts Stable Diffusion at t = 999 likewise).

Losses (eq. 4): L = L_adv^G + lambda L_distill, and the discriminator's L_adv^D + R1:

- L_adv^G = -D(x0_hat, y, x0) and L_adv^D = relu(1 - D(x0, y, x0)) + relu(1 + D(x0_hat, y,
  x0)) (hinge, eqs. 2-3); D = trainable heads (``gan.ProjectionHeads``: class projection and,
  with ``source_cond``, a projection of the source image x0's features) on the frozen
  teacher U-Net's encoder activations at the small noise level ``feature_t`` (ADD: frozen ViT
  features); R1 = (gamma / 2) |grad_x D(x0, y)|^2 on real data.
- L_distill = c(t) |x0_hat - sg(x_psi(x_t, t))|^2 (mean over pixels; eq. 5), where
  x_t = alpha_t sg(x0_hat) + sigma_t eps' re-noises the student's output at a teacher time
  t ~ U{1..T}, x_psi is the teacher's (optionally guided, clipped) x0 estimate there, and
  c(t) = alpha_t (the paper's "exponential" weighting: noisier re-noising counts less).

Both players live in one module (:class:`AdversarialPair`) trained by the one loop; the
generator reads D through detached parameters and D reads detached fakes, so one backward
gives each its own gradient (``gan`` docstring). The student's tensors are saved under
``student.`` (stage card ``weights_prefix``); its card samples with ``renoise`` (ADD's
multistep sampling: x0_hat, then a fresh forward draw at the next time) at 1, 2 or 4 steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ...config import option
from ...networks.fused import reference_ops
from ...parameterization import Denoiser, DenoiserFn
from ...pipeline import Pipeline
from ...samplers import time_grid
from ..config import OptimConfig, RunConfig
from .base import (
    StudentLoop,
    data_source,
    distill_optim,
    distill_run,
    load_teacher,
    student_network,
    student_stage,
    teacher_data,
)
from .gan import (
    ProjectionHeads,
    detached_call,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
    unet_features,
)

__all__ = ["AdversarialConfig", "AdversarialLoss", "AdversarialPair", "Frozen", "build",
           "distillation_target", "student_times"]


@dataclass
class AdversarialConfig:
    """``difflab distill adversarial``: ADD's student, discriminator and loss weights."""

    teacher: str = option("", "teacher: a run folder, checkpoint or pipeline folder")
    student_steps: int = option(4, "K: the student's sampling grid (trailing K-step grid of "
                                   "the teacher's process, top time t_start); it samples at "
                                   "1, 2 or K steps on it", ge=1)
    prediction: str = option("teacher", "the student's prediction type: 'teacher' (the "
                                        "teacher's own) or its weights read as v, x0 or eps "
                                        "(v measured no better on the digits teacher)",
                             choices=("teacher", "v", "x0", "eps"))
    t_start: float = option(950.0, "top time of the student's grid (where sampling starts "
                                   "from pure noise); at most the process's t_max", gt=0)
    distill_weight: float = option(2.5, "lambda: weight of the score-distillation loss "
                                        "(ADD's 2.5)", ge=0)
    guidance: float = option(1.0, "classifier-free guidance scale of the teacher's targets "
                                  "(1: none; class models only)", ge=0)
    r1_gamma: float = option(1e-2, "R1 penalty weight gamma ((gamma/2)|grad D(x)|^2 on real "
                                   "data; 0: off)", ge=0)
    feature_t: float = option(10.0, "noise level (teacher time) at which the frozen "
                                    "teacher U-Net encodes images for the discriminator",
                              ge=0)
    head_channels: int = option(64, "width of each discriminator head", ge=1)
    source_cond: bool = option(True, "condition the discriminator on the features of the "
                                     "source image x0 that the student's input was noised "
                                     "from (ADD's image conditioning, Sec. 3.2; off: the "
                                     "student collapses to one image per class)")
    optim: OptimConfig = option(factory=distill_optim(steps=600, batch_size=64, lr=1e-4,
                                                      grad_clip=0.0, ema_decay=0.99),
                                help="optimisation")
    run: RunConfig = option(factory=distill_run("adversarial"), help="run")


def student_times(process: Any, k: int, t_start: float) -> Tensor:
    """The student's K times: the ``trailing`` K-step grid with its top time replaced by
    ``t_start`` (float64 [K], decreasing); ValueError naming --t-start if out of range."""
    if not process.t_min < t_start <= process.t_max:
        raise ValueError(f"--t-start must lie in ({process.t_min:g}, {process.t_max:g}], "
                         f"got {t_start:g}")
    ts = time_grid(process, k)[:-1].clone()
    if k > 1 and not t_start > float(ts[1]):
        raise ValueError(f"--t-start {t_start:g} must exceed the grid's second time "
                         f"{float(ts[1]):g}")
    ts[0] = t_start
    return ts


def distillation_target(teacher: DenoiserFn, x0_hat: Tensor, t: Tensor, noise: Tensor,
                        cond: Any = None) -> tuple[Tensor, Tensor]:
    """(x_t, target): the student's output re-noised, x_t = alpha_t sg(x0_hat) + sigma_t eps',
    and the teacher's x0 estimate there, without gradient (ADD, eq. 5)."""
    a, s = teacher.process.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0_hat.ndim - 1)
    x_t = (a.view(shape).to(x0_hat.dtype) * x0_hat.detach()
           + s.view(shape).to(x0_hat.dtype) * noise)
    with torch.no_grad():
        target = teacher(x_t, t, cond).x0
    return x_t, target


@dataclass(frozen=True)
class Frozen:
    """What the pair reads but does not train: the teacher's denoiser (targets), the feature
    network of the discriminator, the student's parameterisation, and the loss weights."""

    teacher: DenoiserFn
    features: Any                    # x [B, ...] -> list of feature maps
    process: Any
    prediction: str
    sigma_data: float
    distill_weight: float
    r1_gamma: float


class AdversarialPair(nn.Module):
    """The student (generator) and the discriminator heads in one module; ``forward`` is the
    whole per-example loss L_G + L_D, split so that one backward trains each on its own."""

    def __init__(self, student: nn.Module, heads: ProjectionHeads):
        super().__init__()
        self.student, self.heads = student, heads

    def losses(self, x0: Tensor, labels: Tensor | None, x_s: Tensor, s: Tensor, t: Tensor,
               noise: Tensor, fz: Frozen) -> dict[str, Tensor]:
        """Per-example terms: ``g_adv``, ``distill`` (generator) and ``d_adv``, ``r1``."""
        student = Denoiser(self.student, fz.process, fz.prediction, sigma_data=fz.sigma_data)
        fake = student(x_s, s, labels).x0                     # x_theta(x_s, s)
        feats = fz.features(fake)
        src = None
        if self.heads.source is not None:  # ADD's image conditioning: D(x | x0), both players
            with torch.no_grad():
                src = fz.features(x0)
        g_adv = hinge_g_loss(detached_call(self.heads, feats, labels, src))  # D fixed
        _, target = distillation_target(fz.teacher, fake, t, noise, labels)
        a_t = fz.process.alpha(t).to(fake.dtype)              # c(t) = alpha_t
        distill = a_t * (fake - target).pow(2).flatten(1).mean(1)
        d_fake = self.heads([f.detach() for f in feats], labels, src)  # G fixed

        def d(x: Tensor) -> Tensor:
            return self.heads(fz.features(x), labels, src)

        if fz.r1_gamma > 0:
            with reference_ops():  # R1 differentiates through the feature network twice
                d_real, r1 = r1_penalty(d, x0)
        else:
            d_real, r1 = d(x0), torch.zeros_like(g_adv)
        return {"g_adv": g_adv, "distill": distill, "d_adv": hinge_d_loss(d_real, d_fake),
                "r1": r1}

    def forward(self, x0: Tensor, labels: Tensor | None, x_s: Tensor, s: Tensor, t: Tensor,
                noise: Tensor, fz: Frozen) -> Tensor:
        """L_G + L_D per example [B]: g_adv + lambda distill + d_adv + gamma/2 r1."""
        terms = self.losses(x0, labels, x_s, s, t, noise, fz)
        return (terms["g_adv"] + fz.distill_weight * terms["distill"] + terms["d_adv"]
                + 0.5 * fz.r1_gamma * terms["r1"])


class AdversarialLoss:
    """The loop's loss: draws s among the student times, x_s, the teacher time t and the
    re-noising eps' from the run's generator, then calls the pair."""

    def __init__(self, fz: Frozen, times: Tensor):
        self.fz, self.times = fz, times

    def __call__(self, module: nn.Module, batch: Any, ctx: Any) -> Tensor:
        g, dev = ctx.generator, ctx.device
        x0 = batch.x
        b = len(x0)
        s = self.times.to(dev)[torch.randint(len(self.times), (b,), generator=g, device=dev)]
        a, sig = self.fz.process.alpha_sigma(s)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x_s = a.view(shape).float() * x0 + sig.view(shape).float() * eps
        t = self.fz.process.sample_t(b, g, dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        labels = batch.labels
        loc = ctx.local
        return module(x0[loc], None if labels is None else labels[loc], x_s[loc], s[loc],
                      t[loc], noise[loc], self.fz)


class AdversarialStudentLoop(StudentLoop):
    """A :class:`StudentLoop` whose trained module is the pair: it samples the student."""

    def pipeline(self) -> Pipeline:
        return self.student_pipeline(replace(self.stage, weights="student", weights_prefix=""),
                                     self.sampling_module().student)


def teacher_features(teacher: Pipeline, feature_t: float):
    """x -> the frozen teacher U-Net's encoder activations at time ``feature_t``."""
    net = teacher.net
    if teacher.stage.network != "unet":
        raise ValueError("adversarial distillation needs a U-Net teacher (its encoder is the "
                         f"discriminator's feature network); got {teacher.stage.network!r}")
    c = teacher.process.c_noise(torch.tensor(float(feature_t), dtype=torch.float64)).float()

    def features(x: Tensor) -> list[Tensor]:
        return unet_features(net, x, c.to(x.device).expand(x.shape[0]))

    return features


def build(config: AdversarialConfig, overwrite: bool = False) -> AdversarialStudentLoop:
    """The ADD student loop over ``config.teacher`` (module docstring)."""
    teacher = load_teacher(config.teacher)
    process = teacher.process
    times = student_times(process, config.student_steps, config.t_start)
    data = teacher_data(teacher)
    features = teacher_features(teacher, config.feature_t)
    with torch.no_grad():
        channels = [f.shape[1] for f in features(data.x[:2])]
    torch.manual_seed(config.run.seed)
    heads = ProjectionHeads(channels, config.head_channels, data.num_classes,
                            source=config.source_cond)
    pair = AdversarialPair(student_network(teacher), heads)
    st = teacher.stage
    prediction = st.prediction if config.prediction == "teacher" else config.prediction
    fz = Frozen(teacher.denoiser(guidance=config.guidance), features, process, prediction,
                st.sigma_data, config.distill_weight, config.r1_gamma)
    stage = student_stage(teacher, weights_prefix="student", sampler="renoise",
                          prediction=prediction,
                          sampler_steps=config.student_steps,
                          sampler_options={"t_start": float(times[0])})
    return AdversarialStudentLoop(
        config, "adversarial", teacher, pair, stage, AdversarialLoss(fz, times),
        data_source(data, config.optim.batch_size, config.run.seed), overwrite=overwrite,
        extra_meta={"student_times": [float(t) for t in times]})
