"""Latent diffusion (Rombach et al. 2022): any diffusion objective, trained on an
autoencoder's latents instead of pixels.

The data set is encoded once, before training, by the frozen encoder: the posterior mean and
standard deviation of every image are kept on the device, scaled to the diffusion stage's
units ((z - shift) * scale, with the stage's scale factor). Each step then trains either on a
fresh draw z = mean + std * n from the posterior (``posterior="sample"``, as LDM does: the
decoder has seen such latents, and the noise is a mild augmentation) or on the means
(``"mean"``). The run's checkpoints carry the autoencoder as a second stage of their card
(``autoencoder_stage`` in the metadata; its weights are written once as
``checkpoints/autoencoder.safetensors``), so sampling, editing and evaluation load a latent
model like any other and get decoded images from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import to_dict
from ..data import Batch, EpochSource
from ..pipeline.autoencoder import AUTOENCODER_STAGE, load_autoencoder
from ..pipeline.card import StageCard
from ..pipeline.loading import write_stage_weights

__all__ = ["AUTOENCODER_WEIGHTS", "LatentSpace", "PosteriorSource"]

#: file name of a latent run's copy of its autoencoder, inside ``checkpoints/``
AUTOENCODER_WEIGHTS = "autoencoder.safetensors"


@dataclass
class PosteriorSource:
    """Batches of latents: the epoch source's images' posterior means, plus (when ``std``
    is given) std * n with n drawn from the run's generator for the whole global batch."""

    inner: EpochSource          # over the means (and labels)
    std: Tensor | None          # [N, C, h, w] posterior standard deviations, or None

    @property
    def x(self) -> Tensor:
        return self.inner.x

    @property
    def labels(self) -> Tensor | None:
        return self.inner.labels

    def batch(self, step: int, generator: torch.Generator | None = None) -> Batch:
        if self.std is None:
            return self.inner.batch(step, generator)
        idx = self.inner.indices(step)
        mean = self.inner.x[idx]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=mean.device)
        return Batch(mean + self.std[idx] * noise,
                     None if self.inner.labels is None else self.inner.labels[idx])


@dataclass
class LatentSpace:
    """A frozen autoencoder and a data set's encoding in it.

    ``stage``: the autoencoder's stage card (its ``sample_shape`` is the data's images');
    ``mean``/``std``: scaled posterior means and standard deviations [N, C, h, w] (``std``
    None for the means only, or for a deterministic (VQ) encoder)."""

    stage: StageCard
    net: nn.Module
    mean: Tensor
    std: Tensor | None
    written: bool = field(default=False, repr=False)

    @classmethod
    def encode(cls, path: str | Path, images: Tensor, device: torch.device,
               posterior: str = "sample", batch_size: int = 64) -> LatentSpace:
        """Load the autoencoder at ``path`` (see :func:`~difflab.pipeline.load_autoencoder`)
        and encode ``images`` [N, C, H, W] in [-1, 1] once, without gradients."""
        stage, net = load_autoencoder(path, device)
        shape = list(images.shape[1:])
        if shape[0] != stage.sample_shape[0]:
            raise ValueError(f"--autoencoder {path} takes {stage.sample_shape[0]}-channel "
                             f"images; the data has {shape[0]} channels (set --channels)")
        f = int(net.downsample_factor)
        if shape[1] % f or shape[2] % f:
            raise ValueError(f"--autoencoder {path} down-samples by {f}; the data's "
                             f"{shape[1]}x{shape[2]} images are not a multiple of it "
                             "(set --resolution)")
        stage = replace(stage, sample_shape=shape, name=AUTOENCODER_STAGE)
        means, stds = [], []
        with torch.no_grad():
            for chunk in images.split(batch_size):
                post = net.encode(chunk.to(device, torch.float32))
                means.append((post.mean - stage.shift_factor) * stage.scale_factor)
                if posterior == "sample" and post.logvar is not None:
                    stds.append(torch.exp(0.5 * post.logvar) * stage.scale_factor)
        return cls(stage, net, torch.cat(means), torch.cat(stds) if stds else None)

    def data_range(self) -> list[float]:
        """[lo, hi] of the training latents (the posterior's mean +- 3 std where it is
        sampled): the latent stage's x0_hat is clipped to it, as pixel x0_hat is to [-1, 1],
        so that a poorly conditioned first step cannot throw samples far off the data."""
        lo, hi = self.mean, self.mean
        if self.std is not None:
            lo, hi = self.mean - 3 * self.std, self.mean + 3 * self.std
        return [float(lo.min()), float(hi.max())]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one latent (C, h, w)."""
        return tuple(self.mean.shape[1:])

    def source(self, labels: Tensor | None, batch_size: int, seed: int) -> PosteriorSource:
        """The training batches (see :class:`PosteriorSource`)."""
        return PosteriorSource(EpochSource(self.mean, labels, batch_size, seed), self.std)

    def stage_meta(self) -> dict[str, Any]:
        """The autoencoder stage as a checkpoint stores it (weights beside the checkpoints)."""
        return to_dict(replace(self.stage, weights=AUTOENCODER_WEIGHTS, weights_prefix=""))

    def write_weights(self, checkpoints: Path) -> None:
        """Write the autoencoder's weights into ``checkpoints`` (once per run)."""
        if not self.written:
            write_stage_weights(self.net, checkpoints / AUTOENCODER_WEIGHTS)
            self.written = True
