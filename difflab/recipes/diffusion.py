"""The diffusion recipe: images (U-Net; class labels or captions) and 2-D toys (MLP).

It builds the pieces from a :class:`TrainConfig` -- data, network, process, objective, the
loss with label dropout, the sample-grid callback -- and hands them to the one loop
(:class:`difflab.training.TrainLoop`).

Randomness, in the order it is drawn (kept so that a run's weights do not depend on how the
code is organised): the data set (toys: a generator seeded by ``seed``); the network's
initialisation (global RNG seeded by ``seed``); then per step, from the run's generator and
for the whole global batch, label dropout, times, noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import (
    Batch,
    CaptionedImageData,
    DataRequest,
    EpochSource,
    ImageData,
    PointData,
    load_data,
)
from ..networks import build_network
from ..objectives import ImportanceSampler, Objective, build_objective
from ..objectives.consistency import SIGMA_MAX, boundary_sigma
from ..parameterization import Denoiser
from ..pipeline import Conditions, ModelCard, Pipeline
from ..process import Process, make_process
from ..training import LoopConfig, StepContext, TrainLoop, init_device
from ..training.distributed import check_divisible
from .config import TrainConfig
from .latent import LatentSpace
from .loop_recipe import LoopRecipe
from .networks import denoiser_name, network_config
from .text import CaptionTable

__all__ = ["DiffusionLoss", "DiffusionRecipe", "loop_config"]


def set_label_checks(net: nn.Module, on: bool) -> None:
    """Turn a network's per-call label range check (a host sync) on or off, if it has one."""
    if hasattr(net, "check_labels"):
        net.check_labels = on


