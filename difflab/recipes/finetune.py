"""Fine-tuning a trained model: all weights, LoRA adapters or one new token's embedding,
optionally with DreamBooth's prior preservation.

The base model (``Pipeline.from_pretrained``: a run or pipeline folder) is loaded and frozen;
the run trains with the base's own process, prediction type and objective on new images:

- **full** fine-tuning trains every weight of the diffusion network; its checkpoints hold the
  whole network (``adapters.base`` = None);
- **LoRA** (Hu et al. 2021) trains only low-rank updates B A of the network's layers
  (:mod:`difflab.networks.lora`); checkpoints hold the adapter and name the base;
- **textual inversion** (Gal et al. 2022) trains only the input embedding of a new token of
  the text encoder (:class:`~difflab.text.TokenEncoder`); checkpoints hold that row;
- **DreamBooth** (Ruiz et al. 2023) binds the images to an instance prompt and, with a class
  prompt, adds the class-specific prior-preservation loss on class images the base model
  generates once (:mod:`.dreambooth`): loss = instance loss + lambda * class loss.

Checkpoints carry ``adapters`` = {"base", "stages"} in their metadata, so
``Pipeline.from_pretrained(run)`` gives the base with the adapters applied
(``ModelCard.from_checkpoint_meta``). The trained module is the adapter alone (LoRA, token
embeddings) or the network (full), so EMA, optimizer and checkpoints hold only what trains.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import to_dict
from ..data import DataRequest, EpochSource, ImageData, load_data
from ..objectives import ObjectiveConfig, build_objective
from ..pipeline import ModelCard, Pipeline, StageCard, class_index
from ..training import TrainLoop, init_device
from .diffusion import DiffusionLoss, loop_config, set_label_checks
from .dreambooth import PairedSource, class_images, label_tensor
from .finetune_conds import make_conditions
from .finetune_config import FinetuneConfig
from .finetune_loss import FinetuneLoss
from .loop_recipe import LoopRecipe

__all__ = ["FinetuneRecipe", "base_objective"]


def base_objective(card: ModelCard) -> ObjectiveConfig:
    """The objective the base model was trained with (its training config), else the one its
    prediction type implies (flow: rectified-flow, edm: edm, otherwise simple)."""
    training = card.training.get("objective") if isinstance(card.training, dict) else None
    if isinstance(training, dict) and training.get("name"):
        try:
            return ObjectiveConfig(**training)
        except TypeError:  # an older config: its name is enough
            return ObjectiveConfig(name=training["name"])
    prediction = card.stage_of("diffusion").prediction
    return ObjectiveConfig(name={"flow": "rectified-flow", "edm": "edm"}.get(prediction,
                                                                           "simple"))


class FinetuneRecipe(LoopRecipe):
    """A fine-tuning run built from ``config`` (``data`` replaces ``config.model.data``;
    ``overwrite`` as for :class:`~difflab.recipes.DiffusionRecipe`).

    ``run()``, ``resume()``, ``save()`` and the state (``net``: the trained module, ``ema``,
    ``opt``, ``step``) are the loop's."""

    def __init__(self, config: FinetuneConfig, data: ImageData | None = None, *,
                 overwrite: bool = False):
        config.check_given()
        self.config = c = config
        self.method = c.method.name
        self.dist, self.device = init_device(c.run.device, c.speed.precision)
        self.base_path = Path(c.model.base).expanduser().resolve()
        self.base = Pipeline.from_pretrained(self.base_path, self.device,
                                             channels_last=c.speed.channels_last)
        self._check_base()
        self.objective = build_objective(base_objective(self.base.card))
        self.objective.check(self.base.process, self.base.stage.prediction)
        if self.objective.times == "importance":
            raise ValueError("the base model's objective samples t by importance; fine-tuning "
                             "does not keep its loss history (fine-tune a model trained with "
                             "another objective)")
        self.data = data if data is not None else self._load_data()
        self.conds = make_conditions(self.base, self.data, c, self.device)
        self.prior = self._prior_source()
        torch.manual_seed(c.run.seed)  # the adapter's initialisation
        module = self._trainable()
        d = c.dreambooth
        x = self.data.images.to(self.device)
        source = PairedSource(EpochSource(x, self.conds.instance_labels, c.optim.batch_size,
                                          c.run.seed), self.prior)
        inner = DiffusionLoss(self.objective, self.base.process, self.base.stage.prediction,
                              self.base.stage.sigma_data, d.p_uncond, self.conds.null_index,
                              channels_last=c.speed.channels_last, total_steps=c.optim.steps)
        self.loss = FinetuneLoss(inner, self.base, self._network_of, self.conds.table,
                                 d.prior_weight if self.prior is not None else 0.0)
        self.loop = TrainLoop(loop_config(c, overwrite), module, source, self.loss, self.meta,
                              self.dist, self.device,
                              callbacks=[lambda loop: self.sample_grid()])
        if self.method == "lora":  # after the EMA copied the detached adapter
            self.loop.model.attach(self.base.net, 1.0)

    # -- the base and the data ----------------------------------------------------------------
    def _check_base(self) -> None:
        pipe = self.base
        if pipe.card.adapters:
            raise ValueError(f"{self.base_path} already has adapter stages; fine-tune its "
                             "base model, or save a merged model first")
        if pipe.is_latent or len(pipe.sample_shape) != 3:
            raise ValueError(f"{self.base_path}: fine-tuning supports pixel-space image models "
                             "(this one is latent or 2-D points)")
        if pipe.stage.prediction == "consistency" or pipe.stage.guidance_input:
            raise ValueError(f"{self.base_path} is a distilled student; fine-tune its teacher")
        if self.method == "textual_inversion" and not pipe.is_text:
            raise ValueError("--textual-inversion needs a text-conditional base model")
        if self.method == "lora" and self.dist.enabled:
            raise ValueError("--lora is not supported under torchrun yet")

    def _load_data(self) -> ImageData:
        c, h = self.base.sample_shape[0], self.base.sample_shape[1]
        data = load_data(self.config.model.data, DataRequest(resolution=h, channels=c,
                                                             seed=self.config.run.seed))
        if not isinstance(data, ImageData):
            raise ValueError(f"--data {self.config.model.data!r} is not an image data set")
        return data

    def _prior_source(self) -> EpochSource | None:
        """DreamBooth's class images (generated once, cached in the run folder)."""
        d, c = self.config.dreambooth, self.config
        if d.class_prompt is None:
            return None
        if self.base.is_text:
            x = class_images(self.base, Path(c.run.out_dir), d.class_images, d.class_steps,
                             c.run.seed, prompt=d.class_prompt)
        else:
            label = class_index(d.class_prompt, self.base.class_names)
            x = class_images(self.base, Path(c.run.out_dir), d.class_images, d.class_steps,
                             c.run.seed, label=label)
        y = label_tensor(self.conds.class_label, len(x), self.device)
        return EpochSource(x.to(self.device), y, c.optim.batch_size, c.run.seed + 1)

    # -- what trains ----------------------------------------------------------------------------
    def _trainable(self) -> nn.Module:
        """The module the loop trains: the network (full), a LoRA module or the new token's
        embedding; the base network is frozen in the other two cases."""
        net = self.base.net
        if self.method == "full":
            net.requires_grad_(True)
            set_label_checks(net, False)
            return net
        if self.method == "lora":
            return self._lora_module(net)
        return self.conds.token_module()

    def _lora_module(self, net: nn.Module) -> nn.Module:
        from ..networks.lora import LoRA, LoRAConfig

        m = self.config.method
        cfg = LoRAConfig.for_network(net, rank=m.lora_rank, alpha=m.lora_alpha,
                                     conv=m.lora_conv)
        return LoRA(cfg).to(self.device)

    def _network_of(self, module: nn.Module) -> nn.Module:
        """The network a step calls: the trained one (full) or the frozen base (adapters)."""
        return module if self.method == "full" else self.base.net

    @property
    def trained_parameters(self) -> int:
        """Number of parameters the optimizer updates."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    # -- checkpoints, samples ---------------------------------------------------------------------
    def adapter_stages(self) -> list[dict[str, Any]]:
        """The adapter stage dicts of this run (empty for full fine-tuning)."""
        if self.method == "full":
            return []
        net = self.net
        kind = "lora" if self.method == "lora" else "embeddings"
        name = "lora" if self.method == "lora" else "token_embeddings"
        return [{"name": kind, "kind": kind, "network": name,
                 "network_config": to_dict(net.config), "sample_shape":
                 list(self.base.sample_shape), "weights_prefix": ""}]

    def meta(self) -> dict[str, Any]:
        """Checkpoint metadata: the config, and ``adapters`` (``ModelCard.from_checkpoint_meta``
        turns it into the card: the base and the adapters, or the whole network)."""
        out: dict[str, Any] = {"config": self.config.to_dict(), "finetune": self.method,
                               "adapters": {"base": None if self.method == "full"
                                            else str(self.base_path),
                                            "stages": self.adapter_stages()}}
        if self.method == "full":
            st = self.base.stage
            out["stage"] = {**to_dict(st), "weights": "", "weights_prefix": "",
                            "dataset": self.config.model.data,
                            "captions": self.conds.captions(st.captions)}
        return out

    def pipeline(self) -> Pipeline:
        """The EMA weights as a :class:`Pipeline` (what loading this run's checkpoint gives)."""
        card = ModelCard.from_checkpoint_meta(self.meta())
        if self.method == "full":
            return Pipeline(card, [self.ema.model], self.device)
        base = (Pipeline.from_pretrained(self.base_path, self.device) if self.method == "lora"
                else self.base)  # the training network carries the raw LoRA
        stages = base.card.stages + [StageCard(**{**vars(s), "weights": ""})
                                     for s in card.adapters]
        joined = ModelCard(**{**vars(card), "stages": stages, "base": None})
        return Pipeline(joined, list(base.networks) + [copy.deepcopy(self.ema.model)],
                        self.device)

    def sample_grid(self, per_prompt: int = 8, seed: int = 0) -> Path:
        """Samples of the EMA weights, a row per instance prompt or label (and the class
        prompt)."""
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        pipe = self.pipeline()
        steps = self.config.run.sample_steps
        if pipe.is_text:
            out = pipe(prompt=self.conds.sample_prompts(), n=None, steps=steps, seed=seed)
        elif pipe.class_names:
            labels = [v for v in self.conds.sample_labels() for _ in range(per_prompt)]
            out = pipe(labels=labels, steps=steps, seed=seed)
        else:
            out = pipe(per_prompt, steps=steps, seed=seed)
        return out.save_grid(path)

    def batch_loss(self, step: int) -> Tensor:
        """The loss of the batch at ``step`` with the current weights (no update)."""
        batch = self.loop.source.batch(step, self.loop.generator)
        return self.loss(self.loop.train_module, batch, self.loop.context(step, len(batch)))
