"""Denoiser networks and a name -> (class, config) registry."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import nn

from difflab.networks.autoencoder import Autoencoder, AutoencoderConfig, LatentDistribution
from difflab.networks.classifier import ClassifierConfig, NoisyClassifier
from difflab.networks.controlnet import ControlledUNet, ControlNet, ControlNetConfig
from difflab.networks.diffusers_unet import (
    DiffusersAutoencoder,
    DiffusersAutoencoderConfig,
    DiffusersUNet,
    DiffusersUNetConfig,
)
from difflab.networks.dit import DIT_SIZES, DiT, DiTConfig
from difflab.networks.embeddings import timestep_embedding
from difflab.networks.latent import LatentUNet, LatentUNetConfig
from difflab.networks.lora import LoRA, LoRAConfig
from difflab.networks.mlp import MLPConfig, MLPDenoiser
from difflab.networks.token_embeddings import TokenEmbeddings, TokenEmbeddingsConfig
from difflab.networks.unet import UNet, UNetConfig, with_guidance_embedding

__all__ = [
    "DIT_SIZES",
    "NETWORKS",
    "Autoencoder",
    "AutoencoderConfig",
    "ClassifierConfig",
    "ControlNet",
    "ControlNetConfig",
    "ControlledUNet",
    "DiT",
    "DiTConfig",
    "LatentUNet",
    "LatentDistribution",
    "LatentUNetConfig",
    "LoRA",
    "LoRAConfig",
    "NoisyClassifier",
    "TokenEmbeddings",
    "TokenEmbeddingsConfig",
    "MLPConfig",
    "MLPDenoiser",
    "UNet",
    "UNetConfig",
    "build_network",
    "count_parameters",
    "with_guidance_embedding",
    "timestep_embedding",
]

#: name -> (network class, config dataclass); each class takes its config as sole argument.
NETWORKS: dict[str, tuple[type[nn.Module], type]] = {
    "unet": (UNet, UNetConfig),
    "mlp": (MLPDenoiser, MLPConfig),
    "classifier": (NoisyClassifier, ClassifierConfig),
    "latent_unet": (LatentUNet, LatentUNetConfig),
    "autoencoder": (Autoencoder, AutoencoderConfig),
    "dit": (DiT, DiTConfig),
    "lora": (LoRA, LoRAConfig),
    "token_embeddings": (TokenEmbeddings, TokenEmbeddingsConfig),
    "controlnet": (ControlNet, ControlNetConfig),
    "diffusers_unet": (DiffusersUNet, DiffusersUNetConfig),
    "diffusers_autoencoder": (DiffusersAutoencoder, DiffusersAutoencoderConfig),
}


def build_network(name: str, config: dict[str, Any]) -> nn.Module:
    """Build a registered network from a plain config dict (e.g. loaded from JSON).

    Raises:
        ValueError: unknown ``name`` (lists valid names), unknown config keys (lists valid
            fields), or invalid config values.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {sorted(NETWORKS)}")
    cls, config_cls = NETWORKS[name]
    valid = {f.name for f in fields(config_cls)}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"unknown {name} config keys {unknown}; valid keys: {sorted(valid)}")
    return cls(config_cls(**config))


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements in ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())
