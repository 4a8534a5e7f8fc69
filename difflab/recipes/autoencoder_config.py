"""The autoencoder run's typed config (``difflab train-autoencoder``; options generated from
it). Groups: ``data``, ``network`` (the :class:`AutoencoderConfig` itself; its input and
output channels follow the data), ``loss`` (with the patch discriminator's config),
``latent`` (how the scale factor is estimated), and the ``optim``, ``run`` and ``speed``
groups of the diffusion run with autoencoder defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..config import check_ranges, from_dict, option, to_dict
from ..networks.autoencoder import AutoencoderConfig
from ..networks.patch_discriminator import PatchDiscriminatorConfig
from .config import OptimConfig, RunConfig, SpeedConfig

__all__ = ["AutoencoderDataConfig", "AutoencoderLossConfig", "AutoencoderRunConfig",
           "AutoencoderSpeedConfig", "AutoencoderTrainConfig", "LatentScaleConfig"]


@dataclass
class AutoencoderDataConfig:
    dataset: str = option("shapes", "images to compress: 'shapes', 'digits', 'scenes' (64 px), "
                                    "any registered data set or a folder of images; trained "
                                    "on its train split, PSNR reported on its test split")
    resolution: int = option(32, "image size the data is resized/cropped to", ge=1)
    channels: Literal[1, 3] | None = option(None, "1 (grey) or 3 (RGB); default: the data "
                                                  "set's own")

    def __post_init__(self) -> None:
        check_ranges(self)


def _disc() -> PatchDiscriminatorConfig:
    return PatchDiscriminatorConfig(channels=32)  # LDM's 64 costs 4x the compute on a CPU


@dataclass
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "l2"] = option("l1", "reconstruction loss: l1 (LDM's) or l2, "
                                                       "mean over pixels")
    kl_weight: float = option(1e-6, "weight of KL(q(z|x) || N(0, I)) against the "
                                    "reconstruction loss summed over pixels (LDM's 1e-6; "
                                    "--regularizer kl)", ge=0)
    vq_weight: float = option(1.0, "weight of the codebook + commitment loss "
                                   "(--regularizer vq)", ge=0)
    disc_weight: float = option(0.5, "weight of the patch discriminator's generator loss "
                                     "(times the adaptive weight; 0: no discriminator)", ge=0)
    disc_start: int = option(2000, "step at which the discriminator starts (before it the "
                                   "loss is reconstruction + regulariser alone)", ge=0)
    adaptive_weight: bool = option(True, "scale the GAN term by ||grad rec|| / ||grad GAN|| "
                                         "at the decoder's last layer (VQGAN eq. 7)")
    discriminator: PatchDiscriminatorConfig = option(factory=_disc,
                                                     help="patch discriminator")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class LatentScaleConfig:
    scale_images: int = option(1000, "training images over which the latent scale factor "
                                     "is estimated at each checkpoint", ge=1)
    scale_posterior: Literal["sample", "mean"] = option(
        "sample", "scale so that posterior samples (LDM, SD) or posterior means have unit "
                  "variance on those images")
    latent_shift: bool = option(False, "also store the latents' mean as the shift factor "
                                       "(SD3); off: shift 0")


@dataclass
class AutoencoderRunConfig(RunConfig):
    out_dir: str = option("runs/autoencoder", "run folder: config.json, metrics.jsonl, "
                                              "checkpoints/, samples/", resume=True)
    sample_every: int = option(500, "steps between reconstruction grids and held-out PSNR "
                                    "(0: never)", resume=True, ge=0)
    sample_steps: int = option(50, "unused by autoencoders", cli=False, ge=1)


@dataclass
class AutoencoderSpeedConfig(SpeedConfig):
    grad_checkpointing: bool = option(False, "unused by autoencoders", cli=False,
                                      resume=True)


def _optim() -> OptimConfig:
    return OptimConfig(steps=4000, batch_size=32, lr=5e-4, warmup_steps=100, grad_clip=1.0,
                       ema_decay=0.999)


@dataclass
class AutoencoderTrainConfig:
    """Everything an autoencoder run depends on. ``network.in_channels`` and
    ``out_channels`` and the discriminator's channels are set from the data by the recipe."""

    data: AutoencoderDataConfig = option(factory=AutoencoderDataConfig, help="data")
    network: AutoencoderConfig = option(factory=AutoencoderConfig, help="autoencoder")
    loss: AutoencoderLossConfig = option(factory=AutoencoderLossConfig, help="loss")
    latent: LatentScaleConfig = option(factory=LatentScaleConfig, help="latent scale")
    optim: OptimConfig = option(factory=_optim, help="optimisation")
    run: AutoencoderRunConfig = option(factory=AutoencoderRunConfig, help="bookkeeping")
    speed: AutoencoderSpeedConfig = option(factory=AutoencoderSpeedConfig, help="speed")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> AutoencoderTrainConfig:
        """From nested tables, checked (see :func:`difflab.config.from_dict`)."""
        return from_dict(cls, d, where)
