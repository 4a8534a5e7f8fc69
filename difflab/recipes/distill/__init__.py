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


@dataclass(frozen=True)
class DistillMethod:
    """A registered distillation method."""

    config: type                                       # its typed config class
    build: Callable[[Any, bool], Distillation]         # build(config, overwrite)
    help: str                                          # one line for --help


DISTILL_METHODS: dict[str, DistillMethod] = {
    "consistency": DistillMethod(
        consistency.ConsistencyConfig, consistency.build,
        "consistency distillation (Song et al. 2023): a 1-4 step consistency model from the "
        "teacher's ODE"),
}

__all__ = ["DISTILL_METHODS", "DistillMethod", "Distillation", "StudentLoop", "TeacherData",
           "data_source", "distill_optim", "distill_run", "load_teacher", "student_network",
           "student_stage", "teacher_data"]
