"""Reflow (Liu et al. 2022, "Flow straight and fast", sec. 2.3 and Algorithm 1): straighten a
teacher's probability-flow map for few-step and one-step generation.

1. Draw noise z ~ N(0, I) and the teacher's ODE image x = ODE_teacher(sigma_max z) with a
   deterministic sampler (``samplers.ODE_SAMPLERS``) and a number of steps: the coupling
   (z, x) (:func:`reflow_pairs`).
2. Train a student, initialised from the teacher's network, on the straight interpolation
   between each pair, x_t = (1 - t) x + t z, to predict the velocity z - x (the
   ``rectified-flow`` objective's loss, :func:`objectives.velocity_loss`, with the paired z
   as the noise). Where the teacher's map is exact, the pairs' paths do not cross, so the
   student's flow is straight and one Euler (= DDIM) step from t = 1 reproduces the map.

The student is a flow model: the ``rectified_flow`` process with ``flow`` prediction, whatever
the teacher is. A teacher that is itself a flow model gives the paper's "2-rectified flow";
any other teacher (e.g. the default eps-prediction digits model on a VP schedule) is
reflowed through its own probability-flow ODE map, z -> x, which its sampler integrates in its
own process (the teacher's start x_T = sigma_max z, sigma_max = sigma(t_max) of its process;
1 for VP schedules). The student saves as an ordinary pipeline whose own sampler is ``ddim``
with ``student_steps`` (1) steps: ``difflab sample --checkpoint STUDENT`` draws in one step.
A class-conditional teacher is run at classifier-free guidance ``guidance`` on uniformly drawn
classes; the student learns that guided map, so sample it without ``--guidance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...config import check_ranges, option
from ...data.source import Batch, EpochSource
from ...objectives import FLOW_TIMES, RectifiedFlowObjective, velocity_loss
from ...parameterization import Denoiser, DenoiserFn
from ...pipeline import Pipeline
from ...process import RectifiedFlow
from ...samplers import ODE_SAMPLERS, check_sampler_options, get_sampler, time_grid
from ...training import StepContext, init_device
from ..config import OptimConfig, RunConfig
from .base import (
    StudentLoop,
    distill_optim,
    distill_run,
    load_teacher,
    student_network,
    student_stage,
)

__all__ = ["ReflowConfig", "build_reflow", "reflow_pairs", "teacher_pairs"]


@dataclass
class ReflowConfig:
    """``difflab distill reflow``: the teacher, how its ODE map is drawn, the student."""

    teacher: str = option("", "the teacher: a run folder, checkpoint or pipeline folder")
    teacher_sampler: str = option(
        "dpmpp_2m", "deterministic sampler of the teacher's ODE map (one of "
        "samplers.ODE_SAMPLERS)", choices=lambda: list(ODE_SAMPLERS))
    teacher_steps: int = option(20, "steps of --teacher-sampler", ge=1)
    pairs: int = option(2048, "number of (noise, teacher sample) pairs drawn once", ge=1)
    guidance: float = option(1.0, "classifier-free guidance of a class-conditional teacher "
                                  "(1: the conditional model)")
    clip: bool = option(True, "clip the teacher's x0_hat to the data range, as difflab "
                              "sample does")
    time_sampling: str = option("uniform", "student's training times: uniform or "
                                           "logit_normal (rectified-flow objective)",
                                choices=lambda: ("uniform", "logit_normal"))
    logit_mean: float = option(0.0, "mean of logit(t) under logit_normal times")
    logit_std: float = option(1.0, "std of logit(t) under logit_normal times", ge=0)
    student_steps: int = option(1, "the student's own number of (ddim) steps", ge=1)
    teacher_batch_size: int = option(256, "teacher samples per sampler call", ge=1)
    optim: OptimConfig = option(factory=distill_optim(steps=1000, lr=2e-4), help="optim")
    run: RunConfig = option(factory=distill_run("reflow"), help="run")

    def __post_init__(self) -> None:
        check_ranges(self)


@torch.no_grad()
def reflow_pairs(denoiser: DenoiserFn, sampler: str, steps: int, noise: Tensor,
                 cond: Tensor | None = None, *, batch_size: int = 256,
                 sampler_options: dict[str, Any] | None = None) -> Tensor:
    """The teacher's ODE map of each noise z in ``noise`` [n, ...]: ``sampler`` (an ODE
    sampler) from x_T = sigma_max z on the default ``steps``-step grid of the denoiser's
    process, in batches of ``batch_size`` (deterministic samplers treat examples
    independently, so the batching does not change the result)."""
    if sampler not in ODE_SAMPLERS:
        raise ValueError(f"reflow needs a deterministic (ODE) sampler for the teacher's map, "
                         f"got {sampler!r}; choose from {ODE_SAMPLERS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    fn, opts = get_sampler(sampler), check_sampler_options(sampler, sampler_options or {})
    ts = time_grid(denoiser.process, steps)
    sigma_max = float(denoiser.process.sigma(ts[0]))
    out = []
    for i in range(0, len(noise), batch_size):
        c = None if cond is None else cond[i:i + batch_size]
        out.append(fn(denoiser, sigma_max * noise[i:i + batch_size], ts, None, cond=c, **opts))
    return torch.cat(out)


def teacher_pairs(teacher: Pipeline, config: ReflowConfig
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(z, x = the teacher's ODE map of z, labels or None), ``config.pairs`` of them, drawn
    from ``config.run.seed`` (z ~ N(0, I) at the teacher's sample shape; classes uniform)."""
    if teacher.is_text:
        raise ValueError("reflow takes an unconditional or class-conditional teacher; this "
                         "one takes prompts")
    g = torch.Generator().manual_seed(config.run.seed)
    z = torch.randn((config.pairs, *teacher.sample_shape), generator=g)
    labels = None
    if teacher.class_names:
        labels = torch.randint(len(teacher.class_names), (config.pairs,), generator=g)
        labels = labels.to(teacher.device)
    guidance = None if config.guidance == 1.0 else config.guidance
    den = teacher.denoiser(guidance=guidance, clip=config.clip)
    z = z.to(teacher.device)
    x = reflow_pairs(den, config.teacher_sampler, config.teacher_steps, z, labels,
                     batch_size=config.teacher_batch_size)
    return z, x, labels


