"""Training a ControlNet (Zhang et al. 2023) on a frozen base model.

The base (a run folder, checkpoint or pipeline folder of a pixel-space U-Net model) is loaded
and frozen; a :class:`~difflab.networks.controlnet.ControlNet` copied from its encoder is the
only module trained, on the one loop (:class:`~difflab.training.TrainLoop`), with the base's
own process, prediction type, objective and label/prompt dropout (Zhang et al. sec. 3.3 replace
50% of prompts by the empty one; here the base's rate is kept so that guidance behaves as the
base's). Each step's control images are computed from the clean batch
(:func:`~difflab.data.control.control_image`, ``--control edges|mask``).

Checkpoints hold the ControlNet alone (``model.*``, ``ema.*``) and the metadata key
``adapters`` = ``{"base": absolute base path, "stages": [the controlnet stage]}``, so
``Pipeline.from_pretrained(run)`` loads the base with the ControlNet applied and ``difflab
sample --checkpoint RUN --control edges.png`` samples it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import from_dict, option, to_dict
from ..data import Batch, CaptionedImageData, DataRequest, EpochSource, ImageData, load_data
from ..data.control import CONTROL_KINDS, control_image
from ..networks.controlnet import ControlledUNet, ControlNet
from ..networks.unet import UNet
from ..objectives import ObjectiveConfig, build_objective
from ..pipeline import Conditions, ModelCard, Pipeline, StageCard
from ..training import LoopConfig, StepContext, TrainLoop, init_device
from .config import OptimConfig, RunConfig
from .diffusion import DiffusionLoss
from .loop_recipe import LoopRecipe
from .text import CaptionTable

__all__ = ["ControlNetLoss", "ControlNetRecipe", "ControlNetTrainConfig"]

ControlKind = Literal["edges", "mask"]
assert set(ControlKind.__args__) == set(CONTROL_KINDS)  # type: ignore[attr-defined]


def _optim() -> OptimConfig:
    return OptimConfig(steps=1000, lr=2e-4, warmup_steps=0, ema_decay=0.999)


def _run() -> RunConfig:
    return RunConfig(out_dir="runs/controlnet", sample_every=0, checkpoint_every=0)


@dataclass
class ControlNetTrainConfig:
    """``difflab train-controlnet``: what to steer, with what, on which data."""

    base: str = option("", "the base model: a run folder, checkpoint or pipeline folder "
                           "(pixel-space U-Net)")
    control: ControlKind = option("edges", "control images computed from the data: edges "
                                           "(Sobel, thresholded) or mask (foreground)")
    data: str | None = option(None, "data set (default: the one the base was trained on)")
    hint_widths: tuple[int, ...] = option((16, 32), "hidden widths of the hint encoder")
    optim: OptimConfig = option(factory=_optim, help="optimisation")
    run: RunConfig = option(factory=_run, help="bookkeeping")


@dataclass
class ControlNetLoss:
    """The base's loss with the ControlNet steering the frozen base: ``inner`` draws labels
    (dropped to the null label), times and noise as the base's training did; the control
    images come from the clean batch."""

    inner: DiffusionLoss
    base: nn.Module
    control: str

    def __call__(self, module: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        x, y, t, noise, w = self.inner.draw(batch, ctx)
        with torch.no_grad():
            hint = control_image(x, self.control)  # [B, 1, H, W] in {0, 1}
        net = ControlledUNet(self.base, [(module, 1.0)], [hint])
        cond = self.inner.captions(y) if self.inner.captions is not None else y
        return self.inner.objective.loss(self.inner.denoiser(net), x, cond, t, noise, w).loss


def load_base(path: str, device: torch.device) -> Pipeline:
    """The frozen base pipeline; a ValueError unless it is a pixel-space U-Net model."""
    if not path:
        raise ValueError("--base is required: the run folder, checkpoint or pipeline folder "
                         "of the model to control")
    pipe = Pipeline.from_pretrained(path, device=device)
    for net in pipe.networks:
        net.eval().requires_grad_(False)
    if pipe.is_latent or not isinstance(pipe.net, UNet):
        raise ValueError(f"--base {path}: ControlNet training needs a pixel-space U-Net model "
                         f"(got {type(pipe.net).__name__}"
                         f"{', latent' if pipe.is_latent else ''})")
    if pipe.stage.prediction == "consistency" or pipe.stage.guidance_input:
        raise ValueError(f"--base {path}: a distilled student cannot be the base; use its "
                         "teacher")
    return pipe


def base_objective(pipe: Pipeline) -> tuple[ObjectiveConfig, float]:
    """The base's objective config and label-dropout rate (its training config; defaults
    where the card has none, e.g. a pipeline folder saved without it)."""
    training = pipe.card.training or {}
    objective = ObjectiveConfig()
    if isinstance(training.get("objective"), dict):
        objective = from_dict(ObjectiveConfig, training["objective"], "base training config")
    diffusion = training.get("diffusion") if isinstance(training.get("diffusion"), dict) else {}
    return objective, float(diffusion.get("p_uncond", 0.1))


class ControlNetRecipe(LoopRecipe):
    """A ControlNet run built from ``config`` (``data`` replaces the data set)."""

    def __init__(self, config: ControlNetTrainConfig, data: ImageData | None = None, *,
                 overwrite: bool = False):
        self.config = c = config
        self.dist, self.device = init_device(c.run.device)
        self.base_path = str(Path(c.base).expanduser().resolve()) if c.base else ""
        self.base = load_base(c.base, self.device)
        self.data = data if data is not None else self._load_data()
        labels, captions = self._labels()
        objective_config, p_uncond = base_objective(self.base)
        objective = build_objective(objective_config)
        st = self.base.stage
        objective.check(self.base.process, st.prediction)
        if objective.times == "importance":
            raise ValueError("the base was trained with importance-sampled times (vlb); "
                             "ControlNet training does not keep that state")
        torch.manual_seed(c.run.seed)
        self.controlnet = ControlNet.from_unet(self.base.net, 1, control=c.control,
                                               hint_widths=c.hint_widths)
        self.controlnet.to(memory_format=torch.channels_last)
        null = len(self.data.class_names) if labels is not None else None
        inner = DiffusionLoss(objective, self.base.process, st.prediction, st.sigma_data,
                              p_uncond, null, captions, None, True, c.optim.steps)
        self.loss = ControlNetLoss(inner, self.base.net, c.control)
        x = self.data.images.to(self.device)
        self.source = EpochSource(x, labels, c.optim.batch_size, c.run.seed)
        o, r = c.optim, c.run
        self.loop = TrainLoop(
            LoopConfig(steps=o.steps, lr=o.lr, weight_decay=o.weight_decay,
                       warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
                       ema_decay=o.ema_decay or None, log_every=r.log_every, log=r.log,
                       sample_every=r.sample_every, checkpoint_every=r.checkpoint_every,
                       keep_checkpoints=r.keep_checkpoints, out_dir=r.out_dir, seed=r.seed,
                       progress_desc="train controlnet", overwrite=overwrite),
            self.controlnet, self.source, self.loss, self.meta, self.dist, self.device,
            callbacks=[lambda loop: self.sample_grid()])

    def _load_data(self) -> ImageData:
        name = self.config.data or self.base.stage.dataset
        if not name:
            raise ValueError("the base's card names no data set: give --data")
        c, h, _ = self.base.sample_shape
        data = load_data(name, DataRequest(resolution=h, channels=c))
        if not isinstance(data, ImageData):
            raise ValueError(f"--data {name}: ControlNet training needs images")
        return data

    def _labels(self) -> tuple[Tensor | None, CaptionTable | None]:
        """The labels the base is conditioned on (None for an unconditional base), and the
        prompt table of a text base (labels index the data's captions)."""
        base, data = self.base, self.data
        if tuple(data.images.shape[1:]) != base.sample_shape:
            raise ValueError(f"the data's images are {list(data.images.shape[1:])} but the "
                             f"base makes {list(base.sample_shape)}")
        if base.stage.conditioning == "none":
            return None, None
        if data.labels is None:
            raise ValueError(f"the base is {base.stage.conditioning}-conditional but the data "
                             "have no labels or captions")
        labels = data.labels.to(self.device)
        if base.is_text:
            if not isinstance(data, CaptionedImageData):
                raise ValueError("the base takes prompts but the data have no captions")
            from ..text import TextEncoder  # optional extra: imported only when needed
            encoder = TextEncoder(base.stage.text_encoder)
            return labels, CaptionTable(encoder, data.class_names, self.device)
        if list(data.class_names) != base.class_names:
            raise ValueError(f"the data's classes {data.class_names[:5]}... differ from the "
                             f"base's {base.class_names[:5]}...")
        return labels, None

    # -- checkpoints and samples -------------------------------------------------------------
    def stage(self) -> StageCard:
        """The ControlNet's adapter stage (weights filled in when a checkpoint is read)."""
        return StageCard(name="controlnet", kind="controlnet", network="controlnet",
                         network_config=to_dict_config(self.controlnet),
                         sample_shape=list(self.base.sample_shape), weights="", scale=1.0)

    def meta(self) -> dict[str, Any]:
        """Checkpoint metadata: the config and the adapter card (base + ControlNet stage)."""
        return {"config": to_dict(self.config), "control": self.config.control,
                "adapters": {"base": self.base_path, "stages": [to_dict(self.stage())]}}

    def pipeline(self) -> Pipeline:
        """The base with the EMA ControlNet applied (what loading a checkpoint gives)."""
        card = ModelCard(stages=[*self.base.card.stages, self.stage()], ema=True,
                         step=self.step, training=to_dict(self.config))
        return Pipeline(card, [*self.base.networks, self.ema.model], self.device)

    def sample_grid(self, n: int = 8, seed: int = 0) -> Path:
        """Two rows: the control images of the first ``n`` training images, and samples with
        them (their own labels or captions; DDIM, ``--sample-steps`` steps)."""
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        x = self.data.images[:n].to(self.device)
        hint = control_image(x, self.config.control)
        cond = Conditions(len(x), len(x))
        if self.data.labels is not None and self.base.stage.conditioning != "none":
            rows = self.data.labels[:n].to(self.device)
            cond = (Conditions(len(x), len(x), cond=self.loss.inner.captions(rows))
                    if self.base.is_text else Conditions(len(x), len(x), cond=rows))
        out = self.pipeline()(sampler="ddim", steps=self.config.run.sample_steps, cond=cond,
                              seed=seed, control=hint)
        shown = hint.expand(-1, out.samples.shape[1], -1, -1).cpu() * 2 - 1
        out.samples = torch.cat([shown, out.samples])
        return out.save_grid(path)


def to_dict_config(net: ControlNet) -> dict[str, Any]:
    """A ControlNet's config as JSON-able data (the registry's ``build_network`` input)."""
    d = asdict(net.config)
    d["unet"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["unet"].items()}
    d["hint_widths"] = list(d["hint_widths"])
    return d