@dataclass
class DiffusionLoss:
    """The loop's loss: label dropout, times and noise, then the objective's unreduced loss.

    Labels (when the batch has them) are replaced by ``null_label`` with probability
    ``p_uncond`` (classifier-free guidance, Ho & Salimans 2022); with ``captions`` a label
    indexes a caption and becomes its prompt embedding (the null label: the empty prompt).
    """

    objective: Objective
    process: Process
    prediction: str
    sigma_data: float
    p_uncond: float
    null_label: int | None
    captions: CaptionTable | None = None
    time_sampler: ImportanceSampler | None = None
    channels_last: bool = True
    total_steps: int = 1                  # the run's steps (objectives with a schedule)
    consistency: dict[str, Any] | None = None  # base_prediction, sigma_min, sigma_max

    def denoiser(self, net: nn.Module) -> Denoiser:
        return Denoiser(net, self.process, self.prediction, self.objective.learned_variance,
                        self.sigma_data, **(self.consistency or {}))

    def draw(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor | None, Tensor,
                                                           Tensor, Tensor | None]:
        """This rank's (x0, labels, t, noise, importance weights of t or None).

        Label dropout, times and noise are drawn for the whole global batch (in that order,
        from the one generator) and sliced, so they do not depend on the number of ranks."""
        g, dev, sl, b = ctx.generator, ctx.device, ctx.local, len(batch)
        self.objective.set_step(ctx.step, self.total_steps)
        x, y = batch.x[sl], None
        if batch.labels is not None:
            drop = torch.rand(b, generator=g, device=dev)[sl]
            y = torch.where(drop < self.p_uncond, self.null_label, batch.labels[sl])
        t, w = self.objective.sample_t(self.process, b, g, dev, self.time_sampler)
        t, w = t[sl], None if w is None else w[sl]
        noise = torch.randn((b, *x.shape[1:]), generator=g, dtype=x.dtype, device=dev)[sl]
        if x.ndim == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        return x, y, t, noise, w

    def __call__(self, module: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        x, y, t, noise, w = self.draw(batch, ctx)
        cond = self.captions(y) if self.captions is not None else y
        out = self.objective.loss(self.denoiser(module), x, cond, t, noise, w)
        if self.time_sampler is not None:  # a host sync: importance sampling only
            self.time_sampler.update(t, out.vlb_term)
        return out.loss


class DiffusionRecipe(LoopRecipe):
    """A diffusion run built from ``config`` (``data`` replaces the named data set;
    ``overwrite``: start afresh in a run folder holding another run, deleting its files,
    instead of refusing; see ``difflab.training.run_folder``).

    ``run()``, ``resume()``, ``save()`` and the state (``net``, ``ema``, ``opt``, ``step``)
    are the loop's; the rest is wiring."""

    def __init__(self, config: TrainConfig, data: ImageData | PointData | None = None, *,
                 overwrite: bool = False):
        self.config = config
        c, d, p = config, config.data, config.diffusion
        self.dist, self.device = init_device(c.run.device, c.speed.precision)
        check_divisible(c.optim.batch_size, self.dist)
        self.data = data if data is not None else load_data(d.dataset, DataRequest(
            d.resolution, d.channels, points=d.toy_points, points_seed=c.run.seed))
        self.is_toy = isinstance(self.data, PointData)
        x = self.data.points if self.is_toy else self.data.images
        self.latent: LatentSpace | None = None
        if c.latent.autoencoder:  # latent diffusion: the data set encoded once
            if self.is_toy:
                raise ValueError("--autoencoder needs image data, not 2-D points")
            self.latent = LatentSpace.encode(c.latent.autoencoder, x, self.device,
                                             c.latent.posterior)
            x = self.latent.mean
        labels = None
        if d.class_conditional and self.data.labels is not None:
            labels = self.data.labels.to(self.device)
        self.num_classes = self.data.num_classes if labels is not None else None
        self.captions, self.text_encoder = self._captions(labels is not None)
        self.objective = build_objective(c.objective)
        # the network's initialisation: the one global-RNG draw before training
        torch.manual_seed(c.run.seed)
        self.net_name, self.net_config = self._network_config(x)
        net = self._build_net(x.ndim)
        self.process = make_process(p.schedule, zero_terminal_snr=p.zero_terminal_snr, T=p.T)
        self.objective.check(self.process, p.prediction)
        self.prediction, self.consistency = p.prediction, None
        if self.objective.name == "consistency-training":  # a consistency model, EDM inside
            self.prediction = "consistency"
            self.consistency = {"base_prediction": "edm",
                                "sigma_min": boundary_sigma(self.process),
                                "sigma_max": SIGMA_MAX}
        if self.objective.times == "importance" and self.dist.enabled:
            raise ValueError("importance sampling of t keeps a per-process loss history; "
                             "it is not supported under torchrun")
        self.time_sampler = self.objective.time_sampler(self.process)
        self.loss = DiffusionLoss(self.objective, self.process, self.prediction, p.sigma_data,
                                  p.p_uncond, self.num_classes, self.captions,
                                  self.time_sampler, c.speed.channels_last, c.optim.steps,
                                  self.consistency)
        self.source = (self.latent.source(labels, c.optim.batch_size, c.run.seed)
                       if self.latent is not None else
                       EpochSource(x.to(self.device), labels, c.optim.batch_size, c.run.seed))
        self.loop = TrainLoop(
            loop_config(c, overwrite), net, self.source, self.loss, self.meta, self.dist,
            self.device,
            callbacks=[lambda loop: self.sample_grid()],
            state={"importance": self.time_sampler} if self.time_sampler is not None else {})
        # The EMA samples like a loaded checkpoint (channels-last weights, labels checked).
        self.ema.model.to(memory_format=torch.channels_last)
        set_label_checks(self.ema.model, True)

    def _captions(self, labelled: bool) -> tuple[CaptionTable | None, Any]:
        """Captioned data: labels index captions, encoded once; null label = empty prompt."""
        if not (labelled and isinstance(self.data, CaptionedImageData)):
            return None, None
        from ..text import TextEncoder  # optional extra: imported only when needed
        encoder = TextEncoder(self.config.data.text_encoder)
        return CaptionTable(encoder, self.data.class_names, self.device), encoder

    def _network_config(self, x: Tensor) -> tuple[str, Any]:
        """The chosen network's name and config (``recipes.networks``)."""
        name = denoiser_name(self.config.network, x.ndim - 1)
        ctx = self.captions.dim if self.captions is not None else None
        return name, network_config(name, getattr(self.config.network, name),
                                    tuple(x.shape[1:]), self.objective.learned_variance,
                                    self.num_classes, ctx)

    def _build_net(self, ndim: int) -> nn.Module:
        """The network on the device; channels-last for images, label checks off (the data
        set's labels are valid by construction, and checking them would sync every step)."""
        speed = self.config.speed
        net = build_network(self.net_name, asdict(self.net_config)).to(self.device)
        if ndim == 4 and speed.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if hasattr(net, "grad_checkpointing"):
            net.grad_checkpointing = speed.grad_checkpointing
        set_label_checks(net, False)
        return net

    def batch(self, step: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None]:
        """What the loss sees at ``step`` (draws from the run's generator)."""
        batch = self.source.batch(step, self.loop.generator)
        return self.loss.draw(batch, self.loop.context(step, len(batch)))

    # -- checkpoints and samples -------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """What loading a checkpoint relies on (sampling, editing, evaluation)."""
        c = self.config
        latent = {}
        if self.latent is not None:  # the autoencoder stage, its weights beside the checkpoints
            if self.loop.folder_ready and self.dist.is_main:
                self.latent.write_weights(self.out_dir / "checkpoints")
            latent = {"autoencoder_stage": self.latent.stage_meta()}
        return {
            "config": c.to_dict(),
            "network": {"name": self.net_name, "config": asdict(self.net_config)},
            "process": self.process.to_config(),
            "prediction": self.prediction,
            **(self.consistency_meta() if self.consistency is not None else {}),
            "learned_variance": self.objective.learned_variance,
            "sigma_data": c.diffusion.sigma_data,
            "sample_shape": list(self.source.x.shape[1:]),
            "data_range": (None if self.is_toy else self.latent.data_range()
                           if self.latent is not None else [-1.0, 1.0]),
            "class_names": (list(self.data.class_names)
                            if self.num_classes and self.captions is None else []),
            **({"text_encoder": c.data.text_encoder, "captions": self.data.class_names}
               if self.captions is not None else {}),
            **latent,
        }

    def consistency_meta(self) -> dict[str, Any]:
        """A consistency model's stage fields: boundary, base type, its own sampler (one
        step; ``difflab sample --steps K`` for K)."""
        return {**(self.consistency or {}), "sampler": "consistency", "sampler_steps": 1}

    def pipeline(self) -> Pipeline:
        """The EMA model as a :class:`Pipeline` (what loading this run's checkpoint gives)."""
        card = ModelCard.from_checkpoint_meta(self.meta())
        nets = [self.ema.model] + ([self.latent.net] if self.latent is not None else [])
        return Pipeline(card, nets, self.device)

    def sample_grid(self, per_class: int = 10, seed: int = 0) -> Path:
        """DDIM samples from the EMA model through the pipeline: one row of ``per_class`` per
        class (the first 8 captions of a text model; one row for an unconditional one), or
        for 2-D data a scatter plot of 2000 points."""
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        if self.is_toy:
            conds = Conditions(n=2000, nrow=per_class)
        else:
            k = min(8, self.num_classes) if self.captions is not None else self.num_classes or 1
            rows = torch.arange(k).repeat_interleave(per_class)
            if self.captions is not None:
                conds = Conditions(len(rows), per_class, cond=self.captions(rows.to(self.device)))
            elif self.num_classes:
                conds = Conditions(len(rows), per_class, cond=rows, labels=rows)
            else:
                conds = Conditions(len(rows), per_class)
        if self.consistency is not None:  # its own sampler and steps
            out = self.pipeline()(cond=conds, seed=seed)
        else:
            out = self.pipeline()(sampler="ddim", steps=self.config.run.sample_steps,
                                  cond=conds, seed=seed)
        return out.save_grid(path)


def loop_config(c: TrainConfig, overwrite: bool = False) -> LoopConfig:
    """The loop's share of a run config (``overwrite``: see :class:`DiffusionRecipe`)."""
    o, r, s = c.optim, c.run, c.speed
    return LoopConfig(steps=o.steps, lr=o.lr, weight_decay=o.weight_decay,
                      warmup_steps=o.warmup_steps, grad_clip=o.grad_clip, ema_decay=o.ema_decay,
                      precision=s.precision, compile=s.compile, compile_mode=s.compile_mode,
                      reuse_cpu_memory=s.reuse_cpu_memory, log_every=r.log_every,
                      log=r.log,
                      sample_every=r.sample_every, checkpoint_every=r.checkpoint_every,
                      keep_checkpoints=r.keep_checkpoints, out_dir=r.out_dir, seed=r.seed,
                      overwrite=overwrite)
