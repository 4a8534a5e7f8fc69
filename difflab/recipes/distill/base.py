"""What every distillation method shares: a frozen teacher pipeline, a student network, the
teacher's data, and the one loop (:class:`difflab.training.TrainLoop`).

A method is a recipe (``DISTILL_METHODS`` in ``difflab.recipes.distill``): a typed config
with a ``teacher`` field and ``optim``/``run`` groups (:func:`distill_optim`,
:func:`distill_run` give them method-specific defaults), and a ``build(config, overwrite)``
that returns something with ``run(progress) -> dict`` (``"checkpoint"``, ``"out_dir"``) --
usually a :class:`StudentLoop`, or several in turn (progressive distillation's rounds).

The student is written as an ordinary training checkpoint whose metadata holds its complete
stage card (``meta["stage"]``, :func:`student_stage`): ``Pipeline.from_pretrained`` on the
student's run folder, and hence ``difflab sample | edit | eval``, use it unchanged, with the
card's own sampler and steps by default (``StageCard.sampler``, ``sampler_steps``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ...config import to_dict
from ...data import DataRequest, EpochSource, ImageData, PointData, load_data
from ...pipeline import Conditions, ModelCard, Pipeline, StageCard
from ...pipeline.loading import write_stage_weights
from ...training import LoopConfig, LossFn, TrainLoop, init_device
from ...training.loop import BatchSource
from ..config import OptimConfig, RunConfig
from ..latent import AUTOENCODER_WEIGHTS

__all__ = ["Distillation", "StudentLoop", "TeacherData", "data_source", "distill_optim",
           "distill_run", "load_teacher", "student_network", "student_stage", "teacher_data"]


class Distillation(Protocol):
    """What a method's ``build`` returns."""

    def run(self, progress: bool = True) -> dict[str, Any]: ...


def distill_optim(**defaults: Any) -> Callable[[], OptimConfig]:
    """A factory of the ``optim`` group with a method's own defaults (fewer steps and warm-up
    than training from scratch: the student starts from the teacher's weights)."""
    base = {"steps": 1000, "lr": 2e-4, "warmup_steps": 0, "ema_decay": 0.999}
    return lambda: OptimConfig(**{**base, **defaults})


def distill_run(method: str, **defaults: Any) -> Callable[[], RunConfig]:
    """A factory of the ``run`` group; the run folder defaults to ``runs/distill-METHOD``."""
    base = {"out_dir": f"runs/distill-{method}", "sample_every": 0, "checkpoint_every": 0}
    return lambda: RunConfig(**{**base, **defaults})


def load_teacher(path: str, device: torch.device | str = "cpu") -> Pipeline:
    """The teacher (a run folder, checkpoint or pipeline folder) as a frozen pipeline.

    Raises:
        ValueError: no teacher given.
        FileNotFoundError, difflab.io.LoadError: as ``Pipeline.from_pretrained``."""
    if not path:
        raise ValueError("--teacher is required: a run folder, checkpoint or pipeline folder "
                         "of the model to distil")
    pipe = Pipeline.from_pretrained(path, device=device)
    for net in pipe.networks:
        net.eval().requires_grad_(False)
    return pipe


def student_network(teacher: Pipeline) -> nn.Module:
    """A trainable copy of the teacher's network (students start from the teacher)."""
    net = copy.deepcopy(teacher.net)
    return net.train().requires_grad_(True)


def student_stage(teacher: Pipeline, **changes: Any) -> StageCard:
    """The teacher's diffusion stage with ``changes`` (e.g. ``prediction``, ``process``,
    ``sampler``, ``sampler_steps``; ``weights_prefix``: where the student's tensors lie inside
    the trained module, e.g. ``"student"``); weights are filled in when the checkpoint is
    read."""
    return replace(teacher.stage, **{"weights": "", "weights_prefix": "", **changes})


@dataclass
class TeacherData:
    """The teacher's training images (or points) and labels, on the device."""

    x: Tensor
    labels: Tensor | None
    num_classes: int | None


def teacher_data(teacher: Pipeline, device: torch.device | str = "cpu",
                 dataset: str | None = None, split: str = "all") -> TeacherData:
    """The data set the teacher was trained on (``StageCard.dataset``; ``dataset`` replaces
    it) at the teacher's sample shape. Labels only for a class-conditional teacher."""
    name = dataset or teacher.stage.dataset
    if not name:
        raise ValueError("the teacher's card names no data set: give --dataset")
    shape = teacher.image_shape
    if len(shape) == 3:
        request = DataRequest(resolution=shape[-1], channels=shape[0], split=split)
    else:
        request = DataRequest(split=split)
    data = load_data(name, request)
    x = data.points if isinstance(data, PointData) else data.images
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"data set {name!r} gives samples of shape {list(x.shape[1:])} but "
                         f"the teacher makes {list(shape)}")
    labels = None
    if teacher.stage.conditioning == "class" and isinstance(data, ImageData) \
            and data.labels is not None:
        labels = data.labels.to(device)
    n = len(teacher.class_names) if labels is not None else None
    # a latent teacher's data: the posterior means of its autoencoder, in its units
    return TeacherData(teacher.encode(x.to(device)), labels, n)


