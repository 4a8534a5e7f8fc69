"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) and its guided variant (Meng et
al. 2023, "On distillation of guided diffusion models").

A student in v-prediction learns to take in one DDIM step what its teacher takes in two:
for a student step t -> t'' on the student's N-step grid, with t' the teacher's grid point
between them (the teacher's 2N-step grid), the target is the x0 that makes one DDIM step from
z_t land where two teacher DDIM steps land (Salimans & Ho 2022, sec. 3):

  z_t'  = alpha_t' x0_hat(z_t) + sigma_t' eps_hat(z_t)            (teacher DDIM step 1)
  z_t'' = alpha_t'' x0_hat(z_t') + sigma_t'' eps_hat(z_t')        (teacher DDIM step 2)
  x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

and the loss is w(lambda_t) ||x~ - x0_hat_student(z_t)||^2 with the "SNR+1" weight (1 + alpha^2
/ sigma^2: the v-space MSE of the student's own output) or "truncated SNR" (max(SNR, 1)).
The last step of a grid (to t_min) returns x0_hat, as every difflab sampler does: there the
target is the teacher's x0_hat at t'. Each round halves the steps (2N -> N) and starts from
the last round's student (the first from the teacher's weights).

Grids: round k's student grid is ``samplers.time_grid(process, N)``, the very grid that
``pipe(sampler="ddim", steps=N)`` samples on (the default spacing of the process: trailing
for discrete schedules, uniform in t for continuous ones), and its midpoints are the odd
points of ``time_grid(process, 2N)``; a schedule whose grids do not nest is refused.

Guided variant: the student takes the guidance scale w as an input (a U-Net with
``guidance_embedding``, zero-initialised so it starts as the teacher). The teacher's targets
are classifier-free guided at w ~ U[w_min, w_max] per example
(:class:`~difflab.guidance.ScaleInputCFG`); an optional first stage (``guided_steps``) first
matches the guided teacher's x0_hat on the first round's teacher grid (Meng et al. 2023,
stage one), then the halving rounds follow with w as an input throughout. One student serves
every w in the range: ``pipe(guidance=w)`` is one network call per step.

Run folder (``run.out_dir``, RUN):

  RUN/model_card.json, RUN/diffusion.safetensors   the final student (a pipeline folder)
  RUN/rounds.json                                  the config and one entry per round
  RUN/guided/                                      stage one of the guided variant, if any
  RUN/steps_N/                                     round k's student (N steps): a run folder

Every ``steps_N`` folder loads with ``Pipeline.from_pretrained`` and samples with DDIM in N
steps by default, so one run gives students at e.g. 8, 4, 2 and 1 steps. A run that stopped
resumes round by round (finished rounds are kept, the current one continues from its last
checkpoint) unless ``--overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...conditioning import GuidanceCond
from ...config import check_ranges, option, to_dict
from ...guidance import ScaleInputCFG
from ...io import atomic_write, read_json
from ...networks import UNet, with_guidance_embedding
from ...parameterization import ClippedDenoiser, Denoiser, DenoiserFn
from ...pipeline import Pipeline
from ...process import Process, expand_like
from ...samplers import time_grid
from ...training.run_folder import RunFolderError, clear_run, run_files
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

__all__ = ["ProgressiveConfig", "ProgressiveDistillation", "build", "halving_schedule",
           "progressive_loss", "progressive_students", "round_grid", "two_step_target"]

Weighting = Literal["snr+1", "truncated-snr"]


@dataclass
class ProgressiveConfig:
    """``difflab distill progressive``: halve the teacher's DDIM steps round by round."""

    teacher: str = option("", "the teacher: a run folder, checkpoint or pipeline folder")
    start_steps: int = option(16, "DDIM steps of the teacher in the first round (2N); each "
                                  "round halves them", ge=2)
    end_steps: int = option(1, "student steps after the last round (--start-steps / 2^k)",
                            ge=1)
    round_steps: list[int] = option(
        help="optimisation steps of each round, first to last; the last value repeats for "
             "the remaining rounds (none: --steps for every round)",
        factory=lambda: [1200, 600])
    weighting: Weighting = option(
        "snr+1", "loss weight of the x0 error: snr+1 (= the student's v-space MSE) or "
                 "truncated-snr, max(SNR, 1) (Salimans & Ho 2022, sec. 4)")
    dropout: float = option(0.0, "dropout of the student network (the targets are "
                                 "deterministic)", ge=0, lt=1)
    clip: bool = option(True, "clip the teacher's x0_hat to the data range, as its sampler "
                              "does")
    guided: bool = option(False, "guided variant (Meng et al. 2023): the student takes the "
                                 "guidance scale as an input and learns the classifier-free-"
                                 "guided teacher at w in [--w-min, --w-max]")
    w_min: float = option(1.0, "smallest guidance scale of the guided variant (1: the "
                               "conditional model)", ge=0)
    w_max: float = option(4.0, "largest guidance scale of the guided variant", ge=0)
    guided_steps: int = option(0, "guided variant: steps of stage one (matching the guided "
                                  "teacher's x0_hat at w); 0: the first round learns from the "
                                  "guided teacher directly", ge=0)
    optim: OptimConfig = option(
        factory=distill_optim(steps=600, batch_size=64, lr=5e-4, ema_decay=0.995),
        help="optimisation (--steps: per round when --round-steps is empty)")
    run: RunConfig = option(factory=distill_run("progressive"), help="run folder and device")

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.w_min > self.w_max:
            raise ValueError(f"--w-min ({self.w_min}) must not exceed --w-max ({self.w_max})")


# -- the mathematics -------------------------------------------------------------------------
def halving_schedule(start_steps: int, end_steps: int) -> list[int]:
    """The students' steps per round: start/2, start/4, ..., end (start = end * 2^k, k >= 1)."""
    steps, n = [], start_steps
    while n > end_steps and n % 2 == 0:
        n //= 2
        steps.append(n)
    if not steps or n != end_steps:
        raise ValueError(f"--start-steps ({start_steps}) must be --end-steps ({end_steps}) "
                         "times a power of two (at least 2)")
    return steps


def round_grid(process: Process, n: int) -> tuple[Tensor, Tensor]:
    """(the student's N-step grid [N + 1], the teacher's midpoints t' [N]) of one round.

    The student grid is ``time_grid(process, N)`` (what ``ddim`` with N steps samples on);
    the teacher's 2N-step grid ``time_grid(process, 2N)`` must contain it at its even points.
    """
    try:
        student, fine = time_grid(process, n), time_grid(process, 2 * n)
    except ValueError as e:
        raise ValueError(f"--start-steps: {e}") from None
    span = process.t_max - process.t_min
    if not torch.allclose(fine[::2], student, rtol=1e-9, atol=1e-9 * span):
        raise ValueError(f"the {2 * n}-step grid of this process does not contain the {n}-step "
                         f"grid; choose --start-steps so that every halving divides the "
                         f"process's steps evenly")
    return student, fine[1::2]


def ddim_to(pred_x0: Tensor, pred_eps: Tensor, process: Process, t_to: Tensor,
            last: Tensor) -> Tensor:
    """One deterministic DDIM step's end point, x_s = alpha_s x0_hat + sigma_s eps_hat (Song
    et al. 2021, eq. 12 with sigma = 0), per example; where ``last`` (s is the grid's end,
    t_min) it is x0_hat, as the samplers' final step."""
    a, s = process.alpha_sigma(t_to)
    x = expand_like(a, pred_x0) * pred_x0 + expand_like(s, pred_x0) * pred_eps
    keep = last.reshape(last.shape + (1,) * (pred_x0.ndim - last.ndim))
    return torch.where(keep, pred_x0, x)


@torch.no_grad()
def two_step_target(teacher: DenoiserFn, z: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor,
                    cond: Any = None) -> Tensor:
    """The progressive-distillation target x~ [B, ...] (Salimans & Ho 2022, Algorithm 2): the
    x0 with which one DDIM step from z_t to t'' lands where the teacher's two DDIM steps
    t -> t' -> t'' land. t, t', t'' are [B] (t'' = t_min: the step returns x0_hat, and so
    does the target). Computed in z's dtype (float64 for exactness)."""
    process = teacher.process
    last = t_next <= process.t_min
    p1 = teacher(z, t, cond)
    z_mid = ddim_to(p1.x0, p1.eps, process, t_mid, torch.zeros_like(last))
    p2 = teacher(z_mid, t_mid, cond)
    z_next = ddim_to(p2.x0, p2.eps, process, t_next, last)
    a_t, s_t = process.alpha_sigma(t)
    a_n, s_n = process.alpha_sigma(t_next)
    ratio = torch.where(last, torch.zeros_like(s_n), s_n / s_t)  # sigma_t'' / sigma_t
    num = z_next - expand_like(ratio, z) * z
    return num / expand_like(torch.where(last, torch.ones_like(a_n), a_n - ratio * a_t), z)


def loss_weight(process: Process, t: Tensor, weighting: Weighting) -> Tensor:
    """w(lambda_t) on the x0 error: 1 + SNR ("SNR+1", the v-space MSE) or max(SNR, 1)
    ("truncated SNR") (Salimans & Ho 2022, sec. 4)."""
    snr = process.snr(t)
    return 1 + snr if weighting == "snr+1" else snr.clamp(min=1.0)


def progressive_loss(teacher: DenoiserFn, grid: Tensor, mids: Tensor, weighting: Weighting,
                     learned_variance: bool = False,
                     guidance: tuple[float, float] | None = None,
                     two_steps: bool = True):
    """``loss(module, batch, ctx) -> [B]`` of one round: t uniform over the student grid's
    first N points, z_t = alpha_t x + sigma_t eps, the target :func:`two_step_target` of
    ``teacher`` (computed in float64), the student (v-prediction) ``module``'s x0_hat
    weighted by :func:`loss_weight`. ``guidance`` (w_min, w_max): w ~ U per example goes to
    teacher and student as a :class:`GuidanceCond`. ``two_steps=False``: the target is the
    teacher's own x0_hat at t (guided stage one, Meng et al. 2023), t over the grid ``grid``.
    """
    process = teacher.process

    def loss(module: nn.Module, batch: Any, ctx: Any) -> Tensor:
        g, x = ctx.generator, batch.x
        n = len(x)
        i = torch.randint(0, len(mids), (n,), generator=g, device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device)
        cond = batch.labels
        if guidance is not None:
            lo, hi = guidance
            w = lo + (hi - lo) * torch.rand(n, generator=g, device=x.device)
            cond = GuidanceCond(cond, w)
        sl = ctx.local
        x, i, noise = x[sl], i[sl], noise[sl]
        cond = None if cond is None else cond[sl]
        t = grid.to(x.device)[i]
        a, s = process.alpha_sigma(t)
        z = expand_like(a, x) * x.double() + expand_like(s, x) * noise.double()
        if two_steps:
            target = two_step_target(teacher, z, t, mids.to(x.device)[i],
                                     grid.to(x.device)[i + 1], cond)
        else:
            with torch.no_grad():
                target = teacher(z, t, cond).x0
        student = Denoiser(module, process, "v", learned_variance=learned_variance)
        x0 = student(z.float(), t, cond).x0
        weight = loss_weight(process, t, weighting).float()
        return weight * ((x0 - target.float()) ** 2).flatten(1).mean(1)

    return loss


# -- the rounds ------------------------------------------------------------------------------
@dataclass
class Round:
    """One stage of the run: its folder name, teacher and student steps."""

    index: int            # 0: guided stage one; 1, 2, ...: halving rounds
    folder: str
    teacher_steps: int
    student_steps: int
    steps: int            # optimisation steps


class ProgressiveDistillation:
    """The rounds of :class:`ProgressiveConfig`; ``run()`` trains them in turn (resuming
    finished or stopped rounds) and writes the final student as a pipeline folder."""

    def __init__(self, config: ProgressiveConfig, overwrite: bool = False):
        self.config, self.overwrite = config, overwrite
        self.out = Path(config.run.out_dir)
        self.teacher = load_teacher(config.teacher)
        st = self.teacher.stage
        if config.guided:
            if st.conditioning != "class":
                raise ValueError("--guided needs a class-conditional teacher (text teachers: "
                                 "not yet; the data source has no prompts)")
            if st.network != "unet":
                raise ValueError(f"--guided needs a U-Net teacher, not {st.network!r}")
        self.rounds = self._plan()
        for r in self.rounds:  # every grid is checked before anything runs
            if r.index > 0:
                round_grid(self.teacher.process, r.student_steps)
        self.data = teacher_data(self.teacher)
        if not overwrite:
            self._check_folder()

    #: config fields that a resumed run must share with the one that wrote the folder
    SAME_ON_RESUME = ("teacher", "start_steps", "end_steps", "weighting", "clip", "guided",
                      "w_min", "w_max", "guided_steps")

    def _check_folder(self) -> None:
        """Refuse a run folder that holds a training run or another progressive run."""
        if run_files(self.out):
            raise RunFolderError(f"{self.out} holds a training run; pass --overwrite to "
                                 "delete it or choose another --out-dir")
        index = self.out / "rounds.json"
        if not index.is_file():
            return
        old = read_json(index).get("config", {})
        new = to_dict(self.config)
        differ = [k for k in self.SAME_ON_RESUME if old.get(k) != new[k]]
        if differ:
            raise RunFolderError(f"{self.out} holds a progressive run with other "
                                 f"{', '.join('--' + k.replace('_', '-') for k in differ)}; "
                                 "pass --overwrite to start afresh or choose another --out-dir")

    def _plan(self) -> list[Round]:
        c = self.config
        schedule = halving_schedule(c.start_steps, c.end_steps)
        per = list(c.round_steps) or [c.optim.steps]
        if len(per) > len(schedule) or min(per) < 1:
            raise ValueError(f"--round-steps: give at most {len(schedule)} values (one per "
                             f"round: {[2 * n for n in schedule]} -> {schedule} steps), each at "
                             "least 1")
        per += per[-1:] * (len(schedule) - len(per))
        rounds = []
        if c.guided and c.guided_steps:
            rounds.append(Round(0, "guided", c.start_steps, c.start_steps, c.guided_steps))
        rounds += [Round(k + 1, f"steps_{n}", 2 * n, n, s)
                   for k, (n, s) in enumerate(zip(schedule, per, strict=True))]
        return rounds

    def _teacher_fn(self, pipe: Pipeline) -> DenoiserFn:
        den: DenoiserFn = pipe.base
        if self.config.guided and not pipe.stage.guidance_input:
            den = ScaleInputCFG(den, null_label=len(pipe.class_names))
        if self.config.clip and pipe.stage.data_range is not None:
            den = ClippedDenoiser(den, *pipe.stage.data_range)
        return den

    def _student(self, pipe: Pipeline) -> nn.Module:
        net = pipe.net
        if self.config.guided and not pipe.stage.guidance_input:
            if not isinstance(net, UNet):
                raise ValueError("--guided needs a U-Net teacher")
            net = with_guidance_embedding(net)
        else:
            net = student_network(pipe)
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = self.config.dropout
        return net

    def _stage(self, r: Round):
        c, st = self.config, self.teacher.stage
        net_config = dict(st.network_config)
        if "dropout" in net_config:
            net_config["dropout"] = c.dropout
        extra: dict[str, Any] = {}
        if c.guided:
            net_config["guidance_embedding"] = True
            extra = {"guidance_input": True, "guidance_range": [c.w_min, c.w_max]}
        return student_stage(self.teacher, prediction="v", network_config=net_config,
                             sampler="ddim", sampler_steps=r.student_steps,
                             sampler_options={}, **extra)

    def _loop(self, r: Round, teacher: Pipeline) -> StudentLoop:
        c = self.config
        if r.index == 0:
            grid = time_grid(teacher.process, r.teacher_steps)
            mids = grid[:-1]
        else:
            grid, mids = round_grid(teacher.process, r.student_steps)
        loss = progressive_loss(self._teacher_fn(teacher), grid, mids, c.weighting,
                                teacher.stage.learned_variance,
                                (c.w_min, c.w_max) if c.guided else None,
                                two_steps=r.index > 0)
        config = replace(c, optim=replace(c.optim, steps=r.steps),
                         run=replace(c.run, out_dir=str(self.out / r.folder),
                                     seed=c.run.seed + r.index))
        meta = {"round": r.index, "teacher_steps": r.teacher_steps,
                "student_steps": r.student_steps}
        loop = StudentLoop(config, "progressive", teacher, self._student(teacher),
                           self._stage(r), loss,
                           data_source(self.data, c.optim.batch_size, config.run.seed),
                           overwrite=self.overwrite, extra_meta=meta)
        what = "stage one" if r.index == 0 else f"round {r.index}"
        loop.loop.config.progress_desc = (f"progressive {what}: {r.teacher_steps} -> "
                                          f"{r.student_steps} steps")
        latest = loop.loop.latest_checkpoint()
        if latest is not None and not self.overwrite:
            loop.loop.resume(latest)
        return loop

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Train every round; ``{"checkpoint", "out_dir", "rounds"}``."""
        if self.overwrite:
            clear_run(self.out)
            for name in ("rounds.json", "model_card.json", "diffusion.safetensors"):
                (self.out / name).unlink(missing_ok=True)
        teacher, done = self.teacher, []
        for r in self.rounds:
            result = self._loop(r, teacher).run(progress=progress)
            done.append({"round": r.index, "folder": r.folder, "teacher_steps": r.teacher_steps,
                         "student_steps": r.student_steps, "steps": r.steps,
                         "checkpoint": str(Path(result["checkpoint"]).relative_to(self.out))})
            self._write_index(done)
            teacher = load_teacher(str(self.out / r.folder))
        card = teacher.save_pretrained(self.out, overwrite=True) / "model_card.json"
        return {"checkpoint": str(card), "out_dir": str(self.out), "rounds": done}

    def _write_index(self, done: list[dict[str, Any]]) -> None:
        text = json.dumps({"method": "progressive", "config": to_dict(self.config),
                           "final": "model_card.json", "rounds": done}, indent=1) + "\n"
        atomic_write(self.out / "rounds.json", lambda tmp: Path(tmp).write_text(text))


def build(config: ProgressiveConfig, overwrite: bool = False) -> ProgressiveDistillation:
    """The ``difflab distill progressive`` recipe (errors before anything runs)."""
    return ProgressiveDistillation(config, overwrite)


def progressive_students(run: str | Path) -> dict[int, Path]:
    """The students of a progressive-distillation run folder by their step count, e.g.
    ``{8: RUN/steps_8, 4: RUN/steps_4, 2: RUN/steps_2, 1: RUN/steps_1}`` (from
    ``RUN/rounds.json``; the guided stage one is left out). Each loads with
    ``Pipeline.from_pretrained`` and samples with DDIM in its own steps by default."""
    path = Path(run) / "rounds.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a progressive-distillation "
                                "run folder")
    rounds = read_json(path)["rounds"]
    return {int(r["student_steps"]): Path(run) / r["folder"] for r in rounds if r["round"] > 0}
