"""Distillation to few steps: each method is a recipe over a frozen teacher pipeline, a
student and a loss, trained on the one loop (``base``). ``DISTILL_METHODS`` is the registry
that ``difflab distill METHOD`` reads.

A method is a module here with a typed config class (a ``teacher`` field plus ``optim`` and
``run`` groups; ``base.distill_optim`` / ``base.distill_run``) and ``build(config, overwrite)``
returning a :class:`~.base.Distillation`; register it in ``DISTILL_METHODS`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import consistency
from .base import (
    Distillation,
    StudentLoop,
    TeacherData,
    data_source,
    distill_optim,
    distill_run,
    load_teacher,
    student_network,
    student_stage,
    teacher_data,
)
from .reflow import ReflowConfig, build_reflow, reflow_pairs, teacher_pairs


@dataclass(frozen=True)
class DistillMethod:
    """A registered distillation method."""

    config: type                                       # its typed config class
    build: Callable[[Any, bool], Distillation]         # build(config, overwrite)
    help: str                                          # one line for --help


from . import adversarial, progressive  # noqa: E402  (after DistillMethod)

DISTILL_METHODS: dict[str, DistillMethod] = {
    "adversarial": DistillMethod(
        adversarial.AdversarialConfig, adversarial.build,
        "adversarial diffusion distillation (Sauer et al. 2023): a K-step student trained "
        "with a discriminator on frozen teacher features plus score distillation"),
    "progressive": DistillMethod(
        progressive.ProgressiveConfig, progressive.build,
        "progressive distillation (Salimans & Ho 2022): a v-prediction student learns two "
        "teacher DDIM steps in one, halving the steps round by round; --guided: the guidance "
        "scale as an input (Meng et al. 2023)"),
    "reflow": DistillMethod(
        ReflowConfig, build_reflow,
        "reflow (Liu et al. 2022): train a rectified-flow student on the straight paths "
        "between noise and the teacher's ODE samples, for one-step generation"),
    "consistency": DistillMethod(
        consistency.ConsistencyConfig, consistency.build,
        "consistency distillation (Song et al. 2023): a 1-4 step consistency model from the "
        "teacher's ODE"),
}

__all__ = ["DISTILL_METHODS", "DistillMethod", "Distillation", "ReflowConfig", "StudentLoop",
           "TeacherData", "build_reflow", "data_source", "distill_optim", "distill_run",
           "load_teacher", "reflow_pairs", "student_network", "student_stage", "teacher_data",
           "teacher_pairs"]