class PairSource:
    """Epoch-wise shuffled batches of (teacher sample, noise) pairs, drawn on first use (so
    ``difflab distill`` prints its config first); ``Batch.x`` is [B, 2, ...] = (x, z)."""

    def __init__(self, teacher: Pipeline, config: ReflowConfig):
        self.teacher, self.config = teacher, config
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._epochs: EpochSource | None = None

    def batch(self, step: int, generator: torch.Generator | None = None) -> Batch:
        if self._epochs is None:
            z, x, labels = self.pairs = teacher_pairs(self.teacher, self.config)
            self._epochs = EpochSource(torch.stack([x, z], 1), labels,
                                       self.config.optim.batch_size, self.config.run.seed)
        return self._epochs.batch(step, generator)


@dataclass
class ReflowLoss:
    """Velocity MSE on the straight path between each pair: x_t = (1 - t) x + t z, target
    z - x (``objectives.velocity_loss`` with the paired z as the noise)."""

    objective: RectifiedFlowObjective
    learned_variance: bool = False
    process: RectifiedFlow = field(default_factory=RectifiedFlow)

    def __call__(self, module: torch.nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        pairs, b = batch.x[ctx.local], len(batch)
        t, _ = self.objective.sample_t(self.process, b, ctx.generator, ctx.device)
        labels = None if batch.labels is None else batch.labels[ctx.local]
        den = Denoiser(module, self.process, "flow", self.learned_variance)
        return velocity_loss(den, pairs[:, 0], labels, t[ctx.local], pairs[:, 1])


def build_reflow(config: ReflowConfig, overwrite: bool = False) -> StudentLoop:
    """The reflow student (``difflab distill reflow``): checks the options, loads the teacher,
    and returns the :class:`StudentLoop` whose first batch draws the pairs."""
    if config.teacher_sampler not in ODE_SAMPLERS:
        raise ValueError(f"--teacher-sampler must be an ODE sampler for reflow, got "
                         f"{config.teacher_sampler!r}; choose from {ODE_SAMPLERS}")
    if config.time_sampling not in FLOW_TIMES:
        raise ValueError(f"--time-sampling must be one of {FLOW_TIMES}, got "
                         f"{config.time_sampling!r}")
    objective = RectifiedFlowObjective(config.time_sampling,  # type: ignore[arg-type]
                                       config.logit_mean, config.logit_std)
    _, device = init_device(config.run.device)
    teacher = load_teacher(config.teacher, device)
    if teacher.is_text:
        raise ValueError("reflow takes an unconditional or class-conditional teacher; this "
                         "one takes prompts")
    if config.guidance != 1.0 and not teacher.class_names:
        raise ValueError("--guidance needs a class-conditional teacher; this one is not")
    stage = student_stage(teacher, process=RectifiedFlow().to_config(), prediction="flow",
                          sampler="ddim", sampler_steps=config.student_steps,
                          sampler_options={})
    loss = ReflowLoss(objective, teacher.stage.learned_variance)
    return StudentLoop(config, "reflow", teacher, student_network(teacher), stage, loss,
                       PairSource(teacher, config), overwrite=overwrite, device=device)
