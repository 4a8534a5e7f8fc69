"""Recipes: what to train and how it is wired. Each builds the pieces (data, network,
objective, loss, callbacks) from a typed config and hands them to the one training loop
(:class:`difflab.training.TrainLoop`)."""

from .classifier import ClassifierTrainConfig, train_classifier
from .config import TrainConfig, read_config_file
from .diffusion import DiffusionLoss, DiffusionRecipe
from .images import MODEL_SIZES
from .text import CaptionTable

__all__ = ["MODEL_SIZES", "CaptionTable", "ClassifierTrainConfig", "DiffusionLoss",
           "DiffusionRecipe", "TrainConfig", "read_config_file", "train_classifier"]