class StudentLoop:
    """A student trained on the one loop, checkpointed with its own stage card.

    Args:
        config: the method's typed config (saved in every checkpoint and ``config.json``);
            its ``optim`` and ``run`` groups set the loop.
        method: the method's name (``DISTILL_METHODS`` key).
        teacher: the teacher pipeline.
        student: the module trained (usually :func:`student_network`).
        stage: the student's stage card (:func:`student_stage`).
        loss: ``loss(module, batch, ctx)`` (``difflab.training.LossFn``).
        source: the batch source (e.g. ``EpochSource`` over :func:`teacher_data`).
        overwrite: start afresh in a run folder that holds another run.
        extra_meta: more JSON-able metadata (e.g. the round of progressive distillation).
        state: extra checkpointed state, as ``TrainLoop.state``.
    """

    def __init__(self, config: Any, method: str, teacher: Pipeline, student: nn.Module,
                 stage: StageCard, loss: LossFn, source: BatchSource, *,
                 overwrite: bool = False, device: torch.device | None = None,
                 extra_meta: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None,
                 callbacks: Sequence[Callable[[TrainLoop], Any]] = ()):
        self.config, self.method, self.teacher, self.stage = config, method, teacher, stage
        self.extra_meta = dict(extra_meta or {})
        self._ae_written = False
        dist, dev = init_device(config.run.device)
        self.device = device or dev
        o, r = config.optim, config.run
        loop_config = LoopConfig(
            steps=o.steps, lr=o.lr, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
            grad_clip=o.grad_clip, ema_decay=o.ema_decay or None, log_every=r.log_every,
            sample_every=r.sample_every, checkpoint_every=r.checkpoint_every,
            keep_checkpoints=r.keep_checkpoints, out_dir=r.out_dir, seed=r.seed,
            progress_desc=f"distill {method}", overwrite=overwrite)
        self.loop = TrainLoop(loop_config, student, source, loss, self.meta, dist,
                              self.device, callbacks=[lambda loop: self.sample_grid(),
                                                      *callbacks],
                              state=dict(state or {}))

    @property
    def out_dir(self) -> Path:
        return self.loop.out_dir

    def meta(self) -> dict[str, Any]:
        """Checkpoint metadata: the method's config, the teacher, and the student's card
        (with a latent teacher's autoencoder stage: the student samples its latents)."""
        return {"config": to_dict(self.config), "method": self.method,
                "teacher": str(self.config.teacher), "stage": to_dict(self.stage),
                **self.autoencoder_meta(), **self.extra_meta}

    def autoencoder_meta(self) -> dict[str, Any]:
        """A latent teacher's autoencoder stage, its weights written once beside the
        student's checkpoints; {} for a pixel-space teacher."""
        ae = self.teacher.autoencoder_stage
        if ae is None:
            return {}
        if self.loop.folder_ready and self.loop.dist.is_main and not self._ae_written:
            write_stage_weights(self.teacher.autoencoder,
                                self.out_dir / "checkpoints" / AUTOENCODER_WEIGHTS)
            self._ae_written = True
        return {"autoencoder_stage": to_dict(replace(ae, weights=AUTOENCODER_WEIGHTS,
                                                     weights_prefix=""))}

    def student_pipeline(self, stage: StageCard, student: nn.Module) -> Pipeline:
        """A pipeline of ``stage`` with ``student`` (and a latent teacher's autoencoder)."""
        stages, nets = [stage], [student]
        if self.teacher.autoencoder_stage is not None:
            stages.append(self.teacher.autoencoder_stage)
            nets.append(self.teacher.autoencoder)
        card = ModelCard(stages=stages, step=self.loop.step, ema=self.loop.ema is not None,
                         training=to_dict(self.config))
        return Pipeline(card, nets, self.device)

    def sampling_module(self) -> nn.Module:
        """The EMA student when the run keeps one, else the student itself."""
        return self.loop.ema.model if self.loop.ema is not None else self.loop.model

    def pipeline(self) -> Pipeline:
        """The student as a pipeline (what loading its checkpoint gives)."""
        return self.student_pipeline(replace(self.stage, weights="student"),
                                     self.sampling_module())

    def sample_grid(self, per_class: int = 10, seed: int = 0) -> Path:
        """Samples with the student's own sampler and steps: a row per class (or one row)."""
        path = self.out_dir / "samples" / f"step_{self.loop.step:08d}.png"
        pipe = self.pipeline()
        if len(pipe.sample_shape) == 1:
            return pipe(2000, seed=seed).save_grid(path)
        k = len(pipe.class_names) or 1
        rows = torch.arange(k).repeat_interleave(per_class)
        conds = (Conditions(len(rows), per_class, cond=rows, labels=rows)
                 if pipe.class_names else Conditions(len(rows), per_class))
        return pipe(cond=conds, seed=seed).save_grid(path)

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Train; a dict with ``checkpoint`` (the last one), ``out_dir`` and ``metrics``."""
        result = self.loop.run(progress=progress)
        return {**result, "out_dir": str(self.out_dir)}


def data_source(data: TeacherData, batch_size: int, seed: int) -> EpochSource:
    """Epoch-wise shuffled batches of the teacher's data (``difflab.data.EpochSource``)."""
    return EpochSource(data.x, data.labels, batch_size, seed)
