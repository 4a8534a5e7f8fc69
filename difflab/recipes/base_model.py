"""The frozen base model of the recipes that adapt a trained model (fine-tuning, ControlNet):
loaded and checked, the objective and label dropout it was trained with, and its kind of data.

A base is anything ``Pipeline.from_pretrained`` reads (a run folder, checkpoint or pipeline
folder) of a pixel-space image model; the adapting run trains with the base's own process,
prediction type and objective, so that what it learns fits the base's sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, from_dict
from ..data import DataRequest, ImageData, load_data
from ..objectives import Objective, ObjectiveConfig, build_objective
from ..pipeline import ModelCard, Pipeline

__all__ = ["base_data", "base_objective", "base_p_uncond", "build_base_objective",
           "load_base"]

#: label dropout assumed when the base's card holds no training config
DEFAULT_P_UNCOND = 0.1


def load_base(path: str | Path, device: torch.device | str, purpose: str,
              channels_last: bool = True) -> Pipeline:
    """The frozen base pipeline at ``path`` (networks in eval mode, no gradients).

    ``purpose`` names the run in the messages ("fine-tuning", "ControlNet training").

    Raises:
        ValueError: no path; the base already has adapter stages, is latent, is not an image
            model (2-D points) or is a distilled student. Each names ``--base``.
        FileNotFoundError: nothing at ``path`` (the message names ``--base``).
    """
    if not str(path):
        raise ValueError(f"--base is required: the run folder, checkpoint or pipeline folder "
                         f"of the model for {purpose}")
    try:
        pipe = Pipeline.from_pretrained(Path(path).expanduser(), device,
                                        channels_last=channels_last)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--base {path}: {e}") from None
    for net in pipe.networks:
        net.eval().requires_grad_(False)
    if pipe.card.adapters:
        raise ValueError(f"--base {path} already has adapter stages; use its base model, or "
                         "save a merged model first")
    if pipe.is_latent:
        raise ValueError(f"--base {path}: {purpose} supports pixel-space models (this one is "
                         "latent)")
    if len(pipe.sample_shape) != 3:
        raise ValueError(f"--base {path}: {purpose} needs an image model (this one makes 2-D "
                         "points)")
    if pipe.stage.prediction == "consistency" or pipe.stage.guidance_input:
        raise ValueError(f"--base {path} is a distilled student; use its teacher")
    return pipe


def base_objective(card: ModelCard) -> ObjectiveConfig:
    """The objective the base model was trained with (its training config), else the one its
    prediction type implies (flow: rectified-flow, edm: edm, otherwise simple)."""
    saved = card.training.get("objective") if isinstance(card.training, dict) else None
    if isinstance(saved, dict) and saved.get("name"):
        try:
            return from_dict(ObjectiveConfig, saved, "the base's training config")
        except ConfigError:  # an older config: its name is enough
            return ObjectiveConfig(name=saved["name"])
    prediction = card.stage_of("diffusion").prediction
    return ObjectiveConfig(name={"flow": "rectified-flow", "edm": "edm"}.get(prediction,
                                                                           "simple"))


def build_base_objective(base: Pipeline, purpose: str) -> Objective:
    """The base's objective (:func:`base_objective`), checked against its process and
    prediction type; a ValueError for one that samples t by importance (its loss history is
    the base run's state, which an adapting run does not have)."""
    objective = build_objective(base_objective(base.card))
    objective.check(base.process, base.stage.prediction)
    if objective.times == "importance":
        raise ValueError(f"the base model's objective samples t by importance (vlb); "
                         f"{purpose} does not keep its loss history (use a base trained with "
                         "another objective)")
    return objective


def base_p_uncond(card: ModelCard) -> float:
    """The base's label/prompt dropout rate in training (``diffusion.p_uncond`` of its
    training config; :data:`DEFAULT_P_UNCOND` where the card has none)."""
    training = card.training if isinstance(card.training, dict) else {}
    diffusion = training.get("diffusion")
    if isinstance(diffusion, dict) and "p_uncond" in diffusion:
        return float(diffusion["p_uncond"])
    return DEFAULT_P_UNCOND


def base_data(base: Pipeline, name: str, seed: int = 0) -> ImageData:
    """The image data set ``name`` at the base's resolution and channels (``seed``: of its
    split and drawn images); a ValueError naming ``--data`` unless it is images."""
    channels, resolution = base.sample_shape[0], base.sample_shape[1]
    data = load_data(name, DataRequest(resolution=resolution, channels=channels, seed=seed))
    if not isinstance(data, ImageData):
        raise ValueError(f"--data {name!r} is not an image data set")
    return data
