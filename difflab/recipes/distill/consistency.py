"""Consistency distillation (Song et al. 2023, Algorithm 2): ``difflab distill consistency``.

The noise levels are discretised (``objectives.consistency.consistency_levels``: N Karras
levels in s = sigma / alpha from the process's first step s_min up to s_max = 80). Per example
a pair (t_{n+1}, t_n) is drawn uniformly, the teacher's data x is noised to
x_{t_{n+1}} = alpha x + sigma z, one step of the teacher's probability-flow ODE solver
(``samplers.ode_step``: Heun, DDIM or DPM-Solver-2) gives x^_{t_n}, and the student is pulled
to the target network there:

  L = d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^_{t_n}, t_n)),
  theta- <- mu theta- + (1 - mu) theta after every step (mu = 0: the student itself,
  stop-gradient, as Song & Dhariwal 2023 argue),

with d the L2 or pseudo-Huber metric. The student is the teacher's network under the
consistency boundary parameterisation (prediction ``consistency`` with the teacher's
prediction as its base, ``parameterization``). Its first f is the teacher's own denoiser up
to terms of order s_min, and exactly the identity at s_min: for an eps teacher,

  f(x, t) = x~ (c_skip^CM + (1 - s_min / s)(1 - c_skip^EDM)) - (s - s_min) eps_hat,

against the teacher's x0_hat = x~ - s eps_hat (s_min = 0.0064 on the default cosine schedule),
i.e. the Euler step of the teacher's ODE straight to the boundary.

The student saves with prediction ``consistency``, its s_min and s_max, and the sampler
``consistency`` with ``sampler_steps`` steps; ``pipe(sampler="consistency", steps=k)`` or
``difflab sample --sampler consistency --steps k`` sample it at any k.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...conditioning import GuidanceCond
from ...config import option
from ...guidance import ScaleInputCFG
from ...networks import with_guidance_embedding
from ...objectives.consistency import (
    SIGMA_MAX,
    boundary_sigma,
    consistency_distance,
    consistency_levels,
)
from ...parameterization import ClippedDenoiser, Denoiser, DenoiserFn
from ...pipeline import Pipeline
from ...process import q_sample
from ...samplers import ode_step
from ...training import StepContext
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


@dataclass
class ConsistencyConfig:
    """``difflab distill consistency``: options of consistency distillation."""

    teacher: str = option("", "the teacher: a run folder, checkpoint or pipeline folder")
    solver: Literal["heun", "ddim", "dpm_solver"] = option(
        "heun", "the teacher's ODE solver for the step t_{n+1} -> t_n: heun (2 evaluations, "
        "Karras et al. 2022), ddim (1, the Euler step in log-SNR) or dpm_solver "
        "(DPM-Solver-2, 2)")
    num_scales: int = option(18, "N: noise levels of the discretisation (Song et al. 2023 "
                                 "use 18 on CIFAR-10 with Heun)", ge=2)
    sigma_max: float = option(SIGMA_MAX, "top noise level s_max = sigma / alpha of the "
                                         "discretisation (noisier inputs are evaluated there)",
                              gt=0)
    rho: float = option(7.0, "rho of the Karras spacing of the levels", gt=0)
    target_ema: float = option(
        0.0, "mu: EMA decay of the target network, updated after every step (0: the student "
             "itself, stop-gradient; Song & Dhariwal 2023)", ge=0, lt=1)
    metric: Literal["l2", "pseudo_huber"] = option(
        "pseudo_huber", "distance d: l2 (mean squared) or pseudo_huber (sqrt(|a-b|^2 + c^2) - "
                        "c, c = 0.00054 sqrt(dim); Song & Dhariwal 2023)")
    base_prediction: Literal["eps", "x0", "v", "edm"] = option(
        "v", "what the student's network output is read as under the boundary "
             "parameterisation: v keeps the teacher's inputs and is well conditioned at every "
             "noise level (an eps output is amplified by s, up to 80, which ruins one-step "
             "samples); the teacher's own type (eps) starts the student as the teacher")
    guided: bool = option(False, "latent-consistency-style guidance (Luo et al. 2023): the "
                                 "student takes the guidance scale w as an input and distils "
                                 "the classifier-free-guided teacher at w ~ U[--w-min, --w-max]")
    w_min: float = option(1.0, "smallest guidance scale of --guided (1: the conditional model)",
                          ge=0)
    w_max: float = option(4.0, "largest guidance scale of --guided", ge=0)
    sampler_steps: int = option(1, "the student's own number of consistency-sampler steps "
                                   "(its card's default; any k works at sampling)", ge=1)
    dataset: str | None = option(None, "data to distil on (default: the teacher's)")
    optim: OptimConfig = option(
        factory=distill_optim(steps=1000, batch_size=128, lr=2e-4, ema_decay=0.998),
        help="optimisation")
    run: RunConfig = option(factory=distill_run("consistency"), help="bookkeeping")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


class TargetNetwork(nn.Module):
    """theta-: an EMA of the student, updated once per training step (lazily, before the
    step's loss: theta- <- mu theta- + (1 - mu) theta). Checkpointed as loop state."""

    def __init__(self, student: nn.Module, mu: float):
        super().__init__()
        self.net = copy.deepcopy(unwrap(student)).eval().requires_grad_(False)
        self.mu, self.step = mu, -1

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        if step == self.step:
            return
        self.step = step
        for p_t, p in zip(self.net.parameters(), unwrap(student).parameters(), strict=True):
            p_t.lerp_(p.detach(), 1 - self.mu)
        for b_t, b in zip(self.net.buffers(), unwrap(student).buffers(), strict=True):
            b_t.copy_(b)


class ConsistencyDistillationLoss:
    """The per-example loss of Algorithm 2 (module docstring); draws n and z from the run's
    generator for the whole global batch."""

    def __init__(self, teacher: DenoiserFn, target: TargetNetwork, times: Tensor,
                 student_kwargs: dict[str, Any], solver: str, metric: str,
                 guidance: tuple[float, float] | None = None):
        """``teacher``: the teacher's denoiser (``Pipeline.denoiser()``: clipped to the data
        range, as it samples; for ``guidance`` one that reads w from a GuidanceCond);
        ``times``: the increasing levels of the discretisation; ``guidance`` (w_min, w_max):
        w ~ U per example goes to teacher, target and student as a GuidanceCond."""
        self.teacher, self.process = teacher, teacher.process
        self.target, self.times, self.solver, self.metric = target, times, solver, metric
        self.kwargs, self.guidance = student_kwargs, guidance

    @torch.no_grad()
    def teacher_step(self, x_hi: Tensor, t_hi: Tensor, t_lo: Tensor, cond: Any = None
                     ) -> Tensor:
        """x^_{t_n}: one step of the teacher's ODE solver from t_{n+1} (Algorithm 2, line 5)."""
        return ode_step(self.teacher, x_hi, t_hi, t_lo, self.solver, cond)  # type: ignore

    def denoiser(self, net: nn.Module) -> Denoiser:
        """The student (or target) network as a consistency model."""
        return Denoiser(net, self.process, "consistency", **self.kwargs)

    def pairs(self, x0: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """(t_{n+1}, t_n, x_{t_{n+1}}) for the global batch x0."""
        g, dev, b = ctx.generator, ctx.device, len(x0)
        n = torch.randint(0, len(self.times) - 1, (b,), generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=dev)
        times = self.times.to(dev)
        t_hi, t_lo = times[n + 1], times[n]
        return t_hi, t_lo, q_sample(self.process, x0, t_hi, noise)

    def __call__(self, module: nn.Module, batch: Any, ctx: StepContext) -> Tensor:
        self.target.update(module, ctx.step)
        t_hi, t_lo, x_hi = self.pairs(batch.x, ctx)
        sl, y = ctx.local, batch.labels
        if self.guidance is not None:  # Luo et al. 2023: w ~ U[w_min, w_max] as an input
            lo, hi = self.guidance
            w = lo + (hi - lo) * torch.rand(len(batch.x), generator=ctx.generator,
                                            device=ctx.device)
            y = GuidanceCond(y, w)
        y = None if y is None else y[sl]
        t_hi, t_lo, x_hi = t_hi[sl], t_lo[sl], x_hi[sl]
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, y)
            target = self.denoiser(self.target.net)(x_lo, t_lo, y).x0
        pred = self.denoiser(module)(x_hi, t_hi, y).x0
        return consistency_distance(pred, target, self.metric)  # type: ignore[arg-type]


def guided_parts(teacher: Pipeline, w_min: float, w_max: float
                 ) -> tuple[nn.Module, DenoiserFn, dict[str, Any]]:
    """The guided variant's student (the teacher's U-Net plus a zero-initialised w embedding:
    it starts as the teacher at every w), the guided teacher (classifier-free guidance with
    the per-example w of a GuidanceCond, clipped like the pipeline's) and the stage fields."""
    st = teacher.stage
    if st.conditioning != "class":
        raise ValueError("--guided needs a class-conditional teacher")
    if st.network != "unet" or st.guidance_input:
        raise ValueError("--guided needs a U-Net teacher without a guidance input")
    if w_min > w_max:
        raise ValueError(f"--w-min ({w_min}) must not exceed --w-max ({w_max})")
    student = with_guidance_embedding(teacher.net)  # type: ignore[arg-type]
    den: DenoiserFn = ScaleInputCFG(teacher.base, null_label=len(st.class_names))
    if st.data_range is not None:
        den = ClippedDenoiser(den, *st.data_range)
    network_config = {**st.network_config, "guidance_embedding": True}
    return student, den, {"network_config": network_config, "guidance_input": True,
                          "guidance_range": [w_min, w_max]}


def build(config: ConsistencyConfig, overwrite: bool = False) -> StudentLoop:
    """The student loop of consistency distillation from ``config.teacher``."""
    teacher = load_teacher(config.teacher)
    st = teacher.stage
    if st.prediction == "consistency":
        raise ValueError("the teacher is already a consistency model; distil a diffusion model")
    process = teacher.process
    times = consistency_levels(process, config.num_scales, config.sigma_max, config.rho)
    kwargs = {"learned_variance": st.learned_variance, "sigma_data": st.sigma_data,
              "base_prediction": config.base_prediction,
              "sigma_min": boundary_sigma(process),
              "sigma_max": config.sigma_max}
    student, teacher_den, extra = student_network(teacher), teacher.denoiser(), {}
    if config.guided:
        student, teacher_den, extra = guided_parts(teacher, config.w_min, config.w_max)
    target = TargetNetwork(student, config.target_ema)
    loss = ConsistencyDistillationLoss(teacher_den, target, times, kwargs, config.solver,
                                       config.metric,
                                       (config.w_min, config.w_max) if config.guided else None)
    stage = student_stage(teacher, prediction="consistency",
                          base_prediction=kwargs["base_prediction"],
                          sigma_min=kwargs["sigma_min"], sigma_max=config.sigma_max,
                          sampler="consistency", sampler_steps=config.sampler_steps,
                          sampler_options={}, **extra)
    data = teacher_data(teacher, dataset=config.dataset)
    source = data_source(data, config.optim.batch_size, config.run.seed)
    return StudentLoop(config, "consistency", teacher, student, stage, loss, source,
                       overwrite=overwrite, state={"target": target},
                       extra_meta={"num_scales": config.num_scales})


__all__ = ["ConsistencyConfig", "ConsistencyDistillationLoss", "TargetNetwork", "build",
           "guided_parts", "unwrap"]
