"""The fine-tuning run's typed config (``difflab finetune``; options generated from it).

Groups: ``model`` (the base model and the data), ``method`` (full fine-tuning, LoRA or
textual inversion), ``dreambooth`` (instance and class prompts, prior preservation), and the
``optim``, ``run`` and ``speed`` groups of the diffusion run with fine-tuning defaults. The
process, prediction type, objective and network are the base model's, not options.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, check_ranges, deep_merge, from_dict, option, to_dict
from .config import OptimConfig, RunConfig, SpeedConfig

__all__ = ["DreamBoothConfig", "FinetuneConfig", "FinetuneMethodConfig", "FinetuneModelConfig",
           "FinetuneRunConfig", "default_lr"]

#: learning rates used when --lr is not given, per method (full fine-tuning moves every
#: weight a little; LoRA's few weights and one token's embedding need larger steps)
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "textual_inversion": 5e-3}


@dataclass
class FinetuneModelConfig:
    base: str = option("", "the base model: a run folder, its checkpoint or a pipeline "
                           "folder (Pipeline.from_pretrained)")
    data: str = option("", "training images: any data set spec ('shapes', 'folder:PATH' with "
                           "optional metadata.jsonl captions, ...), resized to the base model's "
                           "resolution and channels")


@dataclass
class FinetuneMethodConfig:
    lora: bool = option(False, "train LoRA adapters (Hu et al. 2021) instead of all weights")
    lora_rank: int = option(4, "LoRA rank r", ge=1)
    lora_alpha: float | None = option(None, "LoRA alpha (the update is alpha / r * B A); "
                                            "default: the rank", gt=0)
    lora_conv: bool = option(False, "LoRA also on convolutions (default: attention "
                                    "projections only)")
    textual_inversion: str | None = option(
        None, "textual inversion (Gal et al. 2022): learn only the input embedding of this "
              "new token (e.g. '<my-shape>'); text models only")
    init_word: str | None = option(
        None, "textual inversion: the embedding starts as this word's (one token of the "
              "encoder's vocabulary, e.g. 'shape')")

    @property
    def name(self) -> str:
        """``"full"``, ``"lora"`` or ``"textual_inversion"``."""
        if self.textual_inversion is not None:
            return "textual_inversion"
        return "lora" if self.lora else "full"

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.lora and self.textual_inversion is not None:
            raise ConfigError("--lora and --textual-inversion are different methods; give one")
        if (self.textual_inversion is None) != (self.init_word is None):
            raise ConfigError("--textual-inversion TOKEN and --init-word WORD go together")


@dataclass
class DreamBoothConfig:
    instance_prompt: str | None = option(
        None, "every training image's prompt (text models; DreamBooth: 'a sks shape'), or for "
              "class models the class label (name or index) the images are bound to; "
              "default: the data's own captions or labels")
    class_prompt: str | None = option(
        None, "DreamBooth prior preservation (Ruiz et al. 2023): the class prompt ('a shape'; "
              "class models: a class label) the base model generates the class images with")
    prior_weight: float = option(1.0, "lambda of the prior-preservation loss: loss = instance "
                                      "loss + lambda * class loss", ge=0)
    class_images: int = option(50, "class images generated once by the base model (cached in "
                                   "the run folder as class_images.safetensors)", ge=1)
    class_steps: int = option(25, "sampler steps for the class images (the base model's "
                                  "default sampler)", ge=1)
    p_uncond: float = option(0.0, "probability of dropping the prompt or label (keeps the "
                                  "unconditional model for classifier-free guidance)",
                             ge=0, le=1)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class FinetuneRunConfig(RunConfig):
    out_dir: str = option("runs/finetune", "run folder: config.json, metrics.jsonl, "
                                           "checkpoints/, samples/", resume=True)
    sample_every: int = option(0, "steps between sample grids (0: never)", resume=True, ge=0)
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at the end)",
                                   resume=True, ge=0)
    sample_steps: int = option(25, "steps of the sample grids (the base's default sampler)",
                               ge=1)


def _optim() -> OptimConfig:
    return OptimConfig(steps=400, batch_size=4, lr=DEFAULT_LR["full"], warmup_steps=0,
                       grad_clip=1.0, ema_decay=0.99)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (the rest is the base model's)."""

    model: FinetuneModelConfig = option(factory=FinetuneModelConfig, help="model")
    method: FinetuneMethodConfig = option(factory=FinetuneMethodConfig, help="method")
    dreambooth: DreamBoothConfig = option(factory=DreamBoothConfig, help="dreambooth")
    optim: OptimConfig = option(factory=_optim, help="optimisation")
    run: FinetuneRunConfig = option(factory=FinetuneRunConfig, help="bookkeeping")
    speed: SpeedConfig = option(factory=SpeedConfig, help="speed")

    def check_given(self) -> None:
        """The base and the data are named (they have no default)."""
        if not self.model.base:
            raise ConfigError("--base is required: the model to fine-tune")
        if not self.model.data:
            raise ConfigError("--data is required: the images to fine-tune on")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> FinetuneConfig:
        """From nested tables, checked (see :func:`difflab.config.from_dict`)."""
        return from_dict(cls, d, where)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "config") -> FinetuneConfig:
        """From nested tables where ``optim.lr``, when not given, is the method's default
        (:func:`default_lr`)."""
        merged: dict[str, Any] = {}
        deep_merge(merged, copy.deepcopy(dict(values)))
        optim = merged.setdefault("optim", {})
        if isinstance(optim, dict) and "lr" not in optim:
            method = from_dict(FinetuneMethodConfig, merged.get("method") or {}, where)
            optim["lr"] = default_lr(method.name)
        return cls.from_dict(merged, where)


def default_lr(method: str) -> float:
    """The learning rate of ``method`` when none is given."""
    return DEFAULT_LR[method]
