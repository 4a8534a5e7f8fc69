"""Recipes: what to train and how it is wired. Each builds the pieces (data, network,
objective, loss, callbacks) from a typed config and hands them to the one training loop
(:class:`difflab.training.TrainLoop`)."""

from .autoencoder import AutoencoderRecipe, estimate_latent_scale
from .autoencoder_config import AutoencoderTrainConfig
from .classifier import ClassifierTrainConfig, train_classifier
from .config import TrainConfig, read_config_file
from .diffusion import DiffusionLoss, DiffusionRecipe
from .images import MODEL_SIZES
from .text import CaptionTable

__all__ = ["MODEL_SIZES", "AutoencoderRecipe", "AutoencoderTrainConfig", "CaptionTable",
           "ClassifierTrainConfig", "DiffusionLoss", "DiffusionRecipe", "TrainConfig",
           "estimate_latent_scale", "read_config_file", "train_classifier"]
